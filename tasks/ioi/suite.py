"""Indirect object identification (circuit level): ``b = logit(IO) - logit(S)`` at the final position."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from tasks.base import TASKS, PromptBatch, TaskSuite, encode_prompts, tokenizer_name

DATA = Path(__file__).parent / "data" / "ioi.json"


@TASKS.register("ioi")
class IOISuite(TaskSuite):
    version = "1.0"
    reference_defense = "sae_clamp"
    data_file = DATA
    description = "IOI: templated ABBA/BABA prompts, b = logit(IO) - logit(S) at the final position"

    def _single_token(self, name: str) -> int | None:
        ids = self.tokenizer(name, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def examples(self, split: str) -> list[dict]:
        if split not in self.data["splits"]:
            raise BenchmarkError(f"IOI has no split '{split}' (splits: {', '.join(self.data['splits'])})")
        kept = [
            ex for ex in self.data["splits"][split]
            if self._single_token(ex["io"]) is not None and self._single_token(ex["s"]) is not None
        ]
        if not kept:
            raise BenchmarkError(
                f"suite ioi cannot run on {tokenizer_name(self.tokenizer)}: no IOI {split} example has both names as "
                "single tokens of its tokenizer (b = logit(IO) - logit(S) reads one token per name). Run the other "
                "suites on this model, or rebuild the IOI data with names that are one token for it "
                "(NAMES in tasks/ioi/build_data.py)")
        return kept

    def encode(self, examples: list[dict]) -> PromptBatch:
        targets = {
            "io": torch.tensor([self._single_token(ex["io"]) for ex in examples]),
            "s": torch.tensor([self._single_token(ex["s"]) for ex in examples]),
        }
        return encode_prompts(self.tokenizer, [ex["id"] for ex in examples], [ex["prompt"] for ex in examples], targets)

    def behavior(self, read: Tensor, batch: PromptBatch) -> Tensor:
        logits = read[:, -1]  # [b, vocab] after the prompt
        io = logits.gather(-1, batch.targets["io"][:, None])[:, 0]
        s = logits.gather(-1, batch.targets["s"][:, None])[:, 0]
        return io - s

    def control_batch(self) -> PromptBatch:
        control = self.data["control"]
        return encode_prompts(self.tokenizer, [c["id"] for c in control], [c["text"] for c in control], {})
