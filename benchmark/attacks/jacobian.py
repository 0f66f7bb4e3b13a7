"""``jacobian``: the feature-preserving attack across sites (C1-C4).

Besides C1 at the attacked site, ``delta`` is projected onto the null space of the Jacobian of every later site's
defended readouts (see :mod:`benchmark.attacks.cross_site`; first order, computed once per example at ``delta = 0``): exact
when every example has at most ``jacobian_exact_rows`` cross-site readouts, else a randomized estimate from
``jacobian_rank`` probes. The record keeps the rank projected out and the first-order drift it leaves.
"""

from __future__ import annotations

import torch

import benchmark.attacks.cross_site as cross_site
from benchmark.attacks.base import ATTACKS, FEATURE_PRESERVING, AttackConfig, Chunk
from benchmark.attacks.encoder import EncoderAttack
from benchmark.modeling.models import LoadedModel
from tasks.base import PromptBatch

DRIFT_PROBES = 4  # random directions behind jacobian_residual_drift


@ATTACKS.register("jacobian")
class JacobianAttack(EncoderAttack):
    """C1 at the attacked site and the cross-site Jacobian null space of every later defended site."""

    threat_model = FEATURE_PRESERVING
    claims = ("C1", "C2-C3", "C4")
    description = "as encoder, and in the null space of the Jacobian of later sites' defended readouts (C1-C4)"

    @classmethod
    def settings(cls, cfg: AttackConfig, model: LoadedModel) -> dict:
        return {"jacobian_probes": cfg.jacobian_rank, "jacobian_exact_rows": cfg.jacobian_exact_rows}

    def prepare(self, batch: PromptBatch) -> Chunk:
        chunk = super().prepare(batch)
        self._cross_site(chunk)
        return chunk

    def _cross_site(self, chunk: Chunk) -> None:
        """Fill ``chunk``'s cross-site basis (exact or randomized), its ranks and its first-order residual."""
        batch, n = chunk.batch, len(chunk.batch)
        if not self.later_sites:
            chunk.jac_rank, chunk.jac_exact = torch.zeros(n, dtype=torch.long), True
            return
        gen = torch.Generator(device=self.model.device).manual_seed(self.cfg.seed)
        delta = torch.zeros(n, batch.input_ids.shape[1], self.model.d_model, requires_grad=True)
        with torch.enable_grad(), cross_site.twice_differentiable():
            _, seen = self.forward(batch, delta, h_site=chunk.h_site)
            reads = {L: self.defense.readouts(L, seen[L]) for L in self.later_sites}
        first = cross_site.first_row_position(chunk.slot_mask)
        rows = int(cross_site.rows_per_example(reads, batch.token_mask, first).max())
        chunk.jac_exact = rows <= self.cfg.jacobian_exact_rows
        if chunk.jac_exact:
            vectors = cross_site.exact_vjps(reads, delta, batch.token_mask, first)
        else:
            vectors = cross_site.random_vjps(reads, delta, batch.token_mask, self.cfg.jacobian_rank, gen)
        stacked = torch.stack(list(vectors)) if rows else delta.new_zeros(0, *delta.shape)
        chunk.basis, chunk.jac_rank = cross_site.row_space(stacked.detach(), chunk.slot_mask, self.basis)
        probes = torch.randn(DRIFT_PROBES, *delta.shape, generator=gen) * chunk.slot_mask[..., None]
        try:
            chunk.jac_residual = cross_site.residual_drift(
                reads, delta, batch.token_mask, lambda v: self.subspace(v, chunk.slot_mask, chunk.basis), probes)
        except RuntimeError:  # an op of the model or defense without a second derivative: not measurable
            chunk.jac_residual = None
