"""What every method's LightningModule is beside the on-policy cycle: a causal-LM ``policy`` some of
whose parameters train, with a ``reward``.

:class:`PolicyModule` holds what the cycle (:class:`modules.on_policy.OnPolicyModule`, its subclass)
does not: reading the policy (final hidden states, per-token log-probs and KL), the hooks of
held-out reports and exports (each with a default), sharding under FSDP2 and the fit's set-up, and
the optimizer with its learning-rate schedule.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from modules.errors import UserError
from modules.experience import LRSchedule, lr_factor
from modules.judges.base import share_endpoints_among
from modules.rewards import RewardFunction
from modules.rl.kl import exact_kl
from modules.rl.losses import TokenStats, response_token_stats
from modules.rollout import Rollout, SamplingConfig, response_hidden_states
from modules.sharding import gathered, shard_for_fsdp2, whole
from modules.strategies import check_strategy


class PolicyModule(L.LightningModule):
    """A LightningModule around a causal-LM policy; its subclass sets the attributes below."""

    # -- what a method provides ----------------------------------------------------------------
    reward: RewardFunction
    """The method's reward (a judge, a reward model, a sum of them)."""
    policy: torch.nn.Module
    """The causal LM that samples (with the method's intervention or adapter inside)."""
    tokenizer: object
    reference: Callable[[], AbstractContextManager]
    """The reference policy (see :meth:`modules.on_policy.OnPolicyModule.reference`)."""
    logit_chunk_tokens: int = 1024
    arm_names: tuple[str, str] = ("reference", "trained")
    """Names of the reference and trained policy in held-out reports."""
    progress_bar_kl: str = "kl/token"
    """The logged metric the progress bar shows as ``kl`` (each method names its own KL estimate)."""

    # -- options the loop sets (see OnPolicyModule's arguments) --------------------------------
    sampling: SamplingConfig
    gradient_checkpointing: bool
    lr: float
    weight_decay: float
    lr_schedule: LRSchedule
    warmup_updates: int
    total_updates: int

    # -- reading the policy --------------------------------------------------------------------
    def policy_hidden(self, batch: Rollout) -> torch.Tensor:
        """[B, R, d] final hidden states predicting the response tokens, interventions on (gradient
        as the caller's context); under ``reference()`` the reference policy's."""
        return response_hidden_states(self.policy, batch)

    def token_stats(self, hidden: torch.Tensor, ref_hidden: torch.Tensor | None, batch: Rollout,
                    full_kl=None, entropy: bool = False) -> TokenStats:
        """Log-probs (and a full-vocabulary KL when ``ref_hidden`` and ``full_kl`` are given) of a
        rollout's response tokens from [N, d] hidden states gathered under the response mask."""
        targets = batch.response_ids[batch.response_mask.bool()]
        weight = whole(self.policy.get_output_embeddings().weight)  # a frozen copy under ZeRO-3
        return response_token_stats(hidden, ref_hidden, targets, weight, self.sampling.temperature,
                                    full_kl if ref_hidden is not None else None, self.logit_chunk_tokens, entropy)

    @torch.no_grad()
    def heldout_kl(self, batch: Rollout, reference_batch: Rollout | None = None) -> torch.Tensor:
        """[N] exact KL(policy || reference) at each response token (held-out reports).
        ``reference_batch``: the same responses after the prompt the reference reads instead (an
        instructed arm's KL is taken from the model reading the plain prompt)."""
        mask = batch.response_mask.bool()
        with self.reference():
            ref_hidden = self.policy_hidden(reference_batch if reference_batch is not None else batch)[mask]
        return self.token_stats(self.policy_hidden(batch)[mask], ref_hidden, batch, exact_kl).kl

    # -- held-out reports, exports, preflight (defaults a method may override) ----------------
    def interventions_off(self) -> AbstractContextManager:
        """The bare base model (what a local judge sharing the weights sees)."""
        return self.reference()

    def preflight(self, datamodule=None) -> None:
        """Check, before anything is written, that external parts answer and data fits; raise UserError."""
        for split in ("train", "heldout"):
            records = getattr(datamodule, f"{split}_records", None) if datamodule is not None else None
            if records:
                self.reward.check_data(records, f"{split} data")
        self.reward.preflight()

    def heldout_summary(self, values: dict[str, list[float]]) -> dict[str, float]:
        """One held-out arm's own figures from its per-sample reward parts and scalar features
        (default: the mean of each, e.g. a persona's score or a feature's activation)."""
        return {name: sum(v) / len(v) for name, v in sorted(values.items()) if v}

    def heldout_tables(self, values: dict[str, list[float]]) -> str:
        """Tables printed under a held-out report (none by default)."""
        return ""

    def export_artifacts(self, run_dir: Path, update: int, final: bool) -> None:
        """Portable files beside a checkpoint (a steering vector, a PEFT adapter)."""

    # -- sharding and the fit's set-up ---------------------------------------------------------
    def configure_model(self) -> None:
        """Under ``--trainer.strategy fsdp``: shard the policy's layers and the trainable modules
        (:func:`modules.sharding.shard_for_fsdp2`); nothing under other strategies."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            shard_for_fsdp2(self, self.policy, mesh["data_parallel"])

    def whole_weights(self) -> AbstractContextManager:
        """Sharded weights gathered whole for the context (generation, judging, exports); a no-op
        unless the strategy shards them. Every rank must enter it together."""
        return gathered(self)

    def on_fit_start(self) -> None:
        check_strategy(self.trainer.strategy, self)
        share_endpoints_among(self.trainer.world_size)  # a remote judge's max_concurrency is for all ranks
        self.policy.eval()  # no dropout while sampling and scoring; see OnPolicyModule.loss_pass
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def teardown(self, stage: str) -> None:
        share_endpoints_among(1)  # judges used after training (evaluate, generate) are this process's alone

    # -- the optimizer -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        """AdamW over the fp32 trainable parameters, with the learning-rate schedule stepped once per update."""
        params = self.trainable_parameters()
        if any(p.dtype != torch.float32 for p in params):
            raise UserError("trainable parameters must be fp32 master copies")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_updates == 0:
            return optimizer
        total, warmup, schedule = self.total_updates, self.warmup_updates, self.lr_schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, total, warmup, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
