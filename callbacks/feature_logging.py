"""Feature-activation logging: see reward hacking through SARM features as it happens.

After every update the callback gathers the pooled SAE latents of that update's rollouts (the
reward's ``features["latents"]``, or ``features["<name>/latents"]`` under a weighted sum) from
``pl_module.last_experiences`` and logs, over the rollouts:

- for each controlled feature: its activation rate (z_i > threshold; tau for penalised features,
  0 otherwise) and its mean, as ``features/<id>/rate`` and ``features/<id>/mean``;
- for the ``top_k`` most active latents of the update (by activation rate, then mean): the same,
  as ``features/top<rank>/rate``, ``.../mean`` and ``.../id``;
- ``features/active_per_sample``: the mean number of latents above 0 per rollout.

With a ``WandbLogger`` it also logs W&B histograms: each controlled feature's values, and the
activation rate of every latent (which shows features waking up or dying). Other loggers (CSV,
TensorBoard) get the scalars only.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch


def gather_latents(experiences: Sequence, key: str = "latents") -> torch.Tensor | None:
    """[N, L] latents of valid samples across ``experiences`` (objects with ``.rewards``)."""
    rows = []
    for experience in experiences:
        rewards = getattr(experience, "rewards", None)
        if rewards is None:
            continue
        features = rewards.features
        found = features.get(key)
        if found is None:
            found = next((v for k, v in features.items() if k.endswith("/" + key)), None)
        if found is None:
            continue
        valid = rewards.valid.to(found.device).bool() if rewards.valid is not None else None
        rows.append(found[valid] if valid is not None and valid.shape[0] == found.shape[0] else found)
    if not rows:
        return None
    return torch.cat([r.float().cpu() for r in rows])


def feature_statistics(latents: torch.Tensor, controlled: dict[int, float], top_k: int) -> dict[str, float]:
    """Scalars for one update (see the module docstring)."""
    stats: dict[str, float] = {}
    for feature, threshold in controlled.items():
        if 0 <= feature < latents.shape[1]:
            column = latents[:, feature]
            stats[f"features/{feature}/rate"] = float((column > threshold).float().mean())
            stats[f"features/{feature}/mean"] = float(column.mean())
    fired = latents > 0
    rates, means = fired.float().mean(0), latents.mean(0)
    by_mean = torch.sort(means, descending=True, stable=True).indices
    order = by_mean[torch.sort(rates[by_mean], descending=True, stable=True).indices][:top_k].tolist()
    for rank, feature in enumerate(order, 1):
        stats[f"features/top{rank}/id"] = float(feature)
        stats[f"features/top{rank}/rate"] = float(rates[feature])
        stats[f"features/top{rank}/mean"] = float(means[feature])
    stats["features/active_per_sample"] = float(fired.sum(-1).float().mean())
    return stats


class FeatureActivationLogger(L.Callback):
    """Log activation rates and means of controlled and of the most active SARM latents, per update.

    Args:
        features: Controlled feature ids (default: the reward's ``controlled_features()``, if it has one).
        thresholds: One threshold per feature in ``features`` (default 0), or one for all.
        top_k: How many of the most active latents to log.
        key: The latents' name in ``Rewards.features``.
        histograms: Log W&B histograms where a WandbLogger is configured.
        every_n_updates: Log every N updates.
    """

    def __init__(self, features: list[int] | None = None, thresholds: list[float] | None = None, top_k: int = 10,
                 key: str = "latents", histograms: bool = True, every_n_updates: int = 1):
        self.features, self.thresholds, self.top_k, self.key = features, thresholds, top_k, key
        self.histograms, self.every_n_updates = histograms, every_n_updates

    def controlled(self, pl_module) -> dict[int, float]:
        if self.features is not None:
            thresholds = list(self.thresholds or [0.0])
            if len(thresholds) == 1:
                thresholds *= len(self.features)
            return {int(f): float(t) for f, t in zip(self.features, thresholds)}
        for name in ("reward", "reward_fn", "rewards"):
            candidate = getattr(pl_module, name, None)
            found = self._from_reward(candidate)
            if found is not None:
                return found
        return {}

    @staticmethod
    def _from_reward(reward) -> dict[int, float] | None:
        if reward is None:
            return None
        if hasattr(reward, "controlled_features"):
            return dict(reward.controlled_features())
        merged = {}
        for inner in getattr(reward, "rewards", []) or []:  # a WeightedSum
            if hasattr(inner, "controlled_features"):
                merged.update(inner.controlled_features())
        return merged or None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        update = pl_module.rollout_batches_done
        if self.every_n_updates > 1 and update % self.every_n_updates:
            return
        latents = gather_latents(getattr(pl_module, "last_experiences", []) or [], self.key)
        if latents is None or latents.numel() == 0:
            return
        controlled = self.controlled(pl_module)
        # into the update's own row of metrics.csv / TensorBoard / W&B (this rank's rollouts)
        pl_module.log_dict(feature_statistics(latents, controlled, self.top_k), on_step=True, on_epoch=False,
                           batch_size=1)
        if self.histograms and trainer.is_global_zero:
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    self._histograms(logger, latents, controlled, update)

    @staticmethod
    def _histograms(logger, latents: torch.Tensor, controlled: dict[int, float], step: int) -> None:
        import wandb

        payload = {f"features/{f}/values": wandb.Histogram(latents[:, f].numpy())
                   for f in controlled if 0 <= f < latents.shape[1]}
        payload["features/rates_all_latents"] = wandb.Histogram((latents > 0).float().mean(0).numpy())
        logger.experiment.log({**payload, "update": step})
