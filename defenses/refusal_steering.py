"""Refusal steering: raise refusal-carrying SAE latents, only where a probe on harm-related latents fires.

The reference defense of the ``refusal`` suite. The default model never refuses, so the defense adds a behavior
(refusal) to remove one (compliance), and the attacker must bring compliance back while the steering stays on.
Everything is fitted on the suite's fit split (:meth:`tasks.refusal.suite.RefusalSuite.contrast`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.modeling import sae_math
from benchmark.errors import BenchmarkError
from benchmark.modeling.forward import Edit, run_edited
from benchmark.modeling.saes import LoadedSAE
from defenses.base import DEFENSES, FitContext, check_layers, SAEFeatureDefense
from tasks.base import PromptBatch

PROBE_STEPS = 300  # full-batch Adam steps of the harm probe
PROBE_LR = 0.01


def answer_positions(batch: PromptBatch) -> Tensor:
    """[b, p] bool: the last ``targets["answer_len"]`` real tokens of each row (its answer)."""
    p = batch.input_ids.shape[1]
    start = p - batch.targets["answer_len"][:, None]
    return (torch.arange(p)[None] >= start) & batch.attention_mask.bool()


def truncate_answers(batch: PromptBatch, n: int) -> PromptBatch:
    """``batch`` with each row's answer cut to its first ``n`` tokens (left padding kept)."""
    keep = batch.attention_mask.bool() & ~(answer_positions(batch) & (answer_positions(batch).cumsum(1) > n))
    rows = [batch.input_ids[i][keep[i]] for i in range(len(batch))]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return PromptBatch(list(batch.ids), ids, mask, {"answer_len": batch.targets["answer_len"].clamp(max=n)})


@torch.no_grad()
def residual(ctx: FitContext, layer: int, batch: PromptBatch) -> Tensor:
    """[b, p, d] residual after block ``layer`` of the undefended model."""
    return run_edited(ctx.model, batch, {}, read_layer=layer)


def answer_nll(ctx: FitContext, layer: int, batch: PromptBatch, h: Tensor, edit: Edit) -> Tensor:
    """Mean over rows of the mean negative log-likelihood of each row's answer tokens, with ``edit`` applied to
    the residual ``h`` [b, p, d] after block ``layer`` (the blocks below it are not run again)."""
    r = int(batch.targets["answer_len"].max()) + 1  # logits read: the last prompt token and the answer
    reading = PromptBatch(batch.ids, batch.input_ids, batch.attention_mask, batch.targets, read_len=r)
    logits = run_edited(ctx.model, reading, {layer: edit}, prefix=(layer, h))[:, :-1]  # [b, r - 1, vocab]
    targets = batch.input_ids[:, -(r - 1):]
    mask = answer_positions(batch)[:, -(r - 1):].float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return -((logp * mask).sum(1) / mask.sum(1)).mean()


@DEFENSES.register("refusal_steering")
class RefusalSteering(SAEFeatureDefense):
    """Raise ``k`` refusal latents per layer to fitted values, gated by a sparse probe on harm-related latents.

    Fit, per layer, on the refusal suite's fit split:

    - refusal latents: the ``k`` latents whose decoder directions, added at every position, most raise the
      likelihood of the first ``answer_tokens`` tokens of varied refusal sentences (18, assigned in turn)
      teacher-forced after harmful prompts: attribution ``W_dec[f] . grad``. Choosing by *activation* contrast
      (refusal text against the model's own answers, or against compliant sentences of the same shape) selects
      word and position latents ("sorry", "I"); on the default model raising those gives "I'm sorry for any
      confusion, but I can help ..." or broken text, not refusals (``tasks/refusal/README.md``).
    - their values ``v`` (>= 0): ``steps`` Adam steps on the same likelihood through the edit itself (gate 1),
      with the steering vector ``sum_f v_f W_dec[f]`` kept within ``strength`` x the mean residual norm at the
      layer; latents the optimization drives to 0 stay defended but add nothing.
    - harm probe (``gate``): an L1-regularized logistic probe (proximal steps, weight ``gate_l1``) on the
      standardized ReLU pre-activations of every latent of the SAE, scored per position and max-pooled, fitted on
      harmful against harmless fit prompts; the latents it keeps (non-zero weight) are the harm-related ones.

    Edit at each layer, at the positions of ``token_mask``: each refusal latent's activation ``a`` becomes
    ``a + g * relu(v - a)``: the SAE reconstruction with the raised latents plus the unchanged error term. The
    gate ``g = sigmoid((m - gate_threshold) / gate_temperature)``, where ``m`` is the running maximum of the probe's
    logit over the editable positions up to the current one (causal, so generation and a teacher-forced pass see
    the same gate); without ``gate``, ``g = 1``. The gate is smooth, so the attacker's gradient sees it: the gate
    is a real path to undo the steering (suppress the harm latents), and the benchmark should measure it, not hide
    it. The defended latents (readouts, C1 directions) are the refusal latents it sets. Defaults: the setting
    chosen on the refusal dev split of the default model (``tasks/refusal/README.md``).
    """

    version = "1.0"
    description = "raise attribution-chosen refusal SAE latents to fitted values where a harm-latent probe fires"

    def __init__(
        self,
        layers: list[int] | None = None,
        k: int = 32,
        strength: float = 0.33,
        steps: int = 12,
        answer_tokens: int = 8,
        gate: bool = True,
        gate_l1: float = 0.03,
        gate_threshold: float = 0.5,
        gate_temperature: float = 0.5,
        features: list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        if layers is not None:
            check_layers(self.name, layers, features)
        if k < 1 or strength <= 0 or steps < 0 or answer_tokens < 1 or gate_l1 < 0 or gate_temperature <= 0:
            raise BenchmarkError(f"{self.name} needs k >= 1, strength > 0, steps >= 0, answer_tokens >= 1, "
                                 "gate_l1 >= 0 and gate_temperature > 0")
        self.layers = list(layers) if layers is not None else None
        self.k, self.strength, self.steps = k, float(strength), steps
        self.answer_tokens, self.features = answer_tokens, features
        self.use_gate, self.gate_l1 = gate, float(gate_l1)
        self.gate_threshold, self.gate_temperature = float(gate_threshold), float(gate_temperature)
        self.values: dict[int, Tensor] = {}  # layer -> [k] target activations of the refusal latents
        self.probes: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> (harm latents, weights, bias)

    # -- fitting -------------------------------------------------------------------------------------------------

    def fit(self, ctx: FitContext) -> None:
        contrast = getattr(ctx.task, "contrast", None)
        if contrast is None:
            raise BenchmarkError(f"{self.name} fits on refusal contrast data, which suite '{ctx.task.name}' has no "
                                 "contrast() for: use it with the refusal suite")
        if self.layers is None:
            self.layers = [ctx.default_layer()]
            check_layers(self.name, self.layers, self.features)
        data = contrast()
        refusal = truncate_answers(data.refusal, self.answer_tokens)
        for i, layer in enumerate(self.layers):
            ctx.model.check_layer(layer)
            sae = ctx.sae(layer)
            h_refusal = residual(ctx, layer, refusal)
            budget = self.strength * float(h_refusal[refusal.token_mask].norm(dim=-1).mean())
            if self.features is not None:
                feats = self._given(sae, self.features[i])
                init = torch.ones(len(feats))
            else:
                feats, init = self._attributed(ctx, layer, sae, refusal, h_refusal)
            self.chosen[layer] = (sae, feats)
            self.values[layer] = self._fit_values(ctx, layer, refusal, h_refusal, init, budget)
            if self.use_gate:
                self.probes[layer] = self._fit_probe(ctx, layer, sae, data.harmful, data.harmless)

    def _given(self, sae: LoadedSAE, features: list[int]) -> Tensor:
        feats = torch.tensor(sorted(set(features)), dtype=torch.long)
        if feats.numel() == 0 or int(feats.max()) >= sae.sae.cfg.d_sae or int(feats.min()) < 0:
            raise BenchmarkError(f"features must lie in 0..{sae.sae.cfg.d_sae - 1}")
        return feats

    def _attributed(self, ctx: FitContext, layer: int, sae: LoadedSAE, refusal: PromptBatch,
                    h: Tensor) -> tuple[Tensor, Tensor]:
        """The top-``k`` latents by ``W_dec[f] . grad``, the gradient of the refusal sentences' log-likelihood
        w.r.t. a vector added at every editable position; and their attributions [k] (the values' start)."""
        v = torch.zeros(ctx.model.d_model, requires_grad=True)
        mask = refusal.token_mask[..., None]
        with torch.enable_grad():
            answer_nll(ctx, layer, refusal, h, lambda x: x + v * mask).backward()
        score = sae_math.decoder_rows(sae.sae, torch.arange(sae.sae.cfg.d_sae)) @ -v.grad
        top = torch.topk(score, self.k)
        order = top.indices.argsort()
        return top.indices[order], top.values[order].clamp(min=0)

    def _fit_values(self, ctx: FitContext, layer: int, refusal: PromptBatch, h: Tensor, init: Tensor,
                    budget: float) -> Tensor:
        """Values [k] >= 0 of the refusal latents that raise the refusal sentences' likelihood, steering vector
        within ``budget``; starts at half the budget along ``init``."""
        sae, feats = self.chosen[layer]
        rows = sae_math.decoder_rows(sae.sae, feats)

        def capped(c: Tensor) -> Tensor:
            v = c.clamp(min=0)
            return v * torch.clamp(budget / (v @ rows).norm().clamp_min(1e-12), max=1.0)

        c = (0.5 * budget * init / (init @ rows).norm().clamp_min(1e-12)).requires_grad_(True)
        opt = torch.optim.Adam([c], lr=0.05 * budget)
        gate = refusal.token_mask.float()
        for _ in range(self.steps):
            self.values[layer] = capped(c)
            with torch.enable_grad():
                loss = answer_nll(ctx, layer, refusal, h, lambda x: self.steer(layer, x, gate))
                opt.zero_grad()
                loss.backward()
            opt.step()
        return capped(c).detach()

    def _fit_probe(self, ctx: FitContext, layer: int, sae: LoadedSAE, harmful: PromptBatch,
                   harmless: PromptBatch) -> tuple[Tensor, Tensor, Tensor]:
        """L1 logistic probe, max-pooled over positions, of harmful against harmless prompts on the standardized
        ReLU pre-activations of all latents: (latents with non-zero weight, their weights / std, bias)."""
        all_latents = torch.arange(sae.sae.cfg.d_sae)

        def features(batch: PromptBatch) -> tuple[Tensor, Tensor]:
            return torch.relu(sae_math.preacts(sae.sae, residual(ctx, layer, batch), all_latents)), batch.token_mask

        (xa, ma), (xb, mb) = features(harmful), features(harmless)
        scale = torch.cat([xa[ma], xb[mb]]).std(0) + 1e-2
        xa, xb = xa / scale, xb / scale  # standardized once, not in every step
        w, b = torch.zeros(len(all_latents), requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=PROBE_LR)
        y = torch.cat([torch.ones(len(xa)), torch.zeros(len(xb))])
        for _ in range(PROBE_STEPS):
            with torch.enable_grad():
                z = torch.cat([self._pooled(xa, ma, w, b), self._pooled(xb, mb, w, b)])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
                opt.zero_grad()
                loss.backward()
            opt.step()
            with torch.no_grad():  # proximal step of the L1 penalty: exact zeros
                w.copy_(w.sign() * (w.abs() - PROBE_LR * self.gate_l1).clamp(min=0))
        keep = (w != 0).nonzero()[:, 0]
        if keep.numel() == 0:
            raise BenchmarkError(f"{self.name}: the harm probe at layer {layer} kept no latent; lower gate_l1")
        return keep, (w[keep] / scale[keep]).detach(), b.detach()

    @staticmethod
    def _pooled(x: Tensor, mask: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """[b] max over the positions ``mask`` [b, p] keeps of the per-position logit ``x @ w + b``."""
        return (x @ w + b).masked_fill(~mask, float("-inf")).amax(1)

    # -- the edit ------------------------------------------------------------------------------------------------

    def harm_logit(self, layer: int, h: Tensor) -> Tensor:
        """[b, p] the harm probe's logit at every position of ``h`` [b, p, d]."""
        sae, _ = self.chosen[layer]
        harm, weight, bias = self.probes[layer]
        return torch.relu(sae_math.preacts(sae.sae, h, harm)) @ weight + bias

    def gate(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        """[b, p] in [0, 1]: sigmoid of the running max of the harm logit over editable positions so far."""
        if layer not in self.probes:
            return token_mask.to(h.dtype)
        logit = self.harm_logit(layer, h).masked_fill(~token_mask, float("-inf"))
        running = torch.cummax(logit, dim=1).values
        g = torch.sigmoid((running - self.gate_threshold) / self.gate_temperature)
        return torch.where(token_mask, g, torch.zeros_like(g))

    def steer(self, layer: int, h: Tensor, gate: Tensor) -> Tensor:
        """``h`` [b, p, d] with every refusal latent raised toward its value by ``gate`` [b, p]."""
        sae, feats = self.chosen[layer]
        acts = sae_math.activations(sae.sae, sae_math.preacts(sae.sae, h, feats), feats)
        change = gate[..., None] * torch.relu(self.values[layer] - acts)
        return h + change @ sae_math.decoder_rows(sae.sae, feats)

    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        return self.steer(layer, h, self.gate(layer, h, token_mask))
