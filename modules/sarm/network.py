"""The SARM network from a local folder: scalar reward and SAE latents z for (prompt, response) pairs.

:class:`SARMNetwork` is everything of :class:`~modules.sarm.model.SARMRewardModel` but its
``load`` (folder, ``embedded:<name>`` or Hub id): it loads only a local folder (:meth:`SARMNetwork.from_folder`),
so that the embedded SARM's builder (:mod:`modules.sarm.embedded`), which runs one, sits below the loader
that builds it on first use. Use :class:`~modules.sarm.model.SARMRewardModel`:

    rm = SARMRewardModel.load("Schrieffer/Llama-SARM-4B")      # or a folder, or "embedded:sarm-smollm2"
    out = rm.score(prompts, responses)                        # out.rewards [B], out.latents [B, 65536]
    with rm.controlled(LatentControl(clamp={48659: 0.0})):    # in-RM control before the score head
        clamped = rm.score(prompts, responses)

The forward pass follows the released SARM (github.com/schrieffer-z/sarm, ``modeling_sarm_llama.py``):
the first L decoder layers of the base model (no final norm), per-token standardisation, the SAE's
dense pre-activations or its TopK latents (``score_mode``), a linear score head without bias, read
at the pooled position. Dense or TopK is the folder's own flag unless ``score_mode`` says (see
:mod:`modules.sarm.checkpoint`). Text needs a tokenizer: the folder's own, or ``tokenizer`` (a Hub id
or folder) for folders without one, such as the authors' training checkpoints; token ids need none
(:meth:`SARMNetwork.forward`). Pooling rules of the authors' code:

- ``last``: the last token of the sequence, which must be the end-of-turn token (their code asserts
  ``<|eot_id|>``). Sequences are right-padded; the pooled position is the last attended one.
- ``aggregate``: the features summed over the response's tokens (everything after the assistant
  header, end-of-turn token included), then scored (their ``sarm_aggregate_latents``).

z is the vector the score head reads (TopK latents, or dense pre-activations in dense mode), at the
pooled position. It comes back in the model's dtype: bf16 on a GPU, fp32 on the CPU.

Departures from the authors' code (numbered):
1. The SAE and the score head run only at the pooled positions (``last``) or on the response's
   tokens (``aggregate``), not on every token: the same numbers with far less memory at 65,536 latents.
2. The reward is computed in fp32 from z (``z.float() @ w``); theirs runs the head in the model dtype.
3. The pooled position is the last attended token of a right-padded batch, found from the
   attention mask; theirs is "first pad token - 1", which fails when the pad id occurs in the text
   (with SmolLM2 the pad token *is* the end-of-turn token).
4. In-RM controls (clamp a latent to a value, or cap it) act on the pooled z, before the score
   head. For ``last`` pooling this equals their per-token steering; for ``aggregate`` it acts on the
   summed vector (their steering script edits every token before the sum).
5. Texts are templated with the reward model's chat template and cut after the last end-of-turn
   token (SmolLM2's template adds a newline after it); long sequences lose tokens from the left.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from modules.errors import UserError
from modules.sarm.checkpoint import POOLINGS, SAE_KEYS, SCORE_MODES, SARMSpec, inspect_sarm_folder, load_tensors
from modules.sarm.sae import TopKSAE, standardise


@dataclass
class LatentControl:
    """In-RM control of latents: ``clamp`` sets z_i to a value, ``cap`` limits z_i to at most a value.

    Both act on the pooled z before the score head (a latent in both is capped, then clamped).
    """

    clamp: dict[int, float] = field(default_factory=dict)
    cap: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_lists(cls, clamp_features: Sequence[int] | None = None, clamp_values: Sequence[float] | None = None,
                   cap_features: Sequence[int] | None = None, cap_values: Sequence[float] | None = None,
                   ) -> "LatentControl":
        def pair(ids, values, what):
            ids, values = list(ids or []), list(values or [])
            if len(values) == 1 and len(ids) > 1:
                values = values * len(ids)
            if len(ids) != len(values):
                raise UserError(f"{what}: {len(ids)} feature ids but {len(values)} values (give one value per feature)")
            return {int(i): float(v) for i, v in zip(ids, values)}

        return cls(pair(clamp_features, clamp_values, "clamp_features/clamp_values"),
                   pair(cap_features, cap_values, "cap_features/cap_values"))

    def __bool__(self) -> bool:
        return bool(self.clamp or self.cap)

    @property
    def feature_ids(self) -> list[int]:
        return sorted(set(self.clamp) | set(self.cap))

    def validate(self, latent_size: int) -> None:
        bad = [i for i in self.feature_ids if not 0 <= i < latent_size]
        if bad:
            raise UserError(f"controlled feature ids {bad} are outside the SARM's {latent_size} latents (0..{latent_size - 1})")

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """A controlled copy of ``z`` [..., latent] (``z`` itself is left as it is)."""
        if not self:
            return z
        z = z.clone()
        for i, value in self.cap.items():
            z[..., i] = z[..., i].clamp(max=value)
        for i, value in self.clamp.items():
            z[..., i] = value
        return z


@dataclass
class SARMOutput:
    rewards: torch.Tensor
    """[B] fp32: the score of the controlled z (the plain score where no control is active)."""
    latents: torch.Tensor
    """[B, latent] z at the pooled position, before any control, in the model's dtype."""
    rewards_uncontrolled: torch.Tensor
    """[B] fp32: the score of z without control."""

    @staticmethod
    def concat(parts: list["SARMOutput"]) -> "SARMOutput":
        return SARMOutput(*(torch.cat([getattr(p, name) for p in parts])
                            for name in ("rewards", "latents", "rewards_uncontrolled")))


@dataclass
class SARMBatch:
    input_ids: torch.Tensor
    """[B, T] right-padded; the last attended token of each row is the end-of-turn token."""
    attention_mask: torch.Tensor
    response_start: torch.Tensor
    """[B] index of each row's first response token (after the assistant header)."""


class SARMNetwork(nn.Module):
    """A SARM: backbone (L decoder layers), TopK SAE and linear score head. Frozen; use :meth:`from_folder`
    (or :meth:`modules.sarm.model.SARMRewardModel.load`)."""

    def __init__(self, spec: SARMSpec, backbone: nn.Module, sae: TopKSAE, score: nn.Linear, tokenizer=None,
                 score_mode: str = "auto", pooling: str = "auto", max_length: int = 2048):
        super().__init__()
        if score_mode not in SCORE_MODES:
            raise UserError(f"score_mode must be one of {', '.join(SCORE_MODES)}, got '{score_mode}'")
        if pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        self.spec, self.backbone, self.sae, self.score_head = spec, backbone, sae, score
        self.tokenizer, self.max_length = tokenizer, max_length
        self.use_topk = spec.use_topk if score_mode == "auto" else score_mode == "topk"
        self.pooling = spec.pooling if pooling == "auto" else pooling
        if self.use_topk and spec.k is None:
            raise UserError(f"SARM '{spec.folder}' gives no sae_k in config.json: pass k (or score_mode dense)")
        self.end_token_id = spec.end_token_id
        self.control = LatentControl()
        self.eval()
        self.requires_grad_(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path, dtype: str = "auto", device: str | torch.device | None = None,
                    score_mode: str = "auto", pooling: str = "auto", k: int | None = None,
                    max_length: int = 2048, tokenizer: str | None = None) -> "SARMNetwork":
        """Load a SARM from a local folder (bf16 on a GPU, fp32 on the CPU).

        ``score_mode``, ``pooling`` and ``k`` win over the folder's config (``auto``/None: the config's);
        ``tokenizer`` (Hub id, folder or ``embedded:<name>``) replaces the folder's own tokenizer.
        """
        from transformers import LlamaConfig, LlamaModel
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from modules.models.loading import resolve_dtype

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, device)
        spec = inspect_sarm_folder(Path(folder), k=k, score_mode=score_mode, pooling=pooling)
        config = LlamaConfig.from_dict(spec.llama_config)
        with torch.device("meta"):
            backbone = LlamaModel(config)
            sae = TopKSAE(spec.hidden_size, spec.latent_size, spec.k or spec.latent_size)
            score = nn.Linear(spec.latent_size, 1, bias=False)
        backbone_keys = [key for key in backbone.state_dict() if f"model.{key}" in spec.tensors]
        weights = load_tensors(spec, [f"model.{key}" for key in backbone_keys], torch_dtype, device)
        missing = set(backbone.state_dict()) - set(backbone_keys)
        if missing - {"norm.weight"}:
            raise UserError(f"SARM folder '{spec.folder}': missing tensors {sorted(missing)[:3]}")
        if missing:  # the final norm is never applied; a folder may leave it out
            weights["model.norm.weight"] = torch.ones(spec.hidden_size, dtype=torch_dtype, device=device)
        backbone.load_state_dict({key[len("model."):]: value for key, value in weights.items()}, assign=True)
        backbone.norm = nn.Identity()  # the SAE reads the raw residual stream after layer L-1
        backbone.rotary_emb = LlamaRotaryEmbedding(config).to(device)
        sae_weights = load_tensors(spec, list(SAE_KEYS), torch_dtype, device)
        sae.load_state_dict({key[len("sae."):]: value for key, value in sae_weights.items()}, assign=True)
        score.load_state_dict({"weight": load_tensors(spec, ["score.weight"], torch_dtype, device)["score.weight"]},
                              assign=True)
        return cls(spec, backbone, sae, score, load_sarm_tokenizer(spec, tokenizer), score_mode, pooling, max_length)

    # ------------------------------------------------------------------ properties
    @property
    def latent_size(self) -> int:
        return self.spec.latent_size

    @property
    def device(self) -> torch.device:
        return self.score_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.score_head.weight.dtype

    @property
    def score_weight(self) -> torch.Tensor:
        """[latent] fp32 weights of the score head: a latent's contribution is w_i * z_i."""
        return self.score_head.weight[0].float()

    def describe(self) -> str:
        mode = f"TopK k={self.spec.k}" if self.use_topk else "dense"
        mode += f" (from {self.spec.mode_from})" if self.spec.mode_from else ""
        return (f"SARM {self.spec.folder.name}: {self.spec.source_layer} layers, hidden {self.spec.hidden_size}, "
                f"{self.latent_size} latents, {mode}, {self.pooling} pooling")

    # ------------------------------------------------------------------ control
    @contextmanager
    def controlled(self, control: LatentControl) -> Iterator["SARMNetwork"]:
        """Score with ``control`` applied inside this block (restores the previous control after)."""
        control.validate(self.latent_size)
        previous, self.control = self.control, control
        try:
            yield self
        finally:
            self.control = previous

    def score_latents(self, latents: torch.Tensor, control: LatentControl | None = None) -> torch.Tensor:
        """[B] fp32 rewards of pooled latents [B, latent] (with ``control`` applied first, if given)."""
        z = control.apply(latents) if control else latents
        return z.float() @ self.score_weight.to(z.device)

    # ------------------------------------------------------------------ encoding
    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> SARMBatch:
        """Tokenize (prompt, response) conversations with the SARM's chat template, right-padded."""
        if self.tokenizer is None:
            raise UserError(missing_tokenizer_message(self.spec.folder))
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows, starts = [], []
        for prompt, response in zip(prompts, responses):
            ids, start = self.conversation_ids(prompt, response)
            rows.append(ids)
            starts.append(start)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return SARMBatch(input_ids, mask, torch.tensor(starts, dtype=torch.long))

    def conversation_ids(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of one templated conversation, ending in the end-of-turn token, and the response start."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise UserError(f"the SARM's tokenizer ({self.spec.folder}) has no chat template")
        user = [{"role": "user", "content": prompt}]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        start = 0
        while start < min(len(ids), len(head_ids)) and ids[start] == head_ids[start]:
            start += 1
        ends = [i for i in range(start, len(ids)) if ids[i] == self.end_token_id]
        ids = ids[: ends[-1] + 1] if ends else ids + [self.end_token_id]
        if len(ids) > self.max_length:
            cut = len(ids) - self.max_length
            ids, start = ids[cut:], max(0, start - cut)
        return ids, min(start, len(ids) - 1)

    # ------------------------------------------------------------------ forward
    def residual_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] residual stream after layer L-1 (no final norm), what the SAE reads."""
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the score head reads, for residual-stream rows [..., hidden]: TopK latents or pre-activations."""
        pre = self.sae.pre_acts(standardise(hidden))
        return self.sae.topk(pre) if self.use_topk else pre

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_start: torch.Tensor | None = None, control: LatentControl | None = None) -> SARMOutput:
        """Rewards and pooled latents of right-padded sequences ending in the end-of-turn token."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        lengths = attention_mask.sum(-1)
        if bool((lengths == 0).any()) or bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("SARM inputs must be right-padded with at least one token per row")
        last = lengths - 1
        rows = torch.arange(input_ids.shape[0], device=self.device)
        if bool((input_ids[rows, last] != self.end_token_id).any()):
            raise ValueError(f"every sequence must end in the end-of-turn token (id {self.end_token_id})")
        hidden = self.residual_stream(input_ids, attention_mask)
        if self.pooling == "last":
            z = self.features(hidden[rows, last])
        else:
            if response_start is None:
                raise ValueError("aggregate pooling needs response_start (use encode())")
            z = torch.stack([self.features(hidden[i, int(response_start[i]): int(last[i]) + 1]).sum(0)
                             for i in range(hidden.shape[0])])
        control = control if control is not None else self.control
        return SARMOutput(self.score_latents(z, control), z, self.score_latents(z))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8,
              control: LatentControl | None = None) -> SARMOutput:
        """Rewards and latents of (prompt, response) pairs, in batches; results on the CPU."""
        if control is not None:
            control.validate(self.latent_size)
        parts = []
        for begin in range(0, len(prompts), batch_size):
            batch = self.encode(prompts[begin:begin + batch_size], responses[begin:begin + batch_size])
            out = self(batch.input_ids, batch.attention_mask, batch.response_start, control)
            parts.append(SARMOutput(out.rewards.cpu(), out.latents.cpu(), out.rewards_uncontrolled.cpu()))
        if not parts:
            return SARMOutput(torch.zeros(0), torch.zeros(0, self.latent_size, dtype=self.dtype), torch.zeros(0))
        return SARMOutput.concat(parts)


def _has_tokenizer(folder: Path) -> bool:
    return any(folder.glob("tokenizer*"))


def missing_tokenizer_message(folder: Path) -> str:
    """The one line for a SARM without a tokenizer: which option to pass (and a likely value)."""
    parent = folder.parent
    hint = f"; its parent folder holds one: tokenizer: {parent}" if _has_tokenizer(parent) else ""
    return (f"SARM folder '{folder}' holds no tokenizer, which scoring text needs: pass the tokenizer option "
            f"(--tokenizer for the sarm-* commands), a Hub id or folder such as the SARM's base model{hint}")


def load_sarm_tokenizer(spec: SARMSpec, tokenizer: str | None = None):
    """``tokenizer`` (Hub id, folder or ``embedded:<name>``) where given, else the SARM folder's own (None
    when it has none); the pad token falls back to the end-of-sequence token."""
    from transformers import AutoTokenizer

    if tokenizer is None and not _has_tokenizer(spec.folder):
        return None
    name = str(spec.folder) if tokenizer is None else tokenizer
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            if not _has_tokenizer(path):
                raise UserError(f"tokenizer folder '{name}' holds no tokenizer files (tokenizer.json, "
                                "tokenizer_config.json)")
            loaded = AutoTokenizer.from_pretrained(path)
        else:
            from modules.models.loading import load_tokenizer

            loaded = load_tokenizer(name)
    except UserError as err:
        raise UserError(f"tokenizer '{name}': {err}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the tokenizer '{name}' ({str(err).strip().splitlines()[0]})") from None
    if len(loaded) > spec.llama_config["vocab_size"]:
        raise UserError(f"tokenizer '{name}' has {len(loaded)} tokens but the SARM's embedding only "
                        f"{spec.llama_config['vocab_size']}: pass the tokenizer of the SARM's base model")
    if loaded.pad_token is None:
        loaded.pad_token = loaded.eos_token
    return loaded
