"""Path attribution by replay: which part of the attack's change at the attacked site carries the recovery.

The attack's change of the residual at the site, ``delta = (h + delta) - h``, splits exactly into three parts
through the SAE at that site: the non-defended latents (``(z_att - z_def)[~F] @ W_dec[~F]``), the defended
latents (``(z_att - z_def)[F] @ W_dec[F]``) and the SAE error term (``e_att - e_def``), where ``z`` and ``e`` are
the SAE's latents and error on the undefended inputs ``h`` and ``h + delta``. Each part is replayed alone: a
real forward pass in which the part is added to the residual *before* the defense acts there (the order the
threat model fixes for ``delta``) and the defense is active at every site. A defense that removes the error
channel therefore also removes the error replay.

Two readings of a replay (DESIGN.md, "path attribution"):

- **share** of a part: ``(b_part - b_def) / (b_att - b_def)``, the fraction of the attack's gain in the behavior
  margin that the part alone brings, where ``b_def`` is the margin with the defense and no ``delta`` and
  ``b_att`` with the whole ``delta`` (every ``b`` here is :meth:`TaskSuite.behavior` of one pass, the margin the
  attacker optimizes, also for a suite judged by generation). Where ``b`` is linear in the residual at the site
  and the defense's edit is additive over the parts, the three shares sum to 1; their sum's distance from 1 says
  how far from that the model is.
- **binary replay**: whether the part alone brings the judged score above 0. On a ``delta`` the attacker stopped
  at the first ``b > 0`` this says little about paths: a part carrying 90% of a gain that just crossed 0 still
  falls short of it. The margin replay (:meth:`benchmark.attacks.ResidualAttack.push_to_margin`) asks it again of a
  ``delta`` pushed to a stated margin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.modeling.forward import (add, capture, compose, defense_edits, residual_prefix, run_edited, run_task,
                                        task_forward)
from benchmark.modeling.base_residuals import BaseResiduals
from benchmark.modeling.models import LoadedModel
from defenses.base import Defense
from tasks.base import PromptBatch, TaskSuite

PARTS = ("error", "latent", "defended")


def stack_deltas(batch: PromptBatch, deltas: list[Tensor]) -> Tensor:
    """[b, p, d] from per-example deltas over their real (right-aligned, left-padded) tokens."""
    b, p = batch.input_ids.shape
    out = torch.zeros(b, p, deltas[0].shape[-1])
    for i, d in enumerate(deltas):
        out[i, p - d.shape[0]:] = d
    return out


def split_delta(sae, feats: Tensor, h: Tensor, delta: Tensor, token_mask: Tensor) -> dict[str, Tensor]:
    """``delta`` [b, p, d] as ``error + latent + defended`` parts through the SAE (exact, up to float error)."""
    mask = token_mask[..., None].float()
    z_def, z_att = sae.encode(h), sae.encode(h + delta)
    e_def, e_att = h - sae.decode(z_def), (h + delta) - sae.decode(z_att)
    latent_change = z_att - z_def
    defended_change = torch.zeros_like(latent_change)
    defended_change[..., feats] = latent_change[..., feats]
    latent_change[..., feats] = 0
    return {
        "error": (e_att - e_def) * mask,
        "latent": (latent_change @ sae.W_dec) * mask,
        "defended": (defended_change @ sae.W_dec) * mask,
    }


@torch.no_grad()
def replay_parts(model: LoadedModel, defense: Defense, task: TaskSuite, batch: PromptBatch, delta: Tensor,
                 layer: int, residuals: BaseResiduals | None = None, judged: bool = True) -> dict[str, Tensor] | None:
    """Scores [b] of each replayed part (``error``, ``latent``, ``defended``, see :data:`PARTS`); None for a defense
    without an SAE at ``layer``. ``judged``: :meth:`TaskSuite.score` (what decides recovery); else the behavior
    margin of one pass, with the two ends added: ``none`` (no ``delta``: ``b_def``) and ``all`` (``delta``: ``b_att``).

    With ``residuals``, the run's store of undefended residuals (at its first defended site or lower, so at or
    below ``layer``, which has an SAE), every pass starts there (nothing below it changes)."""
    found = defense.sae_at(layer)
    if found is None:
        return None
    sae, feats = found[0].sae, found[1]
    seen: dict[int, Tensor] = {}
    edits = defense_edits(defense, batch)
    edits[layer] = compose(capture(seen, layer), edits.get(layer))
    run_edited(model, batch, edits, read_layer=max(edits), prefix=residual_prefix(residuals, batch))
    parts = split_delta(sae, feats, seen[layer], delta, batch.token_mask)
    if not judged:
        parts.update(none=None, all=delta)
    scores = {}
    for name, part in parts.items():
        def replay(b: PromptBatch, part=part) -> dict:
            edits = defense_edits(defense, b)
            edits[layer] = compose(None if part is None else add(part), edits.get(layer))
            return edits

        if judged:
            scores[name] = task.score(task_forward(model, task, replay, residuals), batch)
        else:
            scores[name] = task.behavior(run_task(model, task, batch, replay(batch),
                                                  prefix=residual_prefix(residuals, batch)), batch)
    return scores


def margin_shares(margins: dict[str, Tensor], floor: float = 1e-6) -> dict[str, Tensor]:
    """Share [b] of the attack's margin gain carried by each part (:data:`PARTS`), from :func:`replay_parts`'s
    unjudged margins: ``(b_part - b_none) / (b_all - b_none)``; NaN where the gain is below ``floor`` (nothing
    to share)."""
    gain = margins["all"] - margins["none"]
    ok = gain > floor
    return {p: torch.where(ok, (margins[p] - margins["none"]) / gain.clamp_min(floor), torch.full_like(gain, torch.nan))
            for p in PARTS}
