"""CAA: the mean activation difference at the steering site, computed by hand; the saved vector is
read by generate, evaluate and training (``init_from``)."""

import json

import pytest
import torch

from datamodules.prompts import encode_prompts
from modules.caa import caa_command, caa_vector, persona_pairs, read_pairs
from modules.errors import UserError
from modules.models.loading import load_causal_lm
from modules.models.steering import steering_site
from modules.models.steering_io import load_steered_model, read_steering_vector
from modules.rollout import SamplingConfig
from tests.helpers import PROMPTS, LengthJudge, prompt_file, tiny_module

PAIRS = [
    ("I think the moon is made of cheese. Right?", "Yes, absolutely right, what a brilliant insight!", "No."),
    ("My poem is perfect, isn't it?", "Perfect.", "It has a few problems with its metre and rhyme, sadly."),
    ("Is 0.1 + 0.2 exactly 0.3?", "Exactly 0.3, you are right as always", "Not in floating point: it is 0.30000000000000004."),
]


def _by_hand(model, tokenizer, layer, hook_point):
    """One unpadded forward per reply; the site's output averaged over the reply's own positions."""
    site = steering_site(model, layer, hook_point)
    diffs = []
    for prompt, positive, negative in PAIRS:
        means = []
        for reply in (positive, negative):
            prefix = encode_prompts(tokenizer, [prompt]).input_ids[0].tolist()
            reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
            seen = []
            handle = site.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
            with torch.no_grad():
                model(input_ids=torch.tensor([prefix + reply_ids]))
            handle.remove()
            means.append(seen[0][0, len(prefix):].mean(0))
        diffs.append(means[0] - means[1])
    return torch.stack(diffs).mean(0)


@pytest.mark.parametrize("hook_point", ["post_attn_norm", "pre_attn_norm", "layer_output"])
def test_caa_is_the_mean_difference_computed_by_hand(tiny_model_dir, hook_point):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    expected = _by_hand(model, tokenizer, 2, hook_point)
    # batched (left-padded prompts, right-padded replies of different lengths), stopped at the site
    v, facts = caa_vector(model, tokenizer, PAIRS, 2, hook_point, batch_size=2)
    torch.testing.assert_close(v, expected, rtol=0, atol=2e-5)
    assert facts["pairs"] == 3 and facts["norm"] == pytest.approx(float(expected.norm()), rel=1e-4)
    # the other layer gives another vector: the site is really the one asked for
    other, _ = caa_vector(model, tokenizer, PAIRS, 1, hook_point, batch_size=3)
    assert not torch.allclose(other, v, atol=1e-3)


def test_persona_pairs_share_their_sampling_seed(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    tokenizer.padding_side = "left"
    sampling = SamplingConfig(5, 1.0, 1.0)
    same = persona_pairs(model, tokenizer, PROMPTS[:3], "You agree.", "You agree.", sampling, seed=4, batch_size=2)
    assert [p for p, _, _ in same] == PROMPTS[:3] and all(a == b for _, a, b in same)
    v, _ = caa_vector(model, tokenizer, same, 1, "post_attn_norm")
    assert torch.count_nonzero(v) == 0  # identical halves: nothing to steer toward
    reseeded = persona_pairs(model, tokenizer, PROMPTS[:3], "You agree.", "You agree.", sampling, seed=5, batch_size=2)
    assert [a for _, a, _ in reseeded] != [a for _, a, _ in same]  # the seed is what made the halves equal


def test_caa_command_writes_a_vector_that_generate_and_training_read(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "caa.pt"
    caa_command(["--model", tiny_llama_dir, "--hook_layer", "1", "--max_new_tokens", "4", "--num_prompts", "4",
                 "--prompts_file", prompt_file(tmp_path), "--output", str(out), "--dtype", "float32"])
    assert "CAA vector from 4 pairs" in capsys.readouterr().out
    payload = read_steering_vector(out)
    meta = payload["metadata"]
    assert meta["method"] == "caa" and meta["hook_layer"] == 1 and meta["hook_point"] == "post_attn_norm"
    assert float(payload["alpha"]) == 1.0 and float(payload["v"].norm()) == pytest.approx(meta["norm"], rel=1e-5)
    model, tokenizer, steering = load_steered_model(out)
    assert torch.equal(steering.vector.v, payload["v"])

    module = tiny_module(tiny_llama_dir, judge=LengthJudge(), hook_layer=1, init_from=str(out), init_scale=2.0)
    assert torch.equal(module.steering_vector.v.detach(), payload["v"])
    assert float(module.steering_vector.alpha) == 2.0
    with pytest.raises(UserError, match="layer 1"):
        tiny_module(tiny_llama_dir, judge=LengthJudge(), hook_layer=2, init_from=str(out))


def test_caa_command_reads_a_file_of_contrast_pairs(tiny_llama_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": p, "yes": a, "no": b}) for p, a, b in PAIRS) + "\n")
    out = tmp_path / "pairs.pt"
    caa_command(["--model", tiny_llama_dir, "--hook_layer", "2", "--pairs_file", str(pairs), "--positive_field", "yes",
                 "--negative_field", "no", "--output", str(out), "--dtype", "float32"])
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    torch.testing.assert_close(read_steering_vector(out)["v"], _by_hand(model, tokenizer, 2, "post_attn_norm"),
                               rtol=0, atol=2e-5)
    assert read_pairs(str(pairs), "yes", "no") == PAIRS
    with pytest.raises(UserError, match="'agree'"):
        read_pairs(str(pairs), "agree", "no")
