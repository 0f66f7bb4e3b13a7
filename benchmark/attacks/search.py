"""``random_search``: a gradient-free recovery attack under the encoder attack's constraints (C1 + C4).

A defense can hold under the gradient attack only because its gradient misleads (gates, thresholds, top-k, an
abstaining monitor): gradient masking. This attack never asks for a gradient. Each example walks the same budget
sweep as the gradient attacks; at each budget it makes ``steps`` proposals, each its current ``delta`` plus random
noise of :data:`PROPOSAL` times the budget at every attacked position, projected onto the constraints (C1, then C4),
and keeps a proposal when the defended model's behavior score rises, scored as the defended model answers: a
proposal the defense's monitor flags scores ``-inf`` (the abstaining model shows no behavior). It stops as soon as the
behavior is back (score > 0, not flagged), and the next budget starts from the best ``delta`` so far.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm import tqdm

from benchmark.attacks.base import ATTACKS, FEATURE_PRESERVING, Chunk, ExampleOutcome
from benchmark.attacks.encoder import EncoderAttack

PROPOSAL = 0.5  # proposal noise per attacked position, as a fraction of the budget eps * ||h_p||


@ATTACKS.register("random_search")
class RandomSearchAttack(EncoderAttack):
    """(1+1) random search over ``delta`` in the encoder attack's feasible set: no gradient of the defense."""

    threat_model = FEATURE_PRESERVING
    claims = ("C1", "C4")
    description = "gradient-free (1+1) random search under C1 + C4, steps proposals per budget (no gradient)"

    @torch.no_grad()
    def _scores(self, chunk: Chunk, idx: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The behavior score [k] of rows ``idx`` under their ``delta`` [k, p, d] (the chunk's width), and what the
        search ranks proposals by [k]: that score, ``-inf`` where the monitor flags the input."""
        p = chunk.batch.input_ids.shape[1]
        sub = chunk.batch.select(idx)
        cols = self.columns(p, sub.input_ids.shape[1])
        h_site = None if chunk.h_site is None else chunk.h_site[idx][:, cols]
        read, seen = self.forward(sub, delta[:, cols], h_site=h_site)
        b = self.task.behavior(read, sub)
        flags = self.defense.abstains(seen, sub.token_mask)
        rank = b if flags is None else torch.where(flags, torch.full_like(b, -math.inf), b)
        return b, rank

    def run_chunk(self, chunk: Chunk, bar=None) -> list[ExampleOutcome]:
        bar = bar if bar is not None else tqdm(disable=True)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        n = len(chunk.batch)
        delta = torch.zeros(n, *chunk.ref_norm.shape[1:], self.delta_dim)
        _, best = self._scores(chunk, torch.arange(n), delta)
        steps_used = torch.zeros(n, dtype=torch.long)
        budgets = torch.zeros(n, dtype=torch.float64)
        for eps in self.cfg.eps:
            for _ in range(self.cfg.steps):
                idx = (best <= 0).nonzero()[:, 0]
                if not len(idx):
                    break
                hn, slots = chunk.ref_norm[idx], chunk.slot_mask[idx]
                noise = torch.randn(*delta[idx].shape, generator=gen)
                noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * (PROPOSAL * eps * hn)[..., None]
                cap = torch.full((len(idx), 1), eps)
                proposal = self.project(delta[idx] + noise * slots[..., None], hn, slots, cap)
                _, rank = self._scores(chunk, idx, proposal)
                better = rank > best[idx]
                delta[idx[better]] = proposal[better]
                best[idx[better]] = rank[better]
                steps_used[idx] += 1
                self.updates += len(idx)
                budgets[idx[better & (rank > 0)]] = eps
            bar.set_postfix(eps=eps, active=int((best <= 0).sum()), updates=self.updates)
        bar.update(n)
        return self.settle(chunk, delta, steps_used, budgets)
