"""The rollout engine: a static KV cache, the decode step captured as CUDA graphs, sampling on the GPU.

One :class:`RolloutEngine` per model. ``generate`` runs the prompt pass eagerly (the injection and
the steering's position rule act there, as in HF ``generate``), then one decode step per new token.
On CUDA each decode step is a replay of a captured graph; the graphs read the model's weights, the
steering vector and the LoRA weights where they live, so an optimizer step needs no new capture.
A graph attends over the first ``L`` cache columns, ``L`` a multiple of :data:`KV_BUCKET`; one graph
per ``L`` is captured (once, before the first token is drawn, so a seed reproduces a rollout). The
samples of one prompt (equal neighbouring rows) share one prompt pass.

What makes a decode step cheap (each measured on an H200, ``benchmarks/RESULTS.md``): the q/k/v and
gate/up weights of a frozen base are views into one buffer per layer, one GEMM each, and a LoRA
adapter adds one more GEMM per group of projections (:mod:`modules.engine.fusion`; a 4-bit base is
de-quantized group by group into one shared buffer, :mod:`modules.engine.quantized`); the GEMMs are
captured with cuBLASLt, which reads the narrow o_proj and down_proj weights faster than cuBLAS's
default choice; the new key and value go into one cache
tensor with one copy; attention is two batched GEMMs around a fused softmax (the query heads that
share a key head are rows of one product; scores leave the GEMM in fp32), cheaper at a few hundred
keys than SDPA's kernels; the element-wise pieces are fused by ``torch.compile``.

Exact semantics kept from HF ``generate``: left-padded prompts (padding masked, position ids from
the attention mask), the same logits for the same tokens, temperature then top-p, a finished row
gets ``pad`` tokens, the loop ends when every row has stopped (checked every :data:`STOP_CHECK_EVERY`
steps; the returned tokens are cut where the last row stopped, as ``generate`` returns them).
Sampling draws with the exponential race instead of ``multinomial`` (the same distribution, other
random numbers: a seed reproduces the engine's rollout, not HF's).

Graphs are captured per setting: the batch size and cache capacity (a state, the last
:data:`MAX_STATES` kept), and within it the set of enabled interventions, the LoRA switches (adapter
on/off/reference), the sampling mode and the storage address of every weight (the last
:data:`MAX_GRAPH_SETS` kept, so alternating policy and reference rollouts replay what exists). A
finished row keeps its place in the batch (the decode step is bound by reading the weights once, so a
row costs little); only its KV reads remain. :meth:`RolloutEngine.release` frees caches and graphs.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from modules.engine.fusion import FusedLinear, fuse
from modules.engine.quantized import QuantizedGroup, ScratchPool, fuse_quantized
from modules.engine.kernels import EAGER_OPS, Ops, attention_scores, fused_ops, sample_tokens
from modules.engine.support import (DecoderParts, Interventions, Unsupported, adapter_state, any_dropout_active,
                                    decoder_parts, find_interventions, fsdp_managed, sampling_conflicts,
                                    storage_fingerprint)

log = logging.getLogger(__name__)

KV_BUCKET = 64
"""Cache columns are attended in blocks of this many (one captured graph per block count)."""
STOP_CHECK_EVERY = 8
"""Decode steps between two checks (a host sync) of whether every row has stopped."""
MAX_STATES = 2
"""Batch shapes whose cache and graphs are kept per model."""
MAX_GRAPH_SETS = 4
"""Settings (interventions, adapter switches, sampling mode) whose graphs are kept per batch shape."""


@dataclass
class EngineOutput:
    tokens: torch.Tensor
    """[B, R] sampled tokens (``pad`` after a row's stop token); R as HF ``generate`` returns it."""
    logits: torch.Tensor | None
    """[B, R, V] fp32 logits each token was drawn from (``keep_logits``; for tests)."""
    graphs: bool
    """Whether the decode steps ran as CUDA graph replays."""


@dataclass
class _State:
    """Buffers of one batch shape: the KV cache, the step's inputs and outputs, the graphs."""

    batch: int
    capacity: int
    max_new: int
    kv: torch.Tensor
    """[layers, 2, B, Hkv, capacity, D]: keys and values, written by one copy per layer and step."""
    tokens: torch.Tensor
    pos_ids: torch.Tensor
    cache_pos: torch.Tensor
    step: torch.Tensor
    valid: torch.Tensor
    columns: torch.Tensor
    done: torch.Tensor
    out: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    pad: torch.Tensor
    logits: torch.Tensor | None = None
    stops: torch.Tensor | None = None
    steer_first: list[torch.Tensor] = field(default_factory=list)
    graphs: dict = field(default_factory=dict)
    key: tuple | None = None
    sets: OrderedDict = field(default_factory=OrderedDict)
    """key -> (graphs, stops, steer_first): the captures of the last few settings (policy, reference, ...)."""
    pool: object = None


class LayerProjections(NamedTuple):
    """One decoder layer's fused projection groups (None: the layer's own modules run)."""

    qkv: FusedLinear | QuantizedGroup | None = None
    gate_up: FusedLinear | QuantizedGroup | None = None
    out: FusedLinear | QuantizedGroup | None = None
    """o_proj, fused only with its LoRA adapters or a 4-bit weight (a lone plain linear gains nothing)."""
    down: FusedLinear | QuantizedGroup | None = None


@dataclass
class _Plan:
    """The interventions that act in this call."""

    steering: list  # enabled SteeringIntervention objects (Steering)
    injection: list  # pending InjectionIntervention objects (ActivationInjection)
    greedy: bool
    use_top_p: bool
    projections: list[LayerProjections] = field(default_factory=list)
    """Per layer: its fused projection groups."""


def shared_prompt_rows(ids: torch.Tensor, mask: torch.Tensor, injections) -> tuple[torch.Tensor | None,
                                                                                    torch.Tensor | None]:
    """``(rows, source)`` for a prompt pass shared by runs of equal consecutive rows (same ids, mask
    and injection): ``rows`` [U] the first row of each run, ``source`` [B] the index into ``rows`` of
    each row's run; ``(None, None)`` when no two neighbours are equal."""
    same = (ids[1:] == ids[:-1]).all(-1) & (mask[1:] == mask[:-1]).all(-1)
    for injection in injections:
        injected_alike = injection.same_rows()
        same = same if injected_alike is None else same & injected_alike.to(same.device)
    if not bool(same.any()):
        return None, None
    starts = torch.cat([same.new_ones(1), ~same])
    return starts.nonzero().squeeze(-1), starts.long().cumsum(0) - 1


def _bucket(length: int) -> int:
    return -(-length // KV_BUCKET) * KV_BUCKET


class RolloutEngine:
    """Static-cache, graph-captured generation over a model's own modules (see the module docstring).

    Args:
        model: The causal LM as ``rollout`` receives it (plain or peft-wrapped).
        use_graphs: Capture the decode step on CUDA (False: run it eagerly, e.g. to debug).
        compile_kernels: Fuse the element-wise pieces with ``torch.compile`` on CUDA.
        fuse_projections: Lay each layer's q/k/v and gate/up weights out as views into one buffer
            (frozen base weights; see :mod:`modules.engine.fusion`) and run one GEMM for each, with
            the LoRA adapters' A matrices as extra rows and one GEMM for their B matrices.
        blas_library: The BLAS library torch prefers while the decode step is captured (its GEMMs
            are the ones the graph replays), restored after; None leaves torch's choice. cuBLASLt
            reads the narrow o_proj and down_proj weights of a decode step faster on H100/H200.
        share_prompt_pass: Run the prompt pass once for each run of equal rows (the G samples of a
            GRPO group) and copy its keys and values to the run's other rows.
    """

    def __init__(self, model: torch.nn.Module, use_graphs: bool = True, compile_kernels: bool = True,
                 fuse_projections: bool = True, blas_library: str | None = "cublaslt",
                 share_prompt_pass: bool = True):
        self._model = weakref.ref(model)  # the engine lives beside the model, never keeps it alive
        self.use_graphs, self.compile_kernels, self.fuse_projections = use_graphs, compile_kernels, fuse_projections
        self.blas_library, self.share_prompt_pass = blas_library, share_prompt_pass
        self._projections: list[LayerProjections] = []
        self._scratch = ScratchPool()  # de-quantized rows of 4-bit groups (modules.engine.quantized)
        self._states: OrderedDict[tuple, _State] = OrderedDict()
        self._fused: Ops | None = None
        self.captures = 0
        """Graphs captured so far (a test and debugging aid)."""

    # -- public ------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the engine's model no longer exists")
        return model

    def check(self) -> tuple[DecoderParts, Interventions]:
        """The model's parts and interventions, or :class:`Unsupported`."""
        if any_dropout_active(self.model):
            raise Unsupported("dropout is active (the model is in train mode)")
        conflicts = sampling_conflicts(self.model)
        if conflicts:
            raise Unsupported(f"the generation config sets {', '.join(conflicts)}")
        return decoder_parts(self.model), find_interventions(self.model)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
                 pad_id: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 seed: int | None = None, keep_logits: bool = False) -> EngineOutput:
        """Sample up to ``max_new_tokens`` per left-padded prompt row (see the module docstring).

        ``seed`` seeds torch's generator right before the first token is drawn (after any capture).
        Raises :class:`Unsupported` (nothing drawn yet) when the engine cannot run this call.
        """
        parts, found = self.check()
        batch, prompt_len = prompt_ids.shape
        device = prompt_ids.device
        if parts.embed.weight.device != device:
            raise Unsupported(f"the prompts are on {device}, the model on {parts.embed.weight.device}")
        plan = self._plan(found, batch, prompt_len, device, greedy, top_p)
        plan.projections = self._fused_projections(parts)  # before the fingerprint: fusing moves weights
        dtype = parts.embed.weight.dtype
        graphs = self.use_graphs and device.type == "cuda"
        ops = self._ops() if graphs else EAGER_OPS
        state = self._state(parts, batch, prompt_len + max_new_tokens, max_new_tokens, device, dtype, keep_logits)
        extra = [t for s in plan.steering for t in s.steering_tensors()] + [
            t for layer in plan.projections for group in layer if group is not None
            for t in (getattr(group, "scratch", None), getattr(group, "a_rows", None), group.b_t, group.bias)
            if t is not None]  # a re-built group's buffers move: the graph must be captured again
        key = (plan.greedy, plan.use_top_p, tuple((id(s), s.layer, s.hook_point) for s in plan.steering),
               adapter_state(self.model), storage_fingerprint(self.model, extra), tuple(stop_ids), int(pad_id),
               keep_logits, ops.compiled)
        if key not in state.sets:
            while len(state.sets) >= MAX_GRAPH_SETS:
                state.sets.popitem(last=False)
            state.sets[key] = ({}, torch.tensor(stop_ids or [-1], dtype=torch.long, device=device),
                               [torch.zeros(1, dtype=torch.long, device=device) for _ in plan.steering])
        state.sets.move_to_end(key)
        state.key = key
        state.graphs, state.stops, state.steer_first = state.sets[key]
        state.pad.fill_(int(pad_id))
        state.temperature.fill_(float(temperature))
        state.top_p.fill_(float(top_p))
        for first, steering in zip(state.steer_first, plan.steering):
            first.fill_(steering.first_steered_column())
        needed = sorted({_bucket(prompt_len + j) for j in range(1, max_new_tokens)})
        if graphs:
            ops = self._capture(parts, state, plan, needed, ops)

        if seed is not None:
            torch.manual_seed(seed)
        state.valid[:, :prompt_len].copy_(prompt_mask.bool())
        state.valid[:, prompt_len:] = True
        self._prefill(parts, state, plan, prompt_ids, prompt_mask)
        steps = 1
        for j in range(1, max_new_tokens):
            if j % STOP_CHECK_EVERY == 0 and bool(state.done.all()):
                break
            length = _bucket(prompt_len + j)
            if graphs:
                state.graphs[length].replay()
            else:
                self._decode_step(parts, state, plan, ops, length)
            steps += 1
        tokens = state.out[:, :steps]
        is_stop = torch.isin(tokens, state.stops)
        stopped = is_stop.any(-1)
        lengths = torch.where(stopped, is_stop.long().argmax(-1) + 1, steps)
        width = int(lengths.max())
        logits = state.logits[:, :width].clone() if state.logits is not None else None
        return EngineOutput(tokens[:, :width].clone(), logits, graphs)

    def release(self) -> None:
        """Drop every KV cache and captured graph (their memory goes back to the allocator)."""
        self._states.clear()

    # -- setup -------------------------------------------------------------------------------------
    def _ops(self) -> Ops:
        if not self.compile_kernels:
            return EAGER_OPS
        if self._fused is None:
            self._fused = fused_ops()
        return self._fused

    def _fused_projections(self, parts: DecoderParts) -> list[LayerProjections]:
        """Each layer's fused groups, fused now where they were not or no longer are, their adapters'
        current values copied in (:meth:`FusedLinear.refresh`)."""
        if not self.fuse_projections or fsdp_managed(self.model):
            # FSDP2 owns its gathered weights' storage (it frees and refills it around each gather):
            # laying them out anew would detach them from it, so its layers run one by one
            return [LayerProjections()] * len(parts.layers)
        known = self._projections if len(self._projections) == len(parts.layers) else \
            [LayerProjections()] * len(parts.layers)
        fusions = []
        for layer, groups in zip(parts.layers, known):
            attn, mlp = layer.self_attn, layer.mlp
            wanted = ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj), (attn.o_proj,),
                      (mlp.down_proj,))
            fused = []
            for group, modules in zip(groups, wanted):
                if group is None or group.owners != modules or not group.intact():
                    group = fuse(*modules) or fuse_quantized(modules, self._scratch)
                elif group.adapters:
                    group.refresh()
                fused.append(group)
            fusions.append(LayerProjections(*fused))
        self._projections = fusions
        return fusions

    def _plan(self, found: Interventions, batch: int, prompt_len: int, device, greedy: bool, top_p: float) -> _Plan:
        steering = [s for s in found.steering if s.enabled]
        for s in steering:
            if any(t.device != device for t in s.steering_tensors()):
                raise Unsupported("the steering vector lives on another device than the prompts")
        injection = [i for i in found.injection if i.pending]
        for inj in injection:
            if inj.vectors.shape[0] != batch:
                raise RuntimeError(f"the injection holds {inj.vectors.shape[0]} rows but the forward has {batch}")
            if bool((inj.positions >= prompt_len).any()):
                raise Unsupported("an injection position beyond the prompt")
        return _Plan(steering, injection, greedy, (not greedy) and top_p < 1.0)

    def _state(self, parts: DecoderParts, batch: int, length: int, max_new: int, device, dtype,
               keep_logits: bool) -> _State:
        key = (batch, device, dtype, keep_logits)
        state = self._states.get(key)
        if state is not None and state.capacity >= length and state.max_new >= max_new:
            self._states.move_to_end(key)
            return state
        if state is not None:
            del self._states[key]
        while len(self._states) >= MAX_STATES:
            self._states.popitem(last=False)
        capacity = _bucket(length)
        cache_shape = (len(parts.layers), 2, batch, parts.num_kv_heads, capacity, parts.head_dim)

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        vocab = parts.lm_head.weight.shape[0]
        state = _State(batch, capacity, max_new, zeros(*cache_shape, dtype=dtype),
                       zeros(batch), zeros(batch), zeros(1), zeros(1), zeros(batch, capacity, dtype=torch.bool),
                       torch.arange(capacity, device=device), zeros(batch, dtype=torch.bool), zeros(batch, max_new),
                       zeros(1, dtype=torch.float32), zeros(1, dtype=torch.float32), zeros((), dtype=torch.long),
                       zeros(batch, max_new, vocab, dtype=torch.float32) if keep_logits else None)
        self._states[key] = state
        return state

    # -- capture -----------------------------------------------------------------------------------
    def _capture(self, parts: DecoderParts, state: _State, plan: _Plan, lengths: list[int], ops: Ops) -> Ops:
        missing = [n for n in lengths if n not in state.graphs]
        if not missing:
            return ops
        rng = torch.cuda.get_rng_state(state.tokens.device)
        previous_blas = torch.backends.cuda.preferred_blas_library()
        try:
            if self.blas_library:
                torch.backends.cuda.preferred_blas_library(self.blas_library)
            if state.pool is None:
                state.pool = torch.cuda.graph_pool_handle()
            for length in missing:
                ops = self._warm_up(parts, state, plan, ops, length)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=state.pool, capture_error_mode="thread_local"):
                    self._decode_step(parts, state, plan, ops, length)
                state.graphs[length] = graph
                self.captures += 1
        except Exception as err:  # noqa: BLE001 - any capture failure means: let HF generate do it
            state.sets.pop(state.key, None)
            state.key = None
            raise Unsupported(f"CUDA graph capture failed ({type(err).__name__}: {str(err).splitlines()[0]})") from err
        finally:
            torch.backends.cuda.preferred_blas_library(previous_blas)
            torch.cuda.set_rng_state(rng, state.tokens.device)
        return ops

    def _warm_up(self, parts: DecoderParts, state: _State, plan: _Plan, ops: Ops, length: int) -> Ops:
        """Run the step twice on a side stream (compiles the fused kernels, picks cuBLAS plans)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                state.cache_pos.zero_()
                state.step.zero_()
                try:
                    self._decode_step(parts, state, plan, ops, length)
                except Exception as err:  # noqa: BLE001
                    if not ops.compiled:
                        raise
                    log.warning("rollout engine: fused kernels failed to compile (%s: %s); using plain kernels",
                                type(err).__name__, str(err).splitlines()[0])
                    self.compile_kernels, ops = False, EAGER_OPS
                    state.sets.pop(state.key, None)  # its key says fused; this call's graphs are plain
                    self._decode_step(parts, state, plan, ops, length)
        torch.cuda.current_stream().wait_stream(stream)
        state.cache_pos.zero_()
        state.step.zero_()
        return ops

    # -- the forward -------------------------------------------------------------------------------
    def _layers(self, parts: DecoderParts, ops: Ops, hidden: torch.Tensor, attention, gates: list[torch.Tensor],
                plan: _Plan, inject) -> torch.Tensor:
        """The decoder layers and the final norm over ``hidden`` [B, T, d]; ``attention(i, attn, x)``
        does the attention of layer ``i``; ``gates[k]`` is steering ``k``'s position gate."""
        layers = parts.layers
        sites: dict[tuple, list] = {}
        for s, gate in zip(plan.steering, gates):  # delta() read in place: a captured step sees updates
            sites.setdefault((s.layer, s.hook_point), []).append((gate, s.steering_delta()))
        residual = hidden
        first_norm = layers[0].input_layernorm
        normed = ops.rms_norm(hidden, first_norm.weight, first_norm.variance_epsilon)
        for i, layer in enumerate(layers):
            for gate, delta in sites.get((i, "pre_attn_norm"), ()):
                normed = ops.steer_add(normed, delta, gate)
            attn_out = attention(i, layer.self_attn, normed)
            post = layer.post_attention_layernorm
            residual, normed = ops.add_rms_norm(residual, attn_out, post.weight, post.variance_epsilon)
            for gate, delta in sites.get((i, "post_attn_norm"), ()):
                normed = ops.steer_add(normed, delta, gate)
            mlp = layer.mlp
            fused = plan.projections[i] if plan.projections else LayerProjections()
            gate, up = fused.gate_up(normed) if fused.gate_up else (mlp.gate_proj(normed), mlp.up_proj(normed))
            mid = ops.silu_mul(gate, up) if parts.silu else mlp.act_fn(gate) * up
            down = fused.down(mid)[0] if fused.down else mlp.down_proj(mid)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else parts.norm
            injected = inject is not None and any(inj.layer == i for inj in plan.injection)
            steered_output = sites.get((i, "layer_output"), ())
            if injected or steered_output:  # the layer's output is changed: add, then normalise
                residual = residual + down
                residual = inject(i, residual) if injected else residual
                for gate, delta in steered_output:
                    residual = ops.steer_add(residual, delta, gate)
                normed = ops.rms_norm(residual, nxt.weight, nxt.variance_epsilon)
            else:
                residual, normed = ops.add_rms_norm(residual, down, nxt.weight, nxt.variance_epsilon)
        return normed

    @staticmethod
    def _qkv(plan: _Plan, i: int, attn, x: torch.Tensor):
        """Layer ``i``'s query, key and value projections of ``x`` (one GEMM where fused)."""
        fused = plan.projections[i].qkv if plan.projections else None
        return fused(x) if fused is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    @staticmethod
    def _o_proj(plan: _Plan, i: int, attn, x: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s attention output projection (with its adapters fused where it has any)."""
        fused = plan.projections[i].out if plan.projections else None
        return fused(x)[0] if fused is not None else attn.o_proj(x)

    @staticmethod
    def _rope(parts: DecoderParts, rope, attn, q: torch.Tensor, k: torch.Tensor, cos, sin, *v: torch.Tensor):
        """``rope`` (:func:`qk_rope`, or :func:`rope_kv` with ``v``) with the layer's q/k norms."""
        q_norm = getattr(attn, "q_norm", None) if parts.qk_norm else None
        k_norm = getattr(attn, "k_norm", None) if parts.qk_norm else None
        return rope(q, k, *v, cos, sin,
                           q_norm.weight if q_norm is not None else None, k_norm.weight if k_norm is not None else None,
                           q_norm.variance_epsilon if q_norm is not None else 0.0,
                           parts.num_heads, parts.num_kv_heads, parts.head_dim)

    def _sample_into(self, state: _State, plan: _Plan, logits: torch.Tensor) -> None:
        """Draw the next token, record it at column ``state.step`` and advance the step's counters."""
        nxt = sample_tokens(logits, state.temperature, state.top_p, plan.greedy, plan.use_top_p)
        nxt = torch.where(state.done, state.pad, nxt)
        state.out.index_copy_(1, state.step, nxt[:, None])
        if state.logits is not None:
            state.logits.index_copy_(1, state.step, logits[:, None])
        state.done |= (nxt[:, None] == state.stops[None, :]).any(-1)
        state.tokens.copy_(nxt)
        state.pos_ids += 1
        state.cache_pos += 1
        state.step += 1

    def _decode_step(self, parts: DecoderParts, state: _State, plan: _Plan, ops: Ops, length: int) -> None:
        """One token for every row, attending over the first ``length`` cache columns (capturable)."""
        batch, d = state.batch, parts.head_dim
        groups = parts.num_heads // parts.num_kv_heads
        hidden = parts.embed(state.tokens[:, None])
        cos, sin = parts.rotary(hidden, state.pos_ids[:, None])
        valid = state.valid[:, :length] & (state.columns[:length] <= state.cache_pos)
        mask = torch.zeros((batch, 1, 1, length), dtype=hidden.dtype, device=hidden.device).masked_fill_(
            ~valid[:, None, None, :], float("-inf"))

        def attention(i, attn, x):
            q, k, v = self._qkv(plan, i, attn, x)
            q, kv = self._rope(parts, ops.rope_kv, attn, q, k, cos, sin, v)
            state.kv[i].index_copy_(3, state.cache_pos, kv)
            keys, values = state.kv[i, 0, :, :, :length], state.kv[i, 1, :, :, :length]
            # one new token: the G query heads that share a key head are G query rows of one product
            heads = batch * parts.num_kv_heads
            scores = attention_scores(q.reshape(heads, groups, d), keys.reshape(heads, length, d))
            probs = ops.attention_probs(scores.view(batch, parts.num_kv_heads, groups, length), mask, attn.scaling,
                                        values.dtype)
            return self._o_proj(plan, i, attn, torch.matmul(probs, values).reshape(batch, 1, parts.num_heads * d))

        gates = [(state.cache_pos >= first).to(hidden.dtype) for first in state.steer_first]
        normed = self._layers(parts, ops, hidden, attention, gates, plan, None)
        self._sample_into(state, plan, parts.lm_head(normed[:, -1]).float())

    def _prefill(self, parts: DecoderParts, state: _State, plan: _Plan, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The prompt pass (eager): fills cache columns ``[0, P)``, injects, draws the first token.

        Runs of equal rows (the samples of one prompt: same ids, mask and injection) share one pass:
        it runs over the first row of each run and its keys, values and last logits are copied to the
        other rows, which then sample their own tokens."""
        full_mask = mask
        rows, source = shared_prompt_rows(ids, mask, plan.injection) if self.share_prompt_pass else (None, None)
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        batch, length = ids.shape
        d, groups = parts.head_dim, parts.num_heads // parts.num_kv_heads
        mask = mask.long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        hidden = parts.embed(ids)
        cos, sin = parts.rotary(hidden, positions)
        cols = torch.arange(length, device=ids.device)
        allowed = (cols[None, :] <= cols[:, None])[None] & (mask.bool()[:, None, :] | torch.eye(
            length, dtype=torch.bool, device=ids.device)[None])
        additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=ids.device).masked_fill(
            ~allowed, float("-inf"))[:, None]

        def attention(i, attn, x):
            q, k, v = self._qkv(plan, i, attn, x)
            q, k = self._rope(parts, EAGER_OPS.qk_rope, attn, q, k, cos, sin)
            v = v.view(batch, length, parts.num_kv_heads, d).transpose(1, 2)
            state.kv[i, 0, :, :, :length] = k if source is None else k[source]
            state.kv[i, 1, :, :, :length] = v if source is None else v[source]
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=attn.scaling)
            return self._o_proj(plan, i, attn, out.transpose(1, 2).reshape(batch, length, parts.num_heads * d))

        def inject(i, h):
            for inj in plan.injection:
                h = inj.apply_to_prompt_pass(h, i, rows)
            return h

        gates = [(cols >= s.first_steered_column()).to(hidden.dtype)[None, :, None] for s in plan.steering]
        normed = self._layers(parts, EAGER_OPS, hidden, attention, gates, plan, inject)
        state.cache_pos.fill_(0)
        state.step.fill_(0)
        state.done.zero_()
        last = parts.lm_head(normed[:, -1]).float()
        self._sample_into(state, plan, last if source is None else last[source])
        state.pos_ids.copy_(full_mask.sum(-1))
        state.cache_pos.fill_(length)

