"""One command that regenerates every figure and table of the SOS-VAE reproduction (Langley et al., "Structured
Uncertainty in the Observation Space of Variational Autoencoders", TMLR 2022).

    python -m sosvae_lib.reproduce --scale smoke|cpu|gpu|paper [--only NAMES] [--force] [--celeba-root PATH]
        [--folder-root PATH] [--out DIR] [--cell-timeout S]

For the chosen scale (`plan`) it trains each variant by executing ``notebooks/01_train.ipynb`` with papermill (a
finished run is reused unless ``--force``; an interrupted one is resumed), evaluates it (`sosvae_lib.evaluate`),
executes ``02_samples``, ``03_editing``, ``04_components`` and ``06_editor`` (the editor widget; headless, its two
scripted strokes) for every dataset and ``05_metrics`` once, and writes

    <out>/<scale>/figures/*.png, *.pdf  (and the numbers each notebook recorded, *.json)
    <out>/<scale>/tables/metrics.csv, metrics.md, metrics.json
    <out>/<scale>/notebooks/*.ipynb     (the executed notebooks)
    <out>/<scale>/runs/<variant>/       (run directories: checkpoint, config, metrics.csv, eval_test.json)
    <out>/<scale>/README.md             (gallery and table), reproduce.json (plan, status and timings)

A dataset whose data is absent is skipped with one line saying where it was looked for; a failing step is reported
and the rest goes on (the exit status is then 1). Data locations: ``--celeba-root`` (else ``$SOSVAE_CELEBA``, else
``./data/celeba``, ``~/data/celeba``, ``../shared/data/celeba`` next to the project), ``--folder-root`` (a folder
of grayscale images standing in for the paper's brain MRI; its variants run only when given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import SUMMARY, atomic_write_json, atomic_write_text, load_run
from .tables import COLUMNS, format_cell, headline

SCALES = ("smoke", "cpu", "gpu", "paper")
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_train", "02_samples", "03_editing", "04_components", "05_metrics", "06_editor")
# Fields of a run's configuration that may differ from the plan without making the run stale.
_IGNORED_FIELDS = ("root", "device", "num_workers", "epochs")

# Evaluation options per scale (sosvae_lib.evaluate.evaluate); progress bars off in batch runs.
EVAL_OPTIONS: dict[str, dict[str, Any]] = {
    "smoke": dict(k=2, num_images=16, num_samples=16, batch_size=16, patch=6, pca_train_items=32, progress=False),
    "cpu": dict(k=8, num_images=200, batch_size=50, patch=10, pca_train_items=2000, face_images=64, progress=False),
    "gpu": dict(k=64, num_images=1000, batch_size=50, patch=10, pca_train_items=5000, device="auto",
                progress=False),
    "paper": dict(k=64, num_images=1000, batch_size=25, patch=10, pca_train_items=2000, device="auto",
                  progress=False),
}
CELL_TIMEOUT = {"smoke": 300, "cpu": 3600, "gpu": None, "paper": None}


@dataclass(frozen=True)
class Variant:
    """One training run of the plan: ``preset`` with ``overrides`` (TrainConfig fields); ``main`` marks the lowrank
    run whose figures are drawn for its dataset (beside the dataset's diagonal run)."""

    dataset: str
    head: str
    rank: int
    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()
    main: bool = False
    minutes: float = 1.0  # rough training time on 2 CPU cores (smoke, cpu) or one GPU (gpu, paper), for the plan line
    tag: str = ""  # tells apart two groups of one dataset (e.g. CelebA at two sizes): "celeba" + "109x89"

    @property
    def group(self) -> str:
        """The dataset's runs whose figures are drawn together: the dataset name, with the tag when there is one."""
        return f"{self.dataset}{self.tag}" if self.tag else self.dataset

    @property
    def name(self) -> str:
        return f"{self.group}-diagonal" if self.head == "diagonal" else f"{self.group}-{self.head}-r{self.rank}"

    def config_fields(self, root: str | None = None) -> dict[str, Any]:
        """The TrainConfig.preset keyword arguments of this variant."""
        fields = dict(dataset=self.dataset, head=self.head, rank=self.rank, **dict(self.overrides))
        if root is not None:
            fields["root"] = str(root)
        return fields

    def config(self, root: str | None = None):
        from .config import TrainConfig
        return TrainConfig.preset(self.preset, **self.config_fields(root))


def _variants(dataset: str, preset: str, ranks: Sequence[int], minutes: float, diagonal: bool = True,
              main_rank: int | None = None, learned: bool = False, tag: str = "", **overrides: Any) -> list[Variant]:
    """lowrank at each of ``ranks`` (the figures' run: ``main_rank``, default the largest), and optionally the
    pixel-wise baseline and ``lowrank-diag`` at the main rank."""
    ov = tuple(sorted(overrides.items()))
    main_rank = main_rank or max(ranks)
    out = [Variant(dataset, "lowrank", r, preset, ov, main=(r == main_rank), minutes=minutes, tag=tag)
           for r in ranks]
    if learned:
        out.append(Variant(dataset, "lowrank-diag", main_rank, preset, ov, minutes=minutes, tag=tag))
    if diagonal:  # the pixel-wise baseline keeps the preset's rank field (unused) so its PPCA row matches
        out.append(Variant(dataset, "diagonal", main_rank, preset, ov, minutes=minutes, tag=tag))
    return out


def plan(scale: str, folder_root: str | None = None) -> list[Variant]:
    """The variants trained at ``scale``.

    - ``smoke`` (tests, < 5 min): orl at 16×16, lowrank R ∈ {1, 2} and diagonal, one epoch on 32 images.
    - ``cpu`` (≤ 60 min on 2 cores): orl 64×64 lowrank R ∈ {5, 25}, lowrank-diag R = 25 and diagonal;
      fashion-mnist 32×32 lowrank R = 25 and diagonal; celeba 64×64 on the subset's whole training split, lowrank
      R = 25, lowrank-diag and diagonal; (folder 64×64, R = 25 and diagonal, when ``folder_root`` is given).
    - ``gpu`` (one GPU; resumable across commands, each finished run is reused): the cpu preset widened to latent
      128 at batch 64 with the training set on the device: celeba 64×64 on the whole training split, lowrank
      R ∈ {1, 5, 10, 25, 50}, lowrank-diag and diagonal; celeba at the subset's native 109×89 (``celeba109x89``),
      R = 25, lowrank-diag and diagonal; orl 64×64 and the full fashion-mnist 32×32, R = 25 and diagonal. The
      minutes are estimates, not measurements (no GPU has run it yet).
    - ``paper`` (GPU): celeba 218×178 with the paper preset, lowrank R ∈ {1, 5, 25} and diagonal; (folder 128×128,
      R = 25 and diagonal, when ``folder_root`` is given).
    The PPCA baseline of each rank is scored by the evaluation of the same runs.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "smoke":
        return _variants("orl", "smoke", (1, 2), 0.2)
    if scale == "cpu":
        # orl: the preset's epochs over its 320 training faces. The others get about the same compute: a 32×32
        # image trains ~2.5× faster than a 64×64 one, a 64×64 RGB one about as fast (the trunk dominates).
        out = _variants("orl", "cpu", (5, 25), 2.6, image_size=64)
        # the learned-diagonal variant: the paper's fixed ε = 1e-5 makes conditioning on true pixels an
        # unregularised least-squares fit of R coefficients; a learned d shows what a noise model changes.
        out.append(Variant("orl", "lowrank-diag", 25, "cpu", (("image_size", 64),), minutes=2.6))
        out += _variants("fashion-mnist", "cpu", (25,), 1.8, image_size=32, max_items=4000, epochs=8,
                        pretrain_epochs=2)
        # celeba: the whole training split of the subset (7,001 faces), 6 epochs of which 2 pre-train the mean
        # (2,000 images × 6 epochs left the prior means brown blobs); 75 images/s on 2 idle cores.
        out += _variants("celeba", "cpu", (25,), 9.4, learned=True, image_size=64, epochs=6, pretrain_epochs=2)
        if folder_root:
            out += _variants("folder", "cpu", (25,), 3.0, image_size=64, max_items=2000, epochs=6,
                            pretrain_epochs=2)
        return out
    if scale == "gpu":
        gpu = dict(latent=128, batch_size=64, data_on_device=True, device="auto")
        out = _variants("celeba", "cpu", (1, 5, 10, 25, 50), 2.0, main_rank=25, learned=True, image_size=64,
                        epochs=40, **gpu)
        out += _variants("celeba", "cpu", (25,), 4.0, learned=True, tag="109x89", image_size=(109, 89), epochs=40,
                         **gpu)
        out += _variants("orl", "cpu", (25,), 0.5, image_size=64, epochs=200, **{**gpu, "batch_size": 32})
        out += _variants("fashion-mnist", "cpu", (25,), 3.0, image_size=32, epochs=10, **gpu)
        return out
    out = _variants("celeba", "paper", (1, 5, 25), 240.0)
    if folder_root:
        out += _variants("folder", "paper", (25,), 120.0, image_size=128)
    return out


def select(variants: Sequence[Variant], only: str | None) -> list[Variant]:
    """The variants named by ``only`` (comma-separated variant names or dataset names; None: all)."""
    if not only:
        return list(variants)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {v.name for v in variants} | {v.dataset for v in variants} | {v.group for v in variants}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"only: unknown name {unknown[0]!r} (this scale has: {', '.join(sorted(known))})")
    return [v for v in variants if v.name in wanted or v.dataset in wanted or v.group in wanted]


# -------------------------------------------------------------------------------------------------------------
# Runs: state, reuse, loading
# -------------------------------------------------------------------------------------------------------------

def data_available(dataset: str, root: str | None, image_size: Any = None) -> str | None:
    """None if ``dataset`` can be loaded, else the one-line reason (where its files were looked for)."""
    from .data import load_dataset
    try:
        load_dataset(dataset, "test", image_size=image_size, root=root, max_items=1)
    except (FileNotFoundError, ValueError, OSError) as err:
        return str(err).splitlines()[0]
    return None


def run_state(run_dir: str | os.PathLike, config: Any = None) -> str:
    """``absent`` (no checkpoint), ``complete`` (finished: summary.json says so and the checkpoint reached the
    planned epochs), ``partial`` (a checkpoint to resume) or ``stale`` (trained with another configuration than
    ``config``; fields in ``_IGNORED_FIELDS`` aside)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not (run_dir / "checkpoint.pt").is_file() or not cfg_path.is_file():
        return "absent"
    if config is not None:
        stored = json.loads(cfg_path.read_text())
        wanted = config.to_dict()
        if any(stored.get(k) != wanted[k] for k in wanted if k not in _IGNORED_FIELDS):
            return "stale"
        if int(stored.get("epochs", 0)) > int(wanted["epochs"]):  # trained past the plan: cannot be cut back
            return "stale"
    summary_path = run_dir / SUMMARY
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("complete") and (config is None or int(summary.get("epochs", -1)) == int(config.epochs)):
            return "complete"
    return "partial"


def load_or_train(run_dir: str | os.PathLike, train_missing: bool = False, preset: str = "smoke",
                  **config_fields: Any):
    """(model in eval mode, TrainConfig) of the run in ``run_dir``. If it holds no finished run and
    ``train_missing``, train ``TrainConfig.preset(preset, **config_fields)`` there first (so a figure notebook can
    run on its own); otherwise a missing run is an error naming the directory."""
    from .config import TrainConfig
    from .train import train

    run_dir = Path(run_dir)
    if run_state(run_dir) != "complete":
        if not train_missing:
            raise FileNotFoundError(f"run_dir: no finished run in {run_dir}; train it with notebooks/01_train.ipynb "
                                    f"or `python -m sosvae_lib.train --out {run_dir}` (or set train_missing=True)")
        train(TrainConfig.preset(preset, **config_fields), run_dir, resume=True, progress=False)
    return load_run(run_dir)


def test_image(config: Any, index: int = 0, split: str = "test"):
    """Image ``index`` [C, H, W] of ``split`` of the dataset a run was trained on (same size and root)."""
    from .data import load_dataset
    data = load_dataset(config.dataset, split, image_size=config.image_size, root=config.root,
                        max_items=index + 1)
    if not 0 <= index < len(data):
        raise ValueError(f"image_index: must be in [0, {len(data)}) for the {split} split of {config.dataset}, "
                         f"got {index}")
    item = data[index]
    return item[0] if isinstance(item, (tuple, list)) else item


def evaluate_runs(run_dirs: Sequence[str | os.PathLike], force: bool = False, **eval_options: Any) -> list[dict]:
    """`sosvae_lib.evaluate.evaluate` each finished run whose ``eval_test.json`` is missing, older than its
    checkpoint or lacks a column of the table (every one with ``force``); returns the results (fresh or read
    back)."""
    from .evaluate import evaluate
    out = []
    for d in map(Path, run_dirs):
        if run_state(d) != "complete":
            continue
        path = d / "eval_test.json"
        cached = None
        if not force and path.is_file() and path.stat().st_mtime >= (d / "checkpoint.pt").stat().st_mtime:
            cached = json.loads(path.read_text())
            if any(k not in cached for k in COLUMNS):
                cached = None
        out.append(cached if cached is not None else evaluate(d, "test", **eval_options))
    return out


def ensure_runs(runs_dir: str | os.PathLike, scale: str = "smoke", datasets: Sequence[str] | None = None,
                **eval_options: Any) -> list[Path]:
    """Train (in this process) and evaluate every variant of ``plan(scale)`` (of ``datasets``) that ``runs_dir``
    lacks; returns their run directories. For a notebook run on its own; `main` runs the plan through papermill."""
    from .train import train
    dirs = []
    for v in plan(scale):
        if datasets is not None and v.dataset not in datasets:
            continue
        d = Path(runs_dir) / v.name
        if run_state(d, v.config()) != "complete":
            train(v.config(), d, resume=True, progress=False)
        dirs.append(d)
    evaluate_runs(dirs, **{**EVAL_OPTIONS[scale], **eval_options})
    return dirs


# -------------------------------------------------------------------------------------------------------------
# Notebooks
# -------------------------------------------------------------------------------------------------------------

def execute_notebook(name: str, output: Path, parameters: dict[str, Any], cwd: Path,
                     cell_timeout: int | None) -> None:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``output`` (the executed copy)."""
    import papermill

    source = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"notebook: {source} is missing; run from a checkout of the repository")
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(source), str(output), parameters=parameters, kernel_name="python3",
                               cwd=str(cwd), execution_timeout=cell_timeout, progress_bar=False,
                               log_output=False, request_save_on_cell_execute=False)


def _error_line(err: BaseException) -> str:
    name = getattr(err, "ename", type(err).__name__)
    value = getattr(err, "evalue", str(err))
    return f"{name}: {str(value).splitlines()[0] if str(value) else ''}"


# -------------------------------------------------------------------------------------------------------------
# The README of a results folder
# -------------------------------------------------------------------------------------------------------------

CAPTIONS = {
    "samples": "Ten draws z ~ N(0, I), the same for both models. Rows: the mean μ(z); a sample y; y − μ; the "
               "variance map diag Σ; Σ₊⁽ⁱ⁾ and Σ₋⁽ⁱ⁾, the positive and negative parts of the covariance row of "
               "the pixel marked ×. Left: SOS-VAE (lowrank), right: the pixel-wise baseline (diagonal), whose "
               "samples are μ plus white noise and whose Σ⁽ⁱ⁾ is a single pixel.",
    "editing": "The editor. Top row of each model: dark strokes (outlined) applied to the mean of a test image's "
               "reconstruction and propagated to the whole image by Gaussian conditioning; the change columns show "
               "the conditional mean minus μ outside the strokes. Bottom row: the true image with its most "
               "uncertain square revealed, μ, E[x | patch], and completions sampled from p(x | patch). For the "
               "diagonal model nothing propagates.",
    "editor": "The editor widget's API applied by script (notebooks/06_editor.ipynb): two dark strokes painted "
              "one after the other (outlined), each image the conditional mean given every painted pixel; the "
              "change columns show the cumulative change outside the strokes; then samples from p(x | strokes). "
              "For the diagonal model nothing propagates.",
    "columns": "Each column of P (by decreasing norm) swept from −3 to +3 around μ(z = 0); the last column is the "
               "column itself.",
    "principal": "Each principal direction of P Pᵀ (from the R×R eigenproblem), swept from −3 to +3 standard "
                 "deviations around μ(z = 0); eigenvalue w on the left, direction in the last column.",
    "interpolation": "Latent interpolation between two prior draws: lerp and slerp, means and samples drawn with "
                     "one fixed observation noise along each row.",
    "training": "Training curves: NLL (bits/dim), KL(q‖p) against its target (dashed), and the Lagrange "
                "multiplier λ of the constrained objective.",
    "metrics_vs_rank": "Test NLL, lag-1 spatial correlation of sample residuals y − μ (band: that of the data "
                       "residuals x − μ(x)) and span capture of x − μ(x) against the rank R; dashed: the "
                       "pixel-wise model, dotted: the PPCA baseline.",
}


def _caption(stem: str) -> str:
    for key in ("metrics_vs_rank", "interpolation", "principal", "columns", "editing", "editor", "samples",
                "training"):
        if stem.endswith(key):
            return CAPTIONS[key]
    return ""


def write_readme(scale_dir: Path, scale: str, status: dict[str, Any]) -> Path:
    """``scale_dir/README.md``: how it was made, the plan and its status, the table and the gallery."""
    lines = [f"# SOS-VAE reproduction: `{scale}` scale", "",
             f"Made by `python -m sosvae_lib.reproduce --scale {scale}` on {status['finished']} "
             f"in {status['wall_seconds'] / 60:.1f} min ({status['machine']}).", ""]
    if status["skipped"]:
        lines += ["Skipped:", ""] + [f"- {s}" for s in status["skipped"]] + [""]
    if status["failed"]:
        lines += ["Failed:", ""] + [f"- {s}" for s in status["failed"]] + [""]
    lines += ["## Runs", "", "| variant | status | epochs | train s | test NLL (bpd) |", "|---|---|---|---|---|"]
    for name, r in status["runs"].items():
        lines.append(f"| {name} | {r.get('state', '')} | {r.get('epochs', '')} | "
                     f"{format_cell(r.get('train_seconds'))} | {format_cell(r.get('test_nll_bpd'))} |")
    rows_path = scale_dir / "tables" / "metrics.json"
    if rows_path.is_file():
        keys = ("test_nll_bpd", "residual_corr_samples", "residual_corr_data", "span_capture",
                "inpaint_rmse_uncond", "inpaint_rmse_cond")
        lines += ["", "## Headline: lowrank against diagonal", "",
                  "Per dataset, the lowrank run of the largest rank, the pixel-wise model and the PPCA baseline of "
                  "that rank. SOS-VAE's claims predict: residual correlation of samples close to that of the data "
                  "(diagonal ≈ 0), span capture well above R/D, and a lower inpainting RMSE once the patch is "
                  "revealed (unchanged for diagonal).", "",
                  "| dataset | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for ds, entry in headline(json.loads(rows_path.read_text())).items():
            for model in ("lowrank", "diagonal", "pca"):
                if model in entry:
                    r = entry[model]
                    label = model if model == "diagonal" else f"{model} R={r['rank']}"
                    lines.append(f"| {ds} | {label} | " + " | ".join(format_cell(r.get(k)) for k in keys) + " |")
    md = scale_dir / "tables" / "metrics.md"
    if md.is_file():
        lines += ["", "## Metrics", "", "One row per (dataset, head, rank); `pca` is the global PPCA baseline of the "
                  "same rank. Full table: [tables/metrics.csv](tables/metrics.csv).", "", md.read_text().rstrip(), ""]
    figures = sorted((scale_dir / "figures").glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""]
        for f in sorted(figures, key=lambda p: (p.stem.endswith("training"), p.stem)):
            lines += [f"### {f.stem}", "", _caption(f.stem), "", f"![{f.stem}](figures/{f.name})", ""]
    path = scale_dir / "README.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


# -------------------------------------------------------------------------------------------------------------
# The command
# -------------------------------------------------------------------------------------------------------------

@dataclass
class _Log:
    start: float = field(default_factory=time.perf_counter)

    def __call__(self, msg: str) -> None:
        t = time.perf_counter() - self.start
        print(f"[{int(t // 60):3d}:{int(t % 60):02d}] {msg}", flush=True)


def reproduce(scale: str, out: str | os.PathLike = "results", only: str | None = None, force: bool = False,
              celeba_root: str | None = None, folder_root: str | None = None,
              cell_timeout: int | None | str = "default") -> dict[str, Any]:
    """Run the plan of ``scale`` (see the module docstring); returns the status dict also written to
    ``<out>/<scale>/reproduce.json``."""
    log = _Log()
    variants = select(plan(scale, folder_root), only)
    timeout = CELL_TIMEOUT[scale] if cell_timeout == "default" else cell_timeout
    scale_dir = Path(out).resolve() / scale
    runs_dir, figures_dir, tables_dir, nb_dir = (scale_dir / s for s in ("runs", "figures", "tables", "notebooks"))
    for d in (runs_dir, figures_dir, tables_dir, nb_dir):
        d.mkdir(parents=True, exist_ok=True)
    roots = {"celeba": celeba_root, "folder": folder_root}
    status: dict[str, Any] = dict(scale=scale, plan=[v.name for v in variants], skipped=[], failed=[], runs={},
                                  machine=_machine())
    log(f"scale {scale}: {len(variants)} runs, about {sum(v.minutes for v in variants):.0f} min of training "
        f"({', '.join(v.name for v in variants)}); writing {scale_dir}")

    # 1. data
    groups = list(dict.fromkeys(v.group for v in variants))
    present = []
    for group in groups:
        v0 = next(v for v in variants if v.group == group)
        reason = data_available(v0.dataset, roots.get(v0.dataset), dict(v0.overrides).get("image_size"))
        if reason:
            line = f"{group}: data not found, skipped ({reason})"
            log("skip " + line)
            status["skipped"].append(line)
        else:
            present.append(group)
    variants = [v for v in variants if v.group in present]

    # 2. train (01_train through papermill) and evaluate
    for k, v in enumerate(variants, 1):
        run_dir = runs_dir / v.name
        config = v.config(roots.get(v.dataset))
        state = run_state(run_dir, config)
        if force or state == "stale":
            if run_dir.exists():
                log(f"{v.name}: {'--force' if force else 'configuration changed'}: removing {run_dir}")
                shutil.rmtree(run_dir)
            state = "absent"
        entry: dict[str, Any] = {"state": state}
        status["runs"][v.name] = entry
        if state == "complete":
            log(f"[{k}/{len(variants)}] {v.name}: finished run reused")
        else:
            log(f"[{k}/{len(variants)}] {v.name}: training ({'resuming' if state == 'partial' else 'new'}, "
                f"~{v.minutes:g} min) ...")
            t0 = time.perf_counter()
            params = dict(preset=v.preset, dataset=v.dataset, root=roots.get(v.dataset), head=v.head,
                          rank=v.rank, overrides=dict(v.overrides), seed=config.seed, out_dir=str(run_dir),
                          figures_dir=str(figures_dir), figure_name=f"{v.name}_training")
            try:
                execute_notebook("01_train", nb_dir / f"01_train-{v.name}.ipynb", params, scale_dir, timeout)
            except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
                line = f"{v.name}: training failed ({_error_line(err)}); see {nb_dir / f'01_train-{v.name}.ipynb'}"
                log("FAILED " + line)
                status["failed"].append(line)
                entry["state"] = "failed"
                continue
            entry["state"] = "trained"
            log(f"    {v.name}: trained in {time.perf_counter() - t0:.0f} s")
        summary = json.loads((run_dir / SUMMARY).read_text())
        entry.update(epochs=summary.get("epochs"), train_seconds=summary.get("train_seconds"))
        try:
            t0 = time.perf_counter()
            result = evaluate_runs([run_dir], force=force or entry["state"] == "trained", **EVAL_OPTIONS[scale])[0]
            entry["test_nll_bpd"] = result.get("test_nll_bpd")
            log(f"    {v.name}: evaluated ({time.perf_counter() - t0:.0f} s): test NLL "
                f"{format_cell(result.get('test_nll_bpd'))} bpd, residual corr. samples "
                f"{format_cell(result.get('residual_corr_samples'))} / data {format_cell(result.get('residual_corr_data'))}, "
                f"span capture {format_cell(result.get('span_capture'))}")
        except Exception as err:  # noqa: BLE001
            line = f"{v.name}: evaluation failed ({_error_line(err)})"
            log("FAILED " + line)
            status["failed"].append(line)

    # 3. figure notebooks per dataset
    done = {name for name, r in status["runs"].items() if r["state"] in ("complete", "trained")}
    for ds in present:  # a group: the dataset, or dataset + tag
        mains = [v for v in variants if v.group == ds and v.main and v.name in done]
        diags = [v for v in variants if v.group == ds and v.head == "diagonal" and v.name in done]
        if not mains:
            if any(v.group == ds for v in variants):
                log(f"{ds}: no finished lowrank run, figures skipped")
            continue
        common = dict(lowrank_run=str(runs_dir / mains[0].name),
                      diagonal_run=str(runs_dir / diags[0].name) if diags else None,
                      train_missing=False, dataset=mains[0].dataset, figures_dir=str(figures_dir))
        for nb, extra in (("02_samples", dict(figure_name=f"{ds}_samples")),
                          ("03_editing", dict(figure_name=f"{ds}_editing")),
                          ("04_components", dict(figure_prefix=ds)),
                          ("06_editor", dict(figure_name=f"{ds}_editor"))):
            t0 = time.perf_counter()
            try:
                execute_notebook(nb, nb_dir / f"{nb}-{ds}.ipynb", {**common, **extra}, scale_dir, timeout)
                log(f"{ds}: {nb} done ({time.perf_counter() - t0:.0f} s)")
            except Exception as err:  # noqa: BLE001
                line = f"{ds}: {nb} failed ({_error_line(err)}); see {nb_dir / f'{nb}-{ds}.ipynb'}"
                log("FAILED " + line)
                status["failed"].append(line)

    # 4. the metrics notebook: table and metrics against rank
    if any((runs_dir / name / "eval_test.json").is_file() for name in done):
        t0 = time.perf_counter()
        try:
            execute_notebook("05_metrics", nb_dir / "05_metrics.ipynb",
                             dict(runs_dir=str(runs_dir), train_missing=False, evaluate_missing=False,
                                  tables_dir=str(tables_dir), figures_dir=str(figures_dir)), scale_dir, timeout)
            log(f"05_metrics done ({time.perf_counter() - t0:.0f} s): {tables_dir / 'metrics.csv'}")
        except Exception as err:  # noqa: BLE001
            line = f"05_metrics failed ({_error_line(err)}); see {nb_dir / '05_metrics.ipynb'}"
            log("FAILED " + line)
            status["failed"].append(line)
    else:
        log("no evaluated run: 05_metrics (tables, metrics against rank) skipped")

    status["wall_seconds"] = time.perf_counter() - log.start
    status["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic_write_json(scale_dir / "reproduce.json", status)
    readme = write_readme(scale_dir, scale, status)
    log(f"done in {status['wall_seconds'] / 60:.1f} min: {readme}"
        + (f"; {len(status['failed'])} step(s) failed" if status["failed"] else ""))
    return status


def _machine() -> str:
    """The machine in words, for reproduce.json: CPU cores, and the GPU when there is one."""
    import torch

    words = f"{os.cpu_count()} CPU cores"
    if torch.cuda.is_available():
        words += f", {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    return words


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sosvae_lib.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", choices=SCALES, help="smoke (tests, < 5 min), cpu (≤ 60 min on 2 "
                   "cores), gpu (one GPU, resumable), paper (CelebA 218×178 on a GPU); default cpu")
    p.add_argument("--only", help="comma-separated variant or dataset names of the plan (e.g. orl,celeba-diagonal)")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate even finished runs")
    p.add_argument("--celeba-root", help="CelebA folder (with img_align_celeba/); default: $SOSVAE_CELEBA, "
                   "./data/celeba, ~/data/celeba, ../shared/data/celeba")
    p.add_argument("--folder-root", help="folder of grayscale images (the brain-MRI stand-in); its runs are "
                   "planned only when given")
    p.add_argument("--out", default="results", help="output folder (default results/); writes <out>/<scale>/")
    p.add_argument("--cell-timeout", type=int, default=None,
                   help="seconds per notebook cell (default: 300 smoke, 3600 cpu, none gpu and paper)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        select(plan(args.scale, args.folder_root), args.only)
    except ValueError as err:
        parser.error(str(err))
    status = reproduce(args.scale, args.out, args.only, args.force, args.celeba_root, args.folder_root,
                       "default" if args.cell_timeout is None else args.cell_timeout)
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
