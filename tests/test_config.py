"""TrainConfig of SOS-VAE training (Langley et al., TMLR 2022): presets and validation at construction."""

import pytest

from sosvae_lib.config import TrainConfig
from sosvae_lib.distributed import resolve_device


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 256), ("rank", 2.5), ("head", "full"), ("image_size", 3), ("image_size", (64, 0)),
    ("epochs", -1), ("target_kl", 0.0), ("target_kl", -3.0), ("target_kl", float("nan")), ("lr", 0.0),
    ("batch_size", 0), ("latent", 0), ("width", 0), ("levels", 0), ("eps", 0.0), ("damping", -1.0),
    ("lambda_lr", -1.0), ("beta", 0.0), ("max_items", 0), ("device", "tpu"), ("seed", -1), ("dataset", ""),
    ("num_workers", -1), ("pretrain_epochs", 5),
])
def test_bad_values_raise_naming_the_field(field, value):
    kwargs = dict(dataset="orl", image_size=16, levels=2, epochs=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"^{field}: "):
        TrainConfig(**kwargs)


def test_presets_and_round_trip():
    for name in ("smoke", "cpu", "paper"):
        cfg = TrainConfig.preset(name)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    paper = TrainConfig.preset("paper")
    assert (paper.dataset, paper.image_size, paper.latent, paper.rank, paper.batch_size, paper.lr) == \
        ("celeba", (218, 178), 128, 25, 25, 1e-4)
    assert paper.target_kl == 45.0 and paper.damping == 10.0 and paper.lambda_lr == 1.0 and paper.eps == 1e-5
    assert TrainConfig.preset("cpu", rank=5).rank == 5
    with pytest.raises(ValueError, match="^preset"):
        TrainConfig.preset("huge")
    with pytest.raises(ValueError, match="^ranks"):
        TrainConfig.preset("cpu", ranks=5)
    with pytest.raises(Exception):
        TrainConfig().rank = 3  # frozen


def test_diagonal_head_ignores_rank_bound_and_device_auto():
    assert TrainConfig(head="diagonal", image_size=16, levels=2, rank=10_000).rank == 10_000
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu").type == "cpu"
