"""S4D: the diagonal state-space baseline (Gu, Gupta, Goel, Re 2022), with StableSSM options.

Standalone (torch and the standard library only), layout and block identical to hope.py's HOPE so
the two are drop-in replacements for each other.

Glossary (code name = paper symbol: meaning)
    B, H, L      batch, channels (d_model), sequence length
    N = d_state  state size; the N/2 modes come in conjugate pairs, so only N/2 are stored
    A  (H, N/2)  complex diagonal state matrix, Re(A) < 0 for stability
    b_in (N/2,)  the state-space input vector (the paper's B; B here is the batch): only C_n b_in_n
                 enters the kernel, so it is absorbed into C at initialization
    C  (H, N/2)  complex output weights; (2H, N/2) when bidirectional, rows H.. for the anti-causal kernel
    dt (H,)      step size of the zero-order-hold (ZOH) discretization
    D  (H,)      feedthrough
    dA, dB       exp(dt A), (exp(dt A) - 1) / A: the discrete system x[t] = dA x[t-1] + dB u[t]
    k  (H, L)    kernel k[l] = 2 Re sum_n C_n dB_n dA_n^l (a Vandermonde product)

Initializations of A (init=...)
    lin     S4D-Lin: A_n = -1/2 + i pi n
    inv     S4D-Inv: A_n = -1/2 + i (N/pi) (N/(2n+1) - 1)
    legs    eigenvalues of the normal part of the HiPPO-LegS matrix (all -1/2 + i w_n), with
            b_in = V^* B_LegS absorbed into C, Im(b_in) clipped to [-2, 2] as in state-spaces/s4

Parameterizations of Re(A) = f(w) (real_param=..., StableSSM, Wang & Li 2023). Near long memory
(Re(A) = lambda -> 0) the gradient scale |f'(w)| / f(w)^2 behaves as:
    exp        f = -exp(w)            1/|lambda|    (S4 and S4D's default)
    softplus   f = -log(1 + exp(w))   ~1/|lambda|   (S5)
    direct     f = w                  1/lambda^2    (no stability guarantee: w may cross 0)
    stable     f = -1/(w^2 + 1/2)     ~2/sqrt|lambda|  (bounded |Re A| <= 2; tamest gradients)
Each w is initialized so that Re(A) starts exactly at the chosen init.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["S4D", "s4d_kernel", "init_A", "INITS", "REAL_PARAMS"]

REAL_PARAMS = {  # real_param: (f, its inverse w = f^-1(re) on re < 0; all inits start at re = -1/2)
    "exp": (lambda w: -torch.exp(w), lambda re: torch.log(-re)),
    "softplus": (lambda w: -F.softplus(w), lambda re: torch.log(torch.expm1(-re))),
    "direct": (lambda w: w, lambda re: re.clone()),
    "stable": (lambda w: -1 / (w * w + 0.5), lambda re: torch.sqrt(-1 / re - 0.5)),  # f maps onto [-2, 0)
}
INITS = ("lin", "inv", "legs")


def init_A(H, N, init):
    """Initial A (H, N/2) complex128 and the input vector b_in it comes with (H, N/2)."""
    n = torch.arange(N // 2, dtype=torch.float64)
    b_in = torch.ones(N // 2, dtype=torch.complex128)
    if init == "lin":
        A = -0.5 + 1j * math.pi * n
    elif init == "inv":
        A = -0.5 + 1j * (N / math.pi) * (N / (2 * n + 1) - 1)
    elif init != "legs":
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    else:
        # HiPPO-LegS = normal part S minus the rank-1 P P^T; S = -I/2 + skew, and i*skew is Hermitian.
        q = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)  # (N,)
        skew = torch.tril(q[:, None] * q[None, :], -1)  # (N, N)
        skew = 0.5 * (skew.T - skew)  # the normal part minus its -1/2 diagonal
        lam, V = torch.linalg.eigh(1j * skew.to(torch.complex128))  # skew = V diag(-i lam) V^*
        keep = lam < 0  # one of each conjugate pair: Im(A) = -lam > 0
        A = -0.5 - 1j * lam[keep]
        b_in = V[:, keep].conj().T @ q.to(torch.complex128)  # (N/2,): V^* B_LegS
        # The official initializer (state-spaces/s4, hippo.nplr, B_clip=2.0) clips Im(b_in) to [-2, 2];
        # S4D-LegS as published is that clipped system, so this one is too.
        b_in = torch.complex(b_in.real, b_in.imag.clamp(-2.0, 2.0))
        A, b_in = A.flip(0), b_in.flip(0)  # ascending frequency, like lin and inv
    return A.expand(H, -1).clone(), b_in.expand(H, -1).clone()


def s4d_kernel(dt, A, C, L):
    """ZOH-discretized diagonal SSM kernel: dt (H,), A and C complex (H, N/2) -> real (H, L).

    k[l] = 2 Re sum_n C_n (exp(dt A_n) - 1) / A_n exp(dt A_n l)   (b_in absorbed into C).
    """
    if not (torch.is_complex(A) and torch.is_complex(C)) or A.ndim != 2 or A.shape != C.shape:
        raise ValueError(f"A and C must be complex tensors of the same shape (H, N/2), got "
                         f"{A.dtype} {tuple(A.shape)} and {C.dtype} {tuple(C.shape)}")
    if not isinstance(dt, torch.Tensor) or dt.shape != (A.shape[0],):
        raise ValueError(f"dt must be a tensor of shape (H,) = ({A.shape[0]},), one per channel")
    if not torch.isfinite(dt).all() or (dt <= 0).any():
        raise ValueError(f"dt must be finite and > 0 (a step size), got min {dt.min().item():.3g}")
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be an int >= 1, got {L!r}")
    return _kernel(dt, A, C, L)[0]


def _kernel(dt, A, C, L):
    """s4d_kernel without checks, and what it is made of: k (H, or 2H when C holds the bidirectional rows that
    share A and dt), dA = exp(dt A) (H, N/2) and the Vandermonde table V = dA^l (H, N/2, L)."""
    dtA = A * dt[:, None]  # (H, N/2)
    V = torch.exp(dtA[..., None] * torch.arange(L, device=A.device))  # (H, N/2, L)
    dA = torch.exp(dtA)
    k = 2 * torch.einsum("chn,hnl->chl", C.view(-1, *A.shape) * (dA - 1) / A, V).real.flatten(0, 1)  # (cH, L)
    return k, dA, V


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


def _register(module, name, tensor, lr):
    """lr == 0: frozen buffer; else a parameter, with an optimizer hint when lr is given (state-spaces/s4 style)."""
    if lr == 0.0:
        return module.register_buffer(name, tensor)
    module.register_parameter(name, nn.Parameter(tensor))
    if lr is not None:
        getattr(module, name)._optim = {"lr": lr, "weight_decay": 0.0}


class S4D(nn.Module):
    """S4D layer: SSM convolution + D u -> GELU -> dropout -> 1x1 conv with GLU.

    Input and output (B, H, L), or (B, L, H) with transposed=False; forward and step() hand the state to each other.
    lr: learning-rate hint for A (weight decay 0); lr_dt: hint for dt (0 freezes it).
    bidirectional: add an anti-causal kernel with its own C, sharing A and dt (s4's channels=2).
    """

    def __init__(self, d_model, d_state=64, dt_min=0.001, dt_max=0.1, dropout=0.0, init="lin",
                 real_param="exp", lr=0.001, lr_dt=0.001, bidirectional=False, transposed=True):
        super().__init__()
        if not (math.isfinite(dt_min) and math.isfinite(dt_max) and 0 < dt_min <= dt_max):
            raise ValueError(f"need finite 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if d_model < 1 or d_state < 2 or d_state % 2:
            raise ValueError(f"need d_model >= 1 (channels) and d_state even and >= 2 (modes come in conjugate "
                             f"pairs), got d_model={d_model}, d_state={d_state}")
        if real_param not in REAL_PARAMS:
            raise ValueError(f"real_param must be one of {tuple(REAL_PARAMS)}, got {real_param!r}")
        self.H, self.real_param, self.bidirectional, self.transposed = d_model, real_param, bidirectional, transposed
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        A, b_in = init_A(d_model, d_state, init)
        C = torch.randn(2 if bidirectional else 1, d_model, d_state // 2, dtype=torch.complex128) * b_in  # (c, H, N/2)
        _register(self, "log_dt", log_dt, lr_dt)
        _register(self, "w", REAL_PARAMS[real_param][1](A.real).float(), lr)
        _register(self, "A_imag", A.imag.float(), lr)
        self.C = nn.Parameter(torch.view_as_real(C.flatten(0, 1).to(torch.complex64)))  # (cH, N/2, 2): optimizers want real
        self.D = nn.Parameter(torch.randn(d_model))
        self.activation = nn.GELU()
        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Sequential(nn.Conv1d(d_model, 2 * d_model, kernel_size=1), nn.GLU(dim=-2))
        self._cache = None  # step()'s (key, (dA, dB, 2C), params)

    def _system(self):
        A = torch.complex(REAL_PARAMS[self.real_param][0](self.w), self.A_imag)  # (H, N/2)
        return self.log_dt.exp(), A, torch.view_as_complex(self.C)

    def kernel(self, L):
        """Causal kernels (H, L) of the current parameters; bidirectional: (2H, L), rows H.. are k_bwd."""
        return _kernel(*self._system(), L)[0]

    def _checked(self, u, state, causal):  # forward's and step's checks; u promoted to float32 at least
        if self.C.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"S4D's parameters are {self.C.dtype}; keep the layer in float32 (or float64) and "
                             "use torch.autocast for mixed precision: the FFTs and the kernel need float32")
        if causal and self.bidirectional:
            raise ValueError("step(), and forward's state and return_state, run a causal recurrence, but this "
                             "layer is bidirectional: its outputs depend on later inputs. Use forward(u) on it all")
        shape = (u.shape[0], *self.A_imag.shape)  # the dtype via view_as_complex: dynamo cannot trace to_complex
        if state is not None and (state.shape != shape or state.dtype != torch.view_as_complex(self.C).dtype):
            raise ValueError(f"state must be {self.C.dtype.to_complex()} {shape} (B, H, N/2), as default_state(B), "
                             f"step() or forward() give it; got {state.dtype} {tuple(state.shape)}")
        return u.to(torch.promote_types(u.dtype, torch.float32))  # torch.fft takes no bf16 (autocast may pass one)

    def forward(self, u, state=None, return_state=False):
        """u (B, H, L), or (B, L, H) with transposed=False -> y of the same shape, or (y, final_state).

        state: the recurrent state (B, H, N/2) complex that the sequence continues from, as default_state(B),
        step() or a previous forward(..., return_state=True) gives it (None: the zero state, the plain layer).
        return_state: also return the state step() would hold after u's last sample. Forward over chunks with
        the state passed on is forward over the whole. Causal layers only: a bidirectional one refuses both.
        A NaN or inf anywhere in u reaches every output, earlier ones included: the FFT mixes all positions.
        """
        u = u if self.transposed else u.transpose(-1, -2)  # (B, L, H) -> (B, H, L)
        if u.ndim != 3 or u.shape[1] != self.H or not torch.is_floating_point(u) or u.shape[-1] < 1:
            raise ValueError(f"S4D expects a float tensor (B, H={self.H}, L) with L >= 1 (or (B, L, H) with "
                             f"transposed=False), got {u.dtype} {tuple(u.shape)}")
        u, L = self._checked(u, state, state is not None or return_state), u.shape[-1]
        dt, A, C = self._system()
        k, dA, V = _kernel(dt, A, C, L)  # (H or 2H, L), (H, N/2), (H, N/2, L)
        if self.bidirectional:  # y[t] += sum_{s>t} k_bwd[s-t-1] u[s]: k_bwd[j] at lag -(j+1), i.e. 2L-j-1 on the circle
            k = torch.cat([k[:self.H], k[self.H:].flip(-1)], -1)  # (H, 2L); u is padded, so lags never wrap around
        y = _FFTConv.apply(u, torch.fft.rfft(k, n=2 * L), 2 * L)  # (B, H, L), the kernel's spectrum (H, L + 1)
        if state is not None:  # the response to the state alone: y[t] += 2 Re sum_n C_n dA_n^(t+1) x_n
            y = y + 2 * torch.einsum("bhn,hnl->bhl", C * dA * state, V).real
        y = self._block(y, u)
        y = y if self.transposed else y.transpose(-1, -2)
        if not return_state:
            return y
        final = (dA - 1) / A * torch.einsum("bhl,hnl->bhn", u.flip(-1).to(V.dtype), V)  # sum_t dA^(L-1-t) dB u[t]
        return y, final if state is None else final + dA * V[..., -1] * state  # + dA^L x

    def _block(self, y, u):
        return self.output_linear(self.dropout(self.activation(y + self.D[:, None] * u)))  # (B, H, L)

    def default_state(self, batch):
        """Zero state (B, H, N/2), complex."""
        return torch.zeros(batch, *self.A_imag.shape, dtype=self.C.dtype.to_complex(), device=self.C.device)

    def _recurrence(self):
        """step()'s dA, dB, 2C (H, N/2), computed once per parameter values (in-place updates bump _version)."""
        params = (self.log_dt, self.w, self.A_imag, self.C)
        key = [(id(p), p._version, p.data_ptr(), p.device, p.dtype) for p in params], torch.is_inference_mode_enabled()
        # Cached only while no gradient can reach the parameters: a backward frees a cached tensor's autograd graph.
        cacheable = not torch.is_grad_enabled() or not any(p.requires_grad for p in params)
        if not (cacheable and self._cache is not None and self._cache[0] == key):
            dt, A, C = self._system()
            dA = torch.exp(A * dt[:, None])
            if not cacheable:
                return dA, (dA - 1) / A, 2 * C
            self._cache = key, (dA, (dA - 1) / A, 2 * C), params  # params held, so that their ids stay theirs
        return self._cache[1]

    def step(self, u_t, state=None):
        """One time step: u_t (B, H) and state (B, H, N/2) as default_state(B), step() or forward(...,
        return_state=True) gives it (None: the zero state) -> y_t (B, H), the next state. O(N) per channel."""
        if u_t.ndim != 2 or u_t.shape[1] != self.H or not torch.is_floating_point(u_t):
            raise ValueError(f"step expects a float tensor u_t (B, H={self.H}), got {u_t.dtype} {tuple(u_t.shape)}")
        u_t = self._checked(u_t, state, causal=True)[..., None]  # (B, H, 1)
        dA, dB, C2 = self._recurrence()
        state = dB * u_t if state is None else torch.addcmul(dA * state, dB, u_t)  # (B, H, N/2)
        y = (C2 * state).sum(-1, keepdim=True).real  # (B, H, 1): 2 Re(C state)
        return self._block(y, u_t)[..., 0], state
