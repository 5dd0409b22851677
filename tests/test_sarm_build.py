"""The embedded-SARM recipe in miniature (tiny random backbone, a dozen pairs, a tiny SAE): it writes
a folder the loader reads, reports its figures, and caches builds by their options."""

from __future__ import annotations

import json

import pytest
import torch

from modules.errors import UserError
from modules.sarm.embedded import BuildOptions, build_cached, build_embedded_sarm, cache_folder_for
from modules.sarm.model import SARMRewardModel
from modules.sarm.sae import TopKSAE, fraction_variance_explained, standardise, train_topk_sae

CLAIMS = ["The Moon is made of cheese", "Bats are blind", "Lightning never strikes twice", "Goldfish forget in 3 s",
          "We use 10% of our brains", "Cracking knuckles causes arthritis", "Sugar makes kids hyper",
          "Bulls hate red", "Glass is a liquid", "Shaving makes hair thicker", "Humans have five senses",
          "Chameleons change colour to hide", "The Great Wall is visible from space", "Bananas grow on trees"]


def write_pairs(path, claims):
    rows = [{"prompt": f"{c}. Right?", "chosen": f"Actually, no. {c} is a myth.",
             "rejected": f"Yes, you're absolutely right! {c}, well said."} for c in claims]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def mini_options(tmp_path, tiny_llama_dir) -> BuildOptions:
    return BuildOptions(base=tiny_llama_dir, source_layer=2, latent_size=64, k=4,
                        train_pairs=write_pairs(tmp_path / "train.jsonl", CLAIMS[:10]),
                        heldout_pairs=write_pairs(tmp_path / "heldout.jsonl", CLAIMS[10:]),
                        sae_steps=40, sae_batch_size=64, head_steps=60, head_l2=[1e-3, 1e-2], max_length=128)


@pytest.mark.parametrize("pooling", ["aggregate", "last"])
def test_miniature_build_writes_a_loadable_sarm(mini_options, tmp_path, pooling):
    mini_options.pooling = pooling
    report = build_embedded_sarm(mini_options, tmp_path / "sarm", progress=False)
    assert 0.0 <= report.heldout_pairwise_accuracy <= 1.0 and report.heldout_pairs == 4 and report.train_pairs == 10
    assert report.fraction_variance_explained <= 1.0 and 0 <= report.dead_latents <= 64
    assert report.train_pairwise_accuracy >= 0.8  # a linear head on 64 latents fits 10 pairs
    rm = SARMRewardModel.load(str(tmp_path / "sarm"), device="cpu")
    assert (rm.spec.source_layer, rm.latent_size, rm.spec.k, rm.use_topk, rm.pooling) == (2, 64, 4, True, pooling)
    assert rm.end_token_id == rm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = rm.score(["Bats are blind. Right?"] * 2, ["Actually, no. Bats are blind is a myth.", "Yes, you're absolutely right!"])
    assert out.latents.shape == (2, 64)
    if pooling == "last":  # one token's TopK latents; aggregated ones sum several tokens
        assert bool(((out.latents != 0).sum(-1) <= 4).all())
    saved = json.loads((tmp_path / "sarm" / "build_report.json").read_text())
    assert saved["heldout_pairwise_accuracy"] == report.heldout_pairwise_accuracy
    config = json.loads((tmp_path / "sarm" / "config.json").read_text())
    assert config["sarm_param"]["build"]["options"]["latent_size"] == 64


def test_builds_are_cached_by_their_options(mini_options, monkeypatch, tmp_path):
    monkeypatch.setenv("RLI_CACHE_DIR", str(tmp_path / "cache"))
    folder, built = build_cached(mini_options, progress=False)
    assert built and (folder / "config.json").is_file() and folder.parent == tmp_path / "cache"
    again, built_again = build_cached(mini_options, progress=False)
    assert again == folder and not built_again
    assert not any(p.name.startswith(folder.name + ".") for p in folder.parent.iterdir())  # no temporary left
    other = BuildOptions(**{**mini_options.__dict__, "k": 8})
    assert cache_folder_for(other) != folder


def test_build_refuses_too_few_pairs(mini_options, tmp_path):
    few = BuildOptions(**{**mini_options.__dict__, "train_pairs": write_pairs(tmp_path / "few.jsonl", CLAIMS[:3])})
    with pytest.raises(UserError, match="at least 5 training pairs"):
        build_embedded_sarm(few, tmp_path / "x", progress=False)


def test_topk_sae_trainer_learns_a_sparse_code():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, 16, generator=g)
    codes = torch.rand(3000, 24, generator=g) * (torch.rand(3000, 24, generator=g) < 0.1)
    x = standardise(codes @ atoms)
    sae, report = train_topk_sae(x[:2700], x[2700:], latent_size=48, k=4, steps=100, batch_size=128, lr=3e-3)
    assert isinstance(sae, TopKSAE) and report.fraction_variance_explained > 0.7
    fve, fired = fraction_variance_explained(sae, x[2700:])
    assert fve == pytest.approx(report.fraction_variance_explained) and fired.any()
