"""Decoder-span ablation: remove the directions a behavior's SAE features write, whichever channel writes them."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.modeling import sae_math
from benchmark.errors import BenchmarkError
from defenses.base import FitContext, SAEFeatureDefense, top_attributed_features


class DecoderSpanAblation(SAEFeatureDefense):
    """Project the span of the top-k behavior-attributed latents' decoder rows out of the residual at one layer.

    Why: a latent clamp removes the features' contribution only as far as it goes through the latents; the
    recovery attack brings the behavior back through the SAE error term and through other latents that write
    the same directions. This defense ablates the subspace itself, ``h' = h - strength * P h`` at editable
    positions, where ``P`` is the orthogonal projector onto ``span(W_dec[F])`` of the chosen latents ``F``
    (top-``k`` by act x grad attribution on the suite's fit split, or ``features``). Whatever channel writes
    along those directions, latent, other latents or error term, is removed at the site.

    It differs from the built-ins: ``error_projection_clamp`` projects only the error term and clamps the
    latents; ``directional_ablation`` removes a single difference-of-means direction and uses no SAE.
    Readouts are the encoder pre-activations of ``F`` (from ``SAEFeatureDefense``), so the encoder-constrained
    attacker keeps ``delta`` orthogonal to their encoder rows.
    """

    # name, version and description come from submission.json

    def __init__(self, layer: int | None = None, k: int = 16, features: list[int] | None = None,
                 strength: float = 1.0) -> None:
        super().__init__()
        if k < 1:
            raise BenchmarkError(f"decoder_span_ablation needs k >= 1, got {k}")
        if not 0.0 < strength <= 1.0:
            raise BenchmarkError(f"decoder_span_ablation needs 0 < strength <= 1, got {strength}")
        self.layer, self.k, self.features, self.strength = layer, k, features, float(strength)
        self.basis: dict[int, Tensor] = {}

    def fit(self, ctx: FitContext) -> None:
        layer = self.layer if self.layer is not None else ctx.default_layer()
        sae = ctx.sae(layer)
        if self.features is not None:
            feats = torch.tensor(sorted(self.features), dtype=torch.long)
            if feats.numel() == 0 or int(feats.max()) >= sae.sae.cfg.d_sae or int(feats.min()) < 0:
                raise BenchmarkError(f"features must lie in 0..{sae.sae.cfg.d_sae - 1}")
        else:
            feats = top_attributed_features(ctx, layer, self.k)
        self.chosen = {layer: (sae, feats)}
        self.basis = {layer: sae_math.orthonormal_basis(sae_math.decoder_rows(sae.sae, feats).detach())}

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        q = self.basis[layer]
        return h - self.strength * ((h @ q) @ q.T) * token_mask[..., None]
