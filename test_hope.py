"""Every fast path against an independent ground truth (float64 unless a test says otherwise)."""
import copy
import math
import shutil

import pytest
import torch

from hope import (HOPE, _circle, _tail_series, algorithm1, allpass, allpass_sum, hope_kernel, hope_kernel_spectrum,
                  hope_transfer, naive_kernel, naive_kernel_spectrum, naive_tail, naive_transfer)
from s4d import INITS, REAL_PARAMS, S4D, init_A, s4d_kernel

f64 = torch.float64


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def direct_circular(u, k):
    """y[t] = sum_s k[(t - s) mod L] u[s], the O(L^2) definition."""
    L = u.shape[-1]
    idx = (torch.arange(L)[:, None] - torch.arange(L)[None, :]) % L  # (L, L)
    return torch.einsum("...ts,...s->...t", k[..., idx], u)


def direct_causal(u, k):
    """y[t] = sum_{s <= t} k[t - s] u[s], a Toeplitz matrix product."""
    L = u.shape[-1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # (L, L)
    T = torch.where(lag >= 0, k[..., lag.clamp(min=0)], torch.zeros((), dtype=k.dtype))  # (H, L, L)
    return torch.einsum("hts,bhs->bht", T, u)


def realization(h, dt):
    """An explicit n-state realization of one channel's G_dt: A, B, C, D.

    Start from the shift register of G(z) = sum_i h_i z^(-i-1) (A0 = lower shift, B0 = e_1, C0 = h)
    and substitute z^-1 -> b(z) = (z^-1 - a)/(1 - a z^-1): with M = (I + a A0)^-1 this gives
    A = M (A0 + a I), B = M B0, C = h (I - a A), D = -a h M B0 (all eigenvalues of A equal a).
    Independent of hope.py: dense matrices, no FFT, no all-pass polynomial.
    """
    n = h.shape[0]
    a = (1 - dt) / (1 + dt)
    A0 = torch.diag(torch.ones(n - 1, dtype=f64), -1)
    B0 = torch.zeros(n, dtype=f64)
    B0[0] = 1
    M = torch.linalg.inv(torch.eye(n, dtype=f64) + a * A0)
    A = M @ (A0 + a * torch.eye(n, dtype=f64))
    return A, M @ B0, h @ (torch.eye(n, dtype=f64) - a * A), -a * h @ M @ B0


def impulse_response(h, dt, T):
    """k[0..T-1] of each channel by running its n-state recurrence step by step; (H, T)."""
    out = []
    for hc, dtc in zip(h, dt.tolist()):
        A, B, C, D = realization(hc, dtc)
        x, k = B, [D]
        for _ in range(T - 1):
            k.append(C @ x)
            x = A @ x
        out.append(torch.stack(k))
    return torch.stack(out)


@pytest.mark.parametrize("L", [16, 17])
def test_algorithm1_is_circular_convolution(L):
    for _ in range(3):
        u = torch.randn(2, 3, L, dtype=f64)
        h = torch.randn(3, 6, dtype=f64)
        dt = torch.rand(3, dtype=f64) * 2 + 0.05
        delta = torch.zeros(3, L, dtype=f64)
        delta[:, 0] = 1
        k = algorithm1(delta, h, dt)  # = Re(iFFT(g))
        torch.testing.assert_close(algorithm1(u, h, dt), direct_circular(u, k), rtol=0, atol=1e-12)


def kernel_error(k, ref, h):
    """Per-channel ||k - ref|| / ||ref||; where ref is exactly zero (dt = 1, L = 1: k[0] = -a h(...) = 0),
    relative to ||h||, the norm of the whole response (the all-pass basis is orthonormal)."""
    den = ref.norm(dim=1)
    return ((k.double() - ref).norm(dim=1) / torch.where(den > 0, den, h.norm(dim=1))).max().item()


@pytest.mark.parametrize("dt", [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0])
def test_hope_kernel_is_the_exact_impulse_response(dt):
    """Against the n-state realization run step by step, including memory windows n/dt far beyond 2L."""
    for n in (1, 7, 64):
        for L in (1, 2, 3, 100, 1024):
            h = torch.randn(3, n, dtype=f64)
            dts = torch.full((3,), dt, dtype=f64) * torch.tensor([1.0, 1.3, 0.7], dtype=f64)
            ref = impulse_response(h, dts, L)
            assert kernel_error(hope_kernel(h, dts, L), ref, h) <= 1e-10, (n, L)
            assert kernel_error(hope_kernel(h.float(), dts.float(), L), ref, h) <= 1e-4, (n, L)


def transfer_of_realization(h, dt, z):
    """G(z) = D + C (zI - A)^-1 B of each channel's dense realization, at the points z (N,): (H, N)."""
    out = []
    for hc, dtc in zip(h, dt.tolist()):
        A, B, C, D = (m.to(torch.complex128) for m in realization(hc, dtc))
        eye = torch.eye(len(B), dtype=torch.complex128)
        out.append(torch.stack([D + C @ torch.linalg.solve(zk * eye - A, B) for zk in z]))
    return torch.stack(out)


def relative(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


DTS = [1e-4, 1e-2, 0.3, 3.0]
SIZES = [(1, 1), (5, 2), (16, 33), (64, 128)]  # (n, L)


@pytest.mark.parametrize("L", [16, 17])
def test_naive_transfer_is_algorithm1_and_the_realization(L):
    """Steps 2-3 are the all-pass b: Algorithm 1's circular kernel is the inverse FFT of sum_i h_i b^(i+1) at the
    FFT nodes, and that sum is the dense realization's transfer function; hope_transfer is its fast twin."""
    h = torch.randn(3, 6, dtype=f64)
    dt = torch.tensor([1e-3, 0.7, 5.0], dtype=f64)
    delta = torch.zeros(3, L, dtype=f64)
    delta[:, 0] = 1
    G = naive_transfer(h, dt, L)
    torch.testing.assert_close(algorithm1(delta, h, dt), torch.fft.irfft(G, n=L), rtol=0, atol=1e-10)
    z = torch.polar(torch.ones(L // 2 + 1, dtype=f64), torch.arange(L // 2 + 1, dtype=f64) * (2 * math.pi / L))
    torch.testing.assert_close(G, transfer_of_realization(h, dt, z), rtol=0, atol=1e-10)
    assert relative(hope_transfer(h, dt, L), G) < 1e-13


@pytest.mark.parametrize("dt", DTS)
def test_naive_kernel_is_the_realizations_impulse_response(dt):
    """The cascade recurrence (cascade_step, which step() runs too) on a unit impulse is the dense realization's."""
    for n, L in SIZES:
        h = torch.randn(3, n, dtype=f64)
        dts = dt * torch.tensor([1.0, 1.3, 0.7], dtype=f64)
        assert relative(naive_kernel(h, dts, L)[0], impulse_response(h, dts, L)) < 1e-12, (n, L)


@pytest.mark.parametrize("dt", DTS)
def test_naive_tail_is_the_response_beyond_L(dt):
    """R(z) = sum_j q_j b(z)^j is the tail: z^L (G(z) - sum_{t<L} k[t] z^-t), G and k from the dense realization,
    at 11 generic points of the unit circle."""
    z = torch.polar(torch.ones(11, dtype=f64), torch.arange(11, dtype=f64) * (2 * math.pi / 21) + 0.1)
    for n, L in SIZES[:3]:
        h = torch.randn(3, n, dtype=f64)
        dts = dt * torch.tensor([1.0, 1.3, 0.7], dtype=f64)
        a = ((1 - dts) / (1 + dts))[:, None, None]
        b = (1 / z - a[:, 0]) / (1 - a[:, 0] / z)  # (H, 11)
        k = impulse_response(h, dts, L)
        head = (k[:, None, :] * z[:, None] ** -torch.arange(L, dtype=f64)).sum(-1)  # (H, 11)
        tail = z ** L * (transfer_of_realization(h, dts, z) - head)
        assert relative(allpass_sum(naive_tail(h, dts, L), b), tail) < 1e-9, (n, L)


@pytest.mark.parametrize("n", [1, 5, 16, 64])
def test_tail_series_on_the_circle_is_naive_tail(n):
    """The fast tail (Q sampled on a circle, one FFT) against the simulated state's, over dt, L = 1, 2, 3, 200,
    and the corner dt = (1 + rho) / (1 - rho), where -a lies on the circle and a + x vanishes at a sample."""
    rho = 10 ** (-2 / n)
    for dt in DTS + [(1 + rho) / (1 - rho)]:
        for L in (1, 2, 3, 200):
            h = torch.randn(3, n, dtype=f64)
            dts = dt * torch.tensor([1.0, 1.3, 0.7], dtype=f64) if dt in DTS else torch.full((3,), dt, dtype=f64)
            a = ((1 - dts) / (1 + dts))[:, None]
            E = _tail_series(h, _circle(a, L, n), n + 1)[0]  # (H, n + 2): [0, E, 0]
            q, ref = E[:, 1:] + a * E[:, :-1], naive_tail(h, dts, L)
            scale = torch.maximum(ref.abs().max(), h.abs().max())  # the response's, once the tail has died out
            assert ((q - ref).abs().max() / scale).item() < 1e-11, (dt, L)


@pytest.mark.parametrize("dt", DTS)
def test_kernel_spectrum_naive_is_the_padded_kernel_and_fast_is_naive(dt):
    """K_L = G - (-1)^k R at the 2L nodes is the rfft of the zero-padded impulse response (the realization's), and
    hope_kernel_spectrum (blocked powers, sine tables, groups, the circle) is that naive sum of plain powers."""
    for n, L in SIZES:
        h = torch.randn(3, n, dtype=f64)
        dts = dt * torch.tensor([1.0, 1.3, 0.7], dtype=f64)
        naive = naive_kernel_spectrum(h, dts, L)
        truth = torch.fft.rfft(impulse_response(h, dts, L), n=2 * L)
        assert relative(naive, truth) < 1e-10, (n, L)
        assert relative(hope_kernel_spectrum(h, dts, L), naive) < 1e-11, (n, L)
        assert relative(hope_kernel_spectrum(h.float(), dts.float(), L).cdouble(), naive) < 1e-4, (n, L)


def test_hope_kernel_dt1_is_fir():
    h = torch.randn(4, 10, dtype=f64)
    k = hope_kernel(h, torch.ones(4, dtype=f64), 32)
    expected = torch.zeros(4, 32, dtype=f64)
    expected[:, 1:11] = h
    torch.testing.assert_close(k, expected, rtol=0, atol=1e-13)


def test_exact_kernel_is_not_the_folded_one():
    """G at the 2L-point nodes is the response folded with period 2L; the causal kernel is the response itself.

    With n/dt = 400 >> 2L = 64 the two differ by more than 1e-3: the tail correction is what makes it exact.
    """
    h = torch.randn(2, 4, dtype=f64)
    dt = torch.full((2,), 0.01, dtype=f64)
    L, periods = 32, 200
    k = impulse_response(h, dt, 2 * L * periods)
    assert k[:, -2 * L:].abs().max() < 1e-14
    folded = k.reshape(2, periods, 2 * L).sum(1)  # (H, 2L)
    torch.testing.assert_close(torch.fft.irfft(hope_transfer(h, dt, 2 * L), n=2 * L), folded, rtol=0, atol=1e-12)
    assert (folded[:, :L] - k[:, :L]).abs().max() > 1e-3
    torch.testing.assert_close(hope_kernel(h, dt, L), k[:, :L], rtol=0, atol=1e-12)
    spectrum = torch.fft.rfft(torch.cat([k[:, :L], torch.zeros(2, L, dtype=f64)], 1))  # the zero-padded kernel
    torch.testing.assert_close(hope_kernel_spectrum(h, dt, L), spectrum, rtol=0, atol=1e-11)


@pytest.mark.parametrize("L", [20, 21])
def test_hope_kernel_matches_algorithm1(L):
    """algorithm1's circular kernel is the impulse response folded with period L."""
    h = torch.randn(3, 5, dtype=f64)
    dt = torch.tensor([0.2, 1.0, 4.0], dtype=f64)
    delta = torch.zeros(3, L, dtype=f64)
    delta[:, 0] = 1
    long = hope_kernel(h, dt, 40 * L)  # n/dt <= 25: the response beyond 40 L is below 1e-30
    torch.testing.assert_close(algorithm1(delta, h, dt), long.reshape(3, 40, L).sum(1), rtol=0, atol=1e-12)


def test_complex_h_is_inert():
    u = torch.randn(2, 3, 24, dtype=f64)
    h = torch.randn(3, 7, dtype=torch.complex128)
    dt = torch.tensor([0.1, 0.5, 2.0], dtype=f64)
    torch.testing.assert_close(algorithm1(u, h, dt), algorithm1(u, h.real, dt), rtol=0, atol=1e-12)
    assert (algorithm1(u, h, dt) - algorithm1(u, h.imag, dt)).abs().max() > 1e-3


def block(layer, conv, u):
    """The layer's block written out independently: 1x1 conv + GLU of GELU(SSM output + D u)."""
    return layer.output_linear(torch.nn.functional.gelu(conv + layer.D[:, None] * u))


def test_hope_layer_causal_is_toeplitz_and_circular_is_algorithm1():
    layer = HOPE(3, d_state=6, dt_min=1e-3, dt_max=2.0).double().eval()
    u = torch.randn(2, 3, 40, dtype=f64)
    dt = layer.log_dt.exp()
    conv = direct_causal(u, impulse_response(layer.h.detach(), dt.detach(), 40))
    torch.testing.assert_close(layer(u), block(layer, conv, u), rtol=0, atol=1e-12)
    layer.circular = True
    torch.testing.assert_close(layer(u), block(layer, algorithm1(u, layer.h, dt), u), rtol=0, atol=1e-12)


def test_s4d_layer_is_toeplitz():
    layer = S4D(3, d_state=8).double().eval()
    u = torch.randn(2, 3, 40, dtype=f64)
    conv = direct_causal(u, s4d_kernel(*layer._system(), 40))
    torch.testing.assert_close(layer(u), block(layer, conv, u), rtol=0, atol=1e-12)


def direct_two_sided(u, k_fwd, k_bwd):
    """y[t] = sum_{s <= t} k_fwd[t - s] u[s] + sum_{s > t} k_bwd[s - t - 1] u[s], a Toeplitz matrix product."""
    L = u.shape[-1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # (L, L): t - s
    T = torch.where(lag >= 0, k_fwd[..., lag.clamp(min=0)], k_bwd[..., (-lag - 1).clamp(min=0)])  # (H, L, L)
    return torch.einsum("hts,bhs->bht", T, u)


def bidirectional_kernels(layer, L):
    """k_fwd and k_bwd (H, L) from independent ground truth: the recurrence (HOPE), s4d_kernel per C half (S4D)."""
    H = layer.H
    if isinstance(layer, HOPE):
        k = impulse_response(layer.h.detach(), layer.log_dt.exp().detach(), L)
        return k[:H], k[H:]
    dt, A, C = layer._system()
    return s4d_kernel(dt, A, C[:H], L).detach(), s4d_kernel(dt, A, C[H:], L).detach()


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_bidirectional_layer_is_two_sided_toeplitz(cls):
    """Exact two-sided convolution; the map at L is the top-left block of the map at 2L (no wrap-around,
    also with memory windows n/dt far beyond 2L); it depends on future inputs."""
    layer = cls(3, d_state=8, dt_min=1e-3, dt_max=2.0, bidirectional=True).double().eval()
    u = torch.randn(2, 3, 40, dtype=f64)
    conv = direct_two_sided(u, *bidirectional_kernels(layer, 40))
    torch.testing.assert_close(layer(u), block(layer, conv, u), rtol=0, atol=1e-12)
    padded = torch.cat([u, torch.zeros_like(u)], -1)  # (B, H, 2L)
    torch.testing.assert_close(layer(padded)[..., :40], layer(u), rtol=0, atol=1e-12)
    v = u.clone()
    v[..., -1] += 1
    assert (layer(v) - layer(u))[..., 0].abs().min() > 1e-6


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_bidirectional_causal_half_is_the_unidirectional_layer(cls):
    """With the anti-causal systems silenced (h or C zero), the bidirectional layer is the causal one
    whose parameters it shares: same h, dt (HOPE) or A, dt, C (S4D), D and output map."""
    bi = cls(3, d_state=8, dt_min=1e-3, dt_max=0.1, bidirectional=True).double().eval()
    uni = cls(3, d_state=8).double().eval()
    params = dict(bi.named_parameters()) | dict(bi.named_buffers())
    with torch.no_grad():
        for name, p in list(uni.named_parameters()) + list(uni.named_buffers()):
            p.copy_(params[name][:len(p)])  # h, dt (HOPE) and C: the first H rows are the causal ones
        (bi.h if cls is HOPE else bi.C)[3:] = 0
    u = torch.randn(2, 3, 30, dtype=f64)
    torch.testing.assert_close(bi(u), uni(u), rtol=0, atol=1e-12)
    torch.testing.assert_close(bi.kernel(30)[:3], uni.kernel(30), rtol=0, atol=1e-14)


def test_transposed_layout():
    for cls in (HOPE, S4D):
        torch.manual_seed(1)
        a = cls(4, d_state=8).double()
        torch.manual_seed(1)
        b = cls(4, d_state=8, transposed=False).double()
        u = torch.randn(2, 4, 30, dtype=f64)
        torch.testing.assert_close(b(u.transpose(1, 2)).transpose(1, 2), a(u), rtol=0, atol=1e-12)


def run_steps(layer, u):
    state = layer.default_state(u.shape[0])
    ys = []
    for t in range(u.shape[-1]):
        y, state = layer.step(u[..., t], state)
        ys.append(y)
    return torch.stack(ys, -1)


@pytest.mark.parametrize("dt_min, dt_max", [(0.001, 0.1), (1e-4, 1e-2), (0.3, 3.0)])
def test_hope_step_equals_convolution(dt_min, dt_max):
    """(0.001, 0.1) is the layer's default: memory windows n/dt up to 16000 steps, far beyond 2L."""
    layer = HOPE(3, d_state=16, dt_min=dt_min, dt_max=dt_max).double().eval()
    u = torch.randn(2, 3, 50, dtype=f64)
    y = layer(u)
    assert (run_steps(layer, u) - y).norm() / y.norm() <= 1e-10


def test_causal_layer_prefix_property():
    """Causal: the output at length L is the first L outputs at length 2L, whatever dt."""
    layer = HOPE(4, d_state=16, dt_min=1e-3, dt_max=0.1).double().eval()
    u = torch.randn(2, 4, 60, dtype=f64)
    torch.testing.assert_close(layer(u[..., :30]), layer(u)[..., :30], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(u[..., :7]), layer(u)[..., :7], rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("real_param", REAL_PARAMS)
def test_s4d_step_equals_convolution(init, real_param):
    layer = S4D(3, d_state=8, init=init, real_param=real_param).double().eval()
    u = torch.randn(2, 3, 50, dtype=f64)
    torch.testing.assert_close(run_steps(layer, u), layer(u), rtol=0, atol=1e-10)


@pytest.mark.parametrize("init", INITS)
def test_s4d_kernel_equals_recurrence(init):
    A, _ = init_A(3, 16, init)
    C = torch.randn(3, 8, dtype=torch.complex128)
    dt = torch.tensor([0.001, 0.01, 0.1], dtype=f64)
    dA, dB = torch.exp(dt[:, None] * A), (torch.exp(dt[:, None] * A) - 1) / A
    x, ys = torch.zeros_like(A), []
    for t in range(64):
        x = dA * x + dB * (1.0 if t == 0 else 0.0)
        ys.append(2 * (C * x).sum(-1).real)
    torch.testing.assert_close(s4d_kernel(dt, A, C, 64), torch.stack(ys, -1), rtol=0, atol=1e-12)


def test_s4d_legs_init_is_normal_hippo_spectrum():
    N = 16
    q = torch.sqrt(2 * torch.arange(N, dtype=f64) + 1)
    legs = -torch.tril(q[:, None] * q[None, :], -1) - torch.diag(torch.arange(N, dtype=f64) + 1)
    normal = legs + 0.5 * q[:, None] * q[None, :]  # HiPPO-LegS + P P^T, P = q / sqrt(2)
    eig = torch.linalg.eigvals(normal)
    eig = eig[eig.imag > 0]
    A, b_in = init_A(1, N, "legs")
    torch.testing.assert_close(A[0], eig[eig.imag.argsort()], rtol=0, atol=1e-9)
    assert b_in.abs().min() > 1e-3


@pytest.mark.parametrize("N", [16, 64])
def test_s4d_legs_matches_official_initializer(N):
    """state-spaces/s4's hippo.nplr restated: eigh of -i times the normal part (LAPACK reads its lower
    triangle), keep the N/2 eigenvalues with the smallest imaginary part, B = V^* B_LegS, then Im(B)
    clipped to [-2, 2] (B_clip = 2.0). This project keeps the other member of each conjugate pair,
    so its (A, b_in) must be exactly the complex conjugate, mode by mode."""
    q = torch.sqrt(2 * torch.arange(N, dtype=f64) + 1)
    legs = -torch.tril(q[:, None] * q[None, :], -1) - torch.diag(torch.arange(N, dtype=f64) + 1)
    normal = legs + 0.5 * q[:, None] * q[None, :]
    w_im, V = torch.linalg.eigh(normal.to(torch.complex128) * -1j)
    keep = w_im.argsort()[:N // 2]
    w, V = -0.5 + 1j * w_im[keep], V[:, keep]
    B = V.conj().T @ q.to(torch.complex128)
    assert (B.imag.abs() > 2).any()  # the clip changes some modes at both sizes
    B = torch.complex(B.real, B.imag.clamp(-2, 2))
    A, b_in = init_A(1, N, "legs")
    order = (-w.imag).argsort()  # ascending Im(conj(w)), as init_A orders its modes
    torch.testing.assert_close(A[0], w.conj()[order], rtol=0, atol=1e-9)
    torch.testing.assert_close(b_in[0], B.conj()[order], rtol=0, atol=1e-9)


@pytest.mark.parametrize("init", INITS)
def test_s4d_real_params_start_at_init(init):
    A, _ = init_A(3, 8, init)
    kernels = []
    for real_param in REAL_PARAMS:
        torch.manual_seed(2)
        layer = S4D(3, d_state=8, init=init, real_param=real_param)
        torch.testing.assert_close(REAL_PARAMS[real_param][0](layer.w), A.real.float())
        kernels.append(layer.kernel(32))
    for k in kernels[1:]:
        torch.testing.assert_close(k, kernels[0])


def eps_rank(markov, eps=0.01):
    """Hankel epsilon-rank #(sigma_j / sigma_1 > eps) of [m_{i+j}], i, j < n, from 2n - 1 Markov parameters."""
    n = (markov.shape[-1] + 1) // 2
    s = torch.linalg.svdvals(markov[..., torch.arange(n)[:, None] + torch.arange(n)[None, :]])  # (..., n, n)
    return (s / s[..., :1] > eps).sum(-1).double()


def test_hankel_rank_theorems_1_and_3():
    """Random-h HOPE systems have high-rank Hankel matrices; S4D-Lin ones are numerically low-rank.

    S4D is checked at the ends of its dt init range [1e-3, 1e-1]. In between (dt ~ 0.03) its
    64-by-64 Hankel section is nearly full rank too: the kernel has not decayed within 2n steps.
    """
    n, draws = 64, 20
    h = torch.randn(draws, n, dtype=f64)
    hope_rank = eps_rank(torch.cat([h, torch.zeros(draws, n - 1, dtype=f64)], -1))  # h_i = 0 for i >= n
    assert hope_rank.mean() >= 0.7 * n and hope_rank.min() >= 0.6 * n
    A, _ = init_A(draws, n, "lin")
    C = torch.randn(draws, n // 2, dtype=torch.complex128)
    for dt in (1e-3, 1e-1):
        s4d_rank = eps_rank(s4d_kernel(torch.full((draws,), dt, dtype=f64), A, C, 2 * n - 1))
        assert s4d_rank.mean() <= 0.5 * n


@pytest.mark.parametrize("dt", [0.3, 1.0, 2.5])
def test_warp_preserves_hankel_singular_values(dt):
    """The Blaschke warp is a disk automorphism, so G_dt has the Hankel singular values of [h_{i+j}]."""
    n, m = 12, 300  # m-by-m section of the warped system's Hankel matrix; its kernel decays within m
    h = torch.randn(1, n, dtype=f64)
    s_h = torch.linalg.svdvals(torch.cat([h[0], torch.zeros(n - 1, dtype=f64)])[torch.arange(n)[:, None] + torch.arange(n)])
    k = hope_kernel(h, torch.tensor([dt], dtype=f64), 2 * m + 1)[0, 1:]  # Markov parameters skip k[0]
    s_warped = torch.linalg.svdvals(k[torch.arange(m)[:, None] + torch.arange(m)])
    torch.testing.assert_close(s_warped[:n], s_h, rtol=0, atol=1e-12)
    assert s_warped[n] < 1e-12  # and exactly rank n


@pytest.mark.parametrize("n", [1, 5, 9])
@pytest.mark.parametrize("dt", [1e-3, 0.1, 2.0])
def test_hope_kernel_gradcheck(n, dt):
    """The hand-written backward (the polynomial and the tail's adjoint), for h and dt."""
    h = torch.randn(2, n, dtype=f64, requires_grad=True)
    dts = torch.tensor([dt, 1.7 * dt], dtype=f64, requires_grad=True)
    for L in (1, 2, 12):
        assert torch.autograd.gradcheck(lambda h, dt: hope_kernel(h, dt, L), (h, dts))
    assert torch.autograd.gradcheck(lambda h, dt: torch.view_as_real(hope_transfer(h, dt, 10)), (h, dts))


@pytest.mark.parametrize("circular", [False, True])
def test_autocast_leaves_the_spectrum_in_float32(circular):
    """The spectrum's matmuls are real, so bf16 autocast would take them; forward and backward must ignore it."""
    layer = HOPE(8, 16, circular=circular)
    runs = []
    for enabled in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            K = hope_transfer(layer.h, layer.log_dt.exp(), 50) if circular else layer.kernel(50)
            (torch.view_as_real(K) if circular else K).square().sum().backward()
        runs.append((K.detach(), layer.h.grad.clone(), layer.log_dt.grad.clone()))
    for off, on in zip(*runs):
        assert on.dtype == off.dtype and torch.equal(on, off)


def test_hope_step_state_ignores_autocast():
    """step()'s state update is a real matmul: under bf16 autocast the recurrence must stay in float32."""
    layer = HOPE(4, 8).eval()
    u = torch.randn(3, 4, 20)
    states = []
    for enabled in (False, True):
        state = layer.default_state(3)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            for t in range(u.shape[-1]):
                _, state = layer.step(u[..., t], state)
        states.append(state)
    assert states[1].dtype == torch.float32 and torch.equal(states[0], states[1])


def test_hope_kernel_gradcheck_with_dt_frozen():
    """With dt a buffer the backward skips dt's gradient; h's must not change."""
    h = torch.randn(2, 6, dtype=f64, requires_grad=True)
    dt = torch.tensor([1e-3, 0.5], dtype=f64)
    for L in (1, 12):
        assert torch.autograd.gradcheck(lambda h: hope_kernel(h, dt, L), (h,))


@pytest.mark.parametrize("make", [lambda: HOPE(3, 4), lambda: HOPE(3, 4, circular=True),
                                  lambda: HOPE(3, 4, bidirectional=True), lambda: S4D(3, 4)])
@pytest.mark.parametrize("L", [1, 6, 7])
def test_layer_gradcheck(make, L):
    """The convolution's hand-written adjoint (even and odd FFT lengths) and the whole layer, against finite
    differences: the input and every parameter."""
    layer = make().double()
    names, params = zip(*layer.named_parameters())
    u = torch.randn(2, 3, L, dtype=f64, requires_grad=True)
    run = lambda u, *p: torch.func.functional_call(layer, dict(zip(names, p)), (u,))
    assert torch.autograd.gradcheck(run, (u, *params))


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_dt_init_is_log_uniform(cls):
    """log dt ~ U[log dt_min, log dt_max] per channel (both layers): the range, the mean and the standard deviation
    (b - a) / sqrt(12) of a uniform law, and dt_min = dt_max gives exactly that dt."""
    lo, hi = math.log(1e-3), math.log(1e-1)
    log_dt = cls(20000, d_state=2, dt_min=1e-3, dt_max=1e-1).log_dt.double()
    assert lo - 1e-6 <= log_dt.min() and log_dt.max() <= hi + 1e-6
    assert log_dt.mean().item() == pytest.approx((lo + hi) / 2, abs=0.05)
    assert log_dt.std().item() == pytest.approx((hi - lo) / math.sqrt(12), rel=0.02)
    torch.testing.assert_close(cls(4, d_state=2, dt_min=0.1, dt_max=0.1).log_dt.exp(), torch.full((4,), 0.1))


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_feedthrough_init_is_standard_normal(cls):
    D = cls(20000, d_state=2).D.double()
    assert abs(D.mean().item()) < 0.03 and D.std().item() == pytest.approx(1.0, rel=0.02)


def test_s4d_lin_and_inv_inits_are_the_papers_formulas():
    """S4D-Lin A_n = -1/2 + i pi n and S4D-Inv A_n = -1/2 + i (N/pi)(N/(2n+1) - 1), restated from the S4D paper;
    b_in = 1, so C is a standard complex Gaussian (E|C|^2 = 1: real and imaginary parts of variance 1/2)."""
    N = 64
    n = torch.arange(N // 2, dtype=f64)
    for init, imag in (("lin", math.pi * n), ("inv", (N / math.pi) * (N / (2 * n + 1) - 1))):
        layer = S4D(3, d_state=N, init=init)
        torch.testing.assert_close(REAL_PARAMS["exp"][0](layer.w).double(), torch.full((3, N // 2), -0.5, dtype=f64))
        torch.testing.assert_close(layer.A_imag.double(), imag.expand(3, -1), rtol=1e-6, atol=1e-5)
    C = torch.view_as_complex(S4D(4000, d_state=N).C.double())
    assert C.real.std().item() == pytest.approx(math.sqrt(0.5), rel=0.02)
    assert C.imag.std().item() == pytest.approx(math.sqrt(0.5), rel=0.02)
    assert abs(C.real.mean().item()) < 0.01 and abs(C.imag.mean().item()) < 0.01


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_layers_compile_fullgraph(cls):
    """torch.compile(fullgraph=True): no graph break, the same output and gradients as eager (skipped without a
    C++ compiler, which the CPU backend needs)."""
    if not any(map(shutil.which, ("g++", "clang++", "c++"))):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    layer = cls(8, d_state=8, dt_min=1e-3, dt_max=0.1)
    u = torch.randn(2, 8, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y_eager, y = layer(u), compiled(u)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [u] + list(layer.parameters()))
    g = torch.autograd.grad(y.square().sum(), [u] + list(layer.parameters()))
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_h_init_is_the_real_part_of_the_authors_init():
    """The authors draw complex h = randn(cfloat) / sqrt(2n) / 2 (restated here); only Re(h) acts."""
    n = 128
    theirs = (torch.randn(256, n, dtype=torch.cfloat) / math.sqrt(2 * n) / 2).real
    assert HOPE(256, d_state=n).h.std().item() == pytest.approx(theirs.std().item(), rel=0.02)


def test_hope_layer_optimizer_hints():
    layer = HOPE(4, lr_dt=0.0, lr_h=0.001)
    assert "log_dt" in dict(layer.named_buffers())
    assert layer.h._optim == {"lr": 0.001}  # h keeps the optimizer's weight decay
    assert HOPE(4, lr_dt=0.01).log_dt._optim == {"lr": 0.01, "weight_decay": 0.0}
    s4d = S4D(4, lr=0.002)
    assert s4d.w._optim["lr"] == s4d.A_imag._optim["lr"] == 0.002 and not hasattr(s4d.C, "_optim")


h2, dt2 = torch.randn(2, 4), torch.ones(2)


@pytest.mark.parametrize("call, match", [
    (lambda: hope_kernel(h2[0], dt2, 8), "h must be"),
    (lambda: hope_kernel(h2, torch.ones(3), 8), r"dt must be a tensor of shape \(H,\)"),
    (lambda: hope_kernel(h2, torch.tensor([1.0, 0.0]), 8), "dt must be finite and > 0"),
    (lambda: hope_kernel(h2, -dt2, 8), "dt must be finite and > 0"),
    (lambda: hope_kernel(h2, dt2, 0), "L must be"),
    (lambda: hope_kernel(h2.to(torch.complex64), dt2, 8), "h must be a real"),
    (lambda: algorithm1(torch.randn(2, 8), h2, -1.0), "dt must be finite and > 0"),
    (lambda: algorithm1(torch.randn(2, 8), h2, torch.ones(5)), "must broadcast"),
    (lambda: algorithm1(torch.ones(2, 8, dtype=torch.long), h2, 1.0), "u must be"),
    (lambda: HOPE(4)(torch.randn(2, 5, 8)), r"expects a float tensor u \(B, H=4, L >= 1\)"),
    (lambda: HOPE(4)(torch.randn(4, 8)), "expects a float tensor"),
    (lambda: HOPE(4, dt_min=0.0), "dt_min"),
    (lambda: HOPE(4).step(torch.randn(2, 4), torch.zeros(2, 4, 3)), "default_state"),
    (lambda: HOPE(4, circular=True).step(torch.randn(2, 4), HOPE(4).default_state(2)), "is circular"),
    (lambda: HOPE(4, bidirectional=True).step(torch.randn(2, 4), HOPE(4).default_state(2)), "is bidirectional"),
    (lambda: S4D(4, bidirectional=True).step(torch.randn(2, 4), S4D(4).default_state(2)), "bidirectional"),
    (lambda: HOPE(4, circular=True, bidirectional=True), "exclude each other"),
    (lambda: HOPE(4).bfloat16()(torch.randn(2, 4, 8)), "keep the layer in float32"),
    (lambda: S4D(4).bfloat16()(torch.randn(2, 4, 8)), "keep the layer in float32"),
    (lambda: S4D(4)(torch.randn(2, 3, 8)), r"expects a float tensor \(B, H=4, L\)"),
    (lambda: S4D(4, init="foo"), "init must be one of"),
    (lambda: S4D(4, real_param="foo"), "real_param must be one of"),
    (lambda: S4D(4, d_state=7), "even"),
    (lambda: s4d_kernel(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), 8), "complex"),
    (lambda: s4d_kernel(-torch.ones(2), *init_A(2, 6, "lin"), 8), "dt must be finite and > 0"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_paper_size_float32_forward_backward(cls):
    layer = cls(128, d_state=64, dropout=0.1)
    u = torch.randn(2, 128, 2048)
    y = layer(u)
    y.square().mean().backward()
    assert y.shape == u.shape and torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in layer.parameters())


def relative_error(x, ref):
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [HOPE, S4D])
def test_cuda_complex64_and_bf16_autocast_match_float64(cls):
    """On CUDA: the float32/complex64 kernel (also under bf16 autocast, which must leave it in float32)
    and the layer's output and gradients under autocast agree with the float64 layer on CPU."""
    layer = cls(32, d_state=64).eval()  # the layer's default dt range
    u = torch.randn(4, 32, 1000)
    ref = copy.deepcopy(layer).double()
    y_ref = ref(u.double())
    y_ref.square().mean().backward()
    k_ref = ref.kernel(1000).detach()
    gpu = layer.cuda()
    assert relative_error(gpu.kernel(1000).detach(), k_ref) < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        k = gpu.kernel(1000)
        y = gpu(u.cuda())
    assert k.dtype == torch.float32 and relative_error(k.detach(), k_ref) < 1e-4
    assert relative_error(y.detach(), y_ref.detach()) < 2e-2  # bf16 in the 1x1 conv: ~3 digits
    y.float().square().mean().backward()
    for (name, p), p_ref in zip(gpu.named_parameters(), ref.parameters()):
        assert relative_error(p.grad, p_ref.grad) < 5e-2, name
