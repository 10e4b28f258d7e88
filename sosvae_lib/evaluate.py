"""Evaluate a trained run: the claims of SOS-VAE as numbers (Langley et al., "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022).

``evaluate(run, split="test", config=EvalConfig(...), **overrides)`` loads a run written by `sosvae_lib.train`
(`sosvae_lib.runs.Run`), scores it on held-out images with `sosvae_lib.metrics`, scores the global PPCA baseline of
the same rank (`sosvae_lib.pca`, fitted on the run's training set) with the same metrics where they apply, returns
one flat dict and stores it in the run (`Run.write_evaluation`). `calibrate_run` fits only the calibration of the
diagonal (`sosvae_lib.calibration`). Command line: ``python -m sosvae_lib.evaluate RUN_DIR [--split test]
[--preset smoke|cpu|gpu|paper] [--k 8] ...`` (the flags are the fields of `sosvae_lib.config.EvalConfig`).

Settings that every metric shares: for each test image x the observation distribution is p(x | z = m(x)) with m(x)
the posterior mean of q(z | x) ("the reconstruction"); residuals are x − μ(m(x)) on the clean images; likelihoods
(IWAE, ELBO, inpainting) score the dequantised images, at the bits of the run's data (`sosvae_lib.runs.data_bits`;
`sosvae_lib.metrics` states the bits-per-dimension convention). Generated images are drawn from the prior: means
μ(z) and samples y ~ p(x | z), z ~ N(0, I).

The keys of the result of `evaluate`: test_nll_bpd (IWAE, k samples), elbo_bpd, iwae_k, kl_nats, target_kl,
residual_corr_samples, residual_corr_data, span_capture; for each family f of `sosvae_lib.inpaint.REAL_INPAINT_FAMILIES` (top_half,
left_half, random50, patch10) real_inpaint_rmse_f, real_inpaint_nll_bpd_f and real_inpaint_rmse_f_train_mean
(the training mean on the same pixels: the floor); for each mask family f of
`sosvae_lib.metrics.INPAINT_FAMILIES` (random50, patch10, patch10_maxvar, top_half, left_half)
correction_rmse_uncond_f, correction_rmse_cond_f, correction_nll_bpd_uncond_f, correction_nll_bpd_cond_f and the
last three with suffix ``_cal`` (at the calibrated diagonal); the first version's keys correction_rmse_uncond,
correction_rmse_cond, correction_nll_bpd, correction_nll_bpd_uncond (= patch10) and the same with ``_maxvar``
(= patch10_maxvar); eps_calibrated (lowrank: the fitted ε), diag_scale_calibrated (the multiplier s of the
trained diagonal), val_recon_nll_bpd and val_recon_nll_bpd_calibrated (reconstruction NLL of the val images
at s = 1 and at s), calibration_images, test_nll_bpd_calibrated (IWAE at s·d) — all None for the diagonal
head; for CelebA-like 3-channel data with facenet-pytorch: face_rate_real, face_rate_blur2, fd_blur2,
face_rate_means, face_rate_samples, fd_means, fd_samples (`sosvae_lib.faces`; fd is not FID), face_images (the
real images and the prior draws each of them counts);
spectrum_dist_mean, spectrum_dist_samples, span_angle_deg (synthetic data with a factor only), the baseline's
keys prefixed ``pca_`` (or ``pca_skipped``, why there are none), and dataset, head, rank, latent, epochs (the
epochs the evaluated checkpoint was trained for), epochs_planned (``TrainConfig.epochs``), complete (epochs =
epochs_planned; a RuntimeWarning when not), train_seconds (of the checkpoint), split, num_images, patch (the
side used), dequantized, bits (of the data: 8, 16, or None for continuous data), seed, eval_seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Iterable

import torch

from . import metrics as M
from . import faces
from .calibration import Calibration, calibrate_model, check_search, rescale_diagonal
from .config import EVAL_PRESETS, USAGE_ERRORS, EvalConfig, check_int
from .distributed import resolve_device
from .distributions import deferred_checks
from .heads import has_factor
from .inpaint import REAL_INPAINT_FAMILIES, RealInpaintScores
from .pca import PCAModel, fit_pca, usable_rank
from .runs import SPLITS, Run, bpd_bits, stack_images

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

    def result(self, image_shape: tuple[int, int, int], bits: int = 8) -> dict[str, float]:
        """The metrics of the sums (inpainting NLLs in bits per hidden dimension at ``bits``)."""
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
                out[f"correction_nll_bpd_uncond_{family}{suffix}"] = float(M.bits_per_dim(acc["nll_uncond"],
                                                                                          acc["hidden"], bits=bits))
                out[f"correction_nll_bpd_cond_{family}{suffix}"] = float(M.bits_per_dim(acc["nll"], acc["hidden"],
                                                                                        bits=bits))
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
                   bits: int = 8, true_factor: torch.Tensor | None = None, diag_scale: float | None = None,
                   face_reference: dict[str, Any] | None = None, face_images: int = 100,
                   fill: torch.Tensor | None = None, progress: bool = False) -> dict[str, Any]:
    """Every metric of a VAE (`sosvae_lib.model.VAE` or anything with ``encode``/``decode``) on test images
    [N, C, H, W] in [0, 1]; see the module docstring and `evaluate` for the keys. ``dequantize``: score images
    dequantised at ``bits`` (8 or 16); bits per dimension are stated at ``bits`` (`sosvae_lib.runs.bpd_bits`).
    ``true_factor`` [D, R*] adds ``span_angle_deg`` (synthetic data). ``diag_scale`` s (a calibration,
    `sosvae_lib.calibration`) adds the keys of `calibrated_keys` at the diagonal s·d (IWAE from the same importance
    samples); None sets them to None. ``face_reference`` (`sosvae_lib.faces.face_reference`) adds the face metrics
    of the first ``face_images`` generated means and samples (drawn beyond ``num_samples`` when more). ``patch``:
    side of the revealed square (None: `DEFAULT_PATCH`, capped at half the image's shorter side). ``fill`` (the
    training mean, [C, H, W] or [D]) adds the real-inpainting keys of `sosvae_lib.inpaint.RealInpaintScores` (z from
    the image with its hidden pixels replaced by ``fill``; the conditional at the calibrated diagonal when
    ``diag_scale`` is given); None sets them to None.

    Everything runs on the model's device; the randomness (seeded by ``seed``) is drawn on the CPU, so a seed gives
    the same numbers on every device. Per-image results stay on the device and are read back once at the end."""
    device = next(model.parameters()).device
    model.eval()  # BatchNorm (arch "authors") must use its running statistics, not the batch's
    n, image_shape, d, gen, masks, scores = _setup(images, patch, seed, device)
    real = None if fill is None else RealInpaintScores()
    means, factors = _score_images(model, images, masks, scores, real, gen, k=k, batch_size=batch_size,
                                   dequantize=dequantize, bits=bits, diag_scale=diag_scale, fill=fill,
                                   with_factors=true_factor is not None, progress=progress)
    out: dict[str, Any] = dict(test_nll_bpd=float(M.bits_per_dim(-means["log_likelihood"], d, bits=bits)),
                               elbo_bpd=float(M.bits_per_dim(-means["elbo"], d, bits=bits)),
                               iwae_k=k, kl_nats=means["kl"])
    out.update(dict.fromkeys(calibrated_keys()))
    if "log_likelihood_calibrated" in means:
        out["test_nll_bpd_calibrated"] = float(M.bits_per_dim(-means["log_likelihood_calibrated"], d, bits=bits))
    out.update(scores.result(image_shape, bits))
    out.update(dict.fromkeys(real_inpaint_keys()) if real is None else real.result(bits))

    m = num_samples if num_samples is not None else min(n, 500)
    drawn = max(m, face_images) if face_reference is not None else m  # the face metrics may want more draws
    gen_means, gen_samples = [], []
    for start in range(0, drawn, batch_size):
        b = min(batch_size, drawn - start)
        obs = model.decode(M.host_to(torch.randn(b, model.latent_dim, generator=gen), device))
        gen_means.append(obs.loc.detach())
        gen_samples.append(_draw(obs, gen))
    means_t, samples_t = torch.cat(gen_means), torch.cat(gen_samples)
    out.update(_generation_metrics(means_t[:m], samples_t[:m], images.reshape(n, d), image_shape))
    if face_reference is not None:
        out.update(_face_metrics(means_t[:face_images], samples_t[:face_images], image_shape, face_reference))
    if factors:
        out["span_angle_deg"] = _span_angle(factors, true_factor.double().to(device))
    return out


def _score_images(model: torch.nn.Module, images: torch.Tensor, masks: Any, scores: _Scores,
                  real: RealInpaintScores | None, gen: torch.Generator, *, k: int, batch_size: int, dequantize: bool,
                  bits: int, diag_scale: float | None, fill: torch.Tensor | None, with_factors: bool,
                  progress: bool) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The pass of `evaluate_model` over the test images: IWAE / ELBO / KL per image (their means read back once,
    a ValueError naming the model when one is not finite), the residual and inpainting sums added to ``scores``
    and ``real``; returns (means, the factors P(z(x)) in float64 when ``with_factors``)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    n, d = images.shape[0], math.prod(images.shape[1:])
    rescale = None if diag_scale is None else (lambda dist: rescale_diagonal(dist, diag_scale))
    parts: dict[str, list[torch.Tensor]] = dict(log_likelihood=[], log_likelihood_calibrated=[], elbo=[], kl=[])
    factors = []
    fill = None if fill is None else fill.to(device)  # once, not a host-to-device copy per batch
    bar = tqdm(total=n, desc="evaluate", unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device)
        b = x.shape[0]
        x_score = M.dequantize(x, gen, bits=bits) if dequantize else x
        with deferred_checks():  # non-finite numbers are caught once, below
            bound = M.iwae_log_likelihood(model, x_score, k=k, generator=gen,
                                          variants=None if rescale is None else dict(calibrated=rescale))
            obs = model.decode(model.encode(x).loc)
            batch_masks = masks(start, obs)
            scores.add(obs, x.reshape(b, d), x_score.reshape(b, d), batch_masks,
                       None if rescale is None else rescale(obs))
            if real is not None:  # the model sees x_score on the observed pixels and the fill elsewhere, nothing else
                real.add(model, x_score, batch_masks, fill, diag_scale=diag_scale)
        for key, values in parts.items():
            if key in bound:
                values.append(bound[key])
        if with_factors and obs.cov_factor.shape[-1] > 0:
            factors += list(obs.cov_factor.detach().double())
        bar.update(b)
    bar.close()
    means = {key: torch.cat(values).mean() for key, values in parts.items() if values}
    means = dict(zip(means, torch.stack(list(means.values())).tolist()))  # one read-back
    if not all(map(math.isfinite, means.values())):
        raise ValueError(f"model: gives non-finite likelihoods on these images ({means}); its weights or outputs "
                         f"hold NaN or Inf")
    return means, factors


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
                 patch: int | None = None, seed: int = 0, dequantize: bool = True, bits: int = 8,
                 true_factor: torch.Tensor | None = None, face_reference: dict[str, Any] | None = None,
                 face_images: int = 100, fill: torch.Tensor | None = None) -> dict[str, Any]:
    """The metrics of `evaluate_model` that apply to a global PPCA (`sosvae_lib.pca.fit_pca`) on test images
    [N, C, H, W]: test_nll_bpd is exact (no latent, so no IWAE, ELBO or KL); residuals are x − m; samples are
    draws of N(m, WWᵀ + σ²I) and the generated "means" are the single global mean. σ² is the maximum-likelihood
    value (already calibrated): the calibrated keys repeat the trained ones, ``eps_calibrated`` = σ² and
    ``diag_scale_calibrated`` = 1. With no latent, real inpainting (``fill`` given) is the PPCA conditional itself.
    ``dequantize`` and ``bits`` as for `evaluate_model`.

    Runs in float64 on the fit's device (`sosvae_lib.pca.PCAModel.to`); randomness and read-backs as in
    `evaluate_model`."""
    device = fit.mean.device
    n, image_shape, d, gen, masks, scores = _setup(images, patch, seed, device)
    nll = []
    real = None if fill is None else RealInpaintScores()
    fill = None if fill is None else fill.to(device, torch.float64).reshape(-1)  # once, not per batch
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device).reshape(-1, d).double()
        b = x.shape[0]
        x_score = M.dequantize(x, gen, bits=bits) if dequantize else x
        dist = fit.distribution(b, dtype=torch.float64)
        with deferred_checks():
            nll.append(-dist.log_prob(x_score))
            batch_masks = masks(start, dist)
            scores.add(dist, x, x_score, batch_masks)
            if real is not None:
                real.add(dist, x_score, batch_masks, fill)
    out: dict[str, Any] = dict(test_nll_bpd=float(M.bits_per_dim(torch.cat(nll).mean(), d, bits=bits)))
    out.update(scores.result(image_shape, bits))
    out.update(dict.fromkeys(real_inpaint_keys()) if real is None else real.result(bits))
    out.update({key: out[key.removesuffix("_cal").replace("_calibrated", "")] for key in calibrated_keys()})
    out.update(eps_calibrated=fit.noise_var, diag_scale_calibrated=1.0)
    m = num_samples if num_samples is not None else min(n, 500)
    dist = fit.distribution(m, dtype=torch.float64)
    samples = _draw(dist, gen)
    out.update(_generation_metrics(dist.loc, samples, images.reshape(n, d).double(), image_shape))
    if face_reference is not None:
        if face_images > m:  # the face metrics count face_images draws, as for the model; the first m as above
            samples = torch.cat([samples, _draw(fit.distribution(face_images - m, dtype=torch.float64), gen)])
        out.update(_face_metrics(dist.loc[:1], samples[:face_images], image_shape, face_reference))
    if true_factor is not None:
        out["span_angle_deg"] = M.span_angle_deg(fit.components, true_factor.double().to(device))
    out["explained_variance_ratio"] = fit.explained_variance_ratio
    out["noise_var"] = fit.noise_var
    return out


def evaluate(run: Run | str | os.PathLike, split: str = "test", config: EvalConfig | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Evaluate the run ``run`` (a `sosvae_lib.runs.Run` or its folder) on ``split``; return a flat dict and store
    it in the run (`Run.write_evaluation`; with the calibration, `Run.write_calibration`) when ``config.write``.

    ``config``: an `sosvae_lib.config.EvalConfig` (None: its defaults; `EvalConfig.preset` gives the reproduction's
    per scale); keyword ``overrides`` replace its fields (``evaluate(run, k=16)``), each checked and a bad one named.
    Randomness is seeded by ``config.seed``, so a repeated call gives identical numbers. The PPCA baseline is fitted
    and scored in float64 on the device (skipped, with a ``pca_skipped`` note, when the run has fewer than 2
    training images). Quantised data are dequantised at their bits (`Run.bits`) as the run was trained, and bits per
    dimension stated at those bits (`sosvae_lib.runs.bpd_bits`): 16-bit data on the 16-bit scale, as in training.

    Two inpainting protocols are scored on the same masks (the named region observed, the rest hidden and scored):
    *correction* (the paper's edit propagation: z = m(x) from the whole image, so the encoder has seen the hidden
    pixels; p(x | z) then conditioned on the observed ones) and *real inpainting* (`sosvae_lib.inpaint`: the hidden
    pixels never reach the model; z from the image with them replaced by the training mean, then the exact
    conditional, at the calibrated diagonal when there is one). The result's keys: see the module docstring.
    """
    cfg = _eval_config(config, overrides)
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    run = _existing_run(run)
    device = str(resolve_device(cfg.device))  # a GPU that is not there: one line, before the checkpoint is read
    start_time = time.perf_counter()
    model, trained = run.load_model(device), _trained(run)
    dataset = run.dataset(split, cfg.num_images, root=cfg.root)
    images = stack_images(dataset, cfg.num_images)
    bits = run.data_bits(cfg.root)
    dequantize = _dequantize(cfg.dequantize, trained["config"].dequantize, bits)
    torch.manual_seed(cfg.seed)  # anything inside the model that draws from the global generator
    calibration = None
    if cfg.calibrate and has_factor(model):
        calibration = _calibrate(run, model, split="val", num_images=cfg.calibration_images or cfg.num_images,
                                 seed=cfg.seed, batch_size=cfg.batch_size, dequantize=dequantize, bits=bits,
                                 write=cfg.write, root=cfg.root)
    face_ref = None
    if cfg.faces and images.shape[1] == 3 and faces.available():
        net = faces.FaceNet(device=device)
        real = images if images.shape[0] >= cfg.face_images else run.images(split, cfg.face_images, root=cfg.root)
        face_ref = dict(faces.face_reference(real[:cfg.face_images], net), net=net)
    truth = getattr(dataset, "ground_truth", None)
    common = dict(num_samples=cfg.num_samples, batch_size=cfg.batch_size, patch=cfg.patch, seed=cfg.seed,
                  dequantize=dequantize, bits=bpd_bits(bits), face_reference=face_ref, face_images=cfg.face_images,
                  true_factor=truth["cov_factor"] if isinstance(truth, dict) and "cov_factor" in truth else None)
    result = _header(trained, model, split, images, cfg, dequantize, bits)
    result.update(_calibration_keys(calibration))
    if face_ref is not None:
        result.update({key: value for key, value in face_ref.items() if key not in ("features", "net")})
        result["face_images"] = int(face_ref["features"].shape[0])
    # the training images: their mean fills the hidden pixels of real inpainting; they also fit the PPCA baseline
    n_train = min(cfg.pca_train_items, trained["config"].max_items or cfg.pca_train_items)
    train_images = run.images("train", n_train, root=cfg.root)
    common["fill"] = train_images.mean(0)
    result.update(evaluate_model(model, images, k=cfg.k, progress=cfg.progress,
                                 diag_scale=None if calibration is None else calibration.scale, **common))
    if cfg.pca:
        result.update(_pca_keys(model, trained["config"], train_images, images, device, cfg.seed, common))
    result["eval_seconds"] = time.perf_counter() - start_time
    if cfg.write:
        run.write_evaluation(split, result)
    return result


def evaluate_runs(runs: Iterable[Run | str | os.PathLike], config: EvalConfig | None = None, *,
                  force: bool = False, required: tuple[str, ...] = (), **overrides: Any) -> list[dict[str, Any]]:
    """`evaluate` on the test split each finished run of ``runs`` (`Run.state` "complete"; others are skipped)
    whose stored evaluation is not current (`Run.current_evaluation`: missing, older than the checkpoint, or without
    a key of ``required``), every one with ``force``; returns the results, fresh or read back, in order."""
    cfg = _eval_config(config, overrides)
    out = []
    for run in map(Run, runs):
        if run.state() != "complete":
            continue
        cached = None if force else run.current_evaluation("test", required)
        out.append(cached if cached is not None else evaluate(run, "test", cfg))
    return out


def _eval_config(config: Any, overrides: dict[str, Any]) -> EvalConfig:
    """``config`` (an EvalConfig, or None: the defaults) with ``overrides`` (each field checked and named)."""
    if config is not None and not isinstance(config, EvalConfig):
        raise TypeError(f"config: must be an EvalConfig (sosvae_lib.config) or None, got {type(config).__name__}")
    return (config or EvalConfig()).replace(**overrides)


def _existing_run(run: Any) -> Run:
    """``run`` as a `Run` whose folder exists; else FileNotFoundError naming it."""
    run = Run(run)
    if not run.folder.is_dir():
        raise FileNotFoundError(f"run_dir: {run.folder} is not a directory; give the --out folder of a training run")
    return run


def _dequantize(asked: bool | None, trained: bool, bits: int | None) -> bool:
    """Whether the scored images are dequantised: as the run was trained (``asked`` None) or as ``asked``, and
    only quantised data (``bits`` not None, `sosvae_lib.runs.data_bits`); continuous data asked to be dequantised
    is a ValueError naming ``dequantize``."""
    if asked and bits is None:
        raise ValueError("dequantize: the run's data are continuous (not quantised images); dequantisation applies "
                         "to 8- and 16-bit images only, use dequantize=None or False")
    return bool(trained and bits is not None) if asked is None else asked


def _header(trained: dict[str, Any], model: torch.nn.Module, split: str, images: torch.Tensor, cfg: EvalConfig,
            dequantize: bool, bits: int | None) -> dict[str, Any]:
    """The keys that describe what was evaluated (run, checkpoint, settings); warns when the training was not
    finished."""
    config, epochs = trained["config"], trained["epochs"]
    if epochs < config.epochs:
        warnings.warn(f"run_dir: {trained['folder']} holds the checkpoint after epoch {epochs} of {config.epochs} "
                      f"(training incomplete); the numbers describe that checkpoint (recorded as epochs {epochs}, "
                      f"complete false)", RuntimeWarning, stacklevel=3)
    return dict(dataset=config.dataset, head=config.head, rank=int(model.rank), latent=int(config.latent),
                split=split, num_images=int(images.shape[0]), patch=resolve_patch(cfg.patch, tuple(images.shape[1:])),
                dequantized=bool(dequantize), bits=bits, seed=cfg.seed,
                target_kl=None if config.beta is not None else float(config.target_kl), epochs=epochs,
                epochs_planned=int(config.epochs), complete=epochs >= config.epochs,
                train_seconds=trained["train_seconds"])


def _pca_keys(model: torch.nn.Module, config: Any, train_images: torch.Tensor, images: torch.Tensor, device: str,
              seed: int, common: dict[str, Any]) -> dict[str, Any]:
    """The PPCA baseline of the model's rank (the config's for the pixel-wise head), fitted on ``train_images``:
    its keys prefixed ``pca_``, or ``pca_skipped`` (with a RuntimeWarning) when there are fewer than 2."""
    rank = int(model.rank) if has_factor(model) else int(config.rank)
    if train_images.shape[0] < 2:  # a covariance needs two images
        skipped = f"the PPCA baseline needs at least 2 training images; the run has {train_images.shape[0]}"
        warnings.warn(f"pca: skipped, {skipped}", RuntimeWarning, stacklevel=3)
        return dict(pca_skipped=skipped)
    rank = usable_rank(rank, train_images)
    fit = fit_pca(train_images.reshape(train_images.shape[0], -1).to(device), rank, seed=seed)
    out = {f"pca_{key}": value for key, value in evaluate_pca(fit, images, **common).items()}
    out["pca_rank"] = rank
    return out


def _trained(run: Run) -> dict[str, Any]:
    """The configuration, epochs and training seconds of the run's checkpoint (verified by `Run.load_model` just
    before; read here without its tensors). summary.json is not used: it describes the last finished training,
    which a later ``--resume`` to more epochs may have outgrown."""
    state = run.checkpoint(verify=False)
    return dict(config=run.config, epochs=int(state["epoch"]), train_seconds=state.get("train_seconds"),
                folder=run.folder)


def _calibrate(run: Run, model: torch.nn.Module, *, split: str, num_images: int | None, seed: int, batch_size: int,
               dequantize: bool, bits: int | None, write: bool, root: str | None = None,
               bounds: tuple[float, float] | None = None) -> Calibration:
    """Fit the diagonal scale of ``model`` (the run's) on the first ``num_images`` images of ``split``
    (`sosvae_lib.calibration.calibrate_model`, noise seeded by ``seed``); store it in the run when ``write``."""
    device = next(model.parameters()).device
    images = run.images(split, num_images, root=root).to(device)
    cal = calibrate_model(model, images, batch_size=batch_size, dequantize=dequantize, bits=bits,
                          generator=torch.Generator().manual_seed(seed), bounds=bounds)
    if write:
        run.write_calibration(cal, split=split, seed=seed)
    return cal


def calibrate_run(run: Run | str | os.PathLike, split: str = "val", num_images: int | None = 200, seed: int = 0,
                  batch_size: int = 50, device: str = "cpu", write: bool = True,
                  bounds: tuple[float, float] | None = None, root: str | os.PathLike | None = None) -> Calibration:
    """Load a training run, fit its diagonal scale on ``num_images`` images of ``split`` (None: all; dequantised as
    trained, quantised data only, at their bits, noise seeded by ``seed``) and store it in the run
    (`sosvae_lib.runs.Run.write_calibration`, if ``write``). ``root``: the data folder (None: the run's
    ``TrainConfig.root``; give it when the data moved). Every argument is checked before the run is read."""
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    check_int("num_images", num_images, 1, allow_none=True)
    check_int("seed", seed, 0)
    check_int("batch_size", batch_size, 1)
    if bounds is not None:
        check_search(bounds, 33, 1e-4)
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: must be a folder (str or Path) or None, got {type(root).__name__}")
    run = _existing_run(run)
    model = run.load_model(str(resolve_device(device)))
    bits = run.data_bits(root)
    return _calibrate(run, model, split=split, num_images=num_images, seed=seed, batch_size=batch_size,
                      dequantize=_dequantize(None, run.config.dequantize, bits), bits=bits, write=write,
                      root=None if root is None else os.fspath(root), bounds=bounds)


def _calibration_keys(cal: Calibration | None) -> dict[str, Any]:
    """The result keys of a calibration (None for each when there is none: the diagonal head, calibrate=False)."""
    return dict(eps_calibrated=None if cal is None else cal.eps,
                diag_scale_calibrated=None if cal is None else cal.scale,
                val_recon_nll_bpd=None if cal is None else cal.bpd_trained,
                val_recon_nll_bpd_calibrated=None if cal is None else cal.bpd_calibrated,
                calibration_images=None if cal is None else cal.num_images)


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m sosvae_lib.evaluate",
                                description="Evaluate a training run; print the results and store them in the run.")
    p.add_argument("run_dir", help="output folder of `python -m sosvae_lib.train`")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--preset", choices=EVAL_PRESETS,
                   help="the reproduction's settings of a scale (smoke, cpu, gpu, paper); flags given replace them")
    p.add_argument("--k", type=int, help=f"importance samples of the IWAE bound (default {d.k})")
    p.add_argument("--num-images", type=int, help=f"test images scored, 0 = the whole split (default {d.num_images})")
    p.add_argument("--num-samples", type=int, help="prior draws (default: as many as images)")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--patch", type=int,
                   help="side of the revealed inpainting square (default: 10, capped at half the image's side)")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--pca", action=argparse.BooleanOptionalAction, default=None,
                   help="score the PPCA baseline (default on; --no-pca skips it)")
    p.add_argument("--pca-train-items", type=int, help=f"default {d.pca_train_items}")
    p.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate the diagonal on the val split (default on; --no-calibrate skips it)")
    p.add_argument("--calibration-images", type=int, help="val images for the calibration")
    p.add_argument("--faces", action=argparse.BooleanOptionalAction, default=None,
                   help="face metrics (3-channel data, facenet-pytorch; default on; --no-faces skips them)")
    p.add_argument("--face-images", type=int, help=f"images given to the face detector (default {d.face_images})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default {d.device})")
    p.add_argument("--root", help="data folder (default: the one the run was trained on; give it when the data moved)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig the command line describes: the preset (or the defaults) with every flag given on top
    (``--num-images 0``: the whole split)."""
    given = {k: v for k, v in vars(args).items() if k not in ("run_dir", "split", "preset") and v is not None}
    if given.get("num_images") == 0:
        given["num_images"] = None
    return EvalConfig.preset(args.preset, **given) if args.preset else EvalConfig().replace(**given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.run_dir, split=args.split, config=config_from_args(args))
    except USAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
