"""Single-layer SAE clamp: the standard latent-space defense this benchmark puts under attack.

The clamp arithmetic (:func:`clamp_values`, :func:`clamp_change`) and the feature choice (:meth:`SAEClamp.choose`)
live here once; ``multi_layer_clamp``, ``sae_reconstruct_clamp`` and ``error_projection_clamp`` subclass
:class:`SAEClamp` and change only where it clamps or what it does with the SAE error term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.modeling import sae_math
from benchmark.errors import BenchmarkError
from benchmark.modeling.saes import LoadedSAE
from defenses.base import DEFENSES, FitContext, SAEFeatureDefense, top_attributed_features

MODES = ("zero", "negative", "multiply", "set")

#: Reference setting of the clamp family, chosen on the IOI dev split of the default model (layer 12):
#: the highest suppression with the smallest side effect in leaderboard/tuning/ioi_sae_clamp_dev*.md
#: (stronger negative values and more latents flipped fewer prompts at larger side effects).
DEFAULT_K = 8
DEFAULT_VALUE = -2.0


def check_clamp(name: str, k: int, mode: str, value: float) -> None:
    """Reject clamp settings that make no sense, with one line naming the defense."""
    if mode not in MODES:
        raise BenchmarkError(f"{name} mode '{mode}' is not one of {', '.join(MODES)}")
    if mode == "negative" and value >= 0:
        raise BenchmarkError(f"{name} mode 'negative' needs value < 0, got {value}")
    if k < 1:
        raise BenchmarkError(f"{name} needs k >= 1, got {k}")


def clamp_values(acts: Tensor, mode: str, value: float) -> Tensor:
    """Defended latent values from their undefended activations [..., n]."""
    if mode == "zero":
        return torch.zeros_like(acts)
    if mode == "negative":
        return torch.where(acts > 0, torch.full_like(acts, value), acts)
    if mode == "multiply":
        return acts * value
    return torch.full_like(acts, value)


def clamp_change(sae, feats: Tensor, h: Tensor, token_mask: Tensor, mode: str, value: float) -> Tensor:
    """Residual change [b, p, d] of the clamp: ``(a' - a) W_dec[F]`` at the positions ``token_mask`` allows.

    ``h + clamp_change(...)`` is the SAE reconstruction with the clamped latents plus the unchanged error term.
    """
    acts = sae_math.activations(sae, sae_math.preacts(sae, h, feats), feats)
    change = (clamp_values(acts, mode, value) - acts) * token_mask[..., None]
    return change @ sae_math.decoder_rows(sae, feats)


@DEFENSES.register("sae_clamp")
class SAEClamp(SAEFeatureDefense):
    """Clamp the top-k behavior-attributed latents of one SAE, keeping the SAE error term.

    Latents are chosen by act x grad attribution on the suite's behavior score over its fit split (or given
    as ``features``). ``mode``: ``zero`` sets them to 0; ``negative`` sets them to ``value`` (< 0) where they
    are active, as in SAEBench's unlearning eval; ``multiply`` scales them by ``value``; ``set`` puts them at
    ``value`` at every position. The edit is ``h + (a' - a) W_dec[F]``, i.e. the SAE reconstruction with the
    clamped latents plus the unchanged error term, computed from the defended latents only.
    """

    version = "1.0"
    description = "clamp the top-k attributed latents of one SAE (zero / negative / multiply / set)"

    def __init__(
        self,
        layer: int | None = None,
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
        features: list[int] | None = None,
    ) -> None:
        super().__init__()
        check_clamp(self.name, k, mode, value)
        self.layer, self.k, self.mode, self.value, self.features = layer, k, mode, float(value), features

    def choose(self, ctx: FitContext, layer: int, features: list[int] | None) -> tuple[LoadedSAE, Tensor]:
        """The SAE at ``layer`` and the latents to clamp there: ``features`` if given, else the top-k attributed."""
        sae = ctx.sae(layer)
        if features is not None:
            feats = torch.tensor(sorted(features), dtype=torch.long)
            if feats.numel() == 0 or int(feats.max()) >= sae.sae.cfg.d_sae or int(feats.min()) < 0:
                raise BenchmarkError(f"features must lie in 0..{sae.sae.cfg.d_sae - 1}")
        else:
            feats = top_attributed_features(ctx, layer, self.k)
        return sae, feats

    def fit(self, ctx: FitContext) -> None:
        layer = self.layer if self.layer is not None else ctx.default_layer()
        self.chosen = {layer: self.choose(ctx, layer, self.features)}

    def clamped(self, acts: Tensor) -> Tensor:
        """Defended latent values from their undefended activations [..., n]."""
        return clamp_values(acts, self.mode, self.value)

    def clamp_change(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        """The clamp's residual change at ``layer`` (see :func:`clamp_change`)."""
        sae, feats = self.chosen[layer]
        return clamp_change(sae.sae, feats, h, token_mask, self.mode, self.value)

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        return h + self.clamp_change(layer, h, token_mask)
