"""The one place the model runs: a forward pass through nnsight with edits at residual sites.

An edit is a differentiable function of the residual stream after a block, ``h [b, p, d] -> h' [b, p, d]``.
Defenses, the attacker's ``delta`` and replays are all composed into edits, so the defense acts in every
forward pass the benchmark makes, in the order the threat model fixes (``delta`` first, then the defense).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from benchmark.models import LoadedModel
from tasks.base import PromptBatch

Edit = Callable[[Tensor], Tensor]


def run_edited(model: LoadedModel, batch: PromptBatch, edits: dict[int, Edit], last_only: bool = True,
               inputs_embeds: Tensor | None = None) -> Tensor:
    """Logits with ``edits[L]`` applied to the output of block L: [b, vocab] if ``last_only`` else [b, p, vocab].

    Inputs are left-padded, so position -1 is every prompt's last token; explicit position ids keep padding
    from shifting positions. ``inputs_embeds`` [b, p, d_emb], when given, is fed to the model instead of the
    embedding of ``batch.input_ids`` (which then only fix the shape; the mask and positions still come from
    ``batch``); it is what the model's input embedding layer would output (a model that scales embeddings, such
    as Gemma, still applies its scale inside).
    """
    inputs = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    if inputs_embeds is None:
        inputs["input_ids"] = batch.input_ids
    else:
        inputs["inputs_embeds"] = inputs_embeds
    kwargs = {"logits_to_keep": 1} if last_only else {}
    with model.lm.trace(inputs, **kwargs):
        for layer in sorted(edits):
            block = model.block(layer)
            block.output = edits[layer](block.output)
        logits = model.lm.output.logits.save()
    return logits[:, -1] if last_only else logits


def input_embeddings(model: LoadedModel) -> Tensor:
    """[vocab, d_emb]: the model's input embedding matrix (what ``inputs_embeds`` rows are made of)."""
    return model.hf.get_input_embeddings().weight


def compose(*edits: Edit | None) -> Edit:
    """Apply edits left to right, skipping ``None``."""
    chain = [e for e in edits if e is not None]

    def edit(h: Tensor) -> Tensor:
        for e in chain:
            h = e(h)
        return h

    return edit


def add(tensor: Tensor) -> Edit:
    """An edit adding ``tensor`` (broadcast to [b, p, d])."""
    return lambda h: h + tensor


def capture(store: dict, key) -> Edit:
    """An edit that records the residual it sees (keeping the autograd graph) and passes it on unchanged."""

    def edit(h: Tensor) -> Tensor:
        store[key] = h
        return h

    return edit


@torch.no_grad()
def next_token_kl(model: LoadedModel, batch: PromptBatch, edits_for: Callable[[PromptBatch], dict[int, Edit]],
                  chunk: int = 16) -> float:
    """Mean KL(base || edited) of the next-token distribution over every real position of ``batch``.

    ``edits_for`` builds the edits for each chunk (edits may depend on the chunk's token mask).
    """
    total, count = 0.0, 0
    for part in batch.chunks(chunk):
        base = torch.log_softmax(run_edited(model, part, {}, last_only=False), -1)
        edited = torch.log_softmax(run_edited(model, part, edits_for(part), last_only=False), -1)
        kl = (base.exp() * (base - edited)).sum(-1)
        mask = part.attention_mask.bool()
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)
