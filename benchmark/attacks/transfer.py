"""``transfer``: the deltas that recovered the same examples against ``sae_clamp``, replayed against the defense.

A gradient check that needs no gradient of the defense: a defense whose own gradient misleads the attacker
(gates, thresholds, abstention) can still fall to a perturbation found against a plain clamp. The attack fits
``sae_clamp`` on the same fit split at the attacked site (the defense's ``k``, ``mode`` and ``value`` where it has
them), runs the ``encoder`` attack against it with the same settings, and applies each recovering ``delta``, as it
is, to the defense under test (defense active, its monitor too); examples the source attack did not recover get no
``delta``. An example's recovery budget is the budget its ``delta`` was found at. The replayed deltas satisfy C4 (the
budget's reference norm is the same residual for both defenses when neither edits below the site) and C1 only when
the defense defends the source's latents at the site, which the attack checks.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm import tqdm

from benchmark.attacks.base import ATTACKS, FEATURE_PRESERVING, AttackConfig, Chunk, ExampleOutcome
from benchmark.attacks.encoder import EncoderAttack
from benchmark.errors import BenchmarkError
from benchmark.modeling.models import LoadedModel
from defenses.base import DEFENSES, Defense, FitContext
from tasks.base import TaskSuite

SOURCE = "sae_clamp"


@ATTACKS.register("transfer")
class TransferAttack(EncoderAttack):
    """Replay the encoder attack's recovering deltas against ``sae_clamp`` on the defense under test."""

    threat_model = FEATURE_PRESERVING
    claims = ("C1", "C4")
    description = "replay the deltas that recovered the same examples against sae_clamp (no gradient of the defense)"

    def __init__(self, model: LoadedModel, defense: Defense, task: TaskSuite, cfg: AttackConfig):
        super().__init__(model, defense, task, cfg)
        if any(L < self.layer for L in defense.sites):
            raise BenchmarkError(f"attack 'transfer' replays deltas at layer {self.layer}; defense '{defense.name}' "
                                 f"edits below it (sites {defense.sites}), so its residual there differs from "
                                 f"{SOURCE}'s")
        self.source = self._fit_source()
        ours, theirs = defense.sae_at(self.layer), self.source.sae_at(self.layer)
        if ours is None or not torch.equal(ours[1], theirs[1]):
            raise BenchmarkError(f"attack 'transfer' keeps C1 only against a defense that defends {SOURCE}'s latents "
                                 f"at layer {self.layer} ({theirs[1].tolist()}); defense '{defense.name}' does not")
        self.source_attack = EncoderAttack(model, self.source, task, replace(cfg, mode="encoder", params=()))

    def _fit_source(self) -> Defense:
        """``sae_clamp`` at the attacked site with the defense's SAE there and its clamp settings, fitted on the
        suite's fit split."""
        found = self.defense.sae_at(self.layer)
        if found is None:
            raise BenchmarkError(f"attack 'transfer' needs a defense with an SAE at the attacked layer {self.layer}")
        shared = {k: v for k, v in self.defense.params.items() if k in ("k", "mode", "value")}
        source = DEFENSES.get(SOURCE).create(layer=self.layer, **shared)
        source.fit(FitContext(self.model, self.task, saes={self.layer: found[0]}))
        return source

    @classmethod
    def settings(cls, cfg: AttackConfig, model: LoadedModel) -> dict:
        return {"transfer_from": SOURCE}

    def source_outcomes(self, chunk: Chunk) -> list[ExampleOutcome]:
        """The encoder attack against the source defense on the chunk's examples, in row order."""
        return self.source_attack.run_chunk(self.source_attack.prepare(chunk.batch))

    def run_chunk(self, chunk: Chunk, bar=None) -> list[ExampleOutcome]:
        bar = bar if bar is not None else tqdm(disable=True)
        found = self.source_outcomes(chunk)
        delta = torch.zeros(*chunk.ref_norm.shape, self.delta_dim)  # [n, p, d]
        budgets = torch.zeros(len(found), dtype=torch.float64)
        for o in found:
            if o.recovered:
                delta[o.index, chunk.real[o.index]] = o.delta
                budgets[o.index] = o.recovery_budget
        steps_used = torch.tensor([o.steps_used for o in found])
        bar.update(len(found))
        return self.settle(chunk, delta, steps_used, budgets)
