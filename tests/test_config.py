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


# ---------------------------------------------------------------------------------------------------------------
# EvalConfig (issue 18: the evaluation's options were an untyped dict, copied by hand in four places)

def test_eval_presets_are_the_reproductions_settings():
    from sosvae_lib.config import EvalConfig

    assert EvalConfig() == EvalConfig.preset("cpu").replace(face_images=100, progress=True, patch=None)
    smoke = EvalConfig.preset("smoke")
    assert (smoke.k, smoke.num_images, smoke.num_samples, smoke.batch_size, smoke.patch, smoke.pca_train_items,
            smoke.progress, smoke.device) == (2, 16, 16, 16, 6, 32, False, "cpu")
    gpu, paper = EvalConfig.preset("gpu"), EvalConfig.preset("paper")
    assert (gpu.k, gpu.num_images, gpu.batch_size, gpu.pca_train_items, gpu.device) == (64, 1000, 50, 5000, "auto")
    assert (paper.k, paper.num_images, paper.batch_size, paper.pca_train_items, paper.device) == (64, 1000, 25, 2000,
                                                                                                  "auto")
    assert EvalConfig.preset("gpu", device="cpu", k=8).k == 8
    assert EvalConfig.from_dict(gpu.to_dict()) == gpu


@pytest.mark.parametrize("field, value", [
    ("k", 0), ("k", 2.0), ("num_images", 0), ("num_samples", -1), ("batch_size", True), ("patch", 0), ("seed", -1),
    ("pca", 1), ("pca_train_items", 0), ("dequantize", "yes"), ("calibrate", None), ("calibration_images", 0),
    ("faces", "no"), ("face_images", 1), ("device", "gpu"), ("progress", 0), ("write", "true"),
])
def test_eval_config_names_the_bad_field(field, value):
    from sosvae_lib.config import EvalConfig

    with pytest.raises(ValueError, match=f"^{field}: "):
        EvalConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        EvalConfig.preset("smoke").replace(**{field: value})


def test_eval_config_unknown_names_and_root():
    from pathlib import Path

    from sosvae_lib.config import EvalConfig

    with pytest.raises(ValueError, match=r"^colour: is not an EvalConfig field \(fields: k, num_images,"):
        EvalConfig().replace(colour=True)
    with pytest.raises(ValueError, match=r"^preset: must be one of smoke, cpu, gpu, paper, got 'huge'$"):
        EvalConfig.preset("huge")
    with pytest.raises(TypeError, match=r"^root: must be a folder \(str or Path\) or None, got int$"):
        EvalConfig(root=3)
    assert EvalConfig(root=Path("/data/x")).root == "/data/x"
