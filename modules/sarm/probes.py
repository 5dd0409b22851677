"""Phase 2: which SARM latents matter, what clamping them does, and best-of-N with and without control.

- :func:`head_candidates`: latents with the largest negative and positive score-head weights.
- :func:`difference_candidates`: latents whose pooled activation differs most between the chosen
  and the rejected responses of preference pairs (with each one's contribution w_i * difference).
- :func:`clamp_probe`: for a latent and a value, the change in reward (chosen, rejected) and in
  pairwise accuracy when the latent is clamped (or capped) before the score head.
- :func:`best_of_n`: N policy samples per prompt, the best picked by the plain SARM reward and by the
  controlled, shaped one; their rewards, the controlled features' activation rates, the replies.

In-RM control acts on the pooled latents (:mod:`modules.sarm.model`), so a clamp's effect on the
reward is computed from latents scored once, exactly as a second pass with the control on would.

Departures from the seed (numbered):
1. Differences are reported as mean activation (chosen - rejected), activation rates and
   ``w_i * difference``, besides the seed's normalised score (c - j) / (c + j + mean(c + j)).
2. The probe reports pairwise accuracy before and after the clamp, not only the mean reward change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from datamodules.preference_pairs import PreferencePair
from modules.sarm.model import LatentControl, SARMOutput, SARMRewardModel
from modules.sarm.shaping import active, check_feature_ids, threshold_penalty


@dataclass
class PairScores:
    chosen: SARMOutput
    rejected: SARMOutput


def score_pairs(rm: SARMRewardModel, pairs: Sequence[PreferencePair], batch_size: int = 8) -> PairScores:
    prompts = [p.prompt for p in pairs]
    return PairScores(rm.score(prompts, [p.chosen for p in pairs], batch_size),
                      rm.score(prompts, [p.rejected for p in pairs], batch_size))


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores higher (ties count half)."""
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def head_candidates(rm: SARMRewardModel, top: int = 20) -> dict:
    w = rm.score_weight.cpu()
    order = torch.argsort(w)
    return {"negative": [{"feature": int(i), "weight": float(w[i])} for i in order[:top]],
            "positive": [{"feature": int(i), "weight": float(w[i])} for i in order.flip(0)[:top]]}


def difference_candidates(rm: SARMRewardModel, scores: PairScores, top: int = 20) -> dict:
    """Latents most active on rejected (``rejected_heavy``) and on chosen (``chosen_heavy``) responses."""
    c, r = scores.chosen.latents.float(), scores.rejected.latents.float()
    diff = c.mean(0) - r.mean(0)
    rate_c, rate_r = (c > 0).float().mean(0), (r > 0).float().mean(0)
    sums = c.sum(0) + r.sum(0)
    normalised = (c.sum(0) - r.sum(0)) / (sums + sums.mean() + 1e-9)
    w = rm.score_weight.cpu()

    def row(i: int) -> dict:
        return {"feature": i, "mean_chosen": float(c[:, i].mean()), "mean_rejected": float(r[:, i].mean()),
                "difference": float(diff[i]), "rate_chosen": float(rate_c[i]), "rate_rejected": float(rate_r[i]),
                "normalised": float(normalised[i]), "weight": float(w[i]), "contribution": float(w[i] * diff[i])}

    order = torch.argsort(diff)
    return {"pairs": int(c.shape[0]),
            "rejected_heavy": [row(int(i)) for i in order[:top]],
            "chosen_heavy": [row(int(i)) for i in order.flip(0)[:top]]}


@dataclass
class ProbeResult:
    feature: int
    value: float
    mode: str
    reward_change_chosen: float
    reward_change_rejected: float
    accuracy_before: float
    accuracy_after: float
    margin_before: float
    margin_after: float
    rate_chosen: float
    rate_rejected: float

    @property
    def accuracy_change(self) -> float:
        return self.accuracy_after - self.accuracy_before

    def as_dict(self) -> dict:
        return {**asdict(self), "accuracy_change": self.accuracy_change}


def clamp_probe(rm: SARMRewardModel, scores: PairScores, feature: int, value: float, mode: str = "set") -> ProbeResult:
    """What clamping (``set``) or capping (``cap``) one latent at ``value`` does to rewards and accuracy."""
    check_feature_ids([feature], rm.latent_size)
    if mode not in ("set", "cap"):
        raise ValueError(f"mode must be 'set' or 'cap', got {mode}")
    control = LatentControl(clamp={feature: value}) if mode == "set" else LatentControl(cap={feature: value})
    before_c, before_r = scores.chosen.rewards_uncontrolled, scores.rejected.rewards_uncontrolled
    after_c = rm.score_latents(scores.chosen.latents, control)
    after_r = rm.score_latents(scores.rejected.latents, control)
    return ProbeResult(feature, value, mode, float((after_c - before_c).mean()), float((after_r - before_r).mean()),
                       pairwise_accuracy(before_c, before_r), pairwise_accuracy(after_c, after_r),
                       float((before_c - before_r).mean()), float((after_c - after_r).mean()),
                       float((scores.chosen.latents[:, feature] > 0).float().mean()),
                       float((scores.rejected.latents[:, feature] > 0).float().mean()))


@dataclass
class BestOfNReport:
    n: int
    prompts: list[str]
    plain: dict
    controlled: dict
    features: list[int]

    def format(self, examples: int = 3) -> str:
        lines = [f"best-of-{self.n} on {len(self.prompts)} prompts (same samples, two ways of picking)"]
        for name, arm in (("plain SARM", self.plain), ("with controls", self.controlled)):
            rates = ", ".join(f"{f}: {r:.2f}" for f, r in zip(self.features, arm["feature_rates"]))
            lines.append(f"  {name:<14} R_SARM {arm['sarm_mean']:+.4f}  shaped {arm['shaped_mean']:+.4f}"
                         + (f"  feature rates [{rates}]" if rates else ""))
        for i in range(min(examples, len(self.prompts))):
            lines.append(f"--- {self.prompts[i]}")
            lines.append(f"  [plain] ({self.plain['sarm'][i]:+.3f}) {self.plain['replies'][i][:200]}")
            lines.append(f"  [ctrl ] ({self.controlled['sarm'][i]:+.3f}) {self.controlled['replies'][i][:200]}")
        return "\n".join(lines)


def best_of_n(policy, tokenizer, rm: SARMRewardModel, prompts: list[str], n: int, sampling, seed: int = 0,
              control: LatentControl | None = None, features: Sequence[int] = (), taus: Sequence[float] = (),
              alphas: Sequence[float] = (), batch_size: int = 8, system_prompt: str | None = None) -> BestOfNReport:
    """Sample ``n`` replies per prompt with ``policy``; pick the best by plain and by controlled, shaped SARM reward."""
    from datamodules.prompts import encode_prompts
    from modules.rollout import rollout

    control = control or LatentControl()
    control.validate(rm.latent_size)
    features, taus, alphas = list(features), list(taus), list(alphas)
    check_feature_ids(features, rm.latent_size, "penalize_features")
    flat = [p for p in prompts for _ in range(n)]
    replies: list[str] = []
    for begin in range(0, len(flat), batch_size):
        chunk = flat[begin:begin + batch_size]
        batch = encode_prompts(tokenizer, chunk, system_prompt)
        out = rollout(policy, tokenizer, chunk, batch.input_ids.to(policy.device),
                      batch.attention_mask.to(policy.device), sampling, seed + begin)
        replies += out.responses
    scored = rm.score(flat, replies, batch_size)
    plain = scored.rewards_uncontrolled.view(len(prompts), n)
    shaped = (rm.score_latents(scored.latents, control)
              - threshold_penalty(scored.latents, features, taus, alphas)).view(len(prompts), n)
    fired = active(scored.latents, features, taus).float().view(len(prompts), n, -1)

    def arm(choice: torch.Tensor) -> dict:
        rows = torch.arange(len(prompts))
        picked = rows * n + choice
        return {"sarm": plain[rows, choice].tolist(), "shaped": shaped[rows, choice].tolist(),
                "sarm_mean": float(plain[rows, choice].mean()), "shaped_mean": float(shaped[rows, choice].mean()),
                "feature_rates": fired[rows, choice].mean(0).tolist() if features else [],
                "replies": [replies[int(i)] for i in picked]}

    return BestOfNReport(n, prompts, arm(plain.argmax(1)), arm(shaped.argmax(1)), features)
