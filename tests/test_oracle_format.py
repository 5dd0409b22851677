"""The oracle's input format checks, the output parser's edge cases, and ao_config.json checks."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modules.errors import UserError
from modules.oracle.format import (FAILURE_REASONS, FORMAT_SYSTEM_PROMPT, ParseStats, encode_oracle_prompt,
                                   format_reply, oracle_prefix, parse_reply, special_token_id)
from modules.oracle.scheme import (PUBLIC_PREFIX_TEMPLATE, adapter_scheme, ao_config_payload, check_ao_config,
                                   read_ao_config)


def test_prefix_spacing():
    assert oracle_prefix(18, 3) == "Layer: 18\n ? ? ? \n"
    with pytest.raises(UserError, match="1-20"):
        oracle_prefix(18, 21)


def _byte_tokenizer():
    """A byte-level tokenizer without merges: ' ?' is two tokens in it."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_placeholder_that_is_not_one_token_is_refused():
    tokenizer = _byte_tokenizer()
    with pytest.raises(UserError, match=r"' \?' is 2 tokens"):
        special_token_id(tokenizer)
    with pytest.raises(UserError, match="exactly one"):
        encode_oracle_prompt(tokenizer, "What?", 3, 2)


def test_thinking_is_disabled_where_the_template_has_the_switch(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
        "{% endif %}")
    enc = encode_oracle_prompt(tokenizer, "Who?", 9, 2)
    assert enc.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert enc.text.startswith("<|im_start|>user\nLayer: 9\n ? ? \nWho?")  # one user message, no system turn
    with_system = encode_oracle_prompt(tokenizer, "Who?", 9, 2, FORMAT_SYSTEM_PROMPT)
    assert with_system.text.startswith("<|im_start|>system\n" + FORMAT_SYSTEM_PROMPT)


@pytest.mark.parametrize("text, confidence, answer", [
    ("[epistemic status: 7] Paris", 7, "Paris"),
    ("  [epistemic status: 0] I do not know.  ", 0, "I do not know."),
    ("[epistemic status: 10]sports", 10, "sports"),
    ("[Epistemic Status:  4 ] a red car\nwith two doors", 4, "a red car\nwith two doors"),
])
def test_parser_accepts(text, confidence, answer):
    parsed = parse_reply(text)
    assert parsed.ok and parsed.confidence == confidence and parsed.answer == answer


@pytest.mark.parametrize("text, reason", [
    ("", "empty_reply"),
    ("   \n", "empty_reply"),
    ("Paris", "no_tag"),
    ("[confidence: 7] Paris", "no_tag"),
    ("Sure! [epistemic status: 7] Paris", "text_before_tag"),
    ("[epistemic status: 7 Paris", "unclosed_tag"),
    ("[epistemic status: seven] Paris", "bad_number"),
    ("[epistemic status: 7.5] Paris", "bad_number"),
    ("[epistemic status: -1] Paris", "bad_number"),
    ("[epistemic status: 7/10] Paris", "bad_number"),
    ("[epistemic status: 07] Paris", "bad_number"),
    ("[epistemic status: ] Paris", "bad_number"),
    ("[epistemic status: 11] Paris", "out_of_range"),
    ("[epistemic status: 100] Paris", "out_of_range"),
    ("[epistemic status: 7]", "empty_answer"),
    ("[epistemic status: 7]   ", "empty_answer"),
    ("[epistemic status: 7] Paris [epistemic status: 3] Lyon", "repeated_tag"),
])
def test_parser_refuses(text, reason):
    parsed = parse_reply(text)
    assert not parsed.ok and parsed.failure == reason and parsed.confidence is None


def test_format_round_trip_and_counting():
    assert parse_reply(format_reply(6, " Lyon ")).answer == "Lyon"
    stats = ParseStats()
    stats.add([parse_reply(t) for t in ["[epistemic status: 1] a", "nope", "", "[epistemic status: 12] b"]])
    metrics = stats.pop().as_metrics()
    assert metrics["oracle/parse_failures"] == 3 and metrics["oracle/parse_failure_rate"] == 0.75
    assert metrics["oracle/parse_failure/no_tag"] == 1 and metrics["oracle/parse_failure/out_of_range"] == 1
    # every reason is logged, zeros included, so that every rank logs the same keys
    assert {k for k in metrics if "parse_failure/" in k} == {f"oracle/parse_failure/{r}" for r in FAILURE_REASONS}
    assert metrics["oracle/parse_failure/bad_number"] == 0
    assert stats.total == 0


# -- ao_config.json ------------------------------------------------------------------------------
PUBLIC_STYLE = {"hook_onto_layer": 1, "special_token": " ?", "prefix_template": PUBLIC_PREFIX_TEMPLATE,
                "steering_coefficient": 1.0, "layer_combinations": [[25], [50], [75]],
                "act_layer_combinations": [[9], [18], [27]]}


def test_public_style_config_passes(tmp_path):
    (tmp_path / "ao_config.json").write_text(json.dumps(PUBLIC_STYLE))
    assert read_ao_config(tmp_path)["hook_onto_layer"] == 1
    scheme = adapter_scheme(tmp_path, layers=[9, 27])
    assert scheme.layers == (9, 18, 27)
    check_ao_config(None)  # no config: nothing to check
    assert read_ao_config(tmp_path / "missing") is None
    check_ao_config(ao_config_payload("m", [25, 50, 75], [9, 18, 27]), [18])


@pytest.mark.parametrize("change, message", [
    ({"hook_onto_layer": 9}, "injects at layer 9"),
    ({"special_token": " <ACT>"}, "placeholder"),
    ({"prefix_template": "L{layer}: {special_token} * {num_positions}\\n"}, "prefix"),
    ({"steering_coefficient": 2.0}, "coefficient"),
    ({"injection": "replace"}, "injection 'replace'"),
    ({"act_layer_combinations": [[9, 18, 27]]}, "several layers"),
])
def test_other_injection_schemes_are_refused(tmp_path, change, message):
    (tmp_path / "ao_config.json").write_text(json.dumps({**PUBLIC_STYLE, **change}))
    with pytest.raises(UserError, match=message) as info:
        adapter_scheme(tmp_path, layers=[9])
    assert "\n" not in str(info.value)


def test_layers_the_adapter_was_not_trained_on_are_refused(tmp_path):
    (tmp_path / "ao_config.json").write_text(json.dumps(PUBLIC_STYLE))
    with pytest.raises(UserError, match=r"trained on layers \[9, 18, 27\], not \[10\]"):
        adapter_scheme(tmp_path, layers=[9, 10])
