"""``cli.py oracle-sft`` and ``cli.py vibes-check``: the SFT format stage and a look at rollouts.

    python cli.py oracle-sft                                  # embedded: SmolLM2 + the shipped set, cached
    python cli.py oracle-sft --model Qwen/Qwen3-8B --start_adapter adamkarvonen/checkpoints_latentqa_cls_past_lens_addition_Qwen3-8B \\
        --dtype bfloat16 --output oracle_sft_qwen3
    python cli.py vibes-check --num_examples 4 --samples_per_prompt 4
    python cli.py vibes-check --model Qwen/Qwen3-8B --adapter ceselder/qwen3-8b-oracle-sft-format \\
        --judge.class_path modules.oracle.judges.LLMInformativenessJudge \\
        --judge.init_args.judge.class_path modules.judges.openai_compat.OpenAICompatibleJudge \\
        --judge.init_args.judge.init_args.base_url https://openrouter.ai/api/v1 \\
        --judge.init_args.judge.init_args.model z-ai/glm-4.7-flash --judge.init_args.judge.init_args.mode rating
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import fields
from typing import get_type_hints

import torch
from jsonargparse import ActionConfigFile

from datamodules.oracle_data import DEFAULT_ORACLE_HELDOUT, read_oracle_rows
from modules.errors import UserError
from modules.options import OPTIONS, add_options, help_text, parse_args, tool_parser
from modules.oracle.judges import InformativenessJudge, TokenF1Judge

_SFT_HELP = {  # SFTOptions fields that are not shared options (modules.options.OPTIONS)
    "train_file": "Oracle JSONL rows (context, question, answer, ...) to build the examples from.",
    "heldout_file": "Rows for the format check after training (sampled replies, parse-failure rate).",
    "start_adapter": "Start from this oracle adapter (folder or Hub id) instead of a fresh LoRA.",
    "format_system_prompt": "The system prompt asking for '[epistemic status: X] Answer'.",
    "copies": "Examples per row, each with its own uniform X in 0-10.",
    "answer_max_new_tokens": "Most tokens of the oracle's own (greedy) answer.",
    "lora_r": "LoRA rank of a fresh adapter.",
    "lora_alpha": "LoRA alpha of a fresh adapter.",
    "target_modules": "LoRA target modules of a fresh adapter (all-linear or comma-separated names).",
    "lr": "AdamW learning rate.",
    "epochs": "Passes over the examples.",
    "check_max_new_tokens": "Most tokens per sampled reply in the format check.",
    "max_rows": "Use only the first N training rows.",
}
_SFT_NOTES = {"batch_size": "examples per optimizer step", "seed": "also the layer choice, the X values and the order"}


def _sft_help(name: str) -> str:
    return help_text(name, _SFT_NOTES.get(name)) if name in OPTIONS else _SFT_HELP[name]


def oracle_sft(argv: list[str]) -> None:
    """Build (or find in the cache) an SFT'd oracle adapter; print its folder and report."""
    from modules.oracle.sft import SFTOptions, build_sft_adapter

    parser = tool_parser("oracle-sft", "SFT format stage: teach an oracle adapter '[epistemic status: X] Answer'.")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options (configs/oracle_sft.yaml).")
    defaults, hints = SFTOptions(), get_type_hints(SFTOptions)
    for f in fields(SFTOptions):
        parser.add_argument(f"--{f.name}", type=hints[f.name], default=getattr(defaults, f.name), help=_sft_help(f.name))
    parser.add_argument("--output", type=str | None, default=None, help="Also copy the adapter folder here.")
    parser.add_argument("--force", type=bool, default=False, help="Rebuild even if the cache holds it.")
    parser.add_argument("--cache_dir", type=str | None, default=None,
                        help="Adapter cache (default $RLI_CACHE_DIR/oracle_adapters).")
    args = parse_args(parser, argv)
    values = {f.name: getattr(args, f.name) for f in fields(SFTOptions)}
    values["layer_percents"] = tuple(values["layer_percents"])
    options = SFTOptions(**values)
    folder = build_sft_adapter(options, cache_dir=args.cache_dir, force=args.force)
    print((folder / "sft_report.json").read_text())
    if args.output:
        shutil.copytree(folder, args.output, dirs_exist_ok=True)
        print(f"[oracle-sft] adapter copied to {args.output}")
    print(f"[oracle-sft] adapter: {folder}")


def _load_oracle(model_name: str, adapter: str | None, dtype: str, layers_of):
    """Base model + the oracle adapter (scheme checked); returns (model, tokenizer, format prompt)."""
    from peft import PeftModel

    from modules.models.loading import load_causal_lm
    from modules.oracle.scheme import adapter_scheme
    from modules.oracle.sft import resolve_oracle_adapter

    base, tokenizer = load_causal_lm(model_name, dtype)
    if not adapter or adapter == "none":
        return base, tokenizer, None
    source = resolve_oracle_adapter(adapter)
    scheme = adapter_scheme(source, layers_of(base))
    try:
        model = PeftModel.from_pretrained(base, source)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"could not load oracle adapter '{adapter}': {str(err).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, scheme.format_system_prompt


def vibes_check(argv: list[str]) -> None:
    """N examples, G sampled replies each, no training: prompt, replies, X, judge score, reward."""
    from modules.oracle.batch import build_oracle_batch
    from modules.oracle.calibration import calibration_summary, format_reliability_table, reliability_table
    from modules.oracle.format import FORMAT_SYSTEM_PROMPT
    from modules.oracle.generation import oracle_rollout
    from modules.oracle.injection import ActivationInjection
    from modules.oracle.reward import OracleReward
    from modules.oracle.scheme import DEFAULT_LAYER_PERCENTS, layers_for_percents
    from modules.rollout import SamplingConfig

    parser = tool_parser("vibes-check", "Oracle rollouts without training: replies, parsed confidence, judge, reward.")
    add_options(parser, model="embedded:smollm2", dtype="auto", samples_per_prompt=4, max_new_tokens=32,
                temperature=1.0, seed=0, layer_percents=list(DEFAULT_LAYER_PERCENTS), num_positions=8,
                notes={"model": "subject and oracle", "samples_per_prompt": "G, per row",
                       "seed": "also the layer choice"})
    parser.add_argument("--adapter", type=str | None, default="embedded:oracle-smollm2",
                        help="Oracle adapter: folder, Hub id, embedded:oracle-smollm2, or none.")
    parser.add_argument("--data", type=str, default=DEFAULT_ORACLE_HELDOUT, help="Oracle JSONL rows.")
    parser.add_argument("--num_examples", type=int, default=4, help="Rows to show (the first N).")
    parser.add_argument("--system_prompt", type=str | None, default=None,
                        help="Format system prompt (default: the adapter's own, else ours; '' for none).")
    parser.add_argument("--judge", type=InformativenessJudge | None, default=None,
                        help="Informativeness judge (default: token F1 against the reference answers).")
    parser.add_argument("--calibration_weight", type=float, default=1.0, help="lambda in i - lambda (X/10 - i)^2.")
    parser.add_argument("--parse_failure_penalty", type=float, default=-1.0, help="Reward of an unparseable reply.")
    args = parse_args(parser, argv)
    init = parser.instantiate_classes(args)
    if args.num_examples < 1 or args.samples_per_prompt < 1:
        raise UserError("num_examples and samples_per_prompt must be at least 1")
    rows = read_oracle_rows(args.data)[: args.num_examples]

    def layers_of(base):
        return list(layers_for_percents(base, args.layer_percents).values())

    model, tokenizer, adapter_prompt = _load_oracle(args.model, args.adapter, args.dtype, layers_of)
    if torch.cuda.is_available():
        model.to("cuda")
    system = args.system_prompt if args.system_prompt is not None else (adapter_prompt or FORMAT_SYSTEM_PROMPT)
    batch = build_oracle_batch(model, tokenizer, rows, args.layer_percents, args.num_positions,
                               system_prompt=system or None, seed=args.seed)
    injection = ActivationInjection(model)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, 1.0)
    out = oracle_rollout(model, tokenizer, batch.repeat(args.samples_per_prompt), injection, sampling, args.seed)
    reward = OracleReward(init.judge or TokenF1Judge(), args.calibration_weight, args.parse_failure_penalty)
    reward.attach(model, tokenizer, getattr(model, "disable_adapter", None) or nullcontext)
    reward.preflight()
    scores = reward.score(out)
    print(report_text(batch, out.responses, scores, args.samples_per_prompt))
    parsed = scores.features["parsed"].bool() & scores.valid
    summary = calibration_summary(scores.features["confidence"], scores.features["informativeness"], parsed)
    values = scores.values[scores.valid]
    se = float(values.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
    metrics = reward.metrics()
    print(f"=== {len(out.responses)} replies: reward {float(values.mean()):+.4f} ± {se:.4f} (SE), "
          f"parse failures {metrics['oracle/parse_failure_rate']:.1%}, Brier {summary['brier']:.4f}, "
          f"mean confidence {summary['mean_confidence']:.3f} vs informativeness {summary['mean_informativeness']:.3f}")
    print(format_reliability_table(reliability_table(scores.features["confidence"],
                                                     scores.features["informativeness"], parsed)))


def report_text(batch, responses: list[str], scores, group: int) -> str:
    """Each example's prompt and its G replies with X, informativeness and reward."""
    from modules.oracle.format import parse_reply

    lines = []
    for k, record in enumerate(batch.records):
        lines.append(f"--- example {k + 1}: layer {batch.layers[k]} ({batch.layer_percents[k]} %), "
                     f"{int((batch.positions[k] >= 0).sum())} positions")
        lines.append(f"  context  : {record['context']}")
        lines.append(f"  prompt   : {batch.prompts[k]!r}")
        lines.append(f"  reference: {' / '.join([record['answer'], *record.get('aliases', [])])}")
        for j in range(k * group, (k + 1) * group):
            parsed = parse_reply(responses[j])
            head = (f"X={parsed.confidence:2d} inform={float(scores.features['informativeness'][j]):.2f}"
                    if parsed.ok else f"parse failure ({parsed.failure})")
            judged = "" if bool(scores.valid[j]) else " [judge failed: masked]"
            lines.append(f"  [{head}; reward {float(scores.values[j]):+.3f}{judged}] {responses[j].strip()[:160]!r}")
    return "\n".join(lines)
