"""The W&B sweeps in configs/sweeps/ and the callback that writes their metric.

Each sweep's command is expanded the way a W&B agent expands it (``${args}`` gives
``--<name>=<value>`` with the value as Python prints it) and run through ``sh`` as the agent would,
with a stand-in program that prints its arguments; those arguments, with every parameter at values
from its range, then go through the project's own LightningCLI parser (``--print_config``), which
must put each value in the field the parameter names. The callback is checked on its own and in a
tiny fit logging to W&B offline.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import yaml

from callbacks import sweep_summary
from callbacks.heldout import HeldOutEvaluation
from callbacks.sweep_summary import SweepSummary, summary_values
from modules.errors import UserError
from modules.evaluation import HeldOutReport

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {path.stem: path for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))}
METHODS = {"steering_rl", "sycophancy_ppo", "sarm_ppo", "oracle_grpo"}
DISTRIBUTIONS = {"constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform_values",
                 "q_log_uniform_values", "inv_log_uniform_values", "normal", "q_normal", "log_normal",
                 "q_log_normal"}
RUN_ID = "abc123xy"


def load(name: str) -> dict:
    return yaml.safe_load(SWEEPS[name].read_text())


def candidates(spec: dict) -> list:
    """Values a parameter can take that the test tries: its value, every listed value, or min and max."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def assignments(parameters: dict) -> list[dict]:
    """Enough assignments of all parameters at once that every candidate of each is used once."""
    options = {name: candidates(spec) for name, spec in parameters.items()}
    return [{name: values[i % len(values)] for name, values in options.items()}
            for i in range(max(len(v) for v in options.values()))]


def expand(command: list[str], program: str, params: dict) -> list[str]:
    """A sweep command as a W&B agent runs it: macros replaced, ``${args}`` as ``--name=value``."""
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": [sys.executable], "${program}": [program],
              "${args}": [f"--{name}={value}" for name, value in params.items()]}
    return [part for item in command for part in macros.get(item, [item])]


def cli_argv(name: str, params: dict, tmp_path: Path) -> list[str]:
    """The arguments ``cli.py`` receives from the expanded sweep command, run through ``sh``."""
    echo = tmp_path / "print_argv.py"
    echo.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    result = subprocess.run(expand(load(name)["command"], str(echo), params), cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "WANDB_RUN_ID": RUN_ID})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def resolved_config(argv: list[str], capsys) -> dict:
    """The fully resolved config the project's LightningCLI parser makes of ``argv``."""
    from cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def field(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_there_is_one_sweep_per_method():
    assert set(SWEEPS) == METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sweep_has_the_keys_wandb_requires(name):
    sweep = load(name)
    assert sweep["program"] == "cli.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["method"] in ("bayes", "random")
    assert sweep["metric"] == {"name": sweep_summary.GAIN, "goal": "maximize"}
    assert sweep["parameters"] and isinstance(sweep["run_cap"], int)
    for parameter, spec in sweep["parameters"].items():
        assert parameter.startswith("model.init_args."), parameter
        kinds = [k for k in ("value", "values", "min") if k in spec]
        assert len(kinds) == 1, (parameter, spec)
        if "min" in spec:
            assert spec["distribution"] in DISTRIBUTIONS and spec["min"] < spec["max"], (parameter, spec)
            if spec["distribution"].startswith("log_uniform"):
                assert spec["min"] > 0  # log_uniform_values takes the values themselves, not their logs
    command = sweep["command"]
    assert "${args}" in command and "${args_no_hyphens}" not in command  # LightningCLI needs --name=value
    assert "${interpreter}" in command and "${program}" in command


@pytest.mark.parametrize("name", sorted(METHODS))
def test_agent_command_runs_cli_fit_with_the_summary_callback(name, tmp_path):
    argv = cli_argv(name, {"model.init_args.lr": 1e-05}, tmp_path)
    assert argv[:3] == ["fit", "--config", f"configs/{name}_smollm2.yaml"] and (ROOT / argv[2]).is_file()
    assert "--trainer.callbacks+=callbacks.sweep_summary.SweepSummary" in argv
    assert argv[argv.index("--run_name") + 1] == f"{name}-{RUN_ID}"  # one run folder per W&B run
    assert argv[argv.index("--ckpt_path") + 1] == "last"  # a preempted run resumes
    assert argv[-1] == "--model.init_args.lr=1e-05"  # W&B's ${args}, as the agent formats a small float


def test_command_refuses_to_run_outside_an_agent(tmp_path):
    echo = tmp_path / "print_argv.py"
    echo.write_text("print('ran')\n")
    result = subprocess.run(expand(load("steering_rl")["command"], str(echo), {}), cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "wandb agent" in result.stderr and "ran" not in result.stdout


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_sweep_parameter_sets_its_config_field(name, tmp_path, capsys):
    """Every parameter at values from its range, through the agent's command and the CLI's parser."""
    sweep = load(name)
    for params in assignments(sweep["parameters"]):
        config = resolved_config(cli_argv(name, params, tmp_path), capsys)
        for parameter, value in params.items():
            assert field(config, parameter) == pytest.approx(value), (parameter, value)
        callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert callbacks.index("callbacks.sweep_summary.SweepSummary") > callbacks.index(
            "callbacks.heldout.HeldOutEvaluation")


def test_a_parameter_that_is_no_config_field_is_refused(tmp_path, capsys):
    from cli import main

    argv = cli_argv("steering_rl", {"model.init_args.learning_rate": 0.01}, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code == 2 and "learning_rate" in capsys.readouterr().err


# -- the callback --------------------------------------------------------------------------------
def report(samples: int = 8, evaluation: dict | None = None) -> HeldOutReport:
    return HeldOutReport(samples_per_arm=samples, reward_on=0.5, reward_on_se=0.1, reward_off=0.2, reward_off_se=0.1,
                         difference=0.3, difference_se=0.15, paired_se=0.1, kl_per_token=0.25, kl_per_reply=5.0,
                         length_on=20.0, length_off=21.0, judge_failed=0, evaluation_judge=evaluation or {})


def test_summary_values_of_a_report():
    assert summary_values(report()) == {sweep_summary.GAIN: 0.3, sweep_summary.GAIN_SE: 0.15,
                                        sweep_summary.GAIN_Z: pytest.approx(2.0), sweep_summary.KL_PER_TOKEN: 0.25,
                                        sweep_summary.KL_PER_REPLY: 5.0}
    with_eval = summary_values(report(evaluation={"difference": 0.05, "paired_se": 0.02, "reward_on": 1.0}))
    assert with_eval[sweep_summary.EVAL_GAIN] == 0.05 and with_eval[sweep_summary.EVAL_GAIN_SE] == 0.02
    assert summary_values(report(samples=0)) == {}  # no judged sample: nothing a sweep could rank by
    no_spread = HeldOutReport(**{**report().__dict__, "difference_se": 0.0})
    assert math.isnan(summary_values(no_spread)[sweep_summary.GAIN_Z])


def test_sweep_summary_must_follow_a_heldout_evaluation():
    summary, heldout = SweepSummary(), HeldOutEvaluation()
    with pytest.raises(UserError, match="needs a callbacks.heldout.HeldOutEvaluation"):
        summary.setup(SimpleNamespace(callbacks=[summary]), None, "fit")
    with pytest.raises(UserError, match="must come after HeldOutEvaluation"):
        summary.setup(SimpleNamespace(callbacks=[summary, heldout]), None, "fit")
    summary.setup(SimpleNamespace(callbacks=[heldout, summary]), None, "fit")


def test_sweep_summary_reaches_an_offline_wandb_run_and_the_csv(tiny_llama_dir, tmp_path, monkeypatch):
    """A tiny fit logging to W&B offline: the summary holds the final held-out report's gain and KL."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from datamodules.prompts import PromptDataModule
    from tests.helpers import prompt_file, tiny_module

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    module = tiny_module(tiny_llama_dir, total_updates=1)
    data = PromptDataModule(train_file=prompt_file(tmp_path / "train"), heldout_file=prompt_file(tmp_path / "heldout"),
                            prompts_per_update=module.prompts_per_update)
    heldout = HeldOutEvaluation(samples_per_prompt=1, max_prompts=2, batch_size=2, show_examples=0)
    summary = SweepSummary()
    loggers = [WandbLogger(project="rl-insides-test", save_dir=str(tmp_path), offline=True),
               CSVLogger(str(tmp_path), name="csv", version="")]
    trainer = L.Trainer(max_epochs=-1, default_root_dir=str(tmp_path), logger=loggers, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[heldout, summary])
    trainer.fit(module, datamodule=data)
    final = heldout.last_report
    assert final is not None and final.samples_per_arm == 2
    run = loggers[0].experiment
    assert run.summary[sweep_summary.GAIN] == pytest.approx(final.difference)
    assert run.summary[sweep_summary.KL_PER_TOKEN] == pytest.approx(final.kl_per_token)
    assert run.summary[sweep_summary.EVAL_GAIN] == pytest.approx(final.evaluation_judge["difference"])
    offline_run = Path(run.dir).parent
    wandb.finish()
    wandb.teardown()  # ends W&B's service process, which writes the record file
    # the offline run's record file (what `wandb sync` uploads) holds the summary entries; only the
    # summary carries sweep/* names to W&B (the history rows are heldout/*)
    recorded = b"".join(path.read_bytes() for path in offline_run.glob("run-*.wandb"))
    for name in (sweep_summary.GAIN, sweep_summary.KL_PER_TOKEN, sweep_summary.EVAL_GAIN):
        assert name.encode() in recorded, name
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert sweep_summary.GAIN in rows.splitlines()[0]
