"""The SAE clamp at several layers at once."""

from __future__ import annotations

from benchmark.errors import BenchmarkError
from defenses.base import DEFENSES, FitContext
from defenses.sae_clamp import DEFAULT_K, DEFAULT_VALUE, SAEClamp


@DEFENSES.register("multi_layer_clamp")
class MultiLayerClamp(SAEClamp):
    """``sae_clamp`` applied at every layer in ``layers``, each with its own SAE and its own top-k latents.

    Why try it: a single-site clamp leaves every later layer free, so the attacker (or the model itself) can
    rebuild the behavior downstream of the defended site. Clamping the same concept at several depths forces
    a recovery to get past each of them. At each layer the latents are the top-``k`` by act x grad attribution
    on the fit split (or ``features[i]`` for ``layers[i]``), and the clamp is exactly ``sae_clamp``'s (same
    ``mode`` and ``value``, error term kept). The defaults are the layers of the default model's reference SAEs.
    """

    version = "1.0"
    description = "sae_clamp at several layers at once (one SAE and top-k attributed latents per layer)"

    def __init__(
        self,
        layers: list[int] = [8, 12, 16],  # noqa: B006 - recorded verbatim; never mutated
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
        features: list[list[int]] | None = None,
    ) -> None:
        super().__init__(layer=None, k=k, mode=mode, value=value, features=None)  # checks k, mode, value
        if not layers or len(set(layers)) != len(layers):
            raise BenchmarkError(f"{self.name} needs distinct layers, got {layers}")
        if features is not None and len(features) != len(layers):
            raise BenchmarkError(
                f"{self.name} needs one feature list per layer: {len(layers)} layers, {len(features)} lists"
            )
        self.layers = list(layers)
        self.layer_features = features

    def fit(self, ctx: FitContext) -> None:
        for layer in self.layers:
            ctx.model.check_layer(layer)
        per_layer = self.layer_features or [None] * len(self.layers)
        self.chosen = {layer: self.choose(ctx, layer, feats) for layer, feats in zip(self.layers, per_layer)}
