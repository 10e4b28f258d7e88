"""ResNet encoders q(z|x) = N(m(x), diag(s(x)²)) with global pooling (Langley et al., TMLR 2022, §3).

Global pooling makes an encoder independent of the image size; the stride-2 stages match the decoder trunk's
(`sosvae_lib.trunk.stage_sizes`). `Encoder` is the ``resnet`` architecture (this project's light one);
`AuthorsEncoder` is the ``authors`` one, block for block the network of biomedia-mira/sos-vae
(``src/model/vae.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .trunk import BasicBlock, ResBlock, _groups, conv_bn_relu, stage_widths


class Encoder(nn.Module):
    """x [B, C, H, W] in [0, 1] → (mean [B, latent], std [B, latent]).

    A 3×3 stem at full resolution, ``levels`` stride-2 residual blocks, global average pooling and a linear
    layer giving the mean and the standard deviation (softplus plus 1e-4, so it never reaches 0).
    """

    def __init__(self, channels: int, latent: int, width: int, levels: int, max_width: int = 512):
        super().__init__()
        widths = stage_widths(width, levels, max_width)
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(widths[i], widths[i + 1], stride=2) for i in range(levels))
        self.out_norm = nn.GroupNorm(_groups(widths[-1]), widths[-1])
        self.fc = nn.Linear(widths[-1], 2 * latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x - 0.5)
        for block in self.blocks:
            h = block(h)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3))
        mean, raw = self.fc(h).chunk(2, dim=-1)
        return mean, F.softplus(raw) + 1e-4


class AuthorsEncoder(nn.Module):
    """The authors' encoder (``arch="authors"``): x [B, C, H, W] in [0, 1] → (mean [B, latent], std [B, latent]).

    3×3 conv → BN → ReLU to ``width`` channels and two `BasicBlock` at full resolution; per stage a stride-2
    `BasicBlock` that widens the channels and a `BasicBlock`; 1×1 conv → BN → ReLU; global *max* pooling; a linear
    layer giving the mean and the variance softplus(·) + 1e-5 (std is its square root). At the paper's setting
    (218×178, width 64, levels 3): 218×178×64 → 109×89×128 → 55×45×256 → 28×23×512 → 512.
    """

    def __init__(self, channels: int, latent: int, width: int, levels: int, max_width: int = 512):
        super().__init__()
        widths = stage_widths(width, levels, max_width)
        self.stem = conv_bn_relu(channels, widths[0], 3)
        blocks = [BasicBlock(widths[0], widths[0]), BasicBlock(widths[0], widths[0])]
        for i in range(levels):
            blocks += [BasicBlock(widths[i], widths[i + 1], stride=2), BasicBlock(widths[i + 1], widths[i + 1])]
        self.blocks = nn.Sequential(*blocks)
        self.out = conv_bn_relu(widths[-1], widths[-1], 1)
        self.fc = nn.Linear(widths[-1], 2 * latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.out(self.blocks(self.stem(x))).amax(dim=(2, 3))
        mean, raw = self.fc(h).chunk(2, dim=-1)
        return mean, (F.softplus(raw) + 1e-5).sqrt()
