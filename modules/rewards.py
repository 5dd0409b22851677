"""What the on-policy loop knows about rewards: a small protocol, no judge or reward model in sight.

A reward function turns one micro-batch's rollout into :class:`Rewards`:

    pending = reward_fn.submit(rollout)     # returns at once (remote judges work in the background)
    rewards = pending.result()              # waits: values [B], valid [B], parts, features

- ``values``: the scalar reward of each sample; meaningless where ``valid`` is False.
- ``valid``: False where the reward could not be computed (a judge that finally failed, an
  unparseable reply); such samples are masked out of every statistic and every gradient and
  counted, never given a reward of 0.
- ``parts``: named per-sample scalars ([B]) that make up the reward (a persona's log-likelihood,
  a penalty term); the loop logs their means over valid samples as ``reward/<name>``.
- ``features``: named per-sample tensors of any shape ([B, ...], e.g. a reward model's SAE latents
  [B, 65536]); not logged by the loop, handed to callbacks through ``module.last_experiences``.

Judges (:mod:`modules.judges.rewards`), reward models and rule-based rewards all implement
:class:`RewardFunction`; :class:`WeightedSum` combines several by configured weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from modules.rollout import Rollout


@dataclass
class Rewards:
    """Rewards of one micro-batch (see the module docstring)."""

    values: torch.Tensor
    """[B] reward per sample (meaningless where ``valid`` is False)."""
    valid: torch.Tensor
    """[B] bool; False where the reward finally failed (masked out of the update, counted)."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named [B] components of the reward, logged as means over valid samples."""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named [B, ...] per-sample tensors for callbacks (not logged by the loop)."""

    @staticmethod
    def concat(parts: Sequence["Rewards"]) -> "Rewards":
        """Rows of several micro-batches, in order (keys that every part has)."""
        def cat(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            keys = [k for k in dicts[0] if all(k in d for d in dicts)]
            return {k: torch.cat([d[k] for d in dicts]) for k in keys}

        return Rewards(torch.cat([p.values for p in parts]), torch.cat([p.valid for p in parts]),
                       cat([p.parts for p in parts]), cat([p.features for p in parts]))

    def select(self, rows: torch.Tensor) -> "Rewards":
        """The given rows (a LongTensor of indices)."""
        rows = rows.to(self.values.device)
        return Rewards(self.values[rows], self.valid[rows], {k: v[rows] for k, v in self.parts.items()},
                       {k: v[rows.to(v.device)] for k, v in self.features.items()})


class PendingRewards:
    """Rewards being computed; :meth:`result` waits for them (once; later calls return the same)."""

    def __init__(self, wait: Callable[[], Rewards]):
        self._wait, self._result = wait, None

    @classmethod
    def ready(cls, rewards: Rewards) -> "PendingRewards":
        return cls(lambda: rewards)

    def result(self) -> Rewards:
        if self._result is None:
            self._result = self._wait()
        return self._result


class RewardFunction(ABC):
    """Base of every reward: judges, reward models, rules, and sums of them.

    Subclasses implement :meth:`submit`; the rest are optional hooks the training module calls.
    """

    name: str = "reward"
    """Short name used in log keys and messages (e.g. the judge's model)."""

    @abstractmethod
    def submit(self, rollout: "Rollout") -> PendingRewards:
        """Start scoring one micro-batch; must not block on remote work."""

    def score(self, rollout: "Rollout") -> Rewards:
        return self.submit(rollout).result()

    def attach(self, model, tokenizer, base_model: Callable[[], ContextManager]) -> None:
        """Offered the policy's model, tokenizer and a context that switches every intervention
        off (the base model), so a local judge can share the policy's weights."""

    def preflight(self) -> None:
        """Check, before any file is written, that the reward can be computed; raise UserError."""

    def check_data(self, records: Sequence[dict], where: str) -> None:
        """Check, before any file is written, that data rows carry what the reward reads."""

    def to(self, device) -> "RewardFunction":
        """Move local weights (a local judge, a reward model) to ``device``."""
        return self

    def hold(self) -> AbstractContextManager:
        """Context inside which submissions may be batched into one call (see JudgeBatching)."""
        return nullcontext()

    def metrics(self) -> dict[str, float]:
        """Counters since the last call (requests, cache hits, latency), logged once per update."""
        return {}

    def evaluation(self) -> AbstractContextManager:
        """Context for held-out scoring: nothing may learn from it (e.g. an online discriminator)."""
        return nullcontext()

    def state_dict(self) -> dict:
        """What the reward learns during training (checkpointed with the method's state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (called on resume, possibly before anything is loaded)."""

    def describe_failure(self) -> str:
        """What to check when no sample of an update could be scored (named in the stop message)."""
        return f"the reward '{self.name}' returned no valid sample"


class WeightedSum(RewardFunction):
    """``sum_k weight_k * reward_k``; a sample is valid only where every reward is.

    Args:
        rewards: The rewards to combine.
        weights: One weight per reward (default: all 1).
        names: Names of the parts in logs (default: each reward's ``name``).
    """

    def __init__(self, rewards: list[RewardFunction], weights: list[float] | None = None,
                 names: list[str] | None = None):
        from modules.errors import UserError

        weights = list(weights) if weights is not None else [1.0] * len(rewards)
        names = list(names) if names is not None else [r.name for r in rewards]
        if not rewards or len(weights) != len(rewards) or len(names) != len(rewards):
            raise UserError(f"WeightedSum needs one weight and name per reward: got {len(rewards)} rewards, "
                            f"{len(weights)} weights, {len(names)} names")
        if len(set(names)) != len(names):
            raise UserError(f"WeightedSum's reward names must differ: {names}")
        self.rewards, self.weights, self.names = rewards, weights, names
        self.name = "+".join(names)

    def submit(self, rollout: "Rollout") -> PendingRewards:
        pending = [r.submit(rollout) for r in self.rewards]
        return PendingRewards(lambda: self._combine([p.result() for p in pending]))

    def _combine(self, results: list[Rewards]) -> Rewards:
        valid = torch.stack([r.valid for r in results]).all(0)
        values = sum(w * torch.where(r.valid, r.values, torch.zeros_like(r.values))
                     for w, r in zip(self.weights, results))
        parts, features = {}, {}
        for name, r in zip(self.names, results):
            parts[name] = r.values
            parts.update({f"{name}/{k}": v for k, v in r.parts.items()})
            features.update({f"{name}/{k}": v for k, v in r.features.items()})
        return Rewards(values, valid, parts, features)

    def attach(self, model, tokenizer, base_model) -> None:
        for r in self.rewards:
            r.attach(model, tokenizer, base_model)

    def preflight(self) -> None:
        for r in self.rewards:
            r.preflight()

    def check_data(self, records: Sequence[dict], where: str) -> None:
        for r in self.rewards:
            r.check_data(records, where)

    def to(self, device) -> "WeightedSum":
        for r in self.rewards:
            r.to(device)
        return self

    @contextmanager
    def hold(self) -> Iterator[None]:
        with ExitStack() as stack:
            for r in self.rewards:
                stack.enter_context(r.hold())
            yield

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rewards:
            out.update(r.metrics())
        return out

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        with ExitStack() as stack:
            for r in self.rewards:
                stack.enter_context(r.evaluation())
            yield

    def state_dict(self) -> dict:
        return {name: r.state_dict() for name, r in zip(self.names, self.rewards)}

    def load_state_dict(self, state: dict) -> None:
        for name, r in zip(self.names, self.rewards):
            r.load_state_dict(state.get(name, {}))

    def describe_failure(self) -> str:
        return "; ".join(r.describe_failure() for r in self.rewards)


class FieldReward(RewardFunction):
    """The reward stored in a field of each data row (precomputed rewards).

    Args:
        field: The data row's field holding a number.
    """

    def __init__(self, field: str = "reward"):
        self.field = field
        self.name = f"field:{field}"

    def check_data(self, records: Sequence[dict], where: str) -> None:
        from modules.errors import UserError

        for number, row in enumerate(records, 1):
            value = row.get(self.field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                shown = "missing" if self.field not in row else repr(value)[:40]
                raise UserError(f"{where} row {number}: '{self.field}' must be a number, got {shown}")

    def submit(self, rollout: "Rollout") -> PendingRewards:
        values = torch.tensor([float(r.get(self.field, float("nan"))) for r in rollout.records])
        valid = torch.isfinite(values)
        return PendingRewards.ready(Rewards(torch.where(valid, values, torch.zeros_like(values)), valid))
