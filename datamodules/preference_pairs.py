"""Preference pairs and demonstrations as JSONL, for reward-model building and probing.

- preference pairs: one JSON object per line with ``prompt``, ``chosen`` and ``rejected``;
- demonstrations (human replies, for the human-latent buffer): ``prompt`` and ``response``.

The shipped pairs (``datamodules/data/sycophancy_pairs_{train,heldout}.jsonl``, 240 and 64) answer
the shipped sycophancy prompts twice with SmolLM2-135M-Instruct: under the honest persona (chosen)
and under the sycophantic one (rejected), each reply begun with a stance sentence drawn from a
short list and continued by the model (40 new tokens, temperature 0.7). Made with

    python cli.py sarm-pairs --prompts_file datamodules/data/sycophancy_train.txt --seed 0 \
        --out datamodules/data/sycophancy_pairs_train.jsonl
    python cli.py sarm-pairs --prompts_file datamodules/data/sycophancy_heldout.txt --seed 10000 \
        --out datamodules/data/sycophancy_pairs_heldout.jsonl

(one CPU thread; other thread counts may word some replies differently). Paths may be given
relative to the project root, like the prompt files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from datamodules.prompts import resolve_path
from modules.errors import UserError

DEFAULT_TRAIN_PAIRS = "datamodules/data/sycophancy_pairs_train.jsonl"
DEFAULT_HELDOUT_PAIRS = "datamodules/data/sycophancy_pairs_heldout.jsonl"


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class Demonstration:
    prompt: str
    response: str


def read_jsonl_rows(path: str, fields: tuple[str, ...], what: str) -> list[dict]:
    """Rows of a JSONL file that each hold ``fields`` as strings; one UserError line otherwise."""
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"{what} file '{path}' does not exist")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(f), str) for f in fields):
            raise UserError(f"{path}:{number}: expected a JSON object with string fields {', '.join(fields)}")
        rows.append(row)
    if not rows:
        raise UserError(f"{what} file '{path}' is empty: it needs one JSON object per line with "
                        f"{', '.join(fields)}")
    return rows


def read_preference_pairs(path: str) -> list[PreferencePair]:
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"])
            for r in read_jsonl_rows(path, ("prompt", "chosen", "rejected"), "preference-pair")]


def read_demonstrations(path: str) -> list[Demonstration]:
    return [Demonstration(r["prompt"], r["response"])
            for r in read_jsonl_rows(path, ("prompt", "response"), "demonstrations")]


def write_jsonl(path: str | Path, rows: Iterable) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row) if hasattr(row, "__dataclass_fields__") else row, ensure_ascii=False) + "\n")
    return path
