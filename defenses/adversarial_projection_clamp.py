"""SAE clamp whose error-term projection is fitted against the recovery attack itself."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from benchmark.modeling import sae_math
from benchmark.modeling.forward import compose, defense_edits, run_task, site_inputs
from defenses.base import DEFENSES, FitContext
from defenses.error_projection_clamp import ErrorProjectionClamp
from defenses.sae_clamp import DEFAULT_K, DEFAULT_VALUE
from tasks.base import PromptBatch


@DEFENSES.register("adversarial_projection_clamp")
class AdversarialProjectionClamp(ErrorProjectionClamp):
    """``error_projection_clamp`` whose projection is chosen on the fit split by alternating attacker and defender.

    Why try it: the committed records show recovery riding the SAE error term, in directions that a fixed choice
    (the clamped features' decoder directions, ``error_projection_clamp``) does not cover. Here the directions come
    from the attack: the outer loop runs ``rounds`` times; in each, the inner loop is the ``encoder`` attack (budgets
    ``fit_eps``, ``fit_steps`` steps each) on up to ``fit_examples`` of the fit split's valid flips against the
    current defense, and the defense's update adds the top ``per_round`` principal directions of the error-term
    parts of the recovering deltas (``e(h + delta) - e(h)`` at the site, over their attacked positions) to the
    basis projected out of the error term. It stops early when the attack recovers nothing. Starts from the
    ``decoder_sum`` direction; the basis has rank at most ``1 + rounds * per_round``. The fit budget is these
    settings; the record states the fit's wall time (``provenance.fit_seconds``). A defense tuned this way can overfit
    the attack it was fitted against: the adaptive attacks and the test split say whether it generalizes.
    """

    version = "1.0"
    description = "error_projection_clamp with directions fitted by alternating the encoder attack and the projection"

    def __init__(
        self,
        layer: int | None = None,
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
        features: list[int] | None = None,
        rounds: int = 3,
        per_round: int = 8,
        fit_examples: int = 32,
        fit_eps: list[float] = [0.005, 0.02, 0.05],  # noqa: B006 - recorded verbatim; never mutated
        fit_steps: int = 10,
    ) -> None:
        super().__init__(layer=layer, k=k, mode=mode, value=value, features=features, direction="decoder_sum")
        if rounds < 1 or per_round < 1 or fit_examples < 1 or fit_steps < 1 or not fit_eps:
            raise BenchmarkError(f"{self.name} needs rounds, per_round, fit_examples, fit_steps >= 1 and some fit_eps")
        self.rounds, self.per_round, self.fit_examples = rounds, per_round, fit_examples
        self.fit_eps, self.fit_steps = tuple(fit_eps), fit_steps

    def fit(self, ctx: FitContext) -> None:
        from benchmark.attacks import AttackConfig
        from benchmark.attacks.encoder import EncoderAttack  # the attack sits above the defenses: imported to fit

        super().fit(ctx)
        layer = self.sites[0]
        flips = self._fit_flips(ctx)
        cfg = AttackConfig(eps=self.fit_eps, steps=self.fit_steps, layer=layer)
        for _ in range(self.rounds):
            outcomes = EncoderAttack(ctx.model, self, ctx.task, cfg).run(flips, progress=False)
            recovered = [o for o in outcomes if o.recovered]
            if not recovered:
                break
            errors = self._error_parts(ctx, flips.select([o.index for o in recovered]), [o.delta for o in recovered])
            top = torch.linalg.svd(errors, full_matrices=False).Vh[: self.per_round]
            self.error_basis[layer] = sae_math.orthonormal_basis(torch.cat([self.error_basis[layer].T, top]))

    @torch.no_grad()
    def _fit_flips(self, ctx: FitContext) -> PromptBatch:
        """Up to ``fit_examples`` fit examples the current defense flips (behavior margin > 0 without it, <= 0
        with it)."""
        batch = ctx.fit_batch()
        base = ctx.task.behavior(run_task(ctx.model, ctx.task, batch, {}), batch)
        defended = ctx.task.behavior(run_task(ctx.model, ctx.task, batch, defense_edits(self, batch)), batch)
        rows = ((base > 0) & (defended <= 0)).nonzero()[:, 0][: self.fit_examples]
        if not len(rows):
            raise BenchmarkError(f"{self.name}: the clamp flips no fit example, so there is no attack to fit against")
        return batch.select(rows)

    def _error_parts(self, ctx: FitContext, batch: PromptBatch, deltas: list[Tensor]) -> Tensor:
        """[m, d]: the error-term part ``e(h + delta) - e(h)`` of each delta [len_i, d] at every attacked position."""
        layer = self.sites[0]
        h = site_inputs(ctx.model, batch, {layer: compose()})[layer]
        p = h.shape[1]
        delta = torch.zeros_like(h)
        for i, d in enumerate(deltas):
            delta[i, p - d.shape[0]:] = d
        with torch.no_grad():
            part = self.error_term(layer, h + delta) - self.error_term(layer, h)
        return part[delta.norm(dim=-1) > 0]
