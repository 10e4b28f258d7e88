"""Faults of the training command found by probing it as a new user (issue 17): --compile on the CPU is refused,
--resume of a run killed before its first checkpoint continues the stored configuration, Ctrl-C is one line and
exit 130 with the checkpoint intact, a file is not taken for a run folder, a relative data root is stored absolute,
a usage error or a killed checkpoint write leaves no file behind, and --num-workers is capped at the CPUs."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_cli as _cli
from sosvae_lib import checkpoint as ckpt_io
from sosvae_lib.runs import Run, resolve_root
from sosvae_lib import data, evaluate
from sosvae_lib import train as train_mod
from sosvae_lib.config import TrainConfig

torch.set_num_threads(1)
SMOKE = ["--config", "smoke", "--dataset", "orl", "--device", "cpu", "--no-progress"]
TINY = [*SMOKE, "--head", "diagonal", "--max-items", "8"]


def _one_line(err: str, pattern: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Fail at once, naming the configuration, if a training starts (a wrongly started cpu-preset run would take
    minutes)."""
    def refuse(run, epoch, bar=None):
        raise AssertionError(f"a training started: {run.config}")
    monkeypatch.setattr(train_mod, "train_epoch", refuse)


# ---------------------------------------------------------------------------------------------------------------
# 1. --compile on the CPU

def test_compile_is_refused_on_the_cpu_before_anything_is_written(tmp_path, capsys, monkeypatch):
    def compile_called(*args, **kwargs):  # never run a CPU compile here: it corrupted the heap on some hosts
        raise AssertionError("torch.compile was called on the CPU")
    monkeypatch.setattr(torch, "compile", compile_called)
    out = tmp_path / "r"
    rc, _, err = _cli(capsys, *TINY, "--compile", "--out", str(out))
    assert rc == 2
    _one_line(err, r"^error: compile: torch\.compile is refused on the CPU .*--no-compile")
    assert not out.exists()
    config = TrainConfig.preset("smoke", dataset="orl", device="cpu", compile=True)
    with pytest.raises(ValueError, match=r"^compile: torch\.compile is refused on the CPU"):
        train_mod.train(config, out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. --resume of a run killed before its first checkpoint

def test_resume_of_a_run_killed_before_its_first_checkpoint_takes_its_config(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    stored = TrainConfig.preset("smoke", dataset="orl", head="diagonal", max_items=8, latent=3, device="cpu")
    (run / "config.json").write_text(json.dumps(stored.to_dict()))  # what a run killed in its first epoch leaves
    before = (run / "config.json").read_bytes()

    # a flag that changes the stored model is refused as for a checkpoint, and nothing is written
    rc, _, err = _cli(capsys, "--resume", "--latent", "9", "--no-progress", "--out", str(run))
    assert rc == 2
    _one_line(err, r"^error: latent: the run being resumed was trained with latent=3, got 9 \(only epochs, device, "
                   r"num_workers, root, data_on_device, compile, deterministic may change on --resume\)")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"] and (run / "config.json").read_bytes() == before

    seen = []
    real_epoch = train_mod.train_epoch

    def checked_epoch(r, epoch, bar=None):
        seen.append(r.config)
        assert r.config.head == "diagonal" and r.config.max_items == 8, f"not the stored run: {r.config}"
        return real_epoch(r, epoch, bar)
    monkeypatch.setattr(train_mod, "train_epoch", checked_epoch)
    rc, out, err = _cli(capsys, "--resume", "--epochs", "2", "--no-progress", "--out", str(run))
    assert rc == 0, err
    assert "done: 2 epochs" in out
    assert seen == [stored.replace(epochs=2)] * 2
    assert json.loads((run / "config.json").read_text()) == stored.replace(epochs=2).to_dict()
    assert Run(run).checkpoint()["config"] == stored.replace(epochs=2).to_dict()


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_resume_with_nothing_to_resume_says_so(case, tmp_path, capsys, no_training):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    rc, _, err = _cli(capsys, *TINY, "--resume", "--out", str(run))
    assert rc == 2
    _one_line(err, rf"^error: out: {re.escape(str(run))} holds no run to resume \(no checkpoint\.pt or "
                   r"config\.json\); drop --resume to start a new run there$")
    assert (list(run.iterdir()) == []) if case == "empty" else not run.exists()


# ---------------------------------------------------------------------------------------------------------------
# 7. Ctrl-C

def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes_exactly(tmp_path, capsys, monkeypatch):
    argv = [*TINY, "--epochs", "3", "--batch-size", "4"]
    straight = tmp_path / "straight"
    assert _cli(capsys, *argv, "--out", str(straight))[0] == 0
    real_epoch = train_mod.train_epoch

    def interrupted_in_epoch_2(run, epoch, bar=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(run, epoch, bar)
    monkeypatch.setattr(train_mod, "train_epoch", interrupted_in_epoch_2)
    run = tmp_path / "run"
    try:
        rc, _, err = _cli(capsys, *argv, "--out", str(run))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main (a raw traceback for the user)")
    assert rc == 130
    line = _one_line(err, r"^interrupted at epoch 2 of 3; resume with `")
    command = f"python -m sosvae_lib.train --out {shlex.quote(str(run))} --resume"
    assert line == f"interrupted at epoch 2 of 3; resume with `{command}`"
    assert Run(run).checkpoint()["epoch"] == 1  # the last checkpoint, intact (digests verified)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    with Run(run).lock():  # released
        pass
    # the API raises a KeyboardInterrupt carrying the same line
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted at epoch 2 of 3; resume with"):
        train_mod.train(TrainConfig.preset("smoke", dataset="orl", device="cpu", head="diagonal", max_items=8,
                                           epochs=3, batch_size=4), tmp_path / "api", progress=False)

    monkeypatch.setattr(train_mod, "train_epoch", real_epoch)
    rc, out, err = _cli(capsys, *shlex.split(line.split("`")[1])[3:], "--no-progress")  # the advised command
    assert rc == 0, err
    assert "done: 3 epochs" in out
    done = [json.loads((d / "summary.json").read_text())["weights_sha256"] for d in (straight, run)]
    assert done[0] == done[1]  # bit for bit the uninterrupted run


# ---------------------------------------------------------------------------------------------------------------
# 12. a file given as a run folder

def test_a_file_given_as_a_run_folder_is_named_as_such(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    with pytest.raises(NotADirectoryError, match=rf"^run_dir: {re.escape(str(a_file))} is a file, not a run "
                                                 r"folder; give the --out folder of a training run$"):
        Run(a_file).load_model()
    with pytest.raises(ckpt_io.CheckpointError, match=r"is not a checkpoint") as info:
        ckpt_io.load_checkpoint(a_file, own=False)
    assert "delete it" not in str(info.value)
    rc, _, err = _cli(capsys, *TINY, "--resume", "--out", str(a_file))
    assert rc == 2
    _one_line(err, rf"^error: out: {re.escape(str(a_file))} is a file, not a directory")
    assert a_file.read_text() == "not a run"


def test_load_run_takes_the_run_folder_or_its_checkpoint_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(capsys, *TINY, "--out", str(run))[0] == 0
    a, b = Run(run).load_model(), Run(run / "checkpoint.pt").load_model()
    assert Run(run).config == Run(run / "checkpoint.pt").config
    assert train_mod.weights_digest(a) == train_mod.weights_digest(b)


# ---------------------------------------------------------------------------------------------------------------
# 13. a relative data root

def _image_folder(folder: Path, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(folder / f"im{i:02d}.png")


def test_a_relative_root_is_stored_absolute_and_evaluates_from_elsewhere(tmp_path, capsys, monkeypatch):
    _image_folder(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(capsys, "--config", "smoke", "--dataset", "folder", "--root", "data", "--head", "diagonal",
                      "--device", "cpu", "--no-progress", "--out", "runs/r")
    assert rc == 0, err
    run = tmp_path / "runs" / "r"
    root = str(tmp_path / "data")
    assert json.loads((run / "config.json").read_text())["root"] == root
    assert Run(run).checkpoint()["config"]["root"] == root
    # the same folder given relatively or absolutely on --resume is the same run
    rc, _, err = _cli(capsys, "--resume", "--root", "./data/", "--epochs", "2", "--no-progress", "--out", "runs/r")
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["root"] == root
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc = evaluate.main([str(run), "--no-pca", "--no-progress", "--no-calibrate", "--num-images", "4", "--k", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["num_images"] == 4


def test_an_old_run_with_a_relative_root_is_found_from_another_folder(tmp_path, capsys, monkeypatch):
    _image_folder(tmp_path / "data")
    run = tmp_path / "runs" / "r"
    rc, _, err = _cli(capsys, "--config", "smoke", "--dataset", "folder", "--root", str(tmp_path / "data"),
                      "--head", "diagonal", "--device", "cpu", "--no-progress", "--out", str(run))
    assert rc == 0, err
    # what a run trained before roots were stored absolute holds: the root as typed, relative to where it was trained
    state = Run(run).checkpoint()
    state["config"]["root"] = "data"
    Run(run).write_checkpoint(state)
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    config = Run(run).config
    assert config.root == str(tmp_path / "data")  # the run folder's ancestor that holds it
    assert resolve_root("data", run) == str(tmp_path / "data")
    (tmp_path / "elsewhere" / "deeper" / "data").mkdir()  # the current folder wins, as when the run was trained
    assert resolve_root("data", run) == str(tmp_path / "elsewhere" / "deeper" / "data")
    assert resolve_root("nowhere", run) == str(tmp_path / "elsewhere" / "deeper" / "nowhere")
    assert resolve_root(None, run) is None
    assert resolve_root(str(tmp_path / "x" / ".." / "data"), run) == str(tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------------
# 16. files left behind

def test_a_usage_error_found_under_the_lock_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "new" / "r"  # rank above D = 1·16·16 for a data set whose channels the config cannot know
    rc, _, err = _cli(capsys, "--config", "smoke", "--dataset", "synthetic", "--rank", "300", "--device", "cpu",
                      "--no-progress", "--out", str(out))
    assert rc == 2
    _one_line(err, r"^error: rank: must satisfy 1 <= rank < D = C\*H\*W = 256, got 300$")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    rc, _, err = _cli(capsys, "--config", "smoke", "--dataset", "synthetic", "--rank", "300", "--device", "cpu",
                      "--no-progress", "--out", str(existing))
    assert rc == 2 and existing.is_dir() and list(existing.iterdir()) == []


def test_stale_temporaries_of_a_killed_write_are_removed_at_the_next_start(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(capsys, *TINY, "--out", str(run))[0] == 0
    stale = [run / ".checkpoint.pt.k1lld34d.tmp", run / ".metrics.csv.x8y7z6w5.tmp", run / ".config.json.ab12cd34.tmp"]
    foreign = run / ".eval_test.json.qwertyui.tmp"  # an evaluation may be writing it now, without the lock
    with Run(run).lock():  # a live training holds the folder and is writing: its temporaries are not touched
        for p in [*stale, foreign]:
            p.write_bytes(b"half a write")
        rc, _, err = _cli(capsys, *TINY, "--epochs", "2", "--resume", "--out", str(run))
        assert rc == 2 and "is being written by another training" in err
        assert all(p.exists() for p in stale)
    rc, _, err = _cli(capsys, *TINY, "--epochs", "2", "--resume", "--out", str(run))
    assert rc == 0, err
    assert not any(p.exists() for p in stale)
    assert foreign.read_bytes() == b"half a write"
    assert Run(run).checkpoint()["epoch"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 17. --num-workers

def test_num_workers_is_capped_at_the_cpus_with_one_warning(tmp_path, capsys, monkeypatch):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    real_loader = data.make_loader
    workers = []

    def guarded_loader(*args, **kwargs):  # 1000 worker processes on a shared 2-core machine: refuse at once
        workers.append(kwargs["num_workers"])
        assert kwargs["num_workers"] <= cpus, f"{kwargs['num_workers']} loader workers for {cpus} CPUs"
        return real_loader(*args, **kwargs)
    monkeypatch.setattr(data, "make_loader", guarded_loader)
    run = tmp_path / "r"
    rc, _, err = _cli(capsys, *TINY, "--num-workers", "1000", "--out", str(run))
    assert rc == 0, err
    _one_line(err, rf"^warning: num_workers: 1000 loader workers asked for, but this process may use {cpus} CPUs; "
                   rf"using {cpus}$")
    assert workers == [cpus]
    assert json.loads((run / "config.json").read_text())["num_workers"] == cpus
    rc, _, err = _cli(capsys, *TINY, "--num-workers", str(cpus), "--out", str(tmp_path / "r2"))
    assert rc == 0 and err == ""


def test_run_lock_never_holds_a_lock_file_that_was_removed(tmp_path, monkeypatch):
    import fcntl

    run = tmp_path / "r"
    with Run(run).lock():  # refused before writing anything: neither the lock file nor the folder stays
        pass
    assert not run.exists()
    # A process that opened train.lock just before its holder removed it must not lock that orphaned file (a third
    # process would lock the new one, and two trainings would write the folder): it notices and locks the new one.
    run.mkdir()
    (run / "keep.txt").write_text("a file, so that the lock file stays")
    real_open, swapped = os.open, []

    def open_then_holder_removes_it(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path) == str(Run(run).lock_path) and not swapped:
            swapped.append(os.fstat(fd).st_ino)
            os.unlink(path)
            Path(path).write_text("")  # the next training's new lock file
        return fd
    monkeypatch.setattr(os, "open", open_then_holder_removes_it)
    with Run(run).lock():
        monkeypatch.setattr(os, "open", real_open)
        assert swapped
        fd = os.open(Run(run).lock_path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the file the path names is the one held
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert (Run(run).lock_path).read_text() == f"{os.getpid()}\n"
    assert (Run(run).lock_path).is_file() and (run / "keep.txt").is_file()
