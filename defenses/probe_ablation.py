"""TPP reference defense: zero-ablate the SAE latents that carry a class probe, as SAEBench's TPP selects them.

Over the suite's ``fit`` split (:meth:`ProbedSuite.class_contrast`), each latent f of the SAE at the probe's layer
gets the effect ``clamp(mean_pos[f] - mean_neg[f], 0) * (w_probe . W_dec[f])``, where ``mean_pos``/``mean_neg``
are its activation mean-pooled over each text's editable tokens and averaged over the target class's / the other
classes' texts, and ``w_probe`` is the target probe's weight. The top ``n`` latents are zeroed with the SAE error
term kept (:class:`SAEClamp` in mode ``zero``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from benchmark.modeling.saes import LoadedSAE
from defenses.base import DEFENSES, FitContext
from defenses.sae_clamp import SAEClamp
from tasks.base import PromptBatch

#: The smallest N of 1, 2, 4, 8, ... whose suppression rate on the TPP dev split of the default model (layer 12),
#: at the low end of its Wilson 95% interval, still gives 40 valid flips among the ~146 test base-positives that
#: the dev base rate (43 of 60) predicts: 22 of 43 flipped at N = 4 (low end 0.37; N = 2: 16 of 43, 0.24);
#: 11, 16, 20, 22, 34, 41 at N = 1, 2, 3, 4, 6, 8. On test, N = 4 flips 79 of 152 base-positives.
DEFAULT_N = 4


@runtime_checkable
class ProbedSuite(Protocol):
    """What this defense needs from a suite: the layer its probe reads, the probe, and the class contrast."""

    read_layer: int | None

    def probe_direction(self) -> Tensor: ...  # [d]

    def class_contrast(self) -> tuple[PromptBatch, Tensor]: ...  # fit batch, [n] bool: of the target class

    def fit_residuals(self) -> list[tuple[PromptBatch, Tensor]]: ...  # that batch in chunks, residual [b, p, d]


def tpp_effects(pos_mean: Tensor, neg_mean: Tensor, w_probe: Tensor, w_dec: Tensor) -> Tensor:
    """[F]: ``clamp(pos_mean - neg_mean, 0) * (w_dec @ w_probe)`` from latent means [F], probe [d], decoder [F, d]."""
    return (pos_mean - neg_mean).clamp(min=0) * (w_dec @ w_probe)


@torch.no_grad()
def pooled_latents(sae, residuals: list[tuple[PromptBatch, Tensor]]) -> Tensor:
    """[n, F]: SAE latents of chunked residuals [b, p, d] mean-pooled over each example's
    :attr:`PromptBatch.token_mask`."""
    out = []
    for part, h in residuals:
        z = sae.encode(h)  # [b, p, F]
        m = part.token_mask[..., None].to(z.dtype)
        out.append((z * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


@DEFENSES.register("tpp_ablation")
class ProbeAblation(SAEClamp):
    """Zero-ablate the top-``n`` latents by TPP effect at the suite's probe layer (or the given ``features``)."""

    version = "1.0"
    description = "zero-ablate the top-n latents by clamp(mean_pos - mean_neg, 0) * (w_probe . W_dec[f]) (SAEBench TPP)"

    def __init__(self, n: int = DEFAULT_N, features: list[int] | None = None) -> None:
        super().__init__(layer=None, k=n, mode="zero", value=0.0, features=features)

    def fit(self, ctx: FitContext) -> None:
        if not isinstance(ctx.task, ProbedSuite) or ctx.task.read_layer is None:
            raise BenchmarkError("tpp_ablation needs a suite with class probes, such as tpp")
        layer = ctx.task.read_layer
        self.chosen = {layer: self.choose(ctx, layer, self.features)}

    def choose(self, ctx: FitContext, layer: int, features: list[int] | None) -> tuple[LoadedSAE, Tensor]:
        """The SAE at the probe's layer and its top-``n`` latents by TPP effect (or ``features`` if given)."""
        if features is not None:
            return super().choose(ctx, layer, features)
        sae = ctx.sae(layer)
        _, is_pos = ctx.task.class_contrast()
        z = pooled_latents(sae.sae, ctx.task.fit_residuals())
        effects = tpp_effects(z[is_pos].mean(0), z[~is_pos].mean(0), ctx.task.probe_direction(), sae.sae.W_dec)
        return sae, torch.topk(effects, self.k).indices.sort().values
