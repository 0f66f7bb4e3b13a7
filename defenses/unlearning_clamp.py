"""SAEBench / Farrell-style unlearning clamp: negative clamp on latents that fire often on the target topic only.

Feature choice follows the unlearning evaluation of SAEBench (Farrell et al., "Applying sparse autoencoders to
unlearn knowledge in language models"): a latent's firing frequency is the share of tokens where it is active,
measured on the suite's target texts (the "forget" set) and on its other texts (the "retain" set). Latents that
fire on at least ``forget_min`` of the target tokens and at most ``retain_max`` of the other tokens are eligible;
the top ``k`` are clamped to ``value`` (< 0) wherever they are active, with the SAE error term kept (the
``sae_clamp`` arithmetic, mode ``negative``). Ranking (``rank``):

- ``"forget"``: by target frequency, as SAEBench does (with ``retain_max=0.01`` this is its selection);
- ``"ratio"`` (default): by target frequency over other frequency, ``forget / (retain + RATIO_FLOOR)``. On the
  default model the SAEBench ranking picks latents that are rare everywhere (at layer 12 its top 32 are active
  only 1.5 times as often on the dev biology questions as on the physics/chemistry control questions) and flips
  at most 7 of 78 dev questions at ``value=-50`` with up to 128 latents; the ratio's top 32 are active 1.9 times
  as often and flip 24 (tasks/wmdp_bio/README.md).

The texts come from the suite's ``contrast_texts()``; a suite without them cannot host this defense.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from benchmark.modeling.saes import LoadedSAE
from defenses.base import DEFENSES, FitContext
from defenses.sae_clamp import SAEClamp

#: Reference setting, tuned on the wmdp_bio dev split of the default model at layer 12 (tasks/wmdp_bio/README.md).
DEFAULT_K = 32
DEFAULT_VALUE = -50.0
DEFAULT_FORGET_MIN = 0.005
DEFAULT_RETAIN_MAX = 1.0
RANKS = ("ratio", "forget")
RATIO_FLOOR = 1e-3  # a latent that never fires on the other texts ranks by forget / RATIO_FLOOR


@torch.no_grad()
def firing_frequency(ctx: FitContext, layer: int, texts: list[str], chunk: int = 16) -> Tensor:
    """[d_sae]: share of the tokens of ``texts`` (first token and padding excluded) where each latent of the SAE
    at ``layer`` is active, read from the residual after block ``layer`` of the undefended model."""
    from benchmark.modeling.forward import run_edited
    from tasks.base import encode_prompts

    sae = ctx.sae(layer).sae
    ids = [str(i) for i in range(len(texts))]
    batch = encode_prompts(ctx.model.tokenizer, ids, texts, {})
    active = torch.zeros(sae.cfg.d_sae)
    tokens = 0
    for part in batch.length_chunks(chunk):
        h = run_edited(ctx.model, part, {}, read_layer=layer)  # [b, p, d]
        mask = part.token_mask
        active += (sae.encode(h[mask]) > 0).sum(0).float()
        tokens += int(mask.sum())
    if tokens == 0:
        raise BenchmarkError("no tokens to measure firing frequencies on (empty contrast texts)")
    return active / tokens


def select_by_frequency(forget: Tensor, retain: Tensor, k: int, forget_min: float, retain_max: float,
                        rank: str = "ratio") -> Tensor:
    """The ``k`` top-ranked latents (sorted ids) among those with ``forget >= forget_min`` (and > 0) and
    ``retain <= retain_max``; ranked by ``forget`` or by ``forget / (retain + RATIO_FLOOR)``. Inputs [d_sae]."""
    eligible = (forget >= forget_min) & (forget > 0) & (retain <= retain_max)
    if int(eligible.sum()) < k:
        raise BenchmarkError(
            f"only {int(eligible.sum())} latents fire on at least {forget_min} of the target tokens and at most "
            f"{retain_max} of the other tokens; lower k ({k}) or forget_min, or raise retain_max"
        )
    score = forget / (retain + RATIO_FLOOR) if rank == "ratio" else forget
    ranked = torch.where(eligible, score, torch.full_like(score, -1.0))
    return torch.topk(ranked, k).indices.sort().values


def contrast_texts(ctx: FitContext) -> tuple[list[str], list[str]]:
    """The suite's (target texts, other texts), or a :class:`BenchmarkError` for a suite without them."""
    texts = getattr(ctx.task, "contrast_texts", None)
    if texts is None:
        raise BenchmarkError(
            f"unlearning_clamp needs a suite with contrast texts (contrast_texts()); '{ctx.task.name}' has none"
        )
    target, other = texts()
    if not target or not other:
        raise BenchmarkError(f"suite '{ctx.task.name}' gave empty contrast texts")
    return target, other


@DEFENSES.register("unlearning_clamp")
class UnlearningClamp(SAEClamp):
    """Clamp to ``value`` (< 0) where active the ``k`` latents that fire most often on the suite's target texts
    relative to its other texts (see the module docstring), or the given ``features``."""

    version = "1.0"
    description = "SAEBench-style unlearning: negative clamp on latents frequent on target text, rare elsewhere"

    def __init__(
        self,
        layer: int | None = None,
        k: int = DEFAULT_K,
        value: float = DEFAULT_VALUE,
        forget_min: float = DEFAULT_FORGET_MIN,
        retain_max: float = DEFAULT_RETAIN_MAX,
        rank: str = "ratio",
        features: list[int] | None = None,
    ) -> None:
        super().__init__(layer=layer, k=k, mode="negative", value=value, features=features)
        if not (0 <= forget_min <= 1 and 0 <= retain_max <= 1):
            raise BenchmarkError(
                f"{self.name} needs forget_min and retain_max in [0, 1], got {forget_min} and {retain_max}"
            )
        if rank not in RANKS:
            raise BenchmarkError(f"{self.name} rank '{rank}' is not one of {', '.join(RANKS)}")
        self.forget_min, self.retain_max, self.rank = float(forget_min), float(retain_max), rank

    def choose(self, ctx: FitContext, layer: int, features: list[int] | None) -> tuple[LoadedSAE, Tensor]:
        if features is not None:
            return super().choose(ctx, layer, features)
        target, other = contrast_texts(ctx)
        forget = firing_frequency(ctx, layer, target)
        retain = firing_frequency(ctx, layer, other)
        feats = select_by_frequency(forget, retain, self.k, self.forget_min, self.retain_max, self.rank)
        return ctx.sae(layer), feats
