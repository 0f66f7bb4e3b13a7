"""``none``: the unconstrained residual attack, a ceiling rather than a threat (C4 only)."""

from __future__ import annotations

from benchmark.attacks.base import ATTACKS, UNCONSTRAINED
from benchmark.attacks.residual import ResidualAttack


@ATTACKS.register("none")
class UnconstrainedAttack(ResidualAttack):
    """Any residual perturbation within the budget, at the attacked site before the defense acts there."""

    threat_model = UNCONSTRAINED
    claims = ("C4",)
    description = "residual delta within the budget only (C4): the ceiling, not a threat"
