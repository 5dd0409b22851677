"""The judge's chat text, rendered client-side, for teacher-forced scoring on a completions endpoint.

A completions endpoint sees plain text, so the chat template is applied here: the returned prefix
ends with the assistant header, and the policy's response is appended right after it. Its tokens
are then the ones the judge would have produced as its own reply, which is what gets scored.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from modules.errors import UserError

BUILTIN_FORMATS = ("chatml", "llama3", "mistral")


def render_judge_prefix(system: str, user: str, prompt_format: str) -> str:
    """Chat text for a system + user turn, up to and including the assistant header.

    ``prompt_format`` is a built-in format name (see :data:`BUILTIN_FORMATS`) or a tokenizer folder
    or Hub id whose chat template renders the text. An empty ``system`` leaves the system turn out.
    """
    if prompt_format == "chatml":
        sys_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_turn}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if prompt_format == "llama3":
        def turn(role: str, text: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"

        sys_turn = turn("system", system) if system else ""
        return (f"<|begin_of_text|>{sys_turn}{turn('user', user)}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if prompt_format == "mistral":
        # Mistral's templates have no system role: the system text opens the first user turn.
        content = f"{system}\n\n{user}" if system else user
        return f"<s>[INST] {content} [/INST]"
    return _render_with_tokenizer(system, user, prompt_format)


def _render_with_tokenizer(system: str, user: str, name: str) -> str:
    tokenizer = _load_tokenizer(name)
    messages = [{"role": "user", "content": user}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        if not system:
            raise
        # some templates (e.g. Gemma's) reject a system role: fold it into the user turn instead
        merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return str(text)


@lru_cache(maxsize=8)
def _load_tokenizer(name: str) -> Any:
    """Load (once) the tokenizer whose chat template renders ``name``'s format."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError, ValueError, HF hub errors: all mean "cannot use this name"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"prompt_format {name!r} is neither a built-in format ({', '.join(BUILTIN_FORMATS)}) "
            f"nor a loadable tokenizer folder or Hub id: {reason}"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"prompt_format {name!r}: that tokenizer has no chat template")
    return tokenizer
