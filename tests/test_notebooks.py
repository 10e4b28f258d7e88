"""The notebooks, tested like code: `python -m sosvae_lib.reproduce --scale smoke` executes every notebook through
papermill with a per-cell timeout; the tests check the files it writes and the numbers each notebook records
(finite, in range). One notebook is also executed on its own with its tiny default parameters."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest

from sosvae_lib import reproduce, tables
from sosvae_lib.runs import Run

CELL_TIMEOUT = 240  # seconds per cell
VARIANTS = ("orl-lowrank-r1", "orl-lowrank-r2", "orl-diagonal")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    t0 = time.perf_counter()
    rc = reproduce.main(["--scale", "smoke", "--out", str(out), "--cell-timeout", str(CELL_TIMEOUT)])
    return dict(rc=rc, dir=out / "smoke", seconds=time.perf_counter() - t0)


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _numbers(smoke, name: str) -> dict:
    return json.loads((smoke["dir"] / "figures" / f"{name}.json").read_text())


@pytest.mark.slow
def test_smoke_reproduction_writes_every_expected_file(smoke):
    assert smoke["rc"] == 0
    d = smoke["dir"]
    stems = [f"{v}_training" for v in VARIANTS] + ["orl_samples", "orl_editing", "orl_columns", "orl_principal",
                                                   "orl_interpolation", "orl_editor", "orl_real_inpainting",
                                                   "metrics_vs_rank"]
    for stem in stems:
        for ext in ("png", "pdf"):
            assert (d / "figures" / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    for name in ("metrics.csv", "metrics.md", "metrics.json"):
        assert (d / "tables" / name).is_file()
    executed = sorted(p.name for p in (d / "notebooks").glob("*.ipynb"))
    assert executed == sorted([f"01_train-{v}.ipynb" for v in VARIANTS]
                              + ["02_samples-orl.ipynb", "03_editing-orl.ipynb", "04_components-orl.ipynb",
                                 "05_metrics.ipynb", "06_editor-orl.ipynb"])
    readme = (d / "README.md").read_text()
    for stem in stems:
        assert f"](figures/{stem}.png)" in readme
    assert "| orl | lowrank | 2 |" in readme and "| orl | lowrank R=2 |" in readme  # table and headline
    status = json.loads((d / "reproduce.json").read_text())
    assert status["failed"] == [] and status["skipped"] == []
    assert set(status["runs"]) == set(VARIANTS) and status["wall_seconds"] < 300
    # the runs are complete and would be reused by a second invocation
    for v in reproduce.plan("smoke"):
        assert Run(d / "runs" / v.name).state(v.config()) == "complete"


@pytest.mark.slow
def test_metrics_table_has_the_issue_columns_and_sane_numbers(smoke):
    with (smoke["dir"] / "tables" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0])[:len(tables.COLUMNS)] == tables.COLUMNS
    keys = {(r["dataset"], r["head"], int(r["rank"])) for r in rows}
    assert keys == {("orl", "lowrank", 1), ("orl", "lowrank", 2), ("orl", "diagonal", 0), ("orl", "pca", 1),
                    ("orl", "pca", 2)}
    for r in rows:
        assert math.isfinite(float(r["test_nll_bpd"]))
        assert -1 <= float(r["residual_corr_samples"]) <= 1 and -1 <= float(r["residual_corr_data"]) <= 1
        assert 0 <= float(r["span_capture"]) <= 1
        assert 0 <= float(r["correction_rmse_cond"]) and 0 <= float(r["correction_rmse_uncond"])
        if r["head"] == "diagonal":  # nothing propagates: revealing a patch does not change the other pixels
            assert float(r["span_capture"]) == 0
            assert float(r["correction_rmse_cond"]) == pytest.approx(float(r["correction_rmse_uncond"]), rel=1e-9)


@pytest.mark.slow
def test_01_train_records_the_final_epoch(smoke):
    for v in reproduce.plan("smoke"):
        n = _numbers(smoke, f"{v.name}_training")
        assert n["complete"] is True and n["epochs"] == v.config().epochs
        assert n["rank"] == (0 if v.head == "diagonal" else v.rank)
        assert _finite(n["nll_bpd"], n["kl"], n["train_seconds"]) and n["kl"] >= 0 and n["lam"] >= 0
        assert n["target_kl"] == v.config().target_kl


@pytest.mark.slow
def test_02_samples_records_structured_and_white_residuals(smoke):
    n = _numbers(smoke, "orl_samples")
    c, h, w = n["pixel"]
    assert c == 0 and 0 <= h < 16 and 0 <= w < 16
    for name in ("lowrank", "diagonal"):
        s = n[name]
        assert _finite(*s.values()) and -1 <= s["residual_corr"] <= 1 and s["mean_variance"] > 0
        assert s["cov_self_error"] <= 1e-6 * max(1.0, s["mean_variance"])
    assert n["diagonal"]["cov_offdiag_fraction"] == 0
    assert abs(n["diagonal"]["residual_corr"]) < 0.2  # white noise
    assert n["lowrank"]["cov_offdiag_fraction"] > 0.5


@pytest.mark.slow
def test_03_editing_propagates_only_with_the_lowrank_model(smoke):
    n = _numbers(smoke, "orl_editing")
    for name in ("lowrank", "diagonal"):
        s = n[name]
        assert _finite(*s.values()) and s["stroke_pixels"] > 0 and s["patch_error"] <= 1e-5
        assert s["rmse_cond"] >= 0 and s["rmse_uncond"] >= 0 and s["sample_spread"] >= 0
    assert n["diagonal"]["propagated_rms"] == 0 and n["diagonal"]["propagated_fraction"] == 0
    assert n["lowrank"]["propagated_rms"] > 0 and n["lowrank"]["propagated_fraction"] > 0.5
    assert n["diagonal"]["rmse_cond"] == pytest.approx(n["diagonal"]["rmse_uncond"], rel=1e-6)


@pytest.mark.slow
def test_03_editing_records_real_inpainting_of_every_method(smoke):
    n = _numbers(smoke, "orl_real_inpainting")
    assert sorted(n) == ["left_half", "patch", "top_half"]
    # 16×16 grey images: half hidden, or all but the central 10×10 square; the evaluation calibrated the diagonal
    assert {k: n[k]["hidden_pixels"] for k in n} == dict(top_half=128, left_half=128, patch=256 - 100)
    for row in n.values():
        assert row["calibrated"] is True
        assert set(row["rmse_hidden"]) == {"PPCA", "diagonal", "lowrank", "train mean"}
        assert _finite(*row["rmse_hidden"].values()) and all(0 < v < 1 for v in row["rmse_hidden"].values())


@pytest.mark.slow
def test_04_components_records_the_spectrum_and_interpolations(smoke):
    n = _numbers(smoke, "orl_components")
    s = n["sweeps"]
    assert s["rank"] == 2 and len(s["eigenvalues"]) == 2
    assert s["eigenvalues"][0] >= s["eigenvalues"][1] >= 0 and 0.5 <= s["top_fraction"] <= 1
    assert s["trace_error"] < 1e-6 and s["orthonormality_error"] < 1e-6 and s["sweep_range"] > 0
    for name in ("lowrank", "diagonal"):
        it = n["interpolation"][name]
        assert _finite(*it.values()) and it["endpoint_error"] < 1e-5
        assert 0 < it["lerp_norm_ratio"] <= it["slerp_norm_ratio"] + 1e-6 and it["slerp_norm_ratio"] <= 1.5


@pytest.mark.slow
def test_06_editor_applies_the_scripted_strokes_through_the_editor_api(smoke):
    n = _numbers(smoke, "orl_editor")
    assert set(n) == {"lowrank", "diagonal"}
    for name in ("lowrank", "diagonal"):
        s = n[name]
        assert _finite(*s.values()) and s["stroke_pixels"] > 0 and s["sample_spread"] >= 0
        # the state machine is exact: undo and replay bitwise, reset to μ, the image is condition()'s mean,
        # samples keep the painted values
        assert s["undo_error"] == s["replay_error"] == s["reset_error"] == s["condition_error"] == 0
        assert s["sample_stroke_error"] == 0
    assert n["diagonal"]["propagated_rms"] == 0 and n["diagonal"]["propagated_fraction"] == 0
    assert n["lowrank"]["propagated_rms"] > 0 and n["lowrank"]["propagated_fraction"] > 0.5
    # the widget was built and displayed (inert without a frontend)
    nb = json.loads((smoke["dir"] / "notebooks" / "06_editor-orl.ipynb").read_text())
    mimes = {k for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
             for k in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes


@pytest.mark.slow
def test_05_metrics_records_the_table_rows(smoke):
    n = _numbers(smoke, "metrics_vs_rank")
    assert len(n["rows"]) == 5
    head = n["headline"]["orl"]
    assert head["lowrank"]["rank"] == 2 and head["pca"]["rank"] == 2 and head["diagonal"]["rank"] == 0
    assert head["lowrank"]["residual_corr_samples"] > head["diagonal"]["residual_corr_samples"]


@pytest.mark.parametrize("name", reproduce.NOTEBOOKS)
def test_every_parameter_is_commented(name):
    import nbformat
    import papermill

    nb = nbformat.read(reproduce.NOTEBOOKS_DIR / f"{name}.ipynb", 4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    params = papermill.inspect_notebook(str(reproduce.NOTEBOOKS_DIR / f"{name}.ipynb"))
    lines = [ln for ln in tagged[0].source.splitlines() if ln and not ln.startswith("#")]
    assert len(params) == len(lines) >= 5  # papermill parsed every line
    assert all(p["help"] for p in params.values()), [k for k, p in params.items() if not p["help"]]


@pytest.mark.slow
def test_a_notebook_runs_on_its_own_with_its_default_parameters(tmp_path):
    """05_metrics with its defaults trains and evaluates the smoke plan itself (paths relative to its folder)."""
    cwd = tmp_path / "notebooks"
    cwd.mkdir()
    out = tmp_path / "05_defaults.ipynb"
    reproduce.execute_notebook("05_metrics", out, {}, cwd, CELL_TIMEOUT)
    n = json.loads((tmp_path / "runs" / "smoke" / "figures" / "metrics_vs_rank.json").read_text())
    assert {(r["head"], r["rank"]) for r in n["rows"]} == {("lowrank", 1), ("lowrank", 2), ("diagonal", 0),
                                                          ("pca", 1), ("pca", 2)}
    assert (tmp_path / "runs" / "smoke" / "tables" / "metrics.md").is_file()
    shutil.rmtree(tmp_path / "runs")


@pytest.mark.slow
def test_a_second_run_keeps_every_notebook_and_run(smoke, monkeypatch):
    """Resuming a finished reproduction executes nothing: the runs are reused, each executed notebook is kept (same
    parameters, newer than its runs), so a reproduction cut into time-limited commands moves forward."""
    executed = []
    monkeypatch.setattr(reproduce, "execute_notebook", lambda name, *a, **k: executed.append(name))
    out = smoke["dir"].parent
    assert reproduce.main(["--scale", "smoke", "--out", str(out), "--cell-timeout", str(CELL_TIMEOUT)]) == 0
    assert executed == []
    status = json.loads((smoke["dir"] / "reproduce.json").read_text())
    assert {r["state"] for r in status["runs"].values()} == {"complete"} and status["failed"] == []
    # an evaluation written again (newer than the executed notebooks) makes the notebooks that read it run again
    eval_file = smoke["dir"] / "runs" / "orl-diagonal" / "eval_test.json"
    later = time.time() + 5
    os.utime(eval_file, (later, later))
    assert reproduce.main(["--scale", "smoke", "--out", str(out), "--cell-timeout", str(CELL_TIMEOUT)]) == 0
    assert sorted(executed) == ["02_samples", "03_editing", "04_components", "05_metrics", "06_editor"]
