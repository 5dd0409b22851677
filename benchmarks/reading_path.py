"""What a reader follows through one update of each method: project files and lines touched.

Each method is built on the tests' tiny random Llama (``tests/conftest.py``: 4 layers, hidden 64,
SmolLM2's tokenizer) with the tests' cheap options, and trained for ONE update through the real
Lightning loop (``tests.helpers.fit``, ``total_updates=1``; with ``--update N``, N updates of which
only the last is recorded, which leaves out what the first update does once, such as loading the
SARM on its first call). A wrapper around the module's ``training_step`` turns on a call profiler
(``sys.setprofile``, and ``threading.setprofile`` for the judge's background thread) at entry and
off at exit; every Python function whose code lives in the
project's ``modules/``, ``callbacks/`` or ``datamodules/`` and is called in between is recorded
(``tests/``, site-packages and the standard library are not counted). Each method runs in a fresh
Python process, so what an earlier method started or imported (the judge's event-loop thread, a
lazy import, a say-once warning) does not change the next one's figures.

Methods and their rewards (the cheapest the tests use, so the trace is the method's own path):

- ``SteeringVectorRL`` (``modules/steering_rl.py``): ``tests.helpers.tiny_module``; reward: the
  loglik persona reward over ``tests.helpers.LengthJudge`` (a reply's character count).
- ``PPO`` (``modules/ppo.py``): ``tests.test_ppo.tiny_ppo``; reward: ``PersonaReward(LengthJudge(),
  "loglik")`` (``tests.test_ppo.length_reward``).
- ``SARMFeaturePPO`` (``modules/sarm_ppo.py``): PPO's options, reward: ``SARMReward`` on a random tiny
  SARM (``modules.sarm.random_sarm``) with ``tests/test_sarm_ppo.py``'s shaping (feature penalties on
  latents 3 and 7, KL to a human-latent buffer built from eight demonstrations): the method's reward.
- ``OracleGRPO`` (``modules/oracle_grpo.py``): ``tests.test_oracle_grpo.tiny_oracle`` on a random
  r=4 start adapter and ``datamodules/data/oracle_train.jsonl``; reward: the default ``OracleReward``
  with its deterministic token-F1 informativeness judge (the method's reward, as the tests use it).

Figures per method:

- ``files``: distinct project files holding at least one called function;
- ``file lines``: the sum of those files' whole lengths (``wc -l``), the "files and lines" reading;
- ``function lines``: lines of the functions actually called. A called function spans its code
  object's first line (``co_firstlineno``: the first decorator or the ``def``) to the last line
  holding its bytecode (so its docstring counts, trailing comments after the last statement do
  not); spans are united per file, so a nested function or lambda inside a called function is not
  counted twice. Module bodies run by a lazy import (``<module>``) are not functions and are left out;
  so are functions the dataclass machinery generates (they have no project file).
- ``functions``: distinct code objects called.

    .venv/bin/python benchmarks/reading_path.py [--method ppo ...] [--update N] [--json OUT]

Needs the tests' tokenizer (SmolLM2's, from the embedded model cache or ``RLI_TEST_TOKENIZER``);
runs on the CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

PROJECT_DIRS = ("modules", "callbacks", "datamodules")
"""Top-level folders of the repository whose code counts as the project's own."""


def project_file(filename: str) -> str | None:
    """The repository-relative path of ``filename`` when it lies under one of :data:`PROJECT_DIRS`."""
    try:
        relative = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return relative.as_posix() if relative.parts and relative.parts[0] in PROJECT_DIRS else None


def code_span(code: CodeType) -> range:
    """Source lines of a function: its first line to the last line that holds its bytecode."""
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return range(code.co_firstlineno, max([code.co_firstlineno, *lines]) + 1)


class CallRecorder:
    """Records the code objects of project functions called while :attr:`active` is set."""

    def __init__(self) -> None:
        self.active = False
        self.codes: set[CodeType] = set()
        self._known: dict[str, str | None] = {}

    def __call__(self, frame, event: str, arg) -> None:
        if not self.active or event != "call":
            return
        code = frame.f_code
        if code.co_name == "<module>" or code in self.codes:
            return
        filename = code.co_filename
        if filename not in self._known:
            self._known[filename] = project_file(filename)
        if self._known[filename] is not None:
            self.codes.add(code)

    def traced(self, step: Callable, when: Callable[[], bool]) -> Callable:
        """``step`` (a bound ``training_step``) with recording on from its entry to its exit, in the
        calls where ``when()`` holds at entry."""
        def training_step(*args, **kwargs):
            if not when():
                return step(*args, **kwargs)
            previous = sys.getprofile()
            self.active = True
            sys.setprofile(self)
            try:
                return step(*args, **kwargs)
            finally:
                sys.setprofile(previous)
                self.active = False

        return training_step


@dataclass
class FileReading:
    """One touched file: its whole length and the lines of its functions that ran."""

    path: str
    file_lines: int
    function_lines: int
    functions: int
    names: list[str] = field(default_factory=list)
    """``qualname:first-last`` of each called function, in source order (JSON only)."""


@dataclass
class Reading:
    """What one update of a method touched."""

    method: str
    files: list[FileReading] = field(default_factory=list)

    @property
    def file_lines(self) -> int:
        return sum(f.file_lines for f in self.files)

    @property
    def function_lines(self) -> int:
        return sum(f.function_lines for f in self.files)

    @property
    def functions(self) -> int:
        return sum(f.functions for f in self.files)

    @staticmethod
    def from_dict(data: dict) -> "Reading":
        return Reading(data["method"], [FileReading(**f) for f in data["touched"]])

    def as_dict(self) -> dict:
        return {"method": self.method, "files": len(self.files), "file_lines": self.file_lines,
                "function_lines": self.function_lines, "functions": self.functions,
                "touched": [vars(f) for f in self.files]}


def reading_of(method: str, codes: set[CodeType]) -> Reading:
    """Per-file figures of the recorded code objects, files sorted by size (largest first)."""
    by_file: dict[str, list[CodeType]] = {}
    for code in codes:
        by_file.setdefault(project_file(code.co_filename), []).append(code)
    files = []
    for path, file_codes in by_file.items():
        lines: set[int] = set()
        for code in file_codes:
            lines.update(code_span(code))
        whole = len((ROOT / path).read_text().splitlines())
        names = [f"{c.co_qualname}:{code_span(c).start}-{code_span(c).stop - 1}"
                 for c in sorted(file_codes, key=lambda c: (c.co_firstlineno, c.co_qualname))]
        files.append(FileReading(path, whole, len(lines), len(file_codes), names))
    files.sort(key=lambda f: (-f.file_lines, f.path))
    return Reading(method, files)


# -- the methods, built as the tests build them -------------------------------------------------
def tiny_model(folder: Path) -> str:
    """The tests' tiny random Llama on SmolLM2's tokenizer (``tests/conftest.py``)."""
    from modules.models import embedded
    from tests.conftest import _tiny

    tokenizer = os.environ.get("RLI_TEST_TOKENIZER") or embedded.cached_folder("smollm2")
    return _tiny("llama", tokenizer, folder / "tiny_llama")


def steering(model_dir: str, work: Path, updates: int):
    from tests.helpers import tiny_module

    return tiny_module(model_dir, total_updates=updates), {}


def ppo(model_dir: str, work: Path, updates: int):
    from tests.test_ppo import tiny_ppo

    return tiny_ppo(model_dir, total_updates=updates), {}


def sarm_ppo(model_dir: str, work: Path, updates: int):
    """SARMFeaturePPO with PPO's tiny options and ``tests/test_sarm_ppo.py``'s SARM reward."""
    from transformers import AutoTokenizer

    from modules.sarm.human_latents import build_human_latents, save_human_latents
    from modules.sarm.model import SARMRewardModel
    from modules.sarm.random_sarm import write_random_sarm
    from modules.sarm.reward import SARMReward
    from modules.sarm_ppo import SARMFeaturePPO
    from tests.helpers import PROMPTS

    sarm = write_random_sarm(work / "sarm", hidden_size=32, layers=2, latent_size=48, k=8,
                             tokenizer=AutoTokenizer.from_pretrained(model_dir), use_topk=False, seed=5)
    demos = work / "demos.jsonl"
    replies = ["No, that is wrong.", "Let me check.", "It has issues.", "Not quite."] * 2
    demos.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in zip(PROMPTS, replies)))
    human = save_human_latents(build_human_latents(SARMRewardModel.load(str(sarm), device="cpu"), str(demos),
                                                   progress=False), work / "human.pt")
    reward = SARMReward(model=str(sarm), device="cpu", penalize_features=[3, 7], tau_values=[0.0],
                        alpha_values=[0.5], kl_beta=0.1, human_latents=str(human), disc_batch_size=4)
    module = SARMFeaturePPO(model=model_dir, dtype="float32", reward=reward, lora_r=4, max_new_tokens=5,
                            batch_size=2, grad_accum=2, total_updates=updates, lr=1e-2, ppo_epochs=2, num_minibatches=2)
    return module, {}


def oracle_grpo(model_dir: str, work: Path, updates: int):
    """OracleGRPO on a random start adapter (``tests/test_oracle_grpo.py``'s ``start_adapter``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from modules.models.adapters import LoRAPolicy
    from tests.test_oracle_grpo import TRAIN, tiny_oracle

    lora = LoRAPolicy(AutoModelForCausalLM.from_pretrained(model_dir), r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter = str(lora.save(work / "start_adapter"))
    return tiny_oracle(model_dir, adapter, total_updates=updates), {"train_file": str(ROOT / TRAIN),
                                                              "jsonl_field": "question"}


METHODS: dict[str, tuple[str, Callable]] = {
    "steering": ("SteeringVectorRL", steering),
    "ppo": ("PPO", ppo),
    "sarm": ("SARMFeaturePPO", sarm_ppo),
    "oracle": ("OracleGRPO", oracle_grpo),
}


def measure(key: str, model_dir: str, work: Path, update: int = 1) -> Reading:
    """Build one method, fit it for ``update`` updates with the last one's ``training_step`` recorded,
    and read the record (run it in a fresh process: see :func:`measure_apart`)."""
    import logging
    import warnings

    import torch

    from tests.helpers import fit

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    name, build = METHODS[key]
    folder = work / key
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module, data = build(model_dir, folder, update)
    recorder = CallRecorder()
    module.training_step = recorder.traced(module.training_step, lambda: module.rollout_batches_done == update - 1)
    threading.setprofile(recorder)  # threads started from here on (the judge's event loop) record too
    try:
        fit(module, folder, **data)
    finally:
        threading.setprofile(None)
    if not recorder.codes:
        raise RuntimeError(f"{name}: training_step was never called")
    return reading_of(name, recorder.codes)


def measure_apart(key: str, model_dir: str, work: Path, update: int) -> Reading:
    """:func:`measure` in a fresh Python process, so that nothing one method started or imported first
    (the judge's event-loop thread, a lazy import, a say-once warning) hides it from the next."""
    out = work / f"{key}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--one", key, "--model_dir", model_dir,
               "--work", str(work), "--update", str(update)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {key} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return Reading.from_dict(json.loads(out.read_text()))


def markdown(readings: list[Reading]) -> str:
    """The summary table, then each method's touched files (largest first)."""
    out = ["| method | files | lines of touched files | lines of executed functions | functions called |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {r.method} | {len(r.files)} | {r.file_lines:,} | {r.function_lines:,} | {r.functions} |"
            for r in readings]
    for r in readings:
        out += ["", f"**{r.method}** (file lines / executed-function lines / functions):", ""]
        out += [f"- {f.path}: {f.file_lines} / {f.function_lines} / {f.functions}" for f in r.files]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to measure (default: all four)")
    parser.add_argument("--update", type=int, default=1,
                        help="record the N-th update (earlier ones run untraced; 2 leaves out first-use loading)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)  # a child process: one method
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.update < 1:
        parser.error(f"--update must be at least 1, got {args.update}")
    if args.one:
        reading = measure(args.one, args.model_dir, Path(args.work), args.update)
        (Path(args.work) / f"{args.one}.json").write_text(json.dumps(reading.as_dict()))
        return
    with tempfile.TemporaryDirectory(prefix="reading_path_") as tmp:
        work = Path(tmp)
        model_dir = tiny_model(work)
        readings = [measure_apart(key, model_dir, work, args.update) for key in args.method]
    print(markdown(readings))
    if args.json:
        from modules.files import write_json_atomically

        write_json_atomically(args.json, {"root": str(ROOT), "update": args.update,
                                          "readings": [r.as_dict() for r in readings]})


if __name__ == "__main__":
    main()
