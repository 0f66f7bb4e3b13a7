"""SAE clamp that also removes the behavior direction from the SAE error term."""

from __future__ import annotations

from torch import Tensor

from benchmark.modeling import sae_math
from benchmark.errors import BenchmarkError
from defenses.base import DEFENSES, FitContext
from defenses.sae_clamp import DEFAULT_K, DEFAULT_VALUE, SAEClamp

DIRECTIONS = ("decoder_sum", "decoder_span")


@DEFENSES.register("error_projection_clamp")
class ErrorProjectionClamp(SAEClamp):
    """Clamp as ``sae_clamp``, and project the behavior direction out of the SAE error term.

    Why try it: recovery rides the SAE error term ``e = h - decode(encode(h))``, which a latent clamp passes
    through unchanged. Dropping ``e`` entirely (``sae_reconstruct_clamp``) costs the SAE's whole
    reconstruction error; this defense removes only the part of ``e`` that can write the suppressed behavior,
    so it should keep most of the model's other behavior while closing the error channel along that direction.

    Behavior direction (``direction``):

    - ``decoder_sum`` (default): ``r = normalize(sum_f W_dec[f])`` over the clamped latents ``f``, the direction
      the clamped features write together. It is fixed by the clamp itself (no extra data, so nothing outside
      the fit split is seen) and is well defined on every suite, including ones like IOI whose fit split has no
      examples without the behavior to contrast against (a difference of means of error terms would need one).
    - ``decoder_span``: the whole span of the clamped latents' decoder rows (rank up to ``k``), so the error
      term cannot write along any single clamped feature's direction either.

    The edit at editable positions is ``decode(z') + e - P e``, where ``z'`` are the clamped latents and ``P``
    the orthogonal projector onto the behavior direction(s); it equals ``sae_clamp``'s edit minus ``P e``.
    """

    version = "1.0"
    description = "sae_clamp, and project the clamped features' decoder direction out of the SAE error term"

    def __init__(
        self,
        layer: int | None = None,
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
        features: list[int] | None = None,
        direction: str = "decoder_sum",
    ) -> None:
        super().__init__(layer=layer, k=k, mode=mode, value=value, features=features)
        if direction not in DIRECTIONS:
            raise BenchmarkError(f"{self.name} direction '{direction}' is not one of {', '.join(DIRECTIONS)}")
        self.direction = direction
        self.error_basis: dict[int, Tensor] = {}

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        self.error_basis = {layer: self.behavior_basis(layer) for layer in self.chosen}

    def behavior_basis(self, layer: int) -> Tensor:
        """[d, r]: orthonormal basis of the behavior direction(s) removed from the error term at ``layer``."""
        sae, feats = self.chosen[layer]
        rows = sae_math.decoder_rows(sae.sae, feats).detach()
        if self.direction == "decoder_span":
            return sae_math.orthonormal_basis(rows)
        total = rows.sum(0)
        if total.norm() < 1e-6:
            raise BenchmarkError(
                f"{self.name}: the clamped latents' decoder rows sum to zero at layer {layer}; use direction=decoder_span"
            )
        return (total / total.norm())[:, None]

    def error_term(self, layer: int, h: Tensor) -> Tensor:
        """The SAE error term ``h - decode(encode(h))`` [b, p, d] at ``layer``."""
        sae = self.chosen[layer][0].sae
        return h - sae.decode(sae.encode(h))

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        basis = self.error_basis[layer]
        err = self.error_term(layer, h)
        along = (err @ basis) @ basis.T
        return h + self.clamp_change(layer, h, token_mask) - along * token_mask[..., None]
