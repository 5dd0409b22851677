"""Exports of a steering vector: llama.cpp GGUF control vectors and steering-vectors files.

The layer mapping is checked on a tiny random Llama: llama.cpp's rule (``direction.N`` added to the
output of block ``N``, modules/models/export.py) emulated with a plain forward hook must give the
logits of our ``layer_output`` steering at the exported layer, and the off-by-one reading must not.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from modules.errors import UserError
from modules.models.export import export_command, read_exportable
from modules.models.interventions import decoder_layers
from modules.models.steering import Steering, SteeringVector
from modules.models.steering_io import save_steering_vector

HIDDEN = 64  # tests/conftest.py's tiny models


def vector_file(tmp_path, base_model, layer=2, point="layer_output", positions="all", alpha=1.5, seed=0, name="v.pt"):
    """A vector file as a run writes it; returns (path, alpha * v)."""
    torch.manual_seed(seed)
    v = torch.randn(HIDDEN)
    vector = SteeringVector(HIDDEN).load_(v, torch.tensor(alpha))
    path = save_steering_vector(tmp_path / name, vector, {"base_model": base_model, "hook_layer": layer,
                                                          "hook_point": point, "steer_positions": positions,
                                                          "steer_last_k": 1, "step": 7})
    return path, alpha * v


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_qwen(tiny_qwen_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()


def read_gguf(path) -> tuple[dict, dict]:
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def export(*argv) -> None:
    export_command([str(a) for a in argv])


# -- GGUF --------------------------------------------------------------------------------------------
def test_gguf_holds_alpha_times_v_at_the_layer_with_llama_cpp_metadata(tiny_llama_dir, tmp_path, capsys):
    path, delta = vector_file(tmp_path, tiny_llama_dir, layer=2, alpha=1.5)
    export("--vector", path, "--format", "gguf", "--out", tmp_path / "out" / "v.gguf")
    fields, tensors = read_gguf(tmp_path / "out" / "v.gguf")
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"  # the tiny model's config.json model_type
    assert fields["controlvector.layer_count"] == 1
    assert fields["rl_insides.hook_layer"] == 2 and fields["rl_insides.hook_point"] == "layer_output"
    assert fields["rl_insides.step"] == 7
    assert list(tensors) == ["direction.2"]
    tensor = tensors["direction.2"]
    assert tensor.tensor_type == GGMLQuantizationType.F32 and list(tensor.shape) == [HIDDEN]
    assert torch.equal(torch.from_numpy(tensor.data.copy()), delta)  # alpha folded in, bit for bit
    assert "direction.2" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob(".*.partial"))


def test_gguf_model_hint_can_be_given_and_is_required_when_the_config_is_not_here(tmp_path):
    path, _ = vector_file(tmp_path, "nobody/not-a-cached-model")
    with pytest.raises(UserError, match="--model_hint"):
        export("--vector", path, "--format", "gguf", "--out", tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    export("--vector", path, "--format", "gguf", "--out", tmp_path / "v.gguf", "--model_hint", "qwen2")
    assert read_gguf(tmp_path / "v.gguf")[0]["controlvector.model_hint"] == "qwen2"


@pytest.mark.parametrize("point", ["post_attn_norm", "pre_attn_norm"])
def test_gguf_refuses_a_vector_added_after_a_norm(tiny_llama_dir, tmp_path, point):
    path, _ = vector_file(tmp_path, tiny_llama_dir, point=point)
    with pytest.raises(UserError, match="hook_point: layer_output") as err:
        export("--vector", path, "--format", "gguf", "--out", tmp_path / "v.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "v.gguf").exists()


def test_gguf_refuses_layer_zero(tiny_llama_dir, tmp_path):
    path, _ = vector_file(tmp_path, tiny_llama_dir, layer=0)
    with pytest.raises(UserError, match="hook_layer 0 cannot be a llama.cpp control vector"):
        export("--vector", path, "--format", "gguf", "--out", tmp_path / "v.gguf")


@pytest.mark.parametrize("fmt", ["gguf", "steering-vectors"])
def test_positions_other_than_all_are_refused_unless_forced(tiny_llama_dir, tmp_path, fmt, capsys):
    path, delta = vector_file(tmp_path, tiny_llama_dir, positions="response")
    out = tmp_path / "v.out"
    with pytest.raises(UserError, match="steer_positions: response.*--force true"):
        export("--vector", path, "--format", fmt, "--out", out)
    assert not out.exists()
    export("--vector", path, "--format", fmt, "--out", out, "--force", "true")
    assert out.is_file() and "warning:" in capsys.readouterr().err


def test_bad_input_is_one_line(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export("--vector", tmp_path / "missing.pt", "--format", "gguf", "--out", tmp_path / "v.gguf")
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        export("--vector", tmp_path / "sharded.ckpt", "--format", "gguf", "--out", tmp_path / "v.gguf")
    path, _ = vector_file(tmp_path, tiny_llama_dir)
    with pytest.raises(UserError, match="unknown format 'onnx': use one of gguf, steering-vectors"):
        export("--vector", path, "--format", "onnx", "--out", tmp_path / "v.gguf")
    (tmp_path / "junk.pt").write_bytes(b"not a vector")
    with pytest.raises(UserError, match="not a readable steering vector file"):
        export("--vector", tmp_path / "junk.pt", "--format", "gguf", "--out", tmp_path / "v.gguf")
    torch.save({"state_dict": {"lora.weight": torch.zeros(1)}, "on_policy": {"method": "PPO"}}, tmp_path / "p.ckpt")
    with pytest.raises(UserError, match=r"holds no steering vector \(written by PPO\)"):
        export("--vector", tmp_path / "p.ckpt", "--format", "gguf", "--out", tmp_path / "v.gguf")


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def _add_at_block_output(model, block: int, direction: torch.Tensor):
    """llama.cpp's ``build_cvec(cur, il)``: ``direction`` added to the output of block ``il`` (the
    residual stream after it), every position."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + direction, *output[1:])
        return output + direction
    return decoder_layers(model)[block].register_forward_hook(hook)


@pytest.mark.parametrize("layer", [1, 3])
def test_llama_cpp_rule_on_the_exported_file_equals_our_layer_output_hook(tiny_llama_dir, tiny_llama, tmp_path, layer):
    model = tiny_llama
    path, delta = vector_file(tmp_path, tiny_llama_dir, layer=layer, alpha=0.7, seed=layer)
    export("--vector", path, "--format", "gguf", "--out", tmp_path / "v.gguf")
    (name, tensor), = read_gguf(tmp_path / "v.gguf")[1].items()
    n = int(name.split(".")[1])
    direction = torch.from_numpy(tensor.data.copy())
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))

    base = _logits(model, ids)
    steering = Steering(model, SteeringVector(HIDDEN).load_(read_exportable(path).delta, torch.tensor(1.0)),
                        layer, "layer_output")
    ours = _logits(model, ids)
    steering.remove()
    handle = _add_at_block_output(model, n, direction)
    theirs = _logits(model, ids)
    handle.remove()
    handle = _add_at_block_output(model, n - 1, direction)  # the off-by-one reading of direction.N
    shifted = _logits(model, ids)
    handle.remove()

    assert (ours - base).abs().max() > 1e-3  # the vector does something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert (shifted - ours).abs().max() > 1e-3


# -- steering-vectors -----------------------------------------------------------------------------
_SV_SUFFIX = {"decoder_block": "", "input_layernorm": ".input_layernorm",
              "post_attention_layernorm": ".post_attention_layernorm"}


def _patch_like_steering_vectors(model, layer_activations: dict, layer_type: str) -> list:
    """The steering-vectors package's rule (steering_vector.py, layer_matching.py): add
    ``layer_activations[i]`` to the output of the ``i``-th module of the guessed pattern
    (``model.layers.{num}`` + the layer type's suffix for HF Llama/Qwen), at every token."""
    modules = dict(model.named_modules())
    handles = []
    for index, activation in layer_activations.items():
        module = modules[f"model.layers.{index}{_SV_SUFFIX[layer_type]}"]
        def hook(m, args, output, activation=activation):
            if isinstance(output, tuple):
                return (output[0] + activation.reshape(1, 1, -1), *output[1:])
            return output + activation.reshape(1, 1, -1)
        handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("point", ["layer_output", "pre_attn_norm", "post_attn_norm"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_steering_vectors_file_round_trips_and_patches_our_site(tiny_qwen_dir, tiny_qwen, tmp_path, point, suffix):
    path, delta = vector_file(tmp_path, tiny_qwen_dir, layer=2, point=point, alpha=-2.0)
    out = tmp_path / f"sv{suffix}"
    export("--vector", path, "--format", "steering-vectors", "--out", out)
    if suffix == ".pt":
        payload = torch.load(out, weights_only=True)
        assert set(payload) == {"layer_activations", "layer_type"}  # SteeringVector(**payload)
        activations, layer_type = payload["layer_activations"], payload["layer_type"]
    else:
        from safetensors import safe_open

        with safe_open(out, "pt") as file:
            activations = {int(k): file.get_tensor(k) for k in file.keys()}
            layer_type = file.metadata()["layer_type"]
            assert file.metadata()["hook_point"] == point and file.metadata()["base_model"] == tiny_qwen_dir
    assert layer_type == {"layer_output": "decoder_block", "pre_attn_norm": "input_layernorm",
                          "post_attn_norm": "post_attention_layernorm"}[point]
    assert list(activations) == [2] and torch.equal(activations[2], delta)

    model = tiny_qwen
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(2))
    steering = Steering(model, SteeringVector(HIDDEN).load_(delta, torch.tensor(1.0)), 2, point)
    ours = _logits(model, ids)
    steering.remove()
    handles = _patch_like_steering_vectors(model, activations, layer_type)
    theirs = _logits(model, ids)
    for handle in handles:
        handle.remove()
    assert (ours - _logits(model, ids)).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("point", ["layer_output", "post_attn_norm"])
def test_the_steering_vectors_package_itself_when_installed(tiny_llama_dir, tiny_llama, tmp_path, point):
    """Runs where the package is importable (not a dependency: PYTHONPATH=<a --target folder>)."""
    steering_vectors = pytest.importorskip("steering_vectors")

    path, delta = vector_file(tmp_path, tiny_llama_dir, layer=1, point=point)
    export("--vector", path, "--format", "steering-vectors", "--out", tmp_path / "sv.pt")
    vector = steering_vectors.SteeringVector(**torch.load(tmp_path / "sv.pt", weights_only=True))
    model = tiny_llama
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    steering = Steering(model, SteeringVector(HIDDEN).load_(delta, torch.tensor(1.0)), 1, point)
    ours = _logits(model, ids)
    steering.remove()
    with vector.apply(model):
        theirs = _logits(model, ids)
    assert (ours - _logits(model, ids)).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


# -- checkpoints -------------------------------------------------------------------------------------
def test_a_training_checkpoint_exports_the_same_vector_as_the_runs_vector_file(tiny_llama_dir, tmp_path):
    from callbacks.checkpoints import EvenlySpacedCheckpoint
    from tests.helpers import fit, tiny_module

    module = tiny_module(tiny_llama_dir, hook_point="layer_output", hook_layer=1, total_updates=1, alpha_init=0.5)
    fit(module, tmp_path, callbacks=[EvenlySpacedCheckpoint(num_checkpoints=1)])
    ckpt, pt = tmp_path / "checkpoints" / "update000001.ckpt", tmp_path / "vectors" / "update000001.pt"
    from_ckpt, from_pt = read_exportable(ckpt), read_exportable(pt)
    assert torch.equal(from_ckpt.delta, from_pt.delta) and from_ckpt.delta.abs().sum() > 0
    assert (from_ckpt.hook_layer, from_ckpt.hook_point, from_ckpt.step) == (1, "layer_output", 1)
    assert from_ckpt.base_model == tiny_llama_dir
    assert torch.equal(read_exportable(tmp_path).delta, from_pt.delta)  # a run folder: its steering_vector.pt
    export("--vector", ckpt, "--format", "gguf", "--out", tmp_path / "c.gguf")
    (name, tensor), = read_gguf(tmp_path / "c.gguf")[1].items()
    assert name == "direction.1" and torch.equal(torch.from_numpy(tensor.data.copy()), from_pt.delta)
