"""What a task suite provides to the engine, and the batch of prompts it hands over.

A suite is bound to a model's tokenizer. It gives examples per split (``fit`` for choosing a defense,
``dev`` for tuning, ``test`` for the leaderboard; disjoint and fixed by seed), encodes them into a
:class:`PromptBatch`, scores the behavior from final-position logits (``b > 0`` means the behavior is present),
and gives the attacker a differentiable per-example loss and a control batch for side effects.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from benchmark.registry import Registry

SPLITS = ("fit", "dev", "test")


@dataclass
class PromptBatch:
    """Left-padded prompts. ``targets`` holds per-example tensors the suite's scores read (e.g. token ids)."""

    ids: list[str]
    input_ids: Tensor  # [b, p] long
    attention_mask: Tensor  # [b, p] long, 0 on left padding
    targets: dict[str, Tensor] = field(default_factory=dict)  # each [b, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def position_ids(self) -> Tensor:
        """[b, p]: 0 at each prompt's first real token, so padding never shifts positions."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def token_mask(self) -> Tensor:
        """[b, p] bool: real tokens except each prompt's first, the attention sink (residual norm ~100x)."""
        return (self.attention_mask.bool()) & (self.position_ids > 0)

    def select(self, index: Tensor | list[int]) -> "PromptBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        keep = self.attention_mask[index].sum(0) > 0  # drop columns that are padding for every kept row
        return PromptBatch(
            ids=[self.ids[i] for i in index.tolist()],
            input_ids=self.input_ids[index][:, keep],
            attention_mask=self.attention_mask[index][:, keep],
            targets={k: v[index] for k, v in self.targets.items()},
        )

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield self.select(list(range(start, min(start + size, len(self)))))


def encode_prompts(tokenizer, ids: list[str], prompts: list[str], targets: dict[str, Tensor]) -> PromptBatch:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if tokenizer.padding_side != "left":
        raise ValueError("prompts must be left-padded so the final position is the last real token")
    return PromptBatch(ids, enc["input_ids"], enc["attention_mask"], targets)


def file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class TaskSuite(ABC):
    """One task suite of the battery. Subclasses live in ``tasks/<name>/`` with their data files."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    @abstractmethod
    def data_files(self) -> list[Path]:
        """Every data file the suite reads; their hashes go into the run record."""

    def data_hash(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.data_files):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        return "sha256:" + h.hexdigest()

    @abstractmethod
    def examples(self, split: str) -> list[dict]:
        """The examples of one split, each a dict with at least an ``id``."""

    def split_hashes(self) -> dict[str, str]:
        return {
            s: "sha256:" + hashlib.sha256(json.dumps(self.examples(s), sort_keys=True).encode()).hexdigest()
            for s in SPLITS
        }

    @abstractmethod
    def encode(self, examples: list[dict]) -> PromptBatch:
        """Tokenize examples into a left-padded batch with the targets the scores need."""

    @abstractmethod
    def behavior(self, logits: Tensor, batch: PromptBatch) -> Tensor:
        """Behavior score ``b`` [b] from final-position logits [b, vocab]; ``b > 0`` means present."""

    def attack_loss(self, logits: Tensor, batch: PromptBatch) -> Tensor:
        """Per-example loss [b] the attacker minimizes to bring the behavior back (default: ``-b``)."""
        return -self.behavior(logits, batch)

    @abstractmethod
    def control_batch(self) -> PromptBatch:
        """Neutral prompts on which the defense should not change the next-token distribution."""


TASKS: Registry[type[TaskSuite]] = Registry("task suite", entry_point_group="sae_recovery_benchmark.tasks")
