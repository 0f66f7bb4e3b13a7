"""TPP (latent level), after SAEBench's targeted probe perturbation: one-vs-rest linear probes on mean-pooled
residuals of a five-class text set; the behavior is the target class probe's margin on its own texts.

Probes: :meth:`TPPSuite.prepare` trains one logistic-regression probe per class on the base model's residual at
``read_layer`` (the model's reference SAE layer), mean-pooled over :attr:`PromptBatch.token_mask` (real tokens
without the attention-sink first token), over the ``fit`` split of every class (positives: the class, negatives:
the rest, weighted to balance). Training is full-batch Newton's method on an L2-penalized, class-balanced loss
for a fixed number of steps in float64: deterministic, nothing cached.

Behavior: ``b = w_t . mean_pool(h) + c_t`` for the target class t (:data:`TARGET`) on the target class's texts
(the ``dev``/``test`` examples), so ``b > 0`` means the probe still finds the class. Neoplasms is the target:
the most specific concept of the five (texts about tumors and cancer; "general pathological conditions" is a
catch-all), and the class with the most distinct texts (204 in ``test``).

TPP metric (:meth:`TPPSuite.task_metrics`, recorded under ``task_metrics``): with the defense active, each class
probe's balanced accuracy (mean of its accuracy on its own ``test`` texts and on every other class's ``test``
texts, as SAEBench's class-balanced probe test sets) drops; ``tpp = intended - unintended``, where intended is
the target probe's drop and unintended the mean drop of the other probes.

The defense fits on :meth:`TPPSuite.class_contrast` (the ``fit`` split of every class) and may read the target
probe's direction (:meth:`TPPSuite.probe_direction`), as SAEBench's TPP latent selection does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from benchmark.errors import BenchmarkError
from tasks.base import SPLITS, TASKS, Forward, PromptBatch, TaskSuite, encode_prompts

DATA = Path(__file__).parent / "data" / "tpp.json"
TARGET = "neoplasms"
L2 = 0.3  # penalty on the weights of standardized features (the loss is a class-balanced mean); best dev accuracy
NEWTON_STEPS = 25
CHUNK = 32


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """[b, d]: mean of ``h`` [b, p, d] over the positions ``mask`` [b, p] marks."""
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def fit_probe(x: Tensor, y: Tensor, l2: float = L2, steps: int = NEWTON_STEPS) -> tuple[Tensor, Tensor]:
    """Logistic regression of ``y`` [n] bool on ``x`` [n, d]: weight [d] and bias [] in the units of ``x``.

    Features are standardized (mean and std of ``x``); the loss is the class-balanced mean cross-entropy (each
    class weighs one half) plus ``l2 / 2 * ||w_std||^2``; ``steps`` Newton steps from zero, in float64.
    """
    if y.all() or not y.any():
        raise BenchmarkError("a one-vs-rest probe needs examples of both the class and the rest")
    x = x.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [n, d + 1], last column: bias
    t = y.double()
    sample_w = torch.where(y, 0.5 / t.sum(), 0.5 / (1 - t).sum())  # [n], sums to 1
    reg = torch.full((z.shape[1],), l2, dtype=x.dtype)
    reg[-1] = 0.0  # the bias is not penalized
    theta = torch.zeros(z.shape[1], dtype=x.dtype)
    for _ in range(steps):
        p = torch.sigmoid(z @ theta)
        grad = z.T @ (sample_w * (p - t)) + reg * theta
        hess = (z.T * (sample_w * p * (1 - p))) @ z + torch.diag(reg)
        theta = theta - torch.linalg.solve(hess, grad)
    w = theta[:-1] / sd
    return w.float(), (theta[-1] - w @ mu).float()


@dataclass(frozen=True)
class ClassProbes:
    """One-vs-rest probes: the logit of class c for pooled residual x is ``x @ weight[c] + bias[c]``."""

    classes: tuple[str, ...]
    weight: Tensor  # [c, d]
    bias: Tensor  # [c]

    def logits(self, pooled: Tensor) -> Tensor:
        """[n, c] from pooled residuals [n, d]."""
        return pooled @ self.weight.T + self.bias


def balanced_accuracy(logits: Tensor, positive: Tensor) -> float:
    """Mean of the accuracy on positives and on negatives of a probe's logits [n] (``positive`` [n] bool)."""
    hit = (logits > 0) == positive
    return 0.5 * (float(hit[positive].float().mean()) + float(hit[~positive].float().mean()))


@TASKS.register("tpp")
class TPPSuite(TaskSuite):
    version = "1.0"
    reference_defense = "tpp_ablation"
    data_file = DATA
    description = ("TPP: one-vs-rest probes on mean-pooled residuals of medical abstracts (sae-probes "
                   "101_disease_class); b = the neoplasms probe's margin on neoplasms texts")
    target: ClassVar[str] = TARGET

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self._probes: ClassProbes | None = None
        self._fit_residuals: list[tuple[PromptBatch, Tensor]] | None = None

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    def class_examples(self, split: str) -> list[dict]:
        """Every class's examples of ``split`` (each with its ``label``)."""
        if split not in self.data["splits"]:
            raise BenchmarkError(f"TPP has no split '{split}' (splits: {', '.join(self.data['splits'])})")
        return self.data["splits"][split]

    def examples(self, split: str) -> list[dict]:
        """The target class's examples of ``split``: those the behavior is scored on."""
        return [ex for ex in self.class_examples(split) if ex["label"] == self.target]

    def split_hashes(self) -> dict[str, str]:
        """Hashes of every class's examples per split (the defense fits on all classes of ``fit``)."""
        return {
            s: "sha256:" + hashlib.sha256(json.dumps(self.class_examples(s), sort_keys=True).encode()).hexdigest()
            for s in SPLITS
        }

    def encode(self, examples: list[dict]) -> PromptBatch:
        """Targets: ``label`` [b], the class index of each example."""
        labels = torch.tensor([self.classes.index(ex["label"]) for ex in examples])
        return encode_prompts(self.tokenizer, [ex["id"] for ex in examples], [ex["text"] for ex in examples],
                              {"label": labels})

    def prepare(self, model) -> None:
        """Read the residual at the model's reference SAE layer and train the class probes on the ``fit`` split."""
        from benchmark.modeling.forward import run_edited

        self.read_layer = model.spec.sae_source.default_layer if model.spec is not None else model.n_layers // 2
        batch, _ = self.class_contrast()
        with torch.no_grad():
            self._fit_residuals = [(part, run_edited(model, part, {}, read_layer=self.read_layer))
                                   for part in batch.chunks(CHUNK)]
        x = torch.cat([mean_pool(h, part.token_mask) for part, h in self._fit_residuals])
        labels = batch.targets["label"]
        fitted = [fit_probe(x, labels == c) for c in range(len(self.classes))]
        self._probes = ClassProbes(tuple(self.classes), torch.stack([w for w, _ in fitted]),
                                   torch.stack([b for _, b in fitted]))

    @property
    def probes(self) -> ClassProbes:
        if self._probes is None:
            raise BenchmarkError("the TPP suite has no probes yet: call prepare(model) first")
        return self._probes

    def fit_residuals(self) -> list[tuple[PromptBatch, Tensor]]:
        """The :meth:`class_contrast` batch in chunks, each with its residual [b, p, d] at ``read_layer`` (computed
        once by :meth:`prepare`, so a defense fitting on it does not run the model again)."""
        if self._fit_residuals is None:
            raise BenchmarkError("the TPP suite has no residuals yet: call prepare(model) first")
        return self._fit_residuals

    @torch.no_grad()
    def pooled(self, forward: Forward, batch: PromptBatch) -> Tensor:
        """[n, d]: mean-pooled residual of every example of ``batch`` from ``forward`` (which reads the residual);
        run in chunks of similar length, returned in the batch's order."""
        return batch.map_length_chunks(CHUNK, lambda part: mean_pool(forward(part), part.token_mask))

    @property
    def _target_index(self) -> int:
        return self.classes.index(self.target)

    def probe_direction(self) -> Tensor:
        """[d]: the target class probe's weight (in residual units)."""
        return self.probes.weight[self._target_index]

    def class_contrast(self) -> tuple[PromptBatch, Tensor]:
        """The ``fit`` split of every class, shortest text first (chunks of it carry little padding), and which of
        its examples [n] bool are of the target class."""
        batch = self.encode(self.class_examples("fit")).by_length()
        return batch, batch.targets["label"] == self._target_index

    def behavior(self, read: Tensor, batch: PromptBatch) -> Tensor:
        """The target probe's logit [b] on the mean-pooled residual ``read`` [b, p, d]."""
        if read.dim() != 3 or read.shape[-1] != self.probes.weight.shape[1]:
            raise BenchmarkError(f"TPP reads the residual [b, p, d]; got a tensor of shape {list(read.shape)}")
        t = self._target_index
        return mean_pool(read, batch.token_mask) @ self.probes.weight[t] + self.probes.bias[t]

    def task_metrics(self, base: Forward, defended: Forward) -> dict[str, float | None]:
        """SAEBench's TPP metric on the ``test`` split of every class: intended minus unintended drop of the
        probes' balanced accuracy when the defense is on, plus the parts and the probes' base accuracy."""
        batch = self.encode(self.class_examples("test"))
        labels = batch.targets["label"]
        before = self.probes.logits(self.pooled(base, batch))  # [n, c]
        after = self.probes.logits(self.pooled(defended, batch))
        drops, accs = [], []
        for c in range(len(self.classes)):
            acc = balanced_accuracy(before[:, c], labels == c)
            accs.append(acc)
            drops.append(acc - balanced_accuracy(after[:, c], labels == c))
        t = self._target_index
        intended = drops[t]
        unintended = sum(d for c, d in enumerate(drops) if c != t) / (len(drops) - 1)
        return {"tpp": intended - unintended, "tpp_intended_drop": intended, "tpp_unintended_drop": unintended,
                "probe_accuracy_base": sum(accs) / len(accs)}

    def control_batch(self) -> PromptBatch:
        control = self.data["control"]
        return encode_prompts(self.tokenizer, [c["id"] for c in control], [c["text"] for c in control], {})
