"""One command that regenerates every figure and table of the SOS-VAE reproduction (Langley et al., "Structured
Uncertainty in the Observation Space of Variational Autoencoders", TMLR 2022).

    python -m sosvae_lib.reproduce --scale smoke|cpu|gpu|paper [--only NAMES] [--force] [--celeba-root PATH]
        [--folder-root PATH] [--out DIR] [--cell-timeout S] [--device auto|cpu|cuda|cuda:N]

For the chosen scale (`plan`) it trains each variant by executing ``notebooks/01_train.ipynb`` with papermill (a
finished run is reused unless ``--force``; an interrupted one is resumed), evaluates it (`sosvae_lib.evaluate`),
executes ``02_samples``, ``03_editing``, ``04_components`` and ``06_editor`` (the editor widget; headless, its two
scripted strokes) for every dataset and ``05_metrics`` once (a notebook already executed with the same parameters
after its runs last changed is kept, `notebook_done`, so an interrupted command resumes where it stopped), and
writes

    <out>/<scale>/figures/*.png, *.pdf  (and the numbers each notebook recorded, *.json)
    <out>/<scale>/tables/metrics.csv, metrics.md, metrics.json, real_inpainting.md
    <out>/<scale>/notebooks/*.ipynb     (the executed notebooks)
    <out>/<scale>/runs/<variant>/       (run directories: checkpoint, config, metrics.csv, eval_test.json)
    <out>/<scale>/README.md             (gallery and table), reproduce.json (plan, status and timings)

A dataset whose data is absent is skipped with one line saying where it was looked for; a failing step is reported
and the rest goes on (the exit status is then 1). Data locations: ``--celeba-root`` (else ``$SOSVAE_CELEBA``, else
``./data/celeba``, ``~/data/celeba``, ``../shared/data/celeba`` next to the project), ``--folder-root`` (a folder
of grayscale images standing in for the paper's brain MRI; its variants run only when given). The folder each
dataset was found in is passed on absolute and resolved (`find_data`): the notebooks' kernels run in
``<out>/<scale>``, where a relative path would point elsewhere.

``--device`` (default: the plan's, ``auto``) goes into every training configuration and the evaluation. ``gpu``
and ``paper`` refuse to start without a usable CUDA device unless ``--device cpu`` is given (`check_device`).
Exit status: 0 done, 1 a step failed, 2 a usage error (one line on stderr, before anything is written), 130
interrupted (Ctrl-C; rerunning the same command resumes: finished runs are reused, an interrupted one resumed).

For tests only: ``reproduce(..., shrink=True)`` (the undocumented flag ``--shrink-for-tests``) runs a scale's plan
at a tiny size (`shrink_variant`) that keeps each variant's own parameters and their types (tuple image sizes,
``data_on_device``, the head, rank and latent size), so every variant of the gpu plan goes through papermill on
the CPU in the test suite. With it, ``figure_groups`` (``--figure-groups-for-tests``) limits the figure notebooks
to the named groups (their parameters are the same strings and flags for every group; the training notebooks, whose
parameters differ per variant, all run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import CheckpointError, atomic_write_json, atomic_write_text, check_out_dir
from .config import USAGE_ERRORS, EvalConfig
from .heads import has_factor
from .runs import Run
from .tables import COLUMNS, format_cell, headline

SCALES = ("smoke", "cpu", "gpu", "paper")
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_train", "02_samples", "03_editing", "04_components", "05_metrics", "06_editor")
# Evaluation settings per scale: `sosvae_lib.config.EvalConfig.preset(scale)`; a run is stale for the plan
# exactly when `train --resume` would refuse it (`sosvae_lib.runs.Run.state`, `config.RESUMABLE_FIELDS`).
CELL_TIMEOUT = {"smoke": 300, "cpu": 3600, "gpu": None, "paper": None}
GPU_SCALES = ("gpu", "paper")  # scales that refuse to start without a usable CUDA device (unless device="cpu")


@dataclass(frozen=True)
class Variant:
    """One training run of the plan: ``preset`` with ``overrides`` (TrainConfig fields); ``main`` marks the lowrank
    run whose figures are drawn for its dataset (beside the dataset's diagonal run). ``pretrain`` marks a shared
    mean pre-training (named ``<group>-pretrain``; trained, not evaluated); ``init_from`` names the variant of the
    plan whose run this one starts from (`sosvae_lib.config.TrainConfig` ``init_from``)."""

    dataset: str
    head: str
    rank: int
    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()
    main: bool = False
    minutes: float = 1.0  # rough training time on 2 CPU cores (smoke, cpu) or one GPU (gpu, paper), for the plan line
    tag: str = ""  # tells apart two groups of one dataset (e.g. CelebA at two sizes): "celeba" + "109x89"
    pretrain: bool = False
    init_from: str = ""

    @property
    def group(self) -> str:
        """The dataset's runs whose figures are drawn together: the dataset name, with the tag when there is one."""
        return f"{self.dataset}{self.tag}" if self.tag else self.dataset

    @property
    def name(self) -> str:
        if self.pretrain:
            return f"{self.group}-pretrain"
        return (f"{self.group}-{self.head}" if not has_factor(self.head)
                else f"{self.group}-{self.head}-r{self.rank}")

    def config_fields(self, root: str | None = None) -> dict[str, Any]:
        """The TrainConfig.preset keyword arguments of this variant."""
        fields = dict(dataset=self.dataset, head=self.head, rank=self.rank, **dict(self.overrides))
        if root is not None:
            fields["root"] = str(root)
        return fields

    def config(self, root: str | None = None, runs_dir: str | os.PathLike | None = None):
        """The TrainConfig of this variant; with ``runs_dir`` (the plan's runs folder) its ``init_from`` is the run
        folder of the variant it starts from (without it, no ``init_from``)."""
        from .config import TrainConfig
        fields = self.config_fields(root)
        if self.init_from and runs_dir is not None:
            fields["init_from"] = str(Path(runs_dir) / self.init_from)
        return TrainConfig.preset(self.preset, **fields)


def _variants(dataset: str, preset: str, ranks: Sequence[int], minutes: float, diagonal: bool = True,
              main_rank: int | None = None, learned: bool = False, tag: str = "",
              shared_pretrain: tuple[int, float] | None = None, pretrain_overrides: dict[str, Any] | None = None,
              **overrides: Any) -> list[Variant]:
    """lowrank at each of ``ranks`` (the figures' run: ``main_rank``, default the largest), and optionally the
    pixel-wise baseline and ``lowrank-diag`` at the main rank. ``shared_pretrain`` = (epochs, minutes) puts first
    one mean pre-training of that many epochs (lowrank at the main rank, the same overrides and seed, then
    ``pretrain_overrides``) that every variant starts from (``init_from``), so the heads differ only after it; their
    ``epochs`` then follow it."""
    main_rank = main_rank or max(ranks)
    out = []
    source = ""
    if shared_pretrain is not None:
        epochs, pre_minutes = shared_pretrain
        pre = tuple(sorted({**overrides, **(pretrain_overrides or {}), "epochs": epochs,
                            "pretrain_epochs": epochs}.items()))
        out.append(Variant(dataset, "lowrank", main_rank, preset, pre, minutes=pre_minutes, tag=tag, pretrain=True))
        source = out[0].name
        overrides = {**overrides, "pretrain_epochs": 0}
    ov = tuple(sorted(overrides.items()))
    out += [Variant(dataset, "lowrank", r, preset, ov, main=(r == main_rank), minutes=minutes, tag=tag,
                    init_from=source) for r in ranks]
    if learned:
        out.append(Variant(dataset, "lowrank-diag", main_rank, preset, ov, minutes=minutes, tag=tag,
                           init_from=source))
    if diagonal:  # the pixel-wise baseline keeps the preset's rank field (unused) so its PPCA row matches
        out.append(Variant(dataset, "diagonal", main_rank, preset, ov, minutes=minutes, tag=tag, init_from=source))
    return out


def plan(scale: str, folder_root: str | None = None) -> list[Variant]:
    """The variants trained at ``scale``.

    - ``smoke`` (tests, < 5 min): orl at 16×16, lowrank R ∈ {1, 2} and diagonal, one epoch on 32 images.
    - ``cpu`` (≤ 60 min on 2 cores): orl 64×64 (30 epochs) lowrank R ∈ {5, 25}, lowrank-diag R = 25 and diagonal;
      fashion-mnist 32×32 lowrank R = 25 and diagonal; celeba 64×64 on the subset's whole training split, one
      shared mean pre-training (``celeba-pretrain``) then lowrank R = 25, lowrank-diag and diagonal from it;
      (folder 64×64, R = 25 and diagonal, when ``folder_root`` is given).
    - ``gpu`` (one GPU; resumable across commands, each finished run is reused): the cpu preset widened to latent
      128 at batch 64 with the training set on the device: celeba 64×64 on the whole training split, one shared
      mean pre-training (10 epochs) then lowrank R ∈ {1, 5, 10, 25, 50}, lowrank-diag and diagonal from it (30
      epochs each); celeba at the subset's native 109×89 (``celeba109x89``) likewise, R = 25, lowrank-diag and
      diagonal; orl 64×64 and the full fashion-mnist 32×32, R = 25 and diagonal. The minutes are estimates, not
      measurements (no GPU has run it yet).
    - ``paper`` (GPU): celeba 218×178 with the paper preset, lowrank R ∈ {1, 5, 25} and diagonal; (folder 128×128,
      R = 25 and diagonal, when ``folder_root`` is given).
    The PPCA baseline of each rank is scored by the evaluation of the same runs.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "smoke":
        return _variants("orl", "smoke", (1, 2), 0.2)
    if scale == "cpu":
        # orl: 30 epochs over its 320 training faces (the first 7 pre-train the mean). A 32×32 image trains ~2.5×
        # faster than a 64×64 one, a 64×64 RGB one about as fast (the trunk dominates). ORL (40 → 30 epochs) and
        # fashion-mnist (8 → 6) gave CelebA's shared pre-training its 3 minutes.
        out = _variants("orl", "cpu", (5, 25), 2.1, image_size=64, epochs=30)
        # the learned-diagonal variant: the paper's fixed ε = 1e-5 makes conditioning on true pixels an
        # unregularised least-squares fit of R coefficients; a learned d shows what a noise model changes.
        out.append(Variant("orl", "lowrank-diag", 25, "cpu", (("epochs", 30), ("image_size", 64)), minutes=2.1))
        out += _variants("fashion-mnist", "cpu", (25,), 1.4, image_size=32, max_items=4000, epochs=6,
                        pretrain_epochs=2)
        # celeba: the whole training split of the subset (7,001 faces; 2,000 images × 6 epochs left the prior
        # means brown blobs), the recipe measured in docs/experiments/celeba_cpu_recipe.md: one shared mean
        # pre-training of 6 epochs at target KL 15 (4 left the lowrank means at 73 % faces), then 5 epochs per
        # head at target KL 10 (15 left them greyer, 30 blurrier); 75-100 s per epoch on 2 cores.
        out += _variants("celeba", "cpu", (25,), 8.3, learned=True, image_size=64, epochs=5, target_kl=10.0,
                         shared_pretrain=(6, 10.0), pretrain_overrides=dict(target_kl=15.0))
        if folder_root:
            out += _variants("folder", "cpu", (25,), 3.0, image_size=64, max_items=2000, epochs=6,
                            pretrain_epochs=2)
        return out
    if scale == "gpu":
        gpu = dict(latent=128, batch_size=64, data_on_device=True, device="auto")
        # celeba: each group's heads start from one shared mean pre-training of 10 epochs (what each head used to
        # repeat for itself: 80 epochs saved over the two groups), then train 30 epochs of their own: 40 in all
        out = _variants("celeba", "cpu", (1, 5, 10, 25, 50), 1.5, main_rank=25, learned=True, image_size=64,
                        epochs=30, shared_pretrain=(10, 0.5), **gpu)
        out += _variants("celeba", "cpu", (25,), 3.0, learned=True, tag="109x89", image_size=(109, 89), epochs=30,
                         shared_pretrain=(10, 1.0), **gpu)
        out += _variants("orl", "cpu", (25,), 0.5, image_size=64, epochs=200, **{**gpu, "batch_size": 32})
        out += _variants("fashion-mnist", "cpu", (25,), 3.0, image_size=32, epochs=10, **gpu)
        return out
    out = _variants("celeba", "paper", (1, 5, 25), 240.0)
    if folder_root:
        out += _variants("folder", "paper", (25,), 120.0, image_size=128)
    return out


# The tiny size of `shrink_variant` (tests only): the longer image side, training images, epochs, batch and width.
_SHRINK = dict(side=16, max_items=16, epochs=1, batch_size=8, width=4)


def shrink_variant(v: Variant) -> Variant:
    """``v`` at a tiny size, for tests only (`reproduce(..., shrink=True)`): the longer image side 16 pixels (an
    int size stays an int, an (H, W) pair stays a pair of about the same aspect), at most 16 training images, one
    epoch without mean pre-training, batch at most 8, width at most 4. Everything else (dataset, head, rank,
    latent, data_on_device, device, precision, preset) is the variant's own, with its own types."""
    c = v.config()
    side = _SHRINK["side"]
    size = c.image_size
    if isinstance(size, tuple):
        h, w = size
        size = (side, max(8, round(side * w / h))) if h >= w else (max(8, round(side * h / w)), side)
    else:
        size = side
    tiny = dict(image_size=size, max_items=min(c.max_items or _SHRINK["max_items"], _SHRINK["max_items"]),
                epochs=_SHRINK["epochs"], pretrain_epochs=_SHRINK["epochs"] if v.pretrain else 0,
                batch_size=min(c.batch_size, _SHRINK["batch_size"]), width=min(c.width, _SHRINK["width"]))
    overrides = tuple(sorted({**dict(v.overrides), **tiny}.items()))
    return dataclasses.replace(v, overrides=overrides, minutes=0.05)


def select(variants: Sequence[Variant], only: str | None) -> list[Variant]:
    """The variants named by ``only`` (comma-separated variant names or dataset names; None: all), with the shared
    pre-training each of them starts from (``init_from``), in plan order."""
    if not only:
        return list(variants)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {v.name for v in variants} | {v.dataset for v in variants} | {v.group for v in variants}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"only: unknown name {unknown[0]!r} (this scale has: {', '.join(sorted(known))})")
    chosen = {v.name for v in variants if v.name in wanted or v.dataset in wanted or v.group in wanted}
    chosen |= {v.init_from for v in variants if v.name in chosen and v.init_from}
    return [v for v in variants if v.name in chosen]


# -------------------------------------------------------------------------------------------------------------
# Runs: state, reuse, loading
# -------------------------------------------------------------------------------------------------------------

def find_data(dataset: str, root: str | os.PathLike | None, image_size: Any = None) -> str | None:
    """The folder ``dataset`` is read from, absolute and resolved: ``root``, or (None) the first folder of the
    dataset's search path that holds it (see `sosvae_lib.data`); None for a dataset made in memory. Raises the
    loader's FileNotFoundError / ValueError / OSError when the data is not there.

    The notebooks' kernels run with their working directory in ``<out>/<scale>``: a relative root, or a default
    found relative to this process's working directory (``./data/celeba``), would point elsewhere there, so the
    plan's configurations get this absolute folder."""
    from .data import load_dataset
    found = load_dataset(dataset, "test", image_size=image_size, root=root, max_items=1).root
    return None if found is None else str(Path(found).expanduser().resolve())


def data_available(dataset: str, root: str | None, image_size: Any = None) -> str | None:
    """None if ``dataset`` can be loaded, else the one-line reason (where its files were looked for)."""
    try:
        find_data(dataset, root, image_size)
    except (FileNotFoundError, ValueError, OSError) as err:
        return str(err).splitlines()[0]
    return None


# -------------------------------------------------------------------------------------------------------------
# Notebooks
# -------------------------------------------------------------------------------------------------------------

def check_papermill_parameters(parameters: dict[str, Any], notebook: str = "notebook") -> None:
    """Raise TypeError naming the parameter unless every value survives papermill's Python translator unchanged:
    str, bool, int, float, None, and lists and dicts (string keys) of those. papermill writes anything else as
    its string (``(109, 89)`` becomes ``"(109, 89)"``), which the notebook would then receive."""
    def bad(value: Any) -> str | None:
        if value is None or isinstance(value, (str, bool, int, float)):
            return None
        if isinstance(value, list):
            return next((b for b in map(bad, value) if b), None)
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                return "a dict with a key that is not a string"
            return next((b for b in map(bad, value.values()) if b), None)
        return f"a {type(value).__name__} ({value!r})"

    for key, value in parameters.items():
        problem = bad(value)
        if problem:
            raise TypeError(f"parameters: {notebook} parameter {key!r} holds {problem}, which papermill would pass "
                            f"as a string; give str, int, float, bool, None, or lists and dicts of them")


def execute_notebook(name: str, output: Path, parameters: dict[str, Any], cwd: Path,
                     cell_timeout: int | None) -> None:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``output`` (the executed copy), in the working
    directory ``cwd``, with at most ``cell_timeout`` seconds per cell (None: no limit). ``parameters`` must be
    values papermill carries unchanged (`check_papermill_parameters`)."""
    import papermill

    check_papermill_parameters(parameters, name)
    source = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"notebook: {source} is missing; run from a checkout of the repository")
    output.parent.mkdir(parents=True, exist_ok=True)
    # The kernel's own log (its stderr is this process's) is silenced: a failing cell is reported by papermill and
    # kept in the executed notebook, while the kernel would print an unencrypted-TCP warning at every start and a
    # traceback of the interrupted cell when Ctrl-C stops the command.
    papermill.execute_notebook(str(source), str(output), parameters=parameters, kernel_name="python3",
                               cwd=str(cwd), execution_timeout=cell_timeout, progress_bar=False,
                               log_output=False, request_save_on_cell_execute=False,
                               extra_arguments=["--IPKernelApp.log_level=CRITICAL"])


def notebook_done(executed: Path, parameters: dict[str, Any], inputs: Sequence[Path] = ()) -> bool:
    """True when ``executed`` is a notebook papermill ran to the end without an error, with these ``parameters``,
    after every file of ``inputs`` that exists was last written (the runs' checkpoints and evaluations). A
    resumed `reproduce` then keeps it instead of running it again; an interrupted execution leaves no file."""
    try:
        nb = json.loads(executed.read_text())
        meta = nb["metadata"]["papermill"]
        finished = executed.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if meta.get("exception") or not meta.get("end_time") or meta.get("parameters") != parameters:
        return False
    if any(c.get("metadata", {}).get("papermill", {}).get("status") != "completed"
           for c in nb.get("cells", []) if c.get("cell_type") == "code"):
        return False
    return all(finished >= p.stat().st_mtime for p in map(Path, inputs) if p.is_file())


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
    "real_inpainting": "Real inpainting of a test image: each model is given only the observed pixels (the top "
                       "half, the left half, a central square; the hidden ones grey and outlined) and never the "
                       "hidden ones. PPCA, the pixel-wise model and SOS-VAE (lowrank, calibrated diagonal) predict "
                       "the rest, with their RMSE on the hidden pixels (the training mean's beside each row); then "
                       "completions sampled from SOS-VAE's conditional p(x_H | x_O, z).",
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
                "training", "real_inpainting"):
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
                "real_inpaint_rmse_top_half", "real_inpaint_rmse_top_half_train_mean", "correction_rmse_uncond",
                "correction_rmse_cond")
        lines += ["", "## Headline: lowrank against diagonal", "",
                  "Per dataset, the lowrank run of the largest rank, the pixel-wise model and the PPCA baseline of "
                  "that rank. SOS-VAE's claims predict: residual correlation of samples close to that of the data "
                  "(diagonal ≈ 0), span capture well above R/D, and a lower inpainting RMSE once pixels are "
                  "revealed (unchanged for diagonal). real_inpaint: the hidden pixels never reach the model (training "
                  "mean beside it); correction: the paper's protocol, z from the whole image.", "",
                  "| dataset | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for ds, entry in headline(json.loads(rows_path.read_text())).items():
            for model in ("lowrank", "diagonal", "pca"):
                if model in entry:
                    r = entry[model]
                    label = model if model == "diagonal" else f"{model} R={r['rank']}"
                    lines.append(f"| {ds} | {label} | " + " | ".join(format_cell(r.get(k)) for k in keys) + " |")
    real = scale_dir / "tables" / "real_inpainting.md"
    if real.is_file():
        lines += ["", "## Real inpainting", "", "RMSE on the hidden pixels when only the observed ones reach the model "
                  "(`sosvae_lib.inpaint`): the headline lowrank run, the PPCA of its rank, the pixel-wise model and "
                  "the training mean, per mask (top_half, left_half, patch10: that region observed; random50: a "
                  "random half of the pixels).", "", real.read_text().rstrip(), ""]
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


def check_device(scale: str, device: str | None) -> None:
    """Raise ValueError (one line) unless ``device`` can run ``scale``: ``gpu`` and ``paper`` need a usable CUDA
    device unless ``device`` is ``cpu`` (the line names torch's CUDA version and what was found,
    `sosvae_lib.devices.cuda_problem`); ``cuda`` / ``cuda:N`` must be there and work at any scale; None means the
    plan's own device (``auto``)."""
    from .devices import cuda_problem, resolve_device

    if device is not None and not isinstance(device, str):
        raise TypeError(f"device: must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device not in (None, "auto", "cpu"):
        resolve_device(device)  # a malformed name, a GPU that is not there or does not work: one ValueError
    if scale in GPU_SCALES and device != "cpu":
        problem = cuda_problem()
        if problem:
            raise ValueError(f"device: --scale {scale} needs a usable CUDA GPU and {problem}; pass --device cpu "
                             f"to run it on the CPU anyway")


def check_cell_timeout(cell_timeout: Any, name: str = "cell_timeout") -> int | None:
    """Seconds per notebook cell as papermill takes them: a positive int, or None for no limit (also given as 0).
    Anything else is one ValueError naming ``name``."""
    if cell_timeout is None:
        return None
    if isinstance(cell_timeout, bool) or not isinstance(cell_timeout, int) or cell_timeout < 0:
        raise ValueError(f"{name}: must be a whole number of seconds >= 0 (0: no limit), got {cell_timeout!r}")
    return cell_timeout or None


@dataclass
class _Context:
    """What the phases of `reproduce` share: the log, the status being built, folders, data roots and options."""

    log: _Log
    status: dict[str, Any]
    scale_dir: Path
    roots: dict[str, str | None]
    force: bool
    device: str | None
    timeout: int | None
    eval_config: Any

    @property
    def runs_dir(self) -> Path:
        return self.scale_dir / "runs"

    @property
    def figures_dir(self) -> Path:
        return self.scale_dir / "figures"

    @property
    def tables_dir(self) -> Path:
        return self.scale_dir / "tables"

    @property
    def nb_dir(self) -> Path:
        return self.scale_dir / "notebooks"


def _find_data(ctx: _Context, variants: list[Variant]) -> tuple[list[Variant], list[str]]:
    """Phase 1: the groups whose data is found (their roots made absolute in ``ctx.roots``); the others are skipped
    with one line. Returns (the variants of those groups, the groups)."""
    log, status, roots = ctx.log, ctx.status, ctx.roots
    # 1. data
    groups = list(dict.fromkeys(v.group for v in variants))
    present = []
    for group in groups:
        v0 = next(v for v in variants if v.group == group)
        try:
            roots[v0.dataset] = find_data(v0.dataset, roots.get(v0.dataset), dict(v0.overrides).get("image_size"))
        except (FileNotFoundError, ValueError, OSError) as err:
            line = f"{group}: data not found, skipped ({str(err).splitlines()[0]})"
            log("skip " + line)
            status["skipped"].append(line)
        else:
            present.append(group)
    variants = [v for v in variants if v.group in present]

    return variants, present


def _train_and_evaluate(ctx: _Context, variants: list[Variant]) -> None:
    """Phase 2: each variant trained through ``01_train`` (a finished run reused, a partial one resumed, a stale one
    removed: `Run.state`) and evaluated (`sosvae_lib.evaluate.evaluate_runs`); a failure is recorded, not raised."""
    from .evaluate import evaluate_runs

    eval_config = ctx.eval_config
    log, status, roots, force, device, timeout = ctx.log, ctx.status, ctx.roots, ctx.force, ctx.device, ctx.timeout
    scale_dir, runs_dir, figures_dir, nb_dir = ctx.scale_dir, ctx.runs_dir, ctx.figures_dir, ctx.nb_dir
    # 2. train (01_train through papermill) and evaluate
    for k, v in enumerate(variants, 1):
        run_dir = runs_dir / v.name
        config = v.config(roots.get(v.dataset), runs_dir)
        if device is not None:
            config = config.replace(device=device)
        state = Run(run_dir).state(config)
        if state in ("complete", "partial") and _source_changed(Run(run_dir), config):
            state = "stale"  # its shared pre-training was trained again since
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
            # the whole configuration, JSON-safe (an (H, W) size as a list): papermill writes a tuple as a string
            params = dict(config_fields=config.to_dict(), out_dir=str(run_dir), figures_dir=str(figures_dir),
                          figure_name=f"{v.name}_training")
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
        summary = Run(run_dir).summary() or {}
        entry.update(epochs=summary.get("epochs"), train_seconds=summary.get("train_seconds"))
        if v.pretrain:  # only the start of the group's runs: nothing to evaluate
            continue
        try:
            t0 = time.perf_counter()
            result = evaluate_runs([run_dir], eval_config, force=force or entry["state"] == "trained",
                                   required=COLUMNS)[0]
            entry["test_nll_bpd"] = result.get("test_nll_bpd")
            log(f"    {v.name}: evaluated ({time.perf_counter() - t0:.0f} s): test NLL "
                f"{format_cell(result.get('test_nll_bpd'))} bpd, residual corr. samples "
                f"{format_cell(result.get('residual_corr_samples'))} / data {format_cell(result.get('residual_corr_data'))}, "
                f"span capture {format_cell(result.get('span_capture'))}")
        except Exception as err:  # noqa: BLE001
            line = f"{v.name}: evaluation failed ({_error_line(err)})"
            log("FAILED " + line)
            status["failed"].append(line)



def _source_changed(run: Run, config: Any) -> bool:
    """True when ``run`` started from ``config.init_from`` and that run's weights are no longer the ones it took
    (the source was trained again, or is gone)."""
    if config.init_from is None:
        return False
    try:
        taken = (run.checkpoint(verify=False) if run.exists() else {}).get("init_from_weights_sha256")
    except CheckpointError:  # resuming it names the damage
        return False
    source = Run(config.init_from).summary() or {}
    return taken is None or taken != source.get("weights_sha256")


def _done(ctx: _Context) -> set[str]:
    return {name for name, r in ctx.status["runs"].items() if r["state"] in ("complete", "trained")}


def _figures(ctx: _Context, variants: list[Variant], present: list[str]) -> None:
    """Phase 3: the figure notebooks of each group with a finished main lowrank run (kept when up to date)."""
    log, status, force, timeout = ctx.log, ctx.status, ctx.force, ctx.timeout
    scale_dir, runs_dir, figures_dir, nb_dir = ctx.scale_dir, ctx.runs_dir, ctx.figures_dir, ctx.nb_dir
    # 3. figure notebooks per dataset
    done = _done(ctx)
    for ds in present:  # a group: the dataset, or dataset + tag
        mains = [v for v in variants if v.group == ds and v.main and v.name in done]
        diags = [v for v in variants if v.group == ds and not has_factor(v.head) and v.name in done]
        if not mains:
            if any(v.group == ds for v in variants):
                log(f"{ds}: no finished lowrank run, figures skipped")
            continue
        common = dict(lowrank_run=str(runs_dir / mains[0].name),
                      diagonal_run=str(runs_dir / diags[0].name) if diags else None,
                      train_missing=False, dataset=mains[0].dataset, figures_dir=str(figures_dir))
        inputs = [f for v in (mains[0], *diags[:1]) for f in Run(runs_dir / v.name).files()]
        for nb, extra in (("02_samples", dict(figure_name=f"{ds}_samples")),
                          ("03_editing", dict(figure_name=f"{ds}_editing",
                                              inpainting_figure_name=f"{ds}_real_inpainting")),
                          ("04_components", dict(figure_prefix=ds)),
                          ("06_editor", dict(figure_name=f"{ds}_editor"))):
            t0 = time.perf_counter()
            executed, params = nb_dir / f"{nb}-{ds}.ipynb", {**common, **extra}
            if not force and notebook_done(executed, params, inputs):
                log(f"{ds}: {nb} up to date, kept")
                continue
            try:
                execute_notebook(nb, executed, params, scale_dir, timeout)
                log(f"{ds}: {nb} done ({time.perf_counter() - t0:.0f} s)")
            except Exception as err:  # noqa: BLE001
                line = f"{ds}: {nb} failed ({_error_line(err)}); see {nb_dir / f'{nb}-{ds}.ipynb'}"
                log("FAILED " + line)
                status["failed"].append(line)



def _metrics_notebook(ctx: _Context) -> None:
    """Phase 4: ``05_metrics`` (tables, metrics against rank) when some run was evaluated (kept when up to date)."""
    log, status, force, timeout = ctx.log, ctx.status, ctx.force, ctx.timeout
    scale_dir, runs_dir, figures_dir, tables_dir, nb_dir = (ctx.scale_dir, ctx.runs_dir, ctx.figures_dir,
                                                            ctx.tables_dir, ctx.nb_dir)
    done = _done(ctx)
    # 4. the metrics notebook: table and metrics against rank
    params = dict(runs_dir=str(runs_dir), train_missing=False, evaluate_missing=False, tables_dir=str(tables_dir),
                  figures_dir=str(figures_dir))
    evaluations = [Run(d).eval_path("test") for d in sorted(runs_dir.iterdir()) if d.is_dir()]
    if not force and notebook_done(nb_dir / "05_metrics.ipynb", params, [p for p in evaluations if p.is_file()]):
        log("05_metrics up to date, kept")
    elif any(Run(runs_dir / name).eval_path("test").is_file() for name in done):
        t0 = time.perf_counter()
        try:
            execute_notebook("05_metrics", nb_dir / "05_metrics.ipynb", params, scale_dir, timeout)
            log(f"05_metrics done ({time.perf_counter() - t0:.0f} s): {tables_dir / 'metrics.csv'}")
        except Exception as err:  # noqa: BLE001
            line = f"05_metrics failed ({_error_line(err)}); see {nb_dir / '05_metrics.ipynb'}"
            log("FAILED " + line)
            status["failed"].append(line)
    else:
        log("no evaluated run: 05_metrics (tables, metrics against rank) skipped")



def reproduce(scale: str, out: str | os.PathLike = "results", only: str | None = None, force: bool = False,
              celeba_root: str | None = None, folder_root: str | None = None,
              cell_timeout: int | None | str = "default", device: str | None = None,
              shrink: bool = False, figure_groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the plan of ``scale`` (see the module docstring); returns the status dict also written to
    ``<out>/<scale>/reproduce.json``.

    ``cell_timeout``: seconds per notebook cell ("default": `CELL_TIMEOUT` of the scale; 0 or None: no limit).
    ``device``: None keeps the plan's (``auto``), otherwise it replaces the device of every training
    configuration and of the evaluation. ``shrink`` (tests only): every variant through `shrink_variant`, the
    smoke evaluation. Bad arguments (`select`, `check_device`, `check_cell_timeout`, an ``out`` that is or lies
    under a file) raise one error before anything is written."""
    log = _Log()
    variants = select(plan(scale, folder_root), only)
    if shrink:
        variants = [shrink_variant(v) for v in variants]
    timeout = check_cell_timeout(CELL_TIMEOUT[scale] if cell_timeout == "default" else cell_timeout)
    check_device(scale, device)
    scale_dir = check_out_dir(Path(out).expanduser().resolve() / scale, "out")
    eval_config = EvalConfig.preset("smoke" if shrink else scale, **({} if device is None else {"device": device}))
    runs_dir, figures_dir, tables_dir, nb_dir = (scale_dir / s for s in ("runs", "figures", "tables", "notebooks"))
    for d in (runs_dir, figures_dir, tables_dir, nb_dir):
        d.mkdir(parents=True, exist_ok=True)
    roots: dict[str, str | None] = {"celeba": celeba_root, "folder": folder_root}
    status: dict[str, Any] = dict(scale=scale, plan=[v.name for v in variants], skipped=[], failed=[], runs={},
                                  machine=_machine(), device=device or "plan")
    log(f"scale {scale}: {len(variants)} runs, about {sum(v.minutes for v in variants):.0f} min of training "
        f"({', '.join(v.name for v in variants)}); writing {scale_dir}")

    ctx = _Context(log=log, status=status, scale_dir=scale_dir, roots=roots, force=force, device=device,
                   timeout=timeout, eval_config=eval_config)
    variants, present = _find_data(ctx, variants)
    _train_and_evaluate(ctx, variants)
    _figures(ctx, variants, present if figure_groups is None else [g for g in present if g in figure_groups])
    _metrics_notebook(ctx)

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as for the other commands (no usage block)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sosvae_lib.reproduce", description=__doc__.split("\n\n")[0])
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
                   help="seconds per notebook cell, 0 for no limit (default: 300 smoke, 3600 cpu, no limit gpu and "
                        "paper)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N for every training and the evaluation (default: the "
                   "plan's, auto); gpu and paper refuse to start without a usable CUDA device unless it is cpu")
    p.add_argument("--shrink-for-tests", action="store_true", help=argparse.SUPPRESS)  # tests only: shrink_variant
    p.add_argument("--figure-groups-for-tests", help=argparse.SUPPRESS)  # tests only: figure notebooks of these groups
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit status: 0 done; 1 a step failed (the others ran); 2 a usage error (one line on
    stderr, before anything is written); 130 interrupted (one line; the same command resumes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # every argument checked before anything is trained or written
        select(plan(args.scale, args.folder_root), args.only)
        check_cell_timeout(args.cell_timeout, "cell-timeout")
        check_device(args.scale, args.device)
        check_out_dir(Path(args.out).expanduser() / args.scale, "out")
    except USAGE_ERRORS as err:
        parser.error(str(err))
    # Ctrl-C reaches the notebook's kernel too; nbclient's pending cell task then dies with the kernel, and asyncio
    # would log its DeadKernelError with a traceback after the one line below. The command reports its own errors.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        status = reproduce(args.scale, args.out, args.only, args.force, args.celeba_root, args.folder_root,
                           "default" if args.cell_timeout is None else args.cell_timeout, args.device,
                           shrink=args.shrink_for_tests,
                           figure_groups=None if args.figure_groups_for_tests is None
                           else args.figure_groups_for_tests.split(","))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (finished runs are reused, the interrupted one "
              "resumed from its last checkpoint)", file=sys.stderr)
        return 130
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
