"""HOPE: a Hankel-operator parameterization of state-space models, as a tutorial that runs.

Yu, Mahoney, Erichson, "HOPE for a Robust Parameterization of Long-memory State Space Models", ICLR 2025.
This file stands alone (torch and the standard library only): copy it into a project.

An S4-style layer runs one linear time-invariant system per channel. S4D parameterizes it by (A, B, C): its impulse
response decays like exp(Re(A) t) and its Hankel matrix is numerically low-rank. HOPE parameterizes it by its Markov
parameters h_0..h_{n-1}, the entries of its n-by-n Hankel matrix [h_{i+j}] (0 for i + j >= n), and evaluates the
transfer function G(z) = sum_i h_i z^(-i-1) at FFT nodes warped by a bilinear map with sampling period dt. The layer
convolves causally with G's exact impulse response by default (section 3); Algorithm 1's circular form is an option.

Glossary (code name = paper symbol: meaning)
    B, H, L      batch size, channels (d_model; one system per channel), sequence length
    n = d_state  number of Markov parameters: the Hankel matrix is n-by-n
    h  (H, n)    Markov parameters; (2H, n) when bidirectional, rows H.. anti-causal
    dt (H,)      sampling period Delta t > 0 of the warp (the layer stores log dt)
    D  (H,)      feedthrough: y = (k * u) + D u
    a, b         a = (1 - dt) / (1 + dt) and the all-pass filter b(z) = (z^-1 - a) / (1 - a z^-1)   (section 2)
    k  (H, L)    the convolution kernel, G's impulse response;  u, y  the input and output
    q  (H, n+1)  the kernel's tail beyond L as a polynomial in b, R = sum_j q_j b^j                     (section 3)

    x  (B, H, n+1) the recurrent state, x_m = (b^m u)[t - 1]: the input through m all-pass sections      (section 2)
    Phi          the cascade's one-step matrix under zero input, x' = Phi x                                (section 6)

Reading map. Each fast function comes after its naive twin (the math as written, for reading and for the tests,
never on the layer's path); test_hope.py and test_state.py check each pair against an independent ground truth.
    1 Algorithm 1, literally: algorithm1     2 the warp is an all-pass filter: allpass, naive_transfer, cascade_step
    3 the exact causal kernel: naive_kernel, hankel, free_response, naive_tail, naive_kernel_spectrum, _tail_series
    4 the fast spectrum: _Spectrum -> hope_kernel   5 the convolution: _FFTConv   6 state in and out: _advance
    7 the layer: HOPE, forward (a convolution, from and to a state) and step (the recurrence)   8 input checks
"""
__all__ = ["HOPE", "algorithm1", "allpass", "allpass_sum", "naive_transfer", "cascade_step", "naive_kernel", "hankel",
           "free_response", "naive_tail", "naive_kernel_spectrum", "hope_transfer", "hope_kernel_spectrum",
           "hope_kernel", "two_sided"]
import collections
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# 1. Algorithm 1, literally ---------------------------------------------------------------------------------------

def algorithm1(u, h, dt):
    """The paper's Algorithm 1, step by step: u real (..., L), h real or complex (..., n), dt > 0 broadcastable to
    u.shape[:-1] -> real y (..., L), the circular convolution of u with the system's kernel."""
    dt = _check_algorithm1(u, h, dt)
    L, n = u.shape[-1], h.shape[-1]
    # Step 1: the L FFT nodes omega_l = exp(2 pi i l / L) on the unit circle.
    theta = torch.arange(L, dtype=u.dtype, device=u.device) * (2 * math.pi / L)
    omega = torch.polar(torch.ones_like(theta), theta)  # (L,)
    # Step 2: bilinear map to the imaginary axis with sampling period dt (at omega = -1: s ~ 1e16, omega' = -1).
    s = (omega - 1) / (omega + 1) / dt[..., None]  # (..., L)
    # Step 3: bilinear map back to the unit circle with period 1: the warped nodes omega'.
    omega_w = (1 + s) / (1 - s)  # (..., L)
    # Step 4: the transfer function g_l = sum_i h_i omega'_l^(-i-1) at the warped nodes.
    powers = -torch.arange(1, n + 1, device=u.device)  # (n,)
    g = (h[..., None, :] * omega_w[..., :, None] ** powers).sum(-1)  # (..., L)
    # Step 5: y = Re(iFFT(FFT(u) * g)), a circular convolution of length L.
    return torch.fft.ifft(torch.fft.fft(u) * g).real


# 2. The warp is an all-pass filter -------------------------------------------------------------------------------
# Steps 2 and 3 compose to one map: multiply (1 + s) / (1 - s) through by (omega + 1) dt and divide by 1 + dt,
#     omega' = (omega - a) / (1 - a omega),   a = (1 - dt) / (1 + dt),   |a| < 1
# (the textbook bilinear maps' factors 2 / dt and 2 / 1 cancel between the steps). This Blaschke factor maps the unit
# disk onto itself, and omega'^-1 = b(omega) with b(z) = (z^-1 - a) / (1 - a z^-1), the first-order all-pass filter
# (|b| = 1 on the circle). So step 4 is G_dt(z) = sum_i h_i b(z)^(i+1): n cascades of all-pass sections weighted by h
# (a discrete Laguerre-type basis). dt = 1 gives a = 0, b = z^-1 and the FIR kernel [0, h_0, .., h_{n-1}]. A section
# delays slow inputs by its group delay at z = 1, (1 + a) / (1 - a) = 1/dt steps, so the kernel holds them for about
# n/dt steps (n = 64, dt = 0.1: 640). b has real coefficients, so Im(h) only makes Im(y), which step 5 drops: h is
# real here (the authors store complex h).

def allpass(dt, nfft):
    """b(z_l) at the rfft nodes z_l = exp(2 pi i l / nfft), l = 0..nfft//2: dt (H,) -> complex (H, nfft//2 + 1)."""
    a = ((1 - dt) / (1 + dt))[:, None]  # (H, 1)
    z_inv = torch.exp(-2j * math.pi * torch.fft.rfftfreq(nfft, dtype=dt.dtype, device=dt.device))  # (nfft//2 + 1,)
    return (z_inv - a) / (1 - a * z_inv)


def allpass_sum(coef, b):
    """sum_m coef_m b^m with plain complex powers: coef real (H, m), b (H, N) -> (H, N), via an (H, N, m) table."""
    return (coef[:, None, :] * b[..., None] ** torch.arange(coef.shape[1], device=b.device)).sum(-1)


def naive_transfer(h, dt, nfft):
    """G_dt(z_l) = sum_m [0, h]_m b^m at the rfft nodes of length nfft: (H, nfft//2 + 1). With nfft = L it
    is Algorithm 1's g (the upper half of its nodes are the conjugates, as h is real)."""
    return allpass_sum(F.pad(h, (1, 0)), allpass(dt, nfft))


# A cascade is also a recurrence. Read z^-1 as a one-step delay and b^m u as u passed through m sections: the state
# x_m = (b^m u)[t - 1], m = 0..n, holds the last input (m = 0) and each section's last output. b's definition,
# (1 - a z^-1) b^m u = (z^-1 - a) b^(m-1) u, says at time t (primes: the new state)
#     x'_m = a x_m + x_(m-1) - a x'_(m-1),   x'_0 = u[t],   and the output is y[t] = sum_i h_i x'_(i+1).
# Each section needs the new output of the one before: n dependent updates. For all m at once they read
# (I + a S) x' = v, with S the down-shift and v = [u[t], x_(m-1) + a x_m]; the inverse of I + a S is the
# lower-triangular Toeplitz matrix T[i, j] = (-a)^(i-j), so a step is one batched matrix product x' = T v.

def _toeplitz(a, size):
    """T[i, j] = (-a)^(i-j) for i >= j, else 0: (H, size, size) from a (H, 1), the inverse of I + a S (section 2)."""
    p = torch.pow(-a, torch.arange(size, device=a.device))  # (H, size)
    return F.pad(p, (size - 1, 0)).unfold(-1, size, 1).flip(-1)  # windows of [0 (size - 1 times), p], reversed


def cascade_step(u_t, x, a):
    """One step of the all-pass cascade: u_t (..., H), state x (..., H, n + 1), a (H, 1) -> the new state x'."""
    v = torch.cat([u_t[..., None], torch.addcmul(x[..., :-1], a, x[..., 1:])], -1)  # (..., H, n + 1)
    T = _toeplitz(a, x.shape[-1])  # (H, n + 1, n + 1)
    with torch.autocast(a.device.type, enabled=False):  # under autocast the state would drift to bf16
        return torch.einsum("hij,...hj->...hi", T, v)  # (..., H, n + 1)


# 3. The exact causal kernel --------------------------------------------------------------------------------------
# Algorithm 1's circular convolution lets the last inputs leak into the first outputs. A causal layer convolves with
# k[0..L-1], the first L samples of G's impulse response, which the recurrence defines naively and beyond doubt:

def naive_kernel(h, dt, L):
    """k[0..L-1] (H, L), the cascade run on a unit impulse for L steps, and the state it ends in (H, n + 1)."""
    a = ((1 - dt) / (1 + dt))[:, None]  # (H, 1)
    x, k = h.new_zeros(h.shape[0], h.shape[1] + 1), []
    for t in range(L):
        x = cascade_step(h.new_full(h.shape[:1], float(t == 0)), x, a)  # (H, n + 1)
        k.append((x[:, 1:] * h).sum(1))
    return torch.stack(k, 1), x


# The FFT route needs the spectrum at the 2L-th roots of unity z_l = exp(i pi l / L) (l: the node; k: the kernel), but
# G there is the spectrum of the response *folded* with period 2L, sum_m k[t + 2L m], and the memory n/dt often reaches
# far beyond 2L (n = 64, dt = 1e-3: 64,000 steps). So split the response at L: G(z) = K_L(z) + z^-L R(z), with
# K_L = sum_{t<L} k[t] z^-t (wanted) and the tail R = sum_t k[L + t] z^-t. At the nodes z_l^-L = (-1)^l:
# K_L(z_l) = G(z_l) - (-1)^l R(z_l).
# The tail is the response to zero input from the state x that naive_kernel ends in. Let R_m be the z-transform of
# section m's output from any state x under zero input (R_0 = 0). The recurrence, whose terms at t = -1 are the
# state, transforms to (1 - a z^-1) R_m - a x_m = (z^-1 - a) R_(m-1) + x_(m-1), so with cascade_step's v_m = x_(m-1) +
# a x_m (the part of section m's next input that the state holds),
#     R_m = b R_(m-1) + v_m / (1 - a z^-1),   and   1 / (1 - a z^-1) = (1 + a b) / (1 - a^2).
# Unrolled, R_(i+1) = (1 + a b) sum_{j<=i} p_(i-j) b^j with p_i = v_(i+1) / (1 - a^2); weighted by h,
#     R = sum_i h_i R_(i+1) = (1 + a b) sum_j E_j b^j,   E_j = sum_{i>=j} h_i p_(i-j) = sum_i h_(j+i) p_i,
# so E = Hank(h) p: the paper's Hankel matrix maps the state to the future output. R is a polynomial in b again,
# R = sum_{j=0..n} q_j b^j with q_j = E_j + a E_(j-1) (E_(-1) = E_n = 0). So K_L at the nodes is the same all-pass
# sum as G, with coefficients [0, h] - (-1)^l q.

def hankel(h):
    """The n-by-n Hankel matrices [h_(i+j)] (0 for i + j >= n) of h (H, n): (H, n, n), a view of the padded h."""
    return F.pad(h, (0, h.shape[1] - 1)).unfold(-1, h.shape[1], 1)


def free_response(h, a, x):
    """q (..., H, n + 1): the output from state x (..., H, n + 1) under zero input is sum_j q_j b^j; a (H, 1)."""
    p = torch.addcmul(x[..., :-1], a, x[..., 1:]) / (1 - a * a)  # (..., H, n): p_i = v_(i+1) / (1 - a^2)
    E = torch.einsum("hjk,...hk->...hj", hankel(h), p)  # (..., H, n)
    return F.pad(E, (0, 1)) + a * F.pad(E, (1, 0))  # q_j = E_j + a E_(j-1), j = 0..n


def naive_tail(h, dt, L):
    """q (H, n + 1): the tail R = sum_t k[L + t] z^-t = sum_j q_j b^j, from the state after L simulated steps."""
    return free_response(h, ((1 - dt) / (1 + dt))[:, None], naive_kernel(h, dt, L)[1])


def naive_kernel_spectrum(h, dt, L):
    """K_L(z_l) = G(z_l) - (-1)^l R(z_l), l = 0..L: the rfft of [k[0..L-1], 0 (L times)], (H, L + 1)."""
    sign = 1 - 2 * (torch.arange(L + 1, device=h.device) % 2)  # (-1)^l
    return naive_transfer(h, dt, 2 * L) - sign * allpass_sum(naive_tail(h, dt, L), allpass(dt, 2 * L))


# The tail without simulating L steps. In the impulse's state after L steps, x_m is the coefficient of z^-(L-1) in
# b(z)^m, so X(zeta) = sum_m x_m zeta^m is that coefficient in 1 / (1 - zeta b(z)) = (1 - a z^-1) / ((1 + a zeta)
# (1 - w z^-1)), w = (a + zeta) / (1 + a zeta): a geometric series in w z^-1, so
#     X = (w^(L-1) - a w^(L-2)) / (1 + a zeta) = (1 - a^2) zeta w^(L-2) / (1 + a zeta)^2
# for L >= 2 (x_0 = 0: the impulse has passed) and X = 1 / (1 + a zeta) for L = 1 (x_0 = 1: it is the last input).
# The shift identity sum_i (x_i + a x_(i+1)) zeta^i = ((a + zeta) X - a x_0) / zeta then gives, in both cases,
#     sum_i v_(i+1) zeta^i = (1 - a^2) Q(zeta),   Q(zeta) = (a + zeta)^(L-1) / (1 + a zeta)^L,
# so p holds Q's power-series coefficients Q_i. E_j = sum_{i>=j} h_i Q_(i-j) is the coefficient of
# zeta^-j in hhat(zeta) Q(zeta), hhat(zeta) = sum_i h_i zeta^-i: a Laurent series on the ring 0 < |zeta| < 1/|a|, whose
# coefficients are Cauchy integrals over any circle |zeta| = rho inside it. The trapezoid rule on M equispaced points
# computes them all with one FFT, exactly up to aliasing: each coefficient gains those M apart, times rho^M. Q's
# coefficients are only bounded, not small (|Q_i| = |x_i + a x_(i+1)| / (1 - a^2) <= 1 / (1 - |a|), as each x_i is a
# sample of an all-pass section's impulse response, whose energy is 1), so the circle lies inside the unit disk
# (rho < 1) and aliases add at most rho^M / (1 - |a|) relative to sum_i |h_i|.

Circle = collections.namedtuple("Circle", "L Q zeta az wN scale")


def _circle(a, L, n):
    """Q(zeta) at the points zeta = rho exp(2 pi i j / M), j = 0..M/2 (the rest are conjugates), a (H, 1) float64: a
    Circle with Q (H, M/2 + 1) and what dQ/da needs: zeta, 1 + a zeta, w^(L-2) and scale = rho^i (i < n). M = 8n,
    rho = 10^(-2/n): aliases rho^M = 1e-16 (times 1 / (1 - |a|)); the factors rho^-i that move a series onto the
    circle or its coefficients back magnify round-off by at most rho^-n = 100, hence float64."""
    M, rho = 8 * n, 10 ** (-2 / n)
    j = torch.arange(M // 2 + 1, dtype=torch.float64, device=a.device)
    zeta = torch.polar(torch.full_like(j, rho), j * (2 * math.pi / M))  # (M/2 + 1,)
    az = a * zeta + 1  # (H, M/2 + 1)
    w = (a + zeta) / az
    wN = torch.polar(w.abs() ** max(L - 2, 0), w.angle() * max(L - 2, 0))  # w^(L-2) (w may be 0); no complex pow: slow
    Q = (wN * w if L > 1 else 1) / az  # w^(L-1) / (1 + a zeta)
    return Circle(L, Q, zeta, az, wN, rho ** j[:n])


def _series_mul(f, circle):
    """The first n coefficients of F(zeta) Q(zeta), F = sum_i f_i zeta^i, from f_i rho^i (..., n) float64. At the point
    j, F = sum_i f_i rho^i e^(2 pi i ij / M) = conj(rfft(f_i rho^i)_j); coefficient m of the product is
    rho^-m (1/M) sum_j F Q e^(-2 pi i jm / M), the conjugate of irfft(conj(F Q))_m, which is real: hence
    irfft(rfft(f_i rho^i) conj(Q)) / rho^m."""
    M = 2 * (circle.Q.shape[-1] - 1)
    return torch.fft.irfft(torch.fft.rfft(f, n=M) * circle.Q.conj(), n=M)[..., :len(circle.scale)] / circle.scale


def _tail_series(h, circle, length):
    """The fast twin of naive_tail's E: [0, E, 0 ..] (H, length + 1), and hhat for the adjoint. hhat at the points is
    rfft(h_i / rho^i), and irfft's + sign makes its entry j the coefficient of zeta^-j."""
    n = h.shape[1]
    hhat = torch.fft.rfft(h.double() / circle.scale, n=8 * n)  # hhat at the points: sum_i h_i zeta^-i
    E = torch.fft.irfft(hhat * circle.Q, n=8 * n)[:, :n] * circle.scale  # (H, n)
    return F.pad(E.to(h.dtype), (1, length - n)), hhat  # [0, E, 0 ..]


def _tail_series_adjoint(dE, hhat, circle, with_da):
    """dh (H, n) and da (H,) (None unless with_da) of sum_j dE_j E_j. h -> E is a correlation with Q's coefficients, so
    its adjoint is the product of series dh(zeta) = dE(zeta) Q(zeta); da pairs dE with the E that dQ/da gives:
        dQ/da = w^(L-2) (L (1 - zeta^2) - (1 + a zeta)) / (1 + a zeta)^3  (L >= 2),  -zeta / (1 + a zeta)^2  (L = 1)."""
    L, _, zeta, az, wN, scale = circle
    dE_s = dE[:, :len(scale)].double() * scale  # (H, n)
    dh = _series_mul(dE_s, circle)  # (H, n)
    if not with_da:
        return dh.to(dE.dtype), None
    dQ = wN * (L * (1 - zeta * zeta) - az) / (az * az * az) if L > 1 else -zeta / (az * az)
    da = (torch.fft.irfft(hhat * dQ, n=hhat.shape[1] * 2 - 2)[:, :len(scale)] * dE_s).sum(1)  # (H,)
    return dh.to(dE.dtype), da.to(dE.dtype)


# 4. The fast spectrum --------------------------------------------------------------------------------------------

def _warp(log_dt, nfft, groups):
    """psi = arg omega' (H, N, G) at the rfft nodes theta = 2 pi l / nfft, and a (H, 1, 1): tanh(-log dt / 2) is
    (1 - dt) / (1 + dt) without forming dt.

    omega' = omega conj(e) / e with e = 1 - a omega (as |omega| = 1: omega - a = omega conj(e)), and
    arg(conj(e) / e) = -2 arg e with arg e = -atan2(a sin theta, 1 - a cos theta), so b = 1 / omega' = exp(-i psi) with
    psi = theta + 2 atan2(a sin theta, 1 - a cos theta): no singularity, and float64 keeps a small dt's digits.
    Node l sits at [l // G, l % G]: the exact kernel's even and odd nodes (G = 2) get their own columns."""
    N = nfft // (2 * groups) + 1
    theta = torch.arange(groups * N, dtype=log_dt.dtype, device=log_dt.device).view(N, groups) * (2 * math.pi / nfft)
    a = torch.tanh(log_dt * -0.5)[:, None, None]  # (H, 1, 1)
    return torch.add(theta, torch.atan2(a * torch.sin(theta), 1 - a * torch.cos(theta)), alpha=2), a


def _angle_pairs(psi, dtype):
    """(H, N, G) angles -> (H G, 1, N, 2), each angle twice, group by group: the layout _exp_i fills in place."""
    H, N, G = psi.shape
    pairs = psi.transpose(1, 2)[..., None].expand(H, G, N, 2)  # (H, G, N, 2)
    return pairs.to(dtype, copy=True, memory_format=torch.contiguous_format).view(H * G, 1, N, 2)


def _exp_i(base, step, count, offset):
    """exp(i s psi), s = 0, step, .., (count - 1) step: complex (R, count, N) from base (R, 1, N, 2) (_angle_pairs)
    and offset (N, 2) = [pi/2, 0]. cos x = sin(x + pi/2): one in-place sine writes cos and sin side by side."""
    s = torch.arange(0, step * count, step, dtype=base.dtype, device=base.device)[:, None, None]  # (count, 1, 1)
    return torch.view_as_complex(torch.addcmul(offset, base, s).sin_())  # (R, count, N, 2) -> (R, count, N)


# Blocked powers: split m = c j + r (c ~ sqrt(n) powers per block, J blocks), so b^m = b^r beta^j with beta = b^c and
# P = sum_m coef_m b^m = sum_r b^r U_r, U_r = sum_j coef_(cj+r) beta^j: one batched matmul, one product and one sum over
# c + J tables of angles instead of n powers. Node groups: the exact kernel's coefficients differ on even and odd nodes
# ([0, h] - q and [0, h] + q, section 3), so with G = 2 groups node l is evaluated in group l % G with that group's
# coefficients; the plain transfer function has G = 1. A GPU in eager PyTorch pays one kernel launch per operation:
# these are a few dozen, whatever n and L.

def _nodes(log_dt, nfft, groups, c, dtype):
    """The angle tables shared by every all-pass sum at the rfft nodes of length nfft: (base, base_c, offset, c) for
    _exp_i, and a (H, 1, 1) float64. Takes log dt. _Spectrum needs no autograd graph through them (its backward is
    written out); the state route (section 6) lets autograd differentiate them."""
    psi, a64 = _warp(log_dt.double(), nfft, groups)  # (H, N, G), (H, 1, 1): float64
    # beta^j = exp(-i c j psi) depends on psi only modulo 2 pi / c: reduce it in float64 first, or psi's float32
    # rounding grows c j times
    base, base_c = _angle_pairs(psi, dtype), _angle_pairs(psi.remainder(2 * math.pi / c), dtype)
    offset = F.pad(base.new_full((psi.shape[1], 1), math.pi / 2), (0, 1))  # (N, 2): [pi / 2, 0]
    return (base, base_c, offset, c), a64


def _kernel_coef(h, a, circle, cJ):
    """The exact kernel's coefficients [0, h] -/+ q on even/odd nodes (H, 2, cJ), a (H, 1) in h's dtype; and E_(j-1)
    and hhat, for the adjoint."""
    E, hhat = _tail_series(h, circle, cJ)  # (H, cJ + 1): [0, E, 0 ..]
    q = torch.addcmul(E[:, 1:], a, E[:, :-1])  # (H, cJ): q_j = E_j + a E_(j-1)
    sign = torch.arange(-1, 2, 2, dtype=h.dtype, device=h.device)[:, None]  # (2, 1): even, odd
    return torch.addcmul(F.pad(h, (1, cJ - h.shape[1] - 1))[:, None], sign, q[:, None]), E[:, :-1], hhat


class _Spectrum(torch.autograd.Function):
    """P_l = sum_m coef_m b_l^m at the rfft nodes of length nfft: the fast twin of naive_transfer (coef = [0, h],
    G = 1, nfft = L) and of naive_kernel_spectrum (coef = [0, h] -/+ q on even/odd nodes, G = 2, nfft = 2L).

    Backward, with PyTorch's convention for complex outputs (grad = dLoss/dRe P + i dLoss/dIm P for a real loss; see
    "Autograd for Complex Numbers" in PyTorch's autograd notes): a real coef_m's gradient is Re sum_l grad_l
    conj(b_l^m), the same sum transposed; dt's follows from those alone, and the tail adds its adjoint. No autograd
    graph inside.
    """

    @staticmethod
    def forward(ctx, h, log_dt, nfft, causal):
        with torch.autocast(h.device.type, enabled=False):  # autocast would run the real matmuls in bf16
            H, n = h.shape
            nodes, a64 = _nodes(log_dt, nfft, 1 + causal, math.isqrt(n + 1) + 1, h.dtype)  # c ~ sqrt(n)
            J = math.ceil((n + 2) / nodes[3])  # blocks for b^0 .. b^(n+1): one more than P needs, for dt's gradient
            a, cJ = a64[:, 0].to(h.dtype), nodes[3] * J  # (H, 1)
            ctx.tail, ctx.n, ctx.nodes = (), n, nodes
            if causal:  # even nodes [0, h] - q, odd nodes [0, h] + q
                circle = _circle(a64[:, 0], nfft // 2, n)
                coef, ctx.E, hhat = _kernel_coef(h, a, circle, cJ)  # (H, 2, cJ)
                ctx.tail = (hhat, circle)
            else:
                coef = F.pad(h, (1, cJ - n - 1))[:, None]  # (H, 1, cJ): [0, h, 0 ..]
            (base, base_c, offset, c), G, N = nodes, coef.shape[1], nodes[0].shape[2]
            # U first: the beta table is freed before b^r (kept for the backward) is made, so c + J tables at the peak
            beta_j = torch.view_as_real(_exp_i(base_c, -c, J, offset)).view(H * G, J, 2 * N)  # (HG, J, 2N)
            U = coef.view(H * G, J, c).mT @ beta_j  # (HG, c, J) @ (HG, J, 2N) -> (HG, c, 2N): Re, Im interleaved
            del beta_j
            b_r = _exp_i(base, -1, c, offset)  # (HG, c, N)
            ctx.save_for_backward(coef, a, b_r)
            P = torch.view_as_complex(U.view(H * G, c, N, 2)).mul_(b_r).sum(1)  # (HG, N)
            # node l back in the order of l, cut to the nfft//2 + 1 rfft nodes
            return P.view(H, G, N).transpose(1, 2).reshape(H, G * N)[:, :nfft // 2 + 1]  # (H, nfft//2 + 1)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # as in forward
            (coef, a, b_r), (_, base_c, offset, c) = ctx.saved_tensors, ctx.nodes
            (H, G, cJ), N = coef.shape, b_r.shape[2]
            grad = F.pad(grad, (0, G * N - grad.shape[1])).view(H, N, G).transpose(1, 2)  # (H, G, N): the groups
            # dcoef_(cj+r) = Re sum_l grad_l conj(beta^j b^r)_l: Gb = grad conj(beta^j) (remade, not kept: the
            # forward's peak stays c + J tables), then one real matmul pairs Re with Re and Im with Im.
            Gb = _exp_i(base_c, c, cJ // c, offset).view(H, G, -1, N).mul_(grad[:, :, None])  # (H, G, J, N)
            Gb, b_r = torch.view_as_real(Gb).view(H * G, -1, 2 * N), torch.view_as_real(b_r).view(H * G, c, 2 * N)
            dcoef = (Gb @ b_r.mT).view(H, G, cJ)  # (HG, J, 2N) @ (HG, 2N, c) -> (H, G, cJ)
            dh = dcoef.sum(1)[:, 1:ctx.n + 1]  # [0, h, 0 ..] in every group
            if ctx.tail:
                dq = dcoef[:, 1] - dcoef[:, 0]  # coef = [0, h] -/+ q
                dE = torch.addcmul(dq[:, :-1], a, dq[:, 1:])  # q_j = E_j + a E_(j-1)
                dh_tail, da_tail = _tail_series_adjoint(dE, *ctx.tail, ctx.needs_input_grad[1])
                dh = dh + dh_tail
            if not ctx.needs_input_grad[1]:  # dt frozen (a buffer): no dt gradient to compute
                return dh, None, None, None
            # db/da = (b^2 - 1) / (1 - a^2), so d(b^m)/da = m (b^(m+1) - b^(m-1)) / (1 - a^2), and da/dlog_dt =
            # -(1 - a^2) / 2 cancels the division: dLoss/dlog_dt = sum_m (-m / 2) coef_m (dcoef_(m+1) - dcoef_(m-1)).
            minus_half_m = torch.arange(-0.5, (1 - cJ) / 2, -0.5, dtype=coef.dtype, device=coef.device)  # m = 1..cJ-2
            dlog_dt = ((dcoef[..., 2:] - dcoef[..., :-2]) * coef[..., 1:-1] * minus_half_m).sum((1, 2))
            if ctx.tail:  # a also enters the tail: dLoss/da = sum_j dE_j dE_j/da (E through Q: the adjoint's da)
                # + sum_j dq_j E_(j-1) (q = E + a E_(j-1)), and da/dlog_dt = -(1 - a^2) / 2
                da = da_tail + (dq * ctx.E).sum(1)
                dlog_dt = torch.addcmul(dlog_dt, da, a[:, 0] * a[:, 0] - 1, value=0.5)  # da/dlog_dt
            return dh, dlog_dt, None, None


def hope_transfer(h, dt, nfft):
    """The fast twin of naive_transfer: G_dt at the rfft nodes of length nfft, (H, nfft//2 + 1). No input checks."""
    return _Spectrum.apply(h, dt.log(), nfft, False)


def hope_kernel_spectrum(h, dt, L):
    """The fast twin of naive_kernel_spectrum: the rfft (length 2L) of the zero-padded exact kernel, (H, L + 1)."""
    return _Spectrum.apply(h, dt.log(), 2 * L, True)


def hope_kernel(h, dt, L):
    """The fast twin of naive_kernel: real h (H, n), dt > 0 (H,) -> k[0..L-1] (H, L), exact for every dt > 0."""
    _check_kernel_args(h, dt, L)
    return torch.fft.irfft(hope_kernel_spectrum(h, dt.to(h.dtype), L), n=2 * L)[:, :L]


# 5. The convolution ----------------------------------------------------------------------------------------------
# The layer multiplies rfft(u) by a spectrum directly, never forming k: with nfft = 2L the kernel's zero second half
# makes irfft(rfft(u) K)[:L] the causal convolution; with nfft = L it is Algorithm 1's step 5.

class _FFTConv(torch.autograd.Function):
    """y = irfft(rfft(u) K)[..., :L], FFTs of length nfft: u (B, H, L), K (H, nfft//2 + 1). The adjoint written out
    (autograd's would be a full complex FFT): du = irfft(rfft(dy) conj(K)), dK = sum_B rfft(dy) conj(U) / nfft."""

    @staticmethod
    def forward(ctx, u, K, nfft):
        ctx.nfft, U = nfft, torch.fft.rfft(u, n=nfft)  # (B, H, nfft//2 + 1)
        ctx.save_for_backward(U, K)
        return torch.fft.irfft(U * K, n=nfft)[..., :u.shape[-1]]

    @staticmethod
    def backward(ctx, dy):
        (U, K), nfft = ctx.saved_tensors, ctx.nfft
        dY = torch.fft.rfft(dy, n=nfft, norm="forward")  # (B, H, nfft//2 + 1): rfft(dy) / nfft
        du = torch.fft.irfft(dY * K.conj(), n=nfft, norm="forward")[..., :dy.shape[-1]]
        dK = (dY * U.conj()).sum(0)  # (H, nfft//2 + 1)
        dK[:, 1:(nfft + 1) // 2].mul_(2)  # the bins that stand for two
        return du, dK, None


def two_sided(K, L):
    """The rfft (length 2L) of y[t] = sum_{s<=t} k_fwd[t - s] u[s] + sum_{s>t} k_bwd[s - t - 1] u[s], from the causal
    spectra K (2H, L + 1) of k_fwd (rows :H) and k_bwd (rows H:) -> (H, L + 1). k_bwd[j] acts at lag t - s = -(j + 1),
    so its spectrum is sum_j k_bwd[j] z^(j+1) = z conj(K_bwd(z)) (k_bwd real, |z| = 1): lag 2L - j - 1 mod 2L."""
    H, l = len(K) // 2, torch.arange(L + 1, dtype=K.real.dtype, device=K.device)
    return K[:H] + torch.polar(torch.ones_like(l), l * (math.pi / L)) * K[H:].conj()  # z_l = exp(2 pi i l / 2L)


# 6. State in and out: convolution and recurrence, switchable ---------------------------------------------------
# To generate, a layer runs a prompt as one convolution, then step(); a long stream runs as chunks, each continuing
# from the last one's state. By linearity a chunk is what its input does from the zero state plus what its starting
# state x does under zero input. Let Phi be the cascade's one-step matrix under zero input (x' = Phi x: T v, v_0 = 0)
# and d_m = b^m delta the impulse response of m sections (d_m[t] is entry m of the impulse's state after t + 1 steps:
# d_m[L-1] is section 3's x_m).
# Section 3 gives three facts, each exact and without a loop over t:
# (1) L zero-input steps take x to Phi^L x. Entry m is section m's output at t = L - 1, the coefficient of z^-(L-1) in
#     R_m = (1 + a b) sum_{j<m} p_(m-1-j) b^j (section 3, unrolled). In (1 + a b) b^j that coefficient is d_j[L-1] +
#     a d_(j+1)[L-1] = (1 - a^2) Q_j (the shift identity; Q is the impulse's series of section 3, whatever x is), and
#     the 1 - a^2 cancels the one in p:
#         (Phi^L x)_m = sum_{j<m} Q_(m-1-j) v_(j+1),
#     the first n coefficients of the product of series V(zeta) Q(zeta), V = sum_j v_(j+1) zeta^j: one product on the
#     circle (_series_mul). L = 1 gives Q_i = (-a)^i, cascade_step's T.
# (2) The output from x is free_response's sum_j q_j(x) b^j. Its part beyond L is the output from Phi^L x, so, cut to L
#     samples as the kernel was, its spectrum at the 2L nodes is sum_j (q_j(x) - (-1)^l q_j(Phi^L x)) b_l^j.
# (3) From the zero state the input leaves x_m = sum_t u[t] d_m[L-1-t], an inner product of the reversed input
#     (zero-padded to 2L) with d_m. By Parseval over the 2L nodes, f_m = Re sum_l rfft(flip u)_l conj(b_l^m) / 2L
#     (the inner rfft bins stand for l and 2L - l) is that inner product with d_m folded at period 2L:
#     sum_i sum_t u[t] d_m[L-1-t + 2Li], i >= 0 only, as d_m is causal. Term i is the state after the input and
#     then 2Li zero steps, (Phi^(2Li) x)_m, so f = sum_i Phi^(2Li) x = (I - Phi^2L)^-1 x (Phi is lower-triangular
#     with diagonal 0, a, .., a: its eigenvalues lie inside the unit circle and the series converges): x = f - Phi^2L f.

def _advance(x, a, circle):
    """Phi^L x (..., H, n + 1), float64: the state after L zero-input steps from x; a (H, 1); circle for this L."""
    v = torch.addcmul(x[..., :-1].double(), a, x[..., 1:])  # (..., H, n): v_(i+1) = x_i + a x_(i+1)
    return F.pad(_series_mul(v * circle.scale, circle), (1, 0))  # (..., H, n + 1): (Phi^L x)_0 = 0


# 7. The layer ----------------------------------------------------------------------------------------------------

def _register(module, name, tensor, lr, hint):
    """lr == 0: a frozen buffer; else a parameter with the optimizer hint (state-spaces/s4 style), if any."""
    if lr == 0.0:
        return module.register_buffer(name, tensor)
    module.register_parameter(name, nn.Parameter(tensor))
    if hint:
        getattr(module, name)._optim = hint


class HOPE(nn.Module):
    """HOPE layer: SSM convolution + D u -> GELU -> dropout -> 1x1 conv with GLU (the S4D block).

    Input and output (B, H, L), or (B, L, H) with transposed=False. d_state: n. dt: log-uniform in [dt_min, dt_max]
    per channel (equal: fixed). lr_dt: learning-rate hint for dt (0 freezes it as a buffer; no weight decay); lr_h:
    hint for h (None: the optimizer's default, as in the paper); h keeps the optimizer's weight decay.
    circular: Algorithm 1's circular convolution instead of the exact causal one. bidirectional: add an anti-causal
    kernel with its own h and dt (see two_sided); not with circular. Neither has a recurrent state.
    """

    def __init__(self, d_model, d_state=64, dt_min=0.001, dt_max=0.1, dropout=0.0, lr_dt=0.001,
                 lr_h=None, circular=False, bidirectional=False, transposed=True):
        super().__init__()
        if d_model < 1 or d_state < 1:
            raise ValueError(f"need d_model >= 1 channels and d_state >= 1 Markov parameters, got {d_model}, {d_state}")
        if not (math.isfinite(dt_max) and 0 < dt_min <= dt_max):
            raise ValueError(f"need finite 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if circular and bidirectional:
            raise ValueError("circular and bidirectional exclude each other (the bidirectional layer is an exact "
                             "two-sided convolution without wrap-around): choose one")
        H, n, systems = d_model, d_state, 2 * d_model if bidirectional else d_model
        self.H, self.n, self.circular, self.bidirectional, self.transposed = H, n, circular, bidirectional, transposed
        log_dt = torch.rand(systems) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        _register(self, "log_dt", log_dt, lr_dt, {"lr": lr_dt, "weight_decay": 0.0})
        # The authors' init (the paper only says "random"): their complex h has std 1 / (2 sqrt(2n)), so its
        # real part, the only part that acts, has std 1 / (4 sqrt(n)).
        _register(self, "h", torch.randn(systems, n) / (4 * math.sqrt(n)), lr_h, None if lr_h is None else {"lr": lr_h})
        self.D = nn.Parameter(torch.randn(H))
        self.activation = nn.GELU()
        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Sequential(nn.Conv1d(H, 2 * H, kernel_size=1), nn.GLU(dim=-2))
        self._step_cache = None

    def kernel(self, L):
        """Causal kernels (H, L) of the current parameters; bidirectional: (2H, L), rows H.. are k_bwd."""
        return hope_kernel(self.h, self.log_dt.exp(), L)

    def forward(self, u, state=None, return_state=False):
        """u (B, H, L) -> y (B, H, L) (both (B, L, H) with transposed=False). state (B, H, n + 1): continue from it
        (default_state(B), or what step() or a previous forward returned; None: the zero state). return_state: return
        (y, the state step() would hold after the last sample). A NaN or inf anywhere in u reaches every output: the
        FFTs mix all positions."""
        if not self.transposed:
            u = u.transpose(-1, -2)  # (B, L, H) -> (B, H, L)
        self._check(u, state, state is not None or return_state)
        u = u.to(torch.promote_types(u.dtype, torch.float32))  # torch.fft takes no bf16 (autocast may pass one)
        L = u.shape[-1]
        nfft = L if self.circular else 2 * L  # causal: zero-padded to 2L, so nothing wraps around
        if state is not None or return_state:
            with torch.autocast(u.device.type, enabled=False):  # autocast would run the matmuls in bf16
                y, state = self._state_io(u, state)  # (B, H, L), (B, H, n + 1)
        else:
            K = _Spectrum.apply(self.h, self.log_dt, nfft, not self.circular)  # (H or 2H, nfft//2 + 1)
            K = two_sided(K, L) if self.bidirectional else K  # (H, nfft//2 + 1)
            y = _FFTConv.apply(u, K, nfft)  # (B, H, L)
        y = self._block(y + self.D[:, None] * u)  # (B, H, L)
        y = y if self.transposed else y.transpose(-1, -2)
        return (y, state) if return_state else y

    def _state_io(self, u, x):
        """Section 6: the SSM's output (B, H, L) from the state x (None: zero) and the input u, and the state after u.
        The kernel's and the free responses' all-pass sums and the transposed ones share one split m = c j + r with
        few blocks J: a matmul over r with the table b^r, then a product with beta^j (or its conjugate) over j."""
        (B, H, L), n, h = u.shape, self.n, self.h
        # b^0 .. b^n in J = 2 blocks of c: the products with beta^j are per batch row here, so few blocks keep them
        # small (_Spectrum has one row and balances its c + J tables with c ~ sqrt(n))
        J, c = 2, -(-(n + 1) // 2)
        (base, base_c, offset, _), a = _nodes(self.log_dt, 2 * L, 2, c, h.dtype)  # even and odd groups, as the kernel
        a, N = a[:, 0], base.shape[2]  # (H, 1) float64; N = L // 2 + 1 nodes per group, 2N >= L + 1
        b_r = torch.view_as_real(_exp_i(base, -1, c, offset)).view(2 * H, c, 2 * N)  # (2H, c, 2N)
        beta = _exp_i(base_c, -c, J, offset)  # (2H, J, N): beta^j = b^(cj)
        circle = _circle(a, L, n)
        Ur = torch.fft.rfft(u.flip(-1), n=2 * L, norm="forward")  # (B, H, L + 1): rfft(flip u) / 2L
        Ur[..., 1:L].mul_(2)  # the bins that stand for two
        Ur = F.pad(Ur, (0, 2 * N - L - 1)).view(B, H, N, 2).permute(1, 3, 0, 2).reshape(2 * H, B, 1, N)  # (2H, B, 1, N)
        # f_(cj+r) = Re sum_l Ur_l conj(beta^j b^r)_l: Ub = Ur conj(beta^j), then a real matmul over interleaved
        # (Re, Im) pairs gives Re(Ub) Re(b^r) + Im(Ub) Im(b^r) = Re(Ub conj(b^r)); the sum over the groups ends the sum
        Ub = torch.view_as_real(Ur * beta.conj_physical()[:, None]).reshape(2 * H, B * J, 2 * N)  # (2H, B J, 2N)
        f = (Ub @ b_r.mT).view(H, 2, B, J * c).sum(1).transpose(0, 1)[..., :n + 1]  # (B, H, n + 1)
        adv = _advance(torch.stack([f] if x is None else [f, x]), a, circle)  # (1 or 2, B, H, n + 1): Phi^L f, Phi^L x
        x_end = f.double() - _advance(adv[0], a, circle) + adv[1:].sum(0)  # f - Phi^2L f (+ Phi^L x)
        coef = _kernel_coef(h, a.to(h.dtype), circle, n + 1)[0][:, :, None]  # (H, 2, 1, n + 1)
        if x is not None:
            q = free_response(h.double(), a, torch.stack([x, adv[1]]))  # (2, B, H, n + 1): q(x), q(Phi^L x)
            sign = torch.tensor([[-1.0], [1.0]], dtype=torch.float64, device=u.device)  # (2, 1): even, odd nodes
            free = torch.addcmul(q[0, :, :, None], sign, q[1, :, :, None]).permute(1, 2, 0, 3)  # (H, 2, B, n + 1)
            coef = torch.cat([coef, free.to(h.dtype)], 2)  # (H, 2, 1 + B, n + 1)
        coef = F.pad(coef, (0, J * c - n - 1)).view(2 * H, -1, c)  # (2H, (1 (+ B)) J, c)
        P = torch.view_as_complex((coef @ b_r).view(2 * H, -1, J, N, 2)).mul_(beta[:, None]).sum(2)  # (2H, 1 (+ B), N)
        P = P.view(H, 2, -1, N).permute(2, 0, 3, 1).reshape(-1, H, 2 * N)[..., :L + 1]  # (1 (+ B), H, L + 1): in order
        Y = torch.fft.rfft(u, n=2 * L) * P[0]  # (B, H, L + 1): the kernel's convolution
        y = torch.fft.irfft(Y if x is None else Y + P[1:], n=2 * L)[..., :L]  # (B, H, L): plus the free response
        return y, x_end.to(u.dtype)

    def _block(self, y):
        return self.output_linear(self.dropout(self.activation(y)))  # (B, H, L)

    def default_state(self, batch):
        """Zero state (B, H, n + 1) of the recurrence (section 2): x_m = (b^m u)[t - 1], m = 0..n."""
        return self.h.new_zeros(batch, self.H, self.n + 1)

    def step(self, u_t, state=None):
        """forward() one sample at a time (in eval mode; dropout draws differ): u_t (B, H), state (B, H, n + 1) or None
        (zero) -> y_t (B, H), the new state. The cascade of section 2 as one product: W = [T; [0, h] T + D e_0] maps
        v = [u_t, x_(m-1) + a x_m] to the new state and y_t's SSM part, sum_i h_i x'_(i+1) + D u_t."""
        self._check(u_t[..., None], state, True)
        x = self.default_state(u_t.shape[0]) if state is None else state
        u_t, x = u_t.to(self.h.dtype), x.to(self.h.dtype)  # the recurrence runs in the layer's dtype
        W, a = self._step_matrix()  # (H, n + 2, n + 1), (H, 1)
        v = torch.cat([u_t[..., None], torch.addcmul(x[..., :-1], a, x[..., 1:])], -1)  # (B, H, n + 1)
        with torch.autocast(u_t.device.type, enabled=False):  # under autocast the state would drift to bf16
            out = torch.einsum("hij,bhj->bhi", W, v)  # (B, H, n + 2)
        return self._block(out[..., -1:])[..., 0], out[..., :-1]

    def _step_matrix(self):
        """step()'s W and a. They depend on the parameters only, so they are kept until h, dt or D change (their
        storage or version: in-place optimizer updates count). Only while no gradient can reach them (as S4D's): a kept
        tensor's graph would be freed by the first backward and could not serve a second loss."""
        params = (self.h, self.log_dt, self.D)
        key = [(p.data_ptr(), p._version, p.dtype) for p in params]
        cacheable = not torch.is_grad_enabled() or not any(p.requires_grad for p in params)
        if cacheable and self._step_cache is not None and self._step_cache[0] == key:
            return self._step_cache[1]
        a = torch.tanh(-self.log_dt / 2)[:, None]  # (H, 1): (1 - dt) / (1 + dt)
        T = _toeplitz(a, self.n + 1)  # (H, n + 1, n + 1)
        y_row = F.pad(self.h, (1, 0))[:, None] @ T + F.pad(self.D[:, None, None], (0, self.n))  # (H, 1, n + 1)
        W = torch.cat([T, y_row], 1)  # (H, n + 2, n + 1)
        self._step_cache = (key, (W, a)) if cacheable else None
        return W, a

    def _check(self, u, x, with_state):
        if u.ndim != 3 or u.shape[1] != self.H or not torch.is_floating_point(u) or u.shape[-1] < 1:
            raise ValueError(f"HOPE expects a float tensor u (B, H={self.H}, L >= 1) (or (B, L, H) with "
                             f"transposed=False; step: u_t (B, H)), got {u.dtype} {tuple(u.shape)}")
        if self.h.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HOPE's parameters are {self.h.dtype}; keep the layer in float32 (or float64) and "
                             "use torch.autocast for mixed precision: the FFTs and the kernel need float32")
        if with_state and (self.circular or self.bidirectional):
            raise ValueError(f"this layer is {'circular' if self.circular else 'bidirectional'}: its output at t "
                             "depends on inputs after t, so it has no recurrent state (no step(), state or "
                             "return_state). Use forward(u) on the whole sequence")
        if x is not None and (x.shape != (u.shape[0], self.H, self.n + 1) or not torch.is_floating_point(x)):
            raise ValueError(f"state must be a float tensor (B, H, n + 1) = ({u.shape[0]}, {self.H}, {self.n + 1}) "
                             f"as default_state(B) makes it, got {x.dtype} {tuple(x.shape)}")


# 8. Input checks -------------------------------------------------------------------------------------------------

def _check_positive(dt):
    if not torch.isfinite(dt).all() or (dt <= 0).any():
        raise ValueError(f"dt must be finite and > 0 (a sampling period), got min {dt.min().item():.3g}")


def _check_algorithm1(u, h, dt):
    """algorithm1's arguments; returns dt as a tensor like u."""
    if not torch.is_floating_point(u) or u.ndim < 1 or u.shape[-1] < 1:
        raise ValueError(f"u must be a real floating tensor (..., L) with L >= 1, got {u.dtype} {tuple(u.shape)}")
    if not (torch.is_floating_point(h) or torch.is_complex(h)) or h.ndim < 1 or h.shape[-1] < 1:
        raise ValueError(f"h must be a real or complex tensor (..., n) with n >= 1, got {h.dtype} {tuple(h.shape)}")
    dt = torch.as_tensor(dt, dtype=u.dtype, device=u.device)
    _check_positive(dt)
    if dt.ndim >= u.ndim or any(d not in (1, s) for d, s in zip(dt.shape[::-1], u.shape[-2::-1])):
        raise ValueError(f"dt {tuple(dt.shape)} must broadcast to u's leading dims {tuple(u.shape[:-1])}")
    return dt


def _check_kernel_args(h, dt, L):
    if not torch.is_floating_point(h) or h.ndim != 2 or h.shape[1] < 1:
        raise ValueError(f"h must be a real floating tensor (H, n) with n >= 1, got {h.dtype} {tuple(h.shape)}; "
                         "pass h.real for complex Markov parameters (Im(h) has no effect)")
    if not isinstance(dt, torch.Tensor) or dt.shape != (h.shape[0],):
        raise ValueError(f"dt must be a tensor of shape (H,) = ({h.shape[0]},), one per channel of h, got "
                         f"{tuple(dt.shape) if isinstance(dt, torch.Tensor) else type(dt).__name__}")
    _check_positive(dt)
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be an int >= 1, got {L!r}")
