"""The SAE clamp at several layers at once."""

from __future__ import annotations

from defenses.base import DEFENSES, FitContext, check_layers
from defenses.sae_clamp import DEFAULT_K, DEFAULT_VALUE, SAEClamp


@DEFENSES.register("multi_layer_clamp")
class MultiLayerClamp(SAEClamp):
    """``sae_clamp`` applied at every layer in ``layers``, each with its own SAE and its own top-k latents.

    Why try it: a single-site clamp leaves every later layer free, so the attacker (or the model itself) can
    rebuild the behavior downstream of the defended site. Clamping the same concept at several depths forces
    a recovery to get past each of them. At each layer the latents are the top-``k`` by act x grad attribution
    on the fit split (or ``features[i]`` for ``layers[i]``), and the clamp is exactly ``sae_clamp``'s (same
    ``mode`` and ``value``, error term kept). Without ``layers``: the layers of the model's reference SAEs.
    """

    version = "1.0"
    description = "sae_clamp at several layers at once (one SAE and top-k attributed latents per layer)"

    def __init__(
        self,
        layers: list[int] | None = None,
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
        features: list[list[int]] | None = None,
    ) -> None:
        super().__init__(layer=None, k=k, mode=mode, value=value, features=None)  # checks k, mode, value
        if layers is not None:
            check_layers(self.name, layers, features)
        self.layers = list(layers) if layers is not None else None
        self.layer_features = features

    def fit(self, ctx: FitContext) -> None:
        if self.layers is None:
            self.layers = ctx.reference_layers()
            check_layers(self.name, self.layers, self.layer_features)
        for layer in self.layers:
            ctx.model.check_layer(layer)
        per_layer = self.layer_features or [None] * len(self.layers)
        self.chosen = {layer: self.choose(ctx, layer, feats) for layer, feats in zip(self.layers, per_layer)}
