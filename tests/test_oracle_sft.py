"""The SFT format stage and the vibes-check command, on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modules.errors import UserError
from modules.oracle import sft
from modules.oracle.commands import oracle_sft, vibes_check
from modules.oracle.format import FORMAT_SYSTEM_PROMPT, encode_oracle_prompt, oracle_messages
from modules.oracle.scheme import adapter_scheme

TRAIN = "datamodules/data/oracle_train.jsonl"


def _heldout(tmp_path):
    rows = [{"context": "The cat slept all day.", "question": "Which animal?", "answer": "cat"},
            {"context": "We sailed to Lisbon.", "question": "Which city?", "answer": "Lisbon", "num_positions": 2}]
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _options(model_dir, tmp_path, **kw):
    return sft.SFTOptions(model=model_dir, train_file=TRAIN, heldout_file=_heldout(tmp_path), max_rows=4, epochs=1,
                          copies=1, batch_size=4, answer_max_new_tokens=6, check_max_new_tokens=6, **kw)


def test_sft_builds_a_cached_adapter_with_our_scheme(tiny_llama_dir, tmp_path, monkeypatch):
    options = _options(tiny_llama_dir, tmp_path)
    folder = sft.build_sft_adapter(options, cache_dir=tmp_path / "cache", log=lambda *a: None)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "ao_config.json", "sft_report.json"} <= names
    config = json.loads((folder / "ao_config.json").read_text())
    assert (config["hook_onto_layer"], config["special_token"], config["act_layer_combinations"]) == (1, " ?",
                                                                                                     [[1], [2], [3]])
    assert adapter_scheme(folder, [2]).format_system_prompt == FORMAT_SYSTEM_PROMPT
    report = json.loads((folder / "sft_report.json").read_text())
    assert report["steps"] == 1 and report["examples"] == 4 and report["check_samples"] == 2

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(sft, "train_sft", no_training)
    assert sft.build_sft_adapter(options, cache_dir=tmp_path / "cache") == folder  # keyed by the options
    assert sft.adapter_folder(sft.SFTOptions(**{**options.__dict__, "seed": 1}), tmp_path / "cache") != folder

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, str(folder))
    assert any("lora_" in n for n, _ in loaded.named_parameters())


def test_targets_end_with_the_end_of_turn_token(tiny_qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    enc = encode_oracle_prompt(tokenizer, "Which city?", 2, 3, FORMAT_SYSTEM_PROMPT)
    ids = sft.completion_ids(tokenizer, enc.text, oracle_messages("Which city?", 2, 3, FORMAT_SYSTEM_PROMPT),
                             "[epistemic status: 4] Lisbon")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "[epistemic status: 4] Lisbon"
    assert sft.clean_answer("[epistemic status: 3] Lisbon. It is nice\nmore") == "Lisbon."
    assert sft.clean_answer("  \n") == "I cannot tell."


def test_sft_loss_sees_the_injection(tiny_llama_dir, tmp_path):
    options = _options(tiny_llama_dir, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = sft._lora_model(base, options)
    injection = sft.ActivationInjection(model)
    from datamodules.oracle_data import read_oracle_rows

    examples, _ = sft.build_examples(model, tokenizer, read_oracle_rows(TRAIN)[:2], options, injection)
    batch = sft.collate(examples, tokenizer.pad_token_id)
    with_injection = sft.sft_loss(model, injection, batch)
    with injection.disabled():
        without = sft.sft_loss(model, injection, batch)
    assert torch.isfinite(with_injection) and with_injection.item() != without.item()


def test_start_adapter_with_another_scheme_is_refused(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    (bad / "ao_config.json").write_text(json.dumps({"hook_onto_layer": 9, "special_token": " ?"}))
    with pytest.raises(UserError, match="injects at layer 9; this oracle injects at layer 1"):
        sft.train_sft(_options(tiny_llama_dir, tmp_path, start_adapter=str(bad)), log=lambda *a: None)


def test_commands_run_end_to_end(tiny_llama_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "copy"
    heldout = _heldout(tmp_path)
    oracle_sft(["--model", tiny_llama_dir, "--train_file", TRAIN, "--heldout_file", heldout, "--max_rows", "4",
                "--epochs", "1", "--copies", "1", "--answer_max_new_tokens", "6", "--check_max_new_tokens", "6",
                "--cache_dir", str(cache), "--output", str(out)])
    assert (out / "ao_config.json").is_file()
    capsys.readouterr()
    vibes_check(["--model", tiny_llama_dir, "--adapter", str(out), "--data", heldout, "--num_examples", "2",
                 "--samples_per_prompt", "2", "--max_new_tokens", "6", "--dtype", "float32"])
    text = capsys.readouterr().out
    assert text.count("--- example") == 2 and "reward" in text and "parse failures" in text
    assert "Layer: " in text and "context  : The cat slept all day." in text
    with pytest.raises(UserError, match="num_examples"):
        vibes_check(["--model", tiny_llama_dir, "--adapter", "none", "--num_examples", "0"])
