"""Command functions for SARM work (each takes ``argv``; ``cli.py`` registers them as sub-commands).

    python cli.py sarm-build                                  # the embedded SARM on SmolLM2 (cached)
    python cli.py sarm-pairs --out pairs.jsonl                # persona pairs from a prompt file
    python cli.py sarm-human-latents --demos demos.jsonl --out human.pt --latent_ids top:512
    python cli.py sarm-features --pairs pairs.jsonl           # candidate features (head weights, differences)
    python cli.py sarm-probe --pairs pairs.jsonl --features 12,40 --value 0 --out selected_features.json
    python cli.py sarm-best-of-n --n 4 --selected_features selected_features.json

``--sarm`` is a SARM folder, ``embedded:sarm-smollm2`` (the default) or a Hub id such as
``Schrieffer/Llama-SARM-4B``; ``--score_mode`` / ``--k`` win over its config, ``--tokenizer`` serves
folders without a tokenizer (the authors' training checkpoints). Problems a user can fix end in one
:class:`UserError` line.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import torch

from modules.errors import UserError
from modules.options import REQUIRED, add_options, parse_args, tool_parser

DEFAULT_SARM = "embedded:sarm-smollm2"


def _threads(count: int) -> None:
    if count > 0:
        torch.set_num_threads(count)


def _sarm_parser(prog: str, description: str, notes: dict | None = None, **defaults):
    """A tool's parser with the options of the SARM it loads, then the shared ones of ``defaults``."""
    parser = tool_parser(prog, description)
    add_options(parser, sarm=DEFAULT_SARM, dtype="auto", batch_size=8, threads=0, score_mode="auto", k=None,
                tokenizer=None, **defaults,
                notes={"batch_size": "sequences per SARM forward pass",
                       "tokenizer": "for a SARM folder without one; default: the folder's own", **(notes or {})})
    return parser


def _load_sarm(args, scores_text: bool = True):
    from modules.sarm.model import SARMRewardModel, missing_tokenizer_message

    rm = SARMRewardModel.load(args.sarm, dtype=args.dtype, score_mode=args.score_mode, k=args.k,
                              tokenizer=args.tokenizer)
    if scores_text and rm.tokenizer is None:  # fail before any work
        raise UserError(missing_tokenizer_message(rm.spec.folder))
    print(rm.describe(), flush=True)
    return rm


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def sarm_build(argv: list[str]) -> None:
    """Build the embedded SARM (SAE + Bradley-Terry head on SmolLM2) and print its figures."""
    from modules.sarm.embedded import BUILD_OPTION_HELP, BuildOptions, build_cached, build_embedded_sarm

    parser = tool_parser("sarm-build", "Build a SARM in miniature: TopK SAE on a middle layer, then a Bradley-Terry head.")
    defaults = BuildOptions()
    for f in fields(BuildOptions):
        value = getattr(defaults, f.name)
        kind = list[float] if isinstance(value, list) else type(value)
        parser.add_argument(f"--{f.name}", type=kind, default=value, help=BUILD_OPTION_HELP.get(f.name, f.name))
    parser.add_argument("--output", type=str | None, default=None,
                        help="Write the folder here (default: the cache that embedded:sarm-smollm2 reads).")
    parser.add_argument("--rebuild", type=bool, default=False, help="Build again even if the cache holds this build.")
    add_options(parser, threads=0)
    args = parse_args(parser, argv)
    _threads(args.threads)
    options = BuildOptions(**{f.name: getattr(args, f.name) for f in fields(BuildOptions)})
    if args.output:
        report = build_embedded_sarm(options, args.output)
        print(report.format())
        print(f"wrote {args.output}")
        return
    folder, built = build_cached(options, rebuild=args.rebuild)
    if not built:
        report = json.loads((folder / "build_report.json").read_text())
        print(f"cached build in {folder}: held-out pairwise accuracy {report['heldout_pairwise_accuracy']:.3f}, "
              f"FVE {report['fraction_variance_explained']:.3f}, dead latents {report['dead_latents']}/{report['latent_size']}"
              " (--rebuild to build again)")


def sarm_pairs(argv: list[str]) -> None:
    """Answer prompts under the honest (chosen) and sycophantic (rejected) personas: a pairs JSONL."""
    from datamodules.preference_pairs import write_jsonl
    from datamodules.prompts import DEFAULT_TRAIN, read_prompts
    from modules.models.loading import load_causal_lm
    from modules.sarm.embedded import generate_persona_pairs

    parser = tool_parser("sarm-pairs", "Preference pairs from persona-conditioned replies of a chat model.")
    add_options(parser, model="embedded:smollm2", prompts_file=DEFAULT_TRAIN, max_new_tokens=40, temperature=0.7,
                seed=0, batch_size=32, threads=1,
                notes={"model": "the one that answers", "seed": "the shipped held-out pairs used 10000",
                       "batch_size": "prompts per generate call"})
    parser.add_argument("--out", type=str, required=True, help="Output JSONL (prompt, chosen, rejected).")
    parser.add_argument("--openers", type=bool, default=True, help="Begin each reply with a stance sentence.")
    args = parse_args(parser, argv)
    _threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    pairs = generate_persona_pairs(model, tokenizer, read_prompts(args.prompts_file), args.max_new_tokens,
                                   args.temperature, args.batch_size, args.seed, args.openers)
    write_jsonl(args.out, pairs)
    print(f"wrote {len(pairs)} pairs to {args.out}")


def _latent_ids(spec: str, rm) -> list[int] | None:
    if spec == "all":
        return None
    if spec.startswith("top:"):
        count = int(spec.split(":", 1)[1])
        return torch.argsort(rm.score_weight.abs().cpu(), descending=True)[:count].sort().values.tolist()
    from modules.sarm.shaping import as_id_list

    return as_id_list(spec)


def sarm_human_latents(argv: list[str]) -> None:
    """Build the human-latent buffer (the KL term's reference) from demonstrations."""
    from datamodules.preference_pairs import read_demonstrations
    from modules.sarm.human_latents import build_human_latents, save_human_latents

    parser = _sarm_parser("sarm-human-latents", "SARM latents of human demonstrations, saved for the KL term.")
    parser.add_argument("--demos", type=str, required=True, help='Demonstrations JSONL: {"prompt", "response"} per line.')
    parser.add_argument("--out", type=str, required=True, help="Output .pt file (point the config's human_latents here).")
    parser.add_argument("--latent_ids", type=str, default="all",
                        help="Latents to keep: all, top:N (largest |score weight|), or ids '12,40,...'.")
    args = parse_args(parser, argv)
    _threads(args.threads)
    read_demonstrations(args.demos)  # a bad file fails before the model loads
    rm = _load_sarm(args)
    payload = build_human_latents(rm, args.demos, _latent_ids(args.latent_ids, rm), args.batch_size, args.sarm)
    save_human_latents(payload, args.out)
    print(f"wrote {args.out}: {payload['count']} demonstrations x {len(payload['latent_ids'])} latents")


def sarm_features(argv: list[str]) -> None:
    """Candidate features: score-head weights, and latent differences between chosen and rejected."""
    from datamodules.preference_pairs import read_preference_pairs
    from modules.sarm.probes import difference_candidates, head_candidates, score_pairs

    parser = _sarm_parser("sarm-features", "Candidate SARM features to control.", pairs=None, output=None,
                          notes={"output": "the lists"})
    parser.add_argument("--top", type=int, default=10, help="Features listed per direction.")
    args = parse_args(parser, argv)
    _threads(args.threads)
    pairs = read_preference_pairs(args.pairs) if args.pairs else None
    rm = _load_sarm(args, scores_text=bool(pairs))
    report = {"sarm": args.sarm, "head": head_candidates(rm, args.top)}
    print("score head, most negative weights: " + ", ".join(f"{r['feature']} ({r['weight']:+.3f})" for r in report["head"]["negative"]))
    print("score head, most positive weights: " + ", ".join(f"{r['feature']} ({r['weight']:+.3f})" for r in report["head"]["positive"]))
    if pairs:
        report["differences"] = difference_candidates(rm, score_pairs(rm, pairs, args.batch_size), args.top)
        for side in ("rejected_heavy", "chosen_heavy"):
            print(f"{side.replace('_', '-')} latents over {len(pairs)} pairs (mean chosen - rejected, w*diff):")
            for r in report["differences"][side]:
                print(f"  {r['feature']:>6}  {r['difference']:+.3f}  rates {r['rate_chosen']:.2f}/{r['rate_rejected']:.2f}"
                      f"  w*diff {r['contribution']:+.3f}")
    _write_json(args.output, report)


def sarm_probe(argv: list[str]) -> None:
    """Causal clamping probe; writes ``selected_features.json`` for a PPO config."""
    from datamodules.preference_pairs import read_preference_pairs
    from modules.sarm.probes import clamp_probe, score_pairs
    from modules.sarm.shaping import as_float_list, as_id_list, check_feature_ids, feature_thresholds

    parser = _sarm_parser("sarm-probe", "Clamp features one at a time: change in reward and pairwise accuracy.",
                          pairs=REQUIRED)
    parser.add_argument("--features", type=str, required=True, help="Feature ids, '12,40,...'.")
    parser.add_argument("--value", type=float, default=0.0, help="Clamp (or cap) value.")
    parser.add_argument("--mode", type=str, default="set", help="set (clamp to the value) or cap (at most the value).")
    parser.add_argument("--min_accuracy_gain", type=float, default=0.0,
                        help="Select features whose clamp raises pairwise accuracy by at least this much.")
    parser.add_argument("--tau", type=str, default="2.0", help="tau_values written for the selected features (one or one each).")
    parser.add_argument("--alpha", type=str, default="0.1", help="alpha_values written for the selected features.")
    parser.add_argument("--out", type=str, default="selected_features.json", help="Where to write the selection.")
    args = parse_args(parser, argv)
    _threads(args.threads)
    if args.mode not in ("set", "cap"):
        raise UserError(f"--mode must be set or cap, got '{args.mode}'")
    features = as_id_list(args.features)
    pairs = read_preference_pairs(args.pairs)
    rm = _load_sarm(args)
    check_feature_ids(features, rm.latent_size, "--features")
    scores = score_pairs(rm, pairs, args.batch_size)
    results = [clamp_probe(rm, scores, f, args.value, args.mode) for f in features]
    print(f"{'feature':>8} {'d reward chosen':>16} {'d reward rejected':>18} {'accuracy':>17} {'rates c/r':>10}")
    for r in results:
        print(f"{r.feature:>8} {r.reward_change_chosen:>+16.4f} {r.reward_change_rejected:>+18.4f} "
              f"{r.accuracy_before:>7.3f} -> {r.accuracy_after:.3f} {r.rate_chosen:>5.2f}/{r.rate_rejected:.2f}")
    selected = [r.feature for r in results if r.accuracy_change >= args.min_accuracy_gain]
    taus, alphas = as_float_list(args.tau), as_float_list(args.alpha)
    if selected and len(taus) == len(features) and len(features) > 1:
        taus = [t for f, t in zip(features, taus) if f in selected]
    if selected and len(alphas) == len(features) and len(features) > 1:
        alphas = [a for f, a in zip(features, alphas) if f in selected]
    selected, taus, alphas = feature_thresholds(selected, taus if selected else [], alphas if selected else [])
    payload = {"penalize_features": selected, "tau_values": taus, "alpha_values": alphas,
               "sarm": args.sarm, "pairs": args.pairs, "clamp_value": args.value, "mode": args.mode,
               "probes": [r.as_dict() for r in results],
               "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_json(args.out, payload)
    print(f"selected {len(selected)} of {len(features)} features: {selected}")


def sarm_best_of_n(argv: list[str]) -> None:
    """Best-of-N reranking with and without the controls: rewards, feature rates, replies."""
    from datamodules.prompts import DEFAULT_HELDOUT, read_prompts
    from modules.models.loading import load_causal_lm
    from modules.rollout import SamplingConfig
    from modules.sarm.model import LatentControl
    from modules.sarm.probes import best_of_n
    from modules.sarm.reward import read_selected_features
    from modules.sarm.shaping import as_float_list, as_id_list, feature_thresholds

    parser = _sarm_parser("sarm-best-of-n", "Best-of-N under the SARM, picked with and without the controls.",
                          prompts_file=DEFAULT_HELDOUT, max_prompts=8, max_new_tokens=48, temperature=1.0, seed=0,
                          output=None)
    parser.add_argument("--policy", type=str, default="embedded:smollm2", help="The model that samples replies.")
    parser.add_argument("--n", type=int, default=4, help="Samples per prompt.")
    parser.add_argument("--selected_features", type=str | None, default=None, help="A selected_features.json.")
    parser.add_argument("--penalize_features", type=str | None, default=None, help="Penalised feature ids.")
    parser.add_argument("--tau_values", type=str | None, default=None, help="Thresholds (one, or one per feature).")
    parser.add_argument("--alpha_values", type=str | None, default=None, help="Penalties (one, or one per feature).")
    parser.add_argument("--clamp_features", type=str | None, default=None, help="Features clamped in the RM.")
    parser.add_argument("--clamp_values", type=str | None, default=None, help="Their values.")
    args = parse_args(parser, argv)
    _threads(args.threads)
    selected = read_selected_features(args.selected_features) if args.selected_features else {}
    features, taus, alphas = feature_thresholds(
        as_id_list(args.penalize_features if args.penalize_features is not None else selected.get("penalize_features")),
        as_float_list(args.tau_values if args.tau_values is not None else selected.get("tau_values")),
        as_float_list(args.alpha_values if args.alpha_values is not None else selected.get("alpha_values")))
    control = LatentControl.from_lists(as_id_list(args.clamp_features), as_float_list(args.clamp_values))
    prompts = read_prompts(args.prompts_file)
    prompts = prompts[: args.max_prompts] if args.max_prompts else prompts
    rm = _load_sarm(args)
    policy, tokenizer = load_causal_lm(args.policy, args.dtype)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, 1.0)
    report = best_of_n(policy, tokenizer, rm, prompts, args.n, sampling, args.seed, control, features, taus, alphas,
                       args.batch_size)
    print(report.format())
    _write_json(args.output, {"n": report.n, "prompts": report.prompts, "features": report.features,
                              "plain": report.plain, "controlled": report.controlled})
