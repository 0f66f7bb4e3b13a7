"""``evasive_encoder``: the encoder attack, adapted to a defense that abstains on a monitor (DESIGN.md, "Attacks and
threat models": adaptive variants with evasion terms or surrogates).

Against such a defense the plain attack's loss cannot see the monitor: the abstention is a hard gate (a flagged
input's readout is 0 whatever ``delta`` does), whose gradient is zero wherever it is defined, so a defense could
look robust only because the attacker's gradient never learns of the gate (gradient masking). This attack adds
an evasion term to its loss: ``weight`` times a smoothed surrogate of the gate, :func:`smoothed_gate` of the
monitor's differentiable margin, which has a gradient everywhere, so the search brings the behavior back while
steering the monitor's score below its threshold. C1 and C4 are the encoder attack's; ``weight`` (default 1) and
``temperature`` (default 0.1) come from ``-A key=value`` and the weight is recorded as ``attack.evasion_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.attacks.base import ATTACKS, FEATURE_PRESERVING, AttackConfig
from benchmark.attacks.encoder import EncoderAttack
from benchmark.errors import BenchmarkError
from benchmark.modeling.models import LoadedModel
from defenses.base import Defense
from tasks.base import PromptBatch, TaskSuite

DEFAULTS = {"weight": 1.0, "temperature": 0.1}


def smoothed_gate(margin: Tensor, temperature: float) -> Tensor:
    """[b]: a smooth stand-in for the gate ``max_p margin[b, p] > 0`` (the monitor flags the input), from the
    monitor's margin [b, p]: ``T * softplus(logsumexp_p(margin / T))``, which tends to ``relu(max_p margin)`` as
    ``T`` goes to 0 and has a non-zero gradient everywhere (the gate itself has none)."""
    return temperature * F.softplus(torch.logsumexp(margin / temperature, dim=-1))


def evasion_settings(cfg: AttackConfig) -> dict[str, float]:
    """The attack's own settings from ``cfg.params`` over :data:`DEFAULTS`; an unknown key or a bad value is an
    error naming it."""
    params = dict(cfg.params)
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise BenchmarkError(f"attack 'evasive_encoder' has no setting {', '.join(sorted(unknown))} "
                             f"(settings: {', '.join(DEFAULTS)})")
    out = {k: float(params.get(k, v)) for k, v in DEFAULTS.items()}
    if out["weight"] < 0 or out["temperature"] <= 0:
        raise BenchmarkError(f"attack 'evasive_encoder' needs weight >= 0 and temperature > 0, got {out}")
    return out


@ATTACKS.register("evasive_encoder")
class EvasiveEncoderAttack(EncoderAttack):
    """The encoder attack plus ``weight`` x a smoothed surrogate of the defense's monitor gate."""

    threat_model = FEATURE_PRESERVING
    claims = ("C1", "C4")
    description = "encoder attack + weight x smoothed monitor gate, against a defense that abstains (-A weight=...)"

    def __init__(self, model: LoadedModel, defense: Defense, task: TaskSuite, cfg: AttackConfig):
        super().__init__(model, defense, task, cfg)
        if not defense.monitor_sites:
            raise BenchmarkError(f"attack 'evasive_encoder' evades a monitor; defense '{defense.name}' has none "
                                 "(its plain counterpart is the attack 'encoder')")
        self.evasion = evasion_settings(cfg)

    @classmethod
    def settings(cls, cfg: AttackConfig, model: LoadedModel) -> dict:
        return {"evasion_weight": evasion_settings(cfg)["weight"]}

    def extra_loss(self, read: Tensor, seen: dict[int, Tensor], batch: PromptBatch) -> Tensor:
        """[b]: ``weight`` x :func:`smoothed_gate` of the monitor's margin on this pass."""
        margin = self.defense.monitor_margin(seen, batch.token_mask)
        return self.evasion["weight"] * smoothed_gate(margin, self.evasion["temperature"])
