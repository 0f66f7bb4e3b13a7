"""What a task suite provides to the engine, and the batch of prompts it hands over.

A suite is bound to a model's tokenizer. It gives examples per split (``fit`` for choosing a defense,
``dev`` for tuning, ``test`` for the leaderboard; disjoint and fixed by seed), encodes them into a
:class:`PromptBatch`, scores the behavior from what one forward pass reads (``b > 0`` means the behavior is
present), and gives the attacker a differentiable per-example loss and a control batch for side effects.

What a forward pass reads (see :func:`benchmark.modeling.forward.run_edited`): by default the logits at the last
``batch.read_len`` positions, [b, r, vocab] (``r = 1``: the next token after the prompt; ``r > 1``: the prompt
ends with ``r - 1`` teacher-forced answer tokens, which the attacker may not edit); with ``read_layer`` set, the
residual after that block, [b, p, d], and the forward stops there. A suite whose behavior needs more than one
forward pass (generation) overrides :meth:`TaskSuite.score`; the attacker still stops on :meth:`behavior`, and
the engine confirms every attacked example with :meth:`score`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar

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
    read_len: int = 1  # logits are read at the last read_len positions (r - 1 teacher-forced answer tokens)

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

    @property
    def prompt_mask(self) -> Tensor:
        """[b, p] bool: :attr:`token_mask` without the teacher-forced answer tokens (what an attacker may edit)."""
        mask = self.token_mask.clone()
        if self.read_len > 1:
            mask[:, mask.shape[1] - self.read_len + 1:] = False
        return mask

    def select(self, index: Tensor | list[int]) -> "PromptBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        keep = self.attention_mask[index].sum(0) > 0  # drop columns that are padding for every kept row
        return PromptBatch(
            ids=[self.ids[i] for i in index.tolist()],
            input_ids=self.input_ids[index][:, keep],
            attention_mask=self.attention_mask[index][:, keep],
            targets={k: v[index] for k, v in self.targets.items()},
            read_len=self.read_len,
        )

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield self.select(list(range(start, min(start + size, len(self)))))

    def length_order(self) -> list[int]:
        """Row indices from the shortest prompt to the longest (ties in order): chunks of rows taken in this
        order carry little padding."""
        return sorted(range(len(self)), key=lambda i: int(self.attention_mask[i].sum()))

    def by_length(self) -> "PromptBatch":
        """This batch's rows in :meth:`length_order` (its chunks carry little padding)."""
        return self.select(self.length_order())

    def length_chunks(self, size: int):
        """Chunks of at most ``size`` rows of :meth:`by_length` (for passes whose results are summed)."""
        return self.by_length().chunks(size)

    def map_length_chunks(self, size: int, fn: Callable[["PromptBatch"], Tensor]) -> Tensor:
        """``fn``'s rows [b_chunk, ...] over :meth:`length_chunks`, concatenated back in this batch's row order."""
        order = self.length_order()
        out = torch.cat([fn(part) for part in self.select(order).chunks(size)])
        return out[torch.argsort(torch.tensor(order))]


def adds_bos(tokenizer, prompts: list[str]) -> bool:
    """Whether ``prompts`` are tokenized with the tokenizer's own special tokens: yes (Gemma 3 needs its BOS; SmolLM2's
    tokenizer and the stand-ins' add none), unless every prompt already starts with the BOS (a chat template that
    writes it, as Gemma 2's does)."""
    bos = tokenizer.bos_token
    return not (bos and all(p.startswith(bos) for p in prompts))


def encode_prompts(tokenizer, ids: list[str], prompts: list[str], targets: dict[str, Tensor],
                   read_len: int = 1) -> PromptBatch:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=adds_bos(tokenizer, prompts))
    if tokenizer.padding_side != "left":
        raise ValueError("prompts must be left-padded so the final position is the last real token")
    return PromptBatch(ids, enc["input_ids"], enc["attention_mask"], targets, read_len)


Forward = Callable[[PromptBatch], Tensor]


def greedy(forward: Forward, batch: PromptBatch, new_tokens: int, eos_id: int) -> Tensor:
    """[b, new_tokens] greedy continuation of every prompt of ``batch`` with ``forward``: its own ``greedy``
    (:class:`benchmark.modeling.forward.EditedForward` caches keys and values) when it has one, else
    :func:`greedy_by_full_passes`."""
    own = getattr(forward, "greedy", None)
    if own is not None:
        return own(batch, new_tokens, eos_id)
    return greedy_by_full_passes(forward, batch, new_tokens, eos_id)


def greedy_by_full_passes(forward: Forward, batch: PromptBatch, new_tokens: int, eos_id: int) -> Tensor:
    """[b, new_tokens] greedy continuation of every prompt of ``batch`` (``read_len`` 1), one full pass of
    ``forward`` over the prompt and the tokens so far per token (see :func:`greedy_loop`)."""
    return greedy_loop(lambda now: forward(now)[:, -1], batch, new_tokens, eos_id)


def greedy_loop(next_logits: Callable[[PromptBatch], Tensor], batch: PromptBatch, new_tokens: int,
                eos_id: int) -> Tensor:
    """[b, new_tokens] greedy continuation of every prompt of ``batch``; ``next_logits(now)`` gives the
    next-token logits [b, vocab] of ``now``, the prompts and the tokens so far (``read_len`` 1).

    Tokens after a row's first EOS are EOS; generation stops early when every row has ended.
    """
    ids, mask = batch.input_ids, batch.attention_mask
    out = torch.full((len(batch), new_tokens), eos_id, dtype=torch.long)
    done = torch.zeros(len(batch), dtype=torch.bool)
    for t in range(new_tokens):
        logits = next_logits(PromptBatch(list(batch.ids), ids, mask, dict(batch.targets), read_len=1))
        token = torch.where(done, torch.full_like(done, eos_id, dtype=torch.long), logits.argmax(-1))
        out[:, t] = token
        done |= token == eos_id
        if bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return out


def file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class TaskSuite(ABC):
    """One task suite of the battery. Subclasses live in ``tasks/<name>/`` with their data files."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    #: True when :meth:`score` judges differently from :meth:`behavior` (e.g. by generation): the attacker stops
    #: on ``behavior`` and every attacked example is re-judged with ``score``
    confirms: ClassVar[bool] = False
    #: True when :meth:`score` runs the model on tokens it makes itself (generation): the engine then keeps no
    #: store of undefended residuals for it (each step's sequence is new)
    score_runs_new_tokens: ClassVar[bool] = False
    #: the defense this suite's behavior is usually suppressed with (``benchmark evaluate --defense reference``)
    reference_defense: ClassVar[str]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.read_layer: int | None = None  # None: the behavior reads logits; L: the residual after block L

    def prepare(self, model) -> None:
        """Model-dependent set-up before any split is encoded or scored (probes, base answers); default none.

        Runs on the undefended model only; whatever it learns must come from the ``fit`` split (or be the base
        model's own output on an example, such as the answer a refusal suite teacher-forces)."""

    #: the suite's JSON data file, versioned beside its code (see :meth:`data_files` and :attr:`data`)
    data_file: ClassVar[Path]

    @property
    def data_files(self) -> list[Path]:
        """Every data file the suite reads; their hashes go into the run record (default: :attr:`data_file`)."""
        return [self.data_file]

    @cached_property
    def data(self) -> dict:
        """The parsed :attr:`data_file`."""
        return json.loads(self.data_file.read_text())

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
    def behavior(self, read: Tensor, batch: PromptBatch) -> Tensor:
        """Behavior score ``b`` [b] from what the forward pass reads (see the module docstring); ``b > 0`` means
        present. Differentiable where the attacker's loss uses it."""

    def attack_loss(self, read: Tensor, batch: PromptBatch) -> Tensor:
        """Per-example loss [b] the attacker minimizes to bring the behavior back (default: ``-b``)."""
        return -self.behavior(read, batch)

    def score(self, forward: Forward, batch: PromptBatch) -> Tensor:
        """The judged behavior score [b] with the model that ``forward`` runs (defense and attack already in it).

        ``forward`` takes any batch whose columns begin with ``batch``'s prompt columns (everything but the
        teacher-forced answer), such as the prompt plus generated tokens. Default: :meth:`behavior` of one pass.
        """
        return self.behavior(forward(batch), batch)

    def known_base_scores(self, batch: PromptBatch) -> Tensor | None:
        """The judged behavior [b] of the undefended model, when encoding ``batch`` already ran that very judgement
        (a refusal suite generates the base answer it teacher-forces); None (default): the engine scores it."""
        return None

    def task_metrics(self, base: Forward, defended: Forward) -> dict[str, float | None]:
        """Suite-specific metrics of the defense, recorded under ``task_metrics`` (e.g. TPP's accuracy drops);
        ``base`` and ``defended`` run the model without and with the defense. Default: none."""
        return {}

    @classmethod
    def outcome_metrics(cls, rows: list[dict]) -> dict[str, float | None]:
        """Suite-specific metrics of the attack's outcome from the record's example rows (``valid_flip``,
        ``recovered``, ``b_attacked``, ...), recorded under ``task_metrics`` beside :meth:`task_metrics`'s; computed
        from the rows alone, so a merged record gets them too. Default: none."""
        return {}

    @abstractmethod
    def control_batch(self) -> PromptBatch:
        """Neutral prompts on which the defense should not change the next-token distribution."""


TASKS: Registry[type[TaskSuite]] = Registry("task suite", entry_point_group="sae_recovery_benchmark.tasks")
