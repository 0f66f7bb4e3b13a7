"""What every residual attack shares: ``delta`` [b, p, d] is added to the residual stream after block ``layer``
*before* the defense acts there, and the defense is re-applied in every forward pass. After every optimizer step
the attack's constraints are enforced on ``delta`` itself (not only on its gradient, so Adam's per-coordinate
rescaling cannot leave the subspace):

- C1 (attacks that claim it): ``delta`` is projected, at each position, onto the orthogonal complement of the
  defended encoder rows at the attacked site, so the defended pre-activations there are unchanged to float precision;
- C2-C3 (:mod:`benchmark.attacks.jacobian`): a cross-site basis per example, projected out as well;
- C4 (every attack): ``||delta_p||_2 <= eps * ||h_p||`` at each attacked position p, where ``h`` is the residual
  of the defended model, unattacked, at the point ``delta`` is added (before the defense acts there).

C1 is per position, so scaling one position of ``delta`` keeps it; a cross-site null space mixes positions, so a
per-position rescale would leave it. With a cross-site basis the projection therefore alternates projection and
per-position clip ``CLIP_ROUNDS`` times (alternating projections onto the subspace and the product of balls, which
approach a point of their intersection), then projects once more and shrinks the whole example by a single scale
until every position is within budget: the result lies exactly (to float precision) in the null space and within C4.

The part of the network below the attacked site is computed once per chunk; each step runs only the blocks from
the site up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import benchmark.attacks.cross_site as cross_site
from benchmark.attacks.base import (Adam, AttackConfig, Chunk, ExampleOutcome, RecoveryAttack, attacked_positions,
                                    clip_per_position)
from benchmark.errors import BenchmarkError
from benchmark.modeling import sae_math
from benchmark.modeling.forward import (Edit, EditedForward, Prefill, add, capture, compose, defense_edits,
                                        monitor_flags, run_task, site_inputs)
from benchmark.modeling.models import LoadedModel
from defenses.base import Defense, abstained
from tasks.base import PromptBatch, TaskSuite

CLIP_ROUNDS = 5  # project / per-position clip alternations with a cross-site basis before the final uniform shrink


def shrink_per_example(delta: Tensor, cap: Tensor) -> Tensor:
    """``delta`` [b, p, d] times one scale per example, the largest <= 1 that puts every position within ``cap``
    [b, p] (a uniform scale keeps any subspace ``delta`` lies in)."""
    norm = delta.norm(dim=-1)
    ratio = torch.where(norm > 0, cap / norm.clamp_min(1e-30), torch.full_like(norm, math.inf))
    scale = ratio.min(dim=1).values.clamp(max=1.0)
    return delta * scale[:, None, None]


class ResidualAttack(RecoveryAttack):
    """A perturbation of the residual at one site (default: the defense's first), C4 always, C1 when claimed."""

    def __init__(self, model: LoadedModel, defense: Defense, task: TaskSuite, cfg: AttackConfig):
        super().__init__(model, defense, task, cfg)
        self.basis = None  # [d, c] orthonormal C1 directions at the attacked site
        self.layer = cfg.layer if cfg.layer is not None else min(defense.sites) if defense.sites else None
        if self.layer is None:
            raise BenchmarkError("the attack needs a layer: the defense has no sites, pass --attack-layer")
        model.check_layer(self.layer)
        if "C1" in self.claims:
            if self.layer not in defense.sites:
                raise BenchmarkError(
                    f"attack '{self.name}' constrains delta at a defended site; layer {self.layer} is not one "
                    f"(defended sites: {defense.sites})"
                )
            self.basis = sae_math.orthonormal_basis(defense.protected_directions(self.layer).detach())

    @property
    def delta_dim(self) -> int:
        return self.model.d_model

    def columns(self, width: int, sub_width: int) -> slice:
        return slice(width - sub_width, width)  # sub-batches drop leading (left) padding

    @property
    def later_sites(self) -> list[int]:
        """Defended sites after the attacked one, whose readouts ``delta`` reaches through the network."""
        return [L for L in self.defense.sites if L > self.layer]

    # -- constraints ---------------------------------------------------------------------------------------------

    def subspace(self, delta: Tensor, pos_mask: Tensor, basis: Tensor | None = None) -> Tensor:
        """``delta`` [b, p, d] restricted to the attacked positions ``pos_mask`` [b, p], orthogonal to the C1
        directions at each position, and with its component in ``basis`` [b, p * d, r] (cross-site) removed."""
        delta = cross_site.strip(delta, pos_mask, self.basis)
        return delta if basis is None else cross_site.project_out(delta, basis)

    def project(self, delta: Tensor, h_norm: Tensor, pos_mask: Tensor, eps: Tensor,
                basis: Tensor | None = None) -> Tensor:
        """Without a cross-site ``basis``: subspace, then per-position clip (both per position, so they commute).
        With one: ``CLIP_ROUNDS`` of subspace + per-position clip, then subspace + one uniform shrink per
        example, so the result is in the subspace and within budget at every position."""
        cap = eps * h_norm
        if basis is None:
            return clip_per_position(self.subspace(delta, pos_mask), cap)
        for _ in range(CLIP_ROUNDS):
            delta = clip_per_position(self.subspace(delta, pos_mask, basis), cap)
        return shrink_per_example(self.subspace(delta, pos_mask, basis), cap)

    # -- forward passes ------------------------------------------------------------------------------------------

    def forward(self, batch: PromptBatch, delta: Tensor, h_site: Tensor | None = None, pre: Prefill | None = None):
        """``h_site`` [b, p, d], the unattacked residual at the attacked site, skips every block up to the site
        (nothing there depends on ``delta``); it needs every defended site at or above the attacked one."""
        seen: dict[int, Tensor] = {}
        prefix = None if h_site is None else (self.layer, h_site)
        with torch.enable_grad():
            read = run_task(self.model, self.task, batch, self.attacked_edits(batch, delta, seen), prefix=prefix)
        return read, seen

    def attacked_edits(self, batch: PromptBatch, delta: Tensor | None, seen: dict | None = None) -> dict[int, Edit]:
        """The defense's edits with ``delta`` [b, p, d] added at the attacked site before the defense acts there;
        with ``seen``, every site's input (``delta`` included) is captured into it."""
        edits = defense_edits(self.defense, batch)
        for L in set(self.defense.sites) | {self.layer}:
            edits[L] = compose(add(delta) if L == self.layer and delta is not None else None,
                               capture(seen, L) if seen is not None else None, edits.get(L))
        return edits

    @property
    def reuses_prefix(self) -> bool:
        """Whether attack steps skip the blocks below the site (no defended site lies below it)."""
        return all(L >= self.layer for L in self.defense.sites)

    def confirm(self, chunk: Chunk, delta: Tensor) -> Tensor:
        forward = EditedForward(self.model, self.task, lambda b: self.attacked_edits(b, delta))
        with torch.no_grad():
            judged = self.task.score(forward, chunk.batch)
        return abstained(judged, monitor_flags(self.model, self.defense, chunk.batch,
                                               self.attacked_edits(chunk.batch, delta)))

    # -- per chunk set-up ----------------------------------------------------------------------------------------

    def prepare(self, batch: PromptBatch) -> Chunk:
        """The chunk's reference norms (the residual at the site before the defense acts there), masks, defended
        readouts and, when the blocks below the site can be skipped, that residual."""
        seen = site_inputs(self.model, batch, self.attacked_edits(batch, None))
        pos_mask = attacked_positions(batch, self.cfg.positions)
        return Chunk(batch, seen[self.layer].norm(dim=-1), pos_mask, batch.attention_mask.bool(),
                     self._readouts(seen), seen[self.layer].detach() if self.reuses_prefix else None)

    def settle(self, chunk: Chunk, delta: Tensor, steps_used: Tensor, budgets: Tensor) -> list[ExampleOutcome]:
        """Outcomes, in row order, of an attack that chose ``delta`` [n, p, d] for the chunk without the shared loop
        (a search, a replay): one defended pass judges every example under it (a flagged input gets the null
        readout), recovered where the score is > 0, at the budget ``budgets`` [n] gives it, after ``steps_used`` [n]
        updates; the suite's judge decides where it has one (:meth:`judge`)."""
        with torch.no_grad():
            read, seen = self.forward(chunk.batch, delta, h_site=chunk.h_site)
            flags = self.defense.abstains(seen, chunk.batch.token_mask)
            b = abstained(self.task.behavior(read, chunk.batch), flags)
        reads = self._readouts(seen)
        outcomes = [self._outcome(chunk, i, delta, reads, i, b_attacked=float(b[i]), recovered=bool(b[i] > 0),
                                  steps_used=int(steps_used[i]),
                                  recovery_budget=float(budgets[i]) if b[i] > 0 else None,
                                  flagged=None if flags is None else bool(flags[i])) for i in range(len(b))]
        self.judge(chunk, delta, outcomes, budgets)
        return outcomes

    def c1_change(self, chunk: Chunk, i: int, att: dict[int, Tensor]) -> float | None:
        """Largest change of a defended pre-activation at the attacked site over the RMS of those values."""
        if self.layer not in chunk.read_def:
            return 0.0
        site_def = chunk.read_def[self.layer][i][chunk.batch.token_mask[i]]
        if not site_def.numel():
            return 0.0
        return ((att[self.layer] - site_def).abs().max() / (site_def.pow(2).mean().sqrt() + 1e-6)).item()

    def push_to_margin(self, batch: PromptBatch, delta: Tensor, eps: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Continue the attack on recovered examples at their own budgets until their behavior margin reaches
        ``target``: the margin replay's ``delta`` (see :mod:`benchmark.running.replay`).

        ``delta`` [n, p, d] (the recovered deltas, as :func:`benchmark.running.replay.stack_deltas` aligns them), ``eps``
        [n] each example's recovery budget, ``target`` [n] the margin to reach. Every example gets at most
        ``steps`` more updates under the same constraints (C1, the cross-site null space, C4 at its budget) and
        leaves as soon as its margin (:meth:`TaskSuite.behavior`, defense active) is ``>= target``.
        Returns the continued ``delta`` [n, p, d] and the margin [n] it gives.
        """
        chunk = self.prepare(batch)
        n, p = batch.input_ids.shape
        delta, adam = delta.clone(), Adam(delta)
        reached = torch.empty(n)
        active = torch.ones(n, dtype=torch.bool)
        for step in range(self.cfg.steps + 1):
            idx = active.nonzero()[:, 0]
            sub = batch.select(idx)
            cols = slice(p - sub.input_ids.shape[1], p)
            d = delta[idx, cols].clone().requires_grad_(True)
            h_site = None if chunk.h_site is None else chunk.h_site[idx][:, cols]
            read, seen = self.forward(sub, d, h_site=h_site)
            b = self.task.behavior(read, sub)
            reached[idx] = b.detach()
            keep = b.detach() < target[idx]
            active[idx[~keep]] = False
            if step == self.cfg.steps or not bool(keep.any()):
                break
            self.loss(read, seen, sub)[keep].sum().backward()
            self._update(chunk, delta, adam, idx[keep], cols, d.grad[keep], eps[idx[keep], None].float())
        return delta, reached
