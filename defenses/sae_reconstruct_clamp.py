"""SAE clamp that also drops the SAE error term: the residual becomes the SAE's reconstruction."""

from __future__ import annotations

from torch import Tensor

from defenses.base import DEFENSES
from defenses.sae_clamp import SAEClamp


@DEFENSES.register("sae_reconstruct_clamp")
class SAEReconstructClamp(SAEClamp):
    """Replace the residual by the SAE reconstruction with the clamped latents, dropping the SAE error term.

    Why try it: the reference attack recovers the behavior mostly through the SAE error term (the part of the
    residual the SAE does not explain), a channel a latent clamp leaves wide open because it keeps
    ``h - decode(encode(h))`` unchanged. Here the edited residual at each editable position is exactly
    ``decode(z')``, where ``z'`` is the full latent vector ``encode(h)`` with the defended latents clamped as in
    ``sae_clamp`` (same features, ``mode`` and ``value``). Whatever ``delta`` adds must now pass through the
    SAE's encoder, so it can only act through (non-defended) latents. The price is the SAE's reconstruction
    error at every position: the engine measures it as the side effect (next-token KL on the control set) and
    the defense's edit size.
    """

    version = "1.0"
    description = "sae_clamp, then replace the residual by the SAE reconstruction (drops the error term)"

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        sae, feats = self.chosen[layer]
        z = sae.sae.encode(h)
        clamped = z.clone()
        clamped[..., feats] = self.clamped(z[..., feats])
        return sae.sae.decode(clamped).where(token_mask[..., None], h)
