"""Every figure of the SOS-VAE reproduction (Langley et al., "Structured Uncertainty in the Observation Space of
Variational Autoencoders", TMLR 2022), each a function that returns a `matplotlib.figure.Figure`.

- `samples_figure`: the paper's six rows for prior draws — μ; a sample y; y − μ; the variance map diag Σ; Σ₊^(i)
  and Σ₋^(i), the positive and negative parts of the covariance row of one pixel i on the object — one block per
  model (``lowrank`` beside ``diagonal``).
- `editor_figure`: the editor — dark strokes on a mean propagated by Gaussian conditioning (before / after /
  change), and completions sampled given a revealed 10×10 patch (`sosvae_lib.editing.edit_panels`).
- `real_inpainting_figure`: real inpainting (`sosvae_lib.inpaint.inpaint_panel`), one row per mask: the truth, what
  the model is given, PPCA, the pixel-wise model, the lowrank mean and lowrank completions, RMSE on the hidden pixels.
- `session_figure`: the editor's API applied by script (`sosvae_lib.editing.scripted_session`): μ, each stroke
  propagated and its change, conditional samples.
- `sweeps_figure`: each column of P, or each principal direction of P Pᵀ, swept from −3 to +3 standard deviations.
- `interpolation_figure`: lerp and slerp between two latent codes, means and samples with fixed observation noise.
- `training_curves_figure`: NLL, KL against its target, and λ per epoch.
- `metrics_vs_rank_figure`: test NLL, residual correlation and span capture against the rank R.
- `save_figure`: writes .png and .pdf atomically.

Figure functions accept either a model (``.decode``, ``.latent_dim``, ``.image_shape``) or the precomputed result
of the matching `sosvae_lib.components` or `sosvae_lib.editing` function, so a notebook can record the numbers it
shows (``.summary()``) from the very tensors it plots. Figures are built without pyplot (no global state, nothing
left open).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import components as C
from ._io import atomic_write_bytes
from .heads import head_names, head_spec
from .editing import Completions, EditorSession, EditResult
from .inpaint import PanelRow

Shape = tuple[int, int, int]
FORMATS = ("png", "pdf")


# -------------------------------------------------------------------------------------------------------------
# Saving and small helpers
# -------------------------------------------------------------------------------------------------------------

def save_figure(fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = FORMATS, dpi: int = 150) -> list[Path]:
    """Write ``fig`` to ``stem.<format>`` for each format, each atomically (rendered to memory, written to a
    temporary file in the same folder, then `os.replace`d). Returns the paths written."""
    stem = Path(stem)
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        raise ValueError(f"formats: must be a non-empty subset of png, pdf, svg, got {list(formats)}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", metadata=_metadata(fmt))
        path = stem.parent / f"{stem.name}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any]:
    # no creation dates: re-rendering the same figure gives the same file
    if fmt == "pdf":
        return {"CreationDate": None}
    if fmt == "svg":
        return {"Date": None}
    return {}


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "decode") and hasattr(obj, "latent_dim")


def _label(name: str, rank: int) -> str:
    return f"{name} (R={rank})" if rank > 0 else f"{name} (pixel-wise)"


def _image(x: torch.Tensor, shape: Shape) -> np.ndarray:
    """Flat [D] image in [0, 1] → array for imshow ([H, W] grey or [H, W, 3] RGB), clipped to [0, 1]."""
    c, h, w = shape
    a = x.detach().float().reshape(c, h, w).clamp(0, 1).cpu().numpy()
    return a[0] if c == 1 else np.transpose(a, (1, 2, 0))


def _signed(x: torch.Tensor, shape: Shape, scale: float) -> tuple[np.ndarray, dict]:
    """Flat signed map [D] → (array, imshow kwargs): grey images on a diverging colormap in [−scale, scale];
    RGB images as 0.5 + x / (2·scale) per channel (grey = 0)."""
    c, h, w = shape
    a = x.detach().float().reshape(c, h, w).cpu().numpy()
    scale = max(float(scale), 1e-12)
    if c == 1:
        return a[0], dict(cmap="RdBu_r", vmin=-scale, vmax=scale)
    return np.clip(0.5 + np.transpose(a, (1, 2, 0)) / (2 * scale), 0, 1), {}


def _magnitude(x: torch.Tensor, shape: Shape, scale: float, cmap: str) -> tuple[np.ndarray, dict]:
    """Flat non-negative map [D] → a heat map of its per-pixel sum over channels in [0, scale]."""
    c, h, w = shape
    a = x.detach().float().reshape(c, h, w).sum(0).cpu().numpy()
    return a, dict(cmap=cmap, vmin=0.0, vmax=max(float(scale), 1e-12))


def _robust_max(x: torch.Tensor, q: float = 0.995) -> float:
    x = x.detach().double().abs().flatten()
    if x.numel() == 0:
        return 1.0
    if x.numel() > 1_000_000:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    v = float(torch.quantile(x, q))
    return v if v > 0 else float(x.max()) or 1.0


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _show(ax, arr: np.ndarray, **kw) -> None:
    if arr.ndim == 2 and "cmap" not in kw:
        kw = dict(kw, cmap="gray", vmin=0.0, vmax=1.0)
    ax.imshow(arr, interpolation="nearest", **kw)
    _blank(ax)


def _outline(ax, mask: torch.Tensor, shape: Shape, color: str = "#ff2d2d") -> None:
    c, h, w = shape
    m = mask.reshape(c, h, w)[0].float().cpu().numpy()
    if m.any():
        ax.contour(m, levels=[0.5], colors=color, linewidths=0.8)


def _grid(rows: int, cols: int, cell: float = 1.0, extra_w: float = 0.0, extra_h: float = 0.0) -> Figure:
    fig = Figure(figsize=(cols * cell + extra_w, rows * cell + extra_h), layout="constrained")
    return fig


# -------------------------------------------------------------------------------------------------------------
# The six-row sample figure
# -------------------------------------------------------------------------------------------------------------

SAMPLE_ROWS = ("μ", "sample y", "y − μ", "variance", "Σ₊⁽ⁱ⁾", "Σ₋⁽ⁱ⁾")


def samples_figure(models: Mapping[str, Any], n: int = 10, seed: int = 0, pixel: int | None = None) -> Figure:
    """The paper's sample figure: for n prior draws (the same z for every model), six rows — μ; a sample y;
    y − μ; the variance map; Σ₊^(i) and Σ₋^(i), the positive part and the magnitude of the negative part of the
    covariance row of pixel i (marked ×), chosen on the object from the first model — one block per model,
    side by side. ``models`` maps a label (``lowrank``, ``diagonal``) to a model or a `components.PriorPanel`.

    Colour scales are shared within a block (y − μ on a diverging map; variance and Σ± on heat maps, their
    maxima printed on the row labels)."""
    if not models:
        raise ValueError("models: need at least one model")
    if all(_is_model(m) for m in models.values()):
        panels = C.prior_panels(dict(models), n=n, seed=seed, pixel=pixel)
    else:
        panels = {k: (C.prior_panel(m, n=n, seed=seed, pixel=pixel) if _is_model(m) else m) for k, m in models.items()}
    n = min(p.mean.shape[0] for p in panels.values())
    fig = _grid(6, n * len(panels), cell=0.8, extra_w=0.9 * len(panels), extra_h=0.5)
    subfigs = fig.subfigures(1, len(panels), wspace=0.02) if len(panels) > 1 else [fig]
    for sub, (name, p) in zip(np.atleast_1d(subfigs), panels.items()):
        shape = p.image_shape
        axes = sub.subplots(6, n, squeeze=False, gridspec_kw=dict(wspace=0.04, hspace=0.04))
        r_scale = _robust_max(p.residual)
        v_scale = float(p.variance.reshape(p.variance.shape[0], shape[0], -1).sum(1).max())
        c_scale = max(float(p.cov_pos.reshape(p.cov_pos.shape[0], shape[0], -1).sum(1).max()),
                      float(p.cov_neg.reshape(p.cov_neg.shape[0], shape[0], -1).sum(1).max()))
        _, pr, pc = p.pixel_chw
        for j in range(n):
            _show(axes[0, j], _image(p.mean[j], shape))
            _show(axes[1, j], _image(p.sample[j], shape))
            a, kw = _signed(p.residual[j], shape, r_scale)
            _show(axes[2, j], a, **kw)
            a, kw = _magnitude(p.variance[j], shape, v_scale, "magma")
            _show(axes[3, j], a, **kw)
            a, kw = _magnitude(p.cov_pos[j], shape, c_scale, "Reds")
            _show(axes[4, j], a, **kw)
            a, kw = _magnitude(p.cov_neg[j], shape, c_scale, "Blues")
            _show(axes[5, j], a, **kw)
            for r in (4, 5):
                axes[r, j].plot([pc], [pr], marker="x", color="#1a9641", markersize=4, mew=1.0)
        labels = [SAMPLE_ROWS[0], SAMPLE_ROWS[1], f"{SAMPLE_ROWS[2]}\n±{r_scale:.2g}", f"{SAMPLE_ROWS[3]}\n≤{v_scale:.2g}",
                  f"{SAMPLE_ROWS[4]}\n≤{c_scale:.2g}", SAMPLE_ROWS[5]]
        for r, text in enumerate(labels):
            axes[r, 0].set_ylabel(text, fontsize=7, rotation=0, ha="right", va="center")
        sub.suptitle(_label(name, p.rank), fontsize=9)
    return fig


# -------------------------------------------------------------------------------------------------------------
# The editor
# -------------------------------------------------------------------------------------------------------------

def _stroke_panels(axes: Sequence[Any], e: EditResult, strokes: int, scale: float) -> None:
    """μ, then for each of the first ``strokes`` strokes of ``e`` the propagated image (painted pixels outlined
    red) and the change it caused outside the painted pixels, on a diverging scale ±``scale`` (outlined black):
    1 + 2·strokes axes."""
    shape = e.image_shape
    _show(axes[0], _image(e.before, shape))
    axes[0].set_title("μ", fontsize=7)
    for s in range(min(strokes, e.after.shape[0])):
        ax_img, ax_change = axes[1 + 2 * s], axes[2 + 2 * s]
        _show(ax_img, _image(e.after[s], shape))
        _outline(ax_img, e.masks[s], shape)
        ax_img.set_title(f"stroke {s + 1} → propagated", fontsize=7)
        a, kw = _signed(e.change[s].masked_fill(e.masks[s], 0.0), shape, scale)  # the stroke is not "propagated"
        _show(ax_change, a, **kw)
        _outline(ax_change, e.masks[s], shape, color="k")
        ax_change.set_title(f"change (±{scale:.2g})", fontsize=7)


def _change_scale(e: EditResult) -> float:
    return max(_robust_max(e.change, 1.0), 1 / 255)


def editor_figure(edits: Mapping[str, tuple[EditResult, Completions]]) -> Figure:
    """The editing figure, two rows per model. Row 1: μ; μ after the first dark stroke (outlined red), propagated
    by conditioning; the change it caused; after a second stroke elsewhere; the cumulative change. Row 2: the true
    image with the revealed 10×10 patch outlined; μ; the conditional mean given the patch; completions sampled from
    the conditional. ``edits`` maps a label to `editing.edit_panel` results (`editing.edit_strokes`,
    `editing.patch_completions`). For a pixel-wise independent model the change outside the strokes is exactly
    zero."""
    if not edits:
        raise ValueError("edits: need at least one model")
    n_samples = max(c.samples.shape[0] for _, c in edits.values())
    cols = max(5, 3 + n_samples)
    fig = _grid(2 * len(edits), cols, cell=1.05, extra_h=0.4 * len(edits))
    subfigs = fig.subfigures(len(edits), 1, hspace=0.03) if len(edits) > 1 else [fig]
    for sub, (name, (e, comp)) in zip(np.atleast_1d(subfigs), edits.items()):
        shape = e.image_shape
        axes = sub.subplots(2, cols, squeeze=False, gridspec_kw=dict(wspace=0.05, hspace=0.18))
        for ax in axes.flat:
            _blank(ax)
        _stroke_panels(axes[0], e, 2, _change_scale(e))
        c, h, w = shape
        grid = comp.mask.reshape(c, h, w)[0]
        rows, cols_ = grid.any(1).nonzero().flatten(), grid.any(0).nonzero().flatten()
        panels = [(comp.truth, "truth, patch", True), (comp.uncond_mean, "μ", False),
                  (comp.cond_mean, "E[x | patch]", True)]
        panels += [(comp.samples[j], f"completion {j + 1}", True) for j in range(comp.samples.shape[0])]
        for j, (img, title, boxed) in enumerate(panels):
            _show(axes[1, j], _image(img, shape))
            axes[1, j].set_title(title, fontsize=7)
            if boxed and rows.numel():
                axes[1, j].add_patch(Rectangle((int(cols_[0]) - 0.5, int(rows[0]) - 0.5), len(cols_), len(rows),
                                               fill=False, edgecolor="#ff2d2d", linewidth=1.0))
        sub.suptitle(name, fontsize=9)
    return fig


def real_inpainting_figure(rows: Mapping[str, PanelRow], title: str = "") -> Figure:
    """Real inpainting, one row per mask of `sosvae_lib.inpaint.inpaint_panel`: the truth; what the models are
    given (the hidden pixels grey, outlined); each method's inpainted image (observed pixels as given) with its
    RMSE on the hidden pixels; the completions sampled from the conditional of the last model. The training mean's
    RMSE, the floor, is in the row label."""
    if not rows:
        raise ValueError("rows: need at least one mask")
    first = next(iter(rows.values()))
    methods = [m for m in first.means if m != "train mean"]
    n_samples = max((r.samples.shape[0] for r in rows.values() if r.samples is not None), default=0)
    cols = 2 + len(methods) + n_samples
    fig = _grid(len(rows), cols, cell=1.1, extra_h=0.5 + 0.15 * len(rows))
    axes = fig.subplots(len(rows), cols, squeeze=False, gridspec_kw=dict(wspace=0.04, hspace=0.3))
    for i, (name, r) in enumerate(rows.items()):
        shape = tuple(r.truth.shape)
        hidden = ~r.observed
        given = torch.where(r.observed, r.truth.reshape(-1), torch.full_like(r.truth.reshape(-1), 0.5))  # hidden: grey
        panels = [(r.truth, "truth"), (given, "given")]
        panels += [(r.means[m], f"{m}\n{r.rmse[m]:.3f}") for m in methods]
        if r.samples is not None:
            panels += [(r.samples[j], f"{r.sampled} sample {j + 1}") for j in range(r.samples.shape[0])]
        for j in range(cols):
            ax = axes[i, j]
            _blank(ax)
            if j >= len(panels):
                continue
            img, label = panels[j]
            _show(ax, _image(img.reshape(-1), shape))
            if j > 0 and hidden.any():
                _outline(ax, hidden, shape)
            if i == 0 or 2 <= j < 2 + len(methods):  # a method's RMSE on every row, the other labels once
                ax.set_title(label, fontsize=6)
        axes[i, 0].set_ylabel(f"{name.replace('_', ' ')}\ntrain mean {r.rmse.get('train mean', float('nan')):.3f}",
                              fontsize=7)
        axes[i, 0].yaxis.set_visible(True)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def session_figure(sessions: Mapping[str, EditorSession]) -> Figure:
    """The scripted editor session (`editing.scripted_session`, notebooks/06_editor.ipynb), one row per model: μ;
    after each stroke (outlined) the propagated image and the change it caused outside the strokes (cumulative);
    samples from p(x | strokes), the painted pixels outlined."""
    if not sessions:
        raise ValueError("sessions: need at least one model")
    n_strokes = max(s.edit.after.shape[0] for s in sessions.values())
    n_samples = max(s.samples.shape[0] for s in sessions.values())
    cols = 1 + 2 * n_strokes + n_samples
    fig = _grid(len(sessions), cols, cell=1.05, extra_h=0.3)
    axes = fig.subplots(len(sessions), cols, squeeze=False, gridspec_kw=dict(wspace=0.05, hspace=0.25))
    for row, (name, s) in zip(axes, sessions.items()):
        for ax in row:
            _blank(ax)
        e = s.edit
        _stroke_panels(row, e, e.after.shape[0], _change_scale(e))
        row[0].set_ylabel(name, fontsize=8)
        for j in range(s.samples.shape[0]):
            ax = row[1 + 2 * n_strokes + j]
            _show(ax, _image(s.samples[j], e.image_shape))
            _outline(ax, e.masks[-1], e.image_shape)
            ax.set_title(f"sample {j + 1}", fontsize=7)
    return fig


# -------------------------------------------------------------------------------------------------------------
# Component sweeps and interpolation
# -------------------------------------------------------------------------------------------------------------

def sweeps_figure(sweeps: C.Sweeps, kind: str = "principal", max_rows: int | None = 10, title: str = "") -> Figure:
    """One row per component, one column per t ∈ sweeps.ts (−3 … +3 standard deviations), plus a last column with
    the direction itself (image at +1 minus μ, diverging colours, each row on its own scale). ``kind``: ``columns`` (columns of P, by
    decreasing norm) or ``principal`` (eigen-directions of P Pᵀ, by decreasing eigenvalue)."""
    if kind not in ("columns", "principal"):
        raise ValueError(f"kind: must be 'columns' or 'principal', got {kind!r}")
    images = sweeps.columns if kind == "columns" else sweeps.principal
    k = images.shape[0] if max_rows is None else min(images.shape[0], max_rows)
    t = sweeps.ts
    shape = sweeps.image_shape
    fig = _grid(k, len(t) + 1, cell=0.85, extra_w=1.0, extra_h=0.4)
    axes = fig.subplots(k, len(t) + 1, squeeze=False, gridspec_kw=dict(wspace=0.04, hspace=0.04))
    directions = (images[:k, -1] - sweeps.mean) / float(t[-1]) if float(t[-1]) != 0 else images[:k, -1] * 0
    for i in range(k):
        for j in range(len(t)):
            _show(axes[i, j], _image(images[i, j], shape))
        a, kw = _signed(directions[i], shape, _robust_max(directions[i], 1.0))  # its own scale: the pattern
        _show(axes[i, -1], a, **kw)
        if kind == "columns":
            idx = sweeps.column_order[i] if sweeps.column_order else i
            label = f"P[:, {idx}]\n‖·‖={float(sweeps.column_norms[idx]):.2g}"
        else:
            label = f"u{i + 1}\nw={float(sweeps.eigenvalues[i]):.2g}"
        axes[i, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    for j in range(len(t)):
        axes[0, j].set_title(f"{float(t[j]):+g}σ", fontsize=7)
    axes[0, -1].set_title("direction (own scale)", fontsize=7)
    what = "columns of P" if kind == "columns" else "principal directions of P Pᵀ"
    fig.suptitle(title or f"{what}, swept from {float(t[0]):+g} to {float(t[-1]):+g}", fontsize=9)
    return fig


def interpolation_figure(models: Mapping[str, Any], steps: int = 8, seed: int = 0) -> Figure:
    """Latent interpolation between two prior draws: for each model, rows lerp μ, lerp sample, slerp μ, slerp
    sample, with one fixed observation noise along each row. ``models`` maps a label to a model or a
    `components.Interpolation`."""
    if not models:
        raise ValueError("models: need at least one model")
    interps = {name: (C.interpolate(m, steps=steps, seed=seed) if _is_model(m) else m) for name, m in models.items()}
    steps = min(len(i.ts) for i in interps.values())
    fig = _grid(4 * len(interps), steps, cell=0.85, extra_w=1.1, extra_h=0.4 * len(interps))
    subfigs = fig.subfigures(len(interps), 1, hspace=0.02) if len(interps) > 1 else [fig]
    for sub, (name, it) in zip(np.atleast_1d(subfigs), interps.items()):
        axes = sub.subplots(4, steps, squeeze=False, gridspec_kw=dict(wspace=0.04, hspace=0.04))
        rows = [("lerp μ", it.means["lerp"]), ("lerp y", it.samples["lerp"]),
                ("slerp μ", it.means["slerp"]), ("slerp y", it.samples["slerp"])]
        for r, (label, imgs) in enumerate(rows):
            for j in range(steps):
                _show(axes[r, j], _image(imgs[j], it.image_shape))
            axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        for j in range(steps):
            axes[0, j].set_title(f"t={float(it.ts[j]):.2g}", fontsize=7)
        sub.suptitle(f"{name}: interpolation, fixed observation noise", fontsize=9)
    return fig


# -------------------------------------------------------------------------------------------------------------
# Training curves and metrics against rank
# -------------------------------------------------------------------------------------------------------------

def load_history(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The per-epoch metric rows of the run in ``run_dir`` (written by `sosvae_lib.train`) as dicts of floats
    (`sosvae_lib.runs.Run.history`)."""
    from .runs import Run
    return Run(run_dir).history()


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, float]] | str | os.PathLike]) -> Figure:
    """Three panels against epoch, one line per run: NLL (bits per dimension), KL(q‖p) with its target T dashed,
    and the Lagrange multiplier λ. ``histories`` maps a label to a run directory or to `load_history` rows."""
    if not histories:
        raise ValueError("histories: need at least one run")
    rows = {k: (load_history(v) if isinstance(v, (str, os.PathLike)) else list(v)) for k, v in histories.items()}
    fig = Figure(figsize=(10, 3), layout="constrained")
    axes = fig.subplots(1, 3)
    colors = _colors(len(rows))
    for (name, hist), color in zip(rows.items(), colors):
        if not hist:
            continue
        ep = [r["epoch"] for r in hist]
        axes[0].plot(ep, [r["nll_bpd"] for r in hist], marker=".", color=color, label=name)
        axes[1].plot(ep, [r["kl"] for r in hist], marker=".", color=color, label=name)
        target = [r.get("target_kl", float("nan")) for r in hist]
        if any(math.isfinite(t) for t in target):
            axes[1].plot(ep, target, ls="--", color=color, lw=0.8)
        axes[2].plot(ep, [r["lambda"] for r in hist], marker=".", color=color, label=name)
    axes[0].set_ylabel("train NLL (bits/dim)")
    axes[1].set_ylabel("KL(q‖p) (nats); target dashed")
    axes[2].set_ylabel("λ")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


PCA_STYLE = dict(label="pca", marker="^", ls=":")  # the PPCA baseline's rows (head "pca"), not a registered head


def _rank_styles() -> tuple[list[tuple[str, str, dict]], list[tuple[str, str, dict]]]:
    """([(head, label, line style)] of the curves against the rank: the heads with a factor in table order, then
    the PPCA baseline; [(head, label, line style)] of the horizontal lines: the heads without a factor)."""
    specs = [head_spec(h) for h in head_names()]
    curves = [(s.name, s.label, dict(s.style)) for s in specs if s.has_factor]
    curves.append(("pca", PCA_STYLE["label"], {k: v for k, v in PCA_STYLE.items() if k != "label"}))
    return curves, [(s.name, s.label, dict(s.style)) for s in specs if not s.has_factor]


RANK_PANELS = (("test_nll_bpd", "test NLL (bits/dim)"), ("residual_corr_samples", "lag-1 corr. of y − μ"),
               ("span_capture", "span capture of x − μ(x)"))


def metrics_vs_rank_figure(rows: Iterable[Mapping[str, Any]]) -> Figure:
    """Test NLL, the lag-1 spatial correlation of sample residuals and the span capture against the rank R, one
    colour per dataset, each head drawn with its registered label and style (`sosvae_lib.heads.HeadSpec`): ``lowrank``
    (and ``lowrank-diag``, any head with a factor) as lines with markers, the PPCA baseline (head ``pca``)
    dotted, the pixel-wise ``diagonal`` model as a dashed horizontal line, and, on the correlation panel, the
    correlation of the data residuals x − μ(x) (grey band over the lowrank runs) the samples should match."""
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("rows: need at least one metrics row")
    datasets = sorted({r["dataset"] for r in rows})
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    axes = fig.subplots(1, len(RANK_PANELS))
    curves, flat = _rank_styles()
    band_head = curves[0][0]  # the data-residual band sits over the first head with a factor (the paper's lowrank)
    for color, ds in zip(_colors(len(datasets)), datasets):
        mine = [r for r in rows if r["dataset"] == ds]
        for head, name, style in curves:
            pts = sorted((int(r["rank"]), r) for r in mine if r["head"] == head and int(r["rank"]) > 0)
            if not pts:
                continue
            for ax, (key, _) in zip(axes, RANK_PANELS):
                xs = [k for k, r in pts if _finite(r.get(key))]
                ys = [float(r[key]) for k, r in pts if _finite(r.get(key))]
                if xs:
                    ax.plot(xs, ys, color=color, label=f"{ds} {name}", **style)
            if head == band_head:
                data_corr = [float(r["residual_corr_data"]) for _, r in pts if _finite(r.get("residual_corr_data"))]
                if data_corr:
                    axes[1].axhspan(min(data_corr), max(data_corr) + 1e-3, color=color, alpha=0.15, lw=0)
        for head, name, style in flat:
            for r in (r for r in mine if r["head"] == head):
                for ax, (key, _) in zip(axes, RANK_PANELS):
                    if _finite(r.get(key)):
                        ax.axhline(float(r[key]), color=color, label=f"{ds} {name}", **style)
    flat_heads = {head for head, _, _ in flat}
    ranks = sorted({int(r["rank"]) for r in rows if r["head"] not in flat_heads and _finite(r.get("rank"))
                    and int(r["rank"]) > 0})
    for ax, (_, label) in zip(axes, RANK_PANELS):
        ax.set_xscale("log")
        if ranks:
            ax.set_xticks(ranks, [str(k) for k in ranks])
            ax.minorticks_off()
        ax.set_xlabel("rank R")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle("metrics against rank (band: lag-1 corr. of the data residuals x − μ(x))", fontsize=9)
    return fig


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
