"""SARM folders with random weights in the released layout: for tests and for memory/speed checks.

    write_random_sarm(folder, hidden_size=64, layers=2, latent_size=128, k=8, tokenizer=tok)

Weights are drawn so that scores are of order 1 (not the near-zero values of a 0.02-std
initialisation), so comparisons at a tolerance mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modules.sarm.checkpoint import write_sarm_folder


def random_sarm_tensors(llama_config: dict, layers: int, latent_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig.from_dict({**llama_config, "num_hidden_layers": layers})
    with torch.device("meta"):
        shapes = {f"model.{k}": v.shape for k, v in LlamaModel(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensors[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key == "model.embed_tokens.weight":
            tensors[key] = torch.randn(shape, generator=g)
        else:
            tensors[key] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    tensors["sae.pre_bias"] = 0.1 * torch.randn(hidden, generator=g)
    tensors["sae.latent_bias"] = 0.1 * torch.randn(latent_size, generator=g)
    tensors["sae.encoder.weight"] = torch.randn(latent_size, hidden, generator=g) / hidden ** 0.5
    tensors["sae.decoder.weight"] = torch.randn(hidden, latent_size, generator=g) / latent_size ** 0.5
    tensors["score.weight"] = torch.randn(1, latent_size, generator=g)
    return tensors


def write_random_sarm(folder: str | Path, hidden_size: int = 64, layers: int = 2, latent_size: int = 128, k: int = 8,
                      heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None, vocab_size: int | None = None,
                      tokenizer=None, use_topk: bool = True, pooling: str = "last", end_token_id: int | None = None,
                      config_layers: int | None = None, seed: int = 0) -> Path:
    """A random SARM folder; with ``tokenizer`` its vocabulary, chat template and end-of-turn token."""
    vocab = vocab_size or (len(tokenizer) if tokenizer is not None else 512)
    if end_token_id is None:
        end_token_id = tokenizer.eos_token_id if tokenizer is not None else vocab - 1
    llama_config = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                        num_hidden_layers=config_layers or 2 * layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, head_dim=hidden_size // heads, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                        eos_token_id=end_token_id, pad_token_id=getattr(tokenizer, "pad_token_id", None))
    sarm_param = {"sae_latent_size": latent_size, "sae_k": k, "sae_use_sequence_level": False,
                  "sarm_use_activation": use_topk, "pooling": pooling, "eot_token_id": int(end_token_id)}
    tensors = random_sarm_tensors(llama_config, layers, latent_size, seed)
    return write_sarm_folder(folder, llama_config, sarm_param, tensors, tokenizer)


def random_sarm_model(llama_config: dict, source_layer: int, latent_size: int, k: int,
                      dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", use_topk: bool = True,
                      pooling: str = "last", end_token_id: int = 128009, tokenizer=None, seed: int = 0):
    """A SARM with random weights built directly on ``device`` (no folder): memory and speed checks
    at full size, e.g. ``LLAMA_31_8B`` with ``source_layer=16, latent_size=65536, k=192`` (SARM-4B)."""
    from pathlib import Path as _Path

    from torch import nn
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from modules.sarm.checkpoint import SARMSpec
    from modules.sarm.model import SARMRewardModel
    from modules.sarm.sae import TopKSAE

    config = LlamaConfig.from_dict({**llama_config, "num_hidden_layers": source_layer})
    torch.manual_seed(seed)
    with torch.device(device):
        backbone = LlamaModel(config).to(dtype)
        sae = TopKSAE(config.hidden_size, latent_size, k).to(dtype)
        score = nn.Linear(latent_size, 1, bias=False).to(dtype)
        with torch.no_grad():
            for p in (sae.encoder.weight, sae.decoder.weight):
                p.normal_(0, p.shape[1] ** -0.5)
            score.weight.normal_(0, 1)
    backbone.norm = nn.Identity()
    backbone.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    spec = SARMSpec(_Path("<random>"), config.to_dict(), source_layer, config.hidden_size, latent_size, k, use_topk,
                    pooling, end_token_id, {"sae_latent_size": latent_size, "sae_k": k})
    return SARMRewardModel(spec, backbone, sae, score, tokenizer)


LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128009,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"})
"""The shapes of Llama-3.1-8B-Instruct, whose first 16 layers are SARM-4B's backbone."""
