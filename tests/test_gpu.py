"""On a CUDA GPU: bf16 frozen model, fp32 trainable state, training through Lightning (pytest -m gpu).

The rest of the suite also runs on a GPU machine (Lightning's ``accelerator="auto"`` picks it up);
these tests check what only a GPU shows.
"""

import lightning as L
import pytest
import torch

from datamodules.prompts import encode_prompts
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector, decoder_layers
from tests.helpers import fit, tiny_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_model_with_fp32_vector(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, dtype="auto", device="cuda")
    assert model.dtype == torch.bfloat16  # auto = bf16 on a GPU
    batch = encode_prompts(tokenizer, ["Is the sky green?", "Hi"]).to("cuda")
    site = decoder_layers(model)[1].post_attention_layernorm
    seen = {}
    with torch.no_grad():
        handle = site.register_forward_hook(lambda m, i, o: seen.__setitem__("base", o.clone()))
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        handle.remove()
    vector = SteeringVector(model.config.hidden_size, init_std=0.5).cuda()
    assert vector.v.dtype == torch.float32
    Steering(model, vector, 1)
    handle = site.register_forward_hook(lambda m, i, o: seen.__setitem__("steered", o))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    handle.remove()
    expected = seen["base"] + (vector.alpha * vector.v).to(torch.bfloat16)
    assert torch.equal(seen["steered"].detach(), expected)
    logits.float().sum().backward()
    assert vector.v.grad is not None and vector.v.grad.dtype == torch.float32


class Placement(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen = (module.steering_vector.v.device.type, module.steering_vector.v.dtype,
                     next(module.policy.parameters()).device.type, module.policy.dtype)


def test_training_runs_on_the_gpu(tiny_llama_dir, tmp_path):
    module = tiny_module(tiny_llama_dir, dtype="bfloat16", total_updates=3)
    before = module.steering_vector.v.detach().clone()
    placement = Placement()
    trainer = fit(module, tmp_path, [placement])
    assert trainer.global_step == 3
    assert placement.seen == ("cuda", torch.float32, "cuda", torch.bfloat16)
    assert not torch.equal(module.steering_vector.v.detach().cpu(), before)
