"""Editing an image by Gaussian conditioning, the paper's third showcase (Langley et al., "Structured Uncertainty in
the Observation Space of Variational Autoencoders", TMLR 2022: a dark stroke on the hair propagated to the whole
image, completions given a revealed patch, and the authors' sampler with one slider per principal direction).

One stroke rasteriser (`stroke_pixels`), one state machine (`Editor`), and what the figures and notebooks build on
them: `edit_strokes` / `patch_completions` / `edit_panels` (notebooks/03_editing.ipynb, `plots.editor_figure`) and
`scripted_session` (notebooks/06_editor.ipynb, `plots.session_figure`). The Jupyter widget over an `Editor` lives
apart, in `sosvae_lib.widget`; a run folder is read through `sosvae_lib.runs.Run`.

`Editor` works without any frontend: ``Editor(run_or_model, image=...)``, then ``paint(points, value, width)``,
``image`` (the propagated image, [C, H, W]), ``undo()``, ``reset()``, ``samples(n)``, ``directions()`` /
``explore(t)`` (principal directions of P Pᵀ), ``set_eps(eps)`` (no smaller than ``min_eps``) and
``erase_and_fill(points | mask)`` (real inpainting of a loaded image: the erased pixels never reach the model). The editing
notebooks check their parameters and runs with `check_parameters` and `check_runs`.

After every stroke the image is the conditional mean E[x | x_S = painted values] over the set S of every pixel
painted so far, computed from the decoded distribution by `LowRankNormal.condition` (O(D·R²); nothing of size
D×D or |S|×|S|); a pixel painted twice keeps its latest value. For the pixel-wise ``diagonal`` model only the
painted pixels change.

Coordinates: a point is (row, col) in pixel units; pixel (i, j) is the unit square [i, i+1) × [j, j+1), so a
point's pixel is (⌊row⌋, ⌊col⌋). On screen the H×W grid is drawn enlarged in a canvas of displayed size
width × height CSS pixels; the screen point (x, y) from the canvas' top-left corner is the point
(y·H/height, x·W/width) (`screen_to_pixel`), which is exact: pixel (i, j) is drawn on the screen rectangle
[j·width/W, (j+1)·width/W) × [i·height/H, (i+1)·height/H). A stroke joins the pixels of consecutive points by
straight 8-connected pixel lines (DDA: one pixel per step along the longer axis), and a brush of width w paints the
w×w square of pixels around each of them (offsets −⌊(w−1)/2⌋ … ⌊w/2⌋), clipped at the image border, every channel.
Scripted strokes (`DEFAULT_STROKES`) are polylines of (row, col) fractions of the image height and width, mapped to
pixels by `fraction_points` so that they land on the same places at every image size.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .components import draw_noise, prior_latents, principal_directions, reconstruction
from .config import check_int
from .distributions import DiagonalNormal, LowRankNormal
from .heads import head_names, head_spec
from .metrics import most_uncertain_patch, patch_masks
from .runs import Run

__all__ = ["Editor", "EditorSession", "EditResult", "Completions", "DEFAULT_STROKES", "screen_to_pixel",
           "stroke_pixels", "fraction_points", "default_width", "calibrated_eps", "with_eps", "run_image",
           "edit_strokes", "patch_completions", "edit_panel", "edit_panels", "scripted_session", "check_parameters",
           "check_runs", "RUN_HEADS", "run_heads", "EPS_ULPS"]

Shape = tuple[int, int, int]
FILL_IMAGES = 500
"""Training images whose mean fills the erased pixels before encoding (`Editor.erase_and_fill`)."""
EVAL_SPLITS = ("val", "test")
"""Evaluation results of a run also searched (in this order) for a calibrated diagonal, when the run has no
calibration: ``eps_calibrated`` (the calibrated ε of a fixed diagonal) or ``diag_scale_calibrated`` (the multiplier
of a learned one), as `sosvae_lib.evaluate` records them."""


# -------------------------------------------------------------------------------------------------------------
# Geometry: screen → pixel, strokes → pixels
# -------------------------------------------------------------------------------------------------------------

def _finite_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{name}: must be a finite number, got {v!r}")
    return float(v)


def _canvas_size(size: Any) -> tuple[float, float]:
    """(width, height) > 0 of a displayed canvas, else a ValueError naming ``size``."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size: must be (width, height) of the displayed canvas in CSS pixels, got {size!r}")
    width, height = (_finite_number("size", s) for s in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size: width and height must be > 0, got {size!r}")
    return width, height


def screen_to_pixel(x: float, y: float, size: Sequence[float], hw: tuple[int, int]) -> tuple[float, float]:
    """The point (row, col) in pixel units under the screen point (x, y), measured in CSS pixels from the
    top-left corner of a canvas displayed at ``size`` = (width, height) CSS pixels that shows an H×W grid
    (``hw``): (y·H/height, x·W/width). Its pixel is (⌊row⌋, ⌊col⌋). Raises a ValueError naming ``x``/``y`` when
    the point lies outside [0, width) × [0, height), and naming ``size`` when it is not two numbers > 0."""
    width, height = _canvas_size(size)
    x, y = _finite_number("x", x), _finite_number("y", y)
    if not 0.0 <= x < width:
        raise ValueError(f"x: screen point outside the canvas: must lie in [0, {width}), got {x}")
    if not 0.0 <= y < height:
        raise ValueError(f"y: screen point outside the canvas: must lie in [0, {height}), got {y}")
    h, w = hw
    # x·W/width < W in exact arithmetic; min() guards the last ulp of the float product
    return min(y * h / height, math.nextafter(h, 0)), min(x * w / width, math.nextafter(w, 0))


def _cells(points: Any, hw: tuple[int, int]) -> torch.Tensor:
    """Integer pixels [K, 2] (row, col) of ``points`` (K ≥ 1 pairs (row, col) in pixel units, inside the image)."""
    h, w = hw
    try:
        p = torch.as_tensor(points, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"points: must be a sequence of (row, col) pairs in pixel units, got {points!r}") from None
    if p.dim() == 1 and p.numel() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 2 or p.shape[1] != 2 or p.shape[0] < 1:
        raise ValueError(f"points: must be a non-empty sequence of (row, col) pairs (shape [K, 2]), got shape "
                         f"{tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("points: must be finite numbers")
    bad = (p[:, 0] < 0) | (p[:, 0] >= h) | (p[:, 1] < 0) | (p[:, 1] >= w)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"points: (row, col) must lie inside the {h}×{w} image, in [0, {h}) × [0, {w}) (pixel "
                         f"units), got {tuple(float(v) for v in p[k])} at index {k}")
    return p.floor().long()


def stroke_pixels(points: Any, hw: tuple[int, int], width: int = 1) -> torch.Tensor:
    """Boolean [H, W] mask of the pixels a stroke paints: the pixels of ``points`` ([K, 2] (row, col) in pixel
    units, see the module docstring), joined by straight 8-connected lines, each widened to a ``width``×``width``
    square (clipped at the border). The one rasteriser of the package: the widget's strokes, `Editor.paint` and
    the scripted strokes of the figures all go through it."""
    check_int("width", width, 1)
    h, w = hw
    cells = _cells(points, hw)
    path = [cells[:1]]
    for a, b in zip(cells[:-1], cells[1:]):
        n = int((b - a).abs().max())
        if n:
            t = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1) / n
            path.append(torch.round(a + t * (b - a)).long())  # DDA: one pixel per step of the longer axis
    path = torch.cat(path)
    lo = -((width - 1) // 2)
    offsets = torch.arange(lo, lo + width)
    rows = (path[:, :1] + offsets).unsqueeze(2).expand(-1, width, width).reshape(-1)
    cols = (path[:, 1:] + offsets).unsqueeze(1).expand(-1, width, width).reshape(-1)
    keep = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[rows[keep], cols[keep]] = True
    return grid


def fraction_points(points: Sequence[tuple[float, float]], hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(row, col) fractions of the image height and width in [0, 1] → the pixel (round(f·(H−1)),
    round(f·(W−1))) of each (Python's round: halves to even), so that scripted strokes such as `DEFAULT_STROKES`
    land on the same places at every image size; `stroke_pixels` joins them."""
    h, w = hw
    out = []
    for k, p in enumerate(points):
        if len(p) != 2 or not all(0.0 <= _finite_number("points", v) <= 1.0 for v in p):
            raise ValueError(f"points: (row, col) fractions must lie in [0, 1], got {p!r} at index {k}")
        out.append((round(p[0] * (h - 1)), round(p[1] * (w - 1))))
    return out


def default_width(hw: tuple[int, int]) -> int:
    """The default brush width: one pixel per 32 pixels of the shorter side (1 at 16×16 and 32×32, 2 at 64×64)."""
    return max(1, min(hw) // 32)


# -------------------------------------------------------------------------------------------------------------
# ε: the trained diagonal or a calibrated one
# -------------------------------------------------------------------------------------------------------------

def calibrated_eps(run: Run | str | os.PathLike, fixed: bool = True) -> float | None:
    """The calibrated diagonal of a run, in the meaning of `with_eps`: the new scalar ε when the trained diagonal is
    a fixed ε (``fixed``), else the multiplier of the learned diagonal; None when the run has none (the widget's
    switch is then hidden). Read from the run's calibration (`Run.calibration`: its ``eps`` if ``fixed``, else its
    ``scale``), else from its evaluation results of the `EVAL_SPLITS` (``eps_calibrated`` if ``fixed``, else
    ``diag_scale_calibrated``); the first finite number > 0 wins. A calibration file that is not a calibration
    record is a ValueError naming it (`Run.calibration`)."""
    run = run if isinstance(run, Run) else Run(run)
    cal = run.calibration()
    if cal is not None and (value := _positive(cal.eps if fixed else cal.scale)) is not None:
        return value
    key = "eps_calibrated" if fixed else "diag_scale_calibrated"
    for split in EVAL_SPLITS:
        result = run.evaluation(split)
        if isinstance(result, Mapping) and (value := _positive(result.get(key))) is not None:
            return value
    return None


def _positive(value: Any) -> float | None:
    """``value`` as a float if it is a finite number > 0, else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def _check_eps(eps: Any) -> float | None:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: must be a finite number > 0 or None (the trained diagonal), got {eps!r}")
    return float(eps)


def with_eps(dist: LowRankNormal | DiagonalNormal, eps: float | None, fixed: bool) -> LowRankNormal | DiagonalNormal:
    """``dist`` with its diagonal replaced: for a fixed (scalar) diagonal (``fixed``, the ``lowrank`` head's ε),
    d = eps; for a learned one (``lowrank-diag``, ``diagonal``), d = eps · d. None returns ``dist`` unchanged.
    μ and P are shared, not copied. A fixed eps must be a normal number of the distribution's dtype (it would
    otherwise round to 0, a subnormal or inf); `Editor.set_eps` also refuses what conditioning cannot take."""
    eps = _check_eps(eps)
    if eps is None:
        return dist
    loc = dist.loc
    info = torch.finfo(loc.dtype)
    if fixed and not info.tiny <= eps <= info.max:
        raise ValueError(f"eps: must lie in [{info.tiny:.3g}, {info.max:.3g}] (normal numbers of {loc.dtype}), got "
                         f"{eps!r}")
    diag = torch.tensor(eps, dtype=loc.dtype, device=loc.device) if fixed else dist.cov_diag * eps
    if isinstance(dist, LowRankNormal):
        return LowRankNormal(loc, dist.cov_factor, diag)
    return DiagonalNormal(loc, diag)


EPS_ULPS = 16
"""The smallest diagonal `Editor.set_eps` accepts, in units of roundoff of each pixel's low-rank variance: every
new d_i must be at least EPS_ULPS · u · ‖P_i‖² (u the unit roundoff of the model's dtype, 2⁻²³ for float32) and a
normal number. Why: conditioning weighs the observed rows of P by d^{-1/2}, so K = I + Pᵀ_O D⁻¹ P_O has entries
up to ‖P_i‖²/d_i; once d_i is below u·‖P_i‖² the diagonal is lost in the rounding of the variance ‖P_i‖² + d_i,
the rounding of the Gram swamps the I it is added to, and for a stroke with fewer observed values than R the
Cholesky of K fails or the edit is wrong. Measured (random factors, R = 2 and 25, D from 1·16·16 to 3·64·64, a
one-pixel stroke against float64 conditioning, error relative to the largest change): at 0.1 u·‖P_i‖² the
Cholesky fails or the error is up to 10; at 1 u·‖P_i‖², up to 1.3e-2; at 16, up to 6e-5; at 100, up to 9e-7.
Strokes with more observed values than R stay at 2e-7 throughout. 16 keeps an edit well inside 1/255."""


def _eps_range(dist: Any, fixed: bool) -> tuple[float, float]:
    """[lowest, highest] ``eps`` that `with_eps` may apply to ``dist`` for conditioning in its dtype: every new
    d_i ≥ max(EPS_ULPS · u · ‖P_i‖², tiny) (see `EPS_ULPS`) and ≤ the dtype's largest number. One read-back."""
    info = torch.finfo(dist.loc.dtype)
    with torch.no_grad():
        floor = (EPS_ULPS * info.eps * dist.cov_factor.detach().double().square().sum(-1)).clamp_min(info.tiny)
        floor = floor.reshape(-1)
        if fixed:
            low, high = floor.max(), torch.full_like(floor[0], info.max)
        else:
            d = dist.cov_diag.detach().double().expand(dist.loc.shape).reshape(-1)
            low, high = (floor / d).max(), info.max / d.max()
        low, high = torch.stack([low, high]).tolist()
    return low, high


def _fixed_diag(dist: Any, model: Any) -> bool:
    """Whether the diagonal is fixed (the ``lowrank`` head's ε; a registered head that does not learn its diagonal,
    `sosvae_lib.heads.HeadSpec.learns_diag`) rather than learned; without a model, whether it is one value."""
    head = getattr(model, "head_name", None)
    if head is not None:
        return not head_spec(head).learns_diag
    d = dist.cov_diag.reshape(-1)
    return bool((d == d[0]).all())


# -------------------------------------------------------------------------------------------------------------
# The editor's state
# -------------------------------------------------------------------------------------------------------------

def _checked_image(image: Any, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """The image an editor encodes, [C, H, W] in ``dtype`` (on the image's device), from a tensor [C, H, W],
    [1, C, H, W] or, for one channel, [H, W]: uint8 values 0…255 are divided by 255; a floating-point image is
    cast and must be finite and in [0, 1], the range of the training data. Anything else (channels-last [H, W, C],
    another shape, an integer or complex dtype, NaN or inf, floats outside [0, 1]) is a ValueError naming
    ``image``: nothing is reshaped or rescaled silently."""
    c, h, w = shape
    expected = (f"[C, H, W] = [{c}, {h}, {w}] (or [1, C, H, W]" + ("; [H, W] for this one-channel model)" if c == 1
                                                                 else ")"))
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image: must be None, a test-image index or a tensor of shape {expected}, got "
                         f"{image!r:.80}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"image: dtype {image.dtype} is not an image dtype: give floats in [0, 1] or uint8 in 0…255")
    size = tuple(image.shape)
    if c > 1 and size == (h, w, c) and size != (c, h, w):
        raise ValueError(f"image: has shape [H, W, C] = [{h}, {w}, {c}] (channels last); the editor takes "
                         f"[C, H, W] = [{c}, {h}, {w}]: pass image.permute(2, 0, 1)")
    if size not in ((c, h, w), (1, c, h, w)) and not (c == 1 and size == (h, w)):
        raise ValueError(f"image: must be None, a test-image index or a tensor of shape {expected}, got shape "
                         f"{list(size)}")
    x = image.reshape(c, h, w)
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255)
    x = x.to(dtype)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"image: must be finite, got {bad} NaN or infinite value{'s' if bad > 1 else ''}")
    lo, hi = torch.stack(list(torch.aminmax(x))).tolist()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"image: float values must lie in [0, 1] (the range of the training data), got values in "
                         f"[{lo:g}, {hi:g}]; for an image in 0…255 pass it as uint8 (divided by 255) or divide it "
                         f"by 255")
    return x


def run_image(run: Run | str | os.PathLike, index: int, name: str = "image_index") -> torch.Tensor:
    """Image ``index`` [C, H, W] (float in [0, 1]) of the test split of a run's dataset (its name, size and root:
    `Run.dataset`). An index that is not an integer in [0, N) is a ValueError naming ``name`` (the caller's
    parameter: ``image_index`` in the editing notebooks, ``image`` for `Editor`)."""
    run = run if isinstance(run, Run) else Run(run)
    check_int(name, index, 0)
    data = run.dataset("test", index + 1)
    if index >= len(data):
        raise ValueError(f"{name}: must be in [0, {len(data)}) for the test split of {run.config.dataset}, got "
                         f"{index}")
    item = data[index]
    return item[0] if isinstance(item, (tuple, list)) else item


@dataclass
class _State:
    """One entry of the undo stack: mask [D] (painted pixels, all channels), values [D] (their painted values,
    0 elsewhere), strokes (how many), image [D] the propagated image (None: not computed under the current ε),
    dist the conditional distribution (lazy)."""

    mask: torch.Tensor
    values: torch.Tensor
    strokes: int
    image: torch.Tensor | None = None
    dist: Any = None
    directions: tuple[torch.Tensor, torch.Tensor] | None = None


class Editor:
    """Paint on an image and propagate the edit by Gaussian conditioning (see the module docstring).

    Args:
        source: a run (a `sosvae_lib.runs.Run`, or its folder as a str or path), a model (``.decode``,
            ``.encode``, ``.latent_dim``, ``.image_shape``), or a decoded distribution (``LowRankNormal`` /
            ``DiagonalNormal`` with batch shape [] or [1], given with ``image_shape``).
        image: what is edited, for a run or a model: None, the mean of a prior draw z ~ N(0, I) (seeded by
            ``seed``); a tensor, the mean of its reconstruction p(x | m(x)); an int, that image of the run's test
            split (`run_image`; runs only). Must be None for a distribution. A tensor is [C, H, W] (or [1, C, H, W];
            [H, W] for a one-channel model; channels-last [H, W, C] is refused, not reshaped), uint8 in 0…255
            (divided by 255) or floating point in [0, 1], finite (anything else: a ValueError naming ``image``);
            it is cast to the model's dtype and moved to its device.
        seed: seeds the prior draw and, by default, `samples`.
        eps: None keeps the trained diagonal; a number replaces it (`with_eps`: the scalar ε of a ``lowrank``
            model, a multiplier of a learned diagonal), no smaller than `min_eps`.
        calibrated: the calibrated ε offered by the widget's switch (same meaning and range as ``eps``); None
            reads it from the run (`calibrated_eps`; a stored value that is unreadable or out of range is ignored
            with a warning); without one the widget's switch is hidden.
        image_shape: (C, H, W); required for a distribution, read from the model otherwise.
        device: where a run is loaded (default cpu).

    Attributes: ``model`` and ``run`` (None when not given), ``config`` (the run's), ``seed``, ``calibrated``.

    The image is float32 [C, H, W], not clipped (the widget clips to [0, 1] for display only).
    """

    def __init__(self, source: Any, image: torch.Tensor | int | None = None, *, seed: int = 0,
                 eps: float | None = None, calibrated: float | None = None, image_shape: Shape | None = None,
                 device: str | torch.device = "cpu"):
        self.seed = check_int("seed", seed, 0)
        self.model, self.run = None, None
        self._loaded: torch.Tensor | None = None  # the image given (tensor or test index), [C, H, W]
        self._erased: torch.Tensor | None = None  # bool [D]: the pixels erased so far (`erase_and_fill`)
        self._fill: torch.Tensor | None = None
        if isinstance(source, (Run, str, os.PathLike)):
            self.run = Run(source)
            self.model = self.run.load_model(device)
        elif isinstance(source, (LowRankNormal, DiagonalNormal)):
            if image is not None:
                raise ValueError("image: must be None when source is a distribution (it is what is edited)")
            if image_shape is None:
                raise ValueError("image_shape: required (C, H, W) when source is a distribution")
            if source.observed is not None:
                raise ValueError("source: is a conditional distribution; give the unconditioned one (strokes are "
                                 "what the editor conditions on)")
        elif hasattr(source, "decode") and hasattr(source, "latent_dim"):
            self.model = source
        else:
            raise TypeError(f"source: must be a run (a Run or its folder), a model or a LowRankNormal/DiagonalNormal, "
                            f"got {type(source).__name__}")
        if self.model is not None:
            image_shape = tuple(self.model.image_shape)
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape: must be (C, H, W) of positive ints, got {image_shape!r}")
        self.image_shape: Shape = shape  # type: ignore[assignment]
        with torch.no_grad():
            dist = source if self.model is None else self._decode(image)
        D = math.prod(shape)
        if dist.event_shape != (D,) or math.prod(dist.batch_shape) != 1:
            raise ValueError(f"source: the distribution must have event shape [{D}] (image_shape {shape}) and batch "
                             f"shape [] or [1], got {tuple(dist.batch_shape)} + {tuple(dist.event_shape)}")
        self._trained = dist if tuple(dist.batch_shape) == (1,) else dist.expand((1,))
        self._fixed = _fixed_diag(self._trained, self.model)
        self._eps_range: tuple[float, float] | None = None
        self.calibrated = (self._checked_eps(calibrated, "calibrated") if calibrated is not None
                           else self._stored_calibration())
        self._eps: float | None = None
        self._base = self._trained
        loc = self._trained.loc
        empty = _State(torch.zeros(D, dtype=torch.bool, device=loc.device), torch.zeros_like(loc.reshape(-1)), 0)
        self._stack: list[_State] = [empty]
        self.set_eps(eps)

    @property
    def config(self) -> Any:
        """The run's `TrainConfig` (None unless the source is a run)."""
        return None if self.run is None else self.run.config

    def _stored_calibration(self) -> float | None:
        """The run's calibrated diagonal (`calibrated_eps`) if it has one that `set_eps` may apply; a stored one
        that is unreadable or out of range is ignored with a warning (the editor works without it)."""
        if self.run is None:
            return None
        try:
            stored = calibrated_eps(self.run, self._fixed)
            return None if stored is None else self._checked_eps(stored, "calibrated")
        except ValueError as err:
            warnings.warn(f"{self.run.folder}: the stored calibration is not used: {err}", stacklevel=3)
            return None

    def _decode(self, image: torch.Tensor | int | None):
        params = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        device = params.device if params is not None else torch.device("cpu")
        if image is None:
            return self.model.decode(prior_latents(self.model.latent_dim, 1, self.seed).to(device))
        if isinstance(image, int) and not isinstance(image, bool):
            if self.run is None:
                raise ValueError("image: an index into the test split needs a run (or its directory) as source; "
                                 "pass the image tensor [C, H, W] instead")
            image = run_image(self.run, image, name="image")
        dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
        self._loaded = _checked_image(image, self.image_shape, dtype).to(device)
        return reconstruction(self.model, self._loaded)

    # -- what is shown ---------------------------------------------------------------------------------------
    @property
    def _state(self) -> _State:
        return self._stack[-1]

    @property
    def hw(self) -> tuple[int, int]:
        return self.image_shape[1], self.image_shape[2]

    @property
    def rank(self) -> int:
        """R, the number of columns of P (0 for the pixel-wise model)."""
        return int(self._trained.cov_factor.shape[-1])

    @property
    def fixed_diagonal(self) -> bool:
        """Whether the trained diagonal is the fixed scalar ε (``lowrank``; `eps` replaces it) or learned (`eps`
        multiplies it)."""
        return self._fixed

    @property
    def eps(self) -> float | None:
        """The ε in use (None: the trained diagonal)."""
        return self._eps

    @property
    def min_eps(self) -> float:
        """The smallest ``eps`` `set_eps` accepts: every new diagonal entry d_i (ε, or ε·d_i for a learned
        diagonal) at least `EPS_ULPS` roundoffs of the pixel's low-rank variance ‖P_i‖², and a normal number of
        the model's dtype (see `EPS_ULPS` for why). Computed once (one read-back)."""
        return self._range()[0]

    def _range(self) -> tuple[float, float]:
        if self._eps_range is None:
            self._eps_range = _eps_range(self._trained, self._fixed)
        return self._eps_range

    def _checked_eps(self, eps: Any, name: str = "eps") -> float | None:
        """``eps`` if None or in [`min_eps`, highest]; else a ValueError naming ``name``."""
        try:
            eps = _check_eps(eps)
        except ValueError as err:
            raise ValueError(name + str(err)[len("eps"):]) from None
        if eps is None:
            return None
        low, high = self._range()
        what = "ε" if self._fixed else "the multiplier ε of the learned diagonal (d_i → ε·d_i)"
        if eps < low:
            raise ValueError(f"{name}: {eps:.3g} is too small for conditioning in {self._trained.loc.dtype}: "
                             f"{what} must be >= {low:.3g}, so that each diagonal entry stays above {EPS_ULPS} "
                             f"roundoffs of its pixel's variance ‖P_i‖² (Editor.min_eps)")
        if eps > high:
            raise ValueError(f"{name}: {eps:.3g} is too large: {what} must be <= {high:.3g} (the largest "
                             f"{self._trained.loc.dtype} diagonal)")
        return eps

    @property
    def strokes(self) -> int:
        """Number of strokes applied since the last reset (undo removes the latest)."""
        return self._state.strokes

    @property
    def mean(self) -> torch.Tensor:
        """μ [C, H, W], the image before any stroke."""
        return self._base.loc.detach().reshape(self.image_shape).clone()

    @property
    def mask(self) -> torch.Tensor:
        """bool [C, H, W]: the painted pixels (every channel of a painted pixel)."""
        return self._state.mask.reshape(self.image_shape).clone()

    @property
    def values(self) -> torch.Tensor:
        """[C, H, W]: the painted values on `mask`, 0 elsewhere."""
        return self._state.values.reshape(self.image_shape).clone()

    @property
    def image(self) -> torch.Tensor:
        """The current propagated image [C, H, W]: E[x | x = values on mask] (μ before any stroke)."""
        return self._image(self._state).reshape(self.image_shape).clone()

    @property
    def distribution(self) -> LowRankNormal | DiagonalNormal:
        """The current distribution p(x | painted pixels), batch shape [1] (the decoded one before any stroke)."""
        return self._dist(self._state)

    def _dist(self, state: _State):
        if state.dist is None:
            if state.strokes == 0:  # every stroke paints at least one pixel: no read-back of the mask needed
                state.dist = self._base
            else:
                with torch.no_grad():
                    state.dist = self._base.condition(state.mask.unsqueeze(0), state.values.unsqueeze(0))
        return state.dist

    def _image(self, state: _State) -> torch.Tensor:
        if state.image is None:
            state.image = self._dist(state).loc.detach().reshape(-1)
        return state.image

    # -- the edits -----------------------------------------------------------------------------------------
    def _value(self, value: Any) -> torch.Tensor:
        """[C] per-channel values of a grey level (a number) or a colour (C numbers), each in [0, 1]."""
        c = self.image_shape[0]
        vals = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        try:
            vals = [float(v) for v in vals] if not isinstance(vals, (str, bytes)) else None
        except (TypeError, ValueError):
            vals = None
        if vals is None or len(vals) not in (1, c) or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
            raise ValueError(f"value: must be a grey level in [0, 1] or {c} channel values in [0, 1], got {value!r}")
        loc = self._trained.loc
        return torch.tensor(vals * (c if len(vals) == 1 else 1), dtype=loc.dtype, device=loc.device)

    def paint(self, points: Any, value: float | Sequence[float] = 0.0, width: int | None = None) -> torch.Tensor:
        """Paint a stroke through ``points`` ([K, 2] (row, col) in pixel units, inside the image) with a grey level
        or a colour ``value`` in [0, 1] and a ``width``×``width`` brush (None: `default_width`), then propagate:
        returns the new `image` [C, H, W], the conditional mean given every pixel painted so far."""
        c, h, w = self.image_shape
        width = default_width(self.hw) if width is None else width
        stroke = stroke_pixels(points, self.hw, width).to(self._state.mask.device)  # drawn on the host: H·W bytes
        v = self._value(value)
        stroke = stroke.unsqueeze(0).expand(c, h, w).reshape(-1)
        values = torch.where(stroke, v.repeat_interleave(h * w), self._state.values)
        state = _State(self._state.mask | stroke, values, self._state.strokes + 1)
        self._image(state)
        self._stack.append(state)
        return self.image

    def screen_stroke(self, points: Sequence[Sequence[float]], size: Sequence[float],
                      value: float | Sequence[float] = 0.0, width: int | None = None) -> torch.Tensor | None:
        """A stroke drawn on screen: ``points`` [(x, y), ...] in CSS pixels from the canvas' top-left corner,
        ``size`` (width, height) of the displayed canvas. Points outside the canvas (the pointer leaving it) are
        dropped; the rest go through `screen_to_pixel` to `paint`. Returns the new image, or None when no point
        was inside (nothing painted). The widget's mouse-release handler calls this."""
        inside = self._screen_points(points, size)
        return self.paint(inside, value, width) if inside else None

    def screen_erase(self, points: Sequence[Sequence[float]], size: Sequence[float],
                     width: int | None = None) -> torch.Tensor | None:
        """`erase_and_fill` of a stroke drawn on screen (``points`` and ``size`` as in `screen_stroke`, brush
        ``width`` in image pixels). Returns the new image, or None when no point was inside (nothing erased). The
        widget's mouse-release handler calls this when its brush is "erase and fill"."""
        inside = self._screen_points(points, size)
        return self.erase_and_fill(inside, width) if inside else None

    def _screen_points(self, points: Sequence[Sequence[float]], size: Sequence[float]) -> list[tuple[float, float]]:
        """The points (row, col) in pixel units (`screen_to_pixel`) of the screen ``points`` inside a canvas of CSS
        ``size``; points outside are dropped."""
        canvas_w, canvas_h = _canvas_size(size)
        inside = []
        for k, p in enumerate(points):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"points: must be (x, y) pairs in CSS pixels, got {p!r} at index {k}")
            x, y = _finite_number("points", p[0]), _finite_number("points", p[1])
            if 0.0 <= x < canvas_w and 0.0 <= y < canvas_h:
                inside.append(screen_to_pixel(x, y, (canvas_w, canvas_h), self.hw))
        return inside

    @property
    def can_erase(self) -> bool:
        """Whether `erase_and_fill` applies: a model and a loaded image (a tensor or a test index)."""
        return self.model is not None and self._loaded is not None

    def erase_and_fill(self, points: Any = None, width: int | None = None, *, mask: Any = None,
                       fill: torch.Tensor | None = None) -> torch.Tensor:
        """Erase pixels of the loaded image and fill them by real inpainting (`sosvae_lib.inpaint.inpaint`): the
        erased pixels never reach the model. Erase a stroke through ``points`` (as `paint`, brush ``width``) or
        the pixels of ``mask`` (bool [H, W] or [C, H, W]); erasures add up over calls. z is encoded from the image
        with the erased pixels replaced by ``fill`` (default: the mean of the run's first `FILL_IMAGES` training
        images; without a run, each channel's mean over the kept pixels), at the run's calibrated diagonal when it
        has one; then the editor edits p(x | z): its base becomes that decoded distribution and its one state the
        kept pixels, so `image` is x on the kept pixels and E[x_erased | x_kept, z] on the erased ones, `samples`
        complete the erased region, and later strokes condition on both (`undo` and `reset` return to μ(z)).
        Needs a model and an image given as a tensor or a test index (a prior draw has no pixels to keep); erasing
        every pixel is refused. Returns the new `image`."""
        from .inpaint import inpaint  # real inpainting: x̂ = where(kept, x, fill) is all the model ever sees

        if not self.can_erase:
            raise ValueError("image: erase_and_fill needs a model and a loaded image (a tensor or a test index); "
                             "this editor shows a prior draw or was given a distribution")
        c, h, w = self.image_shape
        if (points is None) == (mask is None):
            raise ValueError("points: give either points (a stroke to erase) or mask (pixels to erase), not both")
        loc = self._trained.loc
        if mask is not None:
            m = torch.as_tensor(mask)
            if m.dtype != torch.bool or tuple(m.shape) not in ((h, w), (c, h, w)):
                raise ValueError(f"mask: must be a bool tensor [H, W] = [{h}, {w}] or [C, H, W] = [{c}, {h}, {w}], "
                                 f"got {m.dtype} {tuple(m.shape)}")
            erase = m.to(loc.device).expand(c, h, w).reshape(-1)
        else:
            width = default_width(self.hw) if width is None else width
            erase = stroke_pixels(points, self.hw, width).to(loc.device).unsqueeze(0).expand(c, h, w).reshape(-1)
        erased = erase if self._erased is None else self._erased | erase
        kept = ~erased
        if not bool(kept.any()):
            raise ValueError("mask: every pixel would be erased; keep some pixels to fill the rest from")
        if fill is None:
            fill = self._training_fill()
        scale = None
        if self.run is not None and (cal := self.run.calibration()) is not None and self.rank > 0:
            scale = cal.scale
        x = self._loaded.reshape(1, c, h, w)
        with torch.no_grad():
            z = inpaint(self.model, x, kept.reshape(1, -1), fill=fill, diag_scale=scale).z
            decoded = self.model.decode(z)
        self._erased = erased
        self._trained = decoded if tuple(decoded.batch_shape) == (1,) else decoded.expand((1,))
        self._base = with_eps(self._trained, self._eps, self._fixed)
        flat = x.reshape(-1).to(loc.dtype)
        values = torch.where(kept, flat, torch.zeros_like(flat))
        del self._stack[1:]
        self._stack[0] = _State(torch.zeros_like(kept), torch.zeros_like(values), 0)
        state = _State(kept, values, 1)
        self._image(state)
        self._stack.append(state)
        return self.image

    def _training_fill(self) -> torch.Tensor | None:
        """The mean of the run's first `FILL_IMAGES` training images [C, H, W] (cached), or None without a run."""
        if self.run is None:
            return None
        if self._fill is None:
            n = FILL_IMAGES
            self._fill = self.run.images("train", n).mean(0)
        return self._fill

    @property
    def erased(self) -> torch.Tensor | None:
        """bool [C, H, W]: the pixels erased by `erase_and_fill` so far (None before any)."""
        return None if self._erased is None else self._erased.reshape(self.image_shape).clone()

    def undo(self) -> torch.Tensor:
        """Remove the latest stroke; the image is then bitwise the one shown before it. No-op without strokes."""
        if len(self._stack) > 1:
            self._stack.pop()
        return self.image

    def reset(self) -> torch.Tensor:
        """Remove every stroke (and the undo history): the image is μ again."""
        del self._stack[1:]
        return self.image

    def set_eps(self, eps: float | None) -> torch.Tensor:
        """Use ``eps`` (see `with_eps`; None: the trained diagonal) from now on, strokes kept: every state is
        propagated again under it (lazily). Returns the new image. ``eps`` must be a finite number in
        [`min_eps`, the largest diagonal of the dtype]; anything else is a ValueError naming ``eps``, and the
        editor is left as it was."""
        eps = self._checked_eps(eps)
        self._base = with_eps(self._trained, eps, self._fixed)
        self._eps = eps
        for state in self._stack:
            state.image, state.dist, state.directions = None, None, None
        return self.image

    # -- samples and principal directions ------------------------------------------------------------------
    def samples(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n draws [n, C, H, W] from p(x | painted pixels) (noise seeded by ``seed``, default the editor's seed:
        the same seed gives the same bits); painted pixels equal their painted values in every draw."""
        check_int("n", n, 1)
        seed = self.seed if seed is None else check_int("seed", seed, 0)
        dist = self.distribution
        eps_r, eps_d = draw_noise(dist, n, seed)
        with torch.no_grad():
            out = dist.from_noise(eps_r, eps_d)
        return out.detach().reshape(n, *self.image_shape)

    def directions(self) -> torch.Tensor:
        """Eigenvalues w [R] (descending) of the current covariance factor's P Pᵀ (`components.principal_directions`,
        from the R×R problem); after strokes, of the conditional's factor, so moving along its directions keeps the
        painted pixels. Empty for the pixel-wise model."""
        return self._directions()[0].clone()

    def _directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._state
        if state.directions is None:
            if self.rank == 0:
                device = self._trained.loc.device
                state.directions = (torch.zeros(0, dtype=torch.float64, device=device),
                                    torch.zeros(0, 0, dtype=torch.float64, device=device))
            else:
                w, v, _ = principal_directions(self.distribution.cov_factor.detach().reshape(-1, self.rank))
                state.directions = (w, v)
        return state.directions

    def explore(self, t: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The image [C, H, W] t_j standard deviations along the first K = len(t) principal directions u_j of the
        current P Pᵀ: image + Σ_j t_j √w_j u_j = image + P V t (`from_noise` with factor noise V t, no diagonal
        noise). K ≤ R; t = 0 gives `image`."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() > self.rank or not bool(torch.isfinite(t).all()):
            raise ValueError(f"t: must be at most R = {self.rank} finite numbers (standard deviations), got "
                             f"{t.numel()} values")
        if t.numel() == 0:
            return self.image
        _, v = self._directions()
        noise = (v[:, :t.numel()] @ t.to(v.device)).to(self._trained.loc.dtype)  # t: K numbers from the host
        with torch.no_grad():
            out = self.distribution.from_noise(noise.unsqueeze(0), None)
        return out.detach().reshape(self.image_shape)


# -------------------------------------------------------------------------------------------------------------
# The editing figure: scripted strokes propagated by conditioning, completions from a revealed patch
# -------------------------------------------------------------------------------------------------------------

# Two default strokes: a short one across the top of the head (hair on a face) and one on the lower left
# (background / cheek), far enough apart that their propagated edits are told apart.
DEFAULT_STROKES: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.16, 0.38), (0.12, 0.50), (0.16, 0.62)),
    ((0.78, 0.10), (0.88, 0.20)),
)


@dataclass
class EditResult:
    """Strokes painted one after another on one decoded distribution: ``before`` μ [D]; ``after`` [S, D] the image
    after strokes 1..s (each the conditional mean given every pixel painted so far); ``masks`` [S, D] the
    cumulative masks of the painted pixels (all channels); ``value`` the stroke value (the mean of a colour's
    channels); ``change`` [S, D] = after − before."""

    image_shape: Shape
    before: torch.Tensor
    after: torch.Tensor
    masks: torch.Tensor
    value: float

    @property
    def change(self) -> torch.Tensor:
        return self.after - self.before

    def summary(self) -> dict[str, float]:
        """stroke_pixels: pixels set by all strokes; propagated_rms: RMS change of the pixels no stroke touched
        (0 for a pixel-wise independent model: nothing propagates); propagated_max: their largest |change|;
        propagated_fraction: share of untouched pixels that moved by more than 1/255."""
        last = self.masks[-1]
        free = self.change[-1][~last].double()
        return dict(stroke_pixels=float(last.sum()),
                    propagated_rms=float(free.pow(2).mean().sqrt()) if free.numel() else 0.0,
                    propagated_max=float(free.abs().max()) if free.numel() else 0.0,
                    propagated_fraction=float((free.abs() > 1 / 255).double().mean()) if free.numel() else 0.0)


@torch.no_grad()
def edit_strokes(dist: Any, image_shape: Shape, strokes: Sequence[Sequence[tuple[float, float]]] = DEFAULT_STROKES,
                 value: float | Sequence[float] = 0.0, width: int = 1) -> EditResult:
    """Paint ``strokes`` (each a polyline of (row, col) fractions in [0, 1], `fraction_points`) one after another
    on the mean of ``dist`` (batch shape [] or [1]) with `Editor.paint` (a ``width``×``width`` brush; ``value`` a
    grey level or a colour): after stroke s the image is E[x | x_S = value on every pixel painted so far]
    (``dist.condition``), the painted pixels themselves equal to ``value``."""
    return _paint_strokes(Editor(dist, image_shape=image_shape), strokes, value, width)


def _paint_strokes(editor: Editor, strokes: Sequence[Sequence[tuple[float, float]]],
                   value: float | Sequence[float], width: int | None) -> EditResult:
    """Reset ``editor``, paint ``strokes`` (fractions) one after another, and record μ, each image and each
    cumulative mask (the editor is left with every stroke painted)."""
    if len(strokes) < 1:
        raise ValueError("strokes: need at least one stroke")
    editor.reset()
    before = editor.image.reshape(-1)
    afters, masks = [], []
    for points in strokes:
        afters.append(editor.paint(fraction_points(points, editor.hw), value, width).reshape(-1))
        masks.append(editor.mask.reshape(-1))
    v = value if isinstance(value, (int, float)) else sum(value) / len(value)
    return EditResult(image_shape=editor.image_shape, before=before.cpu(), after=torch.stack(afters).cpu(),
                      masks=torch.stack(masks).cpu(), value=float(v))


@dataclass
class Completions:
    """Conditional samples given a revealed patch: ``truth`` x [D]; ``mask`` [D] (the revealed patch);
    ``uncond_mean`` μ [D]; ``cond_mean`` E[x | x_patch] [D]; ``samples`` [n, D] draws from p(x | x_patch)."""

    image_shape: Shape
    truth: torch.Tensor
    mask: torch.Tensor
    uncond_mean: torch.Tensor
    cond_mean: torch.Tensor
    samples: torch.Tensor

    def summary(self) -> dict[str, float]:
        """rmse_uncond / rmse_cond: RMSE of μ / of the conditional mean against the truth on the hidden pixels;
        sample_spread: mean over hidden pixels of the standard deviation across the completions (0 when the
        completions are all alike); patch_error: max |sample − truth| on the revealed patch (≈ 0)."""
        hidden = ~self.mask
        t = self.truth[hidden].double()
        spread = self.samples[:, hidden].double().std(0).mean() if self.samples.shape[0] > 1 else torch.tensor(0.0)
        return dict(rmse_uncond=float((self.uncond_mean[hidden].double() - t).pow(2).mean().sqrt()),
                    rmse_cond=float((self.cond_mean[hidden].double() - t).pow(2).mean().sqrt()),
                    sample_spread=float(spread),
                    patch_error=float((self.samples[:, self.mask].double()
                                       - self.truth[self.mask].double()).abs().max()))


@torch.no_grad()
def patch_completions(dist: Any, x: torch.Tensor, image_shape: Shape, top: int, left: int, size: int = 10,
                      n: int = 6, seed: int = 0) -> Completions:
    """Reveal the size×size patch at (top, left) of the true image x [D] to ``dist`` (batch [] or [1]) and draw
    n completions from the conditional p(x_hidden | x_patch) with seeded noise."""
    c, h, w = image_shape
    check_int("n", n, 1)
    if not (0 <= top <= h - size and 0 <= left <= w - size):
        raise ValueError(f"top, left: a {size}×{size} patch at ({top}, {left}) does not fit a {h}×{w} image")
    x = x.reshape(-1).to(dist.loc)
    mask = patch_masks(image_shape, torch.tensor([top]), torch.tensor([left]), size)[0].to(x.device)
    cond = dist.condition(mask.reshape(dist.loc.shape), x.reshape(dist.loc.shape))
    eps_r, eps_d = draw_noise(cond, n, seed)
    samples = torch.where(mask, x, cond.from_noise(eps_r, eps_d).reshape(n, -1))
    return Completions(image_shape=tuple(image_shape), truth=x.cpu(), mask=mask.cpu(),
                       uncond_mean=dist.loc.detach().reshape(-1).cpu(),
                       cond_mean=torch.where(mask, x, cond.loc.detach().reshape(-1)).cpu(),
                       samples=samples.detach().cpu())


@torch.no_grad()
def edit_panel(model: Any, x: torch.Tensor, patch: int = 10, n: int = 5, seed: int = 0,
               strokes: Sequence[Sequence[tuple[float, float]]] = DEFAULT_STROKES, value: float = 0.0,
               width: int = 1, corner: tuple[int, int] | None = None) -> tuple[EditResult, Completions]:
    """Everything the editing figure (`plots.editor_figure`) shows for one image x [C, H, W]: strokes painted on
    the mean of its reconstruction p(x | m(x)) (`edit_strokes`), and n completions of x given the patch×patch
    square at ``corner`` (top, left) revealed (`patch_completions`; None: its most uncertain square,
    `sosvae_lib.metrics.most_uncertain_patch`; patch is capped at half the image side)."""
    shape = tuple(model.image_shape)
    dist = reconstruction(model, x)
    size = max(1, min(patch, shape[1] // 2, shape[2] // 2))
    if corner is None:
        tops, lefts = most_uncertain_patch(dist.variance.reshape(1, -1), shape, size)
        corner = (int(tops[0]), int(lefts[0]))
    edit = edit_strokes(dist, shape, strokes, value, width)
    comp = patch_completions(dist, x, shape, int(corner[0]), int(corner[1]), size, n, seed)
    return edit, comp


@torch.no_grad()
def edit_panels(models: Mapping[str, Any], x: torch.Tensor, patch: int = 10, n: int = 5, seed: int = 0,
                strokes: Sequence[Sequence[tuple[float, float]]] = DEFAULT_STROKES, value: float = 0.0,
                width: int = 1) -> dict[str, tuple[EditResult, Completions]]:
    """`edit_panel` for several models on the same image, strokes and revealed square (the most uncertain square of
    the first model), so the models can be compared panel by panel."""
    out: dict[str, tuple[EditResult, Completions]] = {}
    corner = None
    for name, model in models.items():
        out[name] = edit_panel(model, x, patch, n, seed, strokes, value, width, corner)
        if corner is None:
            mask = out[name][1].mask.reshape(model.image_shape)[0]
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            corner = (int(rows[0]), int(cols[0]))
    return out


# -------------------------------------------------------------------------------------------------------------
# A scripted session: the headless path of notebooks/06_editor.ipynb (`plots.session_figure` draws it)
# -------------------------------------------------------------------------------------------------------------

@dataclass
class EditorSession:
    """Scripted strokes applied through the `Editor` API: ``edit`` (`EditResult`: μ, the image after
    each stroke [S, D], the cumulative masks [S, D]); ``samples`` [n, D] drawn given every stroke; and the state
    machine's checks, each a max |difference|: ``undo_error`` (undo after the last stroke against the image before
    it), ``replay_error`` (the last stroke painted again against its first result), ``reset_error`` (reset
    against μ), ``condition_error`` (the image against ``condition(mask, values).mean`` of the decoded
    distribution, called directly), ``sample_stroke_error`` (samples against the painted values on the mask)."""

    edit: EditResult
    samples: torch.Tensor
    eps: float | None
    undo_error: float
    replay_error: float
    reset_error: float
    condition_error: float
    sample_stroke_error: float

    def summary(self) -> dict[str, float]:
        """`EditResult.summary` (stroke_pixels, propagated_rms, propagated_max, propagated_fraction), the checks,
        and sample_spread: mean over unpainted pixels of the standard deviation across the samples."""
        free = ~self.edit.masks[-1]
        spread = self.samples[:, free].double().std(0).mean() if self.samples.shape[0] > 1 else torch.tensor(0.0)
        return dict(**self.edit.summary(), undo_error=self.undo_error, replay_error=self.replay_error,
                    reset_error=self.reset_error, condition_error=self.condition_error,
                    sample_stroke_error=self.sample_stroke_error, sample_spread=float(spread))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def scripted_session(editor: Editor, strokes: Sequence[Sequence[tuple[float, float]]] = DEFAULT_STROKES,
                     value: float | Sequence[float] = 0.0, width: int | None = None, n_samples: int = 4,
                     seed: int = 0) -> EditorSession:
    """Apply ``strokes`` (each a polyline of (row, col) fractions in [0, 1], `fraction_points`) one after another
    with `Editor.paint`, draw ``n_samples`` conditional samples, and exercise undo, replay and reset, checking each
    against the images shown before (see `EditorSession`). The editor is left reset and then with the strokes
    painted again, so it shows their result."""
    edit = _paint_strokes(editor, strokes, value, width)
    mask, values = editor.mask.reshape(-1), editor.values.reshape(-1)
    direct = editor._base.condition(mask.unsqueeze(0), values.unsqueeze(0)).mean.reshape(-1)
    condition_error = _maxdiff(editor.image.reshape(-1), direct)
    samples = editor.samples(n_samples, seed).reshape(n_samples, -1)
    sample_err = _maxdiff(samples[:, mask], values[mask].expand(n_samples, -1))
    prev = edit.before if len(strokes) == 1 else edit.after[-2]
    undo_error = _maxdiff(editor.undo().reshape(-1).cpu(), prev)
    replayed = editor.paint(fraction_points(strokes[-1], editor.hw), value, width)
    replay_error = _maxdiff(replayed.reshape(-1).cpu(), edit.after[-1])
    reset_error = _maxdiff(editor.reset().reshape(-1).cpu(), edit.before)
    for points in strokes:
        editor.paint(fraction_points(points, editor.hw), value, width)
    return EditorSession(edit=edit, samples=samples.cpu(), eps=editor.eps, undo_error=undo_error,
                         replay_error=replay_error, reset_error=reset_error, condition_error=condition_error,
                         sample_stroke_error=sample_err)


# -------------------------------------------------------------------------------------------------------------
# The editing notebooks' checks (notebooks/03_editing.ipynb, notebooks/06_editor.ipynb)
# -------------------------------------------------------------------------------------------------------------

def _grey_or_colour(name: str, value: Any) -> None:
    vals = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    ok = isinstance(vals, (list, tuple)) and len(vals) in (1, 3) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0
        for v in vals)
    if not ok:
        raise ValueError(f"{name}: must be a grey level in [0, 1] (or 3 channel values in [0, 1]), got {value!r}")


_PARAMETER_CHECKS = {
    "image_index": lambda name, v, none_ok: check_int(name, v, 0, allow_none=none_ok),
    "patch": lambda name, v, none_ok: check_int(name, v, 1, allow_none=none_ok),
    "n_completions": lambda name, v, none_ok: check_int(name, v, 1, allow_none=none_ok),
    "n_samples": lambda name, v, none_ok: check_int(name, v, 1, allow_none=none_ok),
    "stroke_width": lambda name, v, none_ok: check_int(name, v, 1, allow_none=True),
    "seed": lambda name, v, none_ok: check_int(name, v, 0, allow_none=none_ok),
    "stroke_value": lambda name, v, none_ok: _grey_or_colour(name, v),
}


def check_parameters(none_ok: Sequence[str] = (), **parameters: Any) -> None:
    """Check an editing notebook's parameters under their own names, before anything is loaded or trained:
    ``image_index``, ``seed`` integers >= 0; ``patch``, ``n_completions``, ``n_samples`` integers >= 1;
    ``stroke_width`` an integer >= 1 or None; ``stroke_value`` a grey level in [0, 1] (or 3 values in [0, 1]).
    The names in ``none_ok`` may also be None (06_editor's ``image_index``: a prior draw). A bad value is a
    ValueError naming the parameter; an unknown name a TypeError."""
    for name, value in parameters.items():
        if name not in _PARAMETER_CHECKS:
            raise TypeError(f"check_parameters: unknown parameter {name!r}; known: {', '.join(_PARAMETER_CHECKS)}")
        _PARAMETER_CHECKS[name](name, value, name in none_ok)


def run_heads() -> dict[str, tuple[str, ...]]:
    """The heads a run may have for each row of the editing figures: the row ``lowrank`` (parameter
    ``lowrank_run``) shows a model with a covariance factor, the row ``diagonal`` (``diagonal_run``) a pixel-wise
    one (from the registry, `sosvae_lib.heads.HeadSpec.has_factor`: ``lowrank``, ``lowrank-diag`` | ``diagonal``)."""
    names = head_names()
    return {"lowrank": tuple(h for h in names if head_spec(h).has_factor),
            "diagonal": tuple(h for h in names if not head_spec(h).has_factor)}


def __getattr__(name: str) -> Any:
    if name == "RUN_HEADS":  # `run_heads()`, read when asked (a head registered later is in it)
        return run_heads()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_runs(runs: Mapping[str, Any]) -> None:
    """Check the runs of an editing notebook, given as {row: a `Run` (or its folder) or its TrainConfig} with the
    rows of `RUN_HEADS`: a run must be finished (`Run.state` "complete"; else a FileNotFoundError naming the
    notebook parameter ``<row>_run`` and how to train it) and have a head its row may show (a diagonal run given as
    ``lowrank_run`` would otherwise be drawn and saved as "lowrank"; else a ValueError naming ``<row>_run``)."""
    allowed_heads = run_heads()
    for row, run in runs.items():
        if row not in allowed_heads:
            raise ValueError(f"runs: unknown row {row!r}; the editing figures have the rows "
                             f"{', '.join(allowed_heads)}")
        config = run
        if isinstance(run, (Run, str, os.PathLike)):
            run = Run(run)
            if run.state() != "complete":
                raise FileNotFoundError(f"{row}_run: no finished run in {run.folder}; train it with "
                                        f"notebooks/01_train.ipynb or `python -m sosvae_lib.train --out {run.folder}` "
                                        f"(or set train_missing=True)")
            config = run.config
        head = getattr(config, "head", None)
        if head not in allowed_heads[row]:
            allowed = " or ".join(repr(h) for h in allowed_heads[row])
            raise ValueError(f"{row}_run: is a run of the {head!r} head; the {row!r} row needs a run of the "
                             f"{allowed} head")
