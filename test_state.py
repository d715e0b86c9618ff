"""Convolution and recurrence, switchable at any point, for both layers: forward(u, state, return_state) and
step() hand the state to each other. The naive twin is the step() loop (float64 layers in eval mode, dt fixed by
writing log_dt), with a dense check of the formulas where it helps."""
import math

import pytest
import torch

import hope
from bench import LaunchCount
from hope import HOPE
from s4d import S4D

f64 = torch.float64
DTS = (1e-3, 0.1, 1.0, 10.0)
SPLITS = ([1, 1, 5], [7], [3, 4])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def step_loop(layer, u, state=None):
    """The naive twin: step() over u (B, H, L) from state -> outputs (B, H, L) and the final state."""
    ys = []
    for t in range(u.shape[-1]):
        y, state = layer.step(u[..., t], state)
        ys.append(y)
    return torch.stack(ys, -1), state


def chunked(layer, u, split, state=None):
    """forward over u's chunks (lengths split, along the last axis of u (B, H, L)), the state passed on."""
    ys = []
    for chunk in u.split(split, -1):
        y, state = layer(chunk if layer.transposed else chunk.transpose(1, 2), state, return_state=True)
        ys.append(y if layer.transposed else y.transpose(1, 2))
    return torch.cat(ys, -1), state


def close(x, ref, rtol=1e-12):
    assert ((x - ref).norm() / ref.norm()).item() <= rtol


def make(cls, dt, **kw):
    """A float64 layer in eval mode (3 channels, state size 8) with every dt set to the value given."""
    layer = cls(3, d_state=8, **kw).double().eval()
    with torch.no_grad():
        layer.log_dt.fill_(math.log(dt))
    return layer


def random_state(layer, B):
    """Any state, not only reachable ones (S4D's is complex)."""
    return torch.randn_like(layer.default_state(B))


@pytest.mark.parametrize("cls", [HOPE, S4D])
@pytest.mark.parametrize("dt", DTS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("transposed", [True, False])
def test_chunks_are_the_whole_and_the_step_loop(cls, dt, split, transposed):
    """From a random state: forward over chunks == forward over the whole == the step() loop, and the returned
    state == the loop's. HOPE at dt = 1e-3 has a memory n/dt = 8,000 steps, far beyond every chunk's 2L."""
    layer = make(cls, dt, transposed=transposed)
    u, x = torch.randn(2, 3, 7, dtype=f64), random_state(layer, 2)
    y_loop, x_loop = step_loop(layer, u, x)
    y_whole, x_whole = chunked(layer, u, [7], x)
    y, x_end = chunked(layer, u, split, x)
    close(y, y_whole)
    close(y, y_loop)
    close(x_end, x_loop)
    close(x_whole, x_loop)


@pytest.mark.parametrize("dt", [1e-3, 0.05])
def test_hope_long_chunks_at_paper_state_size(dt):
    """n = 64 (the circle's M = 512 points) and chunks of 150 and 1: the state and output of the step() loop."""
    layer = HOPE(2, d_state=64, dt_min=dt, dt_max=dt).double().eval()
    u, x = torch.randn(1, 2, 301, dtype=f64), random_state(layer, 1)
    y_loop, x_loop = step_loop(layer, u, x)
    y, x_end = chunked(layer, u, [150, 1, 150], x)
    close(y, y_loop, 1e-11)
    close(x_end, x_loop, 1e-11)


@pytest.mark.parametrize("dt", DTS)
def test_s4d_state_formulas_dense(dt):
    """The final state dA^L x + sum_t dA^(L-1-t) dB u[t] and the output block(conv + free response), the free
    response 2 Re sum_n C_n dA_n^(t+1) x_n, with the powers of dA and the causal convolution written out."""
    layer, L = make(S4D, dt), 6
    dt_, A, C = (t.detach() for t in layer._system())
    dA = torch.exp(dt_[:, None] * A)
    u, x = torch.randn(2, 3, L, dtype=f64), random_state(layer, 2)
    final = dA ** L * x + sum(dA ** (L - 1 - t) * (dA - 1) / A * u[..., t, None] for t in range(L))
    free = torch.stack([2 * (C * dA ** (t + 1) * x).sum(-1).real for t in range(L)], -1)
    k = layer.kernel(L).detach()
    conv = torch.stack([sum(k[:, t - s] * u[..., s] for s in range(t + 1)) for t in range(L)], -1)
    y, x_end = layer(u, x, return_state=True)
    close(x_end, final)
    close(y, layer._block(conv + free, u))


def cascade_matrices(layer):
    """The HOPE cascade as a dense one-step system x' = A x + b u, y = c x' + D u (per channel), from hope.py's
    comments only: (I + a S) x' = [u, x_(m-1) + a x_m], solved with a dense inverse."""
    n1, a = layer.n + 1, ((1 - layer.log_dt.exp()) / (1 + layer.log_dt.exp())).detach()  # (H,)
    S = torch.diag(torch.ones(n1 - 1, dtype=f64), -1)
    Minv = torch.linalg.inv(torch.eye(n1, dtype=f64) + a[:, None, None] * S)  # (H, n1, n1)
    P = S + a[:, None, None] * torch.eye(n1, dtype=f64)  # x_(m-1) + a x_m in row m
    P[:, 0] = 0  # row 0 is the input
    e0 = torch.eye(n1, dtype=f64)[0]
    c = torch.nn.functional.pad(layer.h.detach(), (1, 0))  # y = sum_i h_i x'_(i+1)
    return Minv @ P, Minv @ e0, c


@pytest.mark.parametrize("dt", DTS)
@pytest.mark.parametrize("L", [1, 6])
def test_hope_state_formulas_dense(dt, L):
    """A^L x, the final state A^L x + sum_t A^(L-1-t) b u[t] and the output block(conv + c A^(t+1) x + D u), with
    dense matrix powers; the fast A^L x (the product of series on the circle) against matrix_power."""
    layer = make(HOPE, dt)
    A, b, c = cascade_matrices(layer)
    u, x = torch.randn(2, 3, L, dtype=f64), random_state(layer, 2)
    Ap = [torch.linalg.matrix_power(A, t) for t in range(L + 1)]  # (H, n1, n1) each
    apply = lambda M, v: torch.einsum("hij,...hj->...hi", M, v)  # noqa: E731
    final = apply(Ap[L], x) + sum(apply(Ap[L - 1 - t], b * u[..., t, None]) for t in range(L))
    free = torch.stack([(c * apply(Ap[t + 1], x)).sum(-1) for t in range(L)], -1)
    k = layer.kernel(L).detach()
    conv = torch.stack([sum(k[:, t - s] * u[..., s] for s in range(t + 1)) for t in range(L)], -1)
    y, x_end = layer(u, x, return_state=True)
    close(x_end, final)
    close(y, layer._block(conv + free + layer.D[:, None] * u))
    a = ((1 - layer.log_dt.exp()) / (1 + layer.log_dt.exp())).detach()[:, None].double()
    close(hope._advance(x, a, hope._circle(a, L, layer.n)), apply(Ap[L], x))


@pytest.mark.parametrize("cls", [HOPE, S4D])
@pytest.mark.parametrize("dt", DTS)
def test_step_continues_forward(cls, dt):
    """A prompt through forward, then step(): the same outputs and state as step() all the way."""
    layer = make(cls, dt)
    u = torch.randn(2, 3, 9, dtype=f64)
    y_loop, x_loop = step_loop(layer, u)
    y, x = layer(u[..., :5], return_state=True)
    y_rest, x = step_loop(layer, u[..., 5:], x)
    close(torch.cat([y, y_rest], -1), y_loop)
    close(x, x_loop)


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_zero_state_is_no_state(cls):
    """S4D's state route is the plain one plus terms that vanish: bitwise equal. HOPE's computes the kernel's
    spectrum with the free responses' (one table): equal to round-off."""
    layer = make(cls, 0.1)
    u = torch.randn(2, 3, 11, dtype=f64)
    y = layer(u)
    y_zero, (y_none, x) = layer(u, layer.default_state(2)), layer(u, return_state=True)
    for got in (y_zero, y_none):
        assert torch.equal(got, y) if cls is S4D else ((got - y).norm() / y.norm()).item() <= 1e-13
    close(x, step_loop(layer, u)[1])


def test_hope_state_route_gradcheck():
    """Gradients through forward(u, state, return_state=True) reach u, the state, h, D and dt (autograd)."""
    layer = HOPE(2, d_state=3, dt_min=0.05, dt_max=0.5).double()
    u, x = torch.randn(1, 2, 5, dtype=f64, requires_grad=True), torch.randn(1, 2, 4, dtype=f64, requires_grad=True)

    def f(u, x, h, log_dt, D):
        with torch.no_grad():
            layer.h.copy_(h), layer.log_dt.copy_(log_dt), layer.D.copy_(D)
        layer.h.grad = layer.log_dt.grad = layer.D.grad = None
        return torch.func.functional_call(layer, {"h": h, "log_dt": log_dt, "D": D}, (u, x), {"return_state": True})

    params = [p.detach().clone().requires_grad_() for p in (layer.h, layer.log_dt, layer.D)]
    assert torch.autograd.gradcheck(f, (u, x, *params))


x2 = torch.zeros(2, 4, 4, dtype=torch.complex64)


@pytest.mark.parametrize("call, match", [
    (lambda: S4D(4, d_state=8, bidirectional=True)(torch.randn(2, 4, 5), x2), "is bidirectional: its outputs"),
    (lambda: S4D(4, d_state=8, bidirectional=True)(torch.randn(2, 4, 5), return_state=True), "is bidirectional"),
    (lambda: S4D(4, d_state=8, bidirectional=True).step(torch.randn(2, 4)), "is bidirectional"),
    (lambda: S4D(4, d_state=8)(torch.randn(2, 4, 5), x2[:1]), r"state must be torch.complex64 \(2, 4, 4\)"),
    (lambda: S4D(4, d_state=8)(torch.randn(2, 4, 5), x2[..., :3]), "as default_state"),
    (lambda: S4D(4, d_state=8).step(torch.randn(2, 4), x2.to(torch.complex128)), "state must be torch.complex64"),
    (lambda: S4D(4, d_state=8).step(torch.randn(2, 4), x2.real), "state must be torch.complex64"),
    (lambda: S4D(4, d_state=8).bfloat16().step(torch.randn(2, 4)), "keep the layer in float32"),
    (lambda: S4D(4, d_state=8).step(torch.randn(2, 4, 1)), r"step expects a float tensor u_t \(B, H=4\)"),
    (lambda: S4D(4, d_state=8).step(torch.ones(2, 4, dtype=torch.long)), "float tensor"),
    (lambda: S4D(4)(torch.randn(2, 4, 0)), "L >= 1"),
    (lambda: S4D(0), "need d_model >= 1"),
    (lambda: S4D(4, d_state=0), "d_state even and >= 2"),
    (lambda: S4D(4, dt_min=math.nan), "finite"),
    (lambda: S4D(4, dt_max=math.inf), "finite"),
    (lambda: HOPE(4, circular=True)(torch.randn(2, 4, 5), return_state=True), "circular: its output at t"),
    (lambda: HOPE(4, bidirectional=True)(torch.randn(2, 4, 5), torch.zeros(2, 4, 65)), "bidirectional: its output"),
    (lambda: HOPE(4, circular=True).step(torch.randn(2, 4)), "circular"),
    (lambda: HOPE(4, d_state=8)(torch.randn(2, 4, 5), torch.zeros(2, 4, 8)), r"state must be a float tensor"),
    (lambda: HOPE(4, d_state=8).step(torch.randn(2, 4), torch.zeros(1, 4, 9)), r"\(B, H, n \+ 1\) = \(2, 4, 9\)"),
    (lambda: HOPE(4, d_state=8).step(torch.randn(2, 4), torch.zeros(2, 4, 9, dtype=torch.long)), "float tensor"),
    (lambda: HOPE(4, d_state=8).bfloat16().step(torch.randn(2, 4)), "keep the layer in float32"),
    (lambda: HOPE(4, d_state=8).step(torch.randn(2, 4, 1, 1)), r"u_t \(B, H\)"),
    (lambda: HOPE(4)(torch.randn(2, 4, 0)), "L >= 1"),
    (lambda: HOPE(0), "d_model >= 1"),
    (lambda: HOPE(4, d_state=0), "d_state >= 1"),
    (lambda: HOPE(4, dt_min=math.nan), "finite"),
    (lambda: HOPE(4, dt_max=math.inf), "finite"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def fresh_step(layer, u, x):
    """step() with the cache bypassed: gradients on, so everything is recomputed from the parameters."""
    with torch.enable_grad():
        return [t.detach() for t in layer.step(u, x)]


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_step_cache_follows_parameter_changes(cls):
    """In-place changes (no_grad add_, an optimizer step) and .float() reach a cached step() under no_grad."""
    layer = make(cls, 0.1)
    u, x = torch.randn(2, 3, dtype=f64), random_state(layer, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, foreach=True)

    def optimizer_step():
        layer(u[..., None]).sum().backward()
        opt.step()

    def nudge(p, by):
        with torch.no_grad():
            p.add_(by)

    ssm = [p for name, p in layer.named_parameters() if not name.startswith("output_linear")]
    for change in [lambda p=p: nudge(p, 0.3) for p in ssm] + [optimizer_step]:
        with torch.no_grad():
            before = layer.step(u, x)
        change()
        with torch.no_grad():
            after = layer.step(u, x)
        for a, b in zip(after, fresh_step(layer, u, x)):
            assert torch.equal(a, b)
        assert not all(map(torch.equal, after, before))  # y (and the state, unless C changed) moved
    with torch.no_grad():  # a new dtype: the cache is remade, not reused
        y, x32 = layer.float().step(u.float(), x.to(layer.default_state(1).dtype))
    assert y.dtype == torch.float32 and x32.dtype == layer.default_state(1).dtype


@pytest.mark.parametrize("cls, most", [(HOPE, 12), (S4D, 14)])
def test_cached_step_launches(cls, most):
    layer = cls(4, d_state=8).eval()
    u, x = torch.randn(2, 4), layer.default_state(2)
    with torch.no_grad():
        layer.step(u, x)
        with LaunchCount() as count:
            layer.step(u, x)
    assert sum(count.ops.values()) <= most, count.ops


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_gradients_through_step(cls):
    """A loss over a few step() calls backpropagates to every parameter, twice in a row (also after a no_grad
    step() filled the cache), and the gradients are forward's over the same inputs."""
    layer = make(cls, 0.3)
    u = torch.randn(2, 3, 4, dtype=f64)
    with torch.no_grad():
        layer.step(u[..., 0])
    grads = []
    for _ in range(2):
        layer.zero_grad()
        step_loop(layer, u)[0].square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters()})
    layer.zero_grad()
    layer(u).square().sum().backward()
    for name, p in layer.named_parameters():
        assert grads[0][name].abs().sum() > 0, name
        assert torch.equal(grads[0][name], grads[1][name]), name
        close(grads[0][name], p.grad, 1e-10)


def test_hope_state_route_launches():
    """forward(u, state, return_state=True) at most twice forward(u)'s launches (no gradients)."""
    layer = HOPE(4, d_state=8).eval()
    u, x = torch.randn(2, 4, 16), random_state(layer, 2)
    counts = []
    with torch.no_grad():
        for call in (lambda: layer(u), lambda: layer(u, x, return_state=True)):
            call()
            with LaunchCount() as count:
                call()
            counts.append(sum(count.ops.values()))
    assert counts[1] <= 2 * counts[0], counts


def test_readme_generation_snippet_runs():
    """README section 3's example (a prompt through forward with its state, then step(), then a chunked stream
    checked against one pass) runs as written."""
    readme = open(__file__.replace("test_state.py", "README.md")).read()
    code = readme.split("<!-- generation -->\n```python\n")[1].split("```")[0]
    exec(compile(code, "README.md", "exec"), {})


def test_hope_step_runs_in_the_layers_dtype():
    """A float64 input or state (or a bf16 one under autocast) meets a float32 layer: step() computes in float32."""
    layer = HOPE(4, d_state=6).eval()
    u, x = torch.randn(2, 4, dtype=f64), torch.randn(2, 4, 7, dtype=f64)
    y, x_new = layer.step(u, x)
    assert y.dtype == x_new.dtype == torch.float32
    torch.testing.assert_close(x_new, layer.step(u.float(), x.float())[1], rtol=0, atol=0)
