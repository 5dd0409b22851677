"""Several nodes, proven on one CPU machine: two processes that Lightning takes for two nodes of one
process each (``--trainer.num_nodes 2 --trainer.devices 1 --trainer.strategy ddp``, gloo on
127.0.0.1) train, for every method, the same trainable tensors bit for bit as one node of two
processes (``--trainer.devices 2``), whichever way the nodes are told who they are: by hand
(LightningEnvironment: NODE_RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, WORLD_SIZE), by the variables
``srun`` sets (SLURMEnvironment) or by ``torchrun`` (TorchElasticEnvironment). A two-node run stopped
after update 2 resumes with ``--ckpt_path last`` as two nodes and ends where the uninterrupted run
ends. The launch recipes of ``docs/recipes/`` use only fields the CLI has.

Why bit for bit: a global rank's prompts and sampling seeds depend on the global rank only, and two
gloo ranks reduce the same tensors in the same order whether they are called two nodes or one.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.forked_cli import run_cli
from tests.helpers import free_port, prompt_file
from tests.test_oracle_grpo import TRAIN, oracle_config, start_adapter  # noqa: F401  (fixture)
from tests.test_sarm_ppo import sarm_config, sarm_files  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes"
HERE = "tests.test_multinode_cpu"  # how the runs import this file's callbacks
TOTAL = 3  # updates: checkpoints after each; the resume test stops after 2
LAUNCHER_VARIABLES = re.compile(r"^(SLURM_|TORCHELASTIC_|PMI_|PMIX_|OMPI_|LSB_|JSM_)|"
                                r"^(RANK|LOCAL_RANK|GROUP_RANK|NODE_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|"
                                r"MASTER_ADDR|MASTER_PORT)$")
"""What a launcher sets: left out of the tests' own environment, so that only what a test sets is seen."""


# -- callbacks the runs load by class path ------------------------------------------------------

class RecordCluster(L.Callback):
    """Writes ``<folder>/rank<global rank>.json``: the cluster environment Lightning picked and the
    ranks it gave this process, once the process group exists."""

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer.strategy.cluster_environment
        record = {"environment": type(environment).__name__, "node_rank": trainer.node_rank,
                  "local_rank": trainer.local_rank, "global_rank": trainer.global_rank,
                  "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                  "process_group_size": torch.distributed.get_world_size()}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class StopAfterUpdate(L.Callback):
    """Ends training after ``update`` rollout batches, as the module itself ends it after its last
    (the checkpoint callback runs after this one and still saves that update)."""

    def __init__(self, update: int):
        self.update = update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.rollout_batches_done >= self.update:
            trainer.should_stop = True


# -- configs ------------------------------------------------------------------------------------

LENGTH_REWARD = {"class_path": "modules.judges.rewards.PersonaReward",
                 "init_args": {"judge": {"class_path": "tests.helpers.LengthJudge"}, "mode": "loglik",
                               "length_normalize": False}}


def _method_config(method: str, folder: Path, model_dir: str, request) -> dict:
    """The tiniest config of ``method`` that makes ``TOTAL`` updates (at least two optimizer steps each
    for the LoRA methods); judges are :class:`tests.helpers.LengthJudge` (no model, deterministic)."""
    folder.mkdir(parents=True, exist_ok=True)
    if method == "steering":
        return {"model": {"class_path": "modules.steering_rl.SteeringVectorRL",
                          "init_args": dict(model=model_dir, hook_layer=1, max_new_tokens=3, batch_size=2,
                                            total_updates=TOTAL, lr=0.05, init_std=0.01, reward_mode="loglik",
                                            reward_length_normalize=False,
                                            judge={"class_path": "tests.helpers.LengthJudge"})},
                "data": {"class_path": "datamodules.prompts.PromptDataModule",
                         "init_args": {"train_file": prompt_file(folder / "data")}}}
    if method == "ppo":
        return {"model": {"class_path": "modules.ppo.PPO",
                          "init_args": dict(model=model_dir, dtype="float32", lora_r=4, max_new_tokens=3,
                                            batch_size=2, total_updates=TOTAL, lr=0.02, ppo_epochs=2,
                                            num_minibatches=2, reward=LENGTH_REWARD)},
                "data": {"class_path": "datamodules.prompts.PromptDataModule",
                         "init_args": {"train_file": prompt_file(folder / "data")}}}
    if method == "oracle":
        path = oracle_config(folder, model_dir, request.getfixturevalue("start_adapter"), total=TOTAL, data=TRAIN)
        return yaml.safe_load(path.read_text())
    sarm, human = request.getfixturevalue("sarm_files")
    return yaml.safe_load(sarm_config(folder, model_dir, sarm, human, total=TOTAL).read_text())


def write_config(folder: Path, base: dict, name: str = "config.yaml", extra_callbacks=()) -> Path:
    """``base`` as a DDP run on the CPU into ``folder/runs/r``, checkpointing every update and recording
    each process's cluster environment into ``folder/cluster_<name>/``."""
    config = yaml.safe_load(yaml.safe_dump(base))  # a copy
    config.update({"seed_everything": 0, "run_name": "r", "output_dir": str(folder / "runs")})
    trainer = config.setdefault("trainer", {})
    trainer.pop("logger", None)
    kept = [c for c in trainer.get("callbacks") or [] if not c["class_path"].endswith("EvenlySpacedCheckpoint")]
    trainer.update({"enable_progress_bar": False, "accelerator": "cpu", "strategy": "ddp", "callbacks": [
        {"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint", "init_args": {"num_checkpoints": TOTAL}},
        *kept, *extra_callbacks,
        {"class_path": f"{HERE}.RecordCluster", "init_args": {"folder": str(folder / f"cluster_{Path(name).stem}")}}]})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


# -- launching ----------------------------------------------------------------------------------

def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARIABLES.match(k)}
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def run_together(commands: list[list[str]], environments: list[dict[str, str]], logs: Path,
                 timeout_s: float = 600) -> None:
    """Start every command at once (each in its own process group) and wait for all. When one fails,
    the others are stopped (a node whose peer died would wait for it at the rendezvous)."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for i, (command, env) in enumerate(zip(commands, environments)):
        with open(logs / f"node{i}.log", "w") as out:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in processes):
            if any(p.returncode not in (None, 0) for p in processes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the group this test started: the launcher and its workers
                p.wait()
    if any(p.returncode != 0 for p in processes):
        tails = "\n".join(f"--- node {i} (exit {p.returncode})\n{(logs / f'node{i}.log').read_text()[-3000:]}"
                          for i, p in enumerate(processes))
        raise AssertionError(f"a node failed or ran over {timeout_s} s:\n{tails}")


def two_nodes(config: Path, *extra, launcher: str = "lightning") -> Path:
    """``cli.py fit --config config --trainer.num_nodes 2 --trainer.devices 1`` as two processes on
    this machine, each told it is a node by ``launcher``: ``lightning`` (every variable set by hand,
    LOCAL_RANK and WORLD_SIZE included), ``slurm`` (the variables ``srun --nodes 2 --ntasks-per-node 1``
    sets), or a recipe of docs/recipes run as a user runs it on two machines: ``by_hand.sh``
    (NODE_RANK, MASTER_ADDR, MASTER_PORT: Lightning starts a node's processes itself) or
    ``torchrun.sh`` (two torchrun agents meeting at a c10d rendezvous)."""
    port = str(free_port())
    args = [sys.executable, "cli.py", "fit", "--config", str(config), "--trainer.num_nodes", "2",
            "--trainer.devices", "1", *map(str, extra)]
    if launcher.endswith(".sh"):
        assert not extra, "a recipe passes its own arguments"
        common = dict(CONFIG=str(config), RUN_NAME="r", ACCELERATOR="cpu", NNODES="2", GPUS_PER_NODE="1")
        node = (dict(RDZV_HOST="127.0.0.1", RDZV_PORT=port, RDZV_ID=f"test{port}") if launcher == "torchrun.sh"
                else dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        commands = [["bash", str(RECIPES / launcher)]] * 2
        environments = [clean_environment(**common, **node, **({} if launcher == "torchrun.sh" else
                                                               {"NODE_RANK": str(n)})) for n in (0, 1)]
    elif launcher == "slurm":
        commands = [args] * 2
        environments = [clean_environment(SLURM_JOB_ID="4242", SLURM_JOB_NAME="rli", SLURM_NNODES="2",
                                          SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="127.0.0.1",
                                          SLURM_PROCID=str(n), SLURM_NODEID=str(n), SLURM_LOCALID="0",
                                          MASTER_PORT=port) for n in (0, 1)]
    else:
        commands = [args] * 2
        environments = [clean_environment(NODE_RANK=str(n), LOCAL_RANK="0", WORLD_SIZE="2",
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for n in (0, 1)]
    run_together(commands, environments, config.parent / f"logs_{config.stem}")
    return config.parent / "runs" / "r"


def one_node(config: Path, *extra) -> Path:
    """The same run as one node of two processes (Lightning starts the second one itself), in the
    same environment as the nodes: one thread per process (other thread counts split float sums
    otherwise and round differently: under fsdp2 a last-bit difference after update 1)."""
    args = ["cli.py", "fit", "--config", str(config), "--trainer.devices", "2", *map(str, extra)]
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=clean_environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return config.parent / "runs" / "r"


def records(config: Path) -> list[dict]:
    folder = config.parent / f"cluster_{config.stem}"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def checkpoint(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


def metric_rows(run: Path, columns=("step", "reward/mean", "loss")) -> list[list[str]]:
    with open(run / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("reward/mean")]
    return [[row.get(c) for c in columns] for row in rows]


def assert_same_tensors(a, b, where: str = "") -> None:
    """``a`` and ``b`` (nested dicts/lists of tensors and plain values) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def expected_records(environment: str, nodes: int) -> list[dict]:
    return [{"environment": environment, "node_rank": r if nodes == 2 else 0, "local_rank": 0 if nodes == 2 else r,
             "global_rank": r, "world_size": 2, "num_nodes": nodes, "process_group_size": 2} for r in range(2)]


# -- tests --------------------------------------------------------------------------------------

METHODS = ["steering", pytest.param("ppo", marks=pytest.mark.slow), pytest.param("sarm", marks=pytest.mark.slow),
           pytest.param("oracle", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def straight_runs(tiny_llama_dir, tmp_path_factory, request):
    """``get(method)``: the method's config (as a dict) and its uninterrupted two-node run (every
    variable set by hand), made once per module and shared by the tests that compare with it."""
    made: dict[str, tuple[dict, Path]] = {}

    def get(method: str) -> tuple[dict, Path]:
        if method not in made:
            folder = tmp_path_factory.mktemp(f"straight_{method}")
            base = _method_config(method, folder / "data", tiny_llama_dir, request)
            config = write_config(folder / "nodes", base)
            run = two_nodes(config)
            assert records(config) == expected_records("LightningEnvironment", nodes=2)
            made[method] = base, run
        return made[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_two_nodes_train_what_one_node_of_two_processes_trains(method, straight_runs, tmp_path):
    base, nodes = straight_runs(method)
    single_config = write_config(tmp_path / "single", base)
    single = one_node(single_config)
    assert records(single_config) == expected_records("LightningEnvironment", nodes=1)

    a, b = checkpoint(nodes), checkpoint(single)
    assert a["on_policy"]["rollout_batches_done"] == b["on_policy"]["rollout_batches_done"] == TOTAL
    assert a["state_dict"]  # the trainable state only
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tensors(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    first = checkpoint(nodes, "update000001.ckpt")["state_dict"]
    assert any(not torch.equal(first[k], a["state_dict"][k]) for k in first)  # it trained after update 1
    assert metric_rows(nodes) == metric_rows(single) and len(metric_rows(nodes)) == TOTAL  # one writer: rank 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["steering", "sarm"])
def test_two_nodes_resume_from_last_as_two_nodes(method, straight_runs, tmp_path):
    """A two-node run stopped after update 2 (no kill: the resume, not the crash, is tested here),
    then ``--ckpt_path last`` in the same run folder as two nodes, ends as the uninterrupted run.
    SARMFeaturePPO also carries a learned reward state (its discriminator, the same on every rank);
    every method's single-node resume after a kill is tested in its own file."""
    base, straight = straight_runs(method)
    stopping = write_config(tmp_path, base, "stopping.yaml",
                            [{"class_path": f"{HERE}.StopAfterUpdate", "init_args": {"update": 2}}])
    run = two_nodes(stopping)
    assert checkpoint(run)["on_policy"]["rollout_batches_done"] == 2
    assert not (run / "checkpoints" / f"update{TOTAL:06d}.ckpt").exists()
    resuming = write_config(tmp_path, base, "resuming.yaml")
    assert two_nodes(resuming, "--ckpt_path", "last") == run
    assert records(resuming) == expected_records("LightningEnvironment", nodes=2)
    a, b = checkpoint(run), checkpoint(straight)
    assert a["on_policy"]["rollout_batches_done"] == TOTAL
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tensors(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert metric_rows(run) == metric_rows(straight)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,environment", [("by_hand.sh", "LightningEnvironment"),
                                                  ("slurm", "SLURMEnvironment"),
                                                  ("torchrun.sh", "TorchElasticEnvironment")])
def test_each_launcher_gives_the_same_run(launcher, environment, straight_runs, tmp_path):
    """docs/recipes/by_hand.sh (NODE_RANK alone: Lightning starts the node's processes), what ``srun``
    sets (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID, SLURM_NTASKS, ...) and docs/recipes/torchrun.sh
    (RANK, GROUP_RANK, LOCAL_RANK, WORLD_SIZE, TORCHELASTIC_RUN_ID) each pick their cluster
    environment, and the run is the one launched with every variable set by hand."""
    base, by_hand = straight_runs("steering")
    launched = write_config(tmp_path, base)
    run = two_nodes(launched, launcher=launcher)
    found = records(launched)
    if launcher == "torchrun.sh":  # c10d numbers the nodes in the order their agents join
        assert sorted(r["node_rank"] for r in found) == [0, 1]
        for r in found:
            r["node_rank"] = r["global_rank"]
    assert found == expected_records(environment, nodes=2)
    assert_same_tensors(checkpoint(run)["state_dict"], checkpoint(by_hand)["state_dict"], "state_dict")


@pytest.mark.slow
def test_fsdp2_on_two_nodes_trains_what_it_trains_on_one(tiny_llama_dir, tmp_path, request):
    """``--trainer.strategy fsdp2`` shards over every rank of every node: two nodes of one process
    train what one node of two processes trains."""
    base = _method_config("steering", tmp_path / "data", tiny_llama_dir, request)
    nodes_config, single_config = write_config(tmp_path / "nodes", base), write_config(tmp_path / "single", base)
    nodes = two_nodes(nodes_config, "--trainer.strategy", "fsdp2")
    single = one_node(single_config, "--trainer.strategy", "fsdp2")
    assert records(nodes_config) == expected_records("LightningEnvironment", nodes=2)
    a, b = checkpoint(nodes), checkpoint(single)
    assert a["state_dict"] and a["on_policy"]["rollout_batches_done"] == TOTAL
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")


# -- the recipes --------------------------------------------------------------------------------

def recipe_arguments(script: Path, env: dict[str, str]) -> list[str]:
    """The arguments a recipe gives ``cli.py``: its ``CLI_ARGS`` bash array, expanded by bash with
    ``env`` standing in for what the scheduler sets (nothing else of the script runs)."""
    text = script.read_text()
    block = re.search(r"^# >>> cli arguments[^\n]*\n(.*?)^# <<< cli arguments$", text, re.S | re.M)
    assert block, f"{script.name} has no '# >>> cli arguments' ... '# <<< cli arguments' block"
    program = block.group(1) + '\nprintf "%s\\0" "${CLI_ARGS[@]}"\n'
    out = subprocess.run(["bash", "-c", program], env=clean_environment(**env), capture_output=True, text=True,
                         check=True)
    return out.stdout.split("\0")[:-1]


SCHEDULER = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "4242", "NNODES": "2",
             "GPUS_PER_NODE": "4"}


@pytest.mark.parametrize("script", sorted(p.name for p in RECIPES.glob("*") if p.suffix in (".sh", ".sbatch")))
def test_recipe_flags_are_real_cli_fields(script):
    """Every ``--x.y`` a recipe passes is a field of the CLI: ``fit ... --print_config`` with exactly
    the recipe's arguments parses them and prints the values the recipe set."""
    args = recipe_arguments(RECIPES / script, SCHEDULER)
    assert args[:1] == ["fit"] and "--config" in args, args
    assert "--trainer.num_nodes" in args and "--trainer.devices" in args
    result = run_cli(*args, "--print_config")  # forked: the CLI's imports are already done
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    flags = {a[2:]: v for a, v in zip(args, args[1:]) if a.startswith("--") and a != "--config"}
    for key, value in flags.items():
        found = lookup(printed, key)  # trainer.devices is printed as the text given
        assert found == yaml.safe_load(value) or found == value, (key, found, value)


def lookup(config: dict, key: str):
    """A dotted command-line key's value in a printed config (``model.x`` is ``model.init_args.x`` there)."""
    node = config
    for part in key.split("."):
        if part not in node and "init_args" in node:
            node = node["init_args"]
        node = node[part]
    return node
