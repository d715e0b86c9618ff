"""Convolution and recurrence, switchable at any point, for both layers: forward(u, state, return_state) and
step() hand the state to each other. The naive twin is the step() loop (float64 layers in eval mode, dt fixed by
writing log_dt), with a dense check of the formulas where it helps."""
import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s4d import S4D

f64 = torch.float64
DTS = (1e-3, 0.1, 1.0, 10.0)
SPLITS = ([1, 1, 5], [7], [3, 4])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


class LaunchCount(TorchDispatchMode):
    """Counts every aten operation dispatched inside it, views excepted (they launch nothing); as bench.py's."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


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


def s4d(dt, **kw):
    layer = S4D(3, d_state=8, **kw).double().eval()
    with torch.no_grad():
        layer.log_dt.fill_(math.log(dt))
    return layer


def random_state(layer, B):
    return torch.randn_like(layer.default_state(B))


@pytest.mark.parametrize("dt", DTS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("transposed", [True, False])
def test_s4d_chunks_are_the_whole_and_the_step_loop(dt, split, transposed):
    """From a random complex state (any x, not only reachable ones): forward over chunks == forward over the whole
    == the step() loop, and the returned state == the loop's."""
    layer = s4d(dt, transposed=transposed)
    u, x = torch.randn(2, 3, 7, dtype=f64), random_state(layer, 2)
    y_loop, x_loop = step_loop(layer, u, x)
    y_whole, x_whole = chunked(layer, u, [7], x)
    y, x_end = chunked(layer, u, split, x)
    close(y, y_whole)
    close(y, y_loop)
    close(x_end, x_loop)
    close(x_whole, x_loop)


@pytest.mark.parametrize("dt", DTS)
def test_s4d_state_formulas_dense(dt):
    """The final state dA^L x + sum_t dA^(L-1-t) dB u[t] and the output block(conv + free response), the free
    response 2 Re sum_n C_n dA_n^(t+1) x_n, with the powers of dA and the causal convolution written out."""
    layer, L = s4d(dt), 6
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


@pytest.mark.parametrize("dt", DTS)
def test_s4d_step_continues_forward(dt):
    """A prompt through forward, then step(): the same outputs and state as step() all the way."""
    layer = s4d(dt)
    u = torch.randn(2, 3, 9, dtype=f64)
    y_loop, x_loop = step_loop(layer, u)
    y, x = layer(u[..., :5], return_state=True)
    y_rest, x = step_loop(layer, u[..., 5:], x)
    close(torch.cat([y, y_rest], -1), y_loop)
    close(x, x_loop)


def test_s4d_zero_state_is_no_state():
    layer = s4d(0.1)
    u = torch.randn(2, 3, 11, dtype=f64)
    y = layer(u)
    assert torch.equal(layer(u, layer.default_state(2)), y)
    y_s, x = layer(u, return_state=True)
    assert torch.equal(y_s, y)
    close(x, step_loop(layer, u)[1])


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
])
def test_s4d_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def fresh_step(layer, u, x):
    """step() with the cache bypassed: gradients on, so everything is recomputed from the parameters."""
    with torch.enable_grad():
        return [t.detach() for t in layer.step(u, x)]


def test_s4d_step_cache_follows_parameter_changes():
    """In-place changes (no_grad add_, an optimizer step) and .float() reach a cached step() under no_grad."""
    layer = s4d(0.1)
    u, x = torch.randn(2, 3, dtype=f64), random_state(layer, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, foreach=True)

    def optimizer_step():
        layer(u[..., None]).sum().backward()
        opt.step()

    def nudge(p, by):
        with torch.no_grad():
            p.add_(by)

    for change in (lambda: nudge(layer.log_dt, 0.1), lambda: nudge(layer.C, 0.5), lambda: nudge(layer.w, -0.3),
                   lambda: nudge(layer.A_imag, 1.0), optimizer_step):
        with torch.no_grad():
            before = layer.step(u, x)
        change()
        with torch.no_grad():
            after = layer.step(u, x)
        for a, b in zip(after, fresh_step(layer, u, x)):
            assert torch.equal(a, b)
        assert not all(map(torch.equal, after, before))  # y (and the state, unless C changed) moved
    with torch.no_grad():
        assert layer.float().step(u.float(), x.to(torch.complex64))[1].dtype == torch.complex64


def test_s4d_cached_step_launches():
    layer = S4D(4, d_state=8).eval()
    u, x = torch.randn(2, 4), layer.default_state(2)
    with torch.no_grad():
        layer.step(u, x)
        with LaunchCount() as count:
            layer.step(u, x)
    assert sum(count.ops.values()) <= 14, count.ops


def test_s4d_gradients_through_step():
    """A loss over a few step() calls backpropagates to every parameter, twice in a row (also after a no_grad
    step() filled the cache), and the gradients are forward's over the same inputs."""
    layer = s4d(0.3)
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
