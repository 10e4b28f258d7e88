"""The interactive editor of SOS-VAE, in Jupyter (Langley et al., "Structured Uncertainty in the Observation Space
of Variational Autoencoders", TMLR 2022: the paper's third showcase, a dark stroke on the hair propagated to the
whole image by Gaussian conditioning, and the authors' sampler with one slider per component).

`Editor` holds the state and works without any frontend: ``Editor(run_dir_or_model, image=...)``, then
``paint(points, value, width)``, ``image`` (the propagated image, [C, H, W]), ``undo()``, ``reset()``,
``samples(n)``, ``directions()`` / ``explore(t)`` (principal directions of P Pᵀ) and ``set_eps(eps)`` (no smaller
than ``min_eps``). The editing notebooks check their parameters and runs with `check_parameters` and `check_runs`.
``Editor.widget()`` builds the Jupyter widget (anywidget + ipywidgets, the ``notebooks`` extra) whose mouse and
button handlers call exactly these methods.

After every stroke the image is the conditional mean E[x | x_S = painted values] over the set S of every pixel
painted so far, computed from the decoded distribution by `LowRankNormal.condition` (O(D·R²); nothing of size
D×D or |S|×|S|); a pixel painted twice keeps its latest value. For the pixel-wise ``diagonal`` model only the
painted pixels change.

Coordinates: a point is (row, col) in pixel units; pixel (i, j) is the unit square [i, i+1) × [j, j+1), so a
point's pixel is (⌊row⌋, ⌊col⌋). On screen the H×W grid is drawn enlarged in a canvas of displayed size
width × height CSS pixels; the screen point (x, y) from the canvas' top-left corner is the point
(y·H/height, x·W/width) (`screen_to_pixel`), which is exact: pixel (i, j) is drawn on the screen rectangle
[j·width/W, (j+1)·width/W) × [i·height/H, (i+1)·height/H). A stroke joins the pixels of consecutive points by
straight 8-connected pixel lines, and a brush of width w paints the w×w square of pixels around each of them
(offsets −⌊(w−1)/2⌋ … ⌊w/2⌋, as `components.stroke_mask`), clipped at the image border, every channel.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .components import (DEFAULT_STROKES, EditResult, draw_noise, prior_latents, principal_directions,
                         reconstruction)
from .config import check_int
from .distributions import DiagonalNormal, LowRankNormal

__all__ = ["Editor", "EditorSession", "screen_to_pixel", "stroke_pixels", "fraction_points", "default_width",
           "calibrated_eps", "with_eps", "to_rgba", "scripted_session", "session_figure", "EditorUI",
           "check_parameters", "check_runs", "RUN_HEADS", "EPS_ULPS"]

Shape = tuple[int, int, int]
CALIBRATION_FILE = "calibration.json"
"""A run's calibration (`sosvae_lib.calibration`): ``eps``, the calibrated scalar ε of a ``lowrank`` model, and
``scale``, the multiplier of the trained diagonal."""
EVAL_FILES = ("eval_val.json", "eval_test.json")
"""Evaluation files of a run also searched (in this order) for a calibrated ε under the key ``eps_calibrated``."""


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
    square (clipped at the border)."""
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
    round(f·(W−1))) of each (the convention of `components.stroke_mask`, so scripted strokes such as
    `components.DEFAULT_STROKES` land on the same pixels at every image size)."""
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

def calibrated_eps(run_dir: str | os.PathLike, fixed: bool = True) -> float | None:
    """The calibrated ε of a run, in the meaning of `with_eps` (the new scalar diagonal when the trained one is a
    fixed ε, ``fixed``; else the multiplier of the learned diagonal), or None when the run has none (the editor's
    switch is then hidden). Looked up in ``run_dir/calibration.json`` (``eps`` if ``fixed``, else ``scale``), then
    under ``eps_calibrated`` in the `EVAL_FILES`; the first finite number > 0 wins."""
    candidates = [(CALIBRATION_FILE, "eps" if fixed else "scale")] + [(name, "eps_calibrated") for name in EVAL_FILES]
    for name, key in candidates:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get(key)
        except (json.JSONDecodeError, AttributeError, OSError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return None


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
    """Whether the diagonal is the fixed scalar ε (the ``lowrank`` head) rather than learned."""
    head = getattr(model, "head_name", None)
    if head is not None:
        return head == "lowrank"
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
        source: a run directory (str or path), a model (``.decode``, ``.encode``, ``.latent_dim``,
            ``.image_shape``), or a decoded distribution (``LowRankNormal`` / ``DiagonalNormal`` with batch shape
            [] or [1], given with ``image_shape``).
        image: what is edited, for a run or a model: None, the mean of a prior draw z ~ N(0, I) (seeded by
            ``seed``); a tensor, the mean of its reconstruction p(x | m(x)); an int, that image of the run's test
            split (run directories only). Must be None for a distribution. A tensor is [C, H, W] (or [1, C, H, W];
            [H, W] for a one-channel model; channels-last [H, W, C] is refused, not reshaped), uint8 in 0…255
            (divided by 255) or floating point in [0, 1], finite (anything else: a ValueError naming ``image``);
            it is cast to the model's dtype and moved to its device.
        seed: seeds the prior draw and, by default, `samples`.
        eps: None keeps the trained diagonal; a number replaces it (`with_eps`: the scalar ε of a ``lowrank``
            model, a multiplier of a learned diagonal), no smaller than `min_eps`.
        calibrated: the calibrated ε offered by the widget's switch (same meaning and range as ``eps``); None
            reads it from the run directory (`calibrated_eps`; a stored value out of range is ignored with a
            warning); without one the switch is hidden.
        image_shape: (C, H, W); required for a distribution, read from the model otherwise.
        device: where a run directory is loaded (default cpu).

    The image is float32 [C, H, W], not clipped (the widget clips to [0, 1] for display only).
    """

    def __init__(self, source: Any, image: torch.Tensor | int | None = None, *, seed: int = 0,
                 eps: float | None = None, calibrated: float | None = None, image_shape: Shape | None = None,
                 device: str | torch.device = "cpu"):
        self.seed = check_int("seed", seed, 0)
        self.model, self.config, self.run_dir = None, None, None
        if isinstance(source, (str, os.PathLike)):
            from .checkpoint import load_run
            self.run_dir = Path(source)
            self.model, self.config = load_run(self.run_dir, device)
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
            raise TypeError(f"source: must be a run directory, a model or a LowRankNormal/DiagonalNormal, got "
                            f"{type(source).__name__}")
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
        if calibrated is not None:
            self.calibrated = self._checked_eps(calibrated, "calibrated")
        elif self.run_dir is not None and (stored := calibrated_eps(self.run_dir, self._fixed)) is not None:
            try:
                stored = self._checked_eps(stored, "calibrated")
            except ValueError as err:
                warnings.warn(f"{self.run_dir}: the stored calibration is not used: {err}", stacklevel=2)
                stored = None
            self.calibrated = stored
        else:
            self.calibrated = None
        self._eps: float | None = None
        self._base = self._trained
        empty = _State(torch.zeros(D, dtype=torch.bool, device=self._trained.loc.device),
                       torch.zeros(D, dtype=self._trained.loc.dtype, device=self._trained.loc.device), 0)
        self._stack: list[_State] = [empty]
        self.set_eps(eps)

    def _decode(self, image: torch.Tensor | int | None):
        params = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        device = params.device if params is not None else torch.device("cpu")
        if image is None:
            return self.model.decode(prior_latents(self.model.latent_dim, 1, self.seed).to(device))
        if isinstance(image, int) and not isinstance(image, bool):
            if self.config is None:
                raise ValueError("image: an index into the test split needs a run directory as source; pass the "
                                 "image tensor [C, H, W] instead")
            from .reproduce import test_image
            try:
                image = test_image(self.config, check_int("image", image, 0))
            except ValueError as err:  # test_image names its notebooks' parameter: here the index is `image`
                if str(err).startswith("image_index:"):
                    raise ValueError("image:" + str(err)[len("image_index:"):]) from None
                raise
        dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
        return reconstruction(self.model, _checked_image(image, self.image_shape, dtype))

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
        canvas_w, canvas_h = _canvas_size(size)
        inside = []
        for k, p in enumerate(points):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"points: must be (x, y) pairs in CSS pixels, got {p!r} at index {k}")
            x, y = _finite_number("points", p[0]), _finite_number("points", p[1])
            if 0.0 <= x < canvas_w and 0.0 <= y < canvas_h:
                inside.append(screen_to_pixel(x, y, (canvas_w, canvas_h), self.hw))
        if not inside:
            return None
        return self.paint(inside, value, width)

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

    # -- the frontend --------------------------------------------------------------------------------------
    def widget(self, n_samples: int = 4, scale: int | None = None, max_directions: int | None = None) -> "EditorUI":
        """The Jupyter widget over this editor (`EditorUI`): display it as a notebook cell's result."""
        return EditorUI(self, n_samples=n_samples, scale=scale, max_directions=max_directions)


# -------------------------------------------------------------------------------------------------------------
# A scripted session (the headless path of notebooks/06_editor.ipynb) and its figure
# -------------------------------------------------------------------------------------------------------------

@dataclass
class EditorSession:
    """Scripted strokes applied through the `Editor` API: ``edit`` (`components.EditResult`: μ, the image after
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


def scripted_session(editor: Editor, strokes: Sequence[Sequence[tuple[float, float]]] = DEFAULT_STROKES,
                     value: float | Sequence[float] = 0.0, width: int | None = None, n_samples: int = 4,
                     seed: int = 0) -> EditorSession:
    """Apply ``strokes`` (each a polyline of (row, col) fractions in [0, 1], `fraction_points`) one after another
    with `Editor.paint`, draw ``n_samples`` conditional samples, and exercise undo, replay and reset, checking each
    against the images shown before (see `EditorSession`). The editor is left reset and then with the strokes
    painted again, so it shows their result."""
    if len(strokes) < 1:
        raise ValueError("strokes: need at least one stroke")
    editor.reset()
    before = editor.image.reshape(-1)
    afters, masks = [], []
    for points in strokes:
        afters.append(editor.paint(fraction_points(points, editor.hw), value, width).reshape(-1))
        masks.append(editor.mask.reshape(-1))
    direct = editor._base.condition(masks[-1].unsqueeze(0), editor.values.reshape(1, -1)).mean.reshape(-1)
    condition_error = _maxdiff(afters[-1], direct)
    samples = editor.samples(n_samples, seed).reshape(n_samples, -1)
    sample_err = _maxdiff(samples[:, masks[-1]], editor.values.reshape(-1)[masks[-1]].expand(n_samples, -1))
    prev = before if len(afters) == 1 else afters[-2]
    undone = editor.undo().reshape(-1)
    undo_error = _maxdiff(undone, prev) if not torch.equal(undone, prev) else 0.0
    replayed = editor.paint(fraction_points(strokes[-1], editor.hw), value, width).reshape(-1)
    replay_error = 0.0 if torch.equal(replayed, afters[-1]) else _maxdiff(replayed, afters[-1])
    reset_error = _maxdiff(editor.reset().reshape(-1), before)
    for points in strokes:
        editor.paint(fraction_points(points, editor.hw), value, width)
    v = value if isinstance(value, (int, float)) else float(sum(value) / len(value))
    edit = EditResult(image_shape=editor.image_shape, before=before.cpu(), after=torch.stack(afters).cpu(),
                      masks=torch.stack(masks).cpu(), value=float(v))
    return EditorSession(edit=edit, samples=samples.cpu(), eps=editor.eps, undo_error=undo_error,
                         replay_error=replay_error, reset_error=reset_error, condition_error=condition_error,
                         sample_stroke_error=sample_err)


def session_figure(sessions: Mapping[str, EditorSession]):
    """The editor figure, one row per model: μ; after each stroke (outlined) the propagated image and the change
    it caused outside the strokes (cumulative); samples from p(x | strokes). Returns a matplotlib Figure."""
    from .plots import _blank, _grid, _image, _outline, _robust_max, _show, _signed

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
        shape = e.image_shape
        scale = max(_robust_max(e.change, 1.0), 1 / 255)
        _show(row[0], _image(e.before, shape))
        row[0].set_title("μ", fontsize=7)
        row[0].set_ylabel(name, fontsize=8)
        for k in range(e.after.shape[0]):
            ax_img, ax_change = row[1 + 2 * k], row[2 + 2 * k]
            _show(ax_img, _image(e.after[k], shape))
            _outline(ax_img, e.masks[k], shape)
            ax_img.set_title(f"stroke {k + 1}", fontsize=7)
            a, kw = _signed(e.change[k].masked_fill(e.masks[k], 0.0), shape, scale)
            _show(ax_change, a, **kw)
            _outline(ax_change, e.masks[k], shape, color="k")
            ax_change.set_title(f"change (±{scale:.2g})", fontsize=7)
        for j in range(s.samples.shape[0]):
            ax = row[1 + 2 * n_strokes + j]
            _show(ax, _image(s.samples[j], shape))
            _outline(ax, e.masks[-1], shape)
            ax.set_title(f"sample {j + 1}", fontsize=7)
    return fig


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


RUN_HEADS = {"lowrank": ("lowrank", "lowrank-diag"), "diagonal": ("diagonal",)}
"""The heads a run may have for each row of the editing figures: the row ``lowrank`` (parameter ``lowrank_run``)
shows a model with a covariance factor, the row ``diagonal`` (``diagonal_run``) the pixel-wise baseline."""


def check_runs(configs: Mapping[str, Any]) -> None:
    """Check that each run of an editing notebook, given as ``configs`` {row: its TrainConfig} with the rows of
    `RUN_HEADS`, has a head its row may show (a diagonal run given as ``lowrank_run`` would otherwise be drawn and
    saved as "lowrank"); else a ValueError naming the notebook parameter ``<row>_run``."""
    for row, config in configs.items():
        if row not in RUN_HEADS:
            raise ValueError(f"runs: unknown row {row!r}; the editing figures have the rows {', '.join(RUN_HEADS)}")
        head = getattr(config, "head", None)
        if head not in RUN_HEADS[row]:
            allowed = " or ".join(repr(h) for h in RUN_HEADS[row])
            raise ValueError(f"{row}_run: is a run of the {head!r} head; the {row!r} row needs a run of the "
                             f"{allowed} head")


# -------------------------------------------------------------------------------------------------------------
# The Jupyter widget
# -------------------------------------------------------------------------------------------------------------

def to_rgba(images: torch.Tensor) -> bytes:
    """Images [N, C, H, W] (C = 1 or 3) → N·H·W·4 bytes of 8-bit RGBA (clipped to [0, 1], rounded; grey
    repeated over R, G, B; alpha 255), image after image, row-major: what the widget's canvas draws."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: must have shape [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    alpha = torch.full(x.shape[:-1] + (1,), 255, dtype=torch.uint8)
    return torch.cat([x.cpu(), alpha], -1).contiguous().numpy().tobytes()


_CANVAS_ESM = r"""
// One or more H×W RGBA images drawn enlarged (scale CSS pixels per image pixel, no smoothing), in a grid of
// `columns` images per row, `gap` CSS pixels apart.
// When editable, a left-button drag previews the brush and, on release (or when the pointer leaves), sends
// {type: "stroke", points: [[x, y], ...], size: [width, height]} in CSS pixels from the canvas' top-left
// corner; the kernel maps them to pixels (sosvae_lib.editor.screen_to_pixel) and sends back the new image.
function render({ model, el }) {
  const canvas = document.createElement("canvas");
  canvas.className = "sosvae-canvas";
  el.appendChild(canvas);
  const off = document.createElement("canvas");
  let version = 0;
  let points = null;

  function geometry() {
    const n = Math.max(1, model.get("count")), cols = Math.max(1, Math.min(n, model.get("columns")));
    return { h: model.get("height"), w: model.get("width"), n, cols, rows: Math.ceil(n / cols),
             s: model.get("scale"), gap: model.get("gap") };
  }
  function draw() {
    const { h, w, n, cols, rows, s, gap } = geometry();
    const W = cols * w * s + (cols - 1) * gap, H = rows * h * s + (rows - 1) * gap;
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
    canvas.style.width = `${W}px`; canvas.style.height = `${H}px`;
    canvas.dataset.editable = String(model.get("editable"));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, W, H);
    const dv = model.get("rgba");
    if (dv && dv.byteLength === n * h * w * 4) {
      const bytes = new Uint8ClampedArray(dv.buffer, dv.byteOffset, dv.byteLength);
      off.width = w; off.height = h;
      const octx = off.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      for (let k = 0; k < n; k++) {
        octx.putImageData(new ImageData(bytes.slice(k * h * w * 4, (k + 1) * h * w * 4), w, h), 0, 0);
        ctx.drawImage(off, (k % cols) * (w * s + gap), Math.floor(k / cols) * (h * s + gap), w * s, h * s);
      }
    }
    outline();
    version += 1;
    canvas.dataset.version = String(version);
  }
  function outline() {  // the border of the painted pixels (`mask`, H·W bytes), over the first image
    const { h, w, s } = geometry();
    const mv = model.get("mask");
    if (!mv || mv.byteLength !== h * w) return;
    const m = new Uint8Array(mv.buffer, mv.byteOffset, mv.byteLength);
    const on = (i, j) => i >= 0 && j >= 0 && i < h && j < w && m[i * w + j] !== 0;
    const ctx = canvas.getContext("2d");
    ctx.strokeStyle = model.get("outline");
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 0; i < h; i++) for (let j = 0; j < w; j++) {
      if (!on(i, j)) continue;
      const x = j * s, y = i * s;
      if (!on(i - 1, j)) { ctx.moveTo(x, y + 0.5); ctx.lineTo(x + s, y + 0.5); }
      if (!on(i + 1, j)) { ctx.moveTo(x, y + s - 0.5); ctx.lineTo(x + s, y + s - 0.5); }
      if (!on(i, j - 1)) { ctx.moveTo(x + 0.5, y); ctx.lineTo(x + 0.5, y + s); }
      if (!on(i, j + 1)) { ctx.moveTo(x + s - 0.5, y); ctx.lineTo(x + s - 0.5, y + s); }
    }
    ctx.stroke();
  }
  function at(e) {
    const r = canvas.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top, r.width, r.height];
  }
  function preview(x, y, rw, rh) {  // the brush square under the pointer (the kernel's mapping: floor(x·W/width))
    const { h, w } = geometry();
    const bw = model.get("brush_width"), lo = -Math.floor((bw - 1) / 2);
    const col = Math.floor(x * w / rw), row = Math.floor(y * h / rh);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = model.get("brush");
    const sx = canvas.width / w, sy = canvas.height / h;
    ctx.fillRect((col + lo) * sx, (row + lo) * sy, bw * sx, bw * sy);
  }
  function add(e) {
    const [x, y, rw, rh] = at(e);
    if (x < 0 || y < 0 || x >= rw || y >= rh) return;
    points.push([x, y]);
    preview(x, y, rw, rh);
  }
  function finish() {
    if (points === null) return;
    const r = canvas.getBoundingClientRect();
    if (points.length) model.send({ type: "stroke", points, size: [r.width, r.height] });
    points = null;
  }
  const down = (e) => {
    if (!model.get("editable") || e.button !== 0 || model.get("count") !== 1) return;
    e.preventDefault();
    points = [];
    add(e);
  };
  const move = (e) => { if (points !== null) add(e); };
  canvas.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointerleave", finish);
  canvas.addEventListener("pointercancel", finish);
  const keys = ["rgba", "mask", "outline", "height", "width", "count", "columns", "scale", "gap", "editable"];
  for (const k of keys) model.on(`change:${k}`, draw);
  draw();
  return () => { for (const k of keys) model.off(`change:${k}`, draw); };
}
export default { render };
"""

_CANVAS_CSS = """
.sosvae-canvas { display: block; touch-action: none; image-rendering: pixelated; border: 0; padding: 0; }
.sosvae-canvas[data-editable="true"] { cursor: crosshair; }
"""

_CANVAS_CLASS = None


def _canvas_class():
    """The anywidget class of the pixel canvas (imported on first use: anywidget is an optional dependency)."""
    global _CANVAS_CLASS
    if _CANVAS_CLASS is None:
        try:
            import anywidget
            import traitlets
        except ImportError as err:
            raise ImportError("Editor.widget() needs anywidget and ipywidgets (the notebooks extra): "
                              "pip install -e '.[notebooks]'") from err

        class PixelCanvas(anywidget.AnyWidget):
            """``count`` H×W RGBA images (``rgba``, `to_rgba` bytes) drawn ``scale``× enlarged, ``columns`` per row,
            ``gap`` CSS pixels apart; ``mask`` (H·W bytes, empty: none) outlines pixels in the colour ``outline``;
            an ``editable`` one (a single image) sends strokes (see `_CANVAS_ESM`)."""

            _esm = _CANVAS_ESM
            _css = _CANVAS_CSS
            rgba = traitlets.Bytes(b"").tag(sync=True)
            height = traitlets.Int(1).tag(sync=True)
            width = traitlets.Int(1).tag(sync=True)
            count = traitlets.Int(1).tag(sync=True)
            columns = traitlets.Int(1).tag(sync=True)
            mask = traitlets.Bytes(b"").tag(sync=True)
            outline = traitlets.Unicode("#ff2d2d").tag(sync=True)
            scale = traitlets.Int(8).tag(sync=True)
            gap = traitlets.Int(4).tag(sync=True)
            editable = traitlets.Bool(False).tag(sync=True)
            brush = traitlets.Unicode("rgb(0, 0, 0)").tag(sync=True)
            brush_width = traitlets.Int(1).tag(sync=True)

        _CANVAS_CLASS = PixelCanvas
    return _CANVAS_CLASS


class EditorUI:
    """The editor's widget (display it as a cell's result). Tab "edit": the image, drawn ``scale``× enlarged
    (default: about 512 CSS pixels a side), on which a left-button drag paints a stroke; brush width and grey
    level (or colour); undo, reset, sample (``n_samples`` conditional samples beside the image); the switch
    between the trained and the calibrated ε (hidden without calibration); a status line. Tab "principal
    directions": one slider per principal direction of P Pᵀ (the first ``max_directions``; None: all R) from −3
    to +3 standard deviations around the current image.

    The painted pixels are outlined (unless "outline strokes" is unticked). Every handler calls the `Editor` API: a mouse release calls `Editor.screen_stroke` (`_on_canvas_msg`), the
    buttons `undo`, `reset`, `samples`, the switch `set_eps`, the sliders `explore`. ``last_update_ms`` is the
    time of the latest handler, from its call to the new image bytes set on the canvas.
    """

    def __init__(self, editor: Editor, n_samples: int = 4, scale: int | None = None,
                 max_directions: int | None = None):
        import ipywidgets as W

        canvas_cls = _canvas_class()
        self.editor = editor
        self.n_samples = check_int("n_samples", n_samples, 1)
        c, h, w = editor.image_shape
        self.scale = max(1, 512 // max(h, w)) if scale is None else check_int("scale", scale, 1)
        self.sample_clicks = 0
        self.last_update_ms = float("nan")
        self.canvas = canvas_cls(height=h, width=w, count=1, scale=self.scale, editable=True)
        columns = math.ceil(math.sqrt(self.n_samples))  # a square grid as tall as the image
        self.sample_canvas = canvas_cls(height=h, width=w, count=self.n_samples, columns=columns,
                                        scale=max(1, (self.scale * h - 4 * (columns - 1)) // (columns * h)))
        self.canvas.on_msg(self._on_canvas_msg)
        self.canvas.layout.margin = "0 16px 0 0"

        self.width_slider = W.IntSlider(value=default_width(editor.hw), min=1, max=min(min(h, w), max(4, min(h, w) // 4)),
                                        description="brush width")
        if c == 3:
            self.value_picker = W.ColorPicker(value="#000000", description="colour", concise=False)
        else:
            self.value_picker = W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="grey value")
        self.undo_button = W.Button(description="undo", icon="undo")
        self.reset_button = W.Button(description="reset", icon="refresh")
        self.sample_button = W.Button(description=f"sample {self.n_samples}", icon="random")
        self.undo_button.on_click(lambda _: self._update(self.editor.undo))
        self.reset_button.on_click(lambda _: self._update(self.editor.reset))
        self.sample_button.on_click(lambda _: self.sample())
        cal = editor.calibrated
        options = [("trained ε", "trained")]
        if cal is not None:
            options.append((f"calibrated ε = {cal:.3g}" if editor.fixed_diagonal else f"calibrated: d × {cal:.3g}",
                            "calibrated"))
        self.eps_switch = W.ToggleButtons(
            options=options,
            value="calibrated" if cal is not None and editor.eps == cal else "trained", description="ε")
        self.eps_switch.layout.display = None if cal is not None else "none"
        self.eps_switch.disabled = cal is None
        self.eps_switch.observe(self._on_eps, names="value")
        self.status = W.HTML()
        self.outline_box = W.Checkbox(value=True, description="outline strokes", indent=False)
        self.outline_box.observe(lambda _: self._draw_mask(), names="value")
        self.width_slider.observe(self._on_brush, names="value")
        self.value_picker.observe(self._on_brush, names="value")
        self._on_brush()
        edit_tab = W.VBox([
            W.HBox([self.canvas, W.VBox([W.HTML("<b>samples from p(x | strokes)</b>"), self.sample_canvas])],
                   layout=W.Layout(align_items="flex-start")),
            W.HBox([self.width_slider, self.value_picker]),
            W.HBox([self.undo_button, self.reset_button, self.sample_button, self.outline_box]),
            self.eps_switch, self.status])

        k = editor.rank if max_directions is None else min(editor.rank, check_int("max_directions", max_directions, 1))
        self.sliders = [W.FloatSlider(value=0.0, min=-3.0, max=3.0, step=0.1, description=f"u{j + 1}",
                                      continuous_update=True) for j in range(k)]
        for s in self.sliders:
            s.observe(self._on_slider, names="value")
        self.explore_canvas = canvas_cls(height=h, width=w, count=1, scale=self.scale, editable=False)
        self.explore_canvas.layout.margin = "0 16px 0 0"
        self.zero_button = W.Button(description="all to 0")
        self.zero_button.on_click(lambda _: self._zero_sliders())
        self.spectrum = W.HTML()
        slider_box = W.VBox(self.sliders, layout=W.Layout(max_height=f"{h * self.scale}px", overflow="auto"))
        explore_tab = W.VBox([W.HBox([self.explore_canvas, W.VBox([self.spectrum, slider_box, self.zero_button])],
                                     layout=W.Layout(align_items="flex-start"))]
                             if k else [W.HTML("The pixel-wise model has no covariance factor (rank 0): nothing to "
                                               "sweep.")])
        self.tabs = W.Tab(children=[edit_tab, explore_tab])
        self.tabs.set_title(0, "edit")
        self.tabs.set_title(1, "principal directions")
        self.tabs.observe(self._on_tab, names="selected_index")
        self._update(lambda: None)

    # -- handlers: each calls the Editor API and redraws -----------------------------------------------------
    def _brush_value(self) -> float | tuple[float, float, float]:
        v = self.value_picker.value
        if isinstance(v, str):  # '#rrggbb' from the colour picker (or a CSS colour name, kept black)
            s = v.lstrip("#")
            if len(s) == 3:
                s = "".join(ch * 2 for ch in s)
            if len(s) != 6:
                return (0.0, 0.0, 0.0)
            return tuple(int(s[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
        return float(v)

    def _on_brush(self, _change: Any = None) -> None:
        v = self._brush_value()
        rgb = [round(255 * x) for x in (v if isinstance(v, tuple) else (v, v, v))]
        self.canvas.brush = f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"
        self.canvas.brush_width = self.width_slider.value

    def _on_canvas_msg(self, _widget: Any, content: Mapping[str, Any], _buffers: Any = None) -> None:
        """The mouse-release handler: {type: "stroke", points: [[x, y], ...], size: [width, height]}."""
        if not isinstance(content, Mapping) or content.get("type") != "stroke":
            return
        self._update(lambda: self.editor.screen_stroke(content.get("points", []), content.get("size"),
                                                       self._brush_value(), self.width_slider.value))

    def _on_eps(self, change: Mapping[str, Any]) -> None:
        eps = self.editor.calibrated if change["new"] == "calibrated" else None
        self._update(lambda: self.editor.set_eps(eps))

    def sample(self) -> None:
        """The sample button: n new conditional samples (seed = the editor's seed + the number of clicks)."""
        self.sample_clicks += 1
        self._draw_samples()

    def _draw_samples(self) -> None:
        s = self.editor.samples(self.n_samples, self.editor.seed + self.sample_clicks)
        self.sample_canvas.rgba = to_rgba(s)

    def _draw_mask(self) -> None:
        show = self.outline_box.value and bool(self.editor.strokes)
        self.canvas.mask = self.editor.mask[0].to(torch.uint8).cpu().numpy().tobytes() if show else b""

    def _on_slider(self, _change: Any = None) -> None:
        if self.sliders:
            self.explore_canvas.rgba = to_rgba(self.editor.explore([s.value for s in self.sliders]).unsqueeze(0))

    def _zero_sliders(self) -> None:
        for s in self.sliders:
            s.unobserve(self._on_slider, names="value")
            s.value = 0.0
            s.observe(self._on_slider, names="value")
        self._on_slider()

    def _on_tab(self, change: Mapping[str, Any]) -> None:
        if change["new"] == 1:
            self._refresh_directions()

    def _refresh_directions(self) -> None:
        if not self.sliders:
            return
        w = self.editor.directions().cpu()  # R numbers: one read-back, then host arithmetic
        total = float(w.sum())
        shares = ", ".join(f"{float(x) / total:.0%}" if total > 0 else "0%" for x in w[:len(self.sliders)])
        self.spectrum.value = f"<small>share of tr(P Pᵀ) per direction: {shares}</small>"
        for j, s in enumerate(self.sliders):
            s.tooltip = f"√w = {float(w[j]) ** 0.5:.3g}"
        self._on_slider()

    def _update(self, action) -> None:
        t0 = time.perf_counter()
        action()
        self.canvas.rgba = to_rgba(self.editor.image.unsqueeze(0))
        self.last_update_ms = 1e3 * (time.perf_counter() - t0)
        self._draw_mask()
        self._draw_samples()  # the samples shown must come from the new conditional
        if self.tabs.selected_index == 1:
            self._refresh_directions()
        e = self.editor
        painted = int(e.mask[0].sum())
        eps = "trained ε" if e.eps is None else f"ε = {e.eps:.3g}"
        self.status.value = (f"<small>{e.strokes} stroke{'s' if e.strokes != 1 else ''} · {painted} pixel"
                             f"{'s' if painted != 1 else ''} painted · {eps} · R = {e.rank} · "
                             f"update {self.last_update_ms:.1f} ms</small>")

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.tabs._repr_mimebundle_(**kwargs)
