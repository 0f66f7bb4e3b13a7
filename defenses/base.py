"""The defense adapter interface and its registry.

A defense is fitted on a task suite's ``fit`` split (it chooses features and values), then edits the residual
stream at its sites in every forward pass. The attacker and the scorer see it only through this interface:
its sites, its edit (differentiable), its defended readouts (encoder pre-activations of the defended features)
and the directions the encoder constraint C1 must avoid.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from benchmark import sae_math
from benchmark.models import LoadedModel
from benchmark.registry import Registry
from benchmark.saes import LoadedSAE, load_sae
from tasks.base import PromptBatch, TaskSuite


@dataclass
class FitContext:
    """What a defense may see while fitting: the model, its SAEs, and the suite's ``fit`` split only."""

    model: LoadedModel
    task: TaskSuite
    sae_dir: Path | None = None
    saes: dict[int, LoadedSAE] = field(default_factory=dict)

    def sae(self, layer: int) -> LoadedSAE:
        if layer not in self.saes:
            self.saes[layer] = load_sae(self.model, layer, self.sae_dir)
        return self.saes[layer]

    def fit_batch(self) -> PromptBatch:
        return self.task.encode(self.task.examples("fit"))


class Defense(ABC):
    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def create(cls, **overrides) -> "Defense":
        """Build with the constructor defaults updated by ``overrides``; ``params`` keeps every argument."""
        sig = inspect.signature(cls.__init__)
        params = {n: p.default for n, p in sig.parameters.items() if n != "self" and p.default is not p.empty}
        unknown = set(overrides) - set(params)
        if unknown:
            from benchmark.errors import BenchmarkError

            raise BenchmarkError(
                f"defense '{cls.name}' has no parameter {', '.join(sorted(unknown))} "
                f"(parameters: {', '.join(params) or 'none'})"
            )
        params.update(overrides)
        obj = cls(**params)
        obj.params = params
        return obj

    @abstractmethod
    def fit(self, ctx: FitContext) -> None:
        """Choose what to defend from ``ctx`` (the suite's fit split and the model's SAEs)."""

    @property
    @abstractmethod
    def sites(self) -> list[int]:
        """Blocks whose output (residual stream) the defense edits."""

    @abstractmethod
    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        """Defended residual [b, p, d] from ``h`` [b, p, d]; ``token_mask`` [b, p] marks positions it may edit."""

    @abstractmethod
    def readouts(self, layer: int, h: Tensor) -> Tensor:
        """Encoder pre-activations [b, p, n] of the defended features at ``layer`` for residual ``h``."""

    @abstractmethod
    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        """The SAE activation function applied to ``readouts`` (for the reactivation metric)."""

    @abstractmethod
    def protected_directions(self, layer: int) -> Tensor:
        """[n, d]: directions a C1-constrained ``delta`` at ``layer`` must be orthogonal to."""

    @abstractmethod
    def defended(self) -> list[dict]:
        """``[{"site": {"layer": L, "hook": "resid_post"}, "features": [...]}]`` for the run record."""

    def sae_at(self, layer: int) -> tuple[LoadedSAE, Tensor] | None:
        """The SAE and defended latents at ``layer``, for path replay; ``None`` for non-SAE defenses."""
        return None

    def saes_used(self) -> list[LoadedSAE]:
        return []


class SAEFeatureDefense(Defense):
    """Base for defenses that act on chosen latents of one SAE per site (``self.chosen[layer] = (sae, ids)``)."""

    def __init__(self) -> None:
        self.chosen: dict[int, tuple[LoadedSAE, Tensor]] = {}

    @property
    def sites(self) -> list[int]:
        return sorted(self.chosen)

    def readouts(self, layer: int, h: Tensor) -> Tensor:
        sae, feats = self.chosen[layer]
        return sae_math.preacts(sae.sae, h, feats)

    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        sae, feats = self.chosen[layer]
        return sae_math.activations(sae.sae, pre, feats)

    def protected_directions(self, layer: int) -> Tensor:
        sae, feats = self.chosen[layer]
        return sae_math.encoder_directions(sae.sae, feats)

    def defended(self) -> list[dict]:
        return [
            {"site": {"layer": L, "hook": "resid_post"}, "sae_id": sae.sae_id, "features": feats.tolist()}
            for L, (sae, feats) in sorted(self.chosen.items())
        ]

    def sae_at(self, layer: int) -> tuple[LoadedSAE, Tensor] | None:
        return self.chosen.get(layer)

    def saes_used(self) -> list[LoadedSAE]:
        return [sae for _, (sae, _) in sorted(self.chosen.items())]


DEFENSES: Registry[type[Defense]] = Registry("defense", entry_point_group="sae_recovery_benchmark.defenses")


def top_attributed_features(ctx: FitContext, layer: int, k: int, chunk: int = 32) -> Tensor:
    """Latents of the SAE at ``layer`` with the largest act x grad attribution on the behavior score.

    Attribution of latent f: sum over fit examples and editable positions of ``z_f * d b / d z_f``, with the
    SAE spliced in and its error term kept (held constant), so the forward pass equals the clean one.
    """
    from benchmark.forward import run_edited

    sae = ctx.sae(layer).sae
    batch = ctx.fit_batch()
    total = torch.zeros(sae.cfg.d_sae)
    for part in batch.chunks(chunk):
        probe = torch.zeros(*part.input_ids.shape, sae.cfg.d_sae, requires_grad=True)
        latents = {}

        def splice(h: Tensor) -> Tensor:
            z = sae.encode(h).detach()
            latents["z"] = z
            err = (h - sae.decode(z)).detach()
            return sae.decode(z + probe) + err

        logits = run_edited(ctx.model, part, {layer: splice})
        ctx.task.behavior(logits, part).sum().backward()
        mask = part.token_mask[..., None]
        total += (latents["z"] * probe.grad * mask).sum((0, 1))
    return torch.topk(total, k).indices.sort().values
