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
import logging
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from modules.errors import UserError
from modules.on_policy import PromptBatch

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = "datamodules/data/sycophancy_train.txt"
DEFAULT_HELDOUT = "datamodules/data/sycophancy_heldout.txt"


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the project root (so the shipped files work from anywhere)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    return PROJECT_ROOT / given if (PROJECT_ROOT / given).exists() else given


def read_records(path: str, jsonl_field: str = "prompt") -> list[dict]:
    """Data rows from a .txt file (one prompt per line, blank lines skipped), a .jsonl file (one JSON
    object per line) or a .json file (a list of objects).

    Every row gets a ``prompt``: from a JSONL object's ``jsonl_field``, or the last user message of
    its ``messages`` list. The other fields of a JSONL row are kept (reference answers, baseline
    replies, precomputed rewards) and reach the reward through the rollout's ``records``.
    """
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"prompt file '{path}' does not exist: give a .txt (one prompt per line) or .jsonl file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"'{path}' is not UTF-8 text (byte {err.start} cannot be decoded): give a .txt or .jsonl "
                        "file of prompts") from None
    if file.suffix in (".jsonl", ".json"):
        rows = _json_rows(path, text, file.suffix)
        records = []
        for number, row in rows:
            try:
                prompt = row[jsonl_field] if jsonl_field in row else \
                    [m["content"] for m in row["messages"] if m["role"] == "user"][-1]
                if not isinstance(prompt, str):
                    raise TypeError
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"{path}:{number}: expected a JSON object with '{jsonl_field}' or 'messages'") from None
            records.append({**row, "prompt": prompt})
    else:
        records = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if not records:
        raise UserError(f"prompt file '{path}' holds no prompts")
    return records


def _json_rows(path: str, text: str, suffix: str) -> list[tuple[int, object]]:
    """(row number, parsed row) of a JSONL file (one object per line) or a JSON file (a list)."""
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except ValueError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); a .json file holds a list "
                            "of objects") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json data file must hold a list of objects")
        return list(enumerate(rows, 1))
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except ValueError:
                raise UserError(f"{path}:{number}: not a JSON object") from None
    return out


def read_prompts(path: str, jsonl_field: str = "prompt") -> list[str]:
    """The prompts of :func:`read_records`."""
    return [r["prompt"] for r in read_records(path, jsonl_field)]


class PromptSchedule(Dataset):
    """Item ``i`` = the data rows of rollout batch ``i`` (seeded permutations, one per pass)."""

    def __init__(self, prompts: list, per_batch: int, seed: int):
        self.prompts, self.per_batch, self.seed = prompts, per_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._perms[epoch]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[int, list]:
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
            JSONL rows may carry more fields (reference answers, baseline replies, rewards) that
            rewards read.
        jsonl_field: Field of a JSONL row holding the prompt (else the last user message of ``messages``).
        system_prompt: Optional system message for the policy's chat template (None: the template's default).
        prompts_per_update: Prompts per rollout batch; the CLI sets it from the model
            (batch_size * grad_accum / samples_per_prompt).
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
        if prompts_per_update < 1:
            raise UserError(f"prompts_per_update must be at least 1, got {prompts_per_update}")
        if max_prompt_tokens < 1:
            raise UserError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
        self.train_records = read_records(train_file, jsonl_field)
        self.heldout_records = read_records(heldout_file, jsonl_field) if heldout_file else []
        self.train_prompts = [r["prompt"] for r in self.train_records]
        self.heldout_prompts = [r["prompt"] for r in self.heldout_records]
        self.system_prompt, self.prompts_per_update = system_prompt, prompts_per_update
        self.shuffle_seed, self.max_prompt_tokens = shuffle_seed, max_prompt_tokens
        self.tokenizer = None

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        self.tokenizer = module.tokenizer

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        schedule = PromptSchedule(self.train_records, self.prompts_per_update, self.shuffle_seed)
        sampler = StartAt(lambda: module.rollout_batches_done, self.trainer.global_rank, self.trainer.world_size)
        # batches of one schedule item (a whole rollout batch of prompts): DeepSpeed reads its micro-batch
        # size from the loader's batch_sampler, which batch_size=None would leave out
        return DataLoader(schedule, batch_size=1, sampler=sampler, collate_fn=self._collate_one)

    def _collate_one(self, items: list[tuple[int, list[dict]]]) -> PromptBatch:
        return self.collate(items[0])

    def collate(self, item: tuple[int, list[dict]]) -> PromptBatch:
        index, records = item
        rollout_index = index // self.trainer.world_size if self.trainer else index
        batch = encode_prompts(self.tokenizer, [r["prompt"] for r in records], self.system_prompt,
                               self.max_prompt_tokens, rollout_index)
        batch.records = list(records)
        return batch


_warned_cut = False


def _templated(tokenizer, prompt: str, system_prompt: str | None) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompts(tokenizer, prompts: list[str], system_prompt: str | None, max_tokens: int) -> list[str]:
    """Each prompt cut from the left (its end kept) so that, in the chat template, it takes at most
    ``max_tokens`` tokens; the cut text is what the policy reads *and* what a judge scores."""
    global _warned_cut
    out = []
    for prompt in prompts:
        excess = _token_count(tokenizer, _templated(tokenizer, prompt, system_prompt)) - max_tokens
        original = prompt
        for _ in range(4):  # re-tokenizing a cut text can differ by a token at the cut: check again
            if excess <= 0:
                break
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            prompt = tokenizer.decode(ids[min(len(ids), excess):])
            excess = _token_count(tokenizer, _templated(tokenizer, prompt, system_prompt)) - max_tokens
        if prompt != original and not _warned_cut:
            _warned_cut = True
            log.warning("a prompt of %d tokens was cut from the left to fit max_prompt_tokens=%d with the chat "
                        "template; the policy and the judge both see the cut text (said once)",
                        _token_count(tokenizer, original), max_tokens)
        out.append(prompt)
    return out


def encode_prompts(tokenizer, prompts: list[str], system_prompt: str | None = None, max_tokens: int = 512,
                   index: int = 0) -> PromptBatch:
    """Chat template (with the assistant header), tokenized and left-padded; a prompt too long for
    ``max_tokens`` is cut from the left (:func:`fit_prompts`), and the batch carries the cut text."""
    prompts = fit_prompts(tokenizer, prompts, system_prompt, max_tokens)
    texts = [_templated(tokenizer, prompt, system_prompt) for prompt in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    truncation_side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
    return PromptBatch(index, list(prompts), enc["input_ids"], enc["attention_mask"])
