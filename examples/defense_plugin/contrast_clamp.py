"""An example defense plugin: zero the SAE latents most specific to a suite's behavior.

Fit: at one layer, the ``k`` latents whose mean activation on the suite's fit prompts most exceeds their mean on its
control prompts (the neutral text the side effect is measured on). Edit: those latents set to 0 at every editable
position, keeping the SAE error term: ``h - a_F W_dec[F]``. Everything the attacker and the scorer need (readouts,
their activation function, the C1 directions, the record's ``defended``) comes from ``SAEFeatureDefense``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.modeling import sae_math
from benchmark.modeling.forward import run_edited
from benchmark.modeling.saes import LoadedSAE
from defenses.base import FitContext, SAEFeatureDefense
from tasks.base import PromptBatch


class ContrastClamp(SAEFeatureDefense):
    """Zero the ``k`` latents at ``layer`` most active on the fit prompts relative to the control prompts."""

    version = "0.1.0"
    description = "example plugin: zero the k latents most active on the behavior's prompts relative to neutral text"

    def __init__(self, layer: int | None = None, k: int = 8) -> None:  # the parameters `-D key=value` sets
        super().__init__()
        self.layer, self.k = layer, k

    def fit(self, ctx: FitContext) -> None:
        layer = self.layer if self.layer is not None else ctx.default_layer()
        ctx.check_site(layer)
        sae = ctx.sae(layer)
        contrast = mean_activations(ctx, sae, ctx.fit_batch()) - mean_activations(ctx, sae, ctx.task.control_batch())
        self.chosen = {layer: (sae, torch.topk(contrast, self.k).indices.sort().values)}

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        """Causal (each position on its own) and differentiable, as the attacker needs."""
        sae, feats = self.chosen[layer]
        acts = sae_math.activations(sae.sae, sae_math.preacts(sae.sae, h, feats), feats)
        return h - (acts * token_mask[..., None]) @ sae_math.decoder_rows(sae.sae, feats)


@torch.no_grad()
def mean_activations(ctx: FitContext, sae: LoadedSAE, batch: PromptBatch, chunk: int = 32) -> Tensor:
    """[d_sae]: every latent's mean activation over the editable positions of ``batch``."""
    total, count = torch.zeros(sae.sae.cfg.d_sae), 0
    for part in batch.length_chunks(chunk):
        h = run_edited(ctx.model, part, {}, read_layer=sae.layer)
        mask = part.token_mask
        total += sae.sae.encode(h)[mask].sum(0)
        count += int(mask.sum())
    return total / max(count, 1)
