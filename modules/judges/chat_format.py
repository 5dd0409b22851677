"""The judge's chat text: the prefix (system and user turn, up to the reply) that a response is scored after.

Every judge renders its text here. The returned prefix ends with the assistant header (or the reply
prefix of a template for a base model), and the policy's response is appended right after it; its
tokens are then the ones the judge would have produced as its own reply, which is what gets scored.

- :func:`render_chat_prefix`: with a tokenizer (the local judge, and a tokenizer folder named as a
  remote judge's ``prompt_format``), by the tokenizer's own chat template or one given as
  ``chat_template`` (:func:`resolve_chat_template`: ``plain``, a ``.jinja`` file or a Jinja string).
- :func:`render_judge_prefix`: a completions endpoint sees plain text, so a remote ``echo`` judge
  renders client-side, by a built-in format name or a tokenizer folder / Hub id.

An empty system prompt leaves the system turn out. A template that rejects a system role (Gemma 2's)
gets the system text folded into the user turn instead.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from modules.errors import UserError

BUILTIN_FORMATS = ("chatml", "llama3", "mistral")

PLAIN_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant:\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)
"""A chat template for a base model: ``{system}\\n\\nUser: {user}\\nAssistant:\\n``, the reply after it;
it opens with the BOS token where the tokenizer puts one before plain text (Gemma's, Llama's)."""

NAMED_TEMPLATES = {"plain": PLAIN_TEMPLATE}
"""Chat templates that ``chat_template`` options name instead of spelling them out."""


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
    return render_chat_prefix(_load_tokenizer(name), system, user)


def resolve_chat_template(value: str | None) -> str | None:
    """The Jinja text of a ``chat_template`` option: a name from :data:`NAMED_TEMPLATES`, a Jinja
    string (holding ``{{`` or ``{%``), or a ``.jinja`` file (relative to the working folder or the
    project root); None stays None (the tokenizer's own template)."""
    if value is None:
        return None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    from datamodules.prompts import resolve_path

    path = resolve_path(value)
    if path.is_file():
        return path.read_text()
    kinds = f"a named template ({', '.join(NAMED_TEMPLATES)}), a .jinja file or a Jinja string"
    if value.endswith(".jinja"):
        raise UserError(f"chat_template file '{value}' does not exist: give {kinds}")
    raise UserError(f"chat_template '{value}' is not {kinds}")


def template_label(value: str) -> str:
    """A short name for a ``chat_template`` option in a judge's identity: the name, the file's name,
    or ``jinja:`` and a hash of the string."""
    if value in NAMED_TEMPLATES or not ("{{" in value or "{%" in value):
        return Path(value).name
    return "jinja:" + hashlib.sha256(value.encode()).hexdigest()[:10]


def render_chat_prefix(tokenizer: Any, system: str, user: str, template: str | None = None) -> str:
    """The judge's text for a system + user turn with the generation prompt, by ``template`` (Jinja
    text, see :func:`resolve_chat_template`) or else the tokenizer's own chat template.

    Besides the usual variables (``messages``, ``bos_token``, ``add_generation_prompt``), a template
    sees ``add_bos``: whether the tokenizer puts its BOS token before plain text.
    """
    from jinja2 import TemplateError

    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError("the judge's tokenizer has no chat template: give one as chat_template")
    bos = getattr(tokenizer, "bos_token_id", None)
    add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]

    def render(messages: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True, add_bos=add_bos))

    user_turn = {"role": "user", "content": user}
    try:
        if not system:
            return render([user_turn])
        try:
            return render([{"role": "system", "content": system}, user_turn])
        except TemplateError:  # some templates (Gemma 2's) reject a system role: fold it into the user turn
            return render([{"role": "user", "content": f"{system}\n\n{user}"}])
    except TemplateError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"the judge's chat template does not render: {reason}") from None


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
