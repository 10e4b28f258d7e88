"""The SOS-VAE model: encoder → decoder trunk → observation head (Langley et al., TMLR 2022, §3).

q(z|x) = N(m(x), diag(s(x)²)), p(z) = N(0, I), p(x|z) = N(μ(z), P(z)P(z)ᵀ + diag(d(z))) over the flattened
image (or the pixel-wise independent baseline). The model only computes; the objective lives in
`sosvae_lib.objectives` and the loop in `sosvae_lib.train`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from .config import ARCHS, TrainConfig, check_rank
from .encoder import AuthorsEncoder, Encoder
from .heads import head_spec, make_head
from .trunk import AuthorsDecoderTrunk, DecoderTrunk


class VAE(nn.Module):
    """Variational autoencoder with a structured (or pixel-wise) Gaussian observation model.

    Args:
        image_shape: (C, H, W) of the images.
        latent: size of z.
        head: a registered head (`sosvae_lib.heads.head_names`): ``lowrank`` | ``lowrank-diag`` | ``diagonal`` | ...
        rank: R, columns of P (ignored by a head without a factor, e.g. ``diagonal``); 1 <= R < D.
        width, levels, max_width: trunk and encoder widths (see `sosvae_lib.trunk.stage_widths`).
        arch: ``resnet`` (this project's light ResNet, `sosvae_lib.trunk.DecoderTrunk`) or ``authors`` (the
            authors' network, `sosvae_lib.trunk.AuthorsDecoderTrunk`; theirs is width 64, levels 3, max_width 512).
            Both end in ``width`` channels at full resolution, so the heads are the same.
        eps: the fixed diagonal of ``lowrank`` / the variance floor of the learned-diagonal heads.
        init_var: initial variance of learned-diagonal heads.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent: int = 32, head: str = "lowrank", rank: int = 25,
                 width: int = 16, levels: int = 3, max_width: int = 512, eps: float = 1e-5, init_var: float = 0.01,
                 arch: str = "resnet"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: must be one of {', '.join(ARCHS)}, got {arch!r}")
        c, h, w = (int(s) for s in image_shape)
        if min(h, w) < 2 ** levels:
            raise ValueError(f"image_size: {h}x{w} is too small for a trunk with levels={levels} "
                             f"(needs at least {2 ** levels} pixels per side); use a larger image_size or fewer levels")
        if head_spec(head).has_factor:  # a registered head; R is a dimension of the model only with a factor
            check_rank(rank, c * h * w)
        self.image_shape = (c, h, w)
        self.latent_dim = latent
        self.head_name = head
        self.arch = arch
        encoder, trunk = (Encoder, DecoderTrunk) if arch == "resnet" else (AuthorsEncoder, AuthorsDecoderTrunk)
        self.encoder = encoder(c, latent, width, levels, max_width)
        self.trunk = trunk((h, w), latent, width, levels, max_width)
        self.head = make_head(head, self.trunk.out_channels, c, rank, eps, init_var)
        self.rank = self.head.rank
        # Mixed precision (set by the trainer from TrainConfig.precision): the encoder and the trunk run under
        # autocast to this dtype; their outputs are cast to float32, so the heads, the likelihood and the KL always
        # compute in float32 (with d = 1e-5 a half-precision residual would be meaningless).
        self.autocast_dtype: torch.dtype | None = None

    @property
    def dim(self) -> int:
        """D = C·H·W."""
        c, h, w = self.image_shape
        return c * h * w

    def _autocast(self, t: torch.Tensor, enabled: bool = True):
        dtype = self.autocast_dtype
        if not torch.amp.is_autocast_available(t.device.type):  # e.g. "meta" (step-cost counting): nothing to cast
            return contextlib.nullcontext()
        return torch.autocast(t.device.type, dtype=dtype or torch.bfloat16, enabled=enabled and dtype is not None)

    def encode(self, x: torch.Tensor) -> Normal:
        """x [B, C, H, W] → q(z|x), a float32 Normal with batch shape [B, latent]. Its arguments are not validated
        (a host synchronisation per call; the trainer checks its loss once per step instead)."""
        with self._autocast(x):
            mean, std = self.encoder(x)
        return Normal(mean.float(), std.float(), validate_args=False)

    def decode(self, z: torch.Tensor):
        """z [B, latent] → p(x|z): LowRankNormal or DiagonalNormal over D = C·H·W (flattened channel-first),
        with float32 parameters whatever `autocast_dtype` is."""
        with self._autocast(z):
            features = self.trunk(z)
        with self._autocast(z, enabled=False):  # also outside an autocast region the caller may have opened
            return self.head(features.float())

    def prior(self, n: int, device: torch.device | str | None = None) -> Normal:
        """p(z) = N(0, I) with batch shape [n, latent]."""
        device = device if device is not None else next(self.parameters()).device
        zeros = torch.zeros(n, self.latent_dim, device=device)
        return Normal(zeros, torch.ones_like(zeros))

    def forward(self, x: torch.Tensor) -> dict:
        """One reparameterised pass. x [B, C, H, W] → dict(nll [B], kl [B], obs, posterior, z [B, latent]).

        nll = −log p(x | z) summed over the D pixels (nats); kl = KL(q(z|x) ‖ N(0, I)) summed over latents.
        """
        posterior = self.encode(x)
        z = posterior.rsample()
        obs = self.decode(z)
        nll = -obs.log_prob(x.reshape(x.shape[0], -1))
        kl = kl_divergence(posterior, Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False)).sum(-1)
        return dict(nll=nll, kl=kl, obs=obs, posterior=posterior, z=z)

    def noise_parameters(self) -> list[nn.Parameter]:
        """Parameters of the observation covariance (frozen during mean pre-training)."""
        return self.head.noise_parameters()


def build_model(config: TrainConfig, image_shape: tuple[int, int, int]) -> VAE:
    """The VAE a configuration describes, for images of shape (C, H, W)."""
    return VAE(image_shape, latent=config.latent, head=config.head, rank=config.rank, width=config.width,
               levels=config.levels, max_width=config.max_width, eps=config.eps, init_var=config.init_var,
               arch=config.arch)
