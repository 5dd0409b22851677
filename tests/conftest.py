"""Shared fixtures: the embedded SmolLM2 and tiny random Llama/Qwen models saved to temporary folders.

Tiny models use SmolLM2's tokenizer (vocab 49,152) so that chat templates and stop tokens are real.
No test downloads anything: HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

from modules.models import embedded


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted embedded model (converted once per cache; ~30 s the first time)."""
    return embedded.cached_folder("smollm2")


def _tiny(kind: str, tokenizer_dir, out_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tokenizer_dir():
    """SmolLM2's tokenizer (RLI_TEST_TOKENIZER names a folder holding one where the package is absent)."""
    return os.environ.get("RLI_TEST_TOKENIZER") or embedded.cached_folder("smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir, tmp_path_factory):
    return _tiny("llama", tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tokenizer_dir, tmp_path_factory):
    return _tiny("qwen", tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(params=["llama", "qwen"])
def tiny_model_dir(request, tiny_llama_dir, tiny_qwen_dir):
    return {"llama": tiny_llama_dir, "qwen": tiny_qwen_dir}[request.param]


@pytest.fixture(scope="session")
def learning_runs(request, tmp_path_factory):
    """The learning tests' runs (``@pytest.mark.learning_run(TARGET, minutes=M)``) in background
    processes, several at once, longest first (:mod:`tests.background`)."""
    from tests.background import MARKER, BackgroundRuns

    marks = {}
    for item in request.session.items:
        for marker in item.iter_markers(MARKER):
            marks.setdefault(marker.args[0], marker.kwargs.get("minutes", 1.0))
    runs = BackgroundRuns(sorted(marks, key=marks.get, reverse=True), tmp_path_factory.mktemp("learning_runs"))
    yield runs
    runs.stop()

