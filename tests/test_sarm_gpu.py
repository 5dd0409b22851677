"""SARM on a GPU (``pytest -m gpu``; also ``python tests/test_sarm_gpu.py`` where pytest is absent):
the authors' tiny SARM in fp32 and bf16, and a SARM-4B-shaped model's memory and time per batch."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.sarm.model import SARMRewardModel  # noqa: E402
from modules.sarm.random_sarm import LLAMA_31_8B, random_sarm_model  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "sarm_authors_tiny"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _authors_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="authors_sarm_"))
    shutil.copy(FIXTURE / "config.json", folder / "config.json")
    with gzip.open(FIXTURE / "model.safetensors.gz") as src, open(folder / "model.safetensors", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder


def test_authors_tiny_sarm_on_the_gpu():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    folder = _authors_folder()
    ids, mask = torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"])
    start = torch.tensor(expected["response_start"])
    for mode in ("topk_last", "dense_last", "topk_aggregate", "dense_aggregate"):
        score_mode, pooling = mode.split("_")
        want = torch.tensor(expected["scores"][mode])
        fp32 = SARMRewardModel.load(str(folder), dtype="float32", device="cuda", score_mode=score_mode, pooling=pooling)
        out = fp32(ids, mask, start)
        assert torch.allclose(out.rewards.cpu(), want, atol=1e-3), (mode, out.rewards, want)
        bf16 = SARMRewardModel.load(str(folder), device="cuda", score_mode=score_mode, pooling=pooling)  # auto: bf16
        low = bf16(ids, mask, start)
        assert low.latents.dtype == torch.bfloat16 and low.rewards.dtype == torch.float32
        print(f"{mode}: fp32 max |diff| {float((out.rewards.cpu() - want).abs().max()):.2e}, "
              f"bf16 max |diff| {float((low.rewards.cpu() - want).abs().max()):.3f} (scores up to {float(want.abs().max()):.1f})")
    shutil.rmtree(folder)


def test_sarm_4b_shaped_memory_and_time():
    torch.cuda.reset_peak_memory_stats()
    rm = random_sarm_model(LLAMA_31_8B, source_layer=16, latent_size=65536, k=192, device="cuda")
    weights = torch.cuda.memory_allocated() / 2**30
    params = sum(p.numel() for p in rm.parameters()) / 1e9
    batch, length, response = 8, 1024, 512
    ids = torch.randint(0, 128000, (batch, length), device="cuda")
    ids[:, -1] = 128009
    mask = torch.ones_like(ids)
    start = torch.full((batch,), length - response, device="cuda")
    for pooling in ("last", "aggregate"):
        rm.pooling = pooling
        rm(ids, mask, start)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        out = rm(ids, mask, start)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated() / 2**30
        assert out.latents.shape == (batch, 65536) and torch.isfinite(out.rewards).all()
        print(f"SARM-4B shape ({params:.2f} B parameters, bf16 weights {weights:.1f} GiB), {pooling} pooling: "
              f"{batch} x {length} tokens in {seconds * 1000:.0f} ms, peak {peak:.1f} GiB")
        assert peak < 24


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    test_authors_tiny_sarm_on_the_gpu()
    test_sarm_4b_shaped_memory_and_time()
