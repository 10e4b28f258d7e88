"""Training objectives of SOS-VAE (Langley et al., TMLR 2022, §3; METHOD.md §4).

All terms are sums over the batch (and the NLL over the D pixels, never averaged).

Constrained objective (the authors' modified differential method of multipliers): minimise NLL subject to
KL(q‖p) = T per image. With g = Σ_b KL_b − T·B the batch's constraint violation,

    loss = Σ_b NLL_b + (λ + c·sg[g])·g,        λ ← max(0, λ + η·g)   once per batch,

where sg[·] stops the gradient, c is the damping (10) and η the multiplier's learning rate (1). An optional
second constraint of the same form holds the entropy of p(x|z) at a target (λ_H ≥ 0 by the same ascent).

β-ELBO (option): loss = Σ_b NLL_b + β·Σ_b KL_b.

Under torch.distributed each process forms its loss from its own batch; the multiplier update uses the mean over
processes of the per-process violations, so every process holds the same λ and a 1-process run is unchanged.

The multipliers live in a float64 tensor on the device of the batches (`to`), so a training step reads nothing
back to the host; ``lam`` / ``lam_entropy`` and the state dict give them as Python floats. The arithmetic is the
same as with Python floats (float64 ascent; λ rounded to the loss's dtype inside the loss), so results are too.
"""

from __future__ import annotations

import torch


def damped_constraint(value: torch.Tensor, target: float, multiplier: float, damping: float) -> torch.Tensor:
    """(λ + c·sg[g])·g with g = value − target (scalars): the damped Lagrangian term of one constraint."""
    g = value - target
    return (multiplier + damping * g.detach()) * g


def ascend_multiplier(multiplier, violation, lr: float):
    """Projected gradient ascent on a multiplier: λ ← max(0, λ + η·g) (floats, or tensors elementwise)."""
    if isinstance(multiplier, torch.Tensor) or isinstance(violation, torch.Tensor):
        return torch.clamp(multiplier + lr * violation, min=0.0)
    return max(0.0, multiplier + lr * violation)


class ConstrainedObjective:
    """NLL + damped Lagrangian terms holding KL (and optionally the entropy of p(x|z)) at targets per image.

    Holds the multipliers (a float64 tensor ``[λ_KL, λ_H]`` on the batches' device; Python floats through ``lam``,
    ``lam_entropy`` and the state dict, exact to checkpoint); `loss` builds the differentiable loss of a batch,
    `violations` gives the batch's violations as a device tensor and `update` moves the multipliers once per batch.
    """

    uses_entropy: bool

    def __init__(self, target_kl: float, damping: float = 10.0, lambda_lr: float = 1.0, lambda_init: float = 0.0,
                 entropy_target: float | None = None):
        self.target_kl = float(target_kl)
        self.damping = float(damping)
        self.lambda_lr = float(lambda_lr)
        self.entropy_target = entropy_target
        self.uses_entropy = entropy_target is not None
        self._lam = torch.tensor([float(lambda_init), 0.0], dtype=torch.float64)

    def to(self, device: torch.device | str) -> "ConstrainedObjective":
        """Keep the multipliers on ``device`` (that of the batches)."""
        self._lam = self._lam.to(device)
        return self

    @property
    def lam(self) -> float:
        return float(self._lam[0])

    @property
    def lam_entropy(self) -> float:
        return float(self._lam[1])

    def loss(self, nll: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """nll [B], kl [B], entropy [B] (when targeted) → scalar loss."""
        n = nll.shape[0]
        lam = self._lam.to(device=kl.device, dtype=kl.dtype)
        loss = nll.sum() + damped_constraint(kl.sum(), self.target_kl * n, lam[0], self.damping)
        if self.uses_entropy:
            loss = loss + damped_constraint(entropy.sum(), self.entropy_target * n, lam[1], self.damping)
        return loss

    def violations(self, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [1] (or [2] with the entropy target): the batch's constraint violations g, on kl's device."""
        n = kl.shape[0]
        out = [kl.detach().sum().double() - self.target_kl * n]
        if self.uses_entropy:
            out.append(entropy.detach().sum().double() - self.entropy_target * n)
        return torch.stack(out)

    def update(self, violations) -> None:
        """λ ← max(0, λ + η·g) for each constraint (``violations`` as from `violations`, possibly averaged over
        ranks; a tensor or a list of floats)."""
        v = torch.as_tensor(violations, dtype=torch.float64).to(self._lam.device)
        k = 2 if self.uses_entropy else 1
        self._lam = torch.cat([ascend_multiplier(self._lam[:k], v[:k], self.lambda_lr), self._lam[k:]])

    def state_dict(self) -> dict:
        return {"lambda": self.lam, "lambda_entropy": self.lam_entropy}

    def load_state_dict(self, state: dict) -> None:
        self._lam = torch.tensor([float(state["lambda"]), float(state.get("lambda_entropy", 0.0))],
                                 dtype=torch.float64, device=self._lam.device)


class BetaELBO:
    """The β-ELBO: loss = Σ NLL + β·Σ KL (β = 1 is the ELBO). No multipliers; `update` does nothing."""

    uses_entropy = False

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)
        self.lam = 0.0
        self.lam_entropy = 0.0

    def loss(self, nll: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        return nll.sum() + self.beta * kl.sum()

    def to(self, device: torch.device | str) -> "BetaELBO":
        return self

    def violations(self, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        return kl.new_zeros(0, dtype=torch.float64)

    def update(self, violations) -> None:
        pass

    def state_dict(self) -> dict:
        return {"lambda": 0.0, "lambda_entropy": 0.0}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_objective(config) -> ConstrainedObjective | BetaELBO:
    """The objective a `TrainConfig` asks for: β-ELBO when ``beta`` is set, else the constrained objective."""
    if config.beta is not None:
        return BetaELBO(config.beta)
    return ConstrainedObjective(config.target_kl, config.damping, config.lambda_lr, config.lambda_init,
                                config.entropy_target)
