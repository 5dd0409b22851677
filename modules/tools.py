"""``cli.py generate`` and ``cli.py evaluate``: use a trained steering vector outside training.

    python cli.py generate --vector RUN/steering_vector.pt --prompt "I think 0.1 + 0.2 = 0.3 exactly. Right?"
    python cli.py generate --vector RUN/steering_vector.pt --prompts_file my_prompts.txt --scale 1.5
    python cli.py evaluate --vector RUN/steering_vector.pt --samples_per_prompt 2
    python cli.py evaluate --vector RUN/steering_vector.pt \\
        --judge.class_path modules.judges.openai_compat.OpenAICompatibleJudge \\
        --judge.init_args.base_url http://127.0.0.1:8000/v1 --judge.init_args.model my-judge
"""

from __future__ import annotations

import json
from argparse import ArgumentError

import torch
from jsonargparse import ArgumentParser

from datamodules.prompts import DEFAULT_HELDOUT, encode_prompts, read_prompts
from modules.errors import UserError, describe_config_error
from modules.judges.base import Judge
from modules.models.steering_io import load_steered_model, read_steering_vector


def _parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"cli.py {prog}", description=description, exit_on_error=False)
    parser.add_argument("--vector", type=str, required=True, help="A steering_vector.pt (or vectors/stepN.pt) file.")
    parser.add_argument("--model", type=str | None, default=None, help="Base model (default: the one in the file).")
    parser.add_argument("--prompts_file", type=str | None, default=None, help="Prompts, .txt or .jsonl.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens per reply.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (the same for both arms).")
    parser.add_argument("--dtype", type=str, default="auto", help="auto, bfloat16, float16 or float32.")
    return parser


def _parse(parser: ArgumentParser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        raise UserError(describe_config_error(str(err))) from None


def generate(argv: list[str]) -> None:
    """Print replies with the vector off and on, same sampling seed."""
    parser = _parser("generate", "Replies of the base model with a steering vector off and on.")
    parser.add_argument("--prompt", type=str, action="append", default=[], help="A prompt (repeat the flag for more).")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply alpha by this (explore strengths).")
    args = _parse(parser, argv)
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


def evaluate(argv: list[str]) -> None:
    """Held-out report (reward on vs off, KL, lengths) for a saved vector."""
    parser = _parser("evaluate", "Held-out evaluation of a saved steering vector.")
    parser.add_argument("--samples_per_prompt", type=int, default=2, help="Replies per prompt and arm.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call.")
    parser.add_argument("--judge", type=Judge | None, default=None,
                        help="Judge (default: the base model itself as a local judge).")
    parser.add_argument("--reward_mode", type=str | None, default=None, help="loglik or contrast (default: as trained).")
    parser.add_argument("--output", type=str | None, default=None, help="Also write the report as JSON here.")
    args = _parse(parser, argv)
    init = parser.instantiate_classes(args)
    payload = read_steering_vector(args.vector)
    meta = payload["metadata"]
    config = dict(meta.get("config", {}))
    from modules.evaluation import evaluate_intervention
    from modules.steering_rl import SteeringVectorRL

    keep = {"hook_layer", "hook_point", "steer_positions", "steer_last_k", "reward_mode", "judge_persona",
            "counter_persona", "reward_length_normalize"}
    options = {k: v for k, v in config.items() if k in keep}
    if args.reward_mode:
        options["reward_mode"] = args.reward_mode
    module = SteeringVectorRL(model=args.model or meta["base_model"], dtype=args.dtype, judge=init.judge,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, **options)
    module.steering_vector.load_(payload["v"], payload["alpha"])
    if torch.cuda.is_available():
        module.to("cuda")
        module.judge.to("cuda")
    module.preflight()
    prompts = read_prompts(args.prompts_file or DEFAULT_HELDOUT)
    report = evaluate_intervention(module, prompts, args.samples_per_prompt, args.seed, args.batch_size)
    print(report.format())
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report.as_dict(), f, indent=2)
