"""Observation heads: trunk features → a Gaussian over the whole flattened image (Langley et al., TMLR 2022, §3).

p(x | z) = N(μ, P Pᵀ + diag(d)),  x ∈ R^D, D = C·H·W flattened channel-first.

- ``lowrank`` (the paper's): μ and P from 1×1 convolutions; d fixed at ε = 1e-5.
- ``lowrank-diag``: as ``lowrank`` with a learned diagonal d = softplus(·) + ε.
- ``diagonal``: the pixel-wise independent baseline, μ and a learned per-pixel variance softplus(·) + ε.

Initialisation (the authors' code): μ-conv weights ~ N(0, 1e-5²) with bias 0.5 (a mid-grey start); P-conv weights
~ N(0, 1e-5²) with bias 0 (P starts near zero). Learned variances start at ``init_var`` (weights ~ N(0, 1e-5²)).
The P-conv has R·C output channels; channel r·C + c is colour c of column r, so each column of P is one
C×H×W image.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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


def make_head(name: str, features: int, channels: int, rank: int, eps: float = 1e-5,
              init_var: float = 0.01) -> nn.Module:
    """The head called ``name`` (``lowrank`` | ``lowrank-diag`` | ``diagonal``)."""
    if name == "lowrank":
        return LowRankHead(features, channels, rank, eps, learn_diag=False, init_var=init_var)
    if name == "lowrank-diag":
        return LowRankHead(features, channels, rank, eps, learn_diag=True, init_var=init_var)
    if name == "diagonal":
        return DiagonalHead(features, channels, eps, init_var)
    raise ValueError(f"head: must be one of lowrank, lowrank-diag, diagonal, got {name!r}")
