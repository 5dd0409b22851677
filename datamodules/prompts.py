"""Prompt sets for on-policy training: a text file (one prompt per line) or JSONL.

The training loader yields one :class:`~modules.on_policy.PromptBatch` per rollout batch. Which
prompts batch ``i`` holds is a pure function of ``(shuffle_seed, i)``: the prompt list is walked
through in a fresh seeded permutation per pass, without end. The loader starts at the module's
``rollout_batches_done``, so a resumed run gets exactly the prompts an uninterrupted run would.

The policy's chat template is applied here (the tokenizer comes from the training module), and
prompts are left-padded, which generation and the steering position rules expect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from modules.errors import UserError
from modules.on_policy import PromptBatch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = "datamodules/data/sycophancy_train.txt"
DEFAULT_HELDOUT = "datamodules/data/sycophancy_heldout.txt"


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the project root (so the shipped files work from anywhere)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    return PROJECT_ROOT / given if (PROJECT_ROOT / given).exists() else given


def read_prompts(path: str, jsonl_field: str = "prompt") -> list[str]:
    """Prompts from a .txt file (one per line, blank lines skipped) or a .jsonl file.

    A JSONL line is an object whose ``jsonl_field`` holds the prompt, or a ``messages`` list whose
    last user message is taken.
    """
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"prompt file '{path}' does not exist: give a .txt (one prompt per line) or .jsonl file")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row[jsonl_field] if jsonl_field in row else
                               [m["content"] for m in row["messages"] if m["role"] == "user"][-1])
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"{path}:{number}: expected a JSON object with '{jsonl_field}' or 'messages'") from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts")
    return prompts


class PromptSchedule(Dataset):
    """Item ``i`` = the prompts of rollout batch ``i`` (seeded permutations, one per pass)."""

    def __init__(self, prompts: list[str], per_batch: int, seed: int):
        self.prompts, self.per_batch, self.seed = prompts, per_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._perms[epoch]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[int, list[str]]:
        n = len(self.prompts)
        picks = []
        for position in range(index * self.per_batch, (index + 1) * self.per_batch):
            picks.append(self.prompts[self._permutation(position // n)[position % n]])
        return index, picks


class StartAt(Sampler[int]):
    """Schedule indices from ``start()`` on, forever; ``start`` is read when iteration begins (after
    a resume). With several ranks, rank ``r`` of ``w`` takes schedule items ``i * w + r``."""

    def __init__(self, start, rank: int = 0, world_size: int = 1):
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        index = self.start()
        while True:
            yield index * self.world_size + self.rank
            index += 1


class PromptDataModule(L.LightningDataModule):
    """Prompts for training (and a held-out set for evaluation).

    Args:
        train_file: Training prompts: .txt (one per line) or .jsonl. The default is the shipped
            sycophancy set (240 prompts where a user asks to be agreed with).
        heldout_file: Held-out prompts for evaluation (never trained on); same formats.
        jsonl_field: Field of a JSONL row holding the prompt (else the last user message of ``messages``).
        system_prompt: Optional system message for the policy's chat template (None: the template's default).
        prompts_per_update: Prompts per rollout batch; the CLI links it to batch_size * grad_accum.
        shuffle_seed: Seed of the prompt order.
        max_prompt_tokens: Longer prompts are cut from the left to this many tokens.
    """

    def __init__(
        self,
        train_file: str = DEFAULT_TRAIN,
        heldout_file: str | None = DEFAULT_HELDOUT,
        jsonl_field: str = "prompt",
        system_prompt: str | None = None,
        prompts_per_update: int = 8,
        shuffle_seed: int = 0,
        max_prompt_tokens: int = 512,
    ) -> None:
        super().__init__()
        self.train_prompts = read_prompts(train_file, jsonl_field)
        self.heldout_prompts = read_prompts(heldout_file, jsonl_field) if heldout_file else []
        self.system_prompt, self.prompts_per_update = system_prompt, prompts_per_update
        self.shuffle_seed, self.max_prompt_tokens = shuffle_seed, max_prompt_tokens
        self.tokenizer = None

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        self.tokenizer = module.tokenizer

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        schedule = PromptSchedule(self.train_prompts, self.prompts_per_update, self.shuffle_seed)
        sampler = StartAt(lambda: module.rollout_batches_done, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(schedule, batch_size=None, sampler=sampler, collate_fn=self.collate)

    def collate(self, item: tuple[int, list[str]]) -> PromptBatch:
        index, prompts = item
        rollout_index = index // self.trainer.world_size if self.trainer else index
        return encode_prompts(self.tokenizer, prompts, self.system_prompt, self.max_prompt_tokens, rollout_index)


def encode_prompts(tokenizer, prompts: list[str], system_prompt: str | None = None, max_tokens: int = 512,
                   index: int = 0) -> PromptBatch:
    """Chat template (with the assistant header), tokenized and left-padded."""
    texts = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    truncation_side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
    return PromptBatch(index, list(prompts), enc["input_ids"], enc["attention_mask"])
