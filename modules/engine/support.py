"""What the rollout engine can run, found by looking at a model before each rollout.

The engine runs its own decode loop over the model's own modules (their weights read in place), so
it must know everything that can change a forward pass:

- the architecture: Llama-style decoder layers (Llama, Mistral, Qwen2, Qwen3) with plain or LoRA
  (peft, unmerged or merged) linear layers, rotary embeddings of a static kind, no sliding window;
- every forward hook on the model: the project's interventions (the protocol of
  :mod:`modules.models.interventions`: a :class:`SteeringIntervention` such as ``Steering``, an
  :class:`InjectionIntervention` such as ``ActivationInjection``) are run by the engine's step through
  their own methods; any other hook means the engine cannot promise the same logits, so the rollout
  falls back to HF ``generate``;
- FSDP2 (``fully_shard``): its own hooks only move weights, so the engine runs a sharded model
  while its weights are gathered whole (``modules.sharding.gathered``, which the loop wraps every
  rollout in) and refuses while they are shards.

Anything else raises :class:`Unsupported` with one line that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch
from torch import nn

from modules.models.interventions import InjectionIntervention, SteeringIntervention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "llama3", "linear")
HARMLESS_HOOKS = ("make_inputs_require_grads",)
"""Hooks that change nothing under ``no_grad`` (transformers' input-grad hook for checkpointing)."""


class Unsupported(Exception):
    """The engine cannot run this model or intervention as it is now; HF generate can."""


@dataclass
class DecoderParts:
    """The modules one decode step reads (the model's own, so weights are read in place)."""

    config: object
    embed: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    """Qwen3: RMSNorm over the head dim of queries and keys before the rotary embedding."""
    silu: bool
    """The MLP's activation is SiLU (the fused decode kernels assume it)."""


@dataclass
class Interventions:
    """The project's interventions found on a model (see :func:`find_interventions`)."""

    steering: list[SteeringIntervention] = field(default_factory=list)
    injection: list[InjectionIntervention] = field(default_factory=list)


def _linear_ok(module: nn.Module) -> bool:
    """A plain or frozen 4-bit linear, an embedding, or a peft LoRA layer over one of them."""
    from modules.engine.quantized import is_4bit_linear

    if type(module) in (nn.Linear, nn.Embedding) or is_4bit_linear(module):
        return True
    try:
        from peft.tuners.lora.layer import Embedding as LoraEmbedding
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if type(module) in (LoraLinear, LoraEmbedding):
        base = module.base_layer
        return (type(base) in (nn.Linear, nn.Embedding) or is_4bit_linear(base)) and not module.lora_variant
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # pragma: no cover - peft's bitsandbytes layers need bitsandbytes
        return False
    return type(module) is LoraLinear4bit and is_4bit_linear(module.base_layer) and not module.lora_variant


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The decoder's modules, or :class:`Unsupported` with the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Unsupported(f"architecture '{model_type}' (the engine runs {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise Unsupported("a model spread over several devices")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or lm_head is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
        raise Unsupported(f"{type(model).__name__} does not expose decoder layers, rotary embedding and lm_head")
    rope_type = getattr(decoder.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise Unsupported(f"rotary embedding of type '{rope_type}'")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types or (
            model_type == "mistral" and getattr(config, "sliding_window", None)):
        raise Unsupported("sliding-window attention")
    layers = list(decoder.layers)
    first = layers[0].self_attn
    qk_norm = hasattr(first, "q_norm")
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if not _linear_ok(proj):
                raise Unsupported(f"a projection of type {type(proj).__name__} (plain, 4-bit or LoRA Linear only)")
        if getattr(attn, "sliding_window", None):
            raise Unsupported("sliding-window attention")
    if not _linear_ok(lm_head) or not _linear_ok(decoder.embed_tokens):
        raise Unsupported("embeddings or lm_head of an unsupported type")
    head_dim = first.head_dim
    num_heads = config.num_attention_heads
    num_kv_heads = config.num_key_value_heads
    act = getattr(config, "hidden_act", "silu")
    return DecoderParts(config, decoder.embed_tokens, layers, decoder.norm, decoder.rotary_emb, lm_head, num_heads,
                        num_kv_heads, head_dim, qk_norm, act == "silu")


@cache
def _fsdp_classes() -> tuple[type, type] | None:
    """FSDP2's module class and DTensor, or None where torch has no torch.distributed."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without torch.distributed
        return None
    return FSDPModule, DTensor


def fsdp_managed(model: nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP2 (``fully_shard``)."""
    classes = _fsdp_classes()
    return classes is not None and any(isinstance(m, classes[0]) for m in model.modules())


def _fsdp_hook(module: nn.Module, hook) -> bool:
    """One of FSDP2's own forward hooks (they gather and free the module's weights, nothing else)."""
    classes = _fsdp_classes()
    return (classes is not None and isinstance(module, classes[0])
            and type(getattr(hook, "__self__", None)).__name__ == "FSDPState")


def _sharded(module: nn.Module) -> bool:
    classes = _fsdp_classes()
    return classes is not None and any(isinstance(p, classes[1]) for p in module.parameters())


def _hooks(module: nn.Module):
    for name in ("_forward_hooks", "_forward_pre_hooks"):
        yield from getattr(module, name, {}).values()


def find_interventions(model: nn.Module) -> Interventions:
    """The project's interventions registered on ``model``; :class:`Unsupported` for any other hook."""
    found = Interventions()
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise Unsupported("a global forward hook is registered")
    for name, module in model.named_modules():
        if hasattr(module, "_hf_hook"):
            raise Unsupported(f"an accelerate hook on '{name}' (device_map offloading)")
        for hook in _hooks(module):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, SteeringIntervention):
                if owner not in found.steering:
                    found.steering.append(owner)
            elif isinstance(owner, InjectionIntervention):
                if owner not in found.injection:
                    found.injection.append(owner)
            elif _fsdp_hook(module, hook):
                if _sharded(module):
                    raise Unsupported(f"'{name or 'model'}' holds FSDP2 shards (the loop gathers them whole "
                                      "around rollouts: modules.sharding.gathered)")
            elif getattr(hook, "__name__", "") not in HARMLESS_HOOKS:
                raise Unsupported(f"an unknown forward hook {getattr(hook, '__qualname__', hook)!r} on '{name or 'model'}'")
    for steering in found.steering:
        if getattr(steering, "record_site_norm", False):
            raise Unsupported("the steering hook is recording the site norm")
    return found


def adapter_state(model: nn.Module) -> tuple:
    """What decides a LoRA layer's forward (active adapters, switched off, merged, scaling)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return ()
    state = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            state.append((tuple(module.active_adapters), bool(module.disable_adapters), bool(module.merged),
                          tuple(sorted(getattr(module, "scaling", {}).items()))))
    return tuple(state)


def storage_fingerprint(model: nn.Module, extra: list[torch.Tensor]) -> tuple:
    """Where every parameter and buffer lives: a captured step reads these addresses, so a move
    (``.to()``, a reload) must trigger a new capture."""
    tensors = [t for t in model.parameters()] + [t for t in model.buffers()] + extra
    return tuple((t.data_ptr(), t.dtype, t.device) for t in tensors)


SAMPLING_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
                    "min_length": 0, "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                    "eta_cutoff": 0.0, "min_p": None, "exponential_decay_length_penalty": None,
                    "renormalize_logits": False, "watermarking_config": None}
"""Generation-config settings that make HF generate draw from something else than temperature + top-p
(``rollout`` passes ``top_k=0`` itself); any other value sends the rollout to HF generate."""


def sampling_conflicts(model: nn.Module) -> list[str]:
    """The model's generation-config settings that change how HF generate samples."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    conflicts = []
    for name, neutral in SAMPLING_NEUTRAL.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral and not (isinstance(value, (list, dict)) and not value):
            conflicts.append(name)
    return conflicts


def any_dropout_active(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in model.modules())
