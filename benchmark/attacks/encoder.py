"""``encoder``: the feature-preserving residual attack at the defended site (C1 + C4)."""

from __future__ import annotations

from benchmark.attacks.base import ATTACKS, FEATURE_PRESERVING
from benchmark.attacks.residual import ResidualAttack


@ATTACKS.register("encoder")
class EncoderAttack(ResidualAttack):
    """``delta`` orthogonal to the defended encoder rows at the attacked site, so the defended pre-activations
    there do not move."""

    threat_model = FEATURE_PRESERVING
    claims = ("C1", "C4")
    description = "residual delta in the defended encoder rows' null space at the attacked site (C1 + C4)"
