"""SAE clamp with a monitor on the error channel: the defended model abstains where the SAE error term is anomalous."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from benchmark.modeling.data_sources import sae_probes_texts
from benchmark.modeling.sae_training import CORPUS_SETS
from benchmark.modeling.forward import compose, site_inputs
from defenses.base import DEFENSES, FitContext
from defenses.sae_clamp import DEFAULT_K, DEFAULT_VALUE, SAEClamp
from tasks.base import PromptBatch, encode_prompts


#: characters kept of each generic text (about 100 tokens)
GENERIC_CHARS = 400


def generic_batch(tokenizer, n: int, seed: int = 0) -> PromptBatch:
    """``n`` texts of the reference SAEs' training corpus, drawn with ``seed`` (set by set in turn), as a batch."""
    rng = random.Random(seed)
    texts = [rng.choice(sae_probes_texts(CORPUS_SETS[i % len(CORPUS_SETS)]))[:GENERIC_CHARS] for i in range(n)]
    return encode_prompts(tokenizer, [f"generic-{i}" for i in range(n)], texts, {})


@DEFENSES.register("error_monitor")
class ErrorMonitor(SAEClamp):
    """``sae_clamp``, plus a detector on what the clamp leaves uncontrolled: the SAE error term at the clamped site.

    Why try it: recovery under the feature-preserving threat model rides the SAE error term (the committed
    records' error share of the recovering ``delta`` has a median near 0.9), which the clamp passes through
    unchanged. Rather than drop the error term (``sae_reconstruct_clamp``, which costs the SAE's whole
    reconstruction error on every input), this defense leaves clean inputs alone and abstains on inputs whose error
    term does not look like the error terms of clean text.

    The detector: at each editable position ``p`` of the clamped site, the relative error term ``u_p = e_p / ||h_p||``
    (``e = h - decode(encode(h))`` of the site's input ``h``, before the clamp), whitened by the mean and covariance
    of ``u`` over clean inputs (covariance shrunk towards its mean variance by ``shrinkage``); its score is
    ``s_p = ||W (u_p - mean)||^2 / d`` (about 1 on clean text). An input is flagged when any position's score exceeds
    the threshold: the ``1 - fpr`` quantile of the per-input maximum score over the clean inputs, so about ``fpr`` of
    them are flagged. A perturbation that the SAE cannot reconstruct lands in the error term; whitening weighs it by
    how rarely clean text puts error there, so even a small one in a direction clean error terms do not use stands
    out. The clean inputs: the suite's ``fit`` split, and ``generic`` texts drawn (seeded) from the corpus the
    reference SAEs were trained on (:data:`benchmark.modeling.sae_training.CORPUS_SETS`, cut to
    :data:`GENERIC_CHARS` characters), what the defender knows of normal text: calibrated on the fit split alone,
    the monitor flagged 81% of TPP's control texts on the default model (a limited run; 29% of its clean test
    inputs). Neither the test split nor the control set is seen.

    A flagged input gets a null readout (behavior score 0: suppressed; see :func:`defenses.base.abstained`). The
    record reports the monitor's false-positive rate on clean test and control inputs and its detection rate on the
    attacked inputs. The monitor's margin (:meth:`monitor_margin`, ``s_p / threshold - 1``) is differentiable, so
    an adaptive attacker can minimize it (attack ``evasive_encoder``).
    """

    version = "1.0"
    description = "sae_clamp + a whitened SAE-error anomaly monitor at the clamped site; abstains where it fires"

    def __init__(
        self,
        layer: int | None = None,
        k: int = DEFAULT_K,
        mode: str = "negative",
        value: float = DEFAULT_VALUE,
        features: list[int] | None = None,
        fpr: float = 0.05,
        shrinkage: float = 0.1,
        generic: int = 512,
    ) -> None:
        super().__init__(layer=layer, k=k, mode=mode, value=value, features=features)
        if not 0 < fpr < 1:
            raise BenchmarkError(f"{self.name} needs a target false-positive rate 0 < fpr < 1, got {fpr}")
        if not 0 <= shrinkage <= 1:
            raise BenchmarkError(f"{self.name} needs 0 <= shrinkage <= 1, got {shrinkage}")
        if generic < 0:
            raise BenchmarkError(f"{self.name} needs generic >= 0 texts, got {generic}")
        self.fpr, self.shrinkage, self.generic = float(fpr), float(shrinkage), generic
        self.center: Tensor | None = None  # [d] mean relative error term on the fit split
        self.whitener: Tensor | None = None  # [d, d] inverse Cholesky factor of the shrunk covariance
        self.threshold: float | None = None

    @property
    def monitor_sites(self) -> list[int]:
        return self.sites

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        layer = self.sites[0]
        clean = [ctx.fit_batch(), *([generic_batch(ctx.model.tokenizer, self.generic)] if self.generic else [])]
        rel, owner = [], []
        for j, part in enumerate(part for batch in clean for part in batch.length_chunks(32)):
            h = site_inputs(ctx.model, part, {layer: compose()})[layer]
            m = part.token_mask
            rel.append(self.relative_error(h)[m])
            owner.append(m.nonzero()[:, 0] + 32 * j)
        u, owner = torch.cat(rel), torch.cat(owner)
        if len(u) < 2:
            raise BenchmarkError(f"{self.name} needs at least 2 editable positions in the fit split to fit its monitor")
        self.center = u.mean(0)
        cov = torch.cov((u - self.center).T)
        d = cov.shape[0]
        shrunk = (1 - self.shrinkage) * cov + self.shrinkage * cov.diagonal().mean() * torch.eye(d)
        self.whitener = torch.linalg.inv(torch.linalg.cholesky(shrunk + 1e-10 * torch.eye(d)))
        scores = self.scores(u)
        per_input = torch.full((int(owner.max()) + 1,), -torch.inf).scatter_reduce(0, owner, scores, "amax")
        self.threshold = float(torch.quantile(per_input[torch.isfinite(per_input)], 1 - self.fpr))

    def relative_error(self, h: Tensor) -> Tensor:
        """``e / ||h||`` [..., d]: the SAE error term of ``h`` [..., d] at the clamped site, relative to ``h``."""
        sae = self.chosen[self.sites[0]][0].sae
        return (h - sae.decode(sae.encode(h))) / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def scores(self, u: Tensor) -> Tensor:
        """[...]: the anomaly score ``||W (u - mean)||^2 / d`` of relative error terms ``u`` [..., d]."""
        z = (u - self.center) @ self.whitener.T
        return z.pow(2).mean(-1)

    def monitor_margin(self, seen: dict[int, Tensor], token_mask: Tensor) -> Tensor:
        margin = self.scores(self.relative_error(seen[self.sites[0]])) / self.threshold - 1
        return torch.where(token_mask, margin, torch.full_like(margin, -1.0))
