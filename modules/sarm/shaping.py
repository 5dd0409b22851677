"""Reward shaping on SARM latents, as pure functions of tensors.

    R_total = R_SARM - sum_i alpha_i * 1[z_i > tau_i] - beta * KL_hat(z_policy || z_human)

- :func:`threshold_penalty`: the feature term, per sample.
- :func:`kl_penalty`: the KL term, per sample: beta times the density-ratio discriminator's logit
  (an estimate of log p_policy(z) / p_human(z)); its mean over the policy's samples is beta times
  the KL estimate (see :mod:`modules.sarm.discriminator`).
- :func:`shaped_reward`: the sum.

Departures from the seed (numbered):
1. The KL term is per sample (each sample's estimated log density ratio), whose batch mean is the
   seed's batch-level KL estimate; a batch constant would shift every reward of a batch alike and
   give no learning signal once a baseline is subtracted. ``per_sample=False`` gives the seed's form.
"""

from __future__ import annotations

from typing import Sequence

import torch

from modules.errors import UserError


def as_id_list(value: Sequence[int] | str | int | None) -> list[int]:
    """Feature ids from a list, one int, or a comma-separated string ("48659,28879")."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        try:
            return [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise UserError(f"feature ids must be integers separated by commas, got '{value}'") from None
    return [int(v) for v in value]


def as_float_list(value: Sequence[float] | str | float | None) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        try:
            return [float(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise UserError(f"values must be numbers separated by commas, got '{value}'") from None
    return [float(v) for v in value]


def check_feature_ids(ids: Sequence[int], latent_size: int, what: str = "feature ids") -> None:
    bad = [i for i in ids if not 0 <= int(i) < latent_size]
    if bad:
        raise UserError(f"{what} {bad} are outside the SARM's {latent_size} latents (0..{latent_size - 1})")


def feature_thresholds(features: Sequence[int], taus: Sequence[float], alphas: Sequence[float],
                       ) -> tuple[list[int], list[float], list[float]]:
    """Check ``penalize_features`` / ``tau_values`` / ``alpha_values`` (one value is repeated)."""
    features, taus, alphas = list(features), list(taus), list(alphas)
    if not features:
        if taus or alphas:
            raise UserError("tau_values/alpha_values given without penalize_features")
        return [], [], []
    for name, values in (("tau_values", taus), ("alpha_values", alphas)):
        if len(values) == 1 and len(features) > 1:
            values *= len(features)
        if len(values) != len(features):
            raise UserError(f"{name} has {len(values)} entries but penalize_features has {len(features)}: "
                            "give one value per feature (or a single value for all)")
    if len(set(features)) != len(features):
        raise UserError(f"penalize_features lists a feature twice: {features}")
    if any(a < 0 for a in alphas):
        raise UserError(f"alpha_values must be >= 0 (a penalty), got {alphas}")
    return features, taus, alphas


def active(latents: torch.Tensor, features: Sequence[int], taus: Sequence[float]) -> torch.Tensor:
    """[B, n] bool: z_i > tau_i for each penalised feature."""
    if not len(features):
        return torch.zeros(latents.shape[0], 0, dtype=torch.bool, device=latents.device)
    z = latents[:, list(features)].float()
    return z > torch.tensor(list(taus), dtype=torch.float32, device=latents.device)


def threshold_penalty(latents: torch.Tensor, features: Sequence[int], taus: Sequence[float],
                      alphas: Sequence[float]) -> torch.Tensor:
    """[B] sum_i alpha_i * 1[z_i > tau_i] for latents [B, latent]."""
    fired = active(latents, features, taus).float()
    if fired.shape[1] == 0:
        return torch.zeros(latents.shape[0], device=latents.device)
    return fired @ torch.tensor(list(alphas), dtype=torch.float32, device=latents.device)


def kl_penalty(logits: torch.Tensor, beta: float, per_sample: bool = True) -> torch.Tensor:
    """[B] beta * (each sample's log-ratio logit), or beta * their mean for every sample."""
    logits = logits.float()
    return beta * (logits if per_sample else logits.mean().expand_as(logits))


def shaped_reward(r_sarm: torch.Tensor, feature_penalty: torch.Tensor | None = None,
                  kl_term: torch.Tensor | None = None) -> torch.Tensor:
    """R_total = R_SARM - feature penalty - KL term (absent terms count as 0)."""
    total = r_sarm.float()
    if feature_penalty is not None:
        total = total - feature_penalty.to(total.device)
    if kl_term is not None:
        total = total - kl_term.to(total.device)
    return total
