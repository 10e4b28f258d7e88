"""Shared test fixtures and helpers.

- `trained_smoke_run(**overrides)`: the folder of a finished run of `smoke_config(**overrides)`, trained once per
  session (by the first test that asks) and shared by every test that asks for the same configuration. A shared run
  is read, never written: a test that writes into a run copies it first (`copy_run`). A test that changes a shared
  run anyway fails at its teardown, naming the run and the files.
- `smoke_run`: the default one, `smoke_config()` (ORL, lowrank head, R=2, 1 epoch, CPU), in a folder named
  ``orl-lowrank-r2`` as `reproduce` names it.
- `train_cli(capsys, *argv)`: the training command (`python -m sosvae_lib.train ARGV`) in this process.

tests/ is on sys.path under pytest (as for fake_cuda), so test files import the plain helpers with
``from conftest import copy_run, smoke_config, train_cli``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sosvae_lib.config import TrainConfig

# folder of each shared run -> {file: (size, mtime_ns)} as it was trained
_SHARED: dict[Path, dict[str, tuple[int, int]]] = {}


def smoke_config(**overrides) -> TrainConfig:
    """The smoke preset on ORL on the CPU, with ``overrides`` (TrainConfig fields) applied."""
    return TrainConfig.preset("smoke", **{"dataset": "orl", "device": "cpu", **overrides})


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run folder ``run`` at ``dest`` (which must not exist); returns ``dest``."""
    shutil.copytree(run, dest)
    return dest


def train_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the training command with ``argv`` in this process: (exit code, stdout, stderr)."""
    from sosvae_lib import train as train_mod  # imported on use: a test file that trains nothing never loads it

    rc = train_mod.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_name(config: TrainConfig) -> str:
    return f"{config.dataset}-{config.head}" + ("" if config.head == "diagonal" else f"-r{config.rank}")


@pytest.fixture(scope="session")
def trained_smoke_run(tmp_path_factory):
    """``trained_smoke_run(**overrides) -> Path``: a finished run of ``smoke_config(**overrides)``, trained once per
    session into its own temporary folder. Read it only; `copy_run` it before writing into it."""
    from sosvae_lib import train as train_mod

    runs: dict[str, Path] = {}

    def get(**overrides) -> Path:
        config = smoke_config(**overrides)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in runs:
            out = tmp_path_factory.mktemp("smoke-run") / _run_name(config)
            train_mod.train(config, out, progress=False)
            runs[key] = out
            _SHARED[out] = _snapshot(out)
        return runs[key]

    return get


@pytest.fixture(scope="session")
def smoke_run(trained_smoke_run) -> Path:
    """The default shared smoke run (`smoke_config()`), read-only."""
    return trained_smoke_run()


@pytest.fixture(autouse=True)
def _shared_runs_stay_as_trained():
    """Fail the test that wrote into a shared run (the next tests would see its files)."""
    yield
    changed = {}
    for run, before in _SHARED.items():
        after = _snapshot(run)
        if after != before:
            changed[run] = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            _SHARED[run] = after  # report each change once
    if changed:
        pytest.fail("a shared smoke run was changed (copy_run it before writing into it): "
                    + "; ".join(f"{run}: {', '.join(files)}" for run, files in changed.items()), pytrace=False)
