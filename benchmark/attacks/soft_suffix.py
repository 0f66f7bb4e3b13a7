"""``soft_suffix``: the baseline with no residual access (input space, C4 only).

``suffix_len`` soft tokens are appended after every prompt, before any teacher-forced answer (left padding stays on
the left), initialized from the input embedding of :data:`SUFFIX_INIT` and optimized in input-embedding space;
``delta`` [b, k, d] is the change of the suffix embeddings, with ``||delta_j|| <= eps * ||e_init||`` per suffix token
(``delta_rel`` = ``||delta|| / ||e_init||`` over the suffix). The defense is active in every forward pass, at every
position including the suffix. A suffix cannot change the defended readouts over the original prompt positions
(causal attention), so this attack's drift and reactivation compare the readouts at every defended site over every
editable position of prompt + suffix with the defended run on the same prompt + suffix at its initialization: all
of the change is at the suffix positions, and the relative drift divides it by the norm over all positions. It
makes no C1 claim (``c1_change`` is None) and has no residual ``delta`` to replay. The prompt before the suffix runs
once per chunk (:func:`benchmark.modeling.forward.prefill`, the defense active); each step runs only the suffix and answer
columns after its keys and values (:func:`benchmark.modeling.forward.run_continued`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.attacks.base import ATTACKS, INPUT_SPACE, AttackConfig, Chunk, RecoveryAttack, clip_per_position
from benchmark.modeling.forward import (EditedForward, Prefill, capture, compose, defense_edits, input_embeddings, prefill,
                               run_continued)
from benchmark.modeling.models import LoadedModel
from defenses.base import Defense
from tasks.base import PromptBatch, TaskSuite

SUFFIX_INIT = "!"  # GCG's conventional suffix initialization; the tokenizer's EOS token where "!" is no token


def suffix_token(tokenizer) -> tuple[int, str]:
    """The suffix's initial token: :data:`SUFFIX_INIT` if it is one known token, else the EOS token."""
    ids = tokenizer(SUFFIX_INIT, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return ids[0], SUFFIX_INIT
    return tokenizer.eos_token_id, tokenizer.eos_token


def suffix_start(batch: PromptBatch, length: int) -> int:
    """First column of the suffix in a batch made by :func:`with_suffix` (before the teacher-forced answer)."""
    return batch.input_ids.shape[1] - (batch.read_len - 1) - length


def with_suffix(batch: PromptBatch, length: int, token_id: int) -> PromptBatch:
    """``batch`` with ``length`` copies of ``token_id`` after every prompt, before its teacher-forced answer
    tokens (padding stays on the left)."""
    n, cut = len(batch), batch.input_ids.shape[1] - (batch.read_len - 1)
    ids = torch.cat([batch.input_ids[:, :cut], torch.full((n, length), token_id, dtype=batch.input_ids.dtype),
                     batch.input_ids[:, cut:]], 1)
    ones = torch.ones(n, length, dtype=batch.attention_mask.dtype)
    mask = torch.cat([batch.attention_mask[:, :cut], ones, batch.attention_mask[:, cut:]], 1)
    return PromptBatch(list(batch.ids), ids, mask, dict(batch.targets), batch.read_len)


@ATTACKS.register("soft_suffix")
class SoftSuffixAttack(RecoveryAttack):
    """Soft tokens after the prompt, optimized in embedding space; no residual access."""

    threat_model = INPUT_SPACE
    claims = ("C4",)
    description = "soft-token suffix optimized in input-embedding space, no residual access (C4 on the suffix)"

    def __init__(self, model: LoadedModel, defense: Defense, task: TaskSuite, cfg: AttackConfig):
        super().__init__(model, defense, task, cfg)
        self.suffix_id, self.suffix_text = suffix_token(model.tokenizer)
        self.embed = input_embeddings(model).detach()

    @property
    def delta_dim(self) -> int:
        return self.embed.shape[1]

    def columns(self, width: int, sub_width: int) -> slice:
        return slice(None)  # delta covers the suffix only, the same columns in every sub-batch

    @classmethod
    def settings(cls, cfg: AttackConfig, model: LoadedModel) -> dict:
        return {"suffix_len": cfg.suffix_len, "suffix_init": suffix_token(model.tokenizer)[1]}

    def project(self, delta: Tensor, h_norm: Tensor, pos_mask: Tensor, eps: Tensor,
                basis: Tensor | None = None) -> Tensor:
        return clip_per_position(delta * pos_mask[..., None], eps * h_norm)


    def forward(self, batch: PromptBatch, delta: Tensor | None, h_site: Tensor | None = None,
                pre: Prefill | None = None):
        """Defended forward from input embeddings with ``delta`` on the suffix tokens (:meth:`suffix_embeds`),
        running only the columns from the suffix on after ``pre``, the prompts before it (nothing there depends on
        the suffix: causal attention and causal edits); every site's input and the suite's read cover every column."""
        seen: dict[int, Tensor] = {}
        edits = {L: compose(capture(seen, L), e) for L, e in defense_edits(self.defense, batch).items()}
        with torch.enable_grad():
            read = run_continued(self.model, batch, edits, pre, read_layer=self.task.read_layer,
                                 inputs_embeds=self.suffix_embeds(batch, delta)[:, pre.width:])
        return read, seen

    def suffix_embeds(self, batch: PromptBatch, delta: Tensor | None, start: int | None = None) -> Tensor:
        """[b, p, d_emb]: input embeddings of ``batch`` with ``delta`` [b, suffix_len, d_emb] added to its suffix
        tokens (``suffix_len`` columns from ``start``, by default where :func:`with_suffix` put them)."""
        embeds = self.embed[batch.input_ids]
        if delta is None:
            return embeds
        s = suffix_start(batch, self.cfg.suffix_len) if start is None else start
        e = s + self.cfg.suffix_len
        return torch.cat([embeds[:, :s], embeds[:, s:e] + delta, embeds[:, e:]], 1)

    def confirm(self, chunk: Chunk, delta: Tensor) -> Tensor:
        start = suffix_start(chunk.batch, self.cfg.suffix_len)
        forward = EditedForward(self.model, self.task, lambda b: defense_edits(self.defense, b),
                                embeds_for=lambda b: self.suffix_embeds(b, delta, start))
        with torch.no_grad():
            return self.task.score(forward, chunk.batch)

    def prepare(self, batch: PromptBatch) -> Chunk:
        ext = with_suffix(batch, self.cfg.suffix_len, self.suffix_id)
        start = suffix_start(ext, self.cfg.suffix_len)
        head = PromptBatch(ext.ids, ext.input_ids[:, :start], ext.attention_mask[:, :start])
        pre = prefill(self.model, head, defense_edits(self.defense, head), read_layer=self.task.read_layer,
                      inputs_embeds=self.embed[head.input_ids])
        with torch.no_grad():
            _, seen = self.forward(ext, None, pre=pre)
        n, k = len(batch), self.cfg.suffix_len
        slots = torch.ones(n, k)
        if self.cfg.positions == "last":
            slots[:, :-1] = 0
        ref = self.embed[self.suffix_id].norm().expand(n, k).clone()
        return Chunk(ext, ref, slots, torch.ones(n, k, dtype=torch.bool), self._readouts(seen), prefill=pre)
