"""Held-out evaluation of an intervention: the same prompts and sampling seeds with it on and off.

For every held-out prompt and sample index the policy answers twice with one sampling seed, once
with the intervention on (the trained steering vector or adapter) and once with the reference
policy (vector off, adapter off, or the starting adapter). Both replies are scored by the same
reward; the "on" replies also get the exact KL(p_on || p_off) over their tokens. The report gives
each arm's mean reward with its standard error, the difference with a Welch and a paired
standard error, the mean KL, reply lengths, and a few replies side by side.

A training callback (``callbacks.heldout.HeldOutEvaluation``), the CLI's ``evaluate`` command and
the learning test all call :func:`evaluate_intervention`.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from datamodules.prompts import encode_prompts
from modules.on_policy import PromptBatch
from modules.rollout import Rollout


class Intervenable(Protocol):
    """What evaluation needs from a training module (every OnPolicyModule provides it)."""

    tokenizer: object
    reward: object
    arm_names: tuple[str, str]

    def rollout_micro_batch(self, prompts: PromptBatch, seed: int) -> Rollout: ...
    def reference(self): ...
    def heldout_kl(self, batch: Rollout) -> torch.Tensor: ...


@dataclass
class Arm:
    rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    features: dict[str, list[float]] = field(default_factory=dict)
    failed: int = 0

    def mean(self) -> float:
        return sum(self.rewards) / max(len(self.rewards), 1)

    def se(self) -> float:
        return _std(self.rewards) / math.sqrt(max(len(self.rewards), 1))


@dataclass
class HeldOutReport:
    """Results of :func:`evaluate_intervention`."""

    samples_per_arm: int
    reward_on: float
    reward_on_se: float
    reward_off: float
    reward_off_se: float
    difference: float
    difference_se: float
    """Welch standard error of the difference of means (conservative: ignores the pairing)."""
    paired_se: float
    """Standard error of the mean paired difference (same prompt and seed)."""
    kl_per_token: float
    kl_per_reply: float
    length_on: float
    length_off: float
    judge_failed: int
    arm_names: tuple[str, str] = ("vector off", "vector on")
    """How the reference arm and the trained arm are called in the report."""
    examples: list[dict] = field(default_factory=list)
    method_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    """A method's own figures per arm (``off``/``on``), e.g. the oracle's Brier score."""
    method_tables: dict[str, str] = field(default_factory=dict)
    """A method's own tables per arm, printed as they are (e.g. reliability tables)."""

    @property
    def z(self) -> float:
        """Difference in Welch standard errors (nan without a standard error)."""
        return self.difference / self.difference_se if self.difference_se > 0 else float("nan")

    @property
    def verdict(self) -> str:
        """What the comparison supports, in words (a standard error only where one exists)."""
        if self.samples_per_arm == 0:
            return "no judge answers"
        if self.difference_se > 0:
            return f"{self.z:+.1f} SE (Welch)"
        reason = "one sample" if self.samples_per_arm < 2 else "identical rewards within each arm"
        return f"too few samples for a standard error: {reason}"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def format(self, width: int = 100) -> str:
        off_name, on_name = self.arm_names
        label = max(len(off_name), len(on_name)) + len("reward, ")
        total = self.samples_per_arm + self.judge_failed
        if self.samples_per_arm == 0:
            return (f"held-out evaluation: no judge answers: the reward failed for all {total} samples, so there "
                    "is nothing to compare (check the judge; judge/failed counts failures)")
        if self.difference_se > 0:
            difference = (f"{self.difference:+.4f} ± {self.difference_se:.4f} (Welch; {self.z:+.1f} SE),"
                          f" paired SE {self.paired_se:.4f}")
        else:
            difference = f"{self.difference:+.4f} ({self.verdict})"
        one = self.samples_per_arm < 2  # one sample has no spread: no "± 0"
        se_off, se_on = ("", "") if one else (f" ± {self.reward_off_se:.4f}", f" ± {self.reward_on_se:.4f}")
        lines = [
            f"held-out evaluation: {self.samples_per_arm} samples per arm (same prompts and sampling seeds)",
            f"  {'reward, ' + off_name:<{label}} : {self.reward_off:+.4f}{se_off}",
            f"  {'reward, ' + on_name:<{label}} : {self.reward_on:+.4f}{se_on}",
            f"  {'on − off':<{label}} : {difference}",
            f"  {'KL(on || off)':<{label}} : {self.kl_per_token:.4f} per token, {self.kl_per_reply:.3f} per reply",
            f"  {'reply length':<{label}} : {self.length_on:.1f} tokens on, {self.length_off:.1f} off",
        ]
        if self.judge_failed:
            lines.append(f"  {'judge failures':<{label}} : {self.judge_failed} of {total} samples left out")
        for name in sorted(set(self.method_summary.get("off", {})) | set(self.method_summary.get("on", {}))):
            values = [self.method_summary.get(arm, {}).get(name, float("nan")) for arm in ("off", "on")]
            lines.append(f"  {name:<{label}} : {values[1]:.4f} on, {values[0]:.4f} off")
        for arm, arm_name in (("off", off_name), ("on", on_name)):
            if self.method_tables.get(arm):
                lines.append(f"--- {arm_name}:")
                lines.append(self.method_tables[arm])
        for i, ex in enumerate(self.examples, 1):
            lines.append(f"--- example {i}: {ex['prompt']}")
            for arm in ("off", "on"):
                reply = textwrap.shorten(ex[arm].replace("\n", " "), width=width * 2, placeholder=" ...")
                lines.append(f"  [{arm:>3}] ({ex['reward_' + arm]:+.3f}) {reply}")
        return "\n".join(lines)


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@torch.no_grad()
def evaluate_intervention(
    module: Intervenable,
    prompts: list[str],
    samples_per_prompt: int = 1,
    seed: int = 12345,
    batch_size: int = 16,
    system_prompt: str | None = None,
    show_examples: int = 3,
    progress: bool = True,
    records: list[dict] | None = None,
) -> HeldOutReport:
    """Compare the policy with its intervention on and off on ``prompts`` (see the module doc).

    ``records`` (one data row per prompt) reach the reward, for rewards that read fields of the data.
    """
    on, off = Arm(), Arm()
    kl_sum = kl_tokens = 0.0
    diffs: list[float] = []
    examples: list[dict] = []
    records = list(records) if records is not None else [{"prompt": p} for p in prompts]
    starts = range(0, len(prompts), batch_size)
    jobs = [(prompts[i : i + batch_size], records[i : i + batch_size]) for _ in range(samples_per_prompt) for i in starts]
    for job, (chunk, rows) in enumerate(tqdm(jobs, desc="held-out", disable=not progress, leave=False)):
        batch = encode_prompts(module.tokenizer, chunk, system_prompt)
        batch.records = list(rows)
        run_seed = (seed * 7_919 + job * 104_729) % (2**31 - 1)
        rollout_on = module.rollout_micro_batch(batch, run_seed)
        with module.reference():
            rollout_off = module.rollout_micro_batch(batch, run_seed)
        for rollout in (rollout_on, rollout_off):
            rollout.records = rollout.records or list(rows)
        with module.reward.evaluation():  # nothing learns from held-out rollouts
            pending = [module.reward.submit(r) for r in (rollout_on, rollout_off)]
        kl = module.heldout_kl(rollout_on)
        kl_sum, kl_tokens = kl_sum + float(kl.sum()), kl_tokens + kl.numel()
        rewards_on, rewards_off = (p.result() for p in pending)
        for i in range(len(chunk)):
            if not (rewards_on.valid[i] and rewards_off.valid[i]):
                on.failed += 1
                continue
            for arm, rollout, rewards in ((on, rollout_on, rewards_on), (off, rollout_off, rewards_off)):
                arm.rewards.append(float(rewards.values[i]))
                arm.lengths.append(int(rollout.lengths[i]))
                arm.replies.append(rollout.responses[i])
                for name, values in {**rewards.parts, **rewards.features}.items():
                    if values.dim() == 1:  # per-sample scalars: reward parts, the oracle's confidence
                        arm.features.setdefault(name, []).append(float(values[i]))
            diffs.append(on.rewards[-1] - off.rewards[-1])
            if len(examples) < show_examples:
                examples.append({"prompt": chunk[i], "off": off.replies[-1], "on": on.replies[-1],
                                 "reward_off": off.rewards[-1], "reward_on": on.rewards[-1]})
    n = len(on.rewards)
    return HeldOutReport(
        samples_per_arm=n,
        reward_on=on.mean(), reward_on_se=on.se(), reward_off=off.mean(), reward_off_se=off.se(),
        difference=on.mean() - off.mean(), difference_se=math.sqrt(on.se() ** 2 + off.se() ** 2),
        paired_se=_std(diffs) / math.sqrt(max(n, 1)),
        kl_per_token=kl_sum / max(kl_tokens, 1), kl_per_reply=kl_sum / max(n + on.failed, 1),
        length_on=sum(on.lengths) / max(n, 1), length_off=sum(off.lengths) / max(n, 1),
        judge_failed=on.failed, arm_names=tuple(getattr(module, "arm_names", ("vector off", "vector on"))),
        examples=examples, **_method_summaries(module, off, on),
    )


def _method_summaries(module, off: Arm, on: Arm) -> dict:
    """A method's own per-arm figures (e.g. the oracle's Brier score and reliability tables)."""
    if not hasattr(module, "heldout_summary"):
        return {}
    summary = {"off": module.heldout_summary(off.features), "on": module.heldout_summary(on.features)}
    tables = {"off": module.heldout_tables(off.features), "on": module.heldout_tables(on.features)}
    return {"method_summary": summary, "method_tables": tables}
