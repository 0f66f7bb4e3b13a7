"""A worked example of a plug-in attack: the encoder attack with an evasion term.

It keeps everything of the built-in ``encoder`` attack (C1 at the attacked site, C4, the shared loop) and adds one
loss term: ``weight`` times the summed activation of the defended features at every defended site, so the search
prefers a ``delta`` that brings the behavior back without turning defended features on further up (against a
defense that clamps at several sites, or monitors its features). ``weight`` comes from ``-A weight=...`` and is
recorded under ``attack.params``.

Installed as a package, it registers through the entry-point group ``sae_recovery_benchmark.attacks``
(see ``pyproject.toml``); ``benchmark attacks`` then lists it and ``benchmark evaluate --attack quiet_encoder``
runs it.
"""

from __future__ import annotations

from torch import Tensor

from benchmark.attacks import FEATURE_PRESERVING
from benchmark.attacks.encoder import EncoderAttack
from tasks.base import PromptBatch


class QuietEncoderAttack(EncoderAttack):
    """The encoder attack, also minimizing the defended features' activation at every defended site."""

    threat_model = FEATURE_PRESERVING
    claims = ("C1", "C4")
    description = "encoder attack + weight x defended features' activation at every site (-A weight=...)"

    @property
    def weight(self) -> float:
        return float(dict(self.cfg.params).get("weight", 1.0))

    def extra_loss(self, read: Tensor, seen: dict[int, Tensor], batch: PromptBatch) -> Tensor:
        """[b]: ``weight`` x the summed positive activation of the defended features over sites and positions."""
        mask = batch.token_mask[..., None].float()
        total = 0.0
        for layer in self.defense.sites:
            acts = self.defense.readout_activations(layer, self.defense.readouts(layer, seen[layer]))
            total = total + (acts.clamp_min(0) * mask).sum(dim=(1, 2))
        return self.weight * total
