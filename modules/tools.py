"""``cli.py generate`` and ``cli.py evaluate``: use saved steering vectors outside training.

    python cli.py generate --vector RUN/steering_vector.pt --prompt "I think 0.1 + 0.2 = 0.3 exactly. Right?"
    python cli.py generate --vector RUN/steering_vector.pt --prompts_file my_prompts.txt --scale 1.5
    python cli.py evaluate --vector RUN/steering_vector.pt --samples_per_prompt 2
    python cli.py evaluate --vector RUN/steering_vector.pt --scales 0.5 1 1.5 \\
        --caa steering_runs/caa/caa.pt --caa_multipliers 1 2 4 8 --files other=OTHER.pt --output_dir DIR
    python cli.py evaluate --vector RUN/steering_vector.pt \\
        --eval_judge.class_path modules.judges.openai_compat.OpenAICompatibleJudge \\
        --eval_judge.init_args.base_url http://127.0.0.1:8000/v1 --eval_judge.init_args.model my-judge
    python cli.py evaluate --vector RUN/steering_vector.pt --instructions evaluation training

``evaluate`` compares interventions on the same held-out prompts and sampling seeds
(:func:`modules.evaluation.compare_interventions`): the vector off; the trained vector at several
scales of ``alpha·v``; a CAA vector (``cli.py caa``) at several multipliers; any other saved vector
files; the unsteered model told in its system prompt to answer as a persona would (``--instructions``:
what asking buys, the bar a vector is held to). Each is scored by the training judge and by an
evaluation judge (other persona wording by default, or another judge); it prints a table and replies side by side, and with ``--output_dir``
writes ``comparison.json``, ``comparison.txt`` and ``frontier.png`` (reward vs KL).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from datamodules.prompts import DEFAULT_HELDOUT, encode_prompts, read_prompts
from modules.errors import UserError
from modules.files import write_json_atomically, write_text_atomically
from modules.judges.base import Judge
from modules.models.steering_io import load_steered_model, read_steering_vector
from modules.options import add_options, parse_args, tool_parser


def _parser(prog: str, description: str, vector_required: bool = True, notes: dict | None = None,
            **defaults) -> ArgumentParser:
    """``--vector`` and the shared options of both tools, then those of ``defaults`` (:mod:`modules.options`)."""
    parser = tool_parser(prog, description)
    parser.add_argument("--vector", type=str if vector_required else str | None, required=vector_required,
                        default=None, help="A steering_vector.pt (or vectors/updateN.pt) file.")
    add_options(parser, model=None, prompts_file=None, seed=0, dtype="auto", **defaults,
                notes={"model": "default: the one in the file", "seed": "the same for every arm", **(notes or {})})
    return parser


def generate(argv: list[str]) -> None:
    """Print replies with the vector off and on, same sampling seed."""
    parser = _parser("generate", "Replies of the base model with a steering vector off and on.",
                     notes={"prompts_file": "besides the --prompt ones"}, max_new_tokens=64, temperature=0.7)
    parser.add_argument("--prompt", type=str, action="append", default=[], help="A prompt (repeat the flag for more).")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply alpha by this (explore strengths).")
    args = parse_args(parser, argv)
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts_file PATH")
    model, tokenizer, steering = load_steered_model(args.vector, args.model, args.dtype)
    with torch.no_grad():
        steering.vector.alpha.mul_(args.scale)
    from modules.rollout import SamplingConfig, rollout

    batch = encode_prompts(tokenizer, prompts)
    ids, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, 1.0)
    on = rollout(model, tokenizer, prompts, ids, mask, sampling, args.seed, steering.prompt_length(ids.shape[1]))
    with steering.disabled():
        off = rollout(model, tokenizer, prompts, ids, mask, sampling, args.seed)
    for prompt, reply_off, reply_on in zip(prompts, off.responses, on.responses):
        print(f"=== {prompt}\n[off] {reply_off}\n[ on] {reply_on}\n")


def _named_files(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` or ``PATH`` (named after the file; a folder's name for steering_vector.pt)."""
    named = []
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if not name:
            p = Path(path)
            name = p.parent.name if p.stem == "steering_vector" and p.parent.name else p.stem
        named.append((name, path))
    return named


def instructions(module, items: list[str]) -> list[tuple[str, str]]:
    """``evaluation`` -> the evaluation judge's sycophant persona, ``training`` -> each training
    persona, ``NAME=TEXT`` -> itself: the (name, system prompt) of each instructed arm."""
    training = module.reward.personas[: module.reward.num_pairs]
    named = []
    for item in items:
        if item == "evaluation":
            named.append(("evaluation persona", module.eval_reward.personas[0]))
        elif item == "training":
            named += [(f"training persona {i + 1}", text) for i, text in enumerate(training)]
        elif "=" in item and item.split("=", 1)[0].strip() and item.split("=", 1)[1].strip():
            name, text = item.split("=", 1)
            named.append((name.strip(), text.strip()))
        else:
            raise UserError(f"--instructions item {item!r}: give `evaluation`, `training` or NAME=TEXT")
    return named


def vector_arm(module, name: str, payload: dict, scale: float, method: str):
    """An arm of the comparison: ``module``'s policy steered by the file's ``alpha·v`` times ``scale``."""
    from modules.evaluation import Intervention

    meta = payload["metadata"]

    def enter():
        return module.using_vector(payload["v"], payload["alpha"] * scale, meta["hook_layer"], meta["hook_point"],
                                   meta.get("steer_positions", "all"), meta.get("steer_last_k", 1))

    return Intervention(name, enter, method, scale)


def evaluate(argv: list[str]) -> None:
    """Compare saved vectors (and CAA, and scales) on held-out prompts: table, JSON, frontier plot."""
    parser = _parser("evaluate", "Compare steering vectors on held-out prompts: the same prompts and sampling "
                     "seeds in every arm, a training and an evaluation judge, exact KL, lengths.", False,
                     notes={"prompts_file": "default: the held-out prompts", "samples_per_prompt": "in each arm",
                            "batch_size": "prompts per generate call", "max_new_tokens": "default: as trained",
                            "temperature": "default: as trained", "output": "the comparison"},
                     samples_per_prompt=1, max_prompts=0, batch_size=16, max_new_tokens=None, temperature=None,
                     output=None)
    parser.add_argument("--scales", type=list[float], default=[1.0], help="Multiples of the --vector's alpha·v.")
    parser.add_argument("--caa", type=str | None, default=None, help="A CAA vector file (python cli.py caa).")
    parser.add_argument("--caa_multipliers", type=list[float], default=[1.0, 2.0, 4.0, 8.0],
                        help="Multiples of the CAA vector.")
    parser.add_argument("--files", type=list[str], default=[],
                        help="Other saved vector files, as PATH or NAME=PATH, each a curve of --file_scales.")
    parser.add_argument("--file_scales", type=list[float], default=[1.0], help="Multiples of each --files vector.")
    parser.add_argument("--instructions", type=list[str], default=[],
                        help="Instructed arms: the vector off, the policy told how to answer by a system prompt: "
                             "`evaluation` (the evaluation judge's sycophant persona), `training` (each training "
                             "persona) or NAME=TEXT. The judges read the plain prompt.")
    parser.add_argument("--show_examples", type=int, default=3, help="Prompts whose replies are shown side by side.")
    parser.add_argument("--judge", type=Judge | None, default=None,
                        help="Training judge (default: the base model itself as a local judge).")
    parser.add_argument("--reward_mode", type=str | None, default=None, help="loglik or contrast (default: as trained).")
    parser.add_argument("--eval_judge", type=Judge | None, default=None,
                        help="Evaluation judge backend (default: the training judge's, with other personas).")
    parser.add_argument("--eval_persona", type=str | None, default=None,
                        help="Evaluation judge's persona (default: as trained, else other wording than training's).")
    parser.add_argument("--eval_counter_persona", type=str | None, default=None,
                        help="Evaluation judge's counter-persona (contrast mode).")
    parser.add_argument("--output_dir", type=str | None, default=None,
                        help="Write comparison.json, comparison.txt and frontier.png here.")
    args = parse_args(parser, argv)
    files = _named_files(args.files)
    if not (args.vector or args.caa or files):
        raise UserError("give --vector PATH, --caa PATH or --files PATH ... (the vectors to compare)")
    for name, value in (("samples_per_prompt", args.samples_per_prompt), ("batch_size", args.batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    init = parser.instantiate_classes(args)
    payloads = {"vector": read_steering_vector(args.vector) if args.vector else None,
                "caa": read_steering_vector(args.caa) if args.caa else None}
    payloads.update({f"file:{name}": read_steering_vector(path) for name, path in files})
    base = next(p for p in payloads.values() if p is not None)
    module = _module_for(base, args, init)
    arms = _arms(module, args, payloads, files)
    prompts = read_prompts(args.prompts_file or DEFAULT_HELDOUT)
    prompts = prompts[: args.max_prompts] if args.max_prompts else prompts
    from modules.evaluation import compare_interventions

    comparison, _ = compare_interventions(module, prompts, arms, None, args.samples_per_prompt, args.seed,
                                          args.batch_size, None, args.show_examples)
    text = comparison.format()
    print(text)
    data = comparison.as_dict()
    data["vectors"] = {"vector": args.vector, "caa": args.caa, "files": dict(files)}
    if args.output:
        write_json_atomically(args.output, data)
    if args.output_dir:
        out = Path(args.output_dir)
        write_json_atomically(out / "comparison.json", data)
        write_text_atomically(out / "comparison.txt", text + "\n")
        from modules.frontier import plot_frontier

        written = plot_frontier(data, out / "frontier.png")
        print(f"written to {out}/: comparison.json, comparison.txt" + (", frontier.png" if written else ""))


def _module_for(base: dict, args, init):
    """A SteeringVectorRL over the base model with the training judge and options of ``base``."""
    from modules.steering_rl import SteeringVectorRL

    meta = base["metadata"]
    config = dict(meta.get("config", {}))
    keep = {"hook_layer", "hook_point", "steer_positions", "steer_last_k", "reward_mode", "judge_persona",
            "counter_persona", "reward_length_normalize", "eval_persona", "eval_counter_persona"}
    options = {k: v for k, v in config.items() if k in keep}
    options.update({k: meta[k] for k in ("hook_layer", "hook_point", "steer_positions", "steer_last_k") if k in meta})
    for name in ("reward_mode", "eval_persona", "eval_counter_persona"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    module = SteeringVectorRL(
        model=args.model or meta["base_model"], dtype=args.dtype, judge=init.judge, eval_judge=init.eval_judge,
        max_new_tokens=args.max_new_tokens or config.get("max_new_tokens", 64),
        temperature=args.temperature or config.get("temperature", 0.7), **options)
    if torch.cuda.is_available():
        module.to("cuda")
        module.reward.to("cuda")
        module.eval_reward.to("cuda")
    module.preflight()
    module.eval_reward.preflight()
    return module


def _arms(module, args, payloads: dict, files: list[tuple[str, str]]) -> list:
    from modules.evaluation import Intervention

    arms = [Intervention("vector off", module.reference, "off", 0.0, reference=True)]
    if payloads["vector"] is not None:
        arms += [vector_arm(module, f"trained ×{s:g}", payloads["vector"], s, "trained") for s in args.scales]
    if payloads["caa"] is not None:
        arms += [vector_arm(module, f"CAA ×{m:g}", payloads["caa"], m, "CAA") for m in args.caa_multipliers]
    for name, _ in files:
        arms += [vector_arm(module, f"{name} ×{s:g}", payloads[f"file:{name}"], s, name) for s in args.file_scales]
    arms += [Intervention(f"told: {name}", module.reference, f"told: {name}", system_prompt=text)
             for name, text in instructions(module, args.instructions)]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UserError(f"two arms have the same name ({names}): name the files with NAME=PATH")
    return arms
