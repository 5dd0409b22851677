"""SARM folders in the layouts their authors' code writes: settings in ``sarm_param`` (the released remote
code) or at the top level of config.json (their training code's names), dense and TopK, scored against
the scoring rule written out here; contradictions, a missing flag, explicit options and a missing
tokenizer each give one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from modules.errors import UserError
from modules.rollout import Rollout
from modules.sarm.model import SARMRewardModel
from modules.sarm.reward import SARMReward
from modules.sarm.tools import sarm_features

EOT, PAD, LAYERS, LATENT, K = 128009, 128004, 2, 64, 8
BASE = dict(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
            tie_word_embeddings=False, bos_token_id=128000, eos_token_id=EOT, pad_token_id=PAD)
ROWS = [[5, 17, 300, 42, 9, EOT], [77, 1000, 3, EOT]]
PROMPTS, RESPONSES = ["Is the Earth flat? I think so.", "2 + 2 = 5, right?"], ["No, it is round.", "Yes!"]


def released_settings(topk: bool | None) -> dict:
    """``sarm_param`` as the released remote code reads it."""
    settings = {"sae_latent_size": LATENT, "sae_k": K, "sae_use_sequence_level": False, "sae_source_layer": LAYERS}
    return settings if topk is None else {**settings, "sarm_use_activation": topk}


def training_settings(topk: bool | None) -> dict:
    """The top-level names of the authors' training code (their ``LlamaSARM`` arguments)."""
    settings = {"sae_hidden_state_source_layer": LAYERS, "sae_latent_size": LATENT, "sae_k": K,
                "sae_use_sequence_level": False, "sarm_train_mode": 1}
    return settings if topk is None else {**settings, "sarm_use_topk": topk}


@pytest.fixture(scope="module")
def base():
    """A 4-layer Llama with random weights (its first 2 layers are the SARM's backbone), the SAE and head."""
    from transformers import LlamaConfig, LlamaModel

    g = torch.Generator().manual_seed(0)
    model = LlamaModel(LlamaConfig(**BASE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (1 if "embed" in name else p.shape[-1] ** 0.5))
    sae = {"sae.pre_bias": 0.1 * torch.randn(16, generator=g),
           "sae.latent_bias": 0.1 * torch.randn(LATENT, generator=g),
           "sae.encoder.weight": torch.randn(LATENT, 16, generator=g) / 4,
           "sae.decoder.weight": torch.randn(16, LATENT, generator=g) / 8,
           "score.weight": torch.randn(1, LATENT, generator=g)}
    return model, sae


@pytest.fixture(scope="module")
def weights_file(base, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    model, sae = base
    kept = {f"model.{k}": v for k, v in model.state_dict().items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < LAYERS}
    path = tmp_path_factory.mktemp("sarm_weights") / "model.safetensors"
    save_file({**kept, **sae}, str(path), metadata={"format": "pt"})
    return path


def write_folder(folder: Path, weights_file: Path, sarm_param: dict | None = None,
                 top_level: dict | None = None) -> Path:
    """A SARM folder as the authors save one: config.json and the weights, no tokenizer."""
    folder.mkdir(parents=True)
    config = {**BASE, "architectures": ["LlamaSARM"], "model_type": "llama", **(top_level or {})}
    if sarm_param is not None:
        config["sarm_param"] = sarm_param
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    os.symlink(weights_file, folder / "model.safetensors")
    return folder


def rule_scores(base, rows: list[list[int]], k: int | None) -> torch.Tensor:
    """The scoring rule, row by row: h after layer L-1 at the last token (the end of turn), standardised,
    pre = encoder(h - pre_bias) + latent_bias, then score(pre) (dense) or score(top-k of pre scattered)."""
    model, sae = base
    out = []
    with torch.no_grad():
        for row in rows:
            h = model(torch.tensor([row]), output_hidden_states=True).hidden_states[LAYERS][0, -1]
            x = (h - h.mean()) / (h.std() + 1e-6)
            pre = sae["sae.encoder.weight"] @ (x - sae["sae.pre_bias"]) + sae["sae.latent_bias"]
            if k is not None:
                top = pre.topk(k)
                pre = torch.zeros_like(pre).scatter(0, top.indices, top.values)
            out.append(sae["score.weight"][0] @ pre)
    return torch.stack(out)


def model_scores(rm: SARMRewardModel, rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return rm(ids, mask).rewards


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("layout", ["sarm_param", "top_level"])
@pytest.mark.parametrize("mode", ["topk", "dense"])
def test_both_layouts_score_as_the_rule_says(base, weights_file, tmp_path, layout, mode):
    topk = mode == "topk"
    folder = write_folder(tmp_path / "sarm", weights_file, *(
        (released_settings(topk), None) if layout == "sarm_param" else (None, training_settings(topk))))
    rm = SARMRewardModel.load(str(folder), device="cpu")
    assert (rm.use_topk, rm.spec.k, rm.spec.source_layer, rm.spec.latent_size) == (topk, K, LAYERS, LATENT)
    flag = "sarm_param.sarm_use_activation" if layout == "sarm_param" else "top-level sarm_use_topk"
    assert rm.spec.mode_from == f"config.json's {flag}"  # the checkpoint's own flag decided, read where it sits
    assert rm.tokenizer is None  # token ids need none
    expected = rule_scores(base, ROWS, K if topk else None)
    assert torch.allclose(model_scores(rm, ROWS), expected, atol=1e-4, rtol=1e-5)


def test_a_dense_flag_at_the_top_level_stays_dense_when_k_is_passed(base, weights_file, tmp_path):
    folder = write_folder(tmp_path / "sarm", weights_file, top_level=training_settings(False))
    rm = SARMRewardModel.load(str(folder), device="cpu", k=K)
    assert not rm.use_topk and "sarm_use_topk" in rm.describe()
    assert torch.allclose(model_scores(rm, ROWS), rule_scores(base, ROWS, None), atol=1e-4, rtol=1e-5)


def test_a_source_layer_that_disagrees_with_the_weights_is_caught(weights_file, tmp_path):
    folder = write_folder(tmp_path / "sarm", weights_file,
                          top_level={**training_settings(True), "sae_hidden_state_source_layer": 3})
    with pytest.raises(UserError) as err:
        SARMRewardModel.load(str(folder), device="cpu")
    assert "top-level sae_hidden_state_source_layer says source layer 3" in one_line(err)
    assert "hold 2 decoder layers" in str(err.value)
    folder = write_folder(tmp_path / "latent", weights_file,
                          top_level={**training_settings(True), "sae_latent_size": 32})
    with pytest.raises(UserError, match=r"top-level sae_latent_size = 32 but 'score\.weight' holds 64 latents"):
        SARMRewardModel.load(str(folder), device="cpu")


def test_a_contradiction_between_the_two_sources_names_both(base, weights_file, tmp_path):
    folder = write_folder(tmp_path / "k", weights_file, released_settings(True), {"sae_k": 4})
    with pytest.raises(UserError) as err:
        SARMRewardModel.load(str(folder), device="cpu")
    assert "sarm_param.sae_k = 8 but top-level sae_k = 4" in one_line(err) and "pass k" in str(err.value)
    assert SARMRewardModel.load(str(folder), device="cpu", k=4).spec.k == 4  # the explicit option settles it

    folder = write_folder(tmp_path / "flag", weights_file, released_settings(True), {"sarm_use_topk": False})
    with pytest.raises(UserError) as err:
        SARMRewardModel.load(str(folder), device="cpu")
    assert "sarm_param.sarm_use_activation = true but top-level sarm_use_topk = false" in one_line(err)
    assert "score_mode" in str(err.value)
    rm = SARMRewardModel.load(str(folder), device="cpu", score_mode="dense")
    assert torch.allclose(model_scores(rm, ROWS), rule_scores(base, ROWS, None), atol=1e-4, rtol=1e-5)

    folder = write_folder(tmp_path / "layer", weights_file, {"sae_source_layer": 2},
                          {**training_settings(True), "sae_hidden_state_source_layer": 4})
    with pytest.raises(UserError, match="sarm_param.sae_source_layer = 2 but top-level sae_hidden_state_source_layer"):
        SARMRewardModel.load(str(folder), device="cpu")
    folder = write_folder(tmp_path / "bad", weights_file, top_level={**training_settings(True), "sae_k": "many"})
    with pytest.raises(UserError, match='top-level sae_k = "many" is not a whole number'):
        SARMRewardModel.load(str(folder), device="cpu")


@pytest.mark.parametrize("layout", ["sarm_param", "top_level"])
def test_no_flag_anywhere_requires_score_mode(base, weights_file, tmp_path, layout):
    folder = write_folder(tmp_path / "sarm", weights_file, *(
        (released_settings(None), None) if layout == "sarm_param" else (None, training_settings(None))))
    with pytest.raises(UserError) as err:
        SARMRewardModel.load(str(folder), device="cpu", k=K)
    assert "says neither TopK nor dense" in one_line(err) and "pass score_mode topk or dense" in str(err.value)
    for mode, k in (("dense", None), ("topk", K)):
        rm = SARMRewardModel.load(str(folder), device="cpu", score_mode=mode)
        assert "the score_mode option" in rm.describe()
        assert torch.allclose(model_scores(rm, ROWS), rule_scores(base, ROWS, k), atol=1e-4, rtol=1e-5)


def test_explicit_options_beat_the_checkpoint(base, weights_file, tmp_path, tokenizer_dir):
    folder = write_folder(tmp_path / "sarm", weights_file, top_level=training_settings(False))
    for options, k in (({"score_mode": "topk"}, K), ({"score_mode": "topk", "k": 3}, 3)):
        rm = SARMRewardModel.load(str(folder), device="cpu", **options)
        assert rm.use_topk and rm.spec.k == k
        assert torch.allclose(model_scores(rm, ROWS), rule_scores(base, ROWS, k), atol=1e-4, rtol=1e-5)
    reward = SARMReward(str(folder), device="cpu", score_mode="topk", k=3, tokenizer=tokenizer_dir)
    reward.preflight()
    assert reward.rm.use_topk and reward.rm.spec.k == 3


def rollout(prompts=PROMPTS, responses=RESPONSES) -> Rollout:
    b = len(prompts)
    return Rollout(list(prompts), torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long),
                   torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long), list(responses))


def test_a_missing_tokenizer_is_one_line_naming_the_option(weights_file, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "run")  # as their training script does
    folder = write_folder(tmp_path / "run" / "checkpoint-10", weights_file, released_settings(True))
    rm = SARMRewardModel.load(str(folder), device="cpu")
    assert model_scores(rm, ROWS).shape == (2,)  # token ids score without a tokenizer
    for call in (lambda: rm.score(PROMPTS, RESPONSES), lambda: SARMReward(str(folder), device="cpu").preflight()):
        with pytest.raises(UserError) as err:
            call()
        message = one_line(err)
        assert "holds no tokenizer" in message and "pass the tokenizer option (--tokenizer" in message
        assert f"its parent folder holds one: tokenizer: {tmp_path / 'run'}" in message
    with pytest.raises(UserError, match="holds no tokenizer files"):
        SARMRewardModel.load(str(folder), device="cpu", tokenizer=str(tmp_path))


def test_the_tokenizer_option_and_the_cli_options(base, weights_file, tmp_path, tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer_dir = str(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = write_folder(tmp_path / "sarm", weights_file, top_level=training_settings(None))
    rm = SARMRewardModel.load(str(folder), device="cpu", score_mode="topk", tokenizer=tokenizer_dir)
    rows = []  # the template's ids; SmolLM2 has no <|eot_id|>, so it is appended, as the model's departure 5 says
    for prompt, response in zip(PROMPTS, RESPONSES):
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        rows.append(tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
                    + [EOT])
    expected = rule_scores(base, rows, K)
    assert torch.allclose(rm.score(PROMPTS, RESPONSES).rewards, expected, atol=1e-4, rtol=1e-5)
    reward = SARMReward(str(folder), device="cpu", score_mode="topk", tokenizer=tokenizer_dir)
    assert torch.allclose(reward.score(rollout()).values, expected, atol=1e-4, rtol=1e-5)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": PROMPTS[0], "chosen": RESPONSES[0], "rejected": RESPONSES[1]}) + "\n")
    with pytest.raises(UserError, match="pass score_mode topk or dense"):
        sarm_features(["--sarm", str(folder), "--tokenizer", tokenizer_dir, "--pairs", str(pairs)])
    with pytest.raises(UserError, match=r"pass the tokenizer option \(--tokenizer"):
        sarm_features(["--sarm", str(folder), "--score_mode", "dense", "--pairs", str(pairs)])
    sarm_features(["--sarm", str(folder), "--score_mode", "topk", "--k", "3", "--tokenizer", tokenizer_dir,
                   "--pairs", str(pairs), "--top", "2", "--output", str(tmp_path / "features.json")])
    assert "TopK k=3 (from the score_mode option)" in capsys.readouterr().out
    assert json.loads((tmp_path / "features.json").read_text())["differences"]["rejected_heavy"]
