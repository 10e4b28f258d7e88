"""Bad inputs and faults of the commands (Langley et al., TMLR 2022, reproduced): each one is a single line that
names the flag, path or file and says what is allowed, exit code 2, raised before any data is loaded or any file
written; damaged or altered checkpoints are refused; a run directory is never written by two trainings; 16-bit
images keep their precision."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image  # noqa: F401 — imported before any test drops privileges
import pytest
import torch
from PIL import Image

from conftest import copy_run as _copy_run
from conftest import train_cli as _cli
from sosvae_lib import checkpoint as ckpt_io
from sosvae_lib import data, evaluate
from sosvae_lib.config import TrainConfig, check_mapping
from sosvae_lib.data import load_dataset
from sosvae_lib.runs import Run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "smoke", "--dataset", "orl", "--device", "cpu", "--no-progress"]


def _one_line_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    import re
    assert re.search(pattern, lines[0]), lines[0]


@contextlib.contextmanager
def _unprivileged():
    """Run the block as user nobody when the tests run as root (root reads and writes anything, so permission
    errors could not otherwise be seen). Effective ids only: the real ids stay root and are restored."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_tmp():
    """A temporary folder that user nobody may traverse and write (pytest's own tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="sosvae-inputs-"))
    os.chmod(base, 0o777)
    yield base
    for p in [base, *base.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, 0o777)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def smoke_run(trained_smoke_run):
    """A finished 2-epoch smoke run (the diagonal head: the fastest), shared for the session (conftest): read it,
    or _copy_run it before writing into it. The same run as `--config smoke --dataset orl --device cpu --head
    diagonal --epochs 2`."""
    return trained_smoke_run(head="diagonal", epochs=2)


# ---------------------------------------------------------------------------------------------------------------
# data folders

def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "no_images"])
def test_folder_root_errors_are_one_line_exit_2_before_anything_is_written(case, shared_tmp, capsys):
    root = shared_tmp / "data"
    if case != "missing":
        root.mkdir()
    if case == "unreadable":
        _png(root / "a.png", np.zeros((8, 8), np.uint8))
        os.chmod(root, 0o000)
    if case == "no_images":
        (root / "notes.txt").write_text("not an image")
    expected = {"missing": rf"^error: root: {root} does not exist; pass root=",
                "empty": rf"^error: root: {root} is empty; pass root=",
                "unreadable": rf"^error: root: cannot read the folder {root} \(permission denied\)",
                "no_images": rf"^error: root: no image files \(\.png, \.jpg.*\) under {root}; pass root="}[case]
    out = shared_tmp / "run"
    with _unprivileged():
        rc, _, err = _cli(capsys, *SMOKE, "--dataset", "folder", "--root", str(root), "--out", str(out))
    assert rc == 2
    _one_line_error(err, expected)
    assert not out.exists()


def test_out_that_is_a_file_under_a_file_or_not_writable(shared_tmp, capsys):
    a_file = shared_tmp / "file"
    a_file.write_text("x")
    readonly = shared_tmp / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    cases = [(a_file, rf"^error: out: {a_file} is a file, not a directory"),
             (a_file / "run", rf"^error: out: {a_file / 'run'} lies under {a_file}, which is a file"),
             (readonly / "run", rf"^error: out: {readonly / 'run'} is not writable \({readonly} does not allow")]
    for out, pattern in cases:
        with _unprivileged():
            rc, _, err = _cli(capsys, *SMOKE, "--out", str(out))
        assert rc == 2, err
        _one_line_error(err, pattern)
    assert a_file.read_text() == "x" and list(readonly.iterdir()) == []


def test_device_that_is_not_there(tmp_path, capsys):
    rc, _, err = _cli(capsys, *SMOKE, "--device", "cuda:7", "--out", str(tmp_path / "r"))
    assert rc == 2
    _one_line_error(err, r"^error: device: 'cuda:7' was asked for but (CUDA is unusable: torch \S+ \(|this "
                         r"machine has \d+ CUDA device)")
    assert not (tmp_path / "r").exists()
    rc, _, err = _cli(capsys, *SMOKE, "--device", "gpu0", "--out", str(tmp_path / "r"))
    assert rc == 2 and "device: must be one of auto, cpu, cuda or 'cuda:N', got 'gpu0'" in err


def test_evaluate_on_a_device_that_is_not_there(smoke_run, capsys):
    rc = evaluate.main([str(smoke_run), "--device", "cuda:7", "--no-pca", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_error(err, r"^error: device: 'cuda:7' was asked for but (CUDA is unusable: torch \S+ \(|this "
                         r"machine has \d+ CUDA device)")
    assert not (smoke_run / "eval_test.json").exists()


def test_zero_epochs_is_refused(tmp_path, capsys):
    rc, _, err = _cli(capsys, *SMOKE, "--epochs", "0", "--out", str(tmp_path / "r"))
    assert rc == 2
    _one_line_error(err, r"^error: epochs: must be an integer >= 1, got 0$")
    assert not (tmp_path / "r").exists()


def test_sixteen_bit_png_keeps_full_precision(tmp_path):
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, size=(20, 64, 64), dtype=np.uint16)
    for i, a in enumerate(deep):
        _png(tmp_path / "mri" / f"slice{i:02d}.png", a)
    with Image.open(tmp_path / "mri" / "slice00.png") as im:
        assert im.mode.startswith("I;16")
    sets = [load_dataset("folder", s, root=tmp_path / "mri") for s in data.SPLITS]
    got = {Path(f).name: ds[i] for ds in sets for i, f in enumerate(ds.files)}
    assert len(got) == 20 and all(ds.bits == 16 for ds in sets if len(ds))
    for i, a in enumerate(deep):
        x = got[f"slice{i:02d}.png"]
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32
        # read at full precision: the 65,536 levels survive (8 bits would keep 256, and clipping 1)
        assert torch.allclose(x[0].double(), torch.from_numpy(a.astype(np.float64) / 65535), atol=1e-7, rtol=0)
    assert torch.unique(torch.cat([g.flatten() for g in got.values()])).numel() > 40000  # of 81,920 draws
    # resized and in RGB mode: still in [0, 1], grey replicated, no clipping to the top value
    small = load_dataset("folder", "train", root=tmp_path / "mri", image_size=32, mode="RGB")
    x = small[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float((x == 1.0).float().mean()) < 0.01
    # an 8-bit image in the same folder is put on the same scale exactly (k/255 = 257k/65535)
    flat = np.full((64, 64), 200, np.uint8)
    _png(tmp_path / "mri" / "zz_eight_bit.png", flat)
    mixed = {Path(f).name: ds[i] for s in data.SPLITS
             for ds in [load_dataset("folder", s, root=tmp_path / "mri")] for i, f in enumerate(ds.files)}
    assert torch.allclose(mixed["zz_eight_bit.png"], torch.full((1, 64, 64), 200 / 255), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints

def _tensor_offset(path: Path) -> int:
    """Byte offset of the first stored tensor's data inside a torch.save zip archive."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "corrupt", "altered"])
def test_damaged_checkpoint_is_refused_by_resume_and_evaluate(damage, smoke_run, tmp_path, capsys):
    run = _copy_run(smoke_run, tmp_path / "run")
    path = run / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "zero_bytes":
        raw = bytearray()
    elif damage == "corrupt":
        raw[:64] = bytes(64)
    else:  # one byte of a weight tensor: torch.load itself reads this without complaint
        raw[_tensor_offset(path) + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    if damage == "altered":
        assert isinstance(torch.load(path, weights_only=False), dict)
    pattern = {"truncated": r"is truncated or corrupt", "zero_bytes": r"is empty \(0 bytes\)",
               "corrupt": r"is truncated or corrupt",
               "altered": r"was altered or damaged: its (model|optimizer) tensors do not match the SHA-256"}[damage]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc, _, err = _cli(capsys, *SMOKE, "--head", "diagonal", "--epochs", "3", "--resume", "--out", str(run))
    assert rc == 2
    _one_line_error(err, rf"^error: checkpoint: {path} {pattern}.*; delete it to start the run again")
    rc = evaluate.main([str(run), "--no-pca", "--no-progress", "--num-images", "4", "--k", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_error(err, rf"^error: checkpoint: {path} {pattern}")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written
    with pytest.raises(ckpt_io.CheckpointError, match=pattern):
        Run(run).load_model()


def test_checkpoint_digest_covers_every_weight(smoke_run, tmp_path):
    state = Run(smoke_run).checkpoint()
    assert state["weights_sha256"] == ckpt_io.tensor_digest(state["model"])
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name].clone()
    state["model"][name].view(-1)[0] += 1e-3
    torch.save(state, Run(tmp_path).checkpoint_path)
    with pytest.raises(ckpt_io.CheckpointError, match="its model tensors do not match"):
        Run(tmp_path).checkpoint()


# ---------------------------------------------------------------------------------------------------------------
# resuming

def test_resume_takes_the_stored_configuration(smoke_run, tmp_path, capsys):
    run = _copy_run(smoke_run, tmp_path / "run")
    stored = json.loads((run / "config.json").read_text())
    # no --config and no flags: the stored run (smoke, diagonal, orl) is continued, not the cpu preset
    rc, out, err = _cli(capsys, "--resume", "--epochs", "3", "--no-progress", "--device", "cpu", "--out", str(run))
    assert rc == 0, err
    assert "done: 3 epochs" in out
    assert json.loads((run / "config.json").read_text()) == {**stored, "epochs": 3}
    # a different preset, or a flag that changes the model, is refused naming the field
    before = (run / "config.json").read_bytes()
    rc, _, err = _cli(capsys, "--config", "cpu", "--resume", "--epochs", "4", "--out", str(run))
    assert rc == 2
    _one_line_error(err, r"^error: (rank|width|latent): the run being resumed was trained with \1=\d+, got \d+ "
                         r"\(only epochs, device, num_workers, root, data_on_device, compile, deterministic may change on --resume\)")
    rc, _, err = _cli(capsys, "--resume", "--latent", "9", "--epochs", "4", "--out", str(run))
    assert rc == 2
    _one_line_error(err, r"^error: latent: the run being resumed was trained with latent=4, got 9")
    # fewer epochs than already trained: refused, and nothing says otherwise afterwards
    rc, _, err = _cli(capsys, "--resume", "--epochs", "1", "--out", str(run))
    assert rc == 2
    _one_line_error(err, rf"^error: epochs: the run in {run} has already trained 3 epochs; give epochs >= 3")
    assert (run / "config.json").read_bytes() == before
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert Run(run).checkpoint()["epoch"] == 3


def test_preset_pretraining_is_a_fraction_of_the_epochs(capsys, tmp_path):
    assert TrainConfig.preset("cpu").pretrain_epochs == 10
    assert TrainConfig.preset("cpu", epochs=5).pretrain_epochs == 1
    assert TrainConfig.preset("cpu", epochs=3).pretrain_epochs == 0
    assert TrainConfig.preset("cpu", epochs=5, pretrain_epochs=4).pretrain_epochs == 4  # explicit wins
    with pytest.raises(ValueError, match=r"^pretrain_epochs: must be <= epochs=5, got 6"):
        TrainConfig.preset("cpu", epochs=5, pretrain_epochs=6)
    rc, _, err = _cli(capsys, "--config", "cpu", "--epochs", "5", "--pretrain-epochs", "6", "--out",
                      str(tmp_path / "r"))
    assert rc == 2 and err.strip() == "error: pretrain_epochs: must be <= epochs=5, got 6"


# ---------------------------------------------------------------------------------------------------------------
# one trainer per run directory

def test_second_training_into_the_same_out_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sosvae_lib.runs import Run\n"
                               "with Run(sys.argv[1]).lock():\n    print('locked', flush=True)\n    time.sleep(120)\n",
         str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = _cli(capsys, *SMOKE, "--head", "diagonal", "--out", str(out))
        assert rc == 2
        _one_line_error(err, rf"^error: out: {out} is being written by another training \(pid {holder.pid}\); "
                             r"wait for it to finish, or choose another --out")
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]
        holder.send_signal(signal.SIGKILL)  # killed, not finished: the kernel drops the lock
        holder.wait(timeout=30)
        rc, out_text, err = _cli(capsys, *SMOKE, "--head", "diagonal", "--out", str(out))
        assert rc == 0, err
        assert (out / "summary.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_run_lock_in_process(tmp_path):
    with Run(tmp_path / "r").lock():
        with pytest.raises(ckpt_io.RunLockedError, match=rf"out: {tmp_path / 'r'} is being written by another "
                                                         rf"training \(pid {os.getpid()}\)"):
            with Run(tmp_path / "r").lock():
                pass
    with Run(tmp_path / "r").lock():  # released on exit
        pass


# ---------------------------------------------------------------------------------------------------------------
# notebooks

def test_mapping_parameters_name_themselves():
    assert check_mapping("overrides", {"epochs": 2}, '{"epochs": 2}') == {"epochs": 2}
    with pytest.raises(ValueError, match=r"^overrides: must be a dict of names to values, e.g. \{\"epochs\": 2\} "
                                         r"\(with papermill: -y \"overrides: \{epochs: 2\}\"\), got the str 'epochs=2'"):
        check_mapping("overrides", "epochs=2", '{"epochs": 2}')
    with pytest.raises(ValueError, match=r"got the dict \{1: 2\}"):
        check_mapping("overrides", {1: 2}, '{"epochs": 2}')


@pytest.mark.slow
def test_train_notebook_names_a_string_override(tmp_path):
    import papermill as pm

    out_dir = tmp_path / "run"
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(REPO / "notebooks" / "01_train.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters=dict(overrides="epochs=2", out_dir=str(out_dir),
                                            figures_dir=str(tmp_path / "fig")),
                            cwd=str(REPO / "notebooks"), progress_bar=False, kernel_name="python3")
    assert info.value.ename == "ValueError"
    assert info.value.evalue.startswith("overrides: must be a dict of names to values")
    assert "got the str 'epochs=2'" in info.value.evalue
    assert not out_dir.exists()


@pytest.mark.slow
def test_metrics_notebook_names_a_string_eval_options(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(REPO / "notebooks" / "05_metrics.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters=dict(eval_options="k=16", runs_dir=str(tmp_path / "runs"),
                                            train_missing=False, evaluate_missing=False,
                                            tables_dir=str(tmp_path / "tables"), figures_dir=str(tmp_path / "fig")),
                            cwd=str(REPO / "notebooks"), progress_bar=False, kernel_name="python3")
    assert info.value.ename == "ValueError"
    assert info.value.evalue.startswith("eval_options: must be a dict of names to values, e.g. {\"k\": 16}")
    assert not (tmp_path / "tables").exists()
