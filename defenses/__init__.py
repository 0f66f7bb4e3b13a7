"""Defense adapters; importing this package registers the built-in defenses."""

from defenses.base import DEFENSES, Defense, FitContext, SAEFeatureDefense
from defenses import sae_clamp as _sae_clamp  # noqa: F401  (registers "sae_clamp")
from defenses import multi_layer_clamp as _multi_layer_clamp  # noqa: F401  (registers "multi_layer_clamp")
from defenses import sae_reconstruct_clamp as _sae_reconstruct_clamp  # noqa: F401  ("sae_reconstruct_clamp")
from defenses import error_projection_clamp as _error_projection_clamp  # noqa: F401  ("error_projection_clamp")
from defenses import directional_ablation as _directional_ablation  # noqa: F401  ("directional_ablation")
from defenses import none as _none  # noqa: F401  (registers "none")
from defenses import unlearning_clamp as _unlearning_clamp  # noqa: F401  (registers "unlearning_clamp")
from defenses import probe_ablation as _probe_ablation  # noqa: F401  (registers "tpp_ablation")
from defenses import refusal_steering as _refusal_steering  # noqa: F401  (registers "refusal_steering")
from defenses import error_monitor as _error_monitor  # noqa: F401  (registers "error_monitor")
from defenses import adversarial_projection_clamp as _adversarial  # noqa: F401  ("adversarial_projection_clamp")
from defenses import trajectory_clamp as _trajectory_clamp  # noqa: F401  (registers "trajectory_clamp")
from defenses import concept_scrubbing as _concept_scrubbing  # noqa: F401  (registers "concept_scrubbing")

__all__ = ["DEFENSES", "Defense", "FitContext", "SAEFeatureDefense"]
