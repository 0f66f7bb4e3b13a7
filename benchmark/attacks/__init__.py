"""Recovery attacks: one registered class each (``@ATTACKS.register(name)`` on a :class:`RecoveryAttack` subclass,
or the entry-point group ``sae_recovery_benchmark.attacks``), sharing the loop of :mod:`benchmark.attacks.base`.
``benchmark attacks`` lists them with their threat models."""

from . import encoder, evasive, jacobian, none, search, soft_suffix, transfer  # noqa: F401  (registers the built-ins)
from benchmark.attacks.base import (ATTACKS, FEATURE_PRESERVING, INPUT_SPACE, THREAT_MODELS, UNCONSTRAINED,
                                    AttackConfig, ExampleOutcome, RecoveryAttack, build_attack)
from benchmark.attacks.residual import ResidualAttack

__all__ = ["ATTACKS", "FEATURE_PRESERVING", "INPUT_SPACE", "THREAT_MODELS", "UNCONSTRAINED", "AttackConfig",
           "ExampleOutcome", "RecoveryAttack", "ResidualAttack", "build_attack"]
