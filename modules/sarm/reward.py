"""SARM as a reward for the on-policy loop, with in-RM control and reward shaping.

    reward = SARMReward("embedded:sarm-smollm2", penalize_features=[12, 40], tau_values=[2.0], alpha_values=[0.1])
    rewards = reward.score(rollout)          # values [B] = R_total, features["latents"] [B, latent]

For each (prompt, response) of a rollout the SARM gives its reward (with any in-RM control:
``clamp_features``/``clamp_values`` set latents, ``cap_features``/``cap_values`` cap them, before the
score head) and the pooled latents z. Then, all optional:

    R_total = R_SARM - sum_i alpha_i * 1[z_i > tau_i] - beta * KL_hat(z_policy || z_human)

``parts`` holds ``sarm`` (R_SARM), ``feature_penalty``, ``active/<id>`` (1 where z_id > tau_id; its
mean is the activation rate), ``kl_penalty`` and ``kl_logit``, and ``sarm_uncontrolled`` when a
control is on. ``features["latents"]`` holds z (uncontrolled) for callbacks. The threshold penalty
reads the uncontrolled z, so clamping a latent in the RM does not hide it from the penalty.

The KL term: a :class:`~modules.sarm.discriminator.DensityRatioDiscriminator` on ``kl_features``
(default: every latent the human buffer stores). At each submission it first scores the batch
(the penalty uses the discriminator as trained on earlier batches), then takes ``disc_steps``
training steps on balanced batches of this batch's latents and the human buffer. Its loss,
accuracy and KL estimate come out of :meth:`metrics`; its state out of :meth:`state_dict`.
Held-out evaluation should wrap scoring in :meth:`frozen_discriminator`.

Departures from the seed (numbered):
1. The KL term is per sample by default (see :mod:`modules.sarm.shaping`); ``kl_per_sample=False``
   subtracts the batch estimate from every sample as the seed does.
2. The discriminator is evaluated before it trains on a batch (a one-batch lag) rather than after,
   so the estimate is not inflated by fitting the very samples it scores.
3. Under several ranks it trains on the latents of every rank's batch (gathered in rank order), so
   every rank holds the same discriminator and a checkpoint (written by rank 0) resumes all of them.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from modules.errors import UserError
from modules.rewards import PendingRewards, RewardFunction, Rewards
from modules.sarm.model import LatentControl, SARMRewardModel, missing_tokenizer_message
from modules.sharding import rows_of_every_rank
from modules.sarm.shaping import (as_float_list, as_id_list, check_feature_ids, feature_thresholds, kl_penalty,
                                  shaped_reward, threshold_penalty, active)

if TYPE_CHECKING:
    from modules.rollout import Rollout


def read_selected_features(path: str) -> dict:
    """A ``selected_features.json`` (written by ``cli.py sarm-probe``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"selected-features file '{path}' does not exist (write one with 'cli.py sarm-probe')")
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise UserError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a JSON object with penalize_features, tau_values, alpha_values")
    return data


class SARMReward(RewardFunction):
    """A SARM reward with optional in-RM control, feature penalties and a KL term to human latents.

    Args:
        model: SARM folder, ``embedded:sarm-smollm2``, or Hub id (``Schrieffer/Llama-SARM-4B``).
        dtype: ``auto`` (bf16 on a GPU, fp32 on the CPU), ``bfloat16``, ``float16``, ``float32``.
        device: Where the SARM runs (default: the GPU if there is one).
        batch_size: Sequences per SARM forward pass.
        max_length: Longer conversations lose tokens from the left.
        score_mode: ``auto`` (the folder's ``sarm_use_activation``/``sarm_use_topk`` flag; an error where
            it has none), ``topk`` or ``dense`` (wins over the flag).
        pooling: ``auto`` (as the folder says, else ``last``), ``last`` or ``aggregate``.
        k: TopK k (wins over the folder's ``sae_k``; needed where it gives none).
        tokenizer: Tokenizer for the SARM's texts: a Hub id, a folder or ``embedded:<name>`` (default: the
            SARM folder's own; needed for folders without one, such as the authors' training checkpoints).
        clamp_features, clamp_values: Latents set to these values before the score head.
        cap_features, cap_values: Latents capped at these values before the score head.
        penalize_features, tau_values, alpha_values: Penalty alpha_i where z_i > tau_i (one value
            per feature, or one for all); ids as a list or "48659,28879".
        selected_features: A ``selected_features.json``; fills the penalty (and clamp) lists not given here.
        kl_beta: Weight of the KL term (0: off).
        kl_features: Latent ids the discriminator reads (default: all the human buffer stores).
        human_latents: The human-latent buffer file (needed when kl_beta > 0).
        kl_per_sample: Per-sample log-ratio (True) or the batch estimate for every sample (False).
        disc_hidden, disc_lr, disc_batch_size, disc_steps, disc_seed: The discriminator's width,
            Adam learning rate, rows per class in a batch, steps per submission, and seed.
        name: Name in logs.
    """

    def __init__(self, model: str = "embedded:sarm-smollm2", dtype: str = "auto", device: str | None = None,
                 batch_size: int = 8, max_length: int = 2048, score_mode: str = "auto", pooling: str = "auto",
                 k: int | None = None, tokenizer: str | None = None,
                 clamp_features: Sequence[int] | str | None = None, clamp_values: Sequence[float] | str | None = None,
                 cap_features: Sequence[int] | str | None = None, cap_values: Sequence[float] | str | None = None,
                 penalize_features: Sequence[int] | str | None = None, tau_values: Sequence[float] | str | None = None,
                 alpha_values: Sequence[float] | str | None = None, selected_features: str | None = None,
                 kl_beta: float = 0.0, kl_features: Sequence[int] | str | None = None,
                 human_latents: str | None = None, kl_per_sample: bool = True,
                 disc_hidden: int = 256, disc_lr: float = 1e-3, disc_batch_size: int = 64, disc_steps: int = 1,
                 disc_seed: int = 0, name: str = "sarm"):
        self.source, self.dtype, self.device = model, dtype, device
        self.batch_size, self.max_length, self.score_mode, self.pooling, self.k = (
            batch_size, max_length, score_mode, pooling, k)
        self.tokenizer = tokenizer
        selected = read_selected_features(selected_features) if selected_features else {}
        penalize = as_id_list(penalize_features if penalize_features is not None else selected.get("penalize_features"))
        taus = as_float_list(tau_values if tau_values is not None else selected.get("tau_values"))
        alphas = as_float_list(alpha_values if alpha_values is not None else selected.get("alpha_values"))
        self.penalize_features, self.tau_values, self.alpha_values = feature_thresholds(penalize, taus, alphas)
        self.control = LatentControl.from_lists(
            as_id_list(clamp_features if clamp_features is not None else selected.get("clamp_features")),
            as_float_list(clamp_values if clamp_values is not None else selected.get("clamp_values")),
            as_id_list(cap_features), as_float_list(cap_values))
        if kl_beta < 0:
            raise UserError(f"kl_beta must be >= 0, got {kl_beta}")
        if kl_beta > 0 and not human_latents:
            raise UserError("kl_beta > 0 needs human_latents: a buffer built with 'cli.py sarm-human-latents'")
        if human_latents and not Path(human_latents).expanduser().is_file():
            raise UserError(f"human-latent buffer '{human_latents}' does not exist: build it with "
                            "'python cli.py sarm-human-latents --demos DEMOS.jsonl --out FILE.pt'")
        self.kl_beta, self.kl_features_arg, self.human_latents_path = kl_beta, as_id_list(kl_features), human_latents
        self.kl_per_sample = kl_per_sample
        self.disc_options = dict(hidden=disc_hidden, lr=disc_lr, batch_size=disc_batch_size, seed=disc_seed)
        self.disc_steps = disc_steps
        self.name = name
        self.rm: SARMRewardModel | None = None
        self.discriminator = None
        self.human: torch.Tensor | None = None
        self.kl_features: list[int] = []
        self.update_discriminator = True
        self._pending_state: dict | None = None
        self._metric_sums: dict[str, float] = {}
        self._metric_count = 0

    # ------------------------------------------------------------------ setup
    def _ensure_loaded(self) -> SARMRewardModel:
        if self.rm is not None:
            return self.rm
        rm = SARMRewardModel.load(self.source, self.dtype, self.device, self.score_mode, self.pooling, self.k,
                                  self.max_length, self.tokenizer)
        if rm.tokenizer is None:
            raise UserError(missing_tokenizer_message(rm.spec.folder))
        check_feature_ids(self.penalize_features, rm.latent_size, "penalize_features")
        self.control.validate(rm.latent_size)
        if self.kl_beta > 0:
            from modules.sarm.discriminator import DensityRatioDiscriminator
            from modules.sarm.human_latents import load_human_latents

            buffer = load_human_latents(self.human_latents_path)
            if buffer.latent_size != rm.latent_size:
                raise UserError(f"human-latent buffer '{self.human_latents_path}' was built with a SARM of "
                                f"{buffer.latent_size} latents, this one has {rm.latent_size}")
            self.kl_features = self.kl_features_arg or buffer.latent_ids
            check_feature_ids(self.kl_features, rm.latent_size, "kl_features")
            self.human = buffer.columns(self.kl_features)
            self.discriminator = DensityRatioDiscriminator(len(self.kl_features), **self.disc_options)
            self.discriminator.fit_scaler(self.human)
            if self._pending_state is not None:
                self.discriminator.load_state_dict(self._pending_state)
                self._pending_state = None
        self.rm = rm
        return rm

    def preflight(self) -> None:
        self._ensure_loaded()

    def to(self, device) -> "SARMReward":
        self.device = str(device)
        if self.rm is not None:
            self.rm.to(device)
        return self

    def controlled_features(self) -> dict[int, float]:
        """Feature id -> threshold of every controlled feature (penalised: tau; clamped/capped: 0)."""
        out = {i: 0.0 for i in self.control.feature_ids}
        out.update(dict(zip(self.penalize_features, self.tau_values)))
        return out

    # ------------------------------------------------------------------ scoring
    def submit(self, rollout: "Rollout") -> PendingRewards:
        rm = self._ensure_loaded()
        out = rm.score(rollout.prompts, rollout.responses, self.batch_size, self.control)
        parts: dict[str, torch.Tensor] = {"sarm": out.rewards}
        if self.control:
            parts["sarm_uncontrolled"] = out.rewards_uncontrolled
        feature_term = kl_term = None
        if self.penalize_features:
            feature_term = threshold_penalty(out.latents, self.penalize_features, self.tau_values, self.alpha_values)
            parts["feature_penalty"] = feature_term
            fired = active(out.latents, self.penalize_features, self.tau_values).float()
            for column, feature in enumerate(self.penalize_features):
                parts[f"active/{feature}"] = fired[:, column]
        if self.kl_beta > 0:
            z = out.latents[:, self.kl_features].float()
            with torch.no_grad():
                logits = self.discriminator.logits(z).cpu()
            kl_term = kl_penalty(logits, self.kl_beta, self.kl_per_sample)
            parts["kl_penalty"], parts["kl_logit"] = kl_term, logits
            metrics = {"sarm/kl_estimate": float(logits.mean())}
            if self.update_discriminator:
                # every rank trains on the policy rows of all ranks, so the discriminators stay equal
                trained = self.discriminator.update(self.human, rows_of_every_rank(z), self.disc_steps)
                metrics.update({"sarm/disc_loss": trained["loss"], "sarm/disc_accuracy": trained["accuracy"]})
            self._add_metrics(metrics)
        values = shaped_reward(out.rewards, feature_term, kl_term)
        rewards = Rewards(values, torch.isfinite(values), parts, {"latents": out.latents})
        return PendingRewards.ready(rewards)

    def evaluation(self):
        """Held-out scoring never trains the discriminator."""
        return self.frozen_discriminator()

    @contextmanager
    def frozen_discriminator(self) -> Iterator[None]:
        """Score without training the discriminator (held-out evaluation)."""
        previous, self.update_discriminator = self.update_discriminator, False
        try:
            yield
        finally:
            self.update_discriminator = previous

    # ------------------------------------------------------------------ logging and state
    def _add_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value
        self._metric_count += 1

    def metrics(self) -> dict[str, float]:
        out = {k: v / max(self._metric_count, 1) for k, v in self._metric_sums.items()}
        self._metric_sums, self._metric_count = {}, 0
        return out

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume exactly: the discriminator (weights, Adam, generator)."""
        if self.discriminator is not None:
            return {"discriminator": self.discriminator.state_dict()}
        return {"discriminator": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        disc = state.get("discriminator")
        if disc is None:
            return
        if self.discriminator is not None:
            self.discriminator.load_state_dict(disc)
        else:
            self._pending_state = copy.deepcopy(disc)  # applied when the discriminator is built

    def describe_failure(self) -> str:
        return f"the SARM '{self.source}' gave no finite reward (check the model and its dtype)"
