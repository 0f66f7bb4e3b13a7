"""The no-op defense: no sites, no edit. The harness's zero point."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Defense, FitContext


@DEFENSES.register("none")
class NoDefense(Defense):
    """Edit nothing (``sites == []``), so the run shows the base model: suppression 0, no attack, no side effect.

    Why have it: every harness needs a zero point. A run with it checks that the engine reports nothing
    suppressed when nothing is defended, and gives the base behavior counts the other defenses are read against.
    """

    version = "1.0"
    description = "no-op defense (no sites): the harness's zero point, suppresses nothing"

    def __init__(self) -> None:
        self.d_model = 0

    def fit(self, ctx: FitContext) -> None:
        self.d_model = ctx.model.d_model

    @property
    def sites(self) -> list[int]:
        return []

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        return h

    def readouts(self, layer: int, h: Tensor) -> Tensor:
        return h.new_zeros(*h.shape[:-1], 0)

    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        return pre

    def protected_directions(self, layer: int) -> Tensor:
        return torch.zeros(0, self.d_model)

    def defended(self) -> list[dict]:
        return []
