"""What the methods that train a LoRA adapter on a frozen base share (PPO, SARMFeaturePPO, OracleGRPO).

The adapter lives in a :class:`~modules.models.adapters.LoRAPolicy` (``self.lora``): the reference
policy is the adapter switched off, or the starting adapter's frozen copy; the bare base model
(every adapter off) is what a local judge sharing the weights sees, and the oracle's subject.
"""

from __future__ import annotations

from modules.errors import UserError
from modules.models.adapters import LoRAPolicy
from modules.models.loading import load_causal_lm
from modules.on_policy import OnPolicyModule


class LoRAMethod(OnPolicyModule):
    """Base of the LoRA methods; subclasses build ``self.lora`` and ``self.policy = self.lora.model``."""

    lora: LoRAPolicy

    def load_base(self, model: str, dtype: str, load_in_4bit: bool):
        """The frozen base model and its tokenizer (a subclass may build them another way, e.g. benchmarks)."""
        return load_causal_lm(model, dtype, load_in_4bit=load_in_4bit)

    def check_minibatches(self, num_minibatches: int) -> None:
        rows = self.batch_size * self.grad_accum
        if num_minibatches < 1 or rows % num_minibatches:
            raise UserError(f"num_minibatches ({num_minibatches}) must split the rollout batch of {rows} rows "
                            "(batch_size x grad_accum) into equal minibatches")

    def setup(self, stage: str) -> None:
        self.reward.to(self.device)

    def reference(self):
        """The policy as training started: adapter off, or the frozen copy of the starting adapter."""
        return self.lora.reference()

    def interventions_off(self):
        """The bare base model: every adapter off."""
        return self.lora.base()
