"""Single-layer SAE clamp: the standard latent-space defense this benchmark puts under attack."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark import sae_math
from benchmark.errors import BenchmarkError
from defenses.base import DEFENSES, FitContext, SAEFeatureDefense, top_attributed_features

MODES = ("zero", "negative", "multiply", "set")


@DEFENSES.register("sae_clamp")
class SAEClamp(SAEFeatureDefense):
    """Clamp the top-k behavior-attributed latents of one SAE, keeping the SAE error term.

    Latents are chosen by act x grad attribution on the suite's behavior score over its fit split (or given
    as ``features``). ``mode``: ``zero`` sets them to 0; ``negative`` sets them to ``value`` (< 0) where they
    are active, as in SAEBench's unlearning eval; ``multiply`` scales them by ``value``; ``set`` puts them at
    ``value`` at every position. The edit is ``h + (a' - a) W_dec[F]``, i.e. the SAE reconstruction with the
    clamped latents plus the unchanged error term, computed from the defended latents only.
    """

    version = "1.0"
    description = "clamp the top-k attributed latents of one SAE (zero / negative / multiply / set)"

    def __init__(
        self,
        layer: int | None = None,
        k: int = 32,
        mode: str = "negative",
        value: float = -8.0,
        features: list[int] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise BenchmarkError(f"sae_clamp mode '{mode}' is not one of {', '.join(MODES)}")
        if mode == "negative" and value >= 0:
            raise BenchmarkError(f"sae_clamp mode 'negative' needs value < 0, got {value}")
        if k < 1:
            raise BenchmarkError(f"sae_clamp needs k >= 1, got {k}")
        self.layer, self.k, self.mode, self.value, self.features = layer, k, mode, float(value), features

    def fit(self, ctx: FitContext) -> None:
        layer = self.layer if self.layer is not None else ctx.model.spec.sae_source.default_layer
        sae = ctx.sae(layer)
        if self.features is not None:
            feats = torch.tensor(sorted(self.features), dtype=torch.long)
            if feats.numel() == 0 or int(feats.max()) >= sae.sae.cfg.d_sae or int(feats.min()) < 0:
                raise BenchmarkError(f"features must lie in 0..{sae.sae.cfg.d_sae - 1}")
        else:
            feats = top_attributed_features(ctx, layer, self.k)
        self.chosen = {layer: (sae, feats)}

    def clamped(self, acts: Tensor) -> Tensor:
        """Defended latent values from their undefended activations [..., n]."""
        if self.mode == "zero":
            return torch.zeros_like(acts)
        if self.mode == "negative":
            return torch.where(acts > 0, torch.full_like(acts, self.value), acts)
        if self.mode == "multiply":
            return acts * self.value
        return torch.full_like(acts, self.value)

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        sae, feats = self.chosen[layer]
        acts = sae_math.activations(sae.sae, sae_math.preacts(sae.sae, h, feats), feats)
        change = (self.clamped(acts) - acts) * token_mask[..., None]
        return h + change @ sae_math.decoder_rows(sae.sae, feats)
