"""LEACE concept scrubbing: erase the behavior's linear concept at every layer from the first site to the readout.

Source: Belrose, Schneider-Joseph, Ravfogel, Cotterell, Raff and Biderman, "LEACE: Perfect linear concept erasure
in closed form", NeurIPS 2023 (arXiv:2306.03819). LEACE is the affine edit of least squared change that leaves no
linear classifier better than a constant at predicting the concept ``z`` from the representation; *concept
scrubbing* (their Section 6) fits one LEACE eraser per layer, in order, each on residuals that the erasers below
it have already edited, and applies all of them. The erasers are fitted with the authors' own library,
``concept-erasure`` (EleutherAI; covariance shrinkage and the trace constraint are its defaults).
"""

from __future__ import annotations

import torch
from concept_erasure import LeaceEraser, LeaceFitter
from torch import Tensor

from benchmark.errors import BenchmarkError
from benchmark.modeling.forward import run_edited
from defenses.base import DEFENSES, Defense, FitContext, behavior_present, trajectory
from tasks.base import PromptBatch

CONCEPTS = ("control", "behavior")


def low_rank(eraser: LeaceEraser, tol: float = 1e-6) -> LeaceEraser:
    """``eraser`` in float32 with ``proj_left`` [d, r] and ``proj_right`` [r, d] of its rank r only.

    LEACE's trace constraint, where it applies, mixes in the orthogonal projection and returns the change as full
    [d, d] factors of rank at most 2k; kept as they are, every row would count as a protected direction for C1."""
    u, s, vh = torch.linalg.svd(eraser.proj_left @ eraser.proj_right)
    r = int((s > tol * s[0]).sum())
    root = s[:r].sqrt()
    bias = None if eraser.bias is None else eraser.bias.float()
    return LeaceEraser((u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), bias)


@DEFENSES.register("concept_scrubbing")
class ConceptScrubbing(Defense):
    """LEACE erasers at every layer from ``first_layer`` to the readout (or at ``layers``), fitted in order.

    Why try it: it is the published closed-form linear concept eraser, and scrubbing it through the whole trajectory
    constrains every layer the attacker's change passes, with the guarantee (at each layer, on the fit
    distribution) that no linear readout of the concept survives. The concept ``z`` per position, over editable
    positions (every real token but the attention sink):

    - ``concept=control`` (default): 1 on the suite's fit examples, 0 on its ``control_batch()`` (every suite has
      both; as for ``directional_ablation``, the control set is also where the side effect is measured);
    - ``concept=behavior``: 1 on fit examples whose undefended behavior score is > 0, 0 on the others (needs both).

    Layers: ``first_layer`` (default: the model's default SAE layer) to the readout, as ``trajectory_clamp``; or
    ``layers`` given explicitly (``-D layers=[12]`` is plain single-site LEACE). The edit at layer L is LEACE's
    ``h - ((h - b) R^T) L^T`` (``R`` [r, d], ``L`` [d, r]: r = 1, an oblique projection of rank one, or 2
    where LEACE's trace constraint mixes in the orthogonal one), at editable positions; its readout is the erased
    coordinate ``(h - b) R^T`` [b, p, r] (the activation is the identity), and C1 keeps the
    attacker's ``delta`` orthogonal to ``R`` at the attacked site, so that coordinate is unchanged there.
    """

    version = "1.0"
    description = "LEACE concept scrubbing (Belrose et al. 2023): a linear concept eraser at every layer to the readout"

    chunk = 32  # prompts per forward pass while fitting

    def __init__(self, first_layer: int | None = None, layers: list[int] | None = None,
                 concept: str = "control") -> None:
        if concept not in CONCEPTS:
            raise BenchmarkError(f"concept_scrubbing concept '{concept}' is not one of {', '.join(CONCEPTS)}")
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise BenchmarkError(f"concept_scrubbing needs distinct layers, got {layers}")
        if layers is not None and first_layer is not None:
            raise BenchmarkError("concept_scrubbing takes first_layer or layers, not both")
        self.first_layer, self.layers, self.concept = first_layer, layers, concept
        self.erasers: dict[int, LeaceEraser] = {}

    def fit(self, ctx: FitContext) -> None:
        layers = sorted(self.layers) if self.layers is not None else trajectory(ctx, self.first_layer)
        for layer in layers:
            ctx.check_site(layer)
        fit = ctx.fit_batch().by_length()
        labelled = [(fit, self._fit_labels(ctx, fit))]
        if self.concept == "control":
            control = ctx.task.control_batch()
            labelled.append((control, torch.zeros(len(control))))
        self.erasers = {}
        parts = [(batch.select(rows), z[rows]) for batch, z in labelled
                 for rows in torch.arange(len(batch)).split(self.chunk)]
        below: list[tuple[int, Tensor] | None] = [None] * len(parts)  # per part: the last erased site's residual
        for layer in layers:  # in order: each eraser is fitted on residuals the ones below it have edited
            fitter = LeaceFitter(ctx.model.d_model, 1, dtype=torch.float64)
            seen = []
            for (part, z), prefix in zip(parts, below):
                with torch.no_grad():  # only the blocks above the last erased site run again
                    h = run_edited(ctx.model, part, {}, read_layer=layer, prefix=prefix)
                mask = part.token_mask.bool()
                fitter.update(h[mask].double(), z[:, None].expand(mask.shape)[mask].double())
                seen.append(h)
            self.erasers[layer] = low_rank(fitter.eraser)
            below = [(layer, self.edit(layer, h, part.token_mask)) for (part, _), h in zip(parts, seen)]

    def _fit_labels(self, ctx: FitContext, fit: PromptBatch) -> Tensor:
        """[b] concept labels of the fit examples: 1 each (``control``), or whether the behavior is there."""
        if self.concept == "control":
            return torch.ones(len(fit))
        return behavior_present(ctx, fit, self.chunk, "concept_scrubbing concept 'behavior'", "concept=control").float()

    @property
    def sites(self) -> list[int]:
        return sorted(self.erasers)

    def _centered(self, layer: int, h: Tensor) -> Tensor:
        bias = self.erasers[layer].bias
        return h if bias is None else h - bias

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        eraser = self.erasers[layer]
        change = (self._centered(layer, h) @ eraser.proj_right.mH) @ eraser.proj_left.mH
        return h - change * token_mask[..., None]

    def readouts(self, layer: int, h: Tensor) -> Tensor:
        return self._centered(layer, h) @ self.erasers[layer].proj_right.mH

    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        return pre

    def protected_directions(self, layer: int) -> Tensor:
        return self.erasers[layer].proj_right

    def defended(self) -> list[dict]:
        return [{"site": {"layer": L, "hook": "resid_post"}, "features": []} for L in self.sites]
