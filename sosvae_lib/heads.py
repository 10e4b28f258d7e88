"""Observation heads: trunk features → a Gaussian over the whole flattened image (Langley et al., TMLR 2022, §3).

p(x | z) = N(μ, P Pᵀ + diag(d)),  x ∈ R^D, D = C·H·W flattened channel-first.

- ``lowrank`` (the paper's): μ and P from 1×1 convolutions; d fixed at ε = 1e-5.
- ``lowrank-diag``: as ``lowrank`` with a learned diagonal d = softplus(·) + ε.
- ``diagonal``: the pixel-wise independent baseline, μ and a learned per-pixel variance softplus(·) + ε.

Initialisation (the authors' code): μ-conv weights ~ N(0, 1e-5²) with bias 0.5 (a mid-grey start); P-conv weights
~ N(0, 1e-5²) with bias 0 (P starts near zero). Learned variances start at ``init_var`` (weights ~ N(0, 1e-5²)).
The P-conv has R·C output channels; channel r·C + c is colour c of column r, so each column of P is one
C×H×W image.

The heads are registered (`register_head`): each declares whether it has a low-rank factor P, whether it learns
its diagonal, the label and line style the figures draw it with, and its place in the tables. Everything that
asks "which head is this?" asks the registry (`head_spec`, `has_factor`), so adding a head is one
`register_head` call (here or in the module that defines it) plus a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import check_bool
from .distributions import DiagonalNormal, LowRankNormal

INIT_STD = 1e-5


def _conv1x1(c_in: int, c_out: int, bias: float) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1)
    nn.init.normal_(conv.weight, 0.0, INIT_STD)
    nn.init.constant_(conv.bias, bias)
    return conv


def _softplus_inverse(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


class LowRankHead(nn.Module):
    """features [B, F, H, W] → LowRankNormal(loc [B, D], cov_factor [B, D, R], cov_diag).

    ``learn_diag=False`` (``lowrank``): cov_diag is the constant ε (a scalar buffer). ``learn_diag=True``
    (``lowrank-diag``): cov_diag [B, D] = softplus(conv(features)) + ε, starting at ``init_var``.
    """

    def __init__(self, features: int, channels: int, rank: int, eps: float = 1e-5,
                 learn_diag: bool = False, init_var: float = 0.01):
        super().__init__()
        self.channels, self.rank, self.eps = channels, rank, eps
        self.mean_conv = _conv1x1(features, channels, 0.5)
        self.factor_conv = _conv1x1(features, rank * channels, 0.0)
        self.diag_conv = _conv1x1(features, channels, _softplus_inverse(init_var - eps)) if learn_diag else None
        self.register_buffer("fixed_diag", torch.tensor(float(eps)), persistent=False)

    def noise_parameters(self) -> list[nn.Parameter]:
        """Parameters of the covariance (P and d): frozen during mean pre-training."""
        params = list(self.factor_conv.parameters())
        if self.diag_conv is not None:
            params += list(self.diag_conv.parameters())
        return params

    def distribution_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features [B, F, H, W] → (loc [B, D], cov_factor [B, D, R], cov_diag: scalar ε or [B, D])."""
        b = h.shape[0]
        loc = self.mean_conv(h).reshape(b, -1)
        # [B, R·C, H, W] → [B, R, D] → [B, D, R]: a transposed view, so Pᵀ is contiguous for the R×D GEMMs.
        factor = self.factor_conv(h).reshape(b, self.rank, -1).transpose(1, 2)
        if self.diag_conv is None:
            diag = self.fixed_diag
        else:
            diag = F.softplus(self.diag_conv(h)).reshape(b, -1) + self.eps
        return loc, factor, diag

    def forward(self, h: torch.Tensor) -> LowRankNormal:
        return LowRankNormal(*self.distribution_params(h))


class DiagonalHead(nn.Module):
    """features [B, F, H, W] → DiagonalNormal(loc [B, D], cov_diag [B, D]): the pixel-wise independent baseline."""

    def __init__(self, features: int, channels: int, eps: float = 1e-5, init_var: float = 0.01):
        super().__init__()
        self.channels, self.rank, self.eps = channels, 0, eps
        self.mean_conv = _conv1x1(features, channels, 0.5)
        self.diag_conv = _conv1x1(features, channels, _softplus_inverse(init_var - eps))

    def noise_parameters(self) -> list[nn.Parameter]:
        return list(self.diag_conv.parameters())

    def distribution_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, F, H, W] → (loc [B, D], cov_diag [B, D])."""
        b = h.shape[0]
        return self.mean_conv(h).reshape(b, -1), F.softplus(self.diag_conv(h)).reshape(b, -1) + self.eps

    def forward(self, h: torch.Tensor) -> DiagonalNormal:
        return DiagonalNormal(*self.distribution_params(h))


@dataclass(frozen=True)
class HeadSpec:
    """A registered observation head.

    ``build(features, channels, rank, eps, init_var)`` returns the module: features [B, F, H, W] → a distribution
    over the flattened image (`LowRankNormal` or `DiagonalNormal`), with attributes ``channels``, ``rank`` (R, or
    0 without a factor) and ``eps``, and a method ``noise_parameters()`` (the covariance parameters, frozen during
    mean pre-training). ``has_factor``: p(x|z) has a low-rank factor P (so ``rank`` is a model dimension that must
    satisfy 1 <= R < D, the model is calibrated, has principal directions to edit along, and is drawn against
    the rank). ``learns_diag``: the diagonal d is an output of the network (else fixed, e.g. ε). ``label``: its
    name in figure legends; ``style``: matplotlib line keywords of its curve against the rank (a head without a
    factor is a horizontal line); ``order``: its place in tables (lower first).
    """

    name: str
    build: Callable[..., nn.Module]
    has_factor: bool
    learns_diag: bool
    label: str
    style: Mapping[str, Any] = field(default_factory=dict)
    order: int = 0


_HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, build: Callable[..., nn.Module], *, has_factor: bool, learns_diag: bool,
                  label: str | None = None, style: Mapping[str, Any] | None = None,
                  order: int | None = None) -> HeadSpec:
    """Register the head ``name`` (see `HeadSpec` for the fields; ``label`` defaults to the name, ``order`` to
    after every head registered so far). A name already registered is a ValueError (`unregister_head` first)."""
    if not isinstance(name, str) or not name or name == "pca":  # "pca" names the PPCA baseline's table rows
        raise ValueError(f"name: must be a non-empty string other than 'pca', got {name!r}")
    if name in _HEADS:
        raise ValueError(f"name: head {name!r} is already registered")
    if not callable(build):
        raise TypeError(f"build: must be callable (features, channels, rank, eps, init_var) -> module, got {build!r}")
    check_bool("has_factor", has_factor)
    check_bool("learns_diag", learns_diag)
    if order is None:
        order = 1 + max((spec.order for spec in _HEADS.values()), default=-1)
    spec = HeadSpec(name, build, has_factor, learns_diag, name if label is None else str(label),
                    dict(style or {}), int(order))
    _HEADS[name] = spec
    return spec


def unregister_head(name: str) -> HeadSpec:
    """Remove the head ``name`` from the registry (a test's toy head); returns its spec."""
    head_spec(name)
    return _HEADS.pop(name)


def head_names() -> tuple[str, ...]:
    """The registered heads, in table order."""
    return tuple(sorted(_HEADS, key=lambda n: _HEADS[n].order))


def head_spec(name: str) -> HeadSpec:
    """The registered head ``name``; else ``ValueError("head: must be one of ...")``."""
    spec = _HEADS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"head: must be one of {', '.join(head_names())}, got {name!r}")
    return spec


def has_factor(model: Any) -> bool:
    """Whether a model (anything with ``head_name``, e.g. `sosvae_lib.model.VAE`), or the head called ``model``,
    has a low-rank factor P. An object without a registered ``head_name`` (a stand-in such as a PPCA fit or a test
    double) is asked for its ``rank``: a rank-0 distribution has no factor."""
    name = model if isinstance(model, str) else getattr(model, "head_name", None)
    if isinstance(model, str) or name in _HEADS:
        return head_spec(name).has_factor
    return int(getattr(model, "rank", 1)) > 0


def make_head(name: str, features: int, channels: int, rank: int, eps: float = 1e-5,
              init_var: float = 0.01) -> nn.Module:
    """The registered head called ``name`` (`head_names`: ``lowrank`` | ``lowrank-diag`` | ``diagonal`` and any
    added with `register_head`)."""
    return head_spec(name).build(features, channels, rank, eps, init_var)


def _lowrank(features: int, channels: int, rank: int, eps: float, init_var: float) -> LowRankHead:
    return LowRankHead(features, channels, rank, eps, learn_diag=False, init_var=init_var)


def _lowrank_diag(features: int, channels: int, rank: int, eps: float, init_var: float) -> LowRankHead:
    return LowRankHead(features, channels, rank, eps, learn_diag=True, init_var=init_var)


def _diagonal(features: int, channels: int, rank: int, eps: float, init_var: float) -> DiagonalHead:
    return DiagonalHead(features, channels, eps, init_var)


register_head("lowrank", _lowrank, has_factor=True, learns_diag=False, style=dict(marker="o", ls="-"), order=0)
register_head("lowrank-diag", _lowrank_diag, has_factor=True, learns_diag=True, style=dict(marker="s", ls="-."),
              order=1)
register_head("diagonal", _diagonal, has_factor=False, learns_diag=True, style=dict(ls="--", lw=1.0), order=2)
