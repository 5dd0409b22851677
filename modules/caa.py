"""Contrastive activation addition (CAA): a steering vector from the mean activation difference.

    python cli.py caa --config configs/steering_rl_smollm2.yaml --output steering_runs/caa/caa.pt
    python cli.py caa --config configs/steering_rl_smollm2.yaml --output caa_pairs.pt \\
        --pairs_file datamodules/data/sycophancy_pairs_train.jsonl --positive_field rejected --negative_field chosen

Contrast pairs are (prompt, positive reply, negative reply). By default they are made from the
training prompts: the model answers each prompt once with the training persona as its system
prompt and once with the counter-persona (the same sampling seed for both); a JSONL file of pairs
can be given instead. Each reply is then read as an answer to the bare prompt (the chat template
the policy trains with, no persona), teacher-forced, through a forward hook at the steering site
(the layer and hook point of :mod:`modules.models.steering`, i.e. the output that steering adds
to). A reply's activation is the mean of the site's output over the reply's own token positions;
the vector is the mean over pairs of (positive − negative):

    v = mean_pairs( mean_t h(prompt, positive)_t  −  mean_t h(prompt, negative)_t )

It is saved in the project's vector format (``alpha = 1``, ``metadata.method = "caa"``), so
``generate --vector``, ``evaluate --caa`` (at several multipliers) and ``init_from`` in training
read it like a trained vector.

Departures from CAA as published (Rimsky et al., 2023, arXiv 2312.06681): pairs are free-form
persona-prompted replies rather than A/B answer letters, so the activation is averaged over a
reply's tokens instead of read at the answer letter; (1) no prompt positions enter the average (the
prompt is the same in both halves of a pair); (2) replies are read without the persona that
produced them.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import torch

from datamodules.prompts import encode_prompts, read_records
from modules.errors import UserError
from modules.models.steering import steering_site
from modules.rollout import SamplingConfig, rollout


class _Stop(Exception):
    """Raised by the reading hook: nothing after the steering site is needed."""


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: list[str], system: str | None, sampling: SamplingConfig, seed: int = 0,
                   batch_size: int = 16, base: ContextManager | None = None) -> tuple[list[str], list[int]]:
    """Replies to ``prompts`` with ``system`` as the system prompt (None: none) and their token
    counts; the batch starting at prompt ``k`` is sampled with seed ``seed + k``, so calls that
    differ only in ``system`` share their seeds."""
    replies, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = encode_prompts(tokenizer, chunk, system)
        ids, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device)
        with base or nullcontext():
            out = rollout(model, tokenizer, chunk, ids, mask, sampling, seed + start)
        replies += out.responses
        lengths += out.response_mask.sum(-1).tolist()
    return replies, lengths


def persona_pairs(model, tokenizer, prompts: list[str], persona: str, counter_persona: str, sampling: SamplingConfig,
                  seed: int = 0, batch_size: int = 16, base: ContextManager | None = None) -> list[tuple[str, str, str]]:
    """(prompt, reply as ``persona``, reply as ``counter_persona``), one sampling seed per batch for both."""
    positive, _ = sample_replies(model, tokenizer, prompts, persona, sampling, seed, batch_size, base)
    negative, _ = sample_replies(model, tokenizer, prompts, counter_persona, sampling, seed, batch_size, base)
    return list(zip(prompts, positive, negative))


def read_pairs(path: str, positive_field: str, negative_field: str) -> list[tuple[str, str, str]]:
    """Contrast pairs from a JSONL file: each row's prompt and two text fields."""
    pairs = []
    for number, row in enumerate(read_records(path), 1):
        if not all(isinstance(row.get(f), str) for f in (positive_field, negative_field)):
            raise UserError(f"{path} row {number}: needs text fields '{positive_field}' and '{negative_field}'")
        pairs.append((row["prompt"], row[positive_field], row[negative_field]))
    return pairs


@torch.no_grad()
def reply_activations(model, tokenizer, prompts: list[str], replies: list[str], layer: int, hook_point: str,
                      batch_size: int = 16, system_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, d] mean site output over each reply's tokens (fp32, CPU) and [N] token counts.

    Rows are laid out as in training (left-padded chat-template prompt, then the reply's tokens),
    with position ids following the attention mask; a reply with no tokens gets a zero row and count 0.
    """
    site = steering_site(model, layer, hook_point)
    seen: list[torch.Tensor] = []

    def read(module, inputs, output):
        seen.append(output.detach())
        raise _Stop

    means, counts = [], []
    handle = site.register_forward_hook(read)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode_prompts(tokenizer, prompts[start : start + batch_size], system_prompt)
            reply_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies[start : start + batch_size]]
            width = max([len(r) for r in reply_ids] + [1])
            response = torch.full((len(reply_ids), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            response_mask = torch.zeros((len(reply_ids), width), dtype=torch.long)
            for row, ids in enumerate(reply_ids):
                response[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                response_mask[row, : len(ids)] = 1
            input_ids = torch.cat([batch.input_ids, response], 1).to(model.device)
            attention = torch.cat([batch.attention_mask, response_mask], 1).to(model.device)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            seen.clear()
            try:
                model.get_decoder()(input_ids=input_ids, attention_mask=attention, position_ids=positions)
            except _Stop:
                pass
            hidden = seen[0][:, batch.input_ids.shape[1] :].float()
            weights = response_mask.to(hidden.device, torch.float32)[..., None]
            count = response_mask.sum(-1)
            means.append(((hidden * weights).sum(1) / count.clamp(min=1)[:, None].to(hidden.device)).cpu())
            counts.append(count)
    finally:
        handle.remove()
    return torch.cat(means), torch.cat(counts)


def caa_vector(model, tokenizer, pairs: list[tuple[str, str, str]], layer: int, hook_point: str, batch_size: int = 16,
               system_prompt: str | None = None) -> tuple[torch.Tensor, dict]:
    """The CAA vector of ``pairs`` (see the module docstring) and a few facts about it.

    Pairs where either reply has no tokens are left out (and counted).
    """
    prompts = [p for p, _, _ in pairs]
    positive, n_pos = reply_activations(model, tokenizer, prompts, [a for _, a, _ in pairs], layer, hook_point,
                                        batch_size, system_prompt)
    negative, n_neg = reply_activations(model, tokenizer, prompts, [b for _, _, b in pairs], layer, hook_point,
                                        batch_size, system_prompt)
    keep = (n_pos > 0) & (n_neg > 0)
    if not keep.any():
        raise UserError("no contrast pair has two non-empty replies: nothing to average")
    diffs = positive[keep] - negative[keep]
    v = diffs.mean(0)
    facts = {"pairs": int(keep.sum()), "pairs_left_out": int((~keep).sum()), "norm": float(v.norm()),
             "site_norm": float(positive[keep].norm(dim=-1).median()),
             "consistency": float(torch.nn.functional.cosine_similarity(diffs, v[None], dim=-1).mean())}
    return v, facts


# -- the command --------------------------------------------------------------------------------
def _training_options(config_path: str | None) -> tuple[dict, dict]:
    """The model and data init_args of a training YAML (empty without one)."""
    if not config_path:
        return {}, {}
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"config '{config_path}' does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    model = (config.get("model") or {}).get("init_args", {}) or {}
    data = (config.get("data") or {}).get("init_args", {}) or {}
    return dict(model), dict(data)


def caa_command(argv: list[str]) -> None:
    """``python cli.py caa``: compute a CAA vector and save it in the project's vector format."""
    from datamodules.prompts import DEFAULT_TRAIN, read_prompts
    from modules.judges.rewards import HONEST_PERSONA, SYCOPHANT_PERSONA
    from modules.models.loading import load_causal_lm
    from modules.models.steering import SteeringVector
    from modules.models.steering_io import save_steering_vector
    from modules.options import add_options, parse_args, tool_parser

    parser = tool_parser("caa", "A CAA steering vector: mean activation difference between contrast replies.")
    parser.add_argument("--config", type=str | None, default=None,
                        help="A training YAML: model, site, personas, sampling and training prompts come from it.")
    parser.add_argument("--output", type=str, required=True, help="Where to write the vector file (.pt).")
    parser.add_argument("--pairs_file", type=str | None, default=None,
                        help="JSONL contrast pairs (instead of persona-prompted replies to the training prompts).")
    parser.add_argument("--num_prompts", type=int, default=64, help="Training prompts to make pairs from (0: all).")
    add_options(parser, positive_field="rejected", negative_field="chosen", seed=0, batch_size=16,
                model=None, dtype=None, max_new_tokens=None, temperature=None, prompts_file=None,
                notes={"positive_field": "in --pairs_file", "negative_field": "in --pairs_file",
                       "seed": "of the persona-prompted replies", "batch_size": "rows per forward or generate call",
                       "model": "default: the config's, else embedded:smollm2",
                       "dtype": "default: the config's, else auto",
                       "max_new_tokens": "default: the config's, else 120",
                       "temperature": "default: the config's, else 1.0",
                       "prompts_file": "default: the config's train_file, else the training prompts"})
    for name, kind in (("hook_layer", int), ("hook_point", str), ("steer_positions", str), ("judge_persona", str),
                       ("counter_persona", str)):
        parser.add_argument(f"--{name}", type=kind | None, default=None, help=f"Override the config's {name}.")
    args = parse_args(parser, argv)
    model_opts, data_opts = _training_options(args.config)
    def pick(name, default):
        given = getattr(args, name, None)
        return given if given is not None else model_opts.get(name, default)

    model_name, layer, point = pick("model", "embedded:smollm2"), pick("hook_layer", 15), pick("hook_point", "post_attn_norm")
    persona, counter = pick("judge_persona", SYCOPHANT_PERSONA), pick("counter_persona", HONEST_PERSONA)
    sampling = SamplingConfig(pick("max_new_tokens", 120), pick("temperature", 1.0), 1.0)
    if args.num_prompts < 0 or args.batch_size < 1:
        raise UserError("num_prompts must be >= 0 and batch_size >= 1")
    model, tokenizer = load_causal_lm(model_name, pick("dtype", "auto"))
    tokenizer.padding_side = "left"
    system_prompt = data_opts.get("system_prompt")
    if args.pairs_file:
        pairs, source = read_pairs(args.pairs_file, args.positive_field, args.negative_field), args.pairs_file
    else:
        prompts = read_prompts(args.prompts_file or data_opts.get("train_file") or DEFAULT_TRAIN)
        prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
        print(f"sampling {len(prompts)} replies as each persona ({sampling.max_new_tokens} tokens) ...", flush=True)
        pairs = persona_pairs(model, tokenizer, prompts, persona, counter, sampling, args.seed, args.batch_size)
        source = f"persona-prompted replies to {len(prompts)} training prompts"
    v, facts = caa_vector(model, tokenizer, pairs, layer, point, args.batch_size, system_prompt)
    metadata = {"base_model": model_name, "hook_layer": layer, "hook_point": point,
                "steer_positions": pick("steer_positions", "all"), "steer_last_k": pick("steer_last_k", 1), "step": 0,
                "method": "caa", "source": source, **facts,
                "config": {k: v for k, v in model_opts.items() if isinstance(v, (int, float, str, bool, type(None)))}
                | {"judge_persona": persona, "counter_persona": counter, "max_new_tokens": sampling.max_new_tokens,
                   "temperature": sampling.temperature}}
    save_steering_vector(args.output, SteeringVector(v.numel()).load_(v, torch.tensor(1.0)), metadata)
    print(f"CAA vector from {facts['pairs']} pairs ({source}; {facts['pairs_left_out']} left out for an empty reply)\n"
          f"  ||v|| = {facts['norm']:.4f} (the site's output has a median norm of {facts['site_norm']:.2f} per token); "
          f"mean cosine of a pair's difference with v: {facts['consistency']:.2f}\n"
          f"  layer {layer}, {point}; written to {args.output}")
    prompt, positive, negative = pairs[0]
    print(f"--- pair 1: {prompt}\n  [+] {positive[:200]}\n  [-] {negative[:200]}")
