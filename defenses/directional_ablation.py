"""Non-SAE baseline: ablate one difference-of-means direction of the residual stream."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from benchmark.modeling.forward import capture, run_edited
from defenses.base import DEFENSES, Defense, FitContext, behavior_present
from tasks.base import PromptBatch

CONTRASTS = ("control", "behavior")


@DEFENSES.register("directional_ablation")
class DirectionalAblation(Defense):
    """Project one difference-of-means direction ``r`` out of the residual at one layer (no SAE).

    Why try it: it is the standard non-SAE suppression (refusal-direction style ablation), so it tells whether an
    SAE defense buys anything over a single direction. ``r`` is the unit difference of two mean residuals at
    ``layer``, each averaged over editable positions (every real token but the attention sink):

    - ``contrast=control`` (default): the suite's fit examples minus its ``control_batch()`` (neutral text).
      Every suite offers both, including IOI, whose fit examples all carry the behavior. Caveat: the control
      set is also where the engine measures the side effect, so this contrast has seen that text.
    - ``contrast=behavior``: fit examples whose undefended behavior score is > 0 minus those with score <= 0;
      uses the fit split only, and needs both kinds (suites with negatives in their fit split).

    The edit is ``h - (h . r) r`` at editable positions. Its readout is the projection ``h . r`` ([b, p, 1], the
    activation is the identity), and C1 keeps the attacker's ``delta`` orthogonal to ``r``.
    """

    version = "1.0"
    description = "non-SAE baseline: project a difference-of-means direction out of the residual at one layer"

    chunk = 32  # prompts per forward pass while fitting

    def __init__(self, layer: int | None = None, contrast: str = "control") -> None:
        if contrast not in CONTRASTS:
            raise BenchmarkError(f"directional_ablation contrast '{contrast}' is not one of {', '.join(CONTRASTS)}")
        self.layer, self.contrast = layer, contrast
        self.direction: Tensor | None = None
        self._site: int | None = None

    @torch.no_grad()
    def _residuals(self, ctx: FitContext, batch: PromptBatch, layer: int) -> tuple[Tensor, Tensor]:
        """Per-example sums [b, d] and counts [b] of the residual at ``layer`` over editable positions."""
        sums, counts = [], []
        for part in batch.chunks(self.chunk):
            seen: dict[int, Tensor] = {}
            run_edited(ctx.model, part, {layer: capture(seen, layer)}, read_layer=layer)
            m = part.token_mask[..., None].float()
            sums.append((seen[layer] * m).sum(1))
            counts.append(m.sum((1, 2)))
        return torch.cat(sums), torch.cat(counts)

    @staticmethod
    def _mean(sums: Tensor, counts: Tensor) -> Tensor:
        return sums.sum(0) / counts.sum().clamp_min(1)

    def fit(self, ctx: FitContext) -> None:
        layer = self.layer if self.layer is not None else ctx.default_layer()
        ctx.model.check_layer(layer)
        fit = ctx.fit_batch().by_length()
        sums, counts = self._residuals(ctx, fit, layer)
        if self.contrast == "control":
            pos = self._mean(sums, counts)
            neg = self._mean(*self._residuals(ctx, ctx.task.control_batch(), layer))
        else:
            has = behavior_present(ctx, fit, self.chunk, "directional_ablation contrast 'behavior'", "contrast=control")
            pos, neg = self._mean(sums[has], counts[has]), self._mean(sums[~has], counts[~has])
        diff = pos - neg
        if diff.norm() < 1e-8:
            raise BenchmarkError("directional_ablation: the two means coincide; no direction to ablate")
        self.direction = diff / diff.norm()
        self._site = layer

    @property
    def sites(self) -> list[int]:
        return [] if self._site is None else [self._site]

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        r = self.direction
        return h - (h @ r)[..., None] * r * token_mask[..., None]

    def readouts(self, layer: int, h: Tensor) -> Tensor:
        return (h @ self.direction)[..., None]

    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        return pre

    def protected_directions(self, layer: int) -> Tensor:
        return self.direction[None]

    def defended(self) -> list[dict]:
        return [{"site": {"layer": L, "hook": "resid_post"}, "features": []} for L in self.sites]
