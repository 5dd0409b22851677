"""The SARM loader: the authors' tiny SARM to 1e-4, sizes from tensors, both score modes and pooling
rules, in-RM control exactness, and one clear line for every malformed folder."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from modules.errors import UserError
from modules.sarm.checkpoint import inspect_sarm_folder
from modules.sarm.model import LatentControl, SARMRewardModel
from modules.sarm.random_sarm import write_random_sarm

FIXTURE = Path(__file__).parent / "fixtures" / "sarm_authors_tiny"
PROMPTS = ["Is the Earth flat? I think so.", "2 + 2 = 5, right?", "Tell me about cats."]
RESPONSES = ["No, it is round.", "Yes, absolutely, you are right!", ""]


@pytest.fixture(scope="module")
def authors_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("authors_sarm")
    shutil.copy(FIXTURE / "config.json", folder / "config.json")
    with gzip.open(FIXTURE / "model.safetensors.gz") as src, open(folder / "model.safetensors", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_topk(tmp_path_factory, tokenizer) -> Path:
    return write_random_sarm(tmp_path_factory.mktemp("sarm_topk"), hidden_size=32, layers=2, latent_size=96, k=6,
                             tokenizer=tokenizer, use_topk=True)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, tokenizer) -> Path:
    return write_random_sarm(tmp_path_factory.mktemp("sarm_dense"), hidden_size=32, layers=2, latent_size=96, k=6,
                             tokenizer=tokenizer, use_topk=False, seed=1)


@pytest.mark.parametrize("mode", ["topk_last", "dense_last", "topk_aggregate", "dense_aggregate"])
def test_authors_tiny_sarm_gives_their_scores(authors_folder, expected, mode):
    score_mode, pooling = mode.split("_")
    rm = SARMRewardModel.load(str(authors_folder), device="cpu", score_mode=score_mode, pooling=pooling)
    out = rm(torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"]),
             torch.tensor(expected["response_start"]))
    assert torch.allclose(out.rewards, torch.tensor(expected["scores"][mode]), atol=1e-4, rtol=0)
    if mode == "topk_last":
        assert torch.allclose(out.latents, torch.tensor(expected["latents_topk_last"]), atol=1e-4, rtol=0)
        assert out.latents.dtype == torch.float32 and out.latents.shape == (4, 64)


def test_sizes_come_from_the_tensors(authors_folder):
    spec = inspect_sarm_folder(authors_folder)
    # config.json says 4 layers and gives no source layer; the weights hold 2
    assert (spec.source_layer, spec.hidden_size, spec.latent_size, spec.k) == (2, 16, 64, 8)
    assert spec.use_topk and spec.pooling == "last" and spec.end_token_id == 128009
    assert spec.llama_config["num_key_value_heads"] == 1 and spec.llama_config["intermediate_size"] == 32


@pytest.mark.parametrize("which", ["topk", "dense"])
def test_scores_text_in_both_modes(which, tiny_topk, tiny_dense):
    rm = SARMRewardModel.load(str(tiny_topk if which == "topk" else tiny_dense), device="cpu")
    assert rm.use_topk == (which == "topk")
    out = rm.score(PROMPTS, RESPONSES, batch_size=2)
    assert out.rewards.shape == (3,) and out.latents.shape == (3, 96) and out.latents.dtype == torch.float32
    nonzero = (out.latents != 0).sum(-1)
    assert bool((nonzero <= 6).all()) if which == "topk" else bool((nonzero == 96).all())
    assert torch.allclose(out.rewards, out.latents @ rm.score_weight, atol=1e-5)
    one_by_one = rm.score(PROMPTS, RESPONSES, batch_size=1)  # padding must not change a score
    assert torch.allclose(out.rewards, one_by_one.rewards, atol=1e-4)


def test_pooled_token_is_the_end_of_turn_token(tiny_topk, tokenizer):
    rm = SARMRewardModel.load(str(tiny_topk), device="cpu")
    batch = rm.encode(PROMPTS, RESPONSES)
    last = batch.attention_mask.sum(-1) - 1
    assert bool((batch.input_ids[torch.arange(3), last] == tokenizer.eos_token_id).all())
    start = int(batch.response_start[0])
    assert tokenizer.decode(batch.input_ids[0, start:last[0]]) == RESPONSES[0]


def test_aggregate_pooling_sums_the_response_tokens(tiny_topk):
    rm = SARMRewardModel.load(str(tiny_topk), device="cpu", pooling="aggregate")
    batch = rm.encode(PROMPTS[:2], RESPONSES[:2])
    out = rm(batch.input_ids, batch.attention_mask, batch.response_start)
    hidden = rm.residual_stream(batch.input_ids, batch.attention_mask)
    for i in range(2):
        last = int(batch.attention_mask[i].sum()) - 1
        by_hand = rm.features(hidden[i, int(batch.response_start[i]):last + 1]).sum(0)
        assert torch.allclose(out.latents[i], by_hand, atol=1e-5)


@pytest.mark.parametrize("which", ["dense", "topk"])
def test_clamping_changes_the_score_by_exactly_w_times_the_change(which, tiny_topk, tiny_dense):
    rm = SARMRewardModel.load(str(tiny_dense if which == "dense" else tiny_topk), device="cpu")
    plain = rm.score(PROMPTS, RESPONSES)
    feature, value = 7, 3.25
    with rm.controlled(LatentControl(clamp={feature: value})):
        clamped = rm.score(PROMPTS, RESPONSES)
    w = rm.score_weight[feature]
    assert torch.allclose(clamped.rewards - plain.rewards, w * (value - plain.latents[:, feature]), atol=1e-5)
    assert torch.equal(clamped.latents, plain.latents)  # z comes back uncontrolled
    assert torch.allclose(clamped.rewards_uncontrolled, plain.rewards)
    assert torch.equal(rm.score(PROMPTS, RESPONSES).rewards, plain.rewards)  # the control ended with the block
    cap = torch.quantile(plain.latents[:, feature], 0.5).item()
    capped = rm.score(PROMPTS, RESPONSES, control=LatentControl(cap={feature: cap}))
    change = w * (plain.latents[:, feature].clamp(max=cap) - plain.latents[:, feature])
    assert torch.allclose(capped.rewards - plain.rewards, change, atol=1e-5)


def test_feature_ids_beyond_the_latent_size_are_one_line(tiny_topk):
    rm = SARMRewardModel.load(str(tiny_topk), device="cpu")
    with pytest.raises(UserError, match=r"outside the SARM's 96 latents") as err:
        with rm.controlled(LatentControl(clamp={96: 0.0})):
            pass
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="2 feature ids but 3 values"):
        LatentControl.from_lists([1, 2], [0.0, 1.0, 2.0])


def _rewrite(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("sae.encoder.weight"), r"missing tensor 'sae\.encoder\.weight'"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    (lambda t: t.update({"sae.decoder.weight": torch.zeros(16, 63)}), r"'sae\.decoder\.weight' has shape \[16, 63\], expected \[16, 64\]"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(16, 15)}), r"'model\.layers\.0\.self_attn\.o_proj\.weight' has shape"),
    (lambda t: t.update({"score.weight": torch.zeros(2, 64)}), r"'score\.weight' has shape \[2, 64\], expected \[1, latent\]"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.0.")], r"decoder layer 0 is missing"),
])
def test_malformed_folders_are_one_clear_line(authors_folder, tmp_path, edit, message):
    folder = tmp_path / "broken"
    shutil.copytree(authors_folder, folder)
    _rewrite(folder, edit)
    with pytest.raises(UserError, match=message) as err:
        SARMRewardModel.load(str(folder), device="cpu")
    assert "\n" not in str(err.value)


def test_missing_folder_parts_and_sources(tmp_path, authors_folder):
    with pytest.raises(UserError, match="holds no config.json"):
        inspect_sarm_folder(tmp_path)
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(authors_folder / "config.json", folder / "config.json")
    with pytest.raises(UserError, match="holds no .safetensors"):
        inspect_sarm_folder(folder)
    with pytest.raises(UserError, match="does not exist"):
        SARMRewardModel.load(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(UserError, match="could not fetch SARM 'nobody/no-such-sarm'"):
        SARMRewardModel.load("nobody/no-such-sarm", device="cpu")  # HF_HUB_OFFLINE=1 in tests


def test_topk_without_k_asks_for_it(authors_folder, tmp_path):
    folder = tmp_path / "nok"
    shutil.copytree(authors_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["sarm_param"]["sae_k"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no sae_k"):
        SARMRewardModel.load(str(folder), device="cpu")
    assert SARMRewardModel.load(str(folder), device="cpu", k=8).spec.k == 8
    assert not SARMRewardModel.load(str(folder), device="cpu", score_mode="dense").use_topk


def test_embedded_names_and_files_as_sources(tmp_path):
    from modules.sarm.sources import resolve_sarm_source

    with pytest.raises(UserError, match="unknown embedded SARM 'nope': known ones are sarm-smollm2"):
        resolve_sarm_source("embedded:nope")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(UserError, match="is a file: point at a SARM folder"):
        resolve_sarm_source(str(file))
