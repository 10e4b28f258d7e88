"""ResNet blocks and the decoder trunk shared by every observation head (Langley et al., TMLR 2022, §3).

The same trunk feeds the low-rank head and the pixel-wise baseline, so comparisons between observation models
are fair. It works at any image size (28×28, 32×32, 64×64, 218×178, ...): the encoder halves the resolution
``levels`` times with rounding up, and the trunk retraces exactly those sizes on the way back up (nearest
upsampling to the recorded size, then a residual block), ending in a feature map at full resolution.

Two architectures share these sizes (``TrainConfig.arch``):

- ``resnet`` (`ResBlock`, `DecoderTrunk`): this project's light pre-activation ResNet (GroupNorm, SiLU, one block
  per stage, a linear map from z).
- ``authors`` (`BasicBlock`, `AuthorsDecoderTrunk`): the authors' network block for block (biomedia-mira/sos-vae,
  ``src/model/vae.py``): post-activation blocks with BatchNorm and ReLU, two blocks per stage, a transposed
  convolution from z to the coarsest map and stride-2 transposed convolutions upwards.
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


def output_paddings(sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``output_padding`` of the stride-2 transposed convolution from ``sizes[i + 1]`` back to ``sizes[i]``, per
    dimension: a 3×3 (padding 1) or 1×1 transposed convolution with stride 2 gives 2·s − 1 + p, so p is 1 where the
    target side is even and 0 where it is odd (218×178: (1, 1); 109×89 and 55×45: (0, 0))."""
    return [(h - 2 * hn + 1, w - 2 * wn + 1) for (h, w), (hn, wn) in zip(sizes[:-1], sizes[1:])]


class BasicBlock(nn.Module):
    """The authors' residual block (post-activation, He et al. 2016): x ↦ relu(skip(x) + bn(conv(relu(bn(conv(x)))))).

    ``stride=2`` halves the resolution (3×3 convolution, padding 1, rounding up). ``output_padding`` (an int or an
    (h, w) pair) instead makes the first convolution and the skip stride-2 *transposed* convolutions that double
    it, to 2·s − 1 + output_padding per side. The skip is a 1×1 (transposed) convolution whenever the channels or
    the resolution change. BatchNorm as the authors have it: the output depends on the batch in training mode,
    and on the running statistics in ``eval()`` mode.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, output_padding: int | tuple[int, int] | None = None):
        super().__init__()
        if output_padding is None:
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
            change = c_in != c_out or stride != 1
            self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if change else nn.Identity()
        else:
            self.conv1 = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=output_padding)
            self.skip = nn.ConvTranspose2d(c_in, c_out, 1, stride=2, output_padding=output_padding)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(self.skip(x) + h)


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """conv (``kernel``×``kernel``, same padding) → BatchNorm → ReLU: the authors' stem and 1×1 transitions."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU())


class AuthorsDecoderTrunk(nn.Module):
    """The authors' decoder (``arch="authors"``): z [B, latent] → features [B, width, H, W] at full resolution.

    z, seen as a [B, latent, 1, 1] map, goes through a transposed convolution whose kernel is the coarsest size
    (so it outputs [B, latent, *sizes[-1]]), then 1×1 conv → BN → ReLU to ``widths[-1]`` channels and one
    `BasicBlock`. Each stage then doubles the resolution with a transposed `BasicBlock` that narrows the channels
    (retracing the encoder's sizes exactly, see `output_paddings`) followed by a `BasicBlock`; the full-resolution
    stage has one more `BasicBlock`, and a final 1×1 conv → BN → ReLU feeds the observation head. At the paper's
    setting (218×178, width 64, levels 3): 128 → 28×23×512 → 55×45×256 → 109×89×128 → 218×178×64. Every size
    the encoder accepts works; in training mode a batch of one needs a coarsest map larger than 1×1 (BatchNorm).
    """

    def __init__(self, image_hw: tuple[int, int], latent: int, width: int, levels: int, max_width: int = 512):
        super().__init__()
        self.widths = stage_widths(width, levels, max_width)
        self.sizes = stage_sizes(image_hw[0], image_hw[1], levels)
        pads = output_paddings(self.sizes)
        self.latent_map = nn.ConvTranspose2d(latent, latent, kernel_size=self.sizes[-1])
        self.inp = conv_bn_relu(latent, self.widths[-1], 1)
        blocks = [BasicBlock(self.widths[-1], self.widths[-1])]
        for i in reversed(range(levels)):
            blocks += [BasicBlock(self.widths[i + 1], self.widths[i], output_padding=pads[i]),
                       BasicBlock(self.widths[i], self.widths[i])]
        blocks.append(BasicBlock(self.widths[0], self.widths[0]))
        self.blocks = nn.Sequential(*blocks)
        self.out = conv_bn_relu(self.widths[0], self.widths[0], 1)
        self.out_channels = self.widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.latent_map(z[:, :, None, None])
        return self.out(self.blocks(self.inp(h)))
