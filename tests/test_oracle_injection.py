"""The oracle's prompt positions, the norm-matched injection, and extraction with the adapter off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from modules.errors import UserError
from modules.models.steering import decoder_layers
from modules.oracle.batch import build_oracle_batch
from modules.oracle.format import FORMAT_SYSTEM_PROMPT, encode_oracle_prompt, special_token_id
from modules.oracle.injection import ActivationInjection, extract_activations, norm_matched_delta
from modules.oracle.scheme import layer_for_percent, layers_for_percents

ROWS = [
    {"context": "The match ended two to one after a late goal by the home striker.",
     "question": "What is the text about?", "answer": "sports"},
    {"context": "I loved this film, the acting was wonderful.", "question": "Is the sentiment positive or negative?",
     "answer": "positive", "layer_percent": 75, "positions": [0, -2, -1]},
]


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _capture_layer1(model):
    seen = []
    handle = decoder_layers(model)[1].register_forward_hook(lambda m, a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).detach().clone()))
    return seen, handle


def test_prompt_positions_are_the_placeholders(tiny_llama_dir):
    _, tokenizer = _load(tiny_llama_dir)
    tok = special_token_id(tokenizer)
    enc = encode_oracle_prompt(tokenizer, "What is it?", layer=2, num_positions=5)
    assert [enc.input_ids[p] for p in enc.positions] == [tok] * 5
    assert enc.positions == list(range(enc.positions[0], enc.positions[0] + 5))
    assert "Layer: 2\n ? ? ? ? ? \nWhat is it?" in enc.text
    # a system prompt holding " ?" does not shift the positions: they stay on the prefix's placeholders
    with_system = encode_oracle_prompt(tokenizer, "What is it?", 2, 5, system_prompt="Why ? Because ? yes")
    prefix_start = with_system.text.index("Layer: 2")
    enc_offsets = tokenizer(with_system.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert all(enc_offsets[p][0] > prefix_start for p in with_system.positions)
    assert [with_system.input_ids[p] for p in with_system.positions] == [tok] * 5


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_injection_changes_exactly_the_placeholders(kind, tiny_llama_dir, tiny_qwen_dir):
    model, tokenizer = _load({"llama": tiny_llama_dir, "qwen": tiny_qwen_dir}[kind])
    batch = build_oracle_batch(model, tokenizer, ROWS, num_positions=4)
    injection = ActivationInjection(model)
    seen, handle = _capture_layer1(model)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
        with injection.inject(batch.vectors, batch.positions):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    handle.remove()
    before, after = seen
    expected = before.clone()
    for row in range(len(batch)):
        for slot, pos in enumerate(batch.positions[row].tolist()):
            if pos < 0:
                continue
            h, v = before[row, pos], batch.vectors[row, slot]
            expected[row, pos] = h + h.norm() * v / v.norm()
    changed = (after != before).any(-1)
    placeholder = torch.zeros_like(changed)
    for row in range(len(batch)):
        placeholder[row, batch.positions[row][batch.positions[row] >= 0]] = True
    assert torch.equal(changed, placeholder)  # exactly the placeholders, nothing else
    assert torch.allclose(after, expected, atol=1e-5)
    assert batch.positions[0].tolist().count(-1) == 0 and batch.positions[1].tolist().count(-1) == 1


def test_injection_travels_with_the_records_through_padding_changes(tiny_llama_dir):
    from modules.oracle.batch import injection_from_records

    model, tokenizer = _load(tiny_llama_dir)
    longer = dict(ROWS[0], question="In a few words, what is this text mostly about, and how can you tell?")
    batch = build_oracle_batch(model, tokenizer, ROWS + [longer], num_positions=4)
    records = batch.tagged_records()
    vectors, positions = injection_from_records(records, batch.input_ids.shape[1])
    assert torch.equal(positions, batch.positions) and torch.equal(vectors, batch.vectors)
    # the padded row alone, with its all-padding columns dropped (as Rollout.select does)
    row = int((batch.attention_mask == 0).sum(-1).argmax())
    pad = int((batch.attention_mask[row] == 0).sum())
    assert pad > 0
    _, alone = injection_from_records(records[row : row + 1], batch.input_ids.shape[1] - pad)
    ids = batch.input_ids[row, pad:]
    assert (ids[alone[0][alone[0] >= 0]] == special_token_id(tokenizer)).all()
    assert "_oracle_vectors" not in ROWS[0]  # the data rows themselves are not changed


def test_norm_matched_delta_by_hand():
    h, v = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(norm_matched_delta(h, v), torch.tensor([0.0, 5.0]))


@pytest.mark.parametrize("wrapped", [False, True])
def test_no_injection_during_cached_decoding(tiny_qwen_dir, wrapped):
    model, tokenizer = _load(tiny_qwen_dir)
    if wrapped:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    batch = build_oracle_batch(model, tokenizer, ROWS, num_positions=3)
    injection = ActivationInjection(model)
    lengths = []
    handle = decoder_layers(model)[1].register_forward_hook(lambda m, a, out: lengths.append(
        (out[0] if isinstance(out, tuple) else out).shape[1]))
    with torch.no_grad(), injection.inject(batch.vectors, batch.positions):
        model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
    handle.remove()
    assert lengths[0] == batch.input_ids.shape[1] and len(lengths) > 1  # the prompt pass, then decode steps
    assert injection.calls == 1  # only the prompt pass was injected


def test_chunked_prompt_is_injected_at_absolute_positions(tiny_llama_dir):
    model, tokenizer = _load(tiny_llama_dir)
    batch = build_oracle_batch(model, tokenizer, ROWS[:1], num_positions=4)
    injection = ActivationInjection(model)
    ids, first = batch.input_ids, int(batch.positions[0, 0])
    split = first + 2  # the first chunk holds two placeholders, the second the other two
    with torch.no_grad(), injection.inject(batch.vectors, batch.positions):
        whole = model(input_ids=ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :split], cache=cache, use_cache=True)
        chunked = model(input_ids=ids[:, split:], cache=cache, use_cache=True).logits[:, -1]
    assert injection.calls == 3
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_extraction_runs_with_the_adapter_off(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    plain, tokenizer = _load(tiny_llama_dir)
    wrapped, _ = _load(tiny_llama_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(wrapped, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_lora_weights=False))
    enc = tokenizer([ROWS[0]["context"]], return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = torch.tensor([[0, 3, ids.shape[1] - 1]])
    from_peft = extract_activations(peft_model, ids, mask, [2], positions)
    from_plain = extract_activations(plain, ids, mask, [2], positions)
    with_adapter = extract_activations(peft_model, ids, mask, [2], positions, subject=lambda: torch.no_grad())
    assert torch.allclose(from_peft, from_plain, atol=1e-6)
    assert not torch.allclose(from_peft, with_adapter, atol=1e-3)  # the adapter does change layer 2
    # the layer read is the output of decoder layer 2 (0-based)
    out = plain(input_ids=ids, output_hidden_states=True).hidden_states[3]
    assert torch.allclose(from_plain[0], out[0, positions[0]], atol=1e-5)


def test_injection_works_through_peft(tiny_qwen_dir):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load(tiny_qwen_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    batch = build_oracle_batch(peft_model, tokenizer, ROWS, num_positions=2, system_prompt=FORMAT_SYSTEM_PROMPT)
    injection = ActivationInjection(peft_model)
    with torch.no_grad():
        off = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with injection.inject(batch.vectors, batch.positions):
            on = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    first = int(batch.positions[0, 0])
    assert torch.equal(on[0, :first], off[0, :first])  # causal: nothing before the first placeholder moves
    assert not torch.allclose(on[0, first:], off[0, first:])


def test_layer_percentages():
    assert [layer_for_percent(36, p) for p in (25, 50, 75)] == [9, 18, 27]
    assert [layer_for_percent(30, p) for p in (25, 50, 75)] == [7, 15, 22]  # truncation, as the public code
    for bad in (0, 100, 150, -5):
        with pytest.raises(UserError, match="outside"):
            layer_for_percent(30, bad)


def test_layer_percent_the_model_cannot_give(tiny_llama_dir):
    model, tokenizer = _load(tiny_llama_dir)
    with pytest.raises(UserError, match="layer percent 100"):
        layers_for_percents(model, [50, 100])
    with pytest.raises(UserError, match="outside"):
        build_oracle_batch(model, tokenizer, [dict(ROWS[0], layer_percent=120)])
