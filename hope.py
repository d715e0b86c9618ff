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
    h  (H, n)    Markov parameters h_0..h_{n-1}
    dt (H,)      sampling period Delta t > 0 of the bilinear warp
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

Exact and approximate
    algorithm1   exact: the paper's circular convolution of length L.
    circular=True in HOPE: exactly algorithm1, computed with rfft (faster, same numbers).
    hope_kernel  the first L samples of the impulse response, computed from G at the 2L rfft
                 nodes. Sampling at 2L nodes folds the response's tail beyond 2L back onto it:
                 the result is exactly sum_m k[t + 2 L m] (tested), which equals k[t] up to the
                 tail, negligible when n/dt << 2L (dt = 0.1, n = 64, L = 2048: below 1e-30).
    causal mode  exact causal (Toeplitz) convolution with hope_kernel(h, dt, L).
    step         exact recurrence; over a sequence it equals the causal mode.
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
    """phi[:, k] = arg b(z_k) per channel at the rfft nodes z_k = exp(2 pi i k / nfft); (H, nfft//2 + 1).

    With |b| = 1 the warped node is exp(i phi): arg omega' = theta + 2 atan2(a sin, 1 - a cos),
    and b = 1/omega'. This form has no singularity, unlike steps 2-3 of algorithm1.
    """
    theta = torch.arange(nfft // 2 + 1, dtype=dt.dtype, device=dt.device) * (2 * math.pi / nfft)
    a = ((1 - dt) / (1 + dt))[:, None]  # (H, 1)
    return -theta - 2 * torch.atan2(a * torch.sin(theta), 1 - a * torch.cos(theta))  # (H, F)


def _blocks(n):
    """Block size c = ceil(sqrt(n)) and block count J = ceil(n / c), with c J >= n."""
    c = math.isqrt(n - 1) + 1
    return c, -(-n // c)


def _cis(angle):
    """exp(i angle); cos and sin are vectorized on CPU, torch.polar is 4x slower."""
    return torch.complex(torch.cos(angle), torch.sin(angle))


def _powers(x, count):
    """x^1, ..., x^count along a new last dim: (H, F) -> (H, F, count); cheaper than count cis calls."""
    return x[..., None].expand(*x.shape, count).cumprod(-1)


def _allpass_sum(h, phi):
    """G[:, k] = sum_m h[:, m] b_k^(m+1) with b_k = exp(i phi[:, k]): (H, n), (H, F) -> (H, F).

    Split m = c j + r (c ~ sqrt(n) powers per block, J blocks): b^(m+1) = b^(r+1) beta^j with
    beta = b^c, so G = S_0 + beta (S_1 + beta (S_2 + ...)) with S_j = sum_r h_{cj+r} b^(r+1):
    all J sums from one batched matmul, then Horner's rule. Only c powers of b exist at a time,
    O(H F sqrt(n)) memory instead of the O(H F n) of the literal form.
    """
    H, n = h.shape
    c, J = _blocks(n)
    coef = F.pad(h, (0, c * J - n)).view(H, J, c).transpose(1, 2)  # (H, c, J)
    P = _powers(_cis(phi), c)  # (H, F, c): b^(r+1)
    S = P @ coef.to(P.dtype)  # (H, F, J)
    beta = P[..., -1]
    G = S[..., J - 1]
    for j in range(J - 2, -1, -1):
        G = G * beta + S[..., j]
    return G


def _allpass_sum_adjoint(grad, phi, n):
    """dh[:, m] = Re sum_k conj(grad[:, k]) b_k^(m+1): the transpose of _allpass_sum; -> (H, n)."""
    H, nodes = phi.shape
    c, J = _blocks(n)
    P = _powers(_cis(phi), c)  # (H, F, c): b^(r+1)
    T = torch.cat([grad.conj()[..., None], P[..., -1:].expand(H, nodes, J - 1)], -1)  # (H, F, J)
    T.cumprod_(-1)  # conj(grad) beta^j
    return (P.mT @ T).real.transpose(1, 2).reshape(H, c * J)[:, :n]  # (H, c, J) -> (H, n)


class _AllPassSumFn(torch.autograd.Function):
    """G = sum_m h_m exp(i (m+1) phi) with an analytic backward that saves only h and phi.

    Autograd through the Horner loop would keep every intermediate. The backward instead uses,
    for a real loss and PyTorch's convention dLoss/dx = Re(conj(grad) dG/dx) for real x:
        dG/dh_m = b^(m+1)                      -> dh_m  = Re sum_k conj(grad_k) b_k^(m+1)
        dG/dphi = i sum_m (m+1) h_m b^(m+1)    -> dphi  = Re(conj(grad) i G'),  G' = G with h_m -> (m+1) h_m
    so the backward is one more _allpass_sum and its transpose: O(H F sqrt(n)) memory, like the
    forward. dphi flows on to dt through _warped_angle by ordinary autograd.
    """

    @staticmethod
    def forward(ctx, h, phi):
        ctx.save_for_backward(h, phi)
        return _allpass_sum(h, phi)

    @staticmethod
    def backward(ctx, grad):
        h, phi = ctx.saved_tensors
        n = h.shape[1]
        dh = _allpass_sum_adjoint(grad, phi, n) if ctx.needs_input_grad[0] else None
        dphi = None
        if ctx.needs_input_grad[1]:
            m1 = torch.arange(1, n + 1, dtype=h.dtype, device=h.device)
            dphi = (grad.conj() * 1j * _allpass_sum(h * m1, phi)).real
        return dh, dphi


def hope_transfer(h, dt, nfft):
    """G_dt(z_k) = sum_i h_i b(z_k)^(i+1) at the rfft nodes of length nfft; -> complex (H, nfft//2 + 1).

    No input checks (called every step by the layer); hope_kernel is the checked public entry.
    """
    return _AllPassSumFn.apply(h, _warped_angle(dt, nfft))


def hope_kernel(h, dt, L):
    """Causal time-domain kernel of the HOPE systems: real h (H, n), dt > 0 (H,) -> real (H, L).

    The first L samples of the impulse response of G_dt, via the rfft nodes of length 2L (exact up
    to the tail beyond 2L; see the module docstring). Never builds an (H, L, n) tensor.
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
    return torch.fft.irfft(hope_transfer(h, dt.to(h.dtype), 2 * L), n=2 * L)[:, :L]


def _register(module, name, tensor, lr):
    """lr == 0: frozen buffer; else a parameter, with an optimizer hint when lr is given (state-spaces/s4 style)."""
    if lr == 0.0:
        module.register_buffer(name, tensor)
        return
    module.register_parameter(name, nn.Parameter(tensor))
    if lr is not None:
        getattr(module, name)._optim = {"lr": lr, "weight_decay": 0.0}


class HOPE(nn.Module):
    """HOPE layer: SSM convolution + D u -> GELU -> dropout -> 1x1 conv with GLU (the S4D block).

    Input and output (B, H, L), or (B, L, H) with transposed=False.
    d_state: n, the number of Markov parameters (n-by-n Hankel matrix).
    dt_min, dt_max: dt is log-uniform in [dt_min, dt_max] per channel; set them equal to fix it.
    lr_dt: learning-rate hint for dt (0 freezes it as a buffer); lr_h: hint for h (None: the
        optimizer's default, as in the paper).
    circular: use the paper's circular convolution (equal to algorithm1) instead of the causal one.
    """

    def __init__(self, d_model, d_state=64, dt_min=0.001, dt_max=0.1, dropout=0.0, lr_dt=0.001,
                 lr_h=None, circular=False, transposed=True):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        H, n = d_model, d_state
        self.H, self.n, self.circular, self.transposed = H, n, circular, transposed
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        _register(self, "log_dt", log_dt, lr_dt)
        # The authors' init scale; the paper only says "random".
        _register(self, "h", torch.randn(H, n) / (2 * math.sqrt(2 * n)), lr_h)
        self.D = nn.Parameter(torch.randn(H))
        self.activation = nn.GELU()
        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Sequential(nn.Conv1d(H, 2 * H, kernel_size=1), nn.GLU(dim=-2))

    def kernel(self, L):
        """Causal kernel (H, L) of the current parameters."""
        return torch.fft.irfft(hope_transfer(self.h, self.log_dt.exp(), 2 * L), n=2 * L)[:, :L]

    def forward(self, u):
        if not self.transposed:
            u = u.transpose(-1, -2)  # (B, L, H) -> (B, H, L)
        if u.ndim != 3 or u.shape[1] != self.H or not torch.is_floating_point(u):
            raise ValueError(f"HOPE expects a float tensor (B, H={self.H}, L) (or (B, L, H) with "
                             f"transposed=False), got {u.dtype} {tuple(u.shape)}")
        u = u.to(torch.promote_types(u.dtype, torch.float32))  # torch.fft takes no bf16 (autocast may pass one)
        L = u.shape[-1]
        if self.circular:
            G = hope_transfer(self.h, self.log_dt.exp(), L)  # (H, L//2 + 1)
            y = torch.fft.irfft(torch.fft.rfft(u, n=L) * G, n=L)  # (B, H, L)
        else:
            k_f = torch.fft.rfft(self.kernel(L), n=2 * L)  # (H, L + 1)
            y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * k_f, n=2 * L)[..., :L]  # (B, H, L)
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
