"""The oracle's reward: informative answers, with a stated confidence that matches them.

For a reply that parses as ``[epistemic status: X] Answer``, with informativeness ``i`` in [0, 1]
from an :class:`~modules.oracle.judges.InformativenessJudge`::

    reward = i - lambda * (X / 10 - i) ** 2

(the calibrated-confidence reward; ``lambda`` is ``calibration_weight``). The squared term is the sample's Brier
error; for a given answer the reward is highest when X/10 equals the informativeness the judge
gives, so the oracle gains by stating the confidence it can back.

Samples, and what the loop sees (:class:`modules.rewards.Rewards`):

- parsed and judged: valid, the reward above;
- parse failure: valid, reward ``parse_failure_penalty`` (default -1, below the lowest reward a
  parsed reply can get, ``-lambda``). *Valid*, not masked, on purpose: the format is the policy's
  own doing, so a broken reply must push its own probability down; masking it would take away the
  only signal that keeps the format alive (and GRPO's group baseline would not see it). Counted by
  reason (``oracle/parse_failure/*``);
- judge failure (the LLM judge finally failed for a parsed reply): *invalid* (masked out of every
  statistic and gradient, counted by the judge), never scored 0.

``parts`` (means over valid samples in the loop's logs): ``informativeness``, ``confidence`` (X/10)
and ``calibration_error`` ((X/10 - i)^2) hold 0 where the reply did not parse, and
``parse_failure`` is 1 there, so its mean is the failure rate. The means over parsed replies only
(the honest ones for calibration: mean confidence, mean informativeness, Brier score) come from
:meth:`OracleReward.metrics`, once per update. ``features`` carry per-sample ``parsed``,
``confidence`` and ``informativeness`` for callbacks (the reliability diagram at checkpoints).

Where we depart from the reward as specified (the formula itself is kept):

1. The default judge is deterministic (token F1 against the reference answers, see
   :mod:`modules.oracle.judges`), so the CPU default needs no API; the seed's LLM judge
   (GLM-4.7-flash over OpenRouter) is the configurable :class:`~modules.oracle.judges.LLMInformativenessJudge`.
2. A judge failure masks the sample (never a reward of 0); parse failures are penalised, not masked
   (the argument above).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from modules.errors import UserError
from modules.oracle.calibration import calibration_summary
from modules.oracle.format import ParsedReply, ParseStats, parse_reply
from modules.oracle.judges import InformativenessItem, InformativenessJudge, TokenF1Judge
from modules.rewards import PendingRewards, RewardFunction, Rewards

if TYPE_CHECKING:
    from modules.rollout import Rollout


def calibrated_reward(informativeness: torch.Tensor, confidence: torch.Tensor, calibration_weight: float
                      ) -> torch.Tensor:
    """``i - lambda * (X/10 - i)^2`` elementwise; ``confidence`` is X (0-10)."""
    return informativeness - calibration_weight * (confidence / 10.0 - informativeness) ** 2


def item_for(record: dict, answer: str) -> InformativenessItem:
    """What the judge needs from a data row and the parsed answer."""
    missing = [k for k in ("question", "answer") if k not in record]
    if missing:
        raise UserError(f"the oracle reward needs rollout records with {', '.join(missing)}: "
                        "pass the data rows as Rollout.records")
    return InformativenessItem(record["question"], answer, (record["answer"], *record.get("aliases", [])),
                               record.get("context", ""))


class OracleReward(RewardFunction):
    """Parses each reply, asks the informativeness judge, returns the calibrated reward.

    Args:
        judge: The informativeness judge (default: :class:`~modules.oracle.judges.TokenF1Judge`).
        calibration_weight: ``lambda`` in ``i - lambda * (X/10 - i)^2``.
        parse_failure_penalty: Reward of a reply that does not parse (a valid sample, see above).
    """

    def __init__(self, judge: InformativenessJudge | None = None, calibration_weight: float = 1.0,
                 parse_failure_penalty: float = -1.0):
        if calibration_weight < 0:
            raise UserError(f"calibration_weight must be >= 0, not {calibration_weight}")
        self.judge = judge if judge is not None else TokenF1Judge()
        self.calibration_weight = float(calibration_weight)
        self.parse_failure_penalty = float(parse_failure_penalty)
        self.name = "oracle"
        self.parse_stats = ParseStats()
        self._judged: list[tuple[float, float]] = []  # (confidence 0-1, informativeness) since metrics()

    def submit(self, rollout: "Rollout") -> PendingRewards:
        if len(rollout.records) != len(rollout.responses):
            raise UserError(f"the oracle reward needs one record per reply: got {len(rollout.records)} records "
                            f"for {len(rollout.responses)} replies")
        parsed = [parse_reply(text) for text in rollout.responses]
        self.parse_stats.add(parsed)
        rows = [k for k, p in enumerate(parsed) if p.ok]
        wait = self.judge.submit([item_for(rollout.records[k], parsed[k].answer) for k in rows])
        return PendingRewards(lambda: self._combine(parsed, rows, wait()))

    def _combine(self, parsed: list[ParsedReply], rows: list[int], scores: list[float | None]) -> Rewards:
        n = len(parsed)
        ok = torch.tensor([p.ok for p in parsed], dtype=torch.bool)
        judged = torch.zeros(n, dtype=torch.bool)
        inform = torch.zeros(n)
        confidence = torch.tensor([float(p.confidence) if p.ok else 0.0 for p in parsed])
        for k, score in zip(rows, scores):
            if score is not None:
                judged[k], inform[k] = True, float(score)
        reward = calibrated_reward(inform, confidence, self.calibration_weight)
        values = torch.where(ok, reward, torch.full((n,), self.parse_failure_penalty))
        valid = ~ok | judged  # parse failures are valid (penalised); judge failures are masked
        scored = ok & judged
        zero = torch.zeros(n)
        self._judged.extend((float(confidence[k]) / 10, float(inform[k])) for k in range(n) if scored[k])
        parts = {
            "informativeness": torch.where(scored, inform, zero),
            "confidence": torch.where(scored, confidence / 10, zero),
            "calibration_error": torch.where(scored, (confidence / 10 - inform) ** 2, zero),
            "parse_failure": (~ok).float(),
        }
        features = {"parsed": ok.float(), "confidence": confidence / 10, "informativeness": inform}
        return Rewards(torch.where(valid, values, zero), valid, parts, features)

    # -- hooks the training module calls ---------------------------------------------------------
    def attach(self, model, tokenizer, base_model) -> None:
        self.judge.attach(model, tokenizer, base_model)

    def check_data(self, records, where: str) -> None:
        """Every row needs a non-empty ``question`` and ``answer`` (what the judge reads)."""
        for number, row in enumerate(records, 1):
            missing = [k for k in ("question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
            if missing:
                raise UserError(f"{where} row {number}: the oracle reward needs {' and '.join(map(repr, missing))}")

    def preflight(self) -> None:
        self.judge.preflight()

    def to(self, device) -> "OracleReward":
        self.judge.to(device)
        return self

    def hold(self) -> AbstractContextManager:
        return self.judge.hold()

    def metrics(self) -> dict[str, float]:
        """Parse failures by reason, and calibration over the parsed, judged replies since the last call."""
        out = self.parse_stats.pop().as_metrics()
        if self._judged:
            conf, inform = zip(*self._judged)
            summary = calibration_summary(list(conf), list(inform))
            out.update({f"oracle/{k}": v for k, v in summary.items()})
        self._judged = []
        out.update(self.judge.metrics())
        return out

    def describe_failure(self) -> str:
        return (f"the informativeness judge '{self.judge.name}' scored no parsed reply; check the judge "
                "(its failures are counted in judge/failed_requests)")
