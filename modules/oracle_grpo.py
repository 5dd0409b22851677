"""OracleGRPO: GRPO / Dr. GRPO for a LoRA "activation oracle" that answers with a calibrated confidence.

Papers: Activation Oracles (arXiv 2512.15674), GRPO (arXiv 2402.03300), Dr. GRPO (arXiv
2503.20783), DAPO's clip-higher and token-level loss (arXiv 2503.14476).

One model with a LoRA adapter plays two roles: with every adapter off it is the *subject*, whose
residual stream is read on a context; with the oracle adapter on it is the *oracle*, which gets the
subject's activations injected at the ` ?` placeholders of its prompt (layer 1, norm-matched) and
answers ``[epistemic status: X] Answer``. Each update (see :mod:`modules.on_policy`):

    collect      per micro-batch: extract the rows' activations (subject), build the oracle prompts,
                 sample ``samples_per_prompt`` (G >= 2) replies per row with the injection on the prompt
                 pass; reward = informativeness - lambda * (X/10 - informativeness)^2
                 (:class:`modules.oracle.reward.OracleReward`; unparseable replies get a penalty)
    score        reference log-probs (the starting adapter, a frozen second copy, injection on) when
                 ``beta > 0``; old log-probs when ``num_iterations > 1``
    advantages   group-relative: r - mean(group), divided by the group std (``scale_rewards: group``)
                 or not (Dr. GRPO's ``none``)
    update       ``num_iterations`` passes x ``num_minibatches`` optimizer steps on the clipped
                 objective (eps_low / eps_high) + beta * k3, aggregated by ``loss_type``

with the math in :mod:`modules.rl.grpo` (TRL's GRPO definitions where they overlap).

Design choices, and where this departs from TRL:

1. The KL reference is the oracle as training started (the starting adapter loaded a second time,
   frozen, on the same base, with the same injections); adapter-off is the subject, never the
   reference.
2. The default loss is Dr. GRPO's (``loss_type: dr_grpo``, ``scale_rewards: none``); TRL's
   defaults differ. Invalid samples (judge failures) carry no weight in any
   normaliser, where TRL counts their rows and tokens; with several ranks the normalisers count
   every rank's replies or tokens (see :mod:`modules.rl.grpo`, departures 1 and 2).
3. Each row reads one extraction layer chosen by a seeded hash of the row (the same in every
   rollout of a run).
4. The format system prompt comes from the adapter's ``ao_config.json`` (written by our SFT stage)
   unless the config sets one.
5. A reliability table and diagram of the training rollouts since the previous checkpoint are
   written at every checkpoint (``reliability/update{N}.png`` / ``.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from modules.errors import UserError
from modules.files import write_json_atomically
from modules.models.adapters import LoRAPolicy
from modules.oracle.batch import build_oracle_batch, injection_from_records
from modules.oracle.calibration import (brier_score, calibration_summary, format_reliability_table,
                                        reliability_diagram, reliability_table, table_as_dicts)
from modules.oracle.format import encode_oracle_prompt
from modules.oracle.generation import oracle_rollout
from modules.oracle.injection import ActivationInjection
from modules.oracle.reward import OracleReward
from modules.oracle.scheme import DEFAULT_LAYER_PERCENTS, adapter_scheme, layers_for_percents
from modules.oracle.sft import resolve_oracle_adapter
from modules.lora_method import LoRAMethod
from modules.on_policy import Experience, PromptBatch
from modules.rewards import RewardFunction
from modules.rl import grpo
from modules.rl.losses import scatter_to_rows
from modules.rollout import Rollout, response_hidden_states


def runs_of_same_row(records: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """Consecutive repeats of one data row (a GRPO group) -> (distinct rows, index of each row's distinct row)."""
    distinct: list[dict] = []
    index: list[int] = []
    for record in records:
        if not distinct or record is not distinct[-1]:
            distinct.append(record)
        index.append(len(distinct) - 1)
    return distinct, index


class OracleGRPO(LoRAMethod):
    """GRPO / Dr. GRPO on an activation-oracle LoRA adapter.

    Args:
        model: Base model (subject and oracle): Hub id, folder, .gguf file, or ``embedded:smollm2``.
        dtype: Dtype of the frozen base: ``auto`` (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32.
        load_in_4bit: Load the base in 4-bit NF4 (bitsandbytes, CUDA only).
        adapter_path: The oracle adapter to start from (a PEFT folder or Hub id; ``embedded:oracle-smollm2``
            builds the SFT'd one for SmolLM2 on first use). Its ``ao_config.json``, when present, must
            describe our injection scheme.
        layer_percents: Depths (percent of the layers) rows read from, unless a row names its own.
        num_positions: Positions read per row, unless the row names them (1-20).
        format_system_prompt: The oracle's system prompt; None takes the adapter's (ao_config.json),
            an empty string uses none (the original oracles were trained without one).
        reward: The reward (default: :class:`~modules.oracle.reward.OracleReward` with the
            deterministic token-F1 informativeness judge).
        loss_type: ``dr_grpo`` (default), ``grpo``, ``bnpo`` or ``dapo`` (TRL's definitions).
        scale_rewards: ``none`` (Dr. GRPO, default), ``group`` or ``batch`` std scaling of advantages.
        epsilon: Lower clip of the ratio (and upper, unless ``epsilon_high`` is set).
        epsilon_high: Upper clip of the ratio (DAPO's clip-higher); None uses ``epsilon``.
        beta: Weight of the per-token k3 KL to the starting adapter (0 skips the reference pass).
        num_iterations: Passes over each rollout batch (TRL's mu).
        num_minibatches: Optimizer steps per pass.
        logit_chunk_tokens: Response tokens projected to the vocabulary at a time (bounds memory).
    """

    arm_names = ("start adapter", "trained adapter")
    curve_metrics = ("reward/mean", "reward/informativeness", "reward/confidence", "reward/calibration_error",
                     "reward/parse_failure", "response/length", "judge/failed")
    progress_bar_kl = "kl/k3_token"

    def __init__(
        self,
        model: str = "embedded:smollm2",
        dtype: str = "auto",
        load_in_4bit: bool = False,
        adapter_path: str = "embedded:oracle-smollm2",
        layer_percents: list[float] = list(DEFAULT_LAYER_PERCENTS),
        num_positions: int = 8,
        format_system_prompt: str | None = None,
        reward: RewardFunction | None = None,
        loss_type: grpo.LossType = "dr_grpo",
        scale_rewards: grpo.ScaleRewards = "none",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        num_minibatches: int = 1,
        logit_chunk_tokens: int = 1024,
        **loop_options,
    ) -> None:
        loop_options.setdefault("samples_per_prompt", 8)
        loop_options.setdefault("lr", 1e-5)
        super().__init__(**loop_options)
        self.save_hyperparameters(ignore=["reward"])
        grpo.check_group_size(self.samples_per_prompt)
        self.aggregate = grpo.loss_aggregation(loss_type)
        if scale_rewards not in grpo.REWARD_SCALES:
            raise UserError(f"unknown scale_rewards '{scale_rewards}': use one of {', '.join(grpo.REWARD_SCALES)}")
        for name, value in (("num_iterations", num_iterations), ("logit_chunk_tokens", logit_chunk_tokens)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        self.check_minibatches(num_minibatches)
        if not epsilon > 0 or (epsilon_high is not None and not epsilon_high > 0) or beta < 0:
            raise UserError(f"epsilon and epsilon_high must be > 0 and beta >= 0, got {epsilon}, {epsilon_high}, {beta}")
        if not 1 <= num_positions <= 20:
            raise UserError(f"num_positions must be between 1 and 20, got {num_positions}")
        base, self.tokenizer = self.load_base(model, dtype, load_in_4bit)
        self.tokenizer.padding_side = "left"
        self.layer_percents, self.num_positions = list(layer_percents), num_positions
        layers = sorted(set(layers_for_percents(base, self.layer_percents).values()))  # refuses impossible depths
        source = resolve_oracle_adapter(adapter_path)
        scheme = adapter_scheme(source, layers)  # refuses another injection scheme
        self.system_prompt = scheme.format_system_prompt if format_system_prompt is None else (format_system_prompt or None)
        encode_oracle_prompt(self.tokenizer, "?", layers[0], 1, self.system_prompt)  # refuses a multi-token " ?"
        self.lora = LoRAPolicy(base, source, keep_reference=True)
        self.policy = self.lora.model
        self.injection = ActivationInjection(self.policy)
        self.reward = reward if reward is not None else OracleReward()
        self.reward.attach(self.policy, self.tokenizer, self.lora.base)
        self.scale_rewards, self.epsilon = scale_rewards, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.beta, self.num_iterations, self.num_minibatches = beta, num_iterations, num_minibatches
        self.logit_chunk_tokens = logit_chunk_tokens
        self._calibration: list[torch.Tensor] = []  # [n, 3] (parsed, confidence, informativeness) since a checkpoint
        self._group_metrics: dict[str, float] = {}

    # -- the on-policy loop's parts ------------------------------------------------------------
    def preflight(self, datamodule=None) -> None:
        for split in ("train", "heldout"):
            for number, row in enumerate(getattr(datamodule, f"{split}_records", None) or [], 1):
                if not isinstance(row.get("context"), str) or not row["context"].strip():
                    raise UserError(f"{split} data row {number}: an oracle row needs a non-empty 'context' "
                                    "(the text the subject reads)")
        super().preflight(datamodule)

    def rollout_micro_batch(self, prompts: PromptBatch, seed: int) -> Rollout:
        distinct, index = runs_of_same_row(prompts.records)  # extract once per group, not G times
        self.policy.eval()
        batch = build_oracle_batch(self.policy, self.tokenizer, distinct, self.layer_percents, self.num_positions,
                                   self.system_prompt, seed=self.seed, subject=self.lora.base).select(index)
        rollout = oracle_rollout(self.policy, self.tokenizer, batch, self.injection, self.sampling, seed)
        rollout.records = batch.tagged_records()  # the injection travels with the rows
        return rollout

    def policy_hidden(self, batch: Rollout) -> torch.Tensor:
        """[B, R, d] final hidden states with the activations injected into the prompt pass."""
        vectors, positions = injection_from_records(batch.records, batch.prompt_ids.shape[1], self.device)
        with self.injection.inject(vectors.to(self.policy.dtype), positions):
            return response_hidden_states(self.policy, batch)

    def _token_logp(self, batch: Rollout) -> torch.Tensor:
        mask = batch.response_mask.bool()
        return scatter_to_rows(self.token_stats(self.policy_hidden(batch)[mask], None, batch).logp, mask)

    def score(self, experience: Experience) -> None:
        batch = experience.rollout
        if self.num_iterations > 1:
            experience.scores["old_logp"] = self._token_logp(batch)
        if self.beta > 0:
            with self.reference():
                experience.scores["ref_logp"] = self._token_logp(batch)

    def compute_advantages(self, batch: Experience) -> None:
        rewards, valid = batch.rewards.values.to(self.device), batch.valid.to(self.device)
        group = batch.group.to(self.device)
        batch.advantages = grpo.group_advantages(rewards, valid, group, self.scale_rewards)
        self._group_metrics = {"grpo/zero_std_groups": grpo.zero_std_fraction(rewards.cpu(), valid.cpu(), group.cpu()),
                               "grpo/advantage_abs": float(batch.advantages.abs()[valid].mean()) if valid.any() else 0.0}
        features = batch.rewards.features
        if {"parsed", "confidence", "informativeness"} <= set(features):
            scored = valid.cpu() & features["parsed"].bool()
            self._calibration.append(torch.stack([scored.float(), features["confidence"], features["informativeness"]], 1))

    def update(self, batch: Experience) -> dict[str, float]:
        """``num_iterations`` passes, each ``num_minibatches`` optimizer steps; a chunk's loss is its
        share of its step's loss, normalised by counts over every rank (``dapo``: by the valid tokens
        of the whole rollout batch, TRL's generation batch; see :class:`modules.rl.grpo.UpdateTotals`)."""
        length = self.sampling.max_new_tokens
        generation = grpo.update_totals([batch.rollout.response_mask], [batch.valid], length, self.reduce_sum)

        def step(iteration: int, chunks: list[Experience]) -> dict[str, float]:
            totals = grpo.update_totals([c.rollout.response_mask for c in chunks], [c.valid for c in chunks],
                                        length, self.reduce_sum, generation.generation_tokens)
            return self.optimizer_step_on(chunks, lambda chunk: self.chunk_loss(chunk, iteration, totals),
                                          losses_are_shares=True)

        try:
            steps = self.minibatch_passes(batch, self.num_iterations, self.num_minibatches, step)
        finally:
            self.injection.vectors = self.injection.positions = None  # the last loss pass's (see chunk_loss)
        metrics = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        metrics.update(self._group_metrics)
        return metrics

    def chunk_loss(self, chunk: Experience, iteration: int, totals: grpo.UpdateTotals
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One chunk's share of the step's loss (see :data:`modules.rl.grpo.LOSS_AGGREGATIONS`)."""
        batch = chunk.rollout
        # the injection is set, not entered as a context: this chunk's backward runs after this returns,
        # and gradient checkpointing recomputes the injected layer there, which must inject the same
        # vectors again (the next chunk's loss pass replaces them; update() clears the last)
        vectors, positions = injection_from_records(batch.records, batch.prompt_ids.shape[1], self.device)
        self.injection.vectors, self.injection.positions = vectors.to(self.policy.dtype), positions.long()
        with self.loss_pass():
            mask = batch.response_mask.bool()
            logp = scatter_to_rows(self.token_stats(response_hidden_states(self.policy, batch)[mask], None,
                                                    batch).logp, mask)
        old = grpo.old_logprobs_for(iteration, chunk.scores.get("old_logp"))
        terms = grpo.grpo_token_loss(logp, old, chunk.scores.get("ref_logp"), chunk.advantages,
                                     batch.response_mask, chunk.valid.to(self.device), self.epsilon,
                                     self.epsilon_high, self.beta)
        loss = self.aggregate(terms.loss, terms.weight, totals)
        tokens = terms.weight.sum().clamp(min=1)
        metrics = {"clipfrac": (terms.clipped * terms.weight).sum() / tokens}
        if terms.kl is not None:
            metrics["kl/k3_token"] = (terms.kl * terms.weight).sum() / tokens
        return loss, metrics

    # -- reports -------------------------------------------------------------------------------
    def heldout_summary(self, features: dict[str, list[float]]) -> dict[str, float]:
        """Calibration of one held-out arm: Brier score and parse-failure rate."""
        parsed = torch.tensor(features.get("parsed", []))
        if not len(parsed):
            return super().heldout_summary(features)
        scored = parsed.bool()
        conf, inform = torch.tensor(features["confidence"]), torch.tensor(features["informativeness"])
        out = {"parse_failure_rate": float(1 - parsed.mean())}
        if scored.any():
            out.update(calibration_summary(conf[scored], inform[scored]))
            out["brier"] = brier_score(conf[scored], inform[scored])
        return out

    def heldout_tables(self, features: dict[str, list[float]]) -> str:
        parsed = torch.tensor(features.get("parsed", [])).bool()
        if not parsed.any():
            return "  (no parsed replies)"
        table = reliability_table(torch.tensor(features["confidence"])[parsed],
                                  torch.tensor(features["informativeness"])[parsed])
        return format_reliability_table(table)

    def export_artifacts(self, run_dir: Path, update: int, final: bool) -> None:
        self.lora.save(run_dir / "adapters" / f"update{update:06d}")
        if final:
            self.lora.save(run_dir / "adapter")
        if self._calibration:
            rows = torch.cat(self._calibration)
            scored = rows[:, 0].bool()
            table = reliability_table(rows[scored, 1], rows[scored, 2])
            folder = run_dir / "reliability"
            write_json_atomically(folder / f"update{update:06d}.json", {
                "update": update, "replies": int(len(rows)), "brier": brier_score(rows[scored, 1], rows[scored, 2]),
                "table": table_as_dicts(table)})
            reliability_diagram(table, folder / f"update{update:06d}.png", title=f"training rollouts up to update {update}")
            self._calibration = []
