"""ResNet encoder q(z|x) = N(m(x), diag(s(x)²)) with global pooling (Langley et al., TMLR 2022, §3).

Global average pooling makes the encoder independent of the image size; the stride-2 stages match the
decoder trunk's (`sosvae_lib.trunk.stage_sizes`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .trunk import ResBlock, _groups, stage_widths


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
