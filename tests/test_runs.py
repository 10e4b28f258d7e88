"""The run folder (`sosvae_lib.runs.Run`): its file names, what it reads and writes, and its state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import copy_run, smoke_config
from sosvae_lib import checkpoint as ckpt_io
from sosvae_lib import train as train_mod
from sosvae_lib.calibration import Calibration
from sosvae_lib.config import RESUMABLE_FIELDS, TrainConfig
from sosvae_lib.runs import Run, stack_images


def test_file_names_and_construction_touch_no_file(tmp_path):
    run = Run(tmp_path / "nowhere" / "r")
    assert not (tmp_path / "nowhere").exists() and not run.exists() and not run.started()
    names = [p.name for p in (run.config_path, run.checkpoint_path, run.metrics_path, run.summary_path,
                              run.lock_path, run.calibration_path, run.eval_path(), run.eval_path("val"))]
    assert names == ["config.json", "checkpoint.pt", "metrics.csv", "summary.json", "train.lock",
                     "calibration.json", "eval_test.json", "eval_val.json"]
    assert all(p.parent == tmp_path / "nowhere" / "r" for p in run.files())
    assert Run(run.checkpoint_path) == run == Run(run) and Run(str(run.folder)).folder == run.folder
    assert run.state() == "absent" and run.summary() is None and run.calibration() is None
    assert run.evaluation("test") is None
    with pytest.raises(ValueError, match=r"^split: must be one of train, val, test, got 'dev'$"):
        run.eval_path("dev")
    with pytest.raises(TypeError, match=r"^run_dir: must be a run folder \(str or Path\), got int$"):
        Run(3)
    with pytest.raises(FileNotFoundError, match=r"^run_dir: no checkpoint in .*; train a run there first"):
        run.load_model()
    with pytest.raises(FileNotFoundError, match=r"holds no run \(no checkpoint.pt or config.json\)"):
        run.config


def test_a_file_given_as_a_run_folder_is_named(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    with pytest.raises(NotADirectoryError, match=r"is a file, not a run folder; give the --out folder"):
        Run(a_file).load_model()
    with pytest.raises(ckpt_io.CheckpointError, match=r"is not a checkpoint") as info:
        ckpt_io.load_checkpoint(a_file, own=False)
    assert "delete it" not in str(info.value)


def test_a_finished_run_is_read_back(smoke_run):
    run = Run(smoke_run)
    state = run.checkpoint()
    config = run.config
    assert config == TrainConfig.from_dict(state["config"]) == smoke_config()
    assert run.exists() and run.started() and run.epochs_done() == 1 and run.state() == "complete"
    assert run.state(config) == "complete"
    model = run.load_model()
    assert not model.training and ckpt_io.tensor_digest(model.state_dict()) == run.summary()["weights_sha256"]
    history = run.history()
    assert len(history) == 1 and history[0]["epoch"] == 1.0
    assert math.isclose(history[0]["nll"], state["history"][0]["nll"], rel_tol=1e-12)
    assert run.bits == 8
    images = run.images("test", 3)
    assert images.shape == (3, 1, 16, 16) and images.dtype == torch.float32
    dataset = run.dataset("test", 3)
    assert len(dataset) == 3 and torch.equal(stack_images(dataset), images)
    assert torch.equal(images * 255, (images * 255).round())  # 8-bit levels k/255


def test_results_round_trip(tmp_path):
    run = Run(tmp_path)
    run.write_evaluation("val", {"test_nll_bpd": 6.5})
    assert run.evaluation("val") == {"test_nll_bpd": 6.5} and run.evaluation("test") is None
    cal = Calibration(scale=2.0, eps=2e-5, trained_eps=1e-5, nll_trained=100.0, nll_calibrated=90.0, num_images=8,
                      num_dims=64, at_bound=False)
    run.write_calibration(cal, split="val", seed=3)
    stored = json.loads(run.calibration_path.read_text())
    assert stored["split"] == "val" and stored["seed"] == 3 and stored["bits"] == 8
    assert run.calibration() == cal
    del stored["bits"]  # a record written before bits were stored: 8-bit
    run.calibration_path.write_text(json.dumps(stored))
    assert run.calibration() == cal
    run.calibration_path.write_text("{ not json")
    with pytest.raises(ValueError, match=rf"^calibration: {run.calibration_path} is not valid JSON"):
        run.calibration()
    run.calibration_path.write_text(json.dumps({"scale": 2.0}))
    with pytest.raises(ValueError, match=r"is incomplete \(missing eps, trained_eps"):
        run.calibration()
    run.calibration_path.write_text(json.dumps({**cal.to_dict(), "scale": -1}))
    with pytest.raises(ValueError, match=r"holds scale -1, not a number > 0"):
        run.calibration()
    with pytest.raises(TypeError, match=r"^calibration: must be a Calibration, got dict$"):
        run.write_calibration({"scale": 2.0})


def _partial_copy(smoke_run, dest, planned_epochs: int) -> Run:
    """A copy of the smoke run as a run planned for ``planned_epochs`` and stopped after its first epoch."""
    run = Run(copy_run(smoke_run, dest))
    state = run.checkpoint()
    state["config"] = TrainConfig.from_dict(state["config"]).replace(epochs=planned_epochs).to_dict()
    run.write_checkpoint(state)
    run.write_config(TrainConfig.from_dict(state["config"]))
    run.summary_path.unlink()
    return run


def _resume_accepts(run: Run, config: TrainConfig) -> bool:
    try:
        train_mod._check_resume_config(run.stored_config(), config, run.epochs_done(), run.folder)
    except ValueError:
        return False
    return True


# A different value of every TrainConfig field (valid with the smoke preset on ORL).
_CHANGED = dict(dataset="fashion-mnist", root="/elsewhere", image_size=32, max_items=16, augment=False,
                dequantize=False, arch="authors", head="lowrank-diag", rank=3, latent=5, width=8, levels=3,
                max_width=64, eps=2e-5, init_var=0.02, epochs=2, batch_size=4, lr=2e-3, target_kl=6.0, damping=5.0,
                lambda_lr=0.5, lambda_init=0.1, entropy_target=-50.0, beta=1.0, pretrain_epochs=1,
                init_from="/elsewhere/run", seed=1,
                device="cuda", num_workers=1, precision="fp32", data_on_device=True, compile=True,
                deterministic=True)


def test_every_field_is_covered():
    assert set(_CHANGED) == set(TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize("field", sorted(_CHANGED))
def test_a_run_that_train_resume_accepts_is_never_stale(smoke_run, tmp_path, field):
    """issue 18: reproduce deleted (as "stale") runs that ``train --resume`` would continue (data_on_device,
    compile, deterministic changed, or a run planned for more epochs than asked now but stopped before them).
    Run.state, which reproduce asks, calls a run stale exactly when the trainer would refuse to resume it."""
    run = _partial_copy(smoke_run, tmp_path / "r", planned_epochs=3)
    config = run.stored_config().replace(**{field: _CHANGED[field]})
    accepted = _resume_accepts(run, config)
    assert accepted == (field in RESUMABLE_FIELDS)
    assert (run.state(config) != "stale") == accepted
    assert run.state(config) == ("partial" if accepted else "stale")


def test_epochs_decide_partial_complete_and_stale(smoke_run, tmp_path):
    run = _partial_copy(smoke_run, tmp_path / "r", planned_epochs=3)
    stored = run.stored_config()
    # planned 3, stopped after 1: asking for 1 (done) or 2 resumes; the run is not stale
    for epochs, accepted in ((1, True), (2, True), (3, True)):
        config = stored.replace(epochs=epochs)
        assert _resume_accepts(run, config) == accepted and run.state(config) == "partial"
    finished = Run(smoke_run)  # finished after 1 epoch
    assert finished.state(smoke_config()) == "complete"
    assert finished.state(smoke_config(epochs=2)) == "partial"  # more epochs: resumed
    # a finished run trained past what is asked cannot be cut back: stale (train refuses it too)
    longer = _partial_copy(smoke_run, tmp_path / "long", planned_epochs=3)
    state = longer.checkpoint()
    state["epoch"] = 2
    longer.write_checkpoint(state)
    assert not _resume_accepts(longer, stored.replace(epochs=1)) and longer.state(stored.replace(epochs=1)) == "stale"


def _sixteen_bit_folder(folder, n: int = 40, side: int = 16):
    """``n`` grayscale 16-bit PNGs (values over the whole 0 … 65535 range) in ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 65536, size=(side, side), dtype=np.uint16)).save(folder / f"s{i:02d}.png")


def test_sixteen_bit_data_are_scored_alike_in_training_and_evaluation(tmp_path):
    """issue 18: 16-bit folder data were dequantised and scored at 16 bits in training (`dataset.bits`) but not
    dequantised and scored on the 8-bit scale in evaluation (`images.dtype == uint8`), 8 bits per dimension apart.
    With the weights frozen (lr 1e-12), the training epoch's −ELBO and the evaluation's on the same images agree to
    the noise of their different draws, and both are stated at 16 bits."""
    from sosvae_lib.evaluate import evaluate
    from sosvae_lib.metrics import bits_per_dim

    _sixteen_bit_folder(tmp_path / "mri")
    config = TrainConfig.preset("smoke", dataset="folder", root=str(tmp_path / "mri"), head="diagonal", lr=1e-12,
                                device="cpu")
    summary = train_mod.train(config, tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    assert run.bits == 16
    row, dim = summary["final"], 256
    assert row["nll_bpd"] == pytest.approx(float(bits_per_dim(row["nll"], dim, bits=16)), rel=1e-12)
    out = evaluate(run, split="train", num_images=config.max_items, k=1, pca=False, calibrate=False, progress=False,
                   write=False)
    assert out["bits"] == 16 and out["dequantized"] and out["num_images"] == row["images"]
    train_elbo_bpd = float(bits_per_dim(row["nll"] + row["kl"], dim, bits=16))
    assert out["elbo_bpd"] == pytest.approx(train_elbo_bpd, abs=0.05)  # 8 apart before
    assert 16 < out["elbo_bpd"] < 40


def test_continuous_data_are_not_dequantised(tmp_path):
    """`synthetic` data are continuous: neither training nor evaluation dequantises them (training did, at 8
    bits), and bits per dimension are stated on the 8-bit scale."""
    from sosvae_lib.evaluate import evaluate

    config = TrainConfig.preset("smoke", dataset="synthetic", max_items=8, head="diagonal", device="cpu")
    train_mod.train(config, tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    assert run.bits is None
    out = evaluate(run, k=1, num_images=4, pca=False, progress=False, write=False)
    assert out["bits"] is None and not out["dequantized"]
    with pytest.raises(ValueError, match=r"^dequantize: the run's data are continuous"):
        evaluate(run, k=1, num_images=4, pca=False, progress=False, write=False, dequantize=True)


def _package_imports() -> dict[str, set[str]]:
    """Module → the package modules it imports (at the top or inside functions), from the source."""
    import ast
    from pathlib import Path

    import sosvae_lib

    folder = Path(sosvae_lib.__file__).parent
    names = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = {m.split(".")[0] for m in found} & names
    return graph


def test_the_package_has_no_import_cycle():
    """issue 18: calibration imported evaluate (calibrate_run) while evaluate imported calibration."""
    graph = _package_imports()
    assert "evaluate" not in graph["calibration"] and "runs" not in graph["calibration"]
    assert graph["runs"] <= {"checkpoint", "calibration", "config", "data", "model"}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [module, dep])}"
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_a_damaged_checkpoint_is_partial_and_resuming_names_it(smoke_run, tmp_path):
    run = Run(copy_run(smoke_run, tmp_path / "r"))
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:100])
    assert run.state() == "partial" and run.state(smoke_config()) == "partial"
    with pytest.raises(ckpt_io.CheckpointError, match=r"is truncated or corrupt.*delete it to start the run again"):
        train_mod.ensure_trained(run, smoke_config())


def test_ensure_trained_trains_only_what_is_missing(tmp_path):
    config = smoke_config(head="diagonal", max_items=8)
    run = train_mod.ensure_trained(tmp_path / "r", config)
    assert isinstance(run, Run) and run.state(config) == "complete"
    before = run.checkpoint_path.stat().st_mtime_ns
    assert train_mod.ensure_trained(run, config) == run and run.checkpoint_path.stat().st_mtime_ns == before
    train_mod.ensure_trained(run, config.replace(epochs=2))  # more epochs: resumed
    assert run.epochs_done() == 2 and run.state(config.replace(epochs=2)) == "complete"
    with pytest.raises(ValueError, match=r"^latent: the run being resumed was trained with latent=4, got 5"):
        train_mod.ensure_trained(run, config.replace(epochs=2, latent=5))  # another run: refused, nothing deleted
    assert run.epochs_done() == 2
