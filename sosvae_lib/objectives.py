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
"""

from __future__ import annotations

import torch


def damped_constraint(value: torch.Tensor, target: float, multiplier: float, damping: float) -> torch.Tensor:
    """(λ + c·sg[g])·g with g = value − target (scalars): the damped Lagrangian term of one constraint."""
    g = value - target
    return (multiplier + damping * g.detach()) * g


def ascend_multiplier(multiplier: float, violation: float, lr: float) -> float:
    """Projected gradient ascent on a multiplier: λ ← max(0, λ + η·g)."""
    return max(0.0, multiplier + lr * violation)


class ConstrainedObjective:
    """NLL + damped Lagrangian terms holding KL (and optionally the entropy of p(x|z)) at targets per image.

    Holds the multipliers (Python floats, so they are exact to checkpoint); `loss` builds the differentiable loss
    of a batch and `update` moves the multipliers once per batch.
    """

    uses_entropy: bool

    def __init__(self, target_kl: float, damping: float = 10.0, lambda_lr: float = 1.0, lambda_init: float = 0.0,
                 entropy_target: float | None = None):
        self.target_kl = float(target_kl)
        self.damping = float(damping)
        self.lambda_lr = float(lambda_lr)
        self.entropy_target = entropy_target
        self.uses_entropy = entropy_target is not None
        self.lam = float(lambda_init)
        self.lam_entropy = 0.0

    def loss(self, nll: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """nll [B], kl [B], entropy [B] (when targeted) → scalar loss."""
        n = nll.shape[0]
        loss = nll.sum() + damped_constraint(kl.sum(), self.target_kl * n, self.lam, self.damping)
        if self.uses_entropy:
            loss = loss + damped_constraint(entropy.sum(), self.entropy_target * n, self.lam_entropy, self.damping)
        return loss

    def violations(self, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> list[float]:
        """The batch's constraint violations g (KL first, then entropy when targeted)."""
        n = kl.shape[0]
        out = [float(kl.detach().sum()) - self.target_kl * n]
        if self.uses_entropy:
            out.append(float(entropy.detach().sum()) - self.entropy_target * n)
        return out

    def update(self, violations: list[float]) -> None:
        """λ ← max(0, λ + η·g) for each constraint (the violations of `violations`, possibly averaged over ranks)."""
        self.lam = ascend_multiplier(self.lam, violations[0], self.lambda_lr)
        if self.uses_entropy:
            self.lam_entropy = ascend_multiplier(self.lam_entropy, violations[1], self.lambda_lr)

    def state_dict(self) -> dict:
        return {"lambda": self.lam, "lambda_entropy": self.lam_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lambda"])
        self.lam_entropy = float(state.get("lambda_entropy", 0.0))


class BetaELBO:
    """The β-ELBO: loss = Σ NLL + β·Σ KL (β = 1 is the ELBO). No multipliers; `update` does nothing."""

    uses_entropy = False

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)
        self.lam = 0.0
        self.lam_entropy = 0.0

    def loss(self, nll: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        return nll.sum() + self.beta * kl.sum()

    def violations(self, kl: torch.Tensor, entropy: torch.Tensor | None = None) -> list[float]:
        return []

    def update(self, violations: list[float]) -> None:
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
