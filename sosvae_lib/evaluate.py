"""Evaluate a trained run: the claims of SOS-VAE as numbers (Langley et al., "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022).

``evaluate(run_dir, split="test", **options)`` loads a run written by `sosvae_lib.train`, scores it on held-out
images with `sosvae_lib.metrics`, scores the global PPCA baseline of the same rank (`sosvae_lib.pca`, fitted on the
run's training set) with the same metrics where they apply, returns one flat dict and writes it atomically to
``run_dir/eval_<split>.json``. Command line: ``python -m sosvae_lib.evaluate RUN_DIR [--split test] [--k 8] ...``.

Settings that every metric shares: for each test image x the observation distribution is p(x | z = m(x)) with m(x)
the posterior mean of q(z | x) ("the reconstruction"); residuals are x − μ(m(x)) on the clean images; likelihoods
(IWAE, ELBO, inpainting) score the dequantised images (`sosvae_lib.metrics` states the bits-per-dimension
convention). Generated images are drawn from the prior: means μ(z) and samples y ~ p(x | z), z ~ N(0, I).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import metrics as M
from .config import USAGE_ERRORS, check_int
from .distributed import resolve_device
from . import faces
from .calibration import CALIBRATION_FILE, Calibration, calibrate_model, rescale_diagonal
from .distributions import deferred_checks
from .inpaint import REAL_INPAINT_FAMILIES, RealInpaintScores
from .pca import PCAModel, fit_pca

# Cost: about k + 2 decoder passes per test image (k importance samples, the reconstruction, one prior draw); a
# cpu-preset decoder pass takes ~20 ms per image on 2 busy CPU cores. The defaults keep a cpu-preset run under
# ~10 s on orl (40 test images) and under a minute on the capped fashion-mnist / celeba test sets (200 images);
# raise k / num_images for tighter numbers.
DEFAULTS: dict[str, Any] = dict(
    k=8,                # importance samples of the IWAE bound (reported as iwae_k)
    num_images=200,     # test images scored (the data set's deterministic max_items subset); None = the whole split
    num_samples=None,   # prior draws for the generation metrics; None = as many as test images scored (≤ 500)
    batch_size=50,      # images per forward pass
    patch=None,         # side of the revealed square of the inpainting metrics; None = 10, capped at half the image
    seed=0,             # seeds dequantisation noise, importance samples, patch positions and prior draws
    pca=True,           # also score the PPCA baseline of the same rank (keys prefixed "pca_")
    pca_train_items=2000,  # training images used to fit the baseline (deterministic subset)
    dequantize=None,    # None: as the run was trained (TrainConfig.dequantize), and only for 8-bit data
    calibrate=True,     # fit the diagonal scale of a low-rank head on the val split (sosvae_lib.calibration)
    calibration_images=None,  # val images for the calibration; None = as many as num_images (the whole split if None)
    faces=True,         # face metrics of 3-channel data when facenet-pytorch is installed (sosvae_lib.faces)
    face_images=100,    # generated and real images given to the face detector (~0.1 s each)
    device="cpu",       # "cpu", "cuda", "cuda:N" or "auto"
    root=None,          # data folder; None = the one the run was trained on (TrainConfig.root)
    progress=True,      # tqdm bars on stderr
    write=True,         # write run_dir/eval_<split>.json
)
SPLITS = ("train", "val", "test")


def _check_options(split: str, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an evaluate() option (options: {', '.join(DEFAULTS)})")
    o = {**DEFAULTS, **options}
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")

    for name in ("k", "batch_size", "pca_train_items"):
        check_int(name, o[name], 1)
    for name in ("num_images", "num_samples", "calibration_images", "patch"):
        check_int(name, o[name], 1, allow_none=True)
    check_int("face_images", o["face_images"], 2)
    check_int("seed", o["seed"], 0)
    for name in ("pca", "progress", "write", "calibrate", "faces"):
        if not isinstance(o[name], bool):
            raise ValueError(f"{name}: must be True or False, got {o[name]!r}")
    if o["dequantize"] is not None and not isinstance(o["dequantize"], bool):
        raise ValueError(f"dequantize: must be True, False or None, got {o['dequantize']!r}")
    dev = o["device"]
    if not (dev in ("cpu", "cuda", "auto") or (isinstance(dev, str) and dev.startswith("cuda:"))):
        raise ValueError(f"device: must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {dev!r}")
    if o["root"] is not None and not isinstance(o["root"], (str, Path)):
        raise TypeError(f"root: must be a folder (str or Path) or None, got {type(o['root']).__name__}")
    return o


def stack_images(dataset, limit: int | None) -> torch.Tensor:
    """The first ``limit`` items of a dataset as one float tensor [N, C, H, W]."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = []
    for i in range(n):
        item = dataset[i]
        items.append(item[0] if isinstance(item, (list, tuple)) else item)
    if not items:
        raise ValueError("split: the data set has no images in this split")
    return torch.stack(items).float()


class _Scores:
    """Running sums of the per-image metrics of observation distributions p(x | z(x)) on test images: residual
    statistics, and the inpainting sums of every mask family (`M.INPAINT_FAMILIES`) at the trained diagonal and,
    when given, at the calibrated one (suffix ``_cal``). The sums are float64 tensors on the images' device, read
    back once by `result` (no host synchronisation per batch)."""

    _INPAINT_SUMS = ("sq_uncond", "sq_cond", "nll", "nll_uncond", "hidden")

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.residuals: list[torch.Tensor] = []

    def _add(self, key: str, value: torch.Tensor) -> None:
        total = value.double().sum()
        self.sums[key] = total if key not in self.sums else self.sums[key] + total

    def add(self, obs: Any, x: torch.Tensor, x_score: torch.Tensor, masks: dict[str, torch.Tensor],
            obs_cal: Any = None) -> None:
        """obs: batch [B] over D; x [B, D] clean images; x_score [B, D] the (dequantised) images that are scored;
        masks {family: observed [B, D]} on the images' device; obs_cal: obs with the calibrated diagonal (or None)."""
        residual = (x - obs.loc).detach()
        self.residuals.append(residual.float())
        self._add("captured", M.projected_energy(residual, obs.cov_factor.detach()))
        self._add("energy", residual.double() ** 2)
        for suffix, dist in (("", obs), ("_cal", obs_cal)):
            if dist is None:
                continue
            for family, mask in masks.items():
                out = M.inpaint(dist, x_score, mask)
                for name, value in zip(self._INPAINT_SUMS, (out.sq_err_uncond, out.sq_err_cond, out.hidden_nll,
                                                            out.hidden_nll_uncond, out.num_hidden)):
                    self._add(f"{family}{suffix}/{name}", value)

    def result(self, image_shape: tuple[int, int, int]) -> dict[str, float]:
        keys = list(self.sums)
        values = dict(zip(keys, torch.stack([self.sums[k] for k in keys]).tolist()))  # the one read-back
        captured, energy = values["captured"], values["energy"]
        out = dict(residual_corr_data=M.lag1_correlation(torch.cat(self.residuals), image_shape),
                   span_capture=captured / energy if energy > 0 else float("nan"))
        for family in M.INPAINT_FAMILIES:
            for suffix in ("", "_cal"):
                if f"{family}{suffix}/hidden" not in values:
                    continue
                acc = {name: values[f"{family}{suffix}/{name}"] for name in self._INPAINT_SUMS}
                if acc["hidden"] == 0:  # a patch as large as the image hides nothing: nothing to score
                    acc = dict.fromkeys(acc, math.nan)
                if not suffix:  # μ does not depend on the diagonal: one unconditional RMSE per family
                    out[f"correction_rmse_uncond_{family}"] = math.sqrt(acc["sq_uncond"] / acc["hidden"])
                out[f"correction_rmse_cond_{family}{suffix}"] = math.sqrt(acc["sq_cond"] / acc["hidden"])
                out[f"correction_nll_bpd_uncond_{family}{suffix}"] = float(M.bits_per_dim(acc["nll_uncond"], acc["hidden"]))
                out[f"correction_nll_bpd_cond_{family}{suffix}"] = float(M.bits_per_dim(acc["nll"], acc["hidden"]))
        # the keys of the first version of these metrics: the revealed patch (random / most uncertain)
        for family, tag in (("patch10", ""), ("patch10_maxvar", "_maxvar")):
            if f"correction_rmse_uncond_{family}" in out:
                out[f"correction_rmse_uncond{tag}"] = out[f"correction_rmse_uncond_{family}"]
                out[f"correction_rmse_cond{tag}"] = out[f"correction_rmse_cond_{family}"]
                out[f"correction_nll_bpd{tag}"] = out[f"correction_nll_bpd_cond_{family}"]
                out[f"correction_nll_bpd_uncond{tag}"] = out[f"correction_nll_bpd_uncond_{family}"]
        return out


def calibrated_keys() -> tuple[str, ...]:
    """The result keys that exist only at a calibrated diagonal (None for the pixel-wise head or without
    calibration): the test NLL and the conditional inpainting numbers with suffix ``_cal``."""
    keys = ["test_nll_bpd_calibrated"]
    for family in M.INPAINT_FAMILIES:
        keys += [f"correction_rmse_cond_{family}_cal", f"correction_nll_bpd_uncond_{family}_cal",
                 f"correction_nll_bpd_cond_{family}_cal"]
    return tuple(keys)


def real_inpaint_keys() -> tuple[str, ...]:
    """The keys of the real-inpainting metrics (`sosvae_lib.inpaint.RealInpaintScores`): for each family of
    `REAL_INPAINT_FAMILIES`, the RMSE and NLL (bits/dim) on the hidden pixels and the training mean's RMSE."""
    return tuple(key for f in REAL_INPAINT_FAMILIES for key in (
        f"real_inpaint_rmse_{f}", f"real_inpaint_nll_bpd_{f}", f"real_inpaint_rmse_{f}_train_mean"))


DEFAULT_PATCH = 10
"""Side of the revealed square of the patch10 families when none is given; capped at half the image's shorter side
(as the editor figures cap theirs, `sosvae_lib.components.editor`), so small images keep most pixels hidden."""


def resolve_patch(patch: int | None, image_shape: tuple[int, ...]) -> int:
    """The side of the revealed square for images (C, H, W): ``patch`` itself (a ValueError naming it when it is
    larger than the shorter side), or for None `DEFAULT_PATCH` capped at ⌊min(H, W)/2⌋ (at least 1; the key names
    keep "patch10")."""
    side = min(image_shape[1:])
    if patch is None:
        return max(1, min(DEFAULT_PATCH, side // 2))
    check_int("patch", patch, 1)
    if patch > side:
        raise ValueError(f"patch: must be at most the image side {side} "
                         f"(images {image_shape[1]}×{image_shape[2]}), got {patch}")
    return patch


def _generation_metrics(means: torch.Tensor, samples: torch.Tensor, test: torch.Tensor,
                        image_shape: tuple[int, int, int]) -> dict[str, float]:
    """Metrics of generated images: means [N, D] and samples [N, D] against test images [M, D]."""
    return dict(residual_corr_samples=M.lag1_correlation(samples - means, image_shape),
                spectrum_dist_mean=M.spectrum_distance(means, test, image_shape),
                spectrum_dist_samples=M.spectrum_distance(samples, test, image_shape))


def _span_angle(factors: list[torch.Tensor], truth: torch.Tensor) -> float:
    """Mean over images of the largest principal angle between span(P(z(x))) and the true factor span."""
    return float(sum(M.span_angle_deg(f, truth) for f in factors) / len(factors))


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, images: torch.Tensor, *, k: int = 8, num_samples: int | None = None,
                   batch_size: int = 50, patch: int | None = None, seed: int = 0, dequantize: bool = True,
                   true_factor: torch.Tensor | None = None, diag_scale: float | None = None,
                   face_reference: dict[str, Any] | None = None, face_images: int = 100,
                   fill: torch.Tensor | None = None, progress: bool = False) -> dict[str, Any]:
    """Every metric of a VAE (`sosvae_lib.model.VAE` or anything with ``encode``/``decode``) on test images
    [N, C, H, W] in [0, 1]; see the module docstring and `evaluate` for the keys. ``true_factor`` [D, R*] adds
    ``span_angle_deg`` (synthetic data). ``diag_scale`` s (a calibration, `sosvae_lib.calibration`) adds the keys of
    `calibrated_keys` at the diagonal s·d (IWAE from the same importance samples); None sets them to None.
    ``face_reference`` (`sosvae_lib.faces.face_reference`) adds the face metrics of the first ``face_images``
    generated means and samples. ``patch``: side of the revealed square (None: `DEFAULT_PATCH`, capped at half the
    image's shorter side). ``fill`` (the training mean, [C, H, W] or [D]) adds the real-inpainting keys of
    `sosvae_lib.inpaint.RealInpaintScores` (z from the image with its hidden pixels replaced by ``fill``; the
    conditional at the calibrated diagonal when ``diag_scale`` is given); None sets them to None.

    Everything runs on the model's device; the randomness (seeded by ``seed``) is drawn on the CPU, so a seed gives
    the same numbers on every device. Per-image results stay on the device and are read back once at the end."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()  # BatchNorm (arch "authors") must use its running statistics, not the batch's
    n, image_shape, d, gen, masks, scores = _setup(images, patch, seed, device)
    rescale = None if diag_scale is None else (lambda dist: rescale_diagonal(dist, diag_scale))
    parts: dict[str, list[torch.Tensor]] = dict(log_likelihood=[], log_likelihood_calibrated=[], elbo=[], kl=[])
    factors = []
    real = None if fill is None else RealInpaintScores()
    bar = tqdm(total=n, desc="evaluate", unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device)
        b = x.shape[0]
        x_score = M.dequantize(x, gen) if dequantize else x
        with deferred_checks():  # non-finite numbers are caught once, below
            bound = M.iwae_log_likelihood(model, x_score, k=k, generator=gen,
                                          variants=None if rescale is None else dict(calibrated=rescale))
            obs = model.decode(model.encode(x).loc)
            batch_masks = masks(start, obs)
            scores.add(obs, x.reshape(b, d), x_score.reshape(b, d), batch_masks,
                       None if rescale is None else rescale(obs))
            if real is not None:  # the model sees x_score on the observed pixels and the fill elsewhere, nothing else
                real.add(model, x_score, batch_masks, fill.to(device), diag_scale=diag_scale)
        for key, values in parts.items():
            if key in bound:
                values.append(bound[key])
        if true_factor is not None and obs.cov_factor.shape[-1] > 0:
            factors += list(obs.cov_factor.detach().double())
        bar.update(b)
    bar.close()
    means = {key: torch.cat(values).mean() for key, values in parts.items() if values}
    means = dict(zip(means, torch.stack(list(means.values())).tolist()))  # one read-back
    if not all(map(math.isfinite, means.values())):
        raise ValueError(f"model: gives non-finite likelihoods on these images ({means}); its weights or outputs "
                         f"hold NaN or Inf")
    out: dict[str, Any] = dict(test_nll_bpd=float(M.bits_per_dim(-means["log_likelihood"], d)),
                               elbo_bpd=float(M.bits_per_dim(-means["elbo"], d)),
                               iwae_k=k, kl_nats=means["kl"])
    out.update(dict.fromkeys(calibrated_keys()))
    if "log_likelihood_calibrated" in means:
        out["test_nll_bpd_calibrated"] = float(M.bits_per_dim(-means["log_likelihood_calibrated"], d))
    out.update(scores.result(image_shape))
    out.update(dict.fromkeys(real_inpaint_keys()) if real is None else real.result())

    m = num_samples if num_samples is not None else min(n, 500)
    gen_means, gen_samples = [], []
    for start in range(0, m, batch_size):
        b = min(batch_size, m - start)
        obs = model.decode(M.host_to(torch.randn(b, model.latent_dim, generator=gen), device))
        gen_means.append(obs.loc.detach())
        gen_samples.append(_draw(obs, gen))
    means_t, samples_t = torch.cat(gen_means), torch.cat(gen_samples)
    out.update(_generation_metrics(means_t, samples_t, images.reshape(n, d), image_shape))
    if face_reference is not None:
        out.update(_face_metrics(means_t[:face_images], samples_t[:face_images], image_shape, face_reference))
    if factors:
        out["span_angle_deg"] = _span_angle(factors, true_factor.double().to(device))
    return out


def _face_metrics(means: torch.Tensor | None, samples: torch.Tensor, image_shape: tuple[int, int, int],
                  reference: dict[str, Any]) -> dict[str, float]:
    """`sosvae_lib.faces.face_scores` of flattened generated images (clamped to [0, 1] for the detector)."""
    from . import faces
    shape = (-1, *image_shape)
    return faces.face_scores(None if means is None else means.reshape(shape).clamp(0, 1),
                             samples.reshape(shape).clamp(0, 1), reference, reference.get("net"))


def _setup(images: torch.Tensor, patch: int | None, seed: int, device: torch.device):
    """What every evaluation of test images [N, C, H, W] on ``device`` starts from: (N, (C, H, W), D, the seeded
    CPU generator, masks, an empty score accumulator). The random patch corners and then the random50 masks are
    drawn from the generator first and moved to the device once; ``masks(start, obs)`` gives {family: observed
    [B, D]} on the device for the images start … start + B − 1 with observation distributions ``obs`` (whose
    variance places the patch10_maxvar square). ``patch`` None: `DEFAULT_PATCH` capped at the image."""
    n = images.shape[0]
    image_shape = tuple(images.shape[1:])
    patch = resolve_patch(patch, image_shape)
    gen = torch.Generator().manual_seed(seed)
    tops, lefts = (c.to(device) for c in M.random_patch_corners(n, image_shape, patch, generator=gen))
    random50 = M.random_pixel_masks(n, image_shape, 0.5, generator=gen).to(device)
    halves = {side: M.half_masks(1, image_shape, side, device=device) for side in ("top", "left")}

    def masks(start: int, obs: Any) -> dict[str, torch.Tensor]:
        b = obs.loc.shape[0]
        sl = slice(start, start + b)
        return dict(random50=random50[sl],
                    patch10=M.patch_masks(image_shape, tops[sl], lefts[sl], patch),
                    patch10_maxvar=M.patch_masks(image_shape, *M.most_uncertain_patch(obs.variance, image_shape, patch),
                                                 patch),
                    top_half=halves["top"].expand(b, -1), left_half=halves["left"].expand(b, -1))

    return n, image_shape, math.prod(image_shape), gen, masks, _Scores()


def _draw(obs: Any, gen: torch.Generator) -> torch.Tensor:
    """One sample per batch element, y = μ + P ε_R + √d ε_D, with the noise drawn from ``gen``: [B, D]."""
    shape = obs.loc.shape
    rank = obs.cov_factor.shape[-1]
    eps_r = M.host_to(torch.randn(*shape[:-1], rank, generator=gen, dtype=obs.loc.dtype), obs.loc.device) if rank \
        else None
    eps_d = M.host_to(torch.randn(*shape, generator=gen, dtype=obs.loc.dtype), obs.loc.device)
    return obs.from_noise(eps_r, eps_d).detach()


@torch.no_grad()
def evaluate_pca(fit: PCAModel, images: torch.Tensor, *, num_samples: int | None = None, batch_size: int = 50,
                 patch: int | None = None, seed: int = 0, dequantize: bool = True,
                 true_factor: torch.Tensor | None = None, face_reference: dict[str, Any] | None = None,
                 face_images: int = 100, fill: torch.Tensor | None = None) -> dict[str, Any]:
    """The metrics of `evaluate_model` that apply to a global PPCA (`sosvae_lib.pca.fit_pca`) on test images
    [N, C, H, W]: test_nll_bpd is exact (no latent, so no IWAE, ELBO or KL); residuals are x − m; samples are
    draws of N(m, WWᵀ + σ²I) and the generated "means" are the single global mean. σ² is the maximum-likelihood
    value (already calibrated): the calibrated keys repeat the trained ones, ``eps_calibrated`` = σ² and
    ``diag_scale_calibrated`` = 1. With no latent, real inpainting (``fill`` given) is the PPCA conditional itself.

    Runs in float64 on the fit's device (`sosvae_lib.pca.PCAModel.to`); randomness and read-backs as in
    `evaluate_model`."""
    device = fit.mean.device
    n, image_shape, d, gen, masks, scores = _setup(images, patch, seed, device)
    nll = []
    real = None if fill is None else RealInpaintScores()
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device).reshape(-1, d).double()
        b = x.shape[0]
        x_score = M.dequantize(x, gen) if dequantize else x
        dist = fit.distribution(b, dtype=torch.float64)
        with deferred_checks():
            nll.append(-dist.log_prob(x_score))
            batch_masks = masks(start, dist)
            scores.add(dist, x, x_score, batch_masks)
            if real is not None:
                real.add(dist, x_score, batch_masks, fill.to(device, torch.float64).reshape(-1))
    out: dict[str, Any] = dict(test_nll_bpd=float(M.bits_per_dim(torch.cat(nll).mean(), d)))
    out.update(scores.result(image_shape))
    out.update(dict.fromkeys(real_inpaint_keys()) if real is None else real.result())
    out.update({key: out[key.removesuffix("_cal").replace("_calibrated", "")] for key in calibrated_keys()})
    out.update(eps_calibrated=fit.noise_var, diag_scale_calibrated=1.0)
    m = num_samples if num_samples is not None else min(n, 500)
    dist = fit.distribution(m, dtype=torch.float64)
    samples = _draw(dist, gen)
    out.update(_generation_metrics(dist.loc, samples, images.reshape(n, d).double(), image_shape))
    if face_reference is not None:
        out.update(_face_metrics(dist.loc[:1], samples[:face_images], image_shape, face_reference))
    if true_factor is not None:
        out["span_angle_deg"] = M.span_angle_deg(fit.components, true_factor.double().to(device))
    out["explained_variance_ratio"] = fit.explained_variance_ratio
    out["noise_var"] = fit.noise_var
    return out


def evaluate(run_dir: str | Path, split: str = "test", **options: Any) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` on ``split``; return a flat dict and write ``run_dir/eval_<split>.json``.

    Options (defaults in ``DEFAULTS``): ``k`` importance samples (8), ``num_images`` test images scored (200, a
    deterministic subset; None = all), ``num_samples`` prior draws for the generation metrics (None = as many as images scored),
    ``batch_size`` (50), ``patch`` side of the revealed square (None = 10, capped at half the image's shorter side),
    ``seed`` (0; seeds all randomness, so a repeated call gives identical numbers), ``pca`` also score the PPCA
    baseline (True; fitted and scored in float64 on ``device``; skipped, with a ``pca_skipped`` note, when the run
    has fewer than 2 training images), ``pca_train_items`` training images for the baseline (2000), ``dequantize``
    (None = as trained), ``calibrate`` fit the diagonal scale on the val split (True; low-rank heads),
    ``calibration_images`` (None = num_images), ``faces`` face metrics for 3-channel data when facenet-pytorch is
    installed (True), ``face_images`` (100), ``device`` ("cpu"), ``root`` the data folder (None = the run's
    ``TrainConfig.root``; give it when the data moved), ``progress`` (tqdm), ``write`` (True; also writes
    ``run_dir/calibration.json``).

    Two inpainting protocols are scored on the same masks (the named region observed, the rest hidden and scored):
    *correction* (the paper's edit propagation: z = m(x) from the whole image, so the encoder has seen the hidden
    pixels; p(x | z) then conditioned on the observed ones) and *real inpainting* (`sosvae_lib.inpaint`: the hidden
    pixels never reach the model; z from the image with them replaced by the training mean, then the exact
    conditional, at the calibrated diagonal when there is one).

    Keys: test_nll_bpd (IWAE, k samples), elbo_bpd, iwae_k, kl_nats, target_kl, residual_corr_samples,
    residual_corr_data, span_capture; for each family f of `sosvae_lib.inpaint.REAL_INPAINT_FAMILIES` (top_half,
    left_half, random50, patch10) real_inpaint_rmse_f, real_inpaint_nll_bpd_f and real_inpaint_rmse_f_train_mean
    (the training mean on the same pixels: the floor); for each mask family f of
    `sosvae_lib.metrics.INPAINT_FAMILIES` (random50, patch10, patch10_maxvar, top_half, left_half)
    correction_rmse_uncond_f, correction_rmse_cond_f, correction_nll_bpd_uncond_f, correction_nll_bpd_cond_f and the last
    three with suffix ``_cal`` (at the calibrated diagonal); the first version's keys correction_rmse_uncond,
    correction_rmse_cond, correction_nll_bpd, correction_nll_bpd_uncond (= patch10) and the same with ``_maxvar``
    (= patch10_maxvar); eps_calibrated (lowrank: the fitted ε), diag_scale_calibrated (the multiplier s of the
    trained diagonal), val_recon_nll_bpd and val_recon_nll_bpd_calibrated (reconstruction NLL of the val images
    at s = 1 and at s), calibration_images, test_nll_bpd_calibrated (IWAE at s·d) — all None for the diagonal
    head; for CelebA-like 3-channel data with facenet-pytorch: face_rate_real, face_rate_blur2, fd_blur2,
    face_rate_means, face_rate_samples, fd_means, fd_samples (`sosvae_lib.faces`; fd is not FID);
    spectrum_dist_mean, spectrum_dist_samples, span_angle_deg (synthetic data with a factor only), the baseline's
    keys prefixed ``pca_`` (or ``pca_skipped``, why there are none), and dataset, head, rank, latent, epochs (the
    epochs the evaluated checkpoint was trained for), epochs_planned (``TrainConfig.epochs``), complete (epochs =
    epochs_planned; a RuntimeWarning when not), train_seconds (of the checkpoint), split, num_images, patch (the
    side used), dequantized, seed, eval_seconds.
    """
    from .checkpoint import atomic_write_json, load_run
    from .data import load_dataset

    o = _check_options(split, options)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir: {run_dir} is not a directory; give the --out folder of a training run")
    device = str(resolve_device(o["device"]))  # a GPU that is not there: one line, before the checkpoint is read
    start_time = time.perf_counter()
    model, config = load_run(run_dir, device=device)
    trained = _trained(run_dir)
    if trained["epochs"] < config.epochs:
        warnings.warn(f"run_dir: {run_dir} holds the checkpoint after epoch {trained['epochs']} of {config.epochs} "
                      f"(training incomplete); the numbers describe that checkpoint (recorded as epochs "
                      f"{trained['epochs']}, complete false)", RuntimeWarning, stacklevel=2)
    root = config.root if o["root"] is None else str(o["root"])
    data_options: dict[str, Any] = {} if o["num_images"] is None else dict(max_items=o["num_images"])
    dataset = load_dataset(config.dataset, split, image_size=config.image_size, root=root, **data_options)
    images = stack_images(dataset, o["num_images"])
    # Only 8-bit data are dequantised (a float data set such as `synthetic` is scored as it is).
    eight_bit = getattr(getattr(dataset, "images", None), "dtype", torch.uint8) == torch.uint8
    dequantize = (config.dequantize and eight_bit) if o["dequantize"] is None else o["dequantize"]
    truth = getattr(dataset, "ground_truth", None)
    true_factor = truth["cov_factor"] if isinstance(truth, dict) and "cov_factor" in truth else None

    torch.manual_seed(o["seed"])  # anything inside the model that draws from the global generator
    calibration = None
    if o["calibrate"] and model.rank > 0:
        cal_images = o["calibration_images"] or o["num_images"]
        val_set = load_dataset(config.dataset, "val", image_size=config.image_size, root=root,
                               **({} if cal_images is None else dict(max_items=cal_images)))
        calibration = calibrate_model(model, stack_images(val_set, cal_images).to(device),
                                      batch_size=o["batch_size"], dequantize=dequantize,
                                      generator=torch.Generator().manual_seed(o["seed"]))
        if o["write"]:
            atomic_write_json(run_dir / CALIBRATION_FILE, dict(calibration.to_dict(), split="val", seed=o["seed"]))
    face_ref = None
    if o["faces"] and images.shape[1] == 3 and faces.available():
        net = faces.FaceNet(device=device)
        face_ref = dict(faces.face_reference(images[:o["face_images"]], net), net=net)
    common = dict(num_samples=o["num_samples"], batch_size=o["batch_size"], patch=o["patch"], seed=o["seed"],
                  dequantize=dequantize, true_factor=true_factor, face_reference=face_ref,
                  face_images=o["face_images"])
    result: dict[str, Any] = dict(dataset=config.dataset, head=config.head, rank=int(model.rank),
                                  latent=int(config.latent), split=split, num_images=int(images.shape[0]),
                                  patch=resolve_patch(o["patch"], tuple(images.shape[1:])),
                                  dequantized=bool(dequantize), seed=o["seed"],
                                  target_kl=None if config.beta is not None else float(config.target_kl),
                                  epochs=trained["epochs"], epochs_planned=int(config.epochs),
                                  complete=trained["epochs"] >= config.epochs,
                                  train_seconds=trained["train_seconds"])
    result.update(_calibration_keys(calibration))
    if face_ref is not None:
        result.update({key: value for key, value in face_ref.items() if key not in ("features", "net")})
    # the training images: their mean fills the hidden pixels of real inpainting; they also fit the PPCA baseline
    train_options: dict[str, Any] = dict(max_items=min(o["pca_train_items"], config.max_items or o["pca_train_items"]))
    train_set = load_dataset(config.dataset, "train", image_size=config.image_size, root=root, augment=False,
                             **train_options)
    train_images = stack_images(train_set, train_options["max_items"])
    common["fill"] = train_images.mean(0)
    result.update(evaluate_model(model, images, k=o["k"], progress=o["progress"],
                                 diag_scale=None if calibration is None else calibration.scale, **common))
    if o["pca"]:
        rank = int(model.rank) if model.rank > 0 else int(config.rank)
        if train_images.shape[0] < 2:  # a covariance needs two images
            result["pca_skipped"] = (f"the PPCA baseline needs at least 2 training images; the run has "
                                     f"{train_images.shape[0]}")
            warnings.warn(f"pca: skipped, {result['pca_skipped']}", RuntimeWarning, stacklevel=2)
        else:
            rank = min(rank, min(train_images.shape[0], math.prod(train_images.shape[1:])) - 1)
            fit = fit_pca(train_images.reshape(train_images.shape[0], -1).to(device), rank, seed=o["seed"])
            base = evaluate_pca(fit, images, **common)
            result.update({f"pca_{key}": value for key, value in base.items()})
            result["pca_rank"] = rank
    result["eval_seconds"] = time.perf_counter() - start_time
    if o["write"]:
        atomic_write_json(run_dir / f"eval_{split}.json", result)
    return result


def _trained(run_dir: Path) -> dict[str, Any]:
    """The epochs and training seconds of the checkpoint in ``run_dir`` (verified by `load_run` just before; its
    tensors are memory-mapped, not read). summary.json is not used: it describes the last finished training, which
    a later ``--resume`` to more epochs may have outgrown."""
    from .checkpoint import CHECKPOINT

    state = torch.load(run_dir / CHECKPOINT, map_location="cpu", mmap=True, weights_only=False)
    return dict(epochs=int(state["epoch"]), train_seconds=state.get("train_seconds"))


def _calibration_keys(cal: Calibration | None) -> dict[str, Any]:
    """The result keys of a calibration (None for each when there is none: the diagonal head, calibrate=False)."""
    return dict(eps_calibrated=None if cal is None else cal.eps,
                diag_scale_calibrated=None if cal is None else cal.scale,
                val_recon_nll_bpd=None if cal is None else cal.bpd_trained,
                val_recon_nll_bpd_calibrated=None if cal is None else cal.bpd_calibrated,
                calibration_images=None if cal is None else cal.num_images)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sosvae_lib.evaluate",
                                description="Evaluate a training run; print and write RUN_DIR/eval_<split>.json.")
    p.add_argument("run_dir", help="output folder of `python -m sosvae_lib.train`")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--k", type=int, default=DEFAULTS["k"], help="importance samples of the IWAE bound")
    p.add_argument("--num-images", type=int, default=DEFAULTS["num_images"],
                   help="test images scored (0 = the whole split)")
    p.add_argument("--num-samples", type=int, default=None, help="prior draws (default: as many as images)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--patch", type=int, default=DEFAULTS["patch"],
                   help="side of the revealed inpainting square (default: 10, capped at half the image's side)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--no-pca", action="store_true", help="skip the PPCA baseline")
    p.add_argument("--pca-train-items", type=int, default=DEFAULTS["pca_train_items"])
    p.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no-calibrate", action="store_true", help="skip the calibration of the diagonal on the val split")
    p.add_argument("--calibration-images", type=int, default=None, help="val images for the calibration")
    p.add_argument("--no-faces", action="store_true", help="skip the face metrics (3-channel data, facenet-pytorch)")
    p.add_argument("--face-images", type=int, default=DEFAULTS["face_images"],
                   help="images given to the face detector")
    p.add_argument("--device", default=DEFAULTS["device"])
    p.add_argument("--root", default=None,
                   help="data folder (default: the one the run was trained on; give it when the data moved)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.run_dir, split=args.split, k=args.k,
                          num_images=None if args.num_images == 0 else args.num_images,
                          num_samples=args.num_samples, batch_size=args.batch_size, patch=args.patch,
                          seed=args.seed, pca=not args.no_pca, pca_train_items=args.pca_train_items,
                          dequantize=args.dequantize, device=args.device, progress=not args.no_progress,
                          calibrate=not args.no_calibrate, calibration_images=args.calibration_images,
                          faces=not args.no_faces, face_images=args.face_images, root=args.root)
    except USAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
