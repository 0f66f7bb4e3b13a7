"""The SAE clamp at every layer from its first site to the layer the suite reads."""

from __future__ import annotations

from defenses.base import DEFENSES, FitContext, trajectory
from defenses.multi_layer_clamp import MultiLayerClamp
from defenses.sae_clamp import DEFAULT_K, DEFAULT_VALUE


@DEFENSES.register("trajectory_clamp")
class TrajectoryClamp(MultiLayerClamp):
    """``sae_clamp`` at every layer from ``first_layer`` to the readout, so a recovery must survive every later site.

    Why try it: a clamp at one site, or at a few (``multi_layer_clamp``), leaves the layers between and after them
    free, and the attacker's change at the first site is carried through them to the readout. Here each block from
    ``first_layer`` (default: the model's default SAE layer, 12 on the default model) up to the readout (the last
    block for suites that read logits; the read block for residual-reading suites such as TPP, where the trajectory
    is a single site when ``first_layer`` is the read layer) gets its own SAE and its own top-``k`` latents by act x
    grad attribution on the fit split, clamped exactly as ``sae_clamp`` does (same ``mode`` and ``value``, error
    term kept). The attack perturbs the first site under C1 there and is differentiated through every later clamp.

    It needs an SAE at every one of those layers: on the default model, every block from 9 to 29 but the reference
    ones (8, 12, 16) has a narrower, cheaper SAE trained by ``benchmark train-saes`` for this defense
    (``saes/smollm2-135m-instruct/REPORT.md``, run 2). A layer without one stops the fit with the command to train it.
    """

    version = "1.0"
    description = "sae_clamp at every layer from the first site to the readout (one SAE and top-k latents per layer)"

    def __init__(
        self,
        first_layer: int | None = None,
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
    ) -> None:
        super().__init__(layers=None, k=k, mode=mode, value=value)  # checks k, mode, value
        self.first_layer = first_layer

    def fit(self, ctx: FitContext) -> None:
        self.layers = trajectory(ctx, self.first_layer)
        super().fit(ctx)
