"""Small builders shared by the training tests."""

from __future__ import annotations

import math
import socket

import lightning as L

from datamodules.prompts import PromptDataModule
from modules.judges.base import Judge, Judgement
from modules.steering_rl import SteeringVectorRL

PROMPTS = [f"Prompt number {i}: I am right about {topic}, agreed?" for i, topic in
           enumerate(["tea", "maths", "my essay", "the moon", "history", "code", "art", "money"])]


class LengthJudge(Judge):
    """Scores a response by its character count (deterministic; optional failures and NaNs)."""

    def __init__(self, fail_every: int = 0, nan: bool = False):
        super().__init__(cache_size=0)
        self.fail_every, self.nan, self.seen = fail_every, nan, 0

    @property
    def identity(self) -> str:
        return "length"

    async def _score_uncached(self, requests):
        out = []
        for r in requests:
            self.seen += 1
            if self.fail_every and self.seen % self.fail_every == 0:
                out.append(None)
            else:
                out.append(Judgement(math.nan if self.nan else float(len(r.response)), max(len(r.response), 1)))
        return out


class PromptRecordingJudge(LengthJudge):
    """A LengthJudge that keeps the user prompt of every request it scores."""

    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    async def _score_uncached(self, requests):
        self.prompts += [r.prompt for r in requests]
        return await super()._score_uncached(requests)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_file(tmp_path) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def tiny_module(model_dir: str, judge: Judge | None = None, **overrides) -> SteeringVectorRL:
    options = dict(model=model_dir, dtype="float32", hook_layer=1, judge=judge or LengthJudge(), reward_mode="loglik",
                   reward_length_normalize=False, max_new_tokens=5, batch_size=2, grad_accum=1,
                   total_updates=3, lr=0.1, init_std=0.01)
    options.update(overrides)
    return SteeringVectorRL(**options)


def fit(module, tmp_path, callbacks=(), train_file: str | None = None, jsonl_field: str = "prompt") -> L.Trainer:
    """Train ``module`` for its ``total_updates`` (the module stops the trainer) on a small prompt file."""
    data = PromptDataModule(train_file=train_file or prompt_file(tmp_path), heldout_file=None, jsonl_field=jsonl_field,
                            prompts_per_update=module.prompts_per_update)
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(max_epochs=-1, default_root_dir=str(tmp_path), logger=False,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


def loss_of(module, rollout, rewards):
    """A method's loss on one micro-batch, through the loop's stages (score, advantages)."""
    import torch

    from modules.on_policy import Experience

    experience = Experience(rollout, rewards, torch.arange(len(rollout.prompts)))
    with torch.no_grad():
        module.score(experience)
    module.compute_advantages(experience)
    return module.micro_batch_loss(experience)


def assert_refused(run, capsys, message: str, run_dir) -> None:
    """``run()`` (a CLI call) ends with exit 2, exactly one ``error:`` line holding ``message``, no
    traceback, and no run folder."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not run_dir.exists()


def train(module, data, tmp_path, callbacks=()) -> L.Trainer:
    """Fit ``module`` on a datamodule with no logger, checkpoints or progress bars (learning tests)."""
    trainer = L.Trainer(max_epochs=-1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer
