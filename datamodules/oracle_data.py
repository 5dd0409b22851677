"""Oracle data: JSONL rows of a context, a question about it, and a reference answer.

One JSON object per line:

| field | required | meaning |
|---|---|---|
| ``context`` | yes | text the subject reads (its activations are what the oracle sees) |
| ``question`` | yes | what the oracle is asked about the context |
| ``answer`` | yes | the reference answer the informativeness judge compares with |
| ``aliases`` | no | other answers that count as right (list of strings) |
| ``layer_percent`` | no | depth to read from, 0 < p < 100 (default: one of 25/50/75 per row) |
| ``positions`` | no | context token indices to read (negative counts from the end; 1-20 of them) |
| ``num_positions`` | no | read the last N context tokens (1-20); with ``positions`` it must equal their count |
| ``id``, ``kind`` | no | a name and a category (e.g. topic, sentiment, entity), for reports |

:func:`read_oracle_rows` validates every row and raises one clear line (file:line, what is missing)
for the first bad one. The rows are plain dicts: they travel as ``Rollout.records`` to the reward.
The shipped set (``datamodules/data/oracle_train.jsonl``, 60 rows; ``oracle_heldout.jsonl``, 24
rows) was written for this project: short made-up texts with questions about their topic,
sentiment, a named place, person or object, and their answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from modules.errors import UserError
from modules.oracle.format import MAX_POSITIONS

DEFAULT_ORACLE_TRAIN = "datamodules/data/oracle_train.jsonl"
DEFAULT_ORACLE_HELDOUT = "datamodules/data/oracle_heldout.jsonl"
REQUIRED_FIELDS = ("context", "question", "answer")
OPTIONAL_FIELDS = ("aliases", "layer_percent", "positions", "num_positions", "id", "kind")


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the project root (so the shipped files work from anywhere)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    return PROJECT_ROOT / given if (PROJECT_ROOT / given).exists() else given


def _check_row(row: object) -> str | None:
    """What is wrong with a row, or None."""
    if not isinstance(row, dict):
        return "expected a JSON object"
    missing = [f for f in REQUIRED_FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]
    if missing:
        return (f"missing or empty field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                f"(every row needs {', '.join(REQUIRED_FIELDS)})")
    unknown = sorted(set(row) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        return f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
    aliases = row.get("aliases")
    if aliases is not None and (not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip()
                                                                         for a in aliases)):
        return "'aliases' must be a list of non-empty strings"
    percent = row.get("layer_percent")
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, (int, float))
                                or not 0 < percent < 100):
        return "'layer_percent' must be a number between 0 and 100 (exclusive)"
    positions = row.get("positions")
    if positions is not None and (not isinstance(positions, list) or not 1 <= len(positions) <= MAX_POSITIONS
                                  or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
                                  or len(set(positions)) != len(positions)):
        return f"'positions' must be a list of 1-{MAX_POSITIONS} distinct integers"
    count = row.get("num_positions")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_POSITIONS):
        return f"'num_positions' must be an integer 1-{MAX_POSITIONS}"
    if positions is not None and count is not None and count != len(positions):
        return f"'num_positions' is {count} but 'positions' lists {len(positions)}"
    return None


def read_oracle_rows(path: str) -> list[dict]:
    """Validated rows of an oracle JSONL file (UserError, one line, for the first bad row)."""
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"oracle data file '{path}' does not exist: give a .jsonl file of "
                        f"{{{', '.join(REQUIRED_FIELDS)}}} rows")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.args[0] if err.args else err})") from None
        problem = _check_row(row)
        if problem:
            raise UserError(f"{path}:{number}: {problem}")
        rows.append(row)
    if not rows:
        raise UserError(f"oracle data file '{path}' holds no rows")
    return rows


def reference_answers(row: dict) -> list[str]:
    """The answers that count as right: ``answer`` then ``aliases``."""
    return [row["answer"], *row.get("aliases", [])]
