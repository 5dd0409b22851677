"""Held-out evaluation during and after training (intervention on vs off, same prompts and seeds).

Prints the report (rewards with standard errors under the training judge and, where the method has
one, the evaluation judge; KL, lengths, degeneration, a few replies side by side), logs
``heldout/*`` metrics, and writes ``heldout_update{N}.json`` into the run folder (N counts updates,
i.e. rollout batches). It runs :func:`modules.evaluation.evaluate_intervention`, the code
``python cli.py evaluate`` runs: with ``scales`` or ``compare_files`` (steering methods), the same
comparison also holds the vector at other scales and saved vectors (e.g. CAA), and a frontier plot
``frontier_update{N}.png`` is drawn.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from modules.errors import UserError
from modules.evaluation import Intervention, evaluate_intervention
from modules.files import write_json_atomically


class HeldOutEvaluation(L.Callback):
    """Evaluate the intervention on the datamodule's held-out prompts.

    Args:
        samples_per_prompt: Sampled replies per prompt and arm (each arm gets prompts × this).
        max_prompts: Use at most this many held-out prompts (0: all).
        every_n_updates: Also evaluate every N updates (0: only when training ends).
        batch_size: Prompts per generate call.
        show_examples: Replies printed side by side (vector off / on).
        seed: Sampling seed of the evaluation (the same for both arms).
        scales: Steering methods: also evaluate the trained vector at these multiples of ``alpha·v``.
        compare_files: Steering methods: also evaluate these saved vector files (e.g. a CAA vector),
            as ``PATH`` or ``NAME=PATH``, each at ``compare_scales``.
        compare_scales: Multiples of each ``compare_files`` vector.
        frontier_plot: Draw ``frontier_update{N}.png`` when the comparison has extra arms.
    """

    def __init__(self, samples_per_prompt: int = 2, max_prompts: int = 0, every_n_updates: int = 0,
                 batch_size: int = 16, show_examples: int = 3, seed: int = 12345, scales: list[float] = (),
                 compare_files: list[str] = (), compare_scales: list[float] = (1.0,), frontier_plot: bool = True):
        self.samples_per_prompt, self.max_prompts, self.every_n_updates = samples_per_prompt, max_prompts, every_n_updates
        self.batch_size, self.show_examples, self.seed = batch_size, show_examples, seed
        self.scales, self.compare_files, self.compare_scales = list(scales), list(compare_files), list(compare_scales)
        self.frontier_plot = frontier_plot
        self.last_report = None
        for name, value, least in (("samples_per_prompt", samples_per_prompt, 1), ("batch_size", batch_size, 1),
                                   ("max_prompts", max_prompts, 0), ("every_n_updates", every_n_updates, 0),
                                   ("show_examples", show_examples, 0)):
            if value < least:
                raise UserError(f"HeldOutEvaluation: {name} must be at least {least}, got {value}")
        if any(s == 1.0 for s in self.scales):
            self.scales = [s for s in self.scales if s != 1.0]  # ×1 is the report's "on" arm

    def _records(self, trainer: L.Trainer) -> list[dict]:
        records = getattr(trainer.datamodule, "heldout_records", []) if trainer.datamodule else []
        return records[: self.max_prompts] if self.max_prompts else records

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if (self.scales or self.compare_files) and not hasattr(pl_module, "using_vector"):
            raise UserError(f"HeldOutEvaluation: scales and compare_files need a steering method; "
                            f"{type(pl_module).__name__} has no steering vector")
        from modules.models.steering_io import read_steering_vector
        from modules.tools import _named_files

        self._files = [(name, read_steering_vector(path)) for name, path in _named_files(self.compare_files)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = pl_module.rollout_batches_done
        if self.every_n_updates and update % self.every_n_updates == 0 and update < pl_module.total_updates:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    def extra_arms(self, module) -> list[Intervention]:
        """The trained vector at ``scales`` and each ``compare_files`` vector at ``compare_scales``."""
        from modules.tools import vector_arm

        arms = []
        for scale in self.scales:
            def enter(scale=scale):
                vector = module.steering_vector
                return module.using_vector(vector.v.detach(), vector.alpha.detach() * scale)

            arms.append(Intervention(f"trained ×{scale:g}", enter, "trained", scale))
        for name, payload in getattr(self, "_files", []):
            arms += [vector_arm(module, f"{name} ×{s:g}", payload, s, name) for s in self.compare_scales]
        return arms

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = self._records(trainer)
        if not records:
            return
        with pl_module.whole_weights():  # sharded weights whole while it generates and judges
            report = evaluate_intervention(
                pl_module, [r["prompt"] for r in records], self.samples_per_prompt, self.seed, self.batch_size,
                getattr(trainer.datamodule, "system_prompt", None), self.show_examples,
                progress=trainer.is_global_zero, records=records, extra_arms=self.extra_arms(pl_module),
            )
        self.last_report = report
        self._publish(trainer, pl_module.rollout_batches_done, report)

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, update: int, report) -> None:
        print(f"\n[update {update}] " + report.format(), flush=True)
        metrics = {f"heldout/{k}": v for k, v in report.as_dict().items() if isinstance(v, (int, float))}
        metrics.update({f"heldout/evaluation_judge/{k}": v for k, v in report.evaluation_judge.items()
                        if isinstance(v, (int, float))})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(update - 1, 0))  # the row of the update it follows
        root = Path(trainer.default_root_dir)
        write_json_atomically(root / f"heldout_update{update:06d}.json", report.as_dict())
        if self.frontier_plot and len(report.comparison.get("arms", [])) > 2:
            from modules.frontier import plot_frontier

            plot_frontier(report.comparison, root / f"frontier_update{update:06d}.png")
