"""Path attribution by replay: which part of the attack's change at the attacked site carries the recovery.

The change of the defended site output, ``D(h + delta) - D(h)``, splits exactly into three parts through the
SAE at that site: the non-defended latents (``(z_att - z_def)[~F] @ W_dec[~F]``), the defended latents (their
defended values' change, zero for a constant clamp) and the SAE error term (``e_att - e_def``). Each part is
replayed alone: a real forward pass with the defense active everywhere and the part added to the defended
output at the site; the replay recovers when the behavior score is positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.attack import defense_edits
from benchmark.forward import run_edited, capture, compose
from benchmark.models import LoadedModel
from defenses.base import Defense
from tasks.base import PromptBatch, TaskSuite


def stack_deltas(batch: PromptBatch, deltas: list[Tensor]) -> Tensor:
    """[b, p, d] from per-example deltas over their real (right-aligned, left-padded) tokens."""
    b, p = batch.input_ids.shape
    out = torch.zeros(b, p, deltas[0].shape[-1])
    for i, d in enumerate(deltas):
        out[i, p - d.shape[0]:] = d
    return out


@torch.no_grad()
def replay_parts(model: LoadedModel, defense: Defense, task: TaskSuite, batch: PromptBatch, delta: Tensor,
                 layer: int) -> dict[str, Tensor] | None:
    """Behavior scores [b] of each replayed part (``error``, ``latent``, ``defended``); None for non-SAE defenses."""
    found = defense.sae_at(layer)
    if found is None:
        return None
    sae, feats = found[0].sae, found[1]
    seen: dict[int, Tensor] = {}
    edits = defense_edits(defense, batch)
    edits[layer] = compose(capture(seen, layer), edits.get(layer))
    run_edited(model, batch, edits)
    h = seen[layer]
    mask = batch.token_mask[..., None].float()
    z_def, z_att = sae.encode(h), sae.encode(h + delta)
    e_def, e_att = h - sae.decode(z_def), (h + delta) - sae.decode(z_att)
    out_change = defense.edit(layer, h + delta, batch.token_mask) - defense.edit(layer, h, batch.token_mask)
    latent_change = (z_att - z_def)
    latent_change[..., feats] = 0
    parts = {
        "error": (e_att - e_def) * mask,
        "latent": (latent_change @ sae.W_dec) * mask,
    }
    parts["defended"] = out_change - parts["error"] - parts["latent"]
    scores = {}
    for name, part in parts.items():
        replay = defense_edits(defense, batch)
        base_edit = replay.get(layer)
        replay[layer] = (lambda x, e=base_edit, part=part: (e(x) if e else x) + part)
        scores[name] = task.behavior(run_edited(model, batch, replay), batch)
    return scores
