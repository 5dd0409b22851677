"""SteeringVectorRL: train one steering vector (and its scale) with on-policy REINFORCE.

A frozen chat model gets ``alpha * v`` added at one decoder layer; only ``v`` and ``alpha`` train.
Each update (see :mod:`modules.on_policy`): sample replies with the vector on, score them with a
judge (``loglik`` or ``contrast`` reward), turn rewards into advantages, and minimise

    loss = -mean_i( A_i * sum_t log p(y_it) )  +  kl_coef * mean_i( sum_t KL_t(p_steered || p_ref) )

where ``p_ref`` is the same model with the steering switched off (no second copy of the model).

Design choices:

1. The judge scores the *policy's* response, teacher-forced: the reward measures the reply the
   policy wrote.
2. Two rewards: ``loglik`` (a persona's log-likelihood of the reply) and ``contrast`` (persona minus
   counter-persona log-likelihood), the embedded default's: with a small judge ``loglik`` rewards
   fluency.
3. The KL term (``kl_estimator``, :mod:`modules.rl.kl`) defaults to the exact KL over the
   vocabulary at every response position (differentiable, chunked); the sampled log-ratio is
   offered only in forms whose gradient is right (``k3`` as a loss, or folded into the reward).
   Both the KL and the log-prob are summed over response tokens and averaged over samples (a
   sequence-level KL).
4. Log-probs in the loss use the sampling temperature, so they are those of the sampling policy.
5. ``v`` and ``alpha`` are fp32 master copies; the frozen model stays in bf16 on GPU and
   ``alpha * v`` is cast to its dtype when added.
6. ``v`` starts at zero (so the first rollouts are the base model's) unless ``init_std > 0``.
7. Samples whose judge call failed are masked out of the update and counted (``judge/failed``),
   never given a reward of 0.
8. Rewards are z-scored over the whole rollout batch (all micro-batches, all ranks), not per
   micro-batch, and the loss is the mean over every valid sample of the batch.
9. Held-out reports also score replies with an evaluation judge the training never saw
   (``eval_persona``/``eval_counter_persona``, other wording by default, and optionally
   ``eval_judge``, another model or endpoint); a warning says when its personas are the training ones.
10. The training judge reads two wordings of each stance by default (``judge_persona`` and
    ``counter_persona`` are lists; the reward is the mean of the pairs' contrasts): on the embedded
    default a vector trained on one wording moved the evaluation judge by +0.025 ± 0.010, one
    trained on two by +0.044 ± 0.009 (64 held-out prompts, same comparison; docs/evaluation.md).
11. ``v`` (and ``alpha``) can start from a saved vector file (``init_from``, e.g. a contrastive
    activation addition vector, CAA arXiv 2312.06681, from ``python cli.py caa``); ``using_vector``
    makes the policy any other vector for a while (the arms of ``python cli.py evaluate``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

from modules.errors import UserError
from modules.evaluation import EVAL_HONEST_PERSONA, EVAL_SYCOPHANT_PERSONA, evaluation_reward
from modules.judges.base import Judge
from modules.judges.rewards import (CANDID_PERSONA, FLATTERING_PERSONA, HONEST_PERSONA, SYCOPHANT_PERSONA,
                                    PersonaReward, RewardMode)
from modules.models.layer_input import recording_layer_input, starting_at_layer
from modules.models.loading import load_causal_lm
from modules.models.steering_io import read_steering_vector, save_steering_vector
from modules.models.steering import HookPoint, SteerPositions, Steering, SteeringVector
from modules.on_policy import Experience, OnPolicyModule, PromptBatch
from modules.rl.advantages import advantage_fn, masked_mean
from modules.rl.kl import KLEstimator, kl_term, sampled_log_ratio
from modules.rl.losses import per_sequence_sum, reinforce_loss, scatter_to_rows
from modules.rollout import Rollout, response_hidden_states, rollout
from modules.sharding import whole


class SteeringVectorRL(OnPolicyModule):
    """Train a steering vector ``v`` and scale ``alpha`` at one layer of a frozen chat model.

    Args:
        model: Policy model: Hub id, local folder, .gguf file, or ``embedded:smollm2``.
        dtype: Dtype of the frozen model: ``auto`` (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32.
        hook_layer: Decoder layer (0-based) whose norm output is steered.
        hook_point: ``post_attn_norm`` (output of the post-attention RMSNorm), ``pre_attn_norm`` or
            ``layer_output`` (the residual stream after the layer; exports to a llama.cpp control vector).
        steer_positions: ``all`` tokens, ``response`` positions only, or ``last_k`` prompt positions
            plus the response.
        steer_last_k: How many final prompt positions ``last_k`` steers.
        init_std: Std of the random initial ``v`` (0 starts from the zero vector).
        alpha_init: Initial ``alpha``.
        train_alpha: Whether ``alpha`` trains (else it stays at ``alpha_init``).
        judge: The judge backend (``LocalJudge`` or ``OpenAICompatibleJudge``).
        reward_mode: ``loglik`` (persona log-likelihood) or ``contrast`` (persona minus counter-persona).
        judge_persona: System prompt of the persona whose likelihood is rewarded, or a list of wordings
            of it (the reward is the mean over them; see ``PersonaReward``). Default: two wordings.
        counter_persona: System prompt subtracted in ``contrast`` mode (a list: one per persona).
        reward_length_normalize: Per-token mean of the judge's log-probs instead of their sum.
        use_reward_normalization: z-score rewards over the rollout batch (else raw rewards).
        kl_coef: Weight of the KL(p_steered || p_ref) term.
        kl_estimator: ``exact`` (full vocabulary, default), ``k3`` (as a loss), or ``reward``
            (sampled log-ratio folded into the reward).
        logit_chunk_tokens: Response tokens projected to the vocabulary at a time (bounds memory).
        eval_judge: The evaluation judge's backend for held-out reports (None: the training judge's).
        eval_persona: The evaluation judge's persona (default: the training persona's stance in other words).
        eval_counter_persona: The evaluation judge's counter-persona (``contrast`` mode).
        init_from: A steering vector file (e.g. ``python cli.py caa``) whose ``v`` and ``alpha`` start
            training; it must have been made at this hook_layer and hook_point (None: ``init_std``).
        init_scale: Multiplies the loaded ``alpha`` (``init_from`` only).
        share_lower_layers: The loss pass starts at ``hook_layer`` from the hidden states that the
            reference pass saw entering it (the layers below the vector are the same with it on or
            off; :mod:`modules.models.layer_input`): the same result for ``hook_layer / layers`` less
            of the loss pass's forward, for keeping those states ([rows, prompt + reply, d]) until
            the update. False runs the whole model again.
    """

    arm_names = ("vector off", "vector on")
    curve_metrics = ("reward/mean", "reward/ema", "kl/token", "response/length", "steer/delta_norm", "judge/failed")

    def __init__(
        self,
        model: str = "embedded:smollm2",
        dtype: str = "auto",
        hook_layer: int = 15,
        hook_point: HookPoint = "post_attn_norm",
        steer_positions: SteerPositions = "all",
        steer_last_k: int = 1,
        init_std: float = 0.0,
        alpha_init: float = 1.0,
        train_alpha: bool = True,
        judge: Judge | None = None,
        reward_mode: RewardMode = "contrast",
        judge_persona: str | list[str] = [SYCOPHANT_PERSONA, FLATTERING_PERSONA],  # noqa: B006 - never mutated
        counter_persona: str | list[str] = [HONEST_PERSONA, CANDID_PERSONA],  # noqa: B006
        reward_length_normalize: bool = True,
        use_reward_normalization: bool = True,
        kl_coef: float = 0.2,
        kl_estimator: KLEstimator = "exact",
        logit_chunk_tokens: int = 1024,
        eval_judge: Judge | None = None,
        eval_persona: str = EVAL_SYCOPHANT_PERSONA,
        eval_counter_persona: str = EVAL_HONEST_PERSONA,
        init_from: str | None = None,
        init_scale: float = 1.0,
        share_lower_layers: bool = True,
        **loop_options,
    ) -> None:
        super().__init__(**loop_options)
        self.save_hyperparameters(ignore=["judge", "eval_judge"])
        self.kl = kl_term(kl_estimator)
        if kl_coef < 0:
            raise UserError(f"kl_coef must be >= 0, got {kl_coef} (a negative weight trains toward a larger KL)")
        if logit_chunk_tokens < 1:
            raise UserError(f"logit_chunk_tokens must be at least 1, got {logit_chunk_tokens}")
        if init_std < 0:
            raise UserError(f"init_std must be >= 0, got {init_std}")
        if steer_last_k < 1:
            raise UserError(f"steer_last_k must be at least 1, got {steer_last_k}")
        self.model_name = model
        self.policy, self.tokenizer = self.load_policy(model, dtype)
        self.tokenizer.padding_side = "left"
        hidden = self.policy.config.hidden_size
        self.steering_vector = SteeringVector(hidden, init_std, alpha_init, train_alpha)
        if init_from:
            self._init_from(init_from, hook_layer, hook_point, init_scale)
        self.steering = Steering(self.policy, self.steering_vector, hook_layer, hook_point, steer_positions, steer_last_k)
        self.reward = PersonaReward(judge, reward_mode, judge_persona, counter_persona, reward_length_normalize)
        self.reward.attach(self.policy, self.tokenizer, self.interventions_off)
        self.eval_reward = evaluation_reward(self.reward, eval_judge, eval_persona, eval_counter_persona,
                                             reward_length_normalize)
        self.eval_reward.attach(self.policy, self.tokenizer, self.interventions_off)
        self.advantages = advantage_fn(use_reward_normalization)
        self.kl_coef, self.logit_chunk_tokens = kl_coef, logit_chunk_tokens
        self.share_lower_layers = share_lower_layers

    def load_policy(self, model: str, dtype: str):
        """The frozen policy and its tokenizer (a subclass may build them another way, e.g. benchmarks)."""
        return load_causal_lm(model, dtype)

    # -- the on-policy loop's parts ------------------------------------------------------------
    def _init_from(self, path: str, hook_layer: int, hook_point: str, scale: float) -> None:
        payload = read_steering_vector(path)
        meta = payload["metadata"]
        if payload["v"].numel() != self.steering_vector.v.numel():
            raise UserError(f"init_from '{path}' has {payload['v'].numel()} dims; the model's hidden size is "
                            f"{self.steering_vector.v.numel()}")
        if (meta.get("hook_layer"), meta.get("hook_point")) != (hook_layer, hook_point):
            raise UserError(f"init_from '{path}' was made at layer {meta.get('hook_layer')} "
                            f"({meta.get('hook_point')}), but this run steers layer {hook_layer} ({hook_point})")
        self.steering_vector.load_(payload["v"], payload["alpha"] * scale)

    def setup(self, stage: str) -> None:
        self.reward.to(self.device)
        self.eval_reward.to(self.device)

    def reference(self):
        """The reference policy: the same model with the steering switched off."""
        return self.steering.disabled()

    def interventions_off(self):
        """The bare base model: whatever steering is in place now (see ``using_vector``) switched off."""
        return self.steering.disabled()

    @contextmanager
    def using_vector(self, v: torch.Tensor, alpha: float | torch.Tensor = 1.0, layer: int | None = None,
                     hook_point: str | None = None, positions: str | None = None,
                     last_k: int | None = None) -> Iterator[None]:
        """The policy steered by ``alpha * v`` (at this run's site and positions unless given)
        instead of its own vector, until the context ends; ``reference()`` inside is still the
        unsteered model. A held-out comparison's arms are made of this."""
        own = self.steering
        vector = SteeringVector(v.numel()).load_(v.detach().float().cpu(), torch.as_tensor(alpha, dtype=torch.float32))
        vector.requires_grad_(False).to(self.device)
        arm = Steering(self.policy, vector, own.layer if layer is None else layer, hook_point or own.hook_point,
                       positions or own.positions, own.last_k if last_k is None else last_k)
        previous, own.enabled = own.enabled, False
        self.steering = arm
        try:
            yield
        finally:
            self.steering = own
            own.enabled = previous
            arm.remove()

    def rollout_micro_batch(self, prompts: PromptBatch, seed: int) -> Rollout:
        prompts = prompts.to(self.device)
        return rollout(self.policy, self.tokenizer, prompts.prompts, prompts.input_ids, prompts.attention_mask,
                       self.sampling, seed, self.steering.prompt_length(prompts.input_ids.shape[1]))

    def score(self, experience: Experience) -> None:
        """Reference log-probs; the reference's hidden states when the KL term compares logits
        (``exact``); the sampled log-ratio per reply when the KL is in the reward (``reward``)."""
        batch = experience.rollout
        share = self.share_lower_layers and self.steering.layer > 0  # nothing below layer 0 to skip
        record = recording_layer_input(self.policy, self.steering.layer) if share else nullcontext([])
        with self.reference(), record as entering:
            ref_hidden = response_hidden_states(self.policy, batch)
        layer_input = entering[0] if share else None
        if share:
            experience.scores["layer_input"] = layer_input  # per position: [B, P + R, d]
        mask = batch.response_mask.bool()
        ref = self.token_stats(ref_hidden[mask], None, batch)
        experience.scores["ref_logp"] = scatter_to_rows(ref.logp, mask)
        if self.kl.compares_logits:
            experience.scores["ref_hidden"] = ref_hidden
        if self.kl.in_reward:
            logp = self.token_stats(self.policy_hidden(batch, layer_input)[mask], None, batch).logp
            experience.scores["log_ratio"] = per_sequence_sum(sampled_log_ratio(logp, ref.logp), mask)

    def compute_advantages(self, batch: Experience) -> None:
        values, valid = batch.rewards.values.to(self.device), batch.valid.to(self.device)
        if self.kl.in_reward:
            values = values - self.kl_coef * batch.scores["log_ratio"]
        batch.advantages = self.advantages(values, valid, self.reduce_sum)

    def update(self, batch: Experience) -> dict[str, float]:
        """One optimizer step over all micro-batches (REINFORCE is on-policy: one step per rollout)."""
        return self.optimizer_step_on(self.chunks(batch, torch.arange(len(batch.rollout.prompts))),
                                      self.micro_batch_loss)

    def micro_batch_loss(self, experience: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, valid = experience.rollout, experience.valid.to(self.device)
        mask = batch.response_mask.bool()
        with self.loss_pass():
            hidden = self.policy_hidden(batch, experience.scores.get("layer_input"))[mask]
        ref_hidden = experience.scores["ref_hidden"][mask] if self.kl.compares_logits else None
        stats = self.token_stats(hidden, ref_hidden, batch, self.kl.full_kl)
        logp, ref_logp = stats.logp, experience.scores["ref_logp"][mask]
        log_ratio = masked_mean(per_sequence_sum(sampled_log_ratio(logp.detach(), ref_logp), mask), valid)
        kl_loss = masked_mean(per_sequence_sum(self.kl.token_loss(logp, ref_logp, stats.kl), mask), valid)
        pg_loss = reinforce_loss(per_sequence_sum(logp, mask), experience.advantages, valid)
        loss = pg_loss + self.kl_coef * kl_loss
        # the exact KL when the logits were compared, else the sampled log-ratio's estimate of it
        seq_kl = kl_loss.detach() if self.kl.compares_logits else log_ratio
        tokens_per_seq = mask.sum(-1).float().mean().clamp(min=1)
        metrics = {
            "loss/policy": pg_loss.detach(),
            "loss/kl": kl_loss.detach(),
            "kl/seq": seq_kl,
            "kl/token": seq_kl / tokens_per_seq,
            "kl/sampled_log_ratio": log_ratio,
        }
        return loss, metrics

    # -- helpers -------------------------------------------------------------------------------
    def policy_hidden(self, batch: Rollout, layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """[B, R, d] final hidden states with the steering on (off under ``reference()``); with
        ``layer_input`` (what entered the steered layer in the reference pass over ``batch``) the
        forward starts at the steered layer."""
        self.steering.record_site_norm = self.steering.site_norm is None  # once per update: a device sync
        start = (starting_at_layer(self.policy, self.steering.layer, layer_input) if layer_input is not None
                 else nullcontext())
        try:
            with self.steering.prompt_length(batch.prompt_ids.shape[1]), start:
                return response_hidden_states(self.policy, batch)
        finally:
            self.steering.record_site_norm = False

    def extra_metrics(self) -> dict[str, float]:
        alpha, v = (whole(t).detach() for t in (self.steering_vector.alpha, self.steering_vector.v))
        delta_norm = float((alpha * v).norm())
        metrics = {"steer/alpha": float(alpha), "steer/v_norm": float(v.norm()), "steer/delta_norm": delta_norm}
        if self.steering.site_norm:
            metrics["steer/site_norm"] = self.steering.site_norm
            metrics["steer/relative_norm"] = delta_norm / self.steering.site_norm
        self.steering.site_norm = None  # measured again in the next update's first policy pass
        return metrics

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint whose alpha is 0-d: its Adam moments take alpha's (1,) shape (no other parameter is 0-d)
        for group in checkpoint.get("optimizer_states", []):
            for state in group.get("state", {}).values():
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if isinstance(state.get(key), torch.Tensor) and state[key].dim() == 0:
                        state[key] = state[key].reshape(1)
        super().on_load_checkpoint(checkpoint)

    def export_portable(self, path) -> None:
        """Write ``{v, alpha}`` + metadata (see :mod:`modules.models.steering_io`)."""
        hp = {k: v for k, v in self.hparams.items() if isinstance(v, (int, float, str, bool, type(None)))}
        metadata = {"base_model": self.model_name, "hook_layer": self.steering.layer,
                    "hook_point": self.steering.hook_point, "steer_positions": self.steering.positions,
                    "steer_last_k": self.hparams.get("steer_last_k", 1), "step": self.rollout_batches_done,
                    "config": hp}
        save_steering_vector(path, self.steering_vector, metadata)

    def export_artifacts(self, run_dir: Path, update: int, final: bool) -> None:
        self.export_portable(run_dir / "vectors" / f"update{update:06d}.pt")
        if final:
            self.export_portable(run_dir / "steering_vector.pt")

