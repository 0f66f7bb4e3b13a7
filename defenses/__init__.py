"""Defense adapters; importing this package registers the built-in defenses."""

from defenses.base import DEFENSES, Defense, FitContext, SAEFeatureDefense
from defenses import sae_clamp as _sae_clamp  # noqa: F401  (registers "sae_clamp")

__all__ = ["DEFENSES", "Defense", "FitContext", "SAEFeatureDefense"]
