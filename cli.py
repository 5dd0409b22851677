"""Command line: training through LightningCLI, plus tools for trained vectors.

    python cli.py fit --config configs/steering_rl_smollm2.yaml          # train
    python cli.py fit --config configs/steering_rl_smollm2.yaml --ckpt_path last   # resume
    python cli.py fit --config configs/steering_rl.yaml --print_config   # show every field
    python cli.py generate --vector RUN/steering_vector.pt --prompt "..."   # replies, vector off and on
    python cli.py evaluate --vector RUN/steering_vector.pt               # held-out report
    python cli.py sarm-build|sarm-pairs|sarm-human-latents|sarm-features|sarm-probe|sarm-best-of-n ...
    python cli.py oracle-sft|vibes-check ...                             # the activation oracle's tools

Every tool takes --help.
A run lives in ``<output_dir>/<run_name>/``: the resolved ``config.yaml``, ``metrics.csv``,
``checkpoints/``, ``vectors/``, ``steering_vector.pt``, ``curves.png`` and held-out reports.
Problems a user can fix end the program with one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

from modules.errors import UserError, describe_config_error

TOOLS = {  # subcommand -> "module:function(argv)"
    "generate": "modules.tools:generate",
    "evaluate": "modules.tools:evaluate",
    "caa": "modules.caa:caa_command",
    "sarm-build": "modules.sarm.tools:sarm_build",
    "sarm-pairs": "modules.sarm.tools:sarm_pairs",
    "sarm-human-latents": "modules.sarm.tools:sarm_human_latents",
    "sarm-features": "modules.sarm.tools:sarm_features",
    "sarm-probe": "modules.sarm.tools:sarm_probe",
    "sarm-best-of-n": "modules.sarm.tools:sarm_best_of_n",
    "oracle-sft": "modules.oracle.commands:oracle_sft",
    "vibes-check": "modules.oracle.commands:vibes_check",
    "export": "modules.models.export:export_command",
    "push": "modules.models.hub:hub_push_command",
}
METHODS = ["modules.steering_rl.SteeringVectorRL", "modules.ppo.PPO", "modules.sarm_ppo.SARMFeaturePPO",
           "modules.oracle_grpo.OracleGRPO"]
DATAMODULES = ["datamodules.prompts.PromptDataModule"]


def _quiet_known_warnings() -> None:
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*TPU available.*",
                    ".*`isinstance.*LeafSpec.*", ".*The `srun` command is available.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*args parameter is intended to run.*",
                    r".*module\(s\) in eval mode at the start of training.*"):
        warnings.filterwarnings("ignore", pattern)
    # bitsandbytes (imported by peft) looks on CPUs with AVX512-BF16 for an optional kernel package and
    # says when it is missing; 4-bit loading is for GPUs here, so the line only confuses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_training(argv: list[str] | None) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities import rank_zero_only

    from callbacks.checkpoints import check_checkpoint_fits, resolve_resume
    from callbacks.progress import UpdateProgressBar
    import datamodules.prompts  # noqa: F401  (registers the subclasses for --help and short names)
    import modules.oracle_grpo  # noqa: F401
    import modules.ppo  # noqa: F401
    import modules.sarm_ppo  # noqa: F401
    import modules.steering_rl  # noqa: F401
    from modules.on_policy import OnPolicyModule
    from modules.strategies import check_strategy, register_strategies

    register_strategies()  # --trainer.strategy fsdp / fsdp2: FSDP2 (see modules/strategies.py)

    class RLCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", type=str, default="run", help="Name of the run folder.")
            parser.add_argument("--output_dir", type=str, default="steering_runs", help="Parent folder of runs.")
            parser.add_argument("--wandb_project", type=str | None, default=None,
                                help="Log to this W&B project too (WANDB_MODE=offline works without a key).")
            # the module stops training after total_updates rollout batches (an update may take many
            # optimizer steps, so max_steps does not count updates)
            parser.set_defaults({"trainer.use_distributed_sampler": False,  # prompts are scheduled per rank
                                 "trainer.log_every_n_steps": 1, "trainer.limit_val_batches": 0,
                                 "trainer.num_sanity_val_steps": 0, "trainer.max_epochs": -1})
            parser.link_arguments("model", "data.init_args.prompts_per_update",
                                  compute_fn=lambda model: model.prompts_per_update, apply_on="instantiate")

        def instantiate_trainer(self, **kwargs):
            """The trainer, with :class:`UpdateProgressBar` unless the config has a progress bar or turns it
            off; an unknown ``trainer.strategy`` is one line naming the strategies there are."""
            config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer") or {}
            configured = config.get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            if config.get("enable_progress_bar") is not False and not any(
                    isinstance(c, ProgressBar) for c in configured):
                kwargs = {"callbacks": [*configured, UpdateProgressBar()], **kwargs}
            try:
                return super().instantiate_trainer(**kwargs)
            except ValueError as err:
                if "invalid strategy name" not in str(err):
                    raise
                from lightning.pytorch.strategies import StrategyRegistry

                common = [n for n in sorted(StrategyRegistry.available_strategies())
                          if not any(part in n for part in ("find_unused", "xla", "tpu", "notebook", "fork"))]
                raise UserError(f"trainer.strategy: unknown strategy {config.get('strategy')!r}; choose one of auto, "
                                f"{', '.join(common)}") from None

        def _parse_ckpt_path(self) -> None:
            """Refuse an unreadable ``--ckpt_path FILE`` at once. Unlike LightningCLI, the model's
            options are not replaced by the checkpoint's saved hyperparameters: the config given is
            the config used, with a file as with ``last`` (a checkpoint holds only trainable state).
            LightningCLI has no public switch for this step (tests/test_lightning_private_api.py)."""
            if self.config.get("subcommand") == "fit":
                ckpt_path = self.config.fit.get("ckpt_path")
                if ckpt_path and ckpt_path != "last":
                    resolve_resume(ckpt_path, ".")

        def before_fit(self) -> None:
            """Every check before anything is written into the run folder."""
            config = self.config.fit
            check_strategy(self.trainer.strategy, self.model)
            run_dir = Path(config.trainer.default_root_dir)
            checkpoints = _checkpoint_dir(self.trainer, run_dir)
            if config.ckpt_path is None and any(checkpoints.glob("*.ckpt")):
                raise UserError(f"{checkpoints} already holds checkpoints: resume with --ckpt_path last, "
                                "or start a new run with another --run_name")
            ckpt_path, note = resolve_resume(config.ckpt_path, checkpoints)
            if ckpt_path is not None:
                check_checkpoint_fits(ckpt_path, self.model)
            self.model.preflight(self.datamodule)
            self.config_init.fit.ckpt_path = ckpt_path
            if rank_zero_only.rank == 0:
                if note:
                    print(note, file=sys.stderr, flush=True)
                if self._wandb_id is not None:
                    _write_wandb_id(run_dir, self._wandb_id)

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand, self.config)
            self._wandb_id = None
            if self.subcommand != "fit":
                return
            run_dir = str(Path(config.output_dir) / config.run_name)
            check_writable_folder(Path(run_dir))
            config.trainer.default_root_dir = run_dir
            if config.trainer.logger in (None, True):
                config.trainer.logger = _default_loggers(run_dir, config.run_name, config.wandb_project)
                wandb = [c for c in config.trainer.logger if c["class_path"].endswith("WandbLogger")]
                self._wandb_id = wandb[0]["init_args"]["id"] if wandb else None

    RLCLI(
        OnPolicyModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "fit": {"exit_on_error": False}},
        args=argv,
        auto_configure_optimizers=False,
    )


def check_writable_folder(folder: Path) -> None:
    """Refuse, before anything is written, a run folder that cannot be made or written: a part of its
    path that is a file, or a place where nothing may be created (read-only, not permitted)."""
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"the run folder {folder} cannot be made: {existing} is a file, not a folder "
                        "(pick another --output_dir or --run_name)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rli-write-check-", dir=existing))  # the one sure test, also for root
    except OSError as err:
        raise UserError(f"the run folder {folder} cannot be written: {existing} is not writable "
                        f"({err.strerror or err}); pick another --output_dir") from None


def _default_loggers(run_dir: str, run_name: str, wandb_project: str | None) -> list[dict]:
    loggers = [{"class_path": "callbacks.resumable_csv.ResumableCSVLogger",
                "init_args": {"save_dir": run_dir, "name": "", "version": ""}}]
    try:
        import tensorboard  # noqa: F401

        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": run_dir, "name": "", "version": "tensorboard"}})
    except ImportError:
        print("note: tensorboard is not installed, so no tensorboard/ logs are written "
              "(pip install tensorboard; metrics.csv has every metric)", file=sys.stderr)
    project = wandb_project or os.environ.get("WANDB_PROJECT")
    if project:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"project": project, "name": run_name, "save_dir": run_dir,
                                      "id": wandb_run_id(run_dir), "resume": "allow"}})
    return loggers


def wandb_run_id(run_dir: str) -> str:
    """The run's W&B id: the one kept in the run folder (so that a resumed run continues the same W&B
    run), else a new one, written there only once every check has passed (:func:`_write_wandb_id`)."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    import uuid

    return uuid.uuid4().hex[:12]


def _write_wandb_id(run_dir: Path, run_id: str) -> None:
    path = run_dir / "wandb_id.txt"
    if not path.is_file() or path.read_text().strip() != run_id:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)


def _checkpoint_dir(trainer, run_dir: Path) -> Path:
    """Where the run's checkpoint callback writes (``<run>/checkpoints`` unless configured otherwise)."""
    from callbacks.checkpoints import EvenlySpacedCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, EvenlySpacedCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return run_dir / "checkpoints"


def print_fit_help(args: list[str]) -> None:
    """LightningCLI's help, then every field of each method and datamodule (in subclass mode the
    former only names the classes)."""
    for extra in ([], *[["--model.help", m] for m in METHODS], *[["--data.help", d] for d in DATAMODULES]):
        if extra:
            group = extra[0][2:].split(".")[0]
            print(f"\n{'=' * 100}\nFields of {extra[1]} (set them as --{group}.<field>):\n")
        try:
            run_training(["fit", *extra] if extra else args)
        except SystemExit:
            pass


def _find_user_error(err: BaseException | None) -> UserError | None:
    """A UserError raised while jsonargparse instantiated a class arrives wrapped: unwrap it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_warnings()
    try:
        if args and args[0] in TOOLS:
            import importlib

            module_name, function = TOOLS[args[0]].split(":")
            getattr(importlib.import_module(module_name), function)(args[1:])
        elif args[:1] == ["fit"] and ("--help" in args or "-h" in args):
            print_fit_help(args)
        else:
            run_training(argv)
    except FileNotFoundError as err:  # e.g. a --ckpt_path that does not exist
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk, a folder that became read-only: the system's own words, one line
        print(f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        sys.exit(2)
    except ArgumentError as err:
        print(f"error: {describe_config_error(str(err))} (python cli.py fit --help lists the fields)", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
