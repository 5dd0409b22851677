"""The oracle JSONL reader and the shipped data set."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from datamodules.oracle_data import (DEFAULT_ORACLE_HELDOUT, DEFAULT_ORACLE_TRAIN, OPTIONAL_FIELDS, read_oracle_rows,
                                     reference_answers)
from modules.errors import UserError
from modules.oracle.batch import build_oracle_batch


def _write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = {"context": "A cat sat.", "question": "Which animal?", "answer": "cat"}


@pytest.mark.parametrize("row, message", [
    ({"context": "A cat sat.", "answer": "cat"}, r":2: missing or empty field 'question' \(every row needs"),
    ({"question": "q", "answer": ""}, r":2: missing or empty fields 'context', 'answer'"),
    ({**GOOD, "positions": "0"}, "'positions' must be a list"),
    ({**GOOD, "positions": [0, 0]}, "distinct"),
    ({**GOOD, "num_positions": 21}, "'num_positions' must be an integer 1-20"),
    ({**GOOD, "positions": [0, 1], "num_positions": 3}, "'num_positions' is 3 but 'positions' lists 2"),
    ({**GOOD, "layer_percent": 100}, "'layer_percent' must be a number between 0 and 100"),
    ({**GOOD, "aliases": "kitty"}, "'aliases' must be a list"),
    ({**GOOD, "reference": "cat"}, "unknown field 'reference'"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_rows_are_one_clear_line(tmp_path, row, message):
    path = _write(tmp_path, [GOOD, row])
    with pytest.raises(UserError, match=message) as info:
        read_oracle_rows(path)
    assert "\n" not in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_oracle_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no rows"):
        read_oracle_rows(str(tmp_path / "empty.jsonl"))


def test_shipped_sets_exercise_every_field():
    train, heldout = read_oracle_rows(DEFAULT_ORACLE_TRAIN), read_oracle_rows(DEFAULT_ORACLE_HELDOUT)
    assert (len(train), len(heldout)) == (60, 24)
    for rows in (train, heldout):
        assert set(OPTIONAL_FIELDS) <= {k for r in rows for k in r}
    assert not {(r["context"], r["question"]) for r in train} & {(r["context"], r["question"]) for r in heldout}
    assert reference_answers(train[0]) == ["sports", "football", "soccer"]


def test_every_shipped_row_builds_an_oracle_prompt(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = read_oracle_rows(DEFAULT_ORACLE_TRAIN) + read_oracle_rows(DEFAULT_ORACLE_HELDOUT)
    batch = build_oracle_batch(model, tokenizer, rows)
    assert len(batch) == 84 and batch.vectors.shape[:2] == batch.positions.shape
    assert set(batch.layer_percents) == {25, 50, 75}
    with_positions = next(i for i, r in enumerate(rows) if "positions" in r)
    assert int((batch.positions[with_positions] >= 0).sum()) == len(rows[with_positions]["positions"])
    groups = batch.repeat(3)
    assert len(groups) == 252 and groups.records[0] is groups.records[2] and groups.records[3] is rows[1]
