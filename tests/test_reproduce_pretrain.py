"""A plan with a shared mean pre-training (`reproduce._variants(..., shared_pretrain=...)`): it is trained first and
not evaluated, every head starts from it, and a head whose pre-training was trained again is trained again."""

from __future__ import annotations

import json

import pytest

from sosvae_lib import reproduce
from sosvae_lib.runs import Run

pytestmark = pytest.mark.slow  # reproduce runs the notebooks through papermill


def _plan(pretrain_seed: int):
    variants = reproduce._variants("orl", "smoke", (2,), 0.1, shared_pretrain=(1, 0.1))
    pre = variants[0]
    overrides = tuple(sorted({**dict(pre.overrides), "seed": pretrain_seed}.items()))
    return [reproduce.dataclasses.replace(pre, overrides=overrides), *variants[1:]]


def _run(monkeypatch, out, pretrain_seed=0):
    monkeypatch.setattr(reproduce, "plan", lambda scale, folder_root=None: _plan(pretrain_seed))
    return reproduce.reproduce("smoke", out=out, device="cpu", figure_groups=[])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro-pretrain")
    mp = pytest.MonkeyPatch()
    try:
        status = _run(mp, out)
    finally:
        mp.undo()
    return out / "smoke", status


def test_the_pretraining_is_trained_first_and_every_head_starts_from_it(shared):
    d, status = shared
    assert status["failed"] == [] and status["plan"][0] == "orl-pretrain"
    assert list(status["runs"]) == ["orl-pretrain", "orl-lowrank-r2", "orl-diagonal"]
    pre = Run(d / "runs" / "orl-pretrain")
    assert pre.state() == "complete" and pre.evaluation("test") is None  # trained, not evaluated
    digest = pre.summary()["weights_sha256"]
    for name in ("orl-lowrank-r2", "orl-diagonal"):
        run = Run(d / "runs" / name)
        assert run.config.init_from == str(pre.folder)
        assert run.config.pretrain_epochs == 0
        assert run.summary()["init_from_weights_sha256"] == digest
        assert run.evaluation("test") is not None
    rows = [r["run"] for r in json.loads((d / "tables" / "metrics.json").read_text())] \
        if (d / "tables" / "metrics.json").exists() else None
    if rows is not None:
        assert "orl-pretrain" not in rows


def test_a_second_reproduction_reuses_everything_and_a_new_pretraining_retrains_the_heads(shared, monkeypatch):
    d, _ = shared
    out = d.parent  # in place (the heads name their pre-training by its absolute path); the last test to write it
    again = _run(monkeypatch, out)
    assert {k: v["state"] for k, v in again["runs"].items()} == dict.fromkeys(again["runs"], "complete")

    old = Run(out / "smoke" / "runs" / "orl-pretrain").summary()["weights_sha256"]
    changed = _run(monkeypatch, out, pretrain_seed=1)  # another pre-training: its heads are stale
    assert {k: v["state"] for k, v in changed["runs"].items()} == dict.fromkeys(changed["runs"], "trained")
    new = Run(out / "smoke" / "runs" / "orl-pretrain").summary()["weights_sha256"]
    assert new != old
    for name in ("orl-lowrank-r2", "orl-diagonal"):
        assert Run(out / "smoke" / "runs" / name).summary()["init_from_weights_sha256"] == new


def test_a_head_whose_source_summary_changed_is_stale(shared, tmp_path):
    d, _ = shared
    runs = reproduce.shutil.copytree(d / "runs", tmp_path / "runs")
    v = _plan(0)[1]
    config = v.config(None, runs).replace(device="cpu", root=Run(runs / v.name).config.root)
    assert not reproduce._source_changed(Run(runs / v.name), config)
    summary = Run(runs / "orl-pretrain").summary()
    Run(runs / "orl-pretrain").write_summary(dict(summary, weights_sha256="0" * 64))
    assert reproduce._source_changed(Run(runs / v.name), config)
