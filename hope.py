"""HOPE: a Hankel-operator parameterization of state-space models.

Yu, Mahoney, Erichson, "HOPE for a Robust Parameterization of Long-memory State Space Models",
ICLR 2025. This file stands alone (torch and the standard library only): copy it into a project.

What HOPE is
    An S4-style layer runs one linear time-invariant (LTI) system per channel. S4D parameterizes
    each system by (A, B, C) and its impulse response decays like exp(Re(A) t): memory is short
    and its Hankel matrix is numerically low-rank. HOPE parameterizes the system by its Markov
    parameters h_0..h_{n-1} instead, i.e. by the entries of its n-by-n Hankel matrix
    [h_{i+j}]_{i,j}, and evaluates the transfer function G(z) = sum_i h_i z^(-i-1) at FFT nodes
    warped by a bilinear map with sampling period dt. Random h gives a high-rank Hankel matrix.

Glossary (code name = paper symbol: meaning)
    B            batch size
    H            channels (d_model); one independent system per channel
    L            sequence length
    n = d_state  number of Markov parameters; the Hankel matrix is n-by-n
    h  (H, n)    Markov parameters h_0..h_{n-1}; (2H, n) when bidirectional, rows H.. anti-causal
    dt (H,)      sampling period Delta t > 0 of the bilinear warp; (2H,) when bidirectional
    D  (H,)      feedthrough: y = (k * u) + D u
    a  (H,)      (1 - dt) / (1 + dt), the pole of the all-pass section below; |a| < 1
    omega        FFT nodes exp(2 pi i k / L);  omega' = the warped nodes;  g = G(omega')
    k  (H, L)    time-domain convolution kernel (impulse response);  u, y  input and output

The Blaschke-factor view (derivations checked in test_hope.py)
    The warp omega -> s = (omega - 1) / ((omega + 1) dt) -> omega' = (1 + s) / (1 - s) is the disk
    automorphism omega' = (omega - a) / (1 - a omega). So omega'^-1 = b(z) with
    b(z) = (z^-1 - a) / (1 - a z^-1), a first-order all-pass filter, and
        G_dt(z) = sum_i h_i b(z)^(i+1)
    is a weighted sum of n all-pass cascades (a discrete Laguerre-type basis; each term has unit
    energy). dt = 1 gives a = 0, b = z^-1 and the kernel [0, h_0, ..., h_{n-1}, 0, ...]. An
    all-pass stage delays low frequencies by about 1/dt steps, so the kernel holds slowly varying
    input for about n/dt steps without decay (n = 64, dt = 0.1: ~640 steps); S4D decays
    exponentially. The cascade is also an n-state recurrence: see HOPE.step. And since the warp
    is a disk automorphism, G_dt has exactly the Hankel singular values of [h_{i+j}] for every
    dt: a random h gives a high-rank Hankel operator whatever the sampling period.

Why h is real here
    b has real coefficients, so for real input Re(output) depends on Re(h) only: the imaginary
    part that the authors' code stores is inert (test_complex_h_is_inert proves it).

The exact causal kernel
    The causal layer needs k[0..L-1], the first L samples of the impulse response of G_dt. The
    2L-point FFT of G gives the response folded with period 2L instead: whatever lies beyond 2L
    lands on top of it, and with memory windows n/dt of thousands of steps (dt = 1e-3, n = 64:
    64000) that is not small. So split the response at L,
        G(z) = K_L(z) + z^-L R(z),   K_L = sum_{t<L} k[t] z^-t,   R = sum_t k[L+t] z^-t (the tail),
    and use z^-L = (-1)^k at the 2L-th roots of unity z_k:  K_L(z_k) = G(z_k) - (-1)^k R(z_k).
    The tail is the free response from the state reached after L steps, so it is again a
    polynomial in b, R = sum_{j=0}^{n} q_j b^j, whose n + 1 coefficients come from one power series:
        Q(x) = (a + x)^(L-1) / (1 + a x)^L  (first n terms),  E_j = sum_{i>=j} h_i Q_{i-j},  q_j = E_j + a E_{j-1}.
    (In the cascade's realization A, B and C are lower-triangular Toeplitz in the state index, so
    they multiply like power series in x: A^(L-1) B is Q, and C (I - A/z)^-1 turns into (1 + a b).)
    So K_L(z_k) = sum_m c_m b_k^m with c = [0, h] - (-1)^k q: the evaluation that gives G, with
    the sign of q alternating between even and odd nodes. Q comes from samples on a circle inside
    the disk (_tail_series): one FFT pair, no loop over L, no (L, n) or (n, n) tensor.

Few, large operations (a GPU launches one kernel per operation in eager PyTorch): the spectrum is one
autograd Function whose forward and backward are each a few dozen operations, whatever n and L, and the
convolution's backward is written out too (_FFTConv).

Exact, all of it (vs the step-by-step recurrence, dt 1e-4..10, n <= 64, L <= 1024, five seeds: relative error at
most 2.7e-13 in float64 and 2.4e-5 in float32, 8e-6 at n = 128, L = 2048: results/precision.txt; TF32 matmuls,
off by default, would give ~3e-4, measured on an H100 with an earlier version). Autocast leaves the kernel and the
FFTs in float32.
    algorithm1             the paper's circular convolution of length L, written literally.
    circular=True in HOPE  exactly algorithm1, computed with rfft (faster, same numbers).
    hope_kernel            exactly the first L samples of the impulse response, every dt > 0.
    causal mode (default)  Toeplitz convolution with hope_kernel's spectrum, hope_kernel_spectrum.
    bidirectional=True     two-sided Toeplitz convolution with two such kernels (two_sided).
    step                   the causal mode one step at a time.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def algorithm1(u, h, dt):
    """The paper's Algorithm 1, written literally: the readable reference, not the fast path.

    u: real (..., L); h: real or complex (..., n); dt > 0, broadcastable to u.shape[:-1].
    Returns real y (..., L): the circular convolution of u with the system's kernel.
    """
    if not torch.is_floating_point(u) or u.ndim < 1 or u.shape[-1] < 1:
        raise ValueError(f"u must be a real floating tensor (..., L) with L >= 1, got {u.dtype} {tuple(u.shape)}")
    if not (torch.is_floating_point(h) or torch.is_complex(h)) or h.ndim < 1 or h.shape[-1] < 1:
        raise ValueError(f"h must be a real or complex tensor (..., n) with n >= 1, got {h.dtype} {tuple(h.shape)}")
    dt = torch.as_tensor(dt, dtype=u.dtype, device=u.device)
    _check_positive(dt)
    try:
        torch.broadcast_shapes(dt.shape, u.shape[:-1])
    except RuntimeError:
        raise ValueError(f"dt {tuple(dt.shape)} must broadcast to u's leading dims {tuple(u.shape[:-1])}") from None
    L, n = u.shape[-1], h.shape[-1]
    # Step 1: the L FFT nodes omega_k = exp(2 pi i k / L) on the unit circle.
    theta = torch.arange(L, dtype=u.dtype, device=u.device) * (2 * math.pi / L)
    omega = torch.polar(torch.ones_like(theta), theta)  # (L,)
    # Step 2: bilinear map to the imaginary axis with sampling period dt. At omega = -1 this
    # divides by ~1e-16 (exp(i pi) is not exactly -1 in floating point); step 3 then lands on
    # the exact limit omega' = -1, which test_hope_kernel_matches_algorithm1 confirms.
    s = (omega - 1) / (omega + 1) / dt[..., None]  # (..., L)
    # Step 3: bilinear map back to the unit circle with period 1: the warped nodes omega'.
    omega_w = (1 + s) / (1 - s)  # (..., L)
    # Step 4: the transfer function g_k = sum_i h_i omega'_k^(-i-1) at the warped nodes.
    powers = -torch.arange(1, n + 1, device=u.device)  # (n,)
    g = (h[..., None, :] * omega_w[..., :, None] ** powers).sum(-1)  # (..., L)
    # Step 5: y = Re(iFFT(FFT(u) * g)), a circular convolution of length L.
    return torch.fft.ifft(torch.fft.fft(u) * g).real


def _check_positive(dt):
    if not torch.isfinite(dt).all() or (dt <= 0).any():
        raise ValueError(f"dt must be finite and > 0 (a sampling period), got min {dt.min().item():.3g}")


def _warp(log_dt, nfft, groups):
    """psi = arg omega' at the rfft nodes omega = exp(i theta), theta = 2 pi k / nfft, and a = (1 - dt) / (1 + dt):
    log_dt (H,) -> (H, N, G), (H, 1, 1). Nodes k = 0 .. G N - 1 (>= nfft / 2), node k in column k mod G: G = 2
    splits even and odd k, which the exact kernel treats differently.

    The warped node of step 3 is omega' = exp(i psi) with psi = theta + 2 atan2(a sin theta, 1 - a cos theta): no
    singularity, unlike steps 2-3 of algorithm1. In float64: 1 - a cos theta keeps the digits of a small dt near
    theta = 0 (float32 would lose them all), and psi is exact to round-off before it multiplies powers up to n.
    """
    N = nfft // (2 * groups) + 1
    theta = torch.arange(groups * N, dtype=log_dt.dtype, device=log_dt.device).view(N, groups) * (2 * math.pi / nfft)
    a = torch.tanh(log_dt * -0.5)[:, None, None]  # (H, 1, 1)
    return torch.add(theta, torch.atan2(a * torch.sin(theta), 1 - a * torch.cos(theta)), alpha=2), a


def _tail_series(h, a, L, length):
    """[0, E, 0 ..] (H, length + 1), E_j = sum_{i>=j} h_i Q_{i-j}, Q = the power series of w^(L-1) / (1 + a x),
    w = (a + x) / (1 + a x).

    E_j is the coefficient of x^-j in hhat(x) Q(x), hhat(x) = sum_i h_i x^-i, and Q is analytic on |x| < 1/|a|.
    So sample both at M = 8n points of the circle |x| = rho < 1 and read the coefficients off one inverse FFT
    (real input: rfft and irfft, half the points): no loop over L. Terms M apart alias, with relative size
    rho^M = 1e-16; rounding grows by rho^-n = 100: all of it in float64 (w^(L-1) needs it), ending near 1e-14.
    a: float64 (H, 1). Returns E (h's dtype) and what the adjoint (_tail_series_adjoint) needs.
    """
    n = h.shape[1]
    M, rho = 8 * n, 10 ** (-2 / n)
    k = torch.arange(M // 2 + 1, dtype=torch.float64, device=h.device)
    scale = rho ** k[:n]  # rho^i
    x = torch.polar(torch.full_like(k, rho), k * (2 * math.pi / M))  # rho exp(2 pi i k / M)
    ax = a * x + 1  # (H, M/2 + 1)
    w = (a + x) / ax
    wN = torch.polar(w.abs() ** max(L - 2, 0), w.angle() * max(L - 2, 0))  # w^(L-2) (w may be 0); no complex pow: slow
    Q = (wN * w if L > 1 else 1) / ax
    hhat = torch.fft.rfft(h.double() / scale, n=M)  # hhat(x_l) = sum_i h_i rho^-i exp(-2 pi i i l / M)
    E = torch.fft.irfft(hhat * Q, n=M)[:, :n] * scale  # (H, n)
    return F.pad(E.to(h.dtype), (1, length - n)), (L, x, ax, wN, Q, hhat, scale)  # [0, E, 0 ..]


def _tail_series_adjoint(dE, L, x, ax, wN, Q, hhat, scale, with_da):
    """dh (H, n) and da (H,) (None unless with_da) of sum_j dE_j E_j: h -> E correlates with Q, so dh correlates
    dE with conj(Q); da pairs dE with E computed from dQ/da, pointwise on the circle:
        dQ/da = w^(L-2) (L (1 - x^2) - (1 + a x)) / (1 + a x)^3    (L >= 2),    -x / (1 + a x)^2   (L = 1)."""
    n, M = scale.shape[0], 2 * (x.shape[0] - 1)
    u = dE[:, :n].double() * scale  # (H, n)
    dh = torch.fft.irfft(torch.fft.rfft(u, n=M) * Q.conj(), n=M)[:, :n] / scale  # (H, n)
    if not with_da:
        return dh.to(dE.dtype), None
    dQ = wN * (L * (1 - x * x) - ax) / (ax * ax * ax) if L > 1 else -x / (ax * ax)
    da = (torch.fft.irfft(hhat * dQ, n=M)[:, :n] * u).sum(1)  # (H,)
    return dh.to(dE.dtype), da.to(dE.dtype)


def _exp_i(base, step, count, offset):
    """exp(i s psi) for s = 0, step, .., (count - 1) step: complex (R, count, N), from base (R, 1, N, 2) holding each
    angle psi twice and offset (N, 2) = [pi / 2, 0]: one sine over the interleaved angles gives cos (sin(x + pi/2))
    and sin side by side, written in place into the table itself (contiguous and vectorized; no separate angles)."""
    s = torch.arange(0, step * count, step, dtype=base.dtype, device=base.device)[:, None, None]  # (count, 1, 1)
    return torch.view_as_complex(torch.addcmul(offset, base, s).sin_())  # (R, count, N, 2) -> (R, count, N)


class _Spectrum(torch.autograd.Function):
    """The HOPE spectra as sums of all-pass powers: P[h, g, k] = sum_m coef[h, g, m] b_k^m at the warped nodes.

    circular (nfft = L): G(z_k) = sum_m g_m b_k^m with g = [0, h], at the L//2 + 1 rfft nodes of length L.
    causal (nfft = 2L): K_L(z_k) = sum_m (g_m - (-1)^k q_m) b_k^m, the exact kernel's spectrum at the 2L nodes
        (module docstring), even and odd nodes as two groups with their own coefficients.
    Split m = c j + r (c ~ sqrt(n) powers per block, J blocks): b^m = b^r beta^j with beta = b^c, so
    P = sum_r b^r U_r with U_r = sum_j coef_{cj+r} beta^j: one batched matmul, one product, one sum, and
    O(H N sqrt(n)) memory, not the O(H N n) of the literal form. For a real loss and PyTorch's convention
    dLoss/dx = Re(conj(grad) dP/dx), the backward is the transposed evaluation dcoef_m = Re sum_k conj(grad_k) b_k^m
    (one real matmul of grad conj(beta^j) with the saved b^r); da follows from dcoef alone (db/da is a polynomial in
    b, see backward), then the tail's adjoint. No autograd graph inside. Takes log dt, the layer's parameter.
    """

    @staticmethod
    def forward(ctx, h, log_dt, nfft, causal):
        with torch.autocast(h.device.type, enabled=False):  # autocast would run the real matmuls in bf16
            H, n = h.shape
            G, c = 1 + causal, math.isqrt(n + 1) + 1  # c ~ sqrt(n) powers per block
            J = -(-(n + 2) // c)  # J blocks, c J >= n + 2: b^0 .. b^(n+1), one more than P has (see backward)
            psi, a64 = _warp(log_dt.double(), nfft, G)  # (H, N, G), (H, 1, 1): float64
            N, a = psi.shape[1], a64.to(h.dtype)
            # b^r = exp(-i r psi), beta^j = exp(-i c j (psi mod 2 pi / c)): float32 angles below 2 pi max(c, J), not
            # n pi. Each angle twice, groups apart; the free complex view makes torch.compile store them, not
            # recompute the warp.
            interleaved = lambda p: torch.view_as_real(torch.view_as_complex(p.transpose(1, 2)[..., None].expand(
                H, G, N, 2).to(h.dtype, copy=True, memory_format=torch.contiguous_format))).view(H * G, 1, N, 2)
            base, base_c = interleaved(psi), interleaved(psi.remainder(2 * math.pi / c))
            offset = F.pad(h.new_full((N, 1), math.pi / 2), (0, 1))  # (N, 2): [pi / 2, 0]
            coef = F.pad(h, (1, c * J - n - 1))[:, None]  # (H, 1, cJ): g = [0, h, 0 ..]
            ctx.tail = ()
            if causal:
                E, ctx.tail = _tail_series(h, a64[:, 0], nfft // 2, c * J)  # (H, cJ + 1): [0, E, 0 ..]
                ctx.E = E[:, :-1]  # E_(j-1)
                q = torch.addcmul(E[:, 1:], a[:, 0], ctx.E)  # (H, cJ): q_j = E_j + a E_(j-1)
                sign = torch.arange(-1, 2, 2, dtype=h.dtype, device=h.device)[:, None]  # (2, 1): even, odd nodes
                coef = torch.addcmul(coef, sign, q[:, None])  # (H, 2, cJ): g -/+ q
            # U_r = sum_j coef_{cj+r} beta^j first, then P = sum_r b^r U_r: the powers of beta are gone before those
            # of b come, and only the latter are kept for the backward (c + J tables at the peak, never c + 2J).
            beta_j = torch.view_as_real(_exp_i(base_c, -c, J, offset)).view(H * G, J, 2 * N)  # (HG, J, 2N)
            U = coef.view(H * G, J, c).mT @ beta_j  # (HG, c, J) @ (HG, J, 2N) -> (HG, c, 2N): Re, Im interleaved
            del beta_j
            b_r = _exp_i(base, -1, c, offset)  # (HG, c, N)
            ctx.save_for_backward(coef, a, b_r, base_c, offset)
            ctx.n = n
            P = torch.view_as_complex(U.view(H * G, c, N, 2)).mul_(b_r).sum(1)  # (HG, N)
            return P.view(H, G, N).transpose(1, 2).reshape(H, G * N)[:, :nfft // 2 + 1]  # (H, nfft//2 + 1): in order

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # autocast would run the real matmuls in bf16
            coef, a, b_r, base_c, offset = ctx.saved_tensors
            (H, G, cJ), (c, N) = coef.shape, b_r.shape[1:]
            grad = F.pad(grad, (0, G * N - grad.shape[1])).view(H, N, G).transpose(1, 2)  # (H, G, N): groups
            # dcoef_(cj+r) = Re sum_k grad_k conj(beta^j b^r)_k: T = grad conj(beta^j) (recomputed rather than kept:
            # the forward's peak stays c + J tables), then one real matmul pairs Re with Re and Im with Im.
            T = _exp_i(base_c, c, cJ // c, offset).view(H, G, -1, N).mul_(grad[:, :, None])  # (H, G, J, N)
            dcoef = torch.view_as_real(T).view(H * G, -1, 2 * N) @ torch.view_as_real(b_r).view(H * G, c, 2 * N).mT
            dcoef = dcoef.view(H, G, cJ)  # (HG, J, 2N) @ (HG, 2N, c) -> (H, G, cJ)
            dh = dcoef.sum(1)[:, 1:ctx.n + 1]  # g = [0, h, 0 ..]
            if ctx.tail:
                dq = dcoef[:, 1] - dcoef[:, 0]  # coef = g -/+ q
                dh_tail, da_tail = _tail_series_adjoint(torch.addcmul(dq[:, :-1], a[:, 0], dq[:, 1:]), *ctx.tail,
                                                        ctx.needs_input_grad[1])
                dh = dh + dh_tail
            if not ctx.needs_input_grad[1]:  # dt frozen (a buffer): no dt gradient to compute
                return dh, None, None, None
            # db/da = (b^2 - 1) / (1 - a^2) makes dP/da = sum_m m coef_m (b^(m+1) - b^(m-1)) / (1 - a^2), and
            # da/dlog_dt = -(1 - a^2) / 2 cancels the division: dLoss/dlog_dt pairs m coef_m with dcoef's
            # differences.
            m_half = torch.arange(-0.5, (1 - cJ) / 2, -0.5, dtype=coef.dtype, device=coef.device)  # -m/2, m = 1..cJ-2
            dlog_dt = ((dcoef[..., 2:] - dcoef[..., :-2]) * coef[..., 1:-1] * m_half).sum((1, 2))
            if ctx.tail:
                tail_da = da_tail + (dq * ctx.E).sum(1)  # through E, and through a in q = E + a E_(j-1)
                dlog_dt = torch.addcmul(dlog_dt, tail_da, a[:, 0, 0] * a[:, 0, 0] - 1, value=0.5)
            return dh, dlog_dt, None, None


def hope_transfer(h, dt, nfft):
    """G_dt(z_k) = sum_i h_i b(z_k)^(i+1) at the rfft nodes of length nfft (Algorithm 1's spectrum); -> (H, nfft//2 + 1)."""
    return _Spectrum.apply(h, dt.log(), nfft, False)


def hope_kernel_spectrum(h, dt, L):
    """The rfft (length 2L) of the exact causal kernel k[0..L-1] zero-padded to 2L; -> complex (H, L + 1).
    No input checks; hope_kernel is the checked public entry."""
    return _Spectrum.apply(h, dt.log(), 2 * L, True)


def hope_kernel(h, dt, L):
    """The causal kernel of the HOPE systems: real h (H, n), dt > 0 (H,) -> real (H, L).

    Exactly the first L samples of the impulse response of G_dt, for every dt > 0 (float64
    round-off; tested against a sample-by-sample simulation). Never builds an (H, L, n) tensor.
    """
    if not torch.is_floating_point(h) or h.ndim != 2 or h.shape[1] < 1:
        raise ValueError(f"h must be a real floating tensor (H, n) with n >= 1, got {h.dtype} {tuple(h.shape)}; "
                         "pass h.real for complex Markov parameters (Im(h) has no effect)")
    if not isinstance(dt, torch.Tensor) or dt.shape != (h.shape[0],):
        raise ValueError(f"dt must be a tensor of shape (H,) = ({h.shape[0]},), one per channel of h, "
                         f"got {tuple(dt.shape) if isinstance(dt, torch.Tensor) else type(dt).__name__}")
    _check_positive(dt)
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be an int >= 1, got {L!r}")
    return torch.fft.irfft(hope_kernel_spectrum(h, dt.to(h.dtype), L), n=2 * L)[:, :L]


def two_sided(K, L):
    """rfft (length 2L) of y[t] = sum_{s<=t} k_fwd[t - s] u[s] + sum_{s>t} k_bwd[s - t - 1] u[s], from the rffts
    of k_fwd = K[:H] and k_bwd = K[H:] (2H, L + 1) -> (H, L + 1). k_bwd[j] sits at lag -(j + 1) = 2L - j - 1:
    its terms k_bwd[j] z^(j+1) sum to z conj(K_bwd(z)). No lag wraps around (|t - s| < L; lag L is never used)."""
    H, k = len(K) // 2, torch.arange(L + 1, dtype=K.real.dtype, device=K.device)
    return K[:H] + torch.polar(torch.ones_like(k), k * (math.pi / L)) * K[H:].conj()  # z_k = exp(2 pi i k / 2L)


class _FFTConv(torch.autograd.Function):
    """y = irfft(rfft(u) K)[..., :L], FFTs of length nfft: u (B, H, L), K (H, nfft//2 + 1). Its adjoint written out,
    du = irfft(rfft(dy) conj(K)), dK = sum_B rfft(dy) conj(U) / nfft with the bins that stand for two doubled:
    autograd would run rfft's backward as a full complex FFT of a zero-filled spectrum, twice the work."""

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
        dK[:, 1:(nfft + 1) // 2].mul_(2)
        return du, dK, None


def _register(module, name, tensor, lr, weight_decay=0.0):
    """lr == 0: frozen buffer; else a parameter, with an optimizer hint when lr is given (state-spaces/s4
    style); weight_decay=None leaves its weight decay to the optimizer."""
    if lr == 0.0:
        module.register_buffer(name, tensor)
        return
    module.register_parameter(name, nn.Parameter(tensor))
    if lr is not None:
        getattr(module, name)._optim = {"lr": lr} | ({} if weight_decay is None else {"weight_decay": weight_decay})


class HOPE(nn.Module):
    """HOPE layer: SSM convolution + D u -> GELU -> dropout -> 1x1 conv with GLU (the S4D block).

    Input and output (B, H, L), or (B, L, H) with transposed=False.
    d_state: n, the number of Markov parameters (n-by-n Hankel matrix).
    dt_min, dt_max: dt is log-uniform in [dt_min, dt_max] per channel; set them equal to fix it.
    lr_dt: learning-rate hint for dt (0 freezes it as a buffer; no weight decay); lr_h: hint for h
        (None: the optimizer's default, as in the paper); h keeps the optimizer's weight decay.
    circular: use the paper's circular convolution (equal to algorithm1) instead of the causal one.
    bidirectional: add an anti-causal kernel with its own h and dt (see two_sided); non-circular.
    """

    def __init__(self, d_model, d_state=64, dt_min=0.001, dt_max=0.1, dropout=0.0, lr_dt=0.001,
                 lr_h=None, circular=False, bidirectional=False, transposed=True):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if circular and bidirectional:
            raise ValueError("circular and bidirectional exclude each other: the bidirectional layer is an exact "
                             "two-sided convolution without wrap-around; choose one")
        H, n, systems = d_model, d_state, 2 * d_model if bidirectional else d_model
        self.H, self.n, self.circular, self.bidirectional, self.transposed = H, n, circular, bidirectional, transposed
        log_dt = torch.rand(systems) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        _register(self, "log_dt", log_dt, lr_dt)
        # The authors' init (the paper only says "random"): their complex h has std 1 / (2 sqrt(2n)), so its
        # real part, the only part that acts, has std 1 / (4 sqrt(n)).
        _register(self, "h", torch.randn(systems, n) / (4 * math.sqrt(n)), lr_h, weight_decay=None)
        self.D = nn.Parameter(torch.randn(H))
        self.activation = nn.GELU()
        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Sequential(nn.Conv1d(H, 2 * H, kernel_size=1), nn.GLU(dim=-2))

    def kernel(self, L):
        """Causal kernels (H, L) of the current parameters; bidirectional: (2H, L), rows H.. are k_bwd."""
        return hope_kernel(self.h, self.log_dt.exp(), L)

    def forward(self, u):
        if not self.transposed:
            u = u.transpose(-1, -2)  # (B, L, H) -> (B, H, L)
        if u.ndim != 3 or u.shape[1] != self.H or not torch.is_floating_point(u):
            raise ValueError(f"HOPE expects a float tensor (B, H={self.H}, L) (or (B, L, H) with "
                             f"transposed=False), got {u.dtype} {tuple(u.shape)}")
        if self.h.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HOPE's parameters are {self.h.dtype}; keep the layer in float32 (or float64) and "
                             "use torch.autocast for mixed precision: the FFTs and the kernel need float32")
        u = u.to(torch.promote_types(u.dtype, torch.float32))  # torch.fft takes no bf16 (autocast may pass one)
        L = u.shape[-1]
        nfft = L if self.circular else 2 * L  # causal: zero-padded to 2L, so nothing wraps around
        # hope_transfer (circular) or hope_kernel_spectrum (causal), from log dt directly
        K = _Spectrum.apply(self.h, self.log_dt, nfft, not self.circular)  # (H or 2H, nfft//2 + 1)
        K = two_sided(K, L) if self.bidirectional else K  # (H, nfft//2 + 1)
        y = _FFTConv.apply(u, K, nfft)  # (B, H, L)
        y = self._block(y, u)
        return y if self.transposed else y.transpose(-1, -2)

    def _block(self, y, u):
        y = self.dropout(self.activation(y + self.D[:, None] * u))
        return self.output_linear(y)  # (B, H, L)

    def default_state(self, batch):
        """Zero state (B, H, n + 1): z_m = (b^m u)[t - 1], the last input and the n cascaded all-pass outputs."""
        return self.h.new_zeros(batch, self.H, self.n + 1)

    def step(self, u_t, state):
        """One time step of the causal mode: u_t (B, H), state (B, H, n + 1) -> y_t (B, H), state.

        The state z_m = (b^m u)[t - 1], m = 0..n, holds the input passed through m all-pass sections
        b(z) = (z^-1 - a) / (1 - a z^-1), and y = sum_i h_i (b^(i+1) u)[t] + D u (the kernel's system).
        Section m obeys z'_m + a z'_(m-1) = z_(m-1) + a z_m (primes: time t), i.e. (I + a S) z' = v with S
        the shift and v = [u_t, z_(m-1) + a z_m]. Its inverse M = (I + a S)^-1 is lower-triangular Toeplitz
        with entries (-a)^(i-j), so z' = M v: one batched matrix product per step instead of n dependent
        updates (O(n^2) work per channel, a handful of operations).
        """
        if self.circular or self.bidirectional:
            mode = "circular" if self.circular else "bidirectional"
            raise ValueError(f"step() runs the causal recurrence, but this layer is {mode}: its output at t depends "
                             "on inputs after t. Use forward() on the whole sequence")
        if u_t.ndim != 2 or u_t.shape[1] != self.H or state.shape != (u_t.shape[0], self.H, self.n + 1):
            raise ValueError(f"step expects u_t (B, {self.H}) and state (B, {self.H}, {self.n + 1}) "
                             f"from default_state(B), got {tuple(u_t.shape)} and {tuple(state.shape)}")
        a = torch.tanh(-self.log_dt / 2)[:, None]  # (H, 1): (1 - dt) / (1 + dt)
        v = torch.cat([u_t[..., None], torch.addcmul(state[..., :-1], a, state[..., 1:])], -1)  # (B, H, n + 1)
        p = torch.pow(-a, torch.arange(self.n + 1, device=u_t.device))  # (H, n + 1): (-a)^k
        # Windows of [0 (n times), p] reversed: M[i, j] = p[i - j] for i >= j, else 0 (a strided view, one copy)
        M = F.pad(p, (self.n, 0)).unfold(-1, self.n + 1, 1).flip(-1)  # (H, n + 1, n + 1)
        with torch.autocast(u_t.device.type, enabled=False):  # the state stays float32 (autocast: a bf16 matmul)
            state = torch.einsum("hij,bhj->bhi", M, v)  # (B, H, n + 1)
        y = (state[..., 1:] * self.h).sum(-1)  # (B, H)
        return self._block(y[..., None], u_t[..., None])[..., 0], state
