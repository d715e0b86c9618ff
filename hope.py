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
    the sign of q alternating between even and odd nodes. Q costs about 2 log2(L) FFT products of
    length 2n; no (L, n) or (n, n) tensor is ever built.

Exact, all of it (vs the step-by-step recurrence, dt 1e-4..10: relative error at most 1.2e-13 in float64
and 2.6e-5 in float32, measured; TF32 matmuls, off by default, would give ~3e-4, measured on an H100).
Autocast leaves the kernel and the FFTs in float32.
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


def _warped_angle(dt, nfft):
    """phi[:, k] = arg b(z_k) at the rfft nodes z_k = exp(2 pi i k / nfft); (H, nfft//2 + 1).

    b = 1/omega' has |b| = 1 and arg b = -theta - 2 atan2(a sin theta, 1 - a cos theta), so the warped
    node of step 3 is omega' = exp(-i phi). No singularity, unlike steps 2-3 of algorithm1. The
    denominator is computed as (1 - a) + 2 a sin^2(theta/2) with 1 - a = 2 dt / (1 + dt): written as
    1 - a cos theta it would lose every digit of a small dt near theta = 0 in float32.
    """
    theta = torch.arange(nfft // 2 + 1, dtype=dt.dtype, device=dt.device) * (2 * math.pi / nfft)
    dt = dt[:, None]  # (H, 1)
    a = (1 - dt) / (1 + dt)
    return -theta - 2 * torch.atan2(a * torch.sin(theta), 2 * dt / (1 + dt) + 2 * a * torch.sin(theta / 2) ** 2)


def _powers(x, count):
    """x^0, ..., x^(count-1) stacked along a new first dim, (count, *x.shape), by doubling.

    log2(count) batched products written into one preallocated table (only called where autograd is
    off: inside the custom Functions). A cumprod would do the same work, but complex cumprod is a
    slow scan on CUDA (1.7 ms for one kernel's table on an H100).
    """
    p = x.new_empty(count, *x.shape)
    p[0] = 1
    m = 1
    while m < count:
        k = min(m, count - m)
        torch.mul(p[:k], p[m - 1] * x, out=p[m:m + k])  # x^(m..m+k-1) = x^(0..k-1) x^m
        m += k
    return p


def _basis(phi, m):
    """For a polynomial of m coefficients in b = exp(i phi): c ~ sqrt(m), J, b^0..b^(c-1) (c, H, nodes), beta = b^c.

    Block size c = ceil(sqrt(m)) and block count J = ceil(m / c), so c J >= m. b from cos and sin:
    they are vectorized on CPU, torch.polar is 4x slower there.
    """
    c = math.isqrt(m - 1) + 1
    J = -(-m // c)
    b = torch.complex(torch.cos(phi), torch.sin(phi))
    powers = _powers(b, c)
    return c, J, powers, powers[-1] * b


def _poly(coef, basis):
    """P[:, k] = sum_m coef[:, m] b_k^m: real (H, m) -> complex (H, nodes).

    Split m = c j + r (c ~ sqrt(m) powers per block, J blocks): b^m = b^r beta^j with beta = b^c, so
    P = S_0 + beta (S_1 + beta (S_2 + ...)) with S_j = sum_r coef_{cj+r} b^r: all J inner sums from one
    batched matmul, then Horner's rule. Only c powers of b exist at a time: O(H nodes sqrt(m)) memory
    instead of the O(H nodes m) of the literal form.
    """
    (H, m), (c, J, powers, beta) = coef.shape, basis
    blocks = F.pad(coef, (0, c * J - m)).view(H, J, c).to(beta.dtype)  # (H, J, c): coef_{cj+r}
    S = blocks @ powers.transpose(0, 1)  # (H, J, c) @ (H, c, nodes) -> (H, J, nodes)
    P = S[:, J - 1]
    for j in range(J - 2, -1, -1):
        P = torch.addcmul(S[:, j], P, beta)  # S_j + P beta
    return P


def _poly_adjoint(grad, basis, m):
    """dcoef[:, cj + r] = Re sum_k conj(grad[:, k]) b_k^r beta_k^j: the transpose of _poly; -> (H, m)."""
    c, J, powers, beta = basis
    T = _powers(beta, J).mul_(grad.conj())  # (J, H, nodes): conj(grad) beta^j
    dcoef = (T.transpose(0, 1) @ powers.permute(1, 2, 0)).real  # (H, J, nodes) @ (H, nodes, c) -> (H, J, c)
    return dcoef.reshape(len(grad), c * J)[:, :m]


class _PolyFn(torch.autograd.Function):
    """P = sum_m coef_m exp(i m phi) with an analytic backward that saves only coef and phi.

    Autograd through the Horner loop would keep every intermediate. The backward instead uses,
    for a real loss and PyTorch's convention dLoss/dx = Re(conj(grad) dP/dx) for real x:
        dP/dcoef_m = b^m                     -> dcoef_m = Re sum_k conj(grad_k) b_k^m
        dP/dphi = i sum_m m coef_m b^m       -> dphi    = Re(conj(grad) i P'),  P' = P with coef_m -> m coef_m
    so the backward is one more _poly and its transpose, sharing one table of powers: O(H nodes
    sqrt(m)) memory, like the forward. dphi flows on to dt through _warped_angle by ordinary autograd.
    """

    @staticmethod
    def forward(ctx, coef, phi):
        ctx.save_for_backward(coef, phi)
        return _poly(coef, _basis(phi, coef.shape[1]))

    @staticmethod
    def backward(ctx, grad):
        coef, phi = ctx.saved_tensors
        m = coef.shape[1]
        basis = _basis(phi, m)
        dcoef = _poly_adjoint(grad, basis, m) if ctx.needs_input_grad[0] else None
        dphi = None
        if ctx.needs_input_grad[1]:
            index = torch.arange(m, dtype=coef.dtype, device=coef.device)
            dphi = (grad.conj() * 1j * _poly(coef * index, basis)).real
        return dcoef, dphi


def hope_transfer(h, dt, nfft):
    """G_dt(z_k) = sum_i h_i b(z_k)^(i+1) at the rfft nodes of length nfft; -> complex (H, nfft//2 + 1).

    The circular mode's spectrum (Algorithm 1). No input checks (called every step by the layer).
    """
    return _PolyFn.apply(F.pad(h, (1, 0)), _warped_angle(dt, nfft))  # coefficients of b^0 .. b^n


def _series_mul(p, q):
    """First n coefficients of the product of power series given by their first n, (..., n); broadcasts."""
    n = p.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(p, 2 * n) * torch.fft.rfft(q, 2 * n), 2 * n)[..., :n]  # 2n: no wrap-around


def _shift(p, k):
    """x^k p(x), first n coefficients."""
    return F.pad(p, (k, 0))[..., :p.shape[-1]]


class _TailSeriesFn(torch.autograd.Function):
    """Q = (a + x)^(L-1) / (1 + a x)^L, first n coefficients, (H, n), a = (1 - dt)/(1 + dt); dQ/ddt analytic.

    With r = 1/(1 + a x) = sum_k (-a)^k x^k and f = (a + x) r, whose coefficients are a, then
    (1 - a^2)(-a)^(k-1) with 1 - a^2 = 4 dt/(1 + dt)^2: Q = f^N r with N = L - 1, by repeated squaring
    (log2 L steps; every coefficient of every power of f is at most 1 in magnitude). Autograd through
    the squarings would record ~6 log2 L operations; since df/da = (1 - x^2) r^2 and dr/da = -x r^2,
        dQ/da = N (1 - x^2) r^2 f^(N-1) r - x r Q,
    a few products of series that the forward already has (it keeps f^(N-1) r on the way to Q).
    """

    @staticmethod
    def forward(ctx, dt, L, n):
        dt = dt[:, None]  # (H, 1)
        a = (1 - dt) / (1 + dt)
        r = _powers(-a[:, 0], n).T  # (H, n)
        f = torch.cat([a, 4 * dt / (1 + dt) ** 2 * r[:, :-1]], 1)  # (H, n)
        pair, e = torch.stack([r, f]), max(L - 2, 0)  # (2, H, n): f^(N-1) r so far, f^(2^i)
        while e:  # one FFT of both series serves both products
            X = torch.fft.rfft(pair, 2 * n)  # (2, H, n + 1)
            products = torch.fft.irfft(X * X[1], 2 * n)[..., :n]  # (2, H, n): times f^(2^i), f^(2^(i+1))
            pair = products if e & 1 else torch.stack([pair[0], products[1]])
            e >>= 1
        Q = _series_mul(pair[0], f) if L > 1 else r
        ctx.save_for_backward(dt, r, pair[0], Q)
        ctx.N = L - 1
        return Q

    @staticmethod
    def backward(ctx, grad):
        dt, r, F1, Q = ctx.saved_tensors
        dQ_da = -_shift(_series_mul(r, Q), 1)
        if ctx.N:
            r2F1 = _series_mul(_series_mul(r, r), F1)
            dQ_da = dQ_da + ctx.N * (r2F1 - _shift(r2F1, 2))
        return (grad * dQ_da).sum(1) * (-2 / (1 + dt[:, 0]) ** 2), None, None  # da/ddt = -2/(1 + dt)^2


def _tail(h, dt, L):
    """q (H, n + 1) such that the kernel's tail sum_t k[L + t] z^-t equals sum_j q_j b(z)^j (module docstring)."""
    n = h.shape[1]
    Q = _TailSeriesFn.apply(dt, L, n)  # (H, n)
    E = torch.fft.irfft(torch.fft.rfft(h, 2 * n) * torch.fft.rfft(Q, 2 * n).conj(), 2 * n)[:, :n]  # sum_i h_i Q_(i-j)
    a = ((1 - dt) / (1 + dt))[:, None]
    return F.pad(E, (0, 1)) + a * F.pad(E, (1, 0))  # (H, n + 1): q_j = E_j + a E_(j-1)


def hope_kernel_spectrum(h, dt, L):
    """The rfft (length 2L) of the exact causal kernel k[0..L-1] zero-padded to 2L; -> complex (H, L + 1).

    K_L(z_k) = G(z_k) - (-1)^k R(z_k) = sum_m c_m b_k^m with c = [0, h] - (-1)^k q (module docstring):
    one polynomial evaluation, even nodes and odd nodes batched with their own coefficients.
    No input checks (called every step by the layer); hope_kernel is the checked public entry.
    """
    H, n = h.shape
    g, q = F.pad(h, (1, 0)), _tail(h, dt, L)  # (H, n + 1) each: G and R as polynomials in b
    coef = torch.stack([g - q, g + q], 1).view(2 * H, n + 1)  # even nodes (z^-L = 1), odd nodes (z^-L = -1)
    phi = F.pad(_warped_angle(dt, 2 * L), (0, (L + 1) % 2))  # (H, 2 N2): one unused node if L + 1 is odd
    phi = phi.view(H, -1, 2).transpose(1, 2).reshape(2 * H, -1)  # (2H, N2): the even nodes, then the odd ones
    K = _PolyFn.apply(coef, phi)  # (2H, N2)
    return K.view(H, 2, -1).transpose(1, 2).reshape(H, -1)[:, :L + 1]  # (H, L + 1): nodes back in order


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
        dt = self.log_dt.exp()
        if self.circular:
            G = hope_transfer(self.h, dt, L)  # (H, L//2 + 1)
            y = torch.fft.irfft(torch.fft.rfft(u, n=L) * G, n=L)  # (B, H, L)
        else:
            K = hope_kernel_spectrum(self.h, dt, L)  # (H, L + 1), or (2H, L + 1)
            K = two_sided(K, L) if self.bidirectional else K  # (H, L + 1)
            y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * K, n=2 * L)[..., :L]  # (B, H, L)
        y = self._block(y, u)
        return y if self.transposed else y.transpose(-1, -2)

    def _block(self, y, u):
        y = self.dropout(self.activation(y + self.D[:, None] * u))
        return self.output_linear(y)  # (B, H, L)

    def default_state(self, batch):
        """Zero state (B, H, n + 1): the previous input of the cascade and the n section outputs."""
        return self.h.new_zeros(batch, self.H, self.n + 1)

    def step(self, u_t, state):
        """One time step of the causal mode: u_t (B, H), state (B, H, n + 1) -> y_t (B, H), state.

        The kernel's system as a cascade of n first-order all-pass sections b(z), each
        x_out[t] = a x_out[t-1] + x_in[t-1] - a x_in[t]; the output is sum_i h_i (section i's
        output) + D u. O(n) work per step and channel.
        """
        if self.circular or self.bidirectional:
            mode = "circular" if self.circular else "bidirectional"
            raise ValueError(f"step() runs the causal recurrence, but this layer is {mode}: its output at t depends "
                             "on inputs after t. Use forward() on the whole sequence")
        if u_t.ndim != 2 or u_t.shape[1] != self.H or state.shape != (u_t.shape[0], self.H, self.n + 1):
            raise ValueError(f"step expects u_t (B, {self.H}) and state (B, {self.H}, {self.n + 1}) "
                             f"from default_state(B), got {tuple(u_t.shape)} and {tuple(state.shape)}")
        dt = self.log_dt.exp()
        a = (1 - dt) / (1 + dt)  # (H,)
        x, outs = u_t, []
        for i in range(self.n):
            x = a * state[..., i + 1] + state[..., i] - a * x  # section i: (B, H)
            outs.append(x)
        state = torch.stack([u_t] + outs, dim=-1)  # (B, H, n + 1)
        y = (state[..., 1:] * self.h).sum(-1)  # (B, H)
        return self._block(y[..., None], u_t[..., None])[..., 0], state
