"""ResNet blocks and the decoder trunk shared by every observation head (Langley et al., TMLR 2022, §3).

The same trunk feeds the low-rank head and the pixel-wise baseline, so comparisons between observation models
are fair. It works at any image size (28×28, 32×32, 64×64, 218×178, ...): the encoder halves the resolution
``levels`` times with rounding up, and the trunk retraces exactly those sizes on the way back up (nearest
upsampling to the recorded size, then a residual block), ending in a feature map at full resolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def stage_widths(width: int, levels: int, max_width: int = 512) -> list[int]:
    """Channels of the full-resolution stage and of each of the ``levels`` downsampled stages:
    ``[width, 2·width, ..., width·2^levels]`` capped at ``max_width`` (length ``levels + 1``)."""
    return [min(width * 2 ** i, max_width) for i in range(levels + 1)]


def stage_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Spatial sizes ``[(H, W), (⌈H/2⌉, ⌈W/2⌉), ...]`` of the ``levels + 1`` stages (stride-2, padding-1 convs)."""
    sizes = [(height, width)]
    for _ in range(levels):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """Pre-activation residual block: x ↦ skip(x) + conv(act(norm(conv(act(norm(x)))))).

    ``stride=2`` halves the resolution (with rounding up); a 1×1 convolution on the skip path matches channels
    and stride when they change. GroupNorm (not BatchNorm) keeps every process of a DDP run and every batch
    size computing the same function.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (c_in != c_out or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DecoderTrunk(nn.Module):
    """z [B, latent] → features [B, width, H, W] at full resolution.

    A linear layer maps z to the coarsest feature map ``[B, widths[-1], *sizes[-1]]``; each stage then upsamples
    (nearest) to the next recorded size and applies a residual block that narrows the channels; a final
    norm + SiLU leaves features ready for the 1×1 convolutions of an observation head.
    """

    def __init__(self, image_hw: tuple[int, int], latent: int, width: int, levels: int, max_width: int = 512):
        super().__init__()
        self.widths = stage_widths(width, levels, max_width)
        self.sizes = stage_sizes(image_hw[0], image_hw[1], levels)
        h0, w0 = self.sizes[-1]
        self.fc = nn.Linear(latent, self.widths[-1] * h0 * w0)
        self.blocks = nn.ModuleList(
            ResBlock(self.widths[i + 1], self.widths[i]) for i in reversed(range(levels))
        )
        self.out_norm = nn.GroupNorm(_groups(self.widths[0]), self.widths[0])
        self.out_channels = self.widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h0, w0 = self.sizes[-1]
        h = self.fc(z).view(z.shape[0], self.widths[-1], h0, w0)
        for block, size in zip(self.blocks, reversed(self.sizes[:-1])):
            h = block(F.interpolate(h, size=size, mode="nearest"))
        return F.silu(self.out_norm(h))
