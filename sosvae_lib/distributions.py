"""Gaussian observation models over a whole flattened image.

SOS-VAE (J. Langley, M. Monteiro, C. Jones, N. Pawlowski, B. Glocker, "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022, arXiv 2205.12533) decodes z into

    p(x | z) = N(μ, P Pᵀ + diag(d)),   x, μ, d ∈ R^D,  P ∈ R^{D×R},

over D = C·H·W pixels (flattened channel-first). This module holds that distribution (`LowRankNormal`)
and the pixel-wise independent baseline (`DiagonalNormal`), both `torch.distributions.Distribution`
subclasses with one interface: log_prob, entropy, rsample with caller-fixed noises (`from_noise`),
per-pixel variances, covariance rows, and Gaussian conditioning on observed pixels (`condition`).

All linear algebra works on the R×R "capacitance" K = I + AᵀA with A = d^{-1/2} ⊙ P (rows scaled);
nothing of size D×D (or m×m for m observed pixels) is ever formed, and only Cholesky factorisations are
used (batched LU inverse/solve was seen to fail in oneMKL on this project's CPUs). The R×R algebra runs
in float64 whatever the input dtype: it is tiny and it keeps float32 results close to float64 ones.

Devices and precision: every result lives on loc's device. A 0-dim CPU cov_diag (``torch.tensor(1e-5)``) is
accepted with parameters on a GPU and lifted there without a copy (`_diag_on`); any other tensor on another device
is refused when the distribution is built. The public computations run with autocast off for loc's device type
(`_autocast_off`): under a caller's bf16 autocast they compute exactly what they compute without it, in the
parameters' dtype (a bf16 residual x − μ − P z moves the NLL by hundreds of nats at d = 1e-5).

Checks and host synchronisation: each `log_prob` / `entropy` checks its inputs with one host synchronisation (a
single flag covering non-finite or non-positive inputs and a failed Cholesky). Inside `deferred_checks()` it makes
none: a bad input then shows up as a non-finite result, which the caller checks (the trainer's one-scalar NaN
guard per step), so a GPU queue never waits on the likelihood.

Each identity lives in one private function below whose docstring states it:
- `_capacitance_factor`: K = I + AᵀA = L Lᵀ (with one jitter retry);
- `_logdet_from_cholesky`: matrix determinant lemma, log|PPᵀ + diag d| = Σ log d_i + 2 Σ log L_jj;
- `_LowRankTerms`: sum-of-squares Mahalanobis form and its analytic gradients;
- `_condition_lowrank`: the Schur complement of the observed block, again low-rank plus diagonal.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution, constraints

__all__ = ["LowRankNormal", "DiagonalNormal", "DENSE_COVARIANCE_LIMIT", "deferred_checks"]

DENSE_COVARIANCE_LIMIT = 8192
"""Largest D for which `covariance_matrix` builds the dense D×D matrix (8192² float32 = 256 MiB)."""

_LOG_2PI = math.log(2.0 * math.pi)

_DEFERRED = contextvars.ContextVar("sosvae_deferred_checks", default=False)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Within the block `log_prob` and `entropy` make no host synchronisation to check their inputs: a bad input
    (NaN, Inf, a variance ≤ 0, a failed Cholesky) gives a non-finite result instead of an error. For training
    loops that check their loss once per step anyway."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def _checking() -> bool:
    return not _DEFERRED.get()


# ----------------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------------
def _as_tensor(value, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, (int, float)):
        # new_full fills on the device: no host-to-device copy (torch.tensor(..., device=) makes one)
        t = (like.new_full((), float(value)) if like is not None
             else torch.tensor(float(value), dtype=torch.get_default_dtype()))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a float, got {type(value).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32 or float64), got dtype {t.dtype}")
    return t


def _diag_on(diag: torch.Tensor, loc: torch.Tensor, owner: str) -> torch.Tensor:
    """The variances ``diag`` (scalar or [..., D]) on loc's device.

    A 0-dim CPU tensor (the README's ε = ``torch.tensor(1e-5)``) with parameters elsewhere is lifted through an
    elementwise op, whose CPU scalar operand a GPU reads as a kernel argument: no copy and no host
    synchronisation (``.to(device)`` would make a blocking pageable copy at every construction). Once lifted, every
    quantity derived from it (Σ log d expanded over the batch, masked or expanded variances) is made on the device.
    Any other tensor on another device is refused here rather than deep inside a kernel.
    """
    if diag.device == loc.device:
        return diag
    if diag.dim() == 0 and diag.device.type == "cpu":
        return loc.new_zeros(()) + diag
    raise ValueError(f"{owner}: cov_diag is on {diag.device} but loc is on {loc.device}; move it to "
                     f"{loc.device} (only a 0-dim CPU scalar may stay on the CPU)")


def _same_device(t: torch.Tensor, name: str, owner: str, loc: torch.Tensor) -> torch.Tensor:
    """``t`` unchanged if it is on loc's device; else a ValueError naming it."""
    if t.device != loc.device:
        raise ValueError(f"{owner}: {name} is on {t.device} but loc is on {loc.device}; move it to {loc.device}")
    return t


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device_type`` if a caller's region enabled it (else a no-op).

    Inside an autocast region bmm / baddbmm / matmul would run in bf16 or fp16: the residual x − μ − P z and the
    Gram matrix PᵀP lose all accuracy when d is small. The likelihood, the conditional and the samples therefore
    always compute in the parameters' own dtype, whatever region the caller opened (the model's heads already
    produce float32 parameters under autocast)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _no_autocast(method: Callable) -> Callable:
    """Decorator: run a distribution method under `_autocast_off` for its loc's device type."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _autocast_off(self.loc.device.type):
            return method(self, *args, **kwargs)
    return wrapper


def _check_generator(generator: Any, loc: torch.Tensor, owner: str) -> None:
    """A ``generator`` for draws on loc's device: None, or a torch.Generator on that device type (a CPU
    generator feeding a GPU draw is an error on CUDA, and would be a host round trip if it were not)."""
    if generator is None:
        return
    if not isinstance(generator, torch._C.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != loc.device.type:
        raise ValueError(f"{owner}: generator is on {generator.device.type} but the distribution is on {loc.device}; "
                         f"use torch.Generator(device={str(loc.device)!r})")


def _same_dtype(t: torch.Tensor, name: str, owner: str, like: torch.Tensor) -> torch.Tensor:
    """``t`` unchanged if its dtype is that of the parameters ``like``; else one TypeError saying how to fix it
    (mixing float64 data with float32 parameters would silently promote or fail deep inside a kernel)."""
    if t.dtype != like.dtype:
        raise TypeError(f"{owner}: {name} has dtype {t.dtype} but the distribution's parameters are {like.dtype}; "
                        f"convert one of them, e.g. {name}.to({like.dtype})")
    return t


def _bad_items(bad: torch.Tensor, batch_shape: torch.Size) -> str:
    """Describe which batch items are flagged by `bad` (bool, batch_shape) in an error message."""
    if len(batch_shape) == 0:
        return "the (unbatched) distribution"
    idx = bad.nonzero().tolist()
    shown = [tuple(i) if len(i) > 1 else i[0] for i in idx[:10]]
    more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
    return f"batch items {shown}{more} (batch_shape {tuple(batch_shape)})"


def _flag_items(flag: torch.Tensor, batch_shape: torch.Size, event_dims: int) -> torch.Tensor:
    """bool [batch_shape]: reduce an elementwise flag over its event dims (and any sample dims)."""
    if event_dims:
        flag = flag.flatten(-event_dims).any(-1) if flag.dim() >= event_dims else flag.any()
    if flag.dim() <= len(batch_shape):
        return flag.expand(batch_shape)
    return flag.reshape(-1, *batch_shape).any(0)


def _check_values(t: torch.Tensor, name: str, owner: str, batch_shape: torch.Size, event_dims: int,
                  positive: bool = False) -> None:
    """Raise one clear ValueError when t has NaN/Inf (or, if positive, entries ≤ 0), naming batch items."""
    bad = _flag_items(~torch.isfinite(t), batch_shape, event_dims)
    if bool(bad.any()):
        raise ValueError(f"{owner}: {name} has NaN or Inf entries at {_bad_items(bad, batch_shape)}")
    if positive:
        nonpos = _flag_items(t <= 0, batch_shape, event_dims)
        if bool(nonpos.any()):
            raise ValueError(f"{owner}: {name} must be > 0 (variances), got entries ≤ 0 at "
                             f"{_bad_items(nonpos, batch_shape)}")


def _parse_diag(cov_diag: torch.Tensor, D: int, owner: str) -> tuple[torch.Tensor, torch.Size]:
    """(diag, its batch shape): a one-element cov_diag becomes a 0-dim scalar (kept scalar through all the
    algebra, so a fixed ε costs nothing per pixel); otherwise a view [..., D] of it."""
    if cov_diag.numel() == 1 and cov_diag.dim() <= 1:
        return cov_diag.reshape(()), torch.Size()
    if cov_diag.dim() == 0 or cov_diag.shape[-1] not in (1, D):
        raise ValueError(f"{owner}: cov_diag must be a scalar or broadcastable to loc [..., {D}], "
                         f"got {tuple(cov_diag.shape)}")
    return cov_diag.expand(*cov_diag.shape[:-1], D), cov_diag.shape[:-1]


def _flat_batch(t: torch.Tensor, batch_shape: torch.Size, event: Sequence[int]) -> torch.Tensor:
    """Expand t to batch_shape + event and view it as [N, *event] (copies only if broadcasting)."""
    t = t.expand(*batch_shape, *event)
    return t.reshape(math.prod(batch_shape), *event)


def _broadcast_to_batch(lead: torch.Size, batch_shape: torch.Size,
                        error: Callable[[], str]) -> tuple[torch.Size, int]:
    """The broadcast of leading dims ``lead`` with ``batch_shape`` (= sample + batch) and the number of sample
    dims in front; ``error()`` gives the message raised when they do not broadcast (built only then: this runs
    on every log_prob)."""
    try:
        full = torch.broadcast_shapes(lead, batch_shape)
    except RuntimeError:
        raise ValueError(error()) from None
    return full, len(full) - len(batch_shape)


def _value_rows(value: torch.Tensor, batch_shape: torch.Size, D: int, owner: str):
    """Arrange a value [*sample, *batch, D] as rows [N, S, D] (N = prod(batch), S = prod(sample)).

    Extra leading dims become rows of one matrix so that many values under one distribution share one
    pass over the factor (e.g. a single PCA distribution scoring a whole data batch).
    Returns (rows, full_shape) where full_shape = sample + batch.
    """
    if value.dim() < 1 or value.shape[-1] != D:
        raise ValueError(f"{owner}: value must have shape [..., {D}] (event size D={D}), got {tuple(value.shape)}")
    full, n_sample = _broadcast_to_batch(value.shape[:-1], batch_shape,
                                         lambda: f"{owner}: value shape {tuple(value.shape)} does not broadcast with "
                                         f"batch_shape {tuple(batch_shape)} + ({D},)")
    if tuple(full[n_sample:]) != tuple(batch_shape):
        raise ValueError(f"{owner}: value shape {tuple(value.shape)} would enlarge batch_shape "
                         f"{tuple(batch_shape)}; expand the distribution first")
    v = value.expand(*full, D).reshape(-1, max(1, math.prod(batch_shape)), D)  # [S, N, D]
    return v.transpose(0, 1), full


# ----------------------------------------------------------------------------------------------------
# the identities
# ----------------------------------------------------------------------------------------------------
def _capacitance_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, failed): the Cholesky factor L (float64, lower) of the capacitance K = I_R + AᵀA = L Lᵀ, and a bool
    [N] marking the items whose factorisation failed even after the retry.

    gram: AᵀA [N, R, R] (any float dtype). K ⪰ I in exact arithmetic; rounding in a float32 Gram of a
    huge factor can still make it numerically indefinite, so failed items are factorised again with a jitter
    of 1e-10·max(diag K). Branch-free (the retry is computed for every item, with zero jitter where the first
    attempt succeeded): no host synchronisation.
    """
    K = gram.to(torch.float64)
    K = K + torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    L, info = torch.linalg.cholesky_ex(K)
    failed = info != 0
    if K.shape[-1] == 0:  # rank 0: K is empty and nothing can fail
        return L, failed
    jitter = 1e-10 * K.diagonal(dim1=-2, dim2=-1).amax(-1) * failed
    L2, info2 = torch.linalg.cholesky_ex(K + torch.diag_embed(jitter[:, None].expand(-1, K.shape[-1])))
    return torch.where(failed[:, None, None], L2, L), info2 != 0


def _raise_cholesky(failed: torch.Tensor, owner: str, batch_shape: torch.Size) -> None:
    bad = failed.reshape(batch_shape) if len(batch_shape) else failed.any()
    raise RuntimeError(f"{owner}: Cholesky of the R×R capacitance I + AᵀA failed even with jitter at "
                       f"{_bad_items(bad, batch_shape)}; the factor is too large for its dtype")


def _capacitance_cholesky(gram: torch.Tensor, owner: str, batch_shape: torch.Size) -> torch.Tensor:
    """`_capacitance_factor`'s L; a RuntimeError naming the batch items where even the retry failed."""
    L, failed = _capacitance_factor(gram)
    if bool(failed.any()):
        _raise_cholesky(failed, owner, batch_shape)
    return L


def _logdet_from_cholesky(L: torch.Tensor, log_diag_sum: torch.Tensor) -> torch.Tensor:
    """Matrix determinant lemma: log|P Pᵀ + diag d| = Σ_i log d_i + log|K| = Σ_i log d_i + 2 Σ_j log L_jj.

    L: [N, R, R] Cholesky of K = I + AᵀA; log_diag_sum: [N] (or scalar) Σ_i log d_i. Returns [N] float64.
    """
    return log_diag_sum.to(torch.float64) + 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _log_diag_sum(diag: torch.Tensor, N: int, D: int) -> torch.Tensor:
    """Σ_i log d_i accumulated in float64 ([N]); diag is a scalar tensor or [N, D]."""
    if diag.dim() == 0:
        return (D * torch.log(diag.detach().to(torch.float64))).expand(N)
    return diag.log().sum(-1, dtype=torch.float64)


def _times_small(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A @ C for A [N, D, R] and a small C [N, R, K], returned in A's memory layout.

    Decoder heads produce P as a transposed view (Pᵀ contiguous); keeping results in the same layout keeps
    the elementwise products with A that follow on the fast path.
    """
    if A.stride(-2) == 1 and not A.is_contiguous():
        return torch.bmm(C.mT, A.mT).mT
    return torch.bmm(A, C)


_CHUNK_BYTES = 4 << 20
"""Size of the reusable buffer through which weighted Gram matrices and row-wise dots are streamed on CPU."""


def _chunk_rows(P: torch.Tensor, width: int) -> int:
    """Rows per chunk so that an [N, chunk, width] buffer stays cache-sized (all rows at once on GPUs)."""
    N, D = P.shape[0], P.shape[1]
    if P.device.type != "cpu":
        return max(1, D)
    return max(1, min(D, max(128, _CHUNK_BYTES // max(1, N * width * P.element_size()))))


def _weighted_gram(P: torch.Tensor, weight: torch.Tensor | None, Y: torch.Tensor | None) -> torch.Tensor:
    """Gram matrix Bᵀ B of B = [diag(weight) P | Yᵀ], [N, R+S, R+S] (P [N, D, R], weight [N, D] or None
    for ones, Y [N, S, D]).

    With weight = d^{-1/2} this is [AᵀA, Aᵀy; yᵀA, yᵀy]. diag(weight) P is never formed: chunks of rows are
    written to one small reused buffer, so no D×R temporary is allocated (a fresh one costs page faults
    comparable to the Gram itself at full CelebA size). The buffer follows P's layout.
    """
    N, D, R = P.shape
    S = 0 if Y is None else Y.shape[1]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (P, weight, Y)):
        B = P if weight is None else P * weight.unsqueeze(-1)  # differentiable route (conditioning under autograd)
        if S:
            B = torch.cat([B, Y.mT], dim=-1)
        return torch.bmm(B.mT, B)
    c = _chunk_rows(P, R + S)
    rows = P.mT.is_contiguous() and not P.is_contiguous()  # Pᵀ contiguous: build Bᵀ by rows
    G = P.new_zeros(N, R + S, R + S)
    buf = P.new_empty(N, R + S, c) if rows else P.new_empty(N, c, R + S)
    for s in range(0, D, c):
        e = min(D, s + c)
        if rows:
            b = buf[:, :, :e - s]
            if weight is None:
                b[:, :R].copy_(P.mT[:, :, s:e])
            else:
                torch.mul(P.mT[:, :, s:e], weight[:, None, s:e], out=b[:, :R])
            if S:
                b[:, R:].copy_(Y[:, :, s:e])
            G.baddbmm_(b, b.mT)
        else:
            b = buf[:, :e - s]
            if weight is None:
                b[..., :R].copy_(P[:, s:e])
            else:
                torch.mul(P[:, s:e], weight[:, s:e, None], out=b[..., :R])
            if S:
                b[..., R:].copy_(Y[:, :, s:e].mT)
            G.baddbmm_(b.mT, b)
    return G


def _row_dots(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """[N, D] row-wise dot products Σ_j U_ij V_ij of two [N, D, R] tensors, chunk by chunk (no D×R temporary)."""
    N, D, R = U.shape
    c = _chunk_rows(U, R)
    out = U.new_empty(N, D)
    for s in range(0, D, c):
        e = min(D, s + c)
        out[:, s:e] = (U[:, s:e] * V[:, s:e]).sum(-1)
    return out


class _LowRankTerms(torch.autograd.Function):
    """Mahalanobis terms and log-determinant of N(loc, P Pᵀ + diag d), with an analytic backward.

    With A = d^{-1/2} ⊙ P, y = d^{-1/2} ⊙ (x − loc), K = I + AᵀA = L Lᵀ and z = K⁻¹ Aᵀ y:

        (x − loc)ᵀ Σ⁻¹ (x − loc) = ‖y − A z‖² + ‖z‖²     (sum of squares: no cancellation when d is tiny)
        log|Σ| = Σ log d_i + 2 Σ log L_jj                 (matrix determinant lemma)

    Gradients (w = Σ⁻¹(x − loc) = d^{-1/2} ⊙ (y − A z), and Pᵀw = z):
        ∂maha/∂x = 2w,  ∂maha/∂P = −2 w zᵀ,  ∂maha/∂d_i = −w_i²,
        ∂logdet/∂P = 2 Σ⁻¹P = 2 (P/d) K⁻¹,  ∂logdet/∂d_i = (Σ⁻¹)_ii = (1 − a_iᵀK⁻¹a_i)/d_i,
        and for a scalar d: Σ_i (1 − a_iᵀK⁻¹a_i) = D − R + tr K⁻¹ (no pass over the factor).

    Inputs: loc [N, D], factor [N, D, R], diag [] (scalar) or [N, D], value [N, S, D] or None (S = 0).
    Outputs: maha [N, S], logdet [N] (float64, so that their sum keeps float32 inputs accurate),
    L [N, R, R] float64 (not differentiable). batch_shape only names batch items in error messages.

    The backward is analytic and not itself differentiable (no double backward).
    Cost: the forward reads the factor once for the Gram matrix (with Aᵀy folded in when d is per-pixel,
    see `_weighted_gram`; a scalar d is applied in the R×R domain, Aᵀy is then one matrix-vector product)
    and once more for the residual x − loc − P z; the backward reads it once for P K⁻¹ (its only O(D·R²)
    step, whose result becomes the factor's gradient in place) and adds a rank-S term. No D×R temporary
    is allocated besides that gradient. Values are laid out as rows [N, S, D] so the matrix-vector
    products stream the factor contiguously.
    """

    @staticmethod
    def forward(ctx, loc, factor, diag, value, batch_shape):
        N, D, R = factor.shape
        S = 0 if value is None else value.shape[1]
        scalar = diag.dim() == 0
        dtype = factor.dtype
        X = None if value is None else value - loc.unsqueeze(1)  # x − loc, [N, S, D]
        if scalar:
            inv_d64 = 1.0 / diag.to(torch.float64)
            # [PᵀP, Pᵀ(x − loc); ·, ·] in one streaming pass; the scale 1/d is applied in the R×R domain
            gram = _weighted_gram(factor, None, X) if S else torch.bmm(factor.mT, factor)
            gAA = gram[:, :R, :R].to(torch.float64) * inv_d64
            if S:
                AtY = gram[:, R:, :R].to(torch.float64) * inv_d64  # (Aᵀy)ᵀ = (x − loc)ᵀ P / d, [N, S, R]
        else:
            rs = diag.rsqrt()  # [N, D]
            gram = _weighted_gram(factor, rs, X * rs.unsqueeze(1) if S else None)  # [AᵀA, Aᵀy; ·, ·]
            gAA = gram[:, :R, :R].to(torch.float64)
            if S:
                AtY = gram[:, R:, :R].to(torch.float64)
        L, failed = _capacitance_factor(gAA)
        if _checking():  # one host synchronisation for every check
            bad = ~torch.isfinite(gram).all()
            if scalar:
                bad = bad | ~(torch.isfinite(diag) & (diag > 0))
            if S:
                bad = bad | ~torch.isfinite(AtY).all()
            bad_input, bad_cholesky = torch.stack([bad, failed.any()]).tolist()
            if bad_input:
                raise _NonFinite()
            if bad_cholesky:
                _raise_cholesky(failed, "LowRankNormal", batch_shape)
        logdet = _logdet_from_cholesky(L, _log_diag_sum(diag, N, D))
        if S:
            Z = torch.cholesky_solve(AtY.mT, L)  # [N, R, S] float64
            r = torch.baddbmm(X, Z.mT.to(dtype), factor.mT, alpha=-1.0)  # x − loc − P z = d^{1/2}(y − A z)
            w = r / (diag if scalar else diag.unsqueeze(1))  # Σ⁻¹(x − loc)
            maha = (r * w).sum(-1, dtype=torch.float64) + Z.square().sum(-2)  # ‖y − Az‖² + ‖z‖²
        else:
            Z = w = None
            maha = logdet.new_zeros(N, 0)
        ctx.save_for_backward(factor, diag, L, Z, w)
        ctx.mark_non_differentiable(L)
        return maha, logdet, L

    @staticmethod
    @once_differentiable
    def backward(ctx, g_maha, g_logdet, _g_L):
        # the caller may run backward inside its autocast region: the gradients are computed in P's dtype too
        with _autocast_off(ctx.saved_tensors[0].device.type):
            return _LowRankTerms._backward(ctx, g_maha, g_logdet)

    @staticmethod
    def _backward(ctx, g_maha, g_logdet):
        P, diag, L, Z, w = ctx.saved_tensors
        need_loc, need_P, need_d, need_x, _ = ctx.needs_input_grad
        N, D, R = P.shape
        S = 0 if w is None else w.shape[1]
        scalar = diag.dim() == 0
        dtype = P.dtype
        f64 = dict(dtype=torch.float64, device=P.device)
        g_l = torch.zeros(N, **f64) if g_logdet is None else g_logdet.to(torch.float64)
        g_m = None
        if S:
            g_m = torch.zeros(N, S, **f64) if g_maha is None else g_maha.to(torch.float64)
        grad_loc = grad_P = grad_d = grad_x = None

        if S and (need_loc or need_x):
            gx = w * (2.0 * g_m).to(dtype).unsqueeze(-1)  # 2 g_m w, [N, S, D]
            grad_x = gx if need_x else None
            grad_loc = -gx.sum(1) if need_loc else None

        Kinv = torch.cholesky_inverse(L)  # [N, R, R] float64, R×R only
        if scalar:
            inv_d64 = 1.0 / diag.to(torch.float64)
            if need_P:
                grad_P = _times_small(P, (Kinv * (2.0 * g_l * inv_d64)[:, None, None]).to(dtype))  # 2 g_l (P/d) K⁻¹
            if need_d:
                trace_term = D - R + Kinv.diagonal(dim1=-2, dim2=-1).sum(-1)  # Σ_i (1 − a_iᵀK⁻¹a_i)
                gd = (g_l * trace_term).sum() * inv_d64
                if S:
                    gd = gd - (g_m * w.square().sum(-1, dtype=torch.float64)).sum()
                grad_d = gd.to(dtype)
        elif need_P or need_d:
            PK = _times_small(P, Kinv.to(dtype))  # P K⁻¹, [N, D, R] (becomes grad_P in place)
            if need_d:
                q = _row_dots(PK, P) / diag  # a_iᵀ K⁻¹ a_i = (P K⁻¹ Pᵀ)_ii / d_i
                gd = (1.0 - q) * g_l.to(dtype).unsqueeze(-1) / diag
                if S:
                    gd = gd - (w.square() * g_m.to(dtype).unsqueeze(-1)).sum(1)
                grad_d = gd
            if need_P:
                grad_P = PK.mul_((2.0 * g_l).to(dtype)[:, None, None] / diag.unsqueeze(-1))  # 2 g_l (P/d) K⁻¹
        if need_P and S:
            # − 2 w diag(g_m) Zᵀ: a rank-S update of the O(D·R²) term above
            grad_P.baddbmm_(w.mT, (-2.0 * g_m.unsqueeze(-1) * Z.mT).to(dtype))
        return grad_loc, grad_P, grad_d, grad_x, None


class _NonFinite(Exception):
    """Internal signal: the Gram matrix is not finite; the caller diagnoses which input is at fault."""


# ----------------------------------------------------------------------------------------------------
# shared base
# ----------------------------------------------------------------------------------------------------
class _PixelGaussian(Distribution):
    """Common interface of the two observation models (not for direct use)."""

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    # set by subclasses
    loc: torch.Tensor
    _diag: torch.Tensor  # scalar or [..., D], variances (before conditioning)
    _observed: torch.Tensor | None  # bool [..., D] or None

    @property
    def _name(self) -> str:
        return type(self).__name__

    @property
    def D(self) -> int:
        return self.event_shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.expand(*self.batch_shape, self.D)

    @property
    def mode(self) -> torch.Tensor:
        return self.mean

    @property
    def cov_diag(self) -> torch.Tensor:
        """[..., D] diagonal variances d (0 on observed pixels of a conditional)."""
        d = self._diag.expand(*self.batch_shape, self.D)
        if self._observed is not None:
            d = d.masked_fill(self._observed, 0.0)
        return d

    @property
    def observed(self) -> torch.Tensor | None:
        """bool [..., D] mask of pixels fixed by `condition`, or None for an unconditioned distribution."""
        return self._observed

    @property
    def stddev(self) -> torch.Tensor:
        return self.variance.sqrt()

    def _n_free(self) -> torch.Tensor | int:
        """Number of scored (unobserved) pixels: D, or [...] for a conditional."""
        if self._observed is None:
            return self.D
        return self.D - self._observed.sum(-1, dtype=torch.float64)

    def _checked_diag(self) -> torch.Tensor:
        """The variances d (scalar or [..., D]) after one check, cached, that they are finite and > 0: the same
        validation (and message) as `log_prob`, for the methods that use d without scoring anything."""
        if not getattr(self, "_diag_ok", False):
            d = self._diag
            _check_values(d.expand(*self.batch_shape, self.D) if d.dim() else d, "cov_diag", self._name,
                          self.batch_shape, 1 if d.dim() else 0, positive=True)
            self._diag_ok = True
        return self._diag

    def _check_index(self, i: Any) -> int:
        """``i`` if it is an int in [0, D) (the documented range of `covariance_row`); else an IndexError."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.D:
            raise IndexError(f"{self._name}.covariance_row: i must be an int in [0, {self.D}), got {i!r}")
        return i

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size(),
                generator: torch.Generator | None = None) -> torch.Tensor:
        """[*sample_shape, *batch, D] reparameterised draws: `from_noise` of standard normal noises drawn on loc's
        device, the diagonal noise [*sample_shape, *batch, D] first, then the factor noise [..., R]; ``generator``
        (on loc's device) makes them reproducible, None uses torch's global generator."""
        if (not isinstance(sample_shape, (tuple, list, torch.Size))
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sample_shape)):
            raise ValueError(f"{self._name}.sample: sample_shape must be a tuple of ints >= 0 (e.g. (8,) or ()), "
                             f"got {sample_shape!r}")
        _check_generator(generator, self.loc, f"{self._name}.sample")
        shape = self._extended_shape(torch.Size(sample_shape))
        like = dict(dtype=self.loc.dtype, device=self.loc.device, generator=generator)
        eps_d = torch.randn(shape, **like)
        eps_r = None
        if self.rank:
            eps_r = torch.randn(*shape[:-1], self.rank, **like)
        return self.from_noise(eps_r, eps_d)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size(),
               generator: torch.Generator | None = None) -> torch.Tensor:
        """`rsample` without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def _plus_diag_noise(self, out: torch.Tensor, diag_noise: torch.Tensor | None) -> torch.Tensor:
        """out + sqrt(d) ⊙ diag_noise (diag_noise [..., D]; None: out unchanged)."""
        if diag_noise is None:
            return out
        diag_noise = _same_dtype(_as_tensor(diag_noise, "diag_noise", self.loc), "diag_noise",
                                 f"{self._name}.from_noise", self.loc)
        self._checked_diag()
        if diag_noise.dim() < 1 or diag_noise.shape[-1] != self.D:
            raise ValueError(f"{self._name}.from_noise: diag_noise must have shape [..., D={self.D}], "
                             f"got {tuple(diag_noise.shape)}")
        return out + self.cov_diag.sqrt() * diag_noise

    def _check_condition_args(self, mask, values):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{self._name}.condition: mask must be a bool tensor [..., D], got "
                            f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
        values = _as_tensor(values, "values", self.loc)
        for name, t in (("mask", mask), ("values", values)):
            if t.dim() < 1 or t.shape[-1] != self.D:
                raise ValueError(f"{self._name}.condition: {name} must have shape [..., {self.D}], "
                                 f"got {tuple(t.shape)}")
        try:
            batch = torch.broadcast_shapes(mask.shape[:-1], values.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"{self._name}.condition: mask {tuple(mask.shape)} and values {tuple(values.shape)} "
                             f"do not broadcast with batch_shape {tuple(self.batch_shape)}") from None
        mask = mask.expand(*batch, self.D)
        values = values.to(self.loc.dtype).expand(*batch, self.D)
        bad = (mask & ~torch.isfinite(values)).any(-1)
        if bool(bad.any()):
            raise ValueError(f"{self._name}.condition: values are NaN or Inf on observed pixels at "
                             f"{_bad_items(bad if len(batch) else bad.any(), batch)}")
        return mask, values, batch


# ----------------------------------------------------------------------------------------------------
# low-rank plus diagonal
# ----------------------------------------------------------------------------------------------------
class LowRankNormal(_PixelGaussian):
    """N(loc, cov_factor cov_factorᵀ + diag(cov_diag)) over D pixels, never forming a D×D matrix.

    Args:
        loc: [..., D] mean μ.
        cov_factor: [..., D, R] factor P (R may be 0).
        cov_diag: variances d > 0: a scalar (the paper's fixed ε = 1e-5) or anything broadcastable to loc.
            cov_factor and cov_diag must be on loc's device, except a 0-dim CPU cov_diag (lifted, see `_diag_on`).
        validate_args: True checks every parameter eagerly (finite, d > 0). None/False skip that pass;
            non-finite parameters are then still caught, for free, from the R×R Gram matrix when first used.

    batch_shape = broadcast of loc.shape[:-1], cov_factor.shape[:-2], cov_diag.shape[:-1]; event_shape = (D,).
    `condition(mask, values)` returns another LowRankNormal whose `observed` mask marks fixed pixels.
    """

    arg_constraints = {"loc": constraints.real_vector,
                       "cov_factor": constraints.independent(constraints.real, 2),
                       "cov_diag": constraints.independent(constraints.nonnegative, 1)}

    def __init__(self, loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor | float,
                 validate_args: bool | None = None, *, _observed: torch.Tensor | None = None):
        name = "LowRankNormal"
        loc = _as_tensor(loc, "loc")
        cov_factor = _as_tensor(cov_factor, "cov_factor")
        cov_diag = _as_tensor(cov_diag, "cov_diag", loc)
        if loc.dim() < 1:
            raise ValueError(f"{name}: loc must have shape [..., D] (at least 1-D), got {tuple(loc.shape)}")
        D = loc.shape[-1]
        if cov_factor.dim() < 2 or cov_factor.shape[-2] != D:
            raise ValueError(f"{name}: cov_factor must have shape [..., D={D}, R], got {tuple(cov_factor.shape)}")
        if len({loc.dtype, cov_factor.dtype, cov_diag.dtype}) != 1:
            raise TypeError(f"{name}: loc, cov_factor and cov_diag must share one dtype, got "
                            f"{loc.dtype}, {cov_factor.dtype}, {cov_diag.dtype}")
        _same_device(cov_factor, "cov_factor", name, loc)
        diag, diag_batch = _parse_diag(cov_diag, D, name)
        diag = _diag_on(diag, loc, name)
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], cov_factor.shape[:-2], diag_batch)
        except RuntimeError:
            raise ValueError(f"{name}: batch shapes of loc {tuple(loc.shape[:-1])}, cov_factor "
                             f"{tuple(cov_factor.shape[:-2])} and cov_diag {tuple(diag_batch)} do not broadcast") \
                from None
        self.loc = loc.expand(*batch_shape, D)
        self.cov_factor = cov_factor.expand(*batch_shape, D, cov_factor.shape[-1])
        self._diag = diag
        self._observed = _observed
        self._cache: dict = {}
        super().__init__(batch_shape, torch.Size([D]), validate_args=False)
        if validate_args:
            for pname, t, ev in (("loc", loc, 1), ("cov_factor", cov_factor, 2)):
                _check_values(t.expand(*batch_shape, *t.shape[-ev:]), pname, name, batch_shape, ev)
            self._checked_diag()

    # -- basic properties ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.cov_factor.shape[-1]

    @property
    def variance(self) -> torch.Tensor:
        """[..., D] Σ_ii = Σ_j P_ij² + d_i (0 on observed pixels), O(D·R)."""
        self._checked_diag()
        return self.cov_factor.square().sum(-1) + self.cov_diag

    @_no_autocast
    def covariance_row(self, i: int) -> torch.Tensor:
        """[..., D] row i of P Pᵀ + diag(d): P P_iᵀ + d_i e_i (the Σ^(i) maps of the paper's figures)."""
        D, i = self.D, self._check_index(i)
        self._checked_diag()
        P = self.cov_factor
        row = (P @ P[..., i, :].unsqueeze(-1)).squeeze(-1)
        e = torch.zeros(D, dtype=row.dtype, device=row.device)
        e[i] = 1.0
        return row + self.cov_diag[..., i:i + 1] * e

    @property
    @_no_autocast
    def covariance_matrix(self) -> torch.Tensor:
        """[..., D, D] dense P Pᵀ + diag(d); only for D ≤ DENSE_COVARIANCE_LIMIT."""
        if self.D > DENSE_COVARIANCE_LIMIT:
            raise ValueError(f"{self._name}.covariance_matrix: D={self.D} exceeds the dense limit "
                             f"{DENSE_COVARIANCE_LIMIT}; use covariance_row(i) or variance instead")
        P = self.cov_factor
        return P @ P.mT + torch.diag_embed(self.cov_diag)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        obs = None if self._observed is None else self._observed.expand(*batch_shape, self.D)
        diag = self._diag if self._diag.dim() == 0 else self._diag.expand(*batch_shape, self.D)
        return LowRankNormal(self.loc.expand(*batch_shape, self.D),
                             self.cov_factor.expand(*batch_shape, self.D, self.rank), diag, _observed=obs)

    # -- flat views for the kernels -----------------------------------------------------------------
    def _flat_params(self):
        """(loc [N, D], factor [N, D, R], diag [] or [N, D]) with observed pixels given a unit variance.

        Observed pixels of a conditional have a zero row in the factor and zero variance; giving them
        variance 1 (and a zero residual, see `_flat_value`) removes them from every term exactly.
        """
        bs, D, R = self.batch_shape, self.D, self.rank
        loc = _flat_batch(self.loc, bs, (D,))
        P = _flat_batch(self.cov_factor, bs, (D, R))
        diag = self._diag
        if self._observed is not None:
            diag = torch.where(self._observed, torch.ones((), dtype=diag.dtype, device=diag.device),
                               diag.expand(*bs, D))
        if diag.dim():
            diag = _flat_batch(diag, bs, (D,))
        return loc, P, diag

    def _diagnose(self, value: torch.Tensor | None):
        """Raise the clear error for non-finite input found through a non-finite Gram matrix."""
        bs = self.batch_shape
        _check_values(self.loc, "loc", self._name, bs, 1)
        _check_values(self.cov_factor, "cov_factor", self._name, bs, 2)
        d = self._diag if self._observed is None else self._diag.expand(*bs, self.D).masked_fill(self._observed, 1.0)
        _check_values(d.expand(*bs, self.D) if d.dim() else d, "cov_diag", self._name, bs, 1 if d.dim() else 0,
                      positive=True)
        if value is not None:
            v = value if self._observed is None else value.masked_fill(self._observed, 0.0)
            _check_values(v, "value", f"{self._name}.log_prob", bs, 1)
        raise ValueError(f"{self._name}: the Gram matrix of the factor overflowed its dtype {self.loc.dtype}")

    def _terms(self, value: torch.Tensor | None):
        """(maha [*sample, *batch] or None, logdet [*batch]) via `_LowRankTerms`; caches logdet and L."""
        loc, P, diag = self._flat_params()
        cols = full = None
        if value is not None:
            cols, full = _value_rows(value, self.batch_shape, self.D, f"{self._name}.log_prob")
            if self._observed is not None:
                obs = _flat_batch(self._observed, self.batch_shape, (self.D,)).unsqueeze(1)
                cols = torch.where(obs, loc.unsqueeze(1), cols)
        try:
            maha, logdet, L = _LowRankTerms.apply(loc, P, diag, cols, self.batch_shape)
        except _NonFinite:
            self._diagnose(value)
        logdet = logdet.reshape(self.batch_shape)
        grad_mode = torch.is_grad_enabled()
        if "logdet" not in self._cache or (grad_mode and not self._cache["logdet"][1]):
            self._cache["logdet"] = (logdet, grad_mode)
        self._cache.setdefault("tril", L)
        if value is None:
            return None, logdet
        maha = maha.mT.reshape(full)
        return maha, logdet

    @property
    @_no_autocast
    def _capacitance_tril(self) -> torch.Tensor:
        """Lazy, cached float64 Cholesky factor [N, R, R] of K = I + AᵀA (computed at most once)."""
        if "tril" not in self._cache:
            with torch.no_grad():
                self._terms(None)
        return self._cache["tril"]

    # -- densities ----------------------------------------------------------------------------------
    @_no_autocast
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """[*sample, *batch] log N(value; μ, Σ) = −½(D log 2π + log|Σ| + maha); a conditional scores only
        its unobserved pixels (observed entries of value are ignored)."""
        value = _same_dtype(_as_tensor(value, "value", self.loc), "value", f"{self._name}.log_prob", self.loc)
        maha, logdet = self._terms(value)
        n = self._n_free()
        return (-0.5 * (n * _LOG_2PI + logdet + maha)).to(self.loc.dtype)

    @_no_autocast
    def entropy(self) -> torch.Tensor:
        """[*batch] ½ D (1 + log 2π) + ½ log|Σ| (over unobserved pixels for a conditional)."""
        cached = self._cache.get("logdet")
        if cached is not None and (cached[1] or not torch.is_grad_enabled()):
            logdet = cached[0]
        else:
            _, logdet = self._terms(None)
        n = self._n_free()
        return (0.5 * n * (1.0 + _LOG_2PI) + 0.5 * logdet).to(self.loc.dtype)

    # -- sampling -----------------------------------------------------------------------------------
    @_no_autocast
    def from_noise(self, factor_noise: torch.Tensor | None, diag_noise: torch.Tensor | None) -> torch.Tensor:
        """loc + P @ factor_noise + sqrt(d) ⊙ diag_noise, [..., D]; None means zeros.

        factor_noise [..., R] and diag_noise [..., D] broadcast against batch_shape; leading dims beyond it
        are sample dims. Observed pixels of a conditional come out exactly equal to the observed values.
        """
        out = self.mean
        if factor_noise is not None:
            factor_noise = _same_dtype(_as_tensor(factor_noise, "factor_noise", self.loc), "factor_noise",
                                       f"{self._name}.from_noise", self.loc)
            if factor_noise.dim() < 1 or factor_noise.shape[-1] != self.rank:
                raise ValueError(f"{self._name}.from_noise: factor_noise must have shape [..., R={self.rank}], "
                                 f"got {tuple(factor_noise.shape)}")
            out = out + _factor_times(self.cov_factor, factor_noise, self.batch_shape, self._name)
        out = self._plus_diag_noise(out, diag_noise)
        return out

    # -- conditioning -------------------------------------------------------------------------------
    @_no_autocast
    def condition(self, mask: torch.Tensor, values: torch.Tensor) -> "LowRankNormal":
        """The distribution of all D pixels given x = values on the pixels where mask is True.

        mask: bool [..., D] (numbers of observed pixels may differ across the batch); values: [..., D]
        (entries where mask is False are ignored and may be NaN). Returns a LowRankNormal with
        mean = values on observed pixels and the conditional mean elsewhere, factor P_U L_O^{-T}
        (zero rows on observed pixels), diagonal d_U (0 on observed pixels); see `_condition_lowrank`.
        """
        mask, values, batch = self._check_condition_args(mask, values)
        base = self if tuple(batch) == tuple(self.batch_shape) else self.expand(batch)
        return _condition_lowrank(base, mask, values)


def _factor_times(P: torch.Tensor, noise: torch.Tensor, batch_shape: torch.Size, owner: str) -> torch.Tensor:
    """P @ noise for P [*batch, D, R], noise [*sample, *batch, R] → [*sample, *batch, D].

    Sample dims are folded into the columns of one matrix product so P is never copied per sample.
    """
    D, R = P.shape[-2:]
    full, n_sample = _broadcast_to_batch(noise.shape[:-1], batch_shape,
                                         lambda: f"{owner}.from_noise: noise shape {tuple(noise.shape)} does not "
                                         f"broadcast with batch_shape {tuple(batch_shape)}")
    if n_sample == 0:
        return (P @ noise.unsqueeze(-1)).squeeze(-1)
    N = max(1, math.prod(batch_shape))
    cols = noise.expand(*full, R).reshape(-1, N, R).permute(1, 2, 0)  # [N, R, S]
    out = torch.bmm(_flat_batch(P, batch_shape, (D, R)), cols)  # [N, D, S]
    return out.permute(2, 0, 1).reshape(*full, D)


def _condition_lowrank(dist: LowRankNormal, mask: torch.Tensor, values: torch.Tensor) -> LowRankNormal:
    """Gaussian conditioning on observed pixels O (Schur complement), without any m×m matrix.

    With A = d^{-1/2} ⊙ P, y = d^{-1/2} ⊙ (values − μ), A_O, y_O their rows on O and
    K_O = I + A_OᵀA_O = L_O L_Oᵀ, z_O = K_O⁻¹ A_Oᵀ y_O (one step of iterative refinement):

        mean_U = μ_U + P_U z_O,   Cov_U = Σ_UU − Σ_UO Σ_OO⁻¹ Σ_OU = P_U K_O⁻¹ P_Uᵀ + diag(d_U),

    so the conditional is low-rank plus diagonal with factor P_U L_O^{-T} (zero rows on O), diagonal d_U
    (0 on O) and mean = values on O. Masks are applied by multiplication (where), never by indexing, so
    every batch item may observe a different number of pixels. Pixels observed earlier (a conditional of
    a conditional) already have zero factor rows and keep their values.
    """
    bs, D, R = dist.batch_shape, dist.D, dist.rank
    loc, P, diag = dist._flat_params()
    N, dtype = P.shape[0], P.dtype
    m = _flat_batch(mask, bs, (D,))
    v = _flat_batch(values, bs, (D,))
    prev = None if dist._observed is None else _flat_batch(dist._observed, bs, (D,))
    new = m if prev is None else m & ~prev
    zero = torch.zeros((), dtype=dtype, device=P.device)
    w_O = torch.where(new, diag.rsqrt().expand(N, D), zero)  # d^{-1/2} on newly observed pixels, else 0
    X_O = torch.where(new, v - loc, zero).unsqueeze(1)  # values − μ on O, [N, 1, D] (rows: fast products)
    G = _weighted_gram(P, w_O, X_O * w_O.unsqueeze(1))  # [A_OᵀA_O, A_Oᵀy_O; ·, ·] with A_O = diag(w_O) P
    gram, AtY = G[:, :R, :R], G[:, R:, :R]
    if not bool(torch.isfinite(G).all()):
        dist._diagnose(None)
    L = _capacitance_cholesky(gram, f"{dist._name}.condition", bs)
    z = torch.cholesky_solve(AtY.mT.to(torch.float64), L)  # [N, R, 1] float64
    # one refinement step on K_O z = A_Oᵀ y_O: residual A_Oᵀ(y_O − A_O z) − z, where
    # y_O − A_O z = w_O ⊙ (x_O − μ_O − P z), so only matrix-vector products with P are needed
    r = torch.baddbmm(X_O, z.mT.to(dtype), P.mT, alpha=-1.0).mul_(w_O.square().unsqueeze(1))
    g = torch.bmm(r, P).mT.to(torch.float64) - z
    z = z + torch.cholesky_solve(g, L)
    cond_mean = torch.baddbmm(loc.unsqueeze(1), z.mT.to(dtype), P.mT).squeeze(1)  # μ + P z
    new_loc = torch.where(new, v, cond_mean)
    eye = torch.eye(R, dtype=torch.float64, device=P.device).expand(N, R, R)
    L_inv_T = torch.linalg.solve_triangular(L, eye, upper=False).mT  # L_O^{-T}, R×R
    new_P = _times_small(P, L_inv_T.to(dtype)).mul_((~m).to(dtype).unsqueeze(-1))  # P_U L_O^{-T}, zeros on O
    observed = m if prev is None else (m | prev)
    return LowRankNormal(new_loc.reshape(*bs, D), new_P.reshape(*bs, D, R), dist._diag,
                         _observed=observed.reshape(*bs, D))


# ----------------------------------------------------------------------------------------------------
# pixel-wise independent
# ----------------------------------------------------------------------------------------------------
class DiagonalNormal(_PixelGaussian):
    """N(loc, diag(cov_diag)): the pixel-wise independent baseline, with the interface of LowRankNormal.

    Args:
        loc: [..., D] mean. cov_diag: variances > 0, a scalar or broadcastable to loc, on loc's device (a 0-dim
            CPU scalar is lifted there, see `_diag_on`).
        validate_args: True checks the parameters eagerly (finite, variances > 0).
    cov_factor is an empty [..., D, 0] tensor and rank == 0. Conditioning sets observed pixels to their
    values with variance 0 and leaves unobserved pixels unchanged.
    """

    arg_constraints = {"loc": constraints.real_vector,
                       "cov_diag": constraints.independent(constraints.nonnegative, 1)}

    def __init__(self, loc: torch.Tensor, cov_diag: torch.Tensor | float, validate_args: bool | None = None, *,
                 _observed: torch.Tensor | None = None):
        name = "DiagonalNormal"
        loc = _as_tensor(loc, "loc")
        cov_diag = _as_tensor(cov_diag, "cov_diag", loc)
        if loc.dim() < 1:
            raise ValueError(f"{name}: loc must have shape [..., D] (at least 1-D), got {tuple(loc.shape)}")
        D = loc.shape[-1]
        if loc.dtype != cov_diag.dtype:
            raise TypeError(f"{name}: loc and cov_diag must share one dtype, got {loc.dtype}, {cov_diag.dtype}")
        diag, diag_batch = _parse_diag(cov_diag, D, name)
        diag = _diag_on(diag, loc, name)
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], diag_batch)
        except RuntimeError:
            raise ValueError(f"{name}: batch shapes of loc {tuple(loc.shape[:-1])} and cov_diag "
                             f"{tuple(diag_batch)} do not broadcast") from None
        self.loc = loc.expand(*batch_shape, D)
        self._diag = diag
        self._observed = _observed
        super().__init__(batch_shape, torch.Size([D]), validate_args=False)
        if validate_args:
            _check_values(self.loc, "loc", name, batch_shape, 1)
            self._checked_diag()

    @property
    def rank(self) -> int:
        return 0

    @property
    def cov_factor(self) -> torch.Tensor:
        """[..., D, 0] empty factor (rank 0)."""
        return self.loc.new_zeros(*self.batch_shape, self.D, 0)

    @property
    def variance(self) -> torch.Tensor:
        self._checked_diag()
        return self.cov_diag

    @_no_autocast
    def covariance_row(self, i: int) -> torch.Tensor:
        """[..., D] d_i e_i."""
        D, i = self.D, self._check_index(i)
        self._checked_diag()
        row = torch.zeros(*self.batch_shape, D, dtype=self.loc.dtype, device=self.loc.device)
        row[..., i] = self.cov_diag[..., i]
        return row

    @property
    @_no_autocast
    def covariance_matrix(self) -> torch.Tensor:
        if self.D > DENSE_COVARIANCE_LIMIT:
            raise ValueError(f"{self._name}.covariance_matrix: D={self.D} exceeds the dense limit "
                             f"{DENSE_COVARIANCE_LIMIT}; use covariance_row(i) or variance instead")
        return torch.diag_embed(self.cov_diag)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        obs = None if self._observed is None else self._observed.expand(*batch_shape, self.D)
        diag = self._diag if self._diag.dim() == 0 else self._diag.expand(*batch_shape, self.D)
        return DiagonalNormal(self.loc.expand(*batch_shape, self.D), diag, _observed=obs)

    def _free_diag(self) -> torch.Tensor:
        """Variances with observed pixels set to 1 (log 1 = 0 and their residual is zeroed)."""
        d = self._diag
        if self._observed is not None:
            d = d.expand(*self.batch_shape, self.D).masked_fill(self._observed, 1.0)
        return d

    def _logdet(self, d: torch.Tensor) -> torch.Tensor:
        """log|diag d| = Σ_i log d_i, accumulated in float64 ([*batch])."""
        if d.dim() == 0:
            return (self.D * torch.log(d.to(torch.float64))).expand(self.batch_shape)
        return d.log().sum(-1, dtype=torch.float64).expand(self.batch_shape)

    @_no_autocast
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """[*sample, *batch] −½ Σ_i (log 2π + log d_i + (x_i − μ_i)²/d_i), over unobserved pixels."""
        value = _same_dtype(_as_tensor(value, "value", self.loc), "value", f"{self._name}.log_prob", self.loc)
        if value.dim() < 1 or value.shape[-1] != self.D:
            raise ValueError(f"{self._name}.log_prob: value must have shape [..., {self.D}], got {tuple(value.shape)}")
        d = self._free_diag()
        diff = value - self.loc
        if self._observed is not None:
            diff = diff.masked_fill(self._observed, 0.0)
        maha = (diff.square() / d).sum(-1, dtype=torch.float64)
        if _checking():
            self._checked_diag()  # log d of a negative variance would be a silent NaN
        if _checking() and not bool(torch.isfinite(maha).all()):
            _check_values(self.loc, "loc", self._name, self.batch_shape, 1)
            _check_values(d.expand(*self.batch_shape, self.D) if d.dim() else d, "cov_diag", self._name,
                          self.batch_shape, 1 if d.dim() else 0, positive=True)
            raise ValueError(f"{self._name}.log_prob: value has NaN or Inf entries")
        return (-0.5 * (self._n_free() * _LOG_2PI + self._logdet(d) + maha)).to(self.loc.dtype)

    @_no_autocast
    def entropy(self) -> torch.Tensor:
        """[*batch] ½ Σ_i (1 + log 2π + log d_i) over unobserved pixels."""
        if _checking():
            self._checked_diag()
        return (0.5 * self._n_free() * (1.0 + _LOG_2PI) + 0.5 * self._logdet(self._free_diag())).to(self.loc.dtype)

    @_no_autocast
    def from_noise(self, factor_noise: torch.Tensor | None, diag_noise: torch.Tensor | None) -> torch.Tensor:
        """loc + sqrt(d) ⊙ diag_noise ([..., D]); factor_noise must be None or [..., 0]."""
        if factor_noise is not None and (factor_noise.dim() < 1 or factor_noise.shape[-1] != 0):
            raise ValueError(f"{self._name}.from_noise: factor_noise must be None or [..., 0] (rank 0), "
                             f"got {tuple(factor_noise.shape)}")
        out = self.mean
        out = self._plus_diag_noise(out, diag_noise)
        if factor_noise is not None and factor_noise.dim() > 1:
            out = out.expand(*torch.broadcast_shapes(out.shape[:-1], factor_noise.shape[:-1]), self.D)
        return out

    @_no_autocast
    def condition(self, mask: torch.Tensor, values: torch.Tensor) -> "DiagonalNormal":
        """Observed pixels: mean = values, variance 0; unobserved pixels unchanged (independence)."""
        mask, values, batch = self._check_condition_args(mask, values)
        loc = torch.where(mask, values, self.loc)
        observed = mask if self._observed is None else (mask | self._observed)
        diag = self._diag if self._diag.dim() == 0 else self._diag.expand(*batch, self.D)
        return DiagonalNormal(loc, diag, _observed=observed)
