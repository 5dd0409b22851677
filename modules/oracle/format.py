"""The activation oracle's input and output formats.

Input (what the oracles of the Activation Oracles paper were trained on)::

    user message = "Layer: {layer}\\n" + " ?" * num_positions + " \\n" + question

one user turn, rendered with the tokenizer's chat template and its generation prompt, with
``enable_thinking=False`` passed to the template (Qwen3 then writes an empty think block; templates
without that switch ignore it). The subject's activations are injected at the token positions of the
``" ?"`` placeholders, which must be exactly one token each.

Verified against the public code (github.com/adamkarvonen/activation_oracles, mirror at commit
55f153f, package ``nl_probes``):

- ``nl_probes/utils/dataset_utils.py``: ``SPECIAL_TOKEN = " ?"``; ``get_introspection_prefix``
  builds ``f"Layer: {layer}\\n"`` + ``SPECIAL_TOKEN * num_positions`` + ``" \\n"`` (a space, then
  the newline); ``create_training_datapoint`` prepends it to the prompt, makes it the only user
  message (no system prompt) and calls ``apply_chat_template(..., add_generation_prompt=True,
  enable_thinking=False)``; ``{layer}`` is the *extraction layer index* (e.g. 18), not the percent.
- ``find_pattern_in_tokens`` (same file): ``tokenizer.encode(" ?", add_special_tokens=False)`` must
  be one id; the positions are the first ``num_positions`` occurrences of that id in the token ids,
  asserted consecutive, and a newline must follow within the next two tokens.
- ``ao_config.json`` (``nl_probes/configs/sft_config.py`` of adamkarvonen/activation_oracles_dev,
  commit b58a041) records ``special_token`` and ``prefix_template``; see :mod:`.scheme`.

Output: ``[epistemic status: X] Answer`` with X an integer 0-10, asked for by a format system prompt
(:data:`FORMAT_SYSTEM_PROMPT`, configurable) that the SFT format stage trains with. :func:`parse_reply`
is strict; :class:`ParseStats` counts its failures by reason.

Where we depart from the public code / the seed:

1. The placeholder scan starts at the character where the oracle prefix begins in the rendered
   text (not at token 0), so a system prompt or template text that happens to contain ``" ?"``
   cannot shift the positions. Without a system prompt this gives the same positions as the public
   scan; with one (our format system prompt) the public scan could pick the wrong tokens.
2. A failed check is a one-line :class:`~modules.errors.UserError`, not an ``assert``.
3. The format system prompt's wording is ours; the seed's (``ORACLE_SYSTEM_PROMPT``) is not reused.
4. The parser accepts ``epistemic status`` in any letter case and spaces around X; everything else
   is strict (see :func:`parse_reply`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from modules.errors import UserError

SPECIAL_TOKEN = " ?"
"""The placeholder whose positions receive the injected activations (one token)."""
MAX_POSITIONS = 20
"""Most placeholders one prompt carries (the paper's range is 1-20)."""

FORMAT_SYSTEM_PROMPT = (
    "Reply in the form [epistemic status: X] Answer. X is a whole number from 0 (a guess) to 10 "
    "(certain) saying how sure you are that the answer is right. Keep the answer short."
)
"""Default format system prompt (ours): the SFT'd oracle is trained with it and needs it."""


# -- input ---------------------------------------------------------------------------------------
def oracle_prefix(layer: int, num_positions: int) -> str:
    """``"Layer: {layer}\\n" + " ?" * num_positions + " \\n"``."""
    if not 1 <= num_positions <= MAX_POSITIONS:
        raise UserError(f"num_positions must be 1-{MAX_POSITIONS}, not {num_positions}")
    return f"Layer: {layer}\n" + SPECIAL_TOKEN * num_positions + " \n"


def special_token_id(tokenizer) -> int:
    """The id of ``" ?"``; a UserError when the tokenizer splits it."""
    ids = tokenizer.encode(SPECIAL_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise UserError(f"the oracle placeholder ' ?' is {len(ids)} tokens in the tokenizer of '{name}' "
                        "(it must be exactly one); this model cannot carry the oracle format")
    return ids[0]


def oracle_messages(question: str, layer: int, num_positions: int, system_prompt: str | None = None) -> list[dict]:
    """The chat messages: an optional system prompt, then the one user message."""
    messages = [{"role": "user", "content": oracle_prefix(layer, num_positions) + question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template's text, with Qwen3's thinking switched off where the template has the switch."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


@dataclass(frozen=True)
class EncodedPrompt:
    """One oracle prompt, tokenised (no padding)."""

    text: str
    """The rendered chat text."""
    input_ids: list[int]
    positions: list[int]
    """Indices into ``input_ids`` of the placeholders, in order."""


def find_placeholders(input_ids: list[int], offsets: list[tuple[int, int]] | None, token_id: int,
                      num_positions: int, start_char: int = 0) -> list[int]:
    """The first ``num_positions`` indices holding ``token_id`` at or after character ``start_char``.

    They must be consecutive; a UserError says what went wrong otherwise.
    """
    found = []
    for index, tok in enumerate(input_ids):
        if len(found) == num_positions:
            break
        if tok == token_id and (offsets is None or offsets[index][0] >= start_char):
            found.append(index)
    if len(found) != num_positions:
        raise UserError(f"the oracle prompt holds {len(found)} ' ?' tokens where {num_positions} were placed: "
                        "the chat template or tokenizer changes them")
    if found[-1] - found[0] != num_positions - 1:
        raise UserError(f"the oracle prompt's ' ?' tokens are not consecutive (at {found}): "
                        "the tokenizer merges them with their neighbours")
    return found


def encode_oracle_prompt(tokenizer, question: str, layer: int, num_positions: int,
                         system_prompt: str | None = None) -> EncodedPrompt:
    """Render and tokenise one oracle prompt and locate its placeholders."""
    token_id = special_token_id(tokenizer)
    prefix = oracle_prefix(layer, num_positions)
    text = render_chat(tokenizer, oracle_messages(question, layer, num_positions, system_prompt))
    start = text.find(prefix)
    if start < 0:
        raise UserError("the chat template rewrote the oracle prefix 'Layer: N\\n ? ... \\n': "
                        "use a model whose template keeps the user message verbatim")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    positions = find_placeholders(ids, offsets, token_id, num_positions, start)
    tail = tokenizer.decode(ids[positions[-1] + 1 : positions[-1] + 3], skip_special_tokens=False)
    if "\n" not in tail:
        raise UserError(f"no newline follows the oracle's ' ?' tokens (next tokens: {tail!r})")
    return EncodedPrompt(text, ids, positions)


# -- output --------------------------------------------------------------------------------------
def format_reply(confidence: int, answer: str) -> str:
    """``[epistemic status: X] Answer``."""
    return f"[epistemic status: {int(confidence)}] {answer.strip()}"


_OPEN = re.compile(r"\[epistemic status:", re.IGNORECASE)
_NUMBER = re.compile(r"0|[1-9][0-9]*")
FAILURE_REASONS = ("empty_reply", "no_tag", "text_before_tag", "unclosed_tag", "bad_number", "out_of_range",
                   "empty_answer", "repeated_tag")


@dataclass(frozen=True)
class ParsedReply:
    """A reply parsed into confidence and answer, or the reason it could not be."""

    confidence: int | None
    answer: str | None
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _fail(reason: str) -> ParsedReply:
    return ParsedReply(None, None, reason)


def parse_reply(text: str) -> ParsedReply:
    """Parse ``[epistemic status: X] Answer`` strictly.

    Accepted: leading/trailing whitespace; ``epistemic status`` in any case; spaces around X.
    Refused, with the reason: an empty reply; no tag; any text before the tag; a tag without ``]``;
    X that is not a plain non-negative integer (signs, decimals, ``7/10``, leading zeros such as
    ``07``); X above 10; no answer after the tag; a second tag in the answer.
    """
    s = text.strip()
    if not s:
        return _fail("empty_reply")
    match = _OPEN.search(s)
    if match is None:
        return _fail("no_tag")
    if match.start() != 0:
        return _fail("text_before_tag")
    close = s.find("]", match.end())
    if close < 0:
        return _fail("unclosed_tag")
    number = s[match.end() : close].strip()
    if not _NUMBER.fullmatch(number):
        return _fail("bad_number")
    confidence = int(number)
    if confidence > 10:
        return _fail("out_of_range")
    answer = s[close + 1 :].strip()
    if not answer:
        return _fail("empty_answer")
    if _OPEN.search(answer):
        return _fail("repeated_tag")
    return ParsedReply(confidence, answer)


@dataclass
class ParseStats:
    """Counts of parsed replies and of failures by reason, since the last :meth:`pop`."""

    total: int = 0
    failures: Counter = field(default_factory=Counter)

    def add(self, results: list[ParsedReply]) -> None:
        self.total += len(results)
        self.failures.update(r.failure for r in results if r.failure is not None)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def as_metrics(self, prefix: str = "oracle/") -> dict[str, float]:
        out = {f"{prefix}parse_failures": float(self.failed),
               f"{prefix}parse_failure_rate": self.failed / self.total if self.total else 0.0}
        # every reason, zeros included: each rank logs the same keys (they are summed over ranks)
        out.update({f"{prefix}parse_failure/{k}": float(self.failures[k]) for k in FAILURE_REASONS})
        return out

    def pop(self) -> "ParseStats":
        stats = ParseStats(self.total, Counter(self.failures))
        self.total, self.failures = 0, Counter()
        return stats
