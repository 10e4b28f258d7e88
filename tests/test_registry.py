"""The head and dataset registries: a toy head and a toy dataset added from this file alone (no library file
edited) are validated, trained and evaluated end to end like the built-in ones, and leave no trace when removed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sosvae_lib import config as config_mod
from sosvae_lib import data, editing, heads, plots, tables
from sosvae_lib.config import EvalConfig, TrainConfig
from sosvae_lib.distributions import LowRankNormal

TOY_HEAD, TOY_DATA = "toy-pixel-eps", "toy-blobs"


class PixelEpsHead(nn.Module):
    """``lowrank`` with a fixed per-pixel diagonal d_i = ε·(1 + i/(D−1)) (from ε to 2ε across the image)."""

    def __init__(self, features: int, channels: int, rank: int, eps: float, init_var: float):
        super().__init__()
        self.channels, self.rank, self.eps = channels, rank, eps
        self.mean_conv = nn.Conv2d(features, channels, 1)
        self.factor_conv = nn.Conv2d(features, rank * channels, 1)
        nn.init.normal_(self.factor_conv.weight, 0.0, 1e-3)

    def noise_parameters(self) -> list[nn.Parameter]:
        return list(self.factor_conv.parameters())

    def forward(self, h: torch.Tensor) -> LowRankNormal:
        b = h.shape[0]
        loc = torch.sigmoid(self.mean_conv(h)).reshape(b, -1)
        factor = self.factor_conv(h).reshape(b, self.rank, -1).transpose(1, 2)
        diag = self.eps * torch.linspace(1.0, 2.0, loc.shape[1], device=h.device)
        return LowRankNormal(loc, factor, diag)


def _blobs(split: str, hw, root, flip: bool, opts: dict) -> data.ImageDataset:
    """Tiny deterministic grey images: a bright disc at a random place per image, on a dark ramp (uint8)."""
    h, w = hw or (16, 16)
    n = {"train": 40, "val": 16, "test": 16}[split]
    n = min(n, opts["max_items"] or n)
    g = torch.Generator().manual_seed(("train", "val", "test").index(split) + 1000 * opts["seed"])
    centres = torch.rand(n, 2, generator=g) * torch.tensor([h, w])
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist2 = (ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2
    img = 0.2 * xs[None] / w + 0.7 * (dist2 < (min(h, w) / 4) ** 2)
    return data.ImageDataset(TOY_DATA, split, (img * 255).round().to(torch.uint8)[:, None], flip=flip)


@pytest.fixture
def toys():
    heads.register_head(TOY_HEAD, PixelEpsHead, has_factor=True, learns_diag=False, label="pixel ε",
                        style=dict(marker="d", ls="--"))
    data.register_dataset(TOY_DATA, _blobs, channels=1, default_size=16, root="none", options={"seed": 0})
    try:
        yield
    finally:
        heads.unregister_head(TOY_HEAD)
        data.unregister_dataset(TOY_DATA)


def test_registered_toys_are_known_everywhere(toys):
    assert TOY_HEAD in config_mod.HEADS and TOY_DATA in data.DATASETS
    assert heads.has_factor(TOY_HEAD) and not heads.head_spec(TOY_HEAD).learns_diag
    assert tables.head_order(TOY_HEAD) == 3 and tables.head_order("pca") == 4
    assert editing.run_heads()["lowrank"] == ("lowrank", "lowrank-diag", TOY_HEAD)
    curves, flat = plots._rank_styles()
    assert (TOY_HEAD, "pixel ε", dict(marker="d", ls="--")) in curves and [h for h, _, _ in flat] == ["diagonal"]
    # the registry's channels reject a rank >= D = 1·8·8 when the configuration is built
    with pytest.raises(ValueError, match=r"^rank: must satisfy 1 <= rank < D = C\*H\*W = 64"):
        TrainConfig.preset("smoke", dataset=TOY_DATA, head=TOY_HEAD, image_size=8, rank=64)
    with pytest.raises(ValueError, match="^name: head 'toy-pixel-eps' is already registered"):
        heads.register_head(TOY_HEAD, PixelEpsHead, has_factor=True, learns_diag=False)
    with pytest.raises(ValueError, match="^name: dataset 'toy-blobs' is already registered"):
        data.register_dataset(TOY_DATA, _blobs, channels=1, default_size=16)


def test_toy_head_and_dataset_train_and_evaluate(toys, tmp_path):
    from sosvae_lib.evaluate import evaluate
    from sosvae_lib.runs import Run
    from sosvae_lib.train import train

    config = TrainConfig.preset("smoke", dataset=TOY_DATA, head=TOY_HEAD, device="cpu")
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["complete"] and summary["train_items"] == 32 and math.isfinite(summary["final"]["nll_bpd"])
    run = Run(tmp_path / "run")
    model = run.load_model("cpu")
    assert isinstance(model.head, PixelEpsHead) and model.rank == config.rank == 2
    with torch.no_grad():
        d = model.decode(torch.zeros(1, model.latent_dim)).cov_diag
    assert torch.allclose(d, config.eps * torch.linspace(1.0, 2.0, 256))  # the fixed per-pixel diagonal survived
    result = evaluate(run, "test", EvalConfig.preset("smoke"))
    assert (result["dataset"], result["head"], result["rank"], result["num_images"]) == (TOY_DATA, TOY_HEAD, 2, 16)
    for key in ("test_nll_bpd", "test_nll_bpd_calibrated", "iwae_k", "pca_test_nll_bpd"):
        assert math.isfinite(float(result[key])), key
    assert result["bits"] == 8 and run.calibration() is not None  # a head with a factor is calibrated
    assert [r["head"] for r in tables.collect_rows([run.folder])] == [TOY_HEAD, "pca"]  # ordered by the registry


def test_unregistered_toys_are_gone():
    assert TOY_HEAD not in config_mod.HEADS and TOY_DATA not in data.DATASETS
    with pytest.raises(ValueError, match=r"^head: must be one of lowrank, lowrank-diag, diagonal, got 'toy-pixel-eps'"):
        TrainConfig.preset("smoke", head=TOY_HEAD)
    with pytest.raises(ValueError, match=r"^dataset: unknown name 'toy-blobs' \(known: orl, fashion-mnist, celeba"):
        TrainConfig.preset("smoke", dataset=TOY_DATA)
