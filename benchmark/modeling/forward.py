"""The one place the model runs: a forward pass through nnsight with edits at residual sites.

An edit is a differentiable function of the residual stream after a block, ``h [b, p, d] -> h' [b, p, d]``.
Defenses, the attacker's ``delta`` and replays are all composed into edits, so the defense acts in every
forward pass the benchmark makes, in the order the threat model fixes (``delta`` first, then the defense).

On a remote model (``LoadedModel.remote``, nnsight's NDIF execution) the trace's code and every value it references
(edits, their tensors, defenses, SAEs) are serialized and run on the server, and only saved values come back:
what ``run_edited`` returns and what :func:`capture` edits recorded (it brings their stores back), without an
autograd graph (a gradient through them raises :class:`BenchmarkError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import Tensor
from transformers import Cache, DynamicCache

from benchmark.errors import BenchmarkError, NonFiniteError
from benchmark.modeling.models import LoadedModel
from tasks.base import PromptBatch, TaskSuite, greedy_by_full_passes, greedy_loop

if TYPE_CHECKING:
    from defenses.base import Defense

Edit = Callable[[Tensor], Tensor]


class ResidualStore(Protocol):
    """Stored undefended residuals after block ``layer`` that a pass may start from (what
    :class:`benchmark.modeling.base_residuals.BaseResiduals` is; declared here so this module needs nothing above it)."""

    layer: int

    def get(self, batch: PromptBatch) -> Tensor:
        """[b, p, d]: the residual after block ``layer`` for every row of ``batch``."""


def run_edited(model: LoadedModel, batch: PromptBatch, edits: dict[int, Edit], *, all_logits: bool = False,
               read_layer: int | None = None, inputs_embeds: Tensor | None = None,
               prefix: tuple[int, Tensor] | None = None, past: Cache | None = None) -> Tensor:
    """The forward pass with ``edits[L]`` applied to the output of block L, and what it reads:

    - ``read_layer`` None: logits at the last ``batch.read_len`` positions, [b, r, vocab] (all positions,
      [b, p, vocab], with ``all_logits``); the unembedding runs only at the positions read;
    - ``read_layer`` L: the residual after block L and its edit, [b, p, d]. The forward stops after the last
      block that is read or edited, so nothing above it runs (pass ``read_layer=max(edits)`` to only capture).

    Precision and device: the batch moves to the model's device; each edit gets the block's output in float32 and
    its result goes back into the model in the model's dtype, so defenses, the attacker's ``delta`` and every
    readout taken inside an edit (C1's pre-activations) are exact to float32 whatever the weights' dtype; what is
    returned is float32 too.

    ``prefix = (S, h)`` reuses a residual computed before: blocks 0..S do not run, block S outputs ``h``
    [b, p, d] (then ``edits[S]`` applies). It is what the attacker passes, since nothing below its site changes
    between steps; no edit may sit below S.

    Inputs are left-padded, so the last positions are every prompt's last tokens; explicit position ids keep
    padding from shifting positions. ``inputs_embeds`` [b, p, d_emb], when given, is fed to the model instead of
    the embedding of ``batch.input_ids`` (which then only fix the shape; the mask and positions still come from
    ``batch``); it is what the model's input embedding layer would output (a model that scales embeddings, such
    as Gemma, still applies its scale inside).

    ``past``, a key/value cache of the first ``n = past.get_seq_length()`` columns of ``batch``, runs only the
    columns after them (and extends ``past``): edits see and return those columns, [b, p - n, d], what is read
    covers them, and ``inputs_embeds`` holds them. Without it nothing is cached.
    """
    n_past = 0 if past is None else past.get_seq_length()
    if past is not None and (prefix is not None or model.remote):
        raise ValueError("a key/value cache runs locally and from the input; it cannot reuse a residual prefix")
    dev = model.device
    inputs = dict(attention_mask=batch.attention_mask.to(dev), position_ids=batch.position_ids[:, n_past:].to(dev))
    if inputs_embeds is None:
        inputs["input_ids"] = batch.input_ids[:, n_past:].to(dev)
    else:
        inputs["inputs_embeds"] = inputs_embeds.to(dev, model.dtype)
    touched = sorted(set(edits) | ({read_layer} if read_layer is not None else set()))
    for layer in touched:
        model.check_layer(layer)
    if prefix is not None and touched and touched[0] < prefix[0]:
        raise ValueError(f"an edit at layer {touched[0]} lies below the reused prefix (blocks 0..{prefix[0]})")
    kwargs = {} if all_logits or read_layer is not None else {"logits_to_keep": batch.read_len}
    kwargs.update(use_cache=past is not None, past_key_values=past)
    local_stores = _capture_stores(edits) if model.remote else []
    bring_back = bool(local_stores)
    with model.remote_errors():  # a remote model's trace runs on NDIF (see LoadedModel.remote)
        with model.lm.trace(inputs, **kwargs, **model.trace_options()) as tracer:
            if bring_back:  # on the server these are copies of capture()'s stores, filled there
                stores = _capture_stores(edits).save()
            if prefix is not None:
                stop, h = prefix
                h = h.to(dev, model.dtype)
                for layer in range(stop + 1):  # skipped: their outputs are never read, only shaped like h
                    model.block(layer).skip(h)
            for layer in touched:
                block = model.block(layer)
                if layer in edits:  # edits run in float32 whatever the model's dtype (C1 holds to float32 precision)
                    block.output = edits[layer](block.output.float()).to(model.dtype)
                if layer == read_layer:
                    residual = block.output.save()
            if read_layer is not None:
                tracer.stop()
            else:
                logits = model.lm.output.logits.save()
    out = (residual if read_layer is not None else logits).float()  # what is scored or read: float32
    if bring_back:
        for mine, returned in zip(local_stores, stores):
            mine.update({k: _graphless(v) for k, v in returned.items()})
    return _graphless(out) if model.remote else out


class _NoRemoteGradient(torch.autograd.Function):
    """Identity whose backward raises: marks a value that came back from a remote trace without its graph."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        raise BenchmarkError(
            "a gradient was asked through a remote (NDIF) forward pass: the trace runs on the server and returns "
            "saved values without their autograd graph, so nothing here (the attack, or fitting a defense by "
            "gradient attribution) can get gradients from it. Run it locally (without --remote)"
        )


def _graphless(value):
    """A tensor that came back from a remote trace, made to raise on backward when grad mode is on."""
    if isinstance(value, Tensor) and value.is_floating_point() and torch.is_grad_enabled():
        return _NoRemoteGradient.apply(value.detach().requires_grad_())
    return value


def run_task(model: LoadedModel, task: TaskSuite, batch: PromptBatch, edits: dict[int, Edit],
             inputs_embeds: Tensor | None = None, prefix: tuple[int, Tensor] | None = None) -> Tensor:
    """What ``task`` reads (logits at its read positions, or the residual at its ``read_layer``) with ``edits``."""
    return run_edited(model, batch, edits, read_layer=task.read_layer, inputs_embeds=inputs_embeds, prefix=prefix)


class EditedForward:
    """The :data:`tasks.base.Forward` that :meth:`TaskSuite.score` runs: the model with ``edits_for(batch)`` on any
    batch, fed ``embeds_for(batch)`` instead of the token embeddings when given (a soft suffix).

    With ``residuals`` (at a layer no edit and no read lies below) every pass starts from the stored undefended
    residual instead of running the blocks below it. :meth:`greedy` generates with a key/value cache.
    """

    def __init__(self, model: LoadedModel, task: TaskSuite, edits_for: Callable[[PromptBatch], dict[int, Edit]],
                 residuals: ResidualStore | None = None,
                 embeds_for: Callable[[PromptBatch], Tensor] | None = None) -> None:
        self.model, self.task, self.edits_for = model, task, edits_for
        self.residuals, self.embeds_for = residuals, embeds_for

    def __call__(self, batch: PromptBatch) -> Tensor:
        embeds = None if self.embeds_for is None else self.embeds_for(batch)
        return run_task(self.model, self.task, batch, self.edits_for(batch), inputs_embeds=embeds,
                        prefix=residual_prefix(self.residuals, batch))

    @torch.no_grad()
    def greedy(self, batch: PromptBatch, new_tokens: int, eos_id: int) -> Tensor:
        """[b, new_tokens]: :func:`tasks.base.greedy_by_full_passes`'s tokens, each step running only the new
        column through the model (the others' keys and values are cached).

        The edits still see every column: each edited site keeps its unedited residual of the columns so far and
        the edit runs on all of them, of which the new column's output is used. That equals a full pass when an
        edit is causal (its output at a position depends on no later position), as a defense that runs in a
        deployed model with a key/value cache must be. A remote model generates by full passes."""
        if self.model.remote:
            return greedy_by_full_passes(self, batch, new_tokens, eos_id)
        past = DynamicCache(config=self.model.hf.config)
        seen: dict[int, Tensor] = {}  # per edited site: its unedited residual over every column so far
        embeds = [None if self.embeds_for is None else self.embeds_for(batch)]  # the prompt's, then none

        def next_logits(now: PromptBatch) -> Tensor:
            edits = on_all_columns(self.edits_for(now), seen)
            logits = run_edited(self.model, now, edits, inputs_embeds=embeds.pop() if embeds else None, past=past)
            return logits[:, -1]

        return greedy_loop(next_logits, batch, new_tokens, eos_id)


def on_all_columns(edits: dict[int, Edit], seen: dict[int, Tensor]) -> dict[int, Edit]:
    """``edits`` for a pass that runs only the newest columns after a key/value cache of the earlier ones: each
    runs on every column so far (its site's earlier unedited residual, kept in ``seen`` and extended by each
    pass) and returns the newest columns. Exact for causal edits (see :meth:`EditedForward.greedy`)."""
    return {L: _OnAllColumns(e, seen, L) for L, e in edits.items()}


@dataclass
class Prefill:
    """The first ``width`` columns of a batch, run once (:func:`prefill`) and continued by passes over the columns
    after them (:func:`run_continued`): what a soft suffix appended after a prompt needs, since nothing before the
    suffix depends on it (causal attention, causal edits)."""

    kv: list[tuple[Tensor | None, Tensor | None]]  # per layer: keys, values [b, kv_heads, width, head_dim]
    seen: dict[int, Tensor]  # per edited site: its unedited residual [b, width, d]
    read: Tensor | None  # the residual read [b, width, d] at the read layer (None when logits are read)

    @property
    def width(self) -> int:
        return next(iter(self.seen.values())).shape[1] if self.seen else self.kv[0][0].shape[2]

    def select(self, rows: Tensor, drop: int) -> Prefill:
        """The prefill of ``rows``, without its first ``drop`` columns (padding for every one of them)."""
        def cut(t: Tensor | None, dim: int) -> Tensor | None:
            return None if t is None else t[rows].narrow(dim, drop, t.shape[dim] - drop)

        return Prefill([(cut(k, 2), cut(v, 2)) for k, v in self.kv], {L: cut(h, 1) for L, h in self.seen.items()},
                       cut(self.read, 1))


@torch.no_grad()
def prefill(model: LoadedModel, batch: PromptBatch, edits: dict[int, Edit], *, read_layer: int | None = None,
            inputs_embeds: Tensor | None = None) -> Prefill:
    """Run every column of ``batch`` (the first part of longer rows) with ``edits``, keeping its keys and values,
    each edited site's unedited residual and, with ``read_layer``, the residual read there."""
    past, seen = DynamicCache(config=model.hf.config), {}
    read = run_edited(model, batch, on_all_columns(edits, seen), read_layer=read_layer, inputs_embeds=inputs_embeds,
                      past=past)
    kv = [(layer.keys, layer.values) if layer.is_initialized else (None, None) for layer in past.layers]
    return Prefill(kv, seen, read if read_layer is not None else None)


def run_continued(model: LoadedModel, batch: PromptBatch, edits: dict[int, Edit], pre: Prefill, *,
                  read_layer: int | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
    """:func:`run_edited` of ``batch`` whose first ``pre.width`` columns are ``pre``: only the columns after them
    run (``inputs_embeds`` holds those), every edit sees every column (:func:`on_all_columns`, so a
    :func:`capture` inside an edit records all of them), and a residual read covers every column."""
    past = DynamicCache(ddp_cache_data=pre.kv, config=model.hf.config)
    read = run_edited(model, batch, on_all_columns(edits, dict(pre.seen)), read_layer=read_layer,
                      inputs_embeds=inputs_embeds, past=past)
    return read if read_layer is None else torch.cat([pre.read, read], 1)


class _OnAllColumns:
    """An edit run on every column so far (kept in ``seen``) while the model runs only the newest ones."""

    def __init__(self, edit: Edit, seen: dict[int, Tensor], layer: int) -> None:
        self.edit, self.seen, self.layer = edit, seen, layer

    def __call__(self, h_new: Tensor) -> Tensor:
        old = self.seen.get(self.layer)
        h = h_new if old is None else torch.cat([old, h_new], 1)
        self.seen[self.layer] = h
        return self.edit(h)[:, -h_new.shape[1]:]


def task_forward(model: LoadedModel, task: TaskSuite, edits_for: Callable[[PromptBatch], dict[int, Edit]],
                 residuals: ResidualStore | None = None) -> EditedForward:
    """The :class:`EditedForward` of ``model`` with ``edits_for`` (see there)."""
    return EditedForward(model, task, edits_for, residuals)


def residual_prefix(residuals: ResidualStore | None, batch: PromptBatch) -> tuple[int, Tensor] | None:
    """``run_edited``'s ``prefix`` from the stored undefended residuals of ``batch`` (None without a store)."""
    return None if residuals is None else (residuals.layer, residuals.get(batch))


def defense_edits(defense: Defense | None, batch: PromptBatch) -> dict[int, Edit]:
    """The defense's edit at each of its sites for a forward pass over ``batch``, each checked where it returns
    (:class:`DefenseEdit`)."""
    if defense is None:
        return {}
    mask = batch.token_mask
    return {L: DefenseEdit(defense, L, mask, batch.ids) for L in defense.sites}


class DefenseEdit:
    """``defense.edit`` at ``layer``, checked on what it returns: a tensor of the residual's shape and dtype, all
    finite (one ``isfinite`` per call; only when it fails is the residual it got checked too, to say where the NaN
    came from). A bad edit is reported here, naming the defense, the layer and the shapes or the examples, not as a
    torch error deep inside the forward pass or as NaN in the record."""

    def __init__(self, defense: Defense, layer: int, token_mask: Tensor, ids: list[str]) -> None:
        self.defense, self.layer, self.token_mask, self.ids = defense, layer, token_mask, ids

    def __call__(self, h: Tensor) -> Tensor:
        out = self.defense.edit(self.layer, h, self.token_mask)
        name = f"defense '{self.defense.name}'"
        if not isinstance(out, Tensor) or out.shape != h.shape or out.dtype != h.dtype:
            got = (f"shape {list(out.shape)} ({out.dtype})" if isinstance(out, Tensor) else type(out).__name__)
            raise BenchmarkError(f"{name} returned {got} from its edit at layer {self.layer} for a residual of shape "
                                 f"{list(h.shape)} ({h.dtype}): edit(layer, h, token_mask) must return h's shape and "
                                 "dtype")
        if not bool(torch.isfinite(out).all()):
            raise self._non_finite(name, h, out)
        return out

    def _non_finite(self, name: str, h: Tensor, out: Tensor) -> NonFiniteError:
        bad = ~torch.isfinite(out)
        rows = bad.flatten(1).any(1).nonzero()[:, 0].tolist() if out.dim() > 1 else []
        examples = [self.ids[r] for r in rows] if out.shape[0] == len(self.ids) else []
        counts = f"{int(torch.isnan(out).sum())} NaN and {int(torch.isinf(out).sum())} inf values"
        if not bool(torch.isfinite(h).all()):
            return NonFiniteError(f"the residual reaching {name} at layer {self.layer} holds NaN or inf ({counts} "
                                  "after its edit)", examples, "it comes from below the defense (the model, an "
                                  "edit at a lower site, or the attack's delta)")
        return NonFiniteError(f"{name} returned {counts} from its edit at layer {self.layer} on a finite residual",
                              examples, "look for a division by zero, a log or sqrt of a non-positive number, or an "
                              "overflow in the edit")


def input_embeddings(model: LoadedModel) -> Tensor:
    """[vocab, d_emb]: the model's input embedding matrix (what ``inputs_embeds`` rows are made of)."""
    return model.hf.get_input_embeddings().weight


class _Compose:
    """:func:`compose`'s edit (a class, not a closure, so that :func:`_capture_stores` can look inside)."""

    def __init__(self, chain: list[Edit]) -> None:
        self.chain = chain

    def __call__(self, h: Tensor) -> Tensor:
        for e in self.chain:
            h = e(h)
        return h


def compose(*edits: Edit | None) -> Edit:
    """Apply edits left to right, skipping ``None``."""
    return _Compose([e for e in edits if e is not None])


def add(tensor: Tensor) -> Edit:
    """An edit adding ``tensor`` [b, p, d] (or anything that broadcasts to ``h``).

    Columns are aligned from the left, so the same ``tensor`` applies to a batch that keeps the prompt's columns
    and continues differently (cut before a teacher-forced answer, or extended by generated tokens): columns
    beyond ``tensor`` get nothing, and columns of ``tensor`` beyond ``h`` are dropped.
    """

    def edit(h: Tensor) -> Tensor:
        t = tensor
        if t.dim() == 3 and t.shape[1] != h.shape[1]:
            t = t[:, : h.shape[1]]
            t = torch.cat([t, t.new_zeros(t.shape[0], h.shape[1] - t.shape[1], t.shape[2])], 1)
        return h + t

    return edit


class _Capture:
    """:func:`capture`'s edit (a class, not a closure, so that :func:`_capture_stores` finds its store)."""

    def __init__(self, store: dict, key) -> None:
        self.store, self.key = store, key

    def __call__(self, h: Tensor) -> Tensor:
        self.store[self.key] = h
        return h


def capture(store: dict, key) -> Edit:
    """An edit that records the residual it sees (keeping the autograd graph) and passes it on unchanged."""
    return _Capture(store, key)


def _capture_stores(edits: dict[int, Edit]) -> list[dict]:
    """The stores of every :func:`capture` among ``edits`` (inside :func:`compose` too), each once, in order."""
    found: list[dict] = []

    def walk(edit) -> None:
        if isinstance(edit, _Capture):
            if not any(s is edit.store for s in found):
                found.append(edit.store)
        elif isinstance(edit, _Compose):
            for part in edit.chain:
                walk(part)

    for edit in edits.values():
        walk(edit)
    return found


@torch.no_grad()
def site_inputs(model: LoadedModel, batch: PromptBatch, edits: dict[int, Edit],
                prefix: tuple[int, Tensor] | None = None) -> dict[int, Tensor]:
    """Every edited site's input [b, p, d] with ``edits``, from a pass that stops at the last of them (nothing above
    it is read); empty without edits. ``prefix``: as :func:`run_edited`'s."""
    seen: dict[int, Tensor] = {}
    if edits:
        captured = {L: compose(capture(seen, L), e) for L, e in edits.items()}
        run_edited(model, batch, captured, read_layer=max(edits), prefix=prefix)
    return seen


def monitor_flags(model: LoadedModel, defense: Defense, batch: PromptBatch, edits: dict[int, Edit],
                  prefix: tuple[int, Tensor] | None = None) -> Tensor | None:
    """[b] bool: the inputs of ``batch`` on which ``defense`` abstains (:meth:`Defense.abstains`) in a pass with
    ``edits`` (the defense's own, and an attack's ``delta`` where there is one); None, and no pass, for a defense
    without a monitor."""
    if not defense.monitor_sites:
        return None
    return defense.abstains(site_inputs(model, batch, edits, prefix), batch.token_mask)


@torch.no_grad()
def next_token_kl(model: LoadedModel, batch: PromptBatch, edits_for: Callable[[PromptBatch], dict[int, Edit]],
                  chunk: int = 16, residuals: ResidualStore | None = None) -> float:
    """Mean KL(base || edited) of the next-token distribution over every real position of ``batch``.

    ``edits_for`` builds the edits for each chunk (edits may depend on the chunk's token mask); with
    ``residuals`` both passes start from the stored undefended residual (see :func:`task_forward`).
    """
    total, count = 0.0, 0
    for part in batch.length_chunks(chunk):
        prefix = residual_prefix(residuals, part)
        base = torch.log_softmax(run_edited(model, part, {}, all_logits=True, prefix=prefix), -1)
        edited = torch.log_softmax(run_edited(model, part, edits_for(part), all_logits=True, prefix=prefix), -1)
        kl = (base.exp() * (base - edited)).sum(-1)
        mask = part.attention_mask.bool()
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)
