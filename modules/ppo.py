"""PPO (arXiv 1707.06347) with GAE (arXiv 1506.02438) on a LoRA policy with a value head.

A frozen base model gets a trainable LoRA adapter (fresh, or started from an adapter folder such as
an SFT adapter) and a scalar value head on its final hidden state. Each update (see
:mod:`modules.on_policy`):

    collect      sample replies with the adapter on (or read given replies: ``rollouts: from_data``);
                 rewards from ``reward`` (a judge, a reward model, a data field)
    score        old log-probs and values (adapter on), reference log-probs (the policy as training
                 started: adapter off, or the frozen copy of the starting adapter)
    advantages   per-token rewards r_t = -kl_coef * (log p - log p_ref) (``kl_estimator: reward``;
                 + the reward at the last token), GAE(gamma, lam) with the old values, advantages
                 whitened over the batch
    update       ppo_epochs x num_minibatches optimizer steps on the clipped surrogate

    loss = pg_clip + value_coef * value_clip - entropy_coef * entropy  (+ kl_coef * KL if a loss term)

with the math in :mod:`modules.rl.ppo` (TRL's definitions where they overlap, apart from the
score's position: departure 8).

Where this departs from TRL's PPOTrainer:

1. The value head sits on the policy's own final hidden state (one model, one forward for
   log-probs and values), not on a separate value model; ``value_detach_trunk`` keeps the value
   loss out of the LoRA weights.
2. An entropy bonus is part of the loss (``entropy_coef``); TRL only logs entropy.
3. Besides TRL's per-token log-ratio in the rewards (``kl_estimator: reward``), the KL can be a
   loss term: the exact KL over the vocabulary (``exact``) or k3 (``k3``), token means.
4. The reference is the policy as training started, never a second copy of the base model: adapter
   off for a fresh adapter, else the starting adapter loaded a second time, frozen, on the same base.
5. Dropout is off when sampling and scoring (old log-probs are those of the sampling policy);
   ``lora_dropout > 0`` applies it in the loss forward only.
6. Samples whose reward failed are masked out of every mean (their tokens get no weight) and
   counted, never scored 0. An epoch whose mean approximate KL to the sampling policy exceeds
   ``target_kl`` ends the update early (as CleanRL's PPO does).
7. ``rollouts: from_data`` trains on given (prompt, response, reward) rows with the same loss;
   such replies are not the policy's own, so the first ratio is 1 only by construction.
8. The score sits on the last token of the response mask, which includes the sampled end-of-turn
   token, and that token is in the policy loss and gets a KL reward. TRL's PPOTrainer differs for
   every reply that ends in EOS: with pad == EOS (SmolLM2) it drops the EOS's log-prob from the
   policy loss, the whitening and the KL rewards (score on the EOS, as ours); with pad != EOS it
   puts the score one position later, on the first pad, and trains that position's value. The
   rewards, advantages and losses of such rows therefore differ; replies cut at ``max_new_tokens``
   are scored alike (exact formulas: :mod:`modules.rl.ppo`, departure 1).
9. Whitening is over the rollout batch of every rank (TRL: each rank's own), and whitened rewards
   use the response mask (TRL: one position more).
10. Log-probs come from fp32 logits and the value head runs in fp32; rewards, advantages and
    returns are fp32 (TRL keeps the model's dtype, bf16 under bf16 training).
11. 0 where TRL gives NaN: the whitening of a single token, and a token mean over a chunk with no
    valid token (TRL's ``masked_mean`` over an empty micro-batch is NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from modules.errors import UserError
from modules.judges.rewards import HONEST_PERSONA, SYCOPHANT_PERSONA, PersonaReward
from modules.models.adapters import LoRAPolicy
from modules.lora_method import LoRAMethod
from modules.on_policy import Experience, PromptBatch
from modules.rewards import RewardFunction
from modules.rl import ppo as ppo_math
from modules.rl.kl import KLEstimator, kl_term
from modules.rl.losses import scatter_to_rows
from modules.rollout import Rollout, rollout, teacher_forced_rollout
from modules.sharding import total_norm

RolloutSource = Literal["sample", "from_data"]


class ValueHead(nn.Module):
    """A scalar value per position from the final hidden state (fp32; starts at 0)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PPO(LoRAMethod):
    """PPO on a LoRA adapter of a frozen chat model, with a value head.

    Args:
        model: Base model: Hub id, local folder, .gguf file, or ``embedded:smollm2``.
        dtype: Dtype of the frozen base: ``auto`` (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32.
        load_in_4bit: Load the base in 4-bit NF4 (bitsandbytes, CUDA only); LoRA and value head stay fp32.
        adapter_path: Start from this PEFT adapter (folder or Hub id, e.g. an SFT adapter); else a fresh adapter.
        lora_r: LoRA rank of a fresh adapter.
        lora_alpha: LoRA scaling numerator of a fresh adapter.
        lora_dropout: LoRA dropout (applied in the loss forward only).
        lora_target_modules: ``all-linear`` or comma-separated module names (e.g. ``q_proj,v_proj``).
        reward: The reward (default: the local judge on the same weights, honest minus sycophantic
            persona, per-token mean: PPO then *reduces* sycophancy).
        rollouts: ``sample`` replies from the policy, or train on the replies of the data rows
            (``from_data``; the rows need ``response_field``).
        response_field: Field of a data row holding its reply (``rollouts: from_data``).
        kl_coef: Weight of the KL to the reference policy.
        kl_estimator: ``reward`` (per-token log-ratio subtracted from the rewards, as TRL),
            ``exact`` (full-vocabulary KL as a loss term) or ``k3`` (as a loss term).
        gamma: Discount of GAE.
        lam: Lambda of GAE.
        whiten_advantages: Whiten advantages over the rollout batch.
        whiten_rewards: Whiten per-token rewards over the rollout batch (keeping their mean).
        clip_range: Clip of the probability ratio.
        clip_range_value: Clip of the value change around the old values.
        value_coef: Weight of the value loss.
        entropy_coef: Weight of the entropy bonus.
        ppo_epochs: Passes over each rollout batch.
        num_minibatches: Optimizer steps per pass (the rollout batch's rows, shuffled, in equal parts).
        target_kl: End an update early when a pass's mean approximate KL to the sampling policy exceeds it.
        value_detach_trunk: The value loss trains the value head only, not the LoRA weights.
        logit_chunk_tokens: Response tokens projected to the vocabulary at a time (bounds memory).
    """

    arm_names = ("adapter off", "adapter on")
    curve_metrics = ("reward/mean", "reward/ema", "kl/sampled_log_ratio_token", "response/length", "loss/value",
                     "explained_variance", "clipfrac", "judge/failed")
    progress_bar_kl = "kl/sampled_log_ratio_token"

    def __init__(
        self,
        model: str = "embedded:smollm2",
        dtype: str = "auto",
        load_in_4bit: bool = False,
        adapter_path: str | None = None,
        lora_r: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str = "all-linear",
        reward: RewardFunction | None = None,
        rollouts: RolloutSource = "sample",
        response_field: str = "response",
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "reward",
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        whiten_rewards: bool = False,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        value_coef: float = 0.5,
        entropy_coef: float = 0.0,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        target_kl: float | None = None,
        value_detach_trunk: bool = False,
        logit_chunk_tokens: int = 1024,
        **loop_options,
    ) -> None:
        loop_options.setdefault("lr", 1e-5)
        super().__init__(**loop_options)
        self.save_hyperparameters(ignore=["reward"])
        self.kl = kl_term(kl_estimator)
        self._check_options(kl_coef, gamma, lam, clip_range, clip_range_value, value_coef, entropy_coef,
                            ppo_epochs, num_minibatches, target_kl, rollouts, logit_chunk_tokens)
        if not lora_alpha > 0:
            raise UserError(f"lora_alpha must be > 0, got {lora_alpha} (the adapter's scale is lora_alpha / lora_r)")
        base, self.tokenizer = self.load_base(model, dtype, load_in_4bit)
        self.tokenizer.padding_side = "left"
        self.lora = LoRAPolicy(base, adapter_path, lora_r, lora_alpha, lora_dropout, lora_target_modules)
        self.policy = self.lora.model
        self.value_head = ValueHead(base.config.hidden_size)
        if reward is None:
            reward = PersonaReward(None, "contrast", HONEST_PERSONA, SYCOPHANT_PERSONA, length_normalize=True)
        self.reward = reward
        self.reward.attach(self.policy, self.tokenizer, self.lora.base)
        self.rollout_source, self.response_field = rollouts, response_field
        self.kl_coef = kl_coef
        self.gamma, self.lam = gamma, lam
        self.whiten_advantages, self.whiten_rewards = whiten_advantages, whiten_rewards
        self.clip_range, self.clip_range_value = clip_range, clip_range_value
        self.value_coef, self.entropy_coef = value_coef, entropy_coef
        self.ppo_epochs, self.num_minibatches, self.target_kl = ppo_epochs, num_minibatches, target_kl
        self.value_detach_trunk, self.dropout_in_loss = value_detach_trunk, lora_dropout > 0
        self.logit_chunk_tokens = logit_chunk_tokens
        self._advantage_metrics: dict[str, float] = {}

    def _check_options(self, kl_coef, gamma, lam, clip_range, clip_range_value, value_coef, entropy_coef,
                       ppo_epochs, num_minibatches, target_kl, rollouts, logit_chunk_tokens) -> None:
        if rollouts not in ("sample", "from_data"):
            raise UserError(f"unknown rollouts '{rollouts}': use sample or from_data")
        for name, value in (("kl_coef", kl_coef), ("value_coef", value_coef), ("entropy_coef", entropy_coef)):
            if value < 0:
                raise UserError(f"{name} must be >= 0, got {value}")
        for name, value in (("gamma", gamma), ("lam", lam)):
            if not 0 <= value <= 1:
                raise UserError(f"{name} must be in [0, 1], got {value}")
        for name, value in (("clip_range", clip_range), ("clip_range_value", clip_range_value)):
            if not value > 0:
                raise UserError(f"{name} must be > 0, got {value}")
        for name, value in (("ppo_epochs", ppo_epochs), ("logit_chunk_tokens", logit_chunk_tokens)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        self.check_minibatches(num_minibatches)
        if target_kl is not None and not target_kl > 0:
            raise UserError(f"target_kl must be > 0 (or null), got {target_kl}")

    # -- the on-policy loop's parts ------------------------------------------------------------
    def preflight(self, datamodule=None) -> None:
        if self.rollout_source == "from_data" and datamodule is not None:
            for number, row in enumerate(getattr(datamodule, "train_records", []), 1):
                if not isinstance(row.get(self.response_field), str):
                    raise UserError(f"train data row {number}: rollouts: from_data needs a text field "
                                    f"'{self.response_field}' in every row (use a .jsonl or .json file)")
        super().preflight(datamodule)

    def rollout_micro_batch(self, prompts: PromptBatch, seed: int) -> Rollout:
        prompts = prompts.to(self.device)
        self.policy.eval()  # no dropout while sampling
        if self.rollout_source == "from_data" and prompts.records and self.response_field in prompts.records[0]:
            replies = [str(r[self.response_field]) for r in prompts.records]
            return teacher_forced_rollout(self.tokenizer, prompts.prompts, prompts.input_ids, prompts.attention_mask,
                                          replies, prompts.records, self.sampling.max_new_tokens)
        return rollout(self.policy, self.tokenizer, prompts.prompts, prompts.input_ids, prompts.attention_mask,
                       self.sampling, seed)

    def score(self, experience: Experience) -> None:
        """Old log-probs and values with the adapter on; reference log-probs (and hidden states for
        the exact KL) with the reference switched on."""
        batch = experience.rollout
        mask = batch.response_mask.bool()
        self.policy.eval()
        hidden = self.policy_hidden(batch)
        experience.scores["old_logp"] = scatter_to_rows(self.token_stats(hidden[mask], None, batch).logp, mask)
        experience.scores["old_values"] = self.value_head(hidden) * mask
        with self.reference():
            ref_hidden = self.policy_hidden(batch)
        experience.scores["ref_logp"] = scatter_to_rows(self.token_stats(ref_hidden[mask], None, batch).logp, mask)
        if self.kl.compares_logits:
            experience.scores["ref_hidden"] = ref_hidden

    def compute_advantages(self, batch: Experience) -> None:
        scores = batch.scores
        mask = batch.rollout.response_mask.float() * batch.valid.to(self.device)[:, None].float()
        log_ratio = (scores["old_logp"] - scores["ref_logp"]) * mask
        kl_penalty = self.kl_coef * log_ratio if self.kl.in_reward else torch.zeros_like(log_ratio)
        values = batch.rewards.values.to(self.device)
        token_rewards = ppo_math.per_token_rewards(torch.where(batch.valid.to(self.device), values, 0.0),
                                                   kl_penalty, mask)
        if self.whiten_rewards:
            token_rewards = ppo_math.masked_whiten(token_rewards, mask, shift_mean=False, reduce=self.reduce_sum)
        advantages, returns = ppo_math.gae(token_rewards, scores["old_values"], mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask, reduce=self.reduce_sum)
        batch.advantages, batch.returns = advantages, returns
        seq_kl = log_ratio.sum(-1)
        valid = batch.valid.to(self.device)
        self._advantage_metrics = {
            "kl/sampled_log_ratio": float(seq_kl[valid].mean()) if valid.any() else float("nan"),
            "kl/sampled_log_ratio_token": float(ppo_math.masked_token_mean(log_ratio, mask)),
            "explained_variance": float(ppo_math.explained_variance(scores["old_values"], returns, mask)),
            "value/mean": float(ppo_math.masked_token_mean(scores["old_values"], mask)),
            "returns/mean": float(ppo_math.masked_token_mean(returns, mask)),
        }

    def update(self, batch: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes, each ``num_minibatches`` optimizer steps over shuffled rows."""
        def too_far(epoch: list[dict[str, float]]) -> bool:
            return self.target_kl is not None and sum(m["kl/approx"] for m in epoch) / len(epoch) > self.target_kl

        steps = self.minibatch_passes(batch, self.ppo_epochs, self.num_minibatches,
                                      lambda epoch, chunks: self.optimizer_step_on(chunks, self.minibatch_loss), too_far)
        metrics = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        metrics.update(self._advantage_metrics)
        metrics["ppo/epochs"] = len(steps) / self.num_minibatches
        metrics["ppo/optimizer_steps"] = float(len(steps))
        return metrics

    def loss_weight(self, chunk: Experience) -> float:
        """Token-level means: a chunk counts by its valid response tokens."""
        return float((chunk.rollout.response_mask.sum(-1) * chunk.valid.to(chunk.rollout.response_mask.device)).sum())

    def minibatch_loss(self, chunk: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, scores = chunk.rollout, chunk.scores
        rmask = batch.response_mask.bool()
        mask = rmask & chunk.valid.to(self.device)[:, None]
        with self.loss_pass():
            hidden = self.policy_hidden(batch)
        ref_hidden = scores["ref_hidden"][rmask] if self.kl.compares_logits else None
        stats = self.token_stats(hidden[rmask], ref_hidden, batch, self.kl.full_kl, entropy=True)
        logp, entropy = scatter_to_rows(stats.logp, rmask), scatter_to_rows(stats.entropy, rmask)
        values = self.value_head(hidden.detach() if self.value_detach_trunk else hidden)
        pg_loss, clipfrac = ppo_math.clipped_policy_loss(logp, scores["old_logp"], chunk.advantages, mask,
                                                         self.clip_range)
        value_loss, value_clipfrac = ppo_math.clipped_value_loss(values, scores["old_values"], chunk.returns, mask,
                                                                 self.clip_range_value)
        mean_entropy = ppo_math.masked_token_mean(entropy, mask)
        loss = pg_loss + self.value_coef * value_loss - self.entropy_coef * mean_entropy
        metrics = {"loss/policy": pg_loss.detach(), "loss/value": value_loss.detach(), "clipfrac": clipfrac,
                   "value/clipfrac": value_clipfrac, "entropy": mean_entropy.detach(),
                   "kl/approx": ppo_math.approx_kl_k3(logp.detach(), scores["old_logp"], mask)}
        if not self.kl.in_reward:  # a loss term
            kl_tokens = self.kl.token_loss(stats.logp, scores["ref_logp"][rmask], stats.kl)
            kl_loss = ppo_math.masked_token_mean(scatter_to_rows(kl_tokens, rmask), mask)
            loss = loss + self.kl_coef * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        return loss, metrics

    @torch.no_grad()
    def extra_metrics(self) -> dict[str, float]:
        adapter = [p for p in self.lora.model.parameters() if p.requires_grad]  # the parameters: sharded ones gather
        return {"lora/weight_norm": float(total_norm(adapter))}

    # -- exports -------------------------------------------------------------------------------
    def export_adapter(self, folder: Path) -> Path:
        """The adapter in PEFT's own format plus ``value_head.pt``, written atomically."""
        return self.lora.save(folder, {"value_head.pt": dict(self.value_head.named_parameters())})

    def export_artifacts(self, run_dir: Path, update: int, final: bool) -> None:
        self.export_adapter(run_dir / "adapters" / f"update{update:06d}")
        if final:
            self.export_adapter(run_dir / "adapter")
