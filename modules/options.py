"""The options the command-line tools share, each declared once: its type and help live here.

    from modules.options import add_options, parse_args, tool_parser

    parser = tool_parser("sarm-pairs", "Preference pairs from persona-conditioned replies of a chat model.")
    add_options(parser, model="embedded:smollm2", max_new_tokens=40, temperature=0.7, seed=0,
                notes={"model": "the one that answers"})
    args = parse_args(parser, argv)

Each tool passes its own default for every shared option it takes. Where defaults differ between
tools they do so on purpose (``generate`` samples 64 tokens at temperature 0.7 like the training
default, ``vibes-check`` 32 at 1.0 like the oracle's), so the default belongs to the tool and the
meaning to this module. A default of ``None`` makes the option optional (``int | None``: the tool
fills it from elsewhere, which its note says); :data:`REQUIRED` makes it required. A note is added
to the shared help in parentheses for what is particular to one tool.

The same call serves jsonargparse's parser (the ``cli.py`` tools) and argparse's
(``benchmarks/*.py``); argparse gets the plain type of an optional option (a scalar one).
"""

from __future__ import annotations

from argparse import ArgumentError
from dataclasses import dataclass
from typing import Any

import jsonargparse

from modules.errors import UserError, describe_config_error


@dataclass(frozen=True)
class Option:
    """A shared option: its type and its help (a phrase; :func:`help_text` ends it)."""

    type: Any
    help: str


OPTIONS: dict[str, Option] = {
    # models
    "model": Option(str, "Model: Hub id, folder, .gguf file or embedded:smollm2"),
    "dtype": Option(str, "auto (bf16 on a GPU, fp32 on the CPU), bfloat16, float16 or float32"),
    "tokenizer": Option(str, "Tokenizer: Hub id or folder"),
    "batch_size": Option(int, "Batch size"),
    "threads": Option(int, "CPU threads for torch (0: torch's default; 1 is faster on a busy machine)"),
    # prompts and sampling
    "prompts_file": Option(str, "Prompts, .txt or .jsonl"),
    "max_prompts": Option(int, "Use at most this many prompts (0: all)"),
    "max_new_tokens": Option(int, "Most new tokens per reply"),
    "temperature": Option(float, "Sampling temperature"),
    "seed": Option(int, "Sampling seed"),
    "samples_per_prompt": Option(int, "Sampled replies per prompt"),
    # preference / contrast pairs
    "pairs": Option(str, "Preference pairs JSONL: prompt, chosen, rejected"),
    "positive_field": Option(str, "Field of a pair holding the positive reply, the persona's"),
    "negative_field": Option(str, "Field of a pair holding the negative reply, the counter-persona's"),
    # reports
    "output": Option(str, "Also write the report as JSON here"),
    # SARM reward models
    "sarm": Option(str, "SARM folder, embedded:sarm-smollm2, or Hub id"),
    "score_mode": Option(str, "auto (the SARM's own TopK flag), topk or dense (wins over the flag)"),
    "k": Option(int, "TopK k (wins over the SARM's sae_k)"),
    # activation oracles
    "layer_percents": Option(list[float], "Depths the subject is read at, in percent of its layers, where a row "
                                          "does not say"),
    "num_positions": Option(int, "Context positions read where a row gives neither positions nor num_positions"),
}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
"""A default that makes the option required."""


def help_text(name: str, note: str | None = None) -> str:
    """The shared help of ``--name``, with a tool's ``note`` in parentheses."""
    base = OPTIONS[name].help
    return f"{base} ({note})." if note else f"{base}."


def add_options(parser, notes: dict[str, str] | None = None, **defaults) -> None:
    """Add ``--name`` for each ``name=default`` (in that order), typed and helped as :data:`OPTIONS` says."""
    notes = notes or {}
    stray = sorted(set(notes) - set(defaults))
    if stray:
        raise ValueError(f"notes for options not added: {stray}")
    typed = isinstance(parser, jsonargparse.ArgumentParser)
    for name, default in defaults.items():
        option = OPTIONS[name]
        kind, extra = option.type, {"default": default}
        if default is REQUIRED:
            extra = {"required": True}
        elif default is None and typed:
            kind = kind | None
        parser.add_argument(f"--{name}", type=kind, help=help_text(name, notes.get(name)), **extra)


def tool_parser(prog: str, description: str, **kwargs) -> jsonargparse.ArgumentParser:
    """The parser of ``cli.py <prog>``: its errors come back as exceptions (see :func:`parse_args`)."""
    return jsonargparse.ArgumentParser(prog=f"cli.py {prog}", description=description, exit_on_error=False, **kwargs)


def parse_args(parser: jsonargparse.ArgumentParser, argv: list[str]):
    """Parse ``argv``; a bad option is one :class:`UserError` line."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        raise UserError(describe_config_error(str(err))) from None
