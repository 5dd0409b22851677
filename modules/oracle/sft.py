"""The SFT format stage: teach an oracle adapter to answer ``[epistemic status: X] Answer``.

:func:`build_sft_adapter` (the ``oracle-sft`` command, and ``embedded:oracle-smollm2`` on first use):

1. Load the base model and put a LoRA on it: a fresh one, or ``start_adapter`` (an oracle adapter,
   e.g. the public Qwen3-8B one; its ``ao_config.json`` is checked against our scheme first).
2. For every training row, extract the subject's activations (adapter off) and generate the
   oracle's own greedy answer to the original prompt (adapter on, injection on, no system prompt,
   as the original oracles were trained).
3. Make ``copies`` examples per row: the target is ``[epistemic status: X] <that answer>`` with X
   uniform in 0-10 (seeded), the prompt carries the format system prompt.
4. Train the LoRA on the targets (cross-entropy on the reply tokens, end-of-turn included) with
   the activations injected in every forward pass, AdamW, a few epochs.
5. Sample replies to the held-out rows (temperature 1) and report the parse-failure rate.
6. Save a PEFT adapter folder with an ``ao_config.json`` describing our scheme (plus the format
   system prompt and the options), and ``sft_report.json``.

The folder is cached under ``$RLI_CACHE_DIR/oracle_adapters/`` keyed by a hash of the options, the
training file's bytes, the base model's identity and the library versions, and written atomically;
:func:`resolve_oracle_adapter` maps ``embedded:oracle-smollm2`` to it (SmolLM2-135M-Instruct + the
shipped training set; about a minute on 2 CPU cores the first time).

Departures from the Activation Oracles format-SFT recipe (arXiv 2512.15674):

1. Activations are extracted once per row and reused every epoch instead of re-extracted per
   step: the subject (adapter off) is frozen, so the values are the same.
2. The answer is the oracle's *greedy* reply, cleaned (first line, the tag removed if the model
   wrote one, "I cannot tell." when empty); the seed leaves the decoding unstated.
3. Several examples per row with independent X (``copies``), so one answer is seen with several
   confidences: the format is learnt, not a link between an answer and a number.
4. Uses peft directly; switch to ``modules.models.adapters.LoRAPolicy(keep_reference=False)`` and
   its ``base()`` switch once that module is settled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules.oracle_data import DEFAULT_ORACLE_HELDOUT, DEFAULT_ORACLE_TRAIN, read_oracle_rows, resolve_path
from modules.errors import UserError
from modules.models.embedded import cache_root, write_cached_folder
from modules.oracle.batch import OracleBatch, build_oracle_batch, left_pad
from modules.oracle.format import (FORMAT_SYSTEM_PROMPT, ParseStats, encode_oracle_prompt, format_reply,
                                   oracle_messages, parse_reply, render_chat)
from modules.oracle.generation import greedy_answers, oracle_rollout
from modules.oracle.injection import ActivationInjection
from modules.oracle.scheme import DEFAULT_LAYER_PERCENTS, adapter_scheme, ao_config_payload, layers_for_percents
from modules.rollout import SamplingConfig

SFT_VERSION = 1
"""Bumped when the stage changes what it builds (part of the cache key)."""


@dataclass(frozen=True)
class SFTOptions:
    """Everything that decides the adapter (all of it goes into the cache key)."""

    model: str = "embedded:smollm2"
    train_file: str = DEFAULT_ORACLE_TRAIN
    heldout_file: str | None = DEFAULT_ORACLE_HELDOUT
    start_adapter: str | None = None
    layer_percents: tuple[float, ...] = DEFAULT_LAYER_PERCENTS
    num_positions: int = 8
    format_system_prompt: str = FORMAT_SYSTEM_PROMPT
    copies: int = 2
    answer_max_new_tokens: int = 16
    lora_r: int = 16
    lora_alpha: float = 32.0
    target_modules: str = "all-linear"
    lr: float = 5e-4
    epochs: int = 2
    batch_size: int = 8
    check_max_new_tokens: int = 24
    seed: int = 0
    dtype: str = "float32"
    max_rows: int | None = None


EMBEDDED_ADAPTERS = {"oracle-smollm2": SFTOptions()}
"""``embedded:<name>`` adapters built on first use."""


@dataclass
class SFTExample:
    prompt_ids: list[int]
    positions: list[int]
    target_ids: list[int]
    vectors: torch.Tensor
    """[K, d]"""
    target_text: str = ""


@dataclass
class SFTReport:
    rows: int = 0
    examples: int = 0
    steps: int = 0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    seconds: float = 0.0
    seconds_examples: float = 0.0
    seconds_training: float = 0.0
    check_samples: int = 0
    check_parse_failure_rate: float = float("nan")
    check_mean_confidence: float = float("nan")
    samples: list[str] = field(default_factory=list)


# -- cache ----------------------------------------------------------------------------------------
def _model_identity(model: str) -> str:
    if model.startswith("embedded:"):
        from modules.models.embedded import cached_folder

        return cached_folder(model.split(":", 1)[1]).name
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model


def cache_key(options: SFTOptions) -> str:
    train = resolve_path(options.train_file)
    options_dict = asdict(options)  # 25 and 25.0 are the same depth (the CLI parses floats)
    options_dict["layer_percents"] = [int(p) if float(p).is_integer() else float(p) for p in options.layer_percents]
    payload = {
        "options": options_dict,
        "train_sha": hashlib.sha256(train.read_bytes()).hexdigest() if train.is_file() else None,
        "model": _model_identity(options.model),
        "versions": [importlib.metadata.version(p) for p in ("torch", "transformers", "peft")],
        "sft_version": SFT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_folder(options: SFTOptions, cache_dir: str | Path | None = None) -> Path:
    name = Path(options.model.split(":", 1)[-1]).name.lower() or "model"
    return Path(cache_dir or cache_root() / "oracle_adapters") / f"{name}-{cache_key(options)}"


def resolve_oracle_adapter(spec: str, cache_dir: str | Path | None = None) -> str:
    """``embedded:<name>`` -> the cached SFT adapter folder (built on first use); a Hub reference
    (``owner/name[@revision][:folder]``) -> its folder in the HF cache; a path as is."""
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED_ADAPTERS:
            raise UserError(f"unknown embedded oracle adapter '{name}': known ones are {', '.join(EMBEDDED_ADAPTERS)}")
        return str(build_sft_adapter(EMBEDDED_ADAPTERS[name], cache_dir=cache_dir))
    from modules.models.hub import resolve_adapter_folder

    return str(resolve_adapter_folder(spec))


# -- the stage --------------------------------------------------------------------------------------
def _lora_model(base, options: SFTOptions):
    """The trainable oracle: a fresh LoRA or the starting adapter, peft directly (see departure 4)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if options.start_adapter:
        return PeftModel.from_pretrained(base, options.start_adapter, is_trainable=True)
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", target_modules=options.target_modules)
    return get_peft_model(base, config)


def clean_answer(text: str) -> str:
    """The first sentence of the first non-empty line, without any epistemic-status tag the model
    wrote itself; "I cannot tell." when nothing is left."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    parsed = parse_reply(line)
    if parsed.ok:
        line = parsed.answer
    line = line.replace("[epistemic status:", "").strip()
    sentence = re.match(r".*?[.!?](?=\s|$)", line)
    line = sentence.group(0) if sentence else line
    return line[:200].strip() or "I cannot tell."


def completion_ids(tokenizer, prompt_text: str, messages: list[dict], reply: str) -> list[int]:
    """Token ids of the assistant turn that follows ``prompt_text``, through its end-of-turn token."""
    full = render_chat(tokenizer, messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    if full.startswith(prompt_text):
        tail = full[len(prompt_text):]
        cut = tail.find(eos) if eos else -1
        tail = tail[: cut + len(eos)] if cut >= 0 else tail + eos
    else:  # a template that renders the last turn differently: the reply and the end-of-turn token
        tail = reply + eos
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


def build_examples(model, tokenizer, rows: list[dict], options: SFTOptions, injection: ActivationInjection
                   ) -> tuple[list[SFTExample], OracleBatch]:
    batch = build_oracle_batch(model, tokenizer, rows, options.layer_percents, options.num_positions,
                               system_prompt=None, seed=options.seed)
    answers = [clean_answer(a) for a in greedy_answers(model, tokenizer, batch, injection,
                                                        options.answer_max_new_tokens)]
    rng = random.Random(options.seed)
    examples = []
    for k, (row, answer) in enumerate(zip(rows, answers)):
        keep = batch.positions[k] >= 0
        vectors, count = batch.vectors[k][keep], int(keep.sum())
        enc = encode_oracle_prompt(tokenizer, row["question"], batch.layers[k], count, options.format_system_prompt)
        messages = oracle_messages(row["question"], batch.layers[k], count, options.format_system_prompt)
        for _ in range(options.copies):
            target = format_reply(rng.randint(0, 10), answer)
            examples.append(SFTExample(enc.input_ids, enc.positions,
                                       completion_ids(tokenizer, enc.text, messages, target), vectors, target))
    return examples, batch


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask, pads = left_pad([e.prompt_ids + e.target_ids for e in examples], pad_id)
    labels = torch.full_like(ids, -100)
    k = max(len(e.positions) for e in examples)
    positions = torch.full((len(examples), k), -1, dtype=torch.long)
    vectors = torch.zeros(len(examples), k, examples[0].vectors.shape[-1], dtype=examples[0].vectors.dtype)
    for i, (e, pad) in enumerate(zip(examples, pads)):
        start = pad + len(e.prompt_ids)
        labels[i, start:] = torch.tensor(e.target_ids)
        positions[i, : len(e.positions)] = torch.tensor(e.positions) + pad
        vectors[i, : len(e.positions)] = e.vectors
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "positions": positions, "vectors": vectors}


def sft_loss(model, injection: ActivationInjection, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the reply tokens, with the activations injected (the vocabulary
    projection only at the positions that predict a reply token)."""
    mask, labels = batch["attention_mask"], batch["labels"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with injection.inject(batch["vectors"], batch["positions"]):
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                     position_ids=position_ids).last_hidden_state
    predicting = labels[:, 1:] != -100  # position t predicts token t + 1
    logits = model.get_output_embeddings()(hidden[:, :-1][predicting]).float()
    return F.cross_entropy(logits, labels[:, 1:][predicting])


def check_format(model, tokenizer, rows: list[dict], options: SFTOptions, injection: ActivationInjection,
                 report: SFTReport) -> None:
    """Sampled replies (temperature 1) to ``rows`` with the format system prompt; parse-failure rate."""
    batch = build_oracle_batch(model, tokenizer, rows, options.layer_percents, options.num_positions,
                               system_prompt=options.format_system_prompt, seed=options.seed)
    out = oracle_rollout(model, tokenizer, batch, injection,
                         SamplingConfig(options.check_max_new_tokens, 1.0, 1.0), seed=options.seed)
    parsed = [parse_reply(t) for t in out.responses]
    stats = ParseStats()
    stats.add(parsed)
    ok = [p.confidence for p in parsed if p.ok]
    report.check_samples = len(parsed)
    report.check_parse_failure_rate = stats.failed / max(stats.total, 1)
    report.check_mean_confidence = sum(ok) / len(ok) if ok else float("nan")
    report.samples = out.responses[:6]


def train_sft(options: SFTOptions, log=print) -> tuple[object, object, SFTReport]:
    """Run the stage in memory; returns (peft model, tokenizer, report)."""
    from modules.models.loading import load_causal_lm

    start = time.perf_counter()
    torch.manual_seed(options.seed)
    rows = read_oracle_rows(options.train_file)[: options.max_rows]
    base, tokenizer = load_causal_lm(options.model, options.dtype)
    layers = list(layers_for_percents(base, options.layer_percents).values())
    if options.start_adapter:
        adapter_scheme(options.start_adapter, layers)  # refuses another injection scheme
    model = _lora_model(base, options)
    injection = ActivationInjection(model)
    report = SFTReport(rows=len(rows))
    examples, _ = build_examples(model, tokenizer, rows, options, injection)
    report.examples = len(examples)
    report.seconds_examples = time.perf_counter() - start
    log(f"[oracle-sft] {len(rows)} rows -> {len(examples)} examples; e.g. {examples[0].target_text!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    rng = random.Random(options.seed + 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    for epoch in range(options.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for s in range(0, len(order), options.batch_size):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in order[s : s + options.batch_size]],
                                                         pad).items()}
            loss = sft_loss(model, injection, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            report.steps += 1
            if report.steps == 1:
                report.first_loss = losses[0]
        report.last_loss = losses[-1]
        log(f"[oracle-sft] epoch {epoch + 1}/{options.epochs}: loss {sum(losses) / len(losses):.3f}")
    report.seconds_training = time.perf_counter() - start - report.seconds_examples
    if options.heldout_file:
        model.eval()
        check_format(model, tokenizer, read_oracle_rows(options.heldout_file), options, injection, report)
        log(f"[oracle-sft] held-out format check: {report.check_parse_failure_rate:.1%} parse failures over "
            f"{report.check_samples} sampled replies; mean X {report.check_mean_confidence:.2f}")
    injection.remove()
    report.seconds = time.perf_counter() - start
    return model, tokenizer, report


def save_adapter(model, options: SFTOptions, report: SFTReport, folder: Path) -> None:
    """The PEFT adapter, ``ao_config.json`` (our scheme) and ``sft_report.json``."""
    model.save_pretrained(str(folder))
    layers = list(layers_for_percents(model, options.layer_percents).values())
    payload = ao_config_payload(options.model, list(options.layer_percents), layers,
                                format_system_prompt=options.format_system_prompt,
                                output_format="[epistemic status: X] Answer", sft_options=asdict(options))
    (folder / "ao_config.json").write_text(json.dumps(payload, indent=2))
    (folder / "sft_report.json").write_text(json.dumps(asdict(report), indent=2))


def build_sft_adapter(options: SFTOptions, cache_dir: str | Path | None = None, force: bool = False,
                      log=print) -> Path:
    """The cached adapter folder for ``options``, built (and written atomically) if missing."""
    target = adapter_folder(options, cache_dir)
    if (target / "ao_config.json").is_file() and not force:
        return target
    log(f"[oracle-sft] building the oracle adapter (cached in {target})")
    model, _, report = train_sft(options, log)
    return write_cached_folder(target, lambda folder: save_adapter(model, options, report, folder), "ao_config.json",
                               replace=force)
