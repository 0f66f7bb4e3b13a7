"""The white-box recovery attacker: batched projected gradient descent on a residual perturbation ``delta``.

``delta`` [b, p, d] is added to the residual stream after block ``layer`` *before* the defense acts there, and
the defense is re-applied in every forward pass. After every optimizer step the constraints are enforced on
``delta`` itself (not only on its gradient, so Adam's per-coordinate rescaling cannot leave the subspace):

- C1 (mode ``encoder``): ``delta`` is projected onto the orthogonal complement of the defended encoder rows
  at the attacked site, so the defended pre-activations there are unchanged to float precision;
- C4 (every mode): ``||delta_p||_2 <= eps * ||h_p||`` at each attacked position p, where ``h`` is the residual
  of the defended model, unattacked, at the point ``delta`` is added.

Budgets are swept in ascending order; an example stops as soon as its behavior score is positive with the
defense active, and the search at the next budget starts from the previous budget's ``delta`` (feasible there
too). An example's recovery budget is the smallest swept ``eps`` at which it recovered.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from benchmark import sae_math
from benchmark.errors import BenchmarkError
from benchmark.forward import Edit, add, capture, compose, run_edited
from benchmark.models import LoadedModel
from defenses.base import Defense
from tasks.base import PromptBatch, TaskSuite

ATTACK_MODES = ("none", "encoder")
POSITIONS = ("all", "last")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class AttackConfig:
    """Attacker settings; every field is recorded in the run record."""

    mode: str = "encoder"  # none: budget only; encoder: C1 + C4
    eps: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # relative budgets swept in ascending order
    steps: int = 30  # optimizer steps per budget
    lr: float = 0.1  # step length per position, as a fraction of the current budget eps * ||h_p||
    positions: str = "all"  # all editable prompt positions, or the last one
    optimizer: str = "adam"  # adam, or sgd (normalized gradient steps)
    seed: int = 0
    batch_size: int = 64
    layer: int | None = None  # attacked block; default: the defense's first site

    def __post_init__(self):
        if self.mode not in ATTACK_MODES:
            raise BenchmarkError(f"unknown attack mode '{self.mode}' (available: {', '.join(ATTACK_MODES)})")
        if self.positions not in POSITIONS:
            raise BenchmarkError(f"unknown positions '{self.positions}' (available: {', '.join(POSITIONS)})")
        if self.optimizer not in OPTIMIZERS:
            raise BenchmarkError(f"unknown optimizer '{self.optimizer}' (available: {', '.join(OPTIMIZERS)})")
        if not self.eps or any(e <= 0 for e in self.eps) or list(self.eps) != sorted(self.eps):
            raise BenchmarkError(f"eps must be positive and ascending, got {list(self.eps)}")
        if self.steps < 1:
            raise BenchmarkError("steps must be >= 1")

    def to_record(self) -> dict:
        d = asdict(self)
        d["eps"] = list(self.eps)
        return d


@dataclass
class ExampleOutcome:
    """One attacked example. Tensors are trimmed to the example's real tokens."""

    index: int  # row in the attacked batch
    b_attacked: float
    recovered: bool
    steps_used: int
    recovery_budget: float | None
    delta: Tensor  # [len_i, d] at the attacked site
    delta_rel: float  # ||delta|| / ||h_def|| over the attacked positions
    drift_abs: float
    drift_rel: float
    reactivation: float | None  # None when no defended entry was inactive under the defense
    c1_change: float  # max |change of a defended pre-activation at the attacked site| / RMS of those values
    h_norm_mean: float
    extra: dict = field(default_factory=dict)


def defense_edits(defense: Defense | None, batch: PromptBatch) -> dict[int, Edit]:
    if defense is None:
        return {}
    mask = batch.token_mask
    return {L: (lambda h, L=L: defense.edit(L, h, mask)) for L in defense.sites}


def attacked_positions(batch: PromptBatch, positions: str) -> Tensor:
    """[b, p] float mask of the positions ``delta`` may change."""
    mask = batch.token_mask.clone()
    if positions == "last":
        mask[:, :-1] = False
    return mask.float()


class _Adam:
    """Adam moments per example, so examples can leave the batch without disturbing the others."""

    def __init__(self, like: Tensor, betas=(0.9, 0.999)):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(like.shape[0])
        self.b1, self.b2 = betas

    def direction(self, rows: Tensor, cols: slice, grad: Tensor) -> Tensor:
        self.t[rows] += 1
        t = self.t[rows].view(-1, 1, 1)
        m = self.m[rows, cols] = self.b1 * self.m[rows, cols] + (1 - self.b1) * grad
        v = self.v[rows, cols] = self.b2 * self.v[rows, cols] + (1 - self.b2) * grad.pow(2)
        return (m / (1 - self.b1**t)) / ((v / (1 - self.b2**t)).sqrt() + 1e-12)


class RecoveryAttack:
    """Runs the configured attack on a batch of valid flips against a fitted defense."""

    def __init__(self, model: LoadedModel, defense: Defense, task: TaskSuite, cfg: AttackConfig):
        self.model, self.defense, self.task, self.cfg = model, defense, task, cfg
        self.layer = cfg.layer if cfg.layer is not None else min(defense.sites) if defense.sites else None
        if self.layer is None:
            raise BenchmarkError("the attack needs a layer: the defense has no sites, pass --attack-layer")
        model.check_layer(self.layer)
        self.basis = None
        if cfg.mode == "encoder":
            if self.layer not in defense.sites:
                raise BenchmarkError(
                    f"mode 'encoder' constrains delta at a defended site; layer {self.layer} is not one "
                    f"(defended sites: {defense.sites})"
                )
            self.basis = sae_math.orthonormal_basis(defense.protected_directions(self.layer).detach())

    def project(self, delta: Tensor, h_norm: Tensor, pos_mask: Tensor, eps: float) -> Tensor:
        """Enforce C1 (mode ``encoder``) and C4 on ``delta`` [b, p, d]; ``h_norm``, ``pos_mask`` are [b, p]."""
        if self.basis is not None:
            delta = delta - (delta @ self.basis) @ self.basis.T
        delta = delta * pos_mask[..., None]
        cap = eps * h_norm
        norm = delta.norm(dim=-1)
        scale = torch.where(norm > cap, cap / norm.clamp_min(1e-12), torch.ones_like(norm))
        return delta * scale[..., None]

    def _forward(self, batch: PromptBatch, delta: Tensor | None, grad: bool):
        """Defended forward with ``delta`` at the attacked site; returns logits and the sites' inputs."""
        seen: dict[int, Tensor] = {}
        edits = defense_edits(self.defense, batch)
        for L in set(self.defense.sites) | {self.layer}:
            edits[L] = compose(add(delta) if L == self.layer and delta is not None else None,
                               capture(seen, L), edits.get(L))
        with torch.set_grad_enabled(grad):
            logits = run_edited(self.model, batch, edits)
        return logits, seen

    def _readouts(self, seen: dict[int, Tensor]) -> dict[int, Tensor]:
        return {L: self.defense.readouts(L, seen[L]).detach() for L in self.defense.sites}

    def run(self, batch: PromptBatch, progress: bool = True) -> list[ExampleOutcome]:
        torch.manual_seed(self.cfg.seed)
        outcomes: list[ExampleOutcome] = []
        bar = tqdm(total=len(batch), desc=f"attack[{self.cfg.mode}]", disable=not progress, unit="ex")
        for start in range(0, len(batch), self.cfg.batch_size):
            rows = list(range(start, min(start + self.cfg.batch_size, len(batch))))
            for out in self._run_chunk(batch.select(rows), bar):
                out.index += start
                outcomes.append(out)
        bar.close()
        return sorted(outcomes, key=lambda o: o.index)

    def _run_chunk(self, batch: PromptBatch, bar) -> list[ExampleOutcome]:
        n, p = batch.input_ids.shape
        _, seen = self._forward(batch, None, grad=False)
        h_norm = seen[self.layer].norm(dim=-1)  # [n, p]
        read_def = self._readouts(seen)
        pos_mask = attacked_positions(batch, self.cfg.positions)
        editable = batch.token_mask
        delta = torch.zeros(n, p, self.model.d_model)
        adam = _Adam(delta)
        active = torch.ones(n, dtype=torch.bool)
        steps_used = torch.zeros(n, dtype=torch.long)
        done: dict[int, ExampleOutcome] = {}

        def finish(i: int, b: float, rec: bool, budget: float | None, read_att: dict[int, Tensor], row: int):
            """Record example i (row ``row`` of the current sub-batch) as finished."""
            m = editable[i]
            attacked = pos_mask[i].bool()
            d_i = delta[i]
            a_def = torch.cat([read_def[L][i][m] for L in self.defense.sites], 0)
            a_att = torch.cat([_align(read_att[L][row], p)[m] for L in self.defense.sites], 0)
            diff = (a_att - a_def).norm().item()
            act_def = torch.cat([self.defense.readout_activations(L, read_def[L][i][m]) for L in self.defense.sites])
            act_att = torch.cat([self.defense.readout_activations(L, _align(read_att[L][row], p)[m])
                                 for L in self.defense.sites])
            off = act_def <= 0
            site_def = read_def[self.layer][i][m] if self.layer in read_def else torch.zeros(0)
            site_att = _align(read_att[self.layer][row], p)[m] if self.layer in read_att else torch.zeros(0)
            c1 = ((site_att - site_def).abs().max() / (site_def.pow(2).mean().sqrt() + 1e-6)).item() \
                if site_def.numel() else 0.0
            done[i] = ExampleOutcome(
                index=i, b_attacked=b, recovered=rec, steps_used=int(steps_used[i]), recovery_budget=budget,
                delta=d_i[batch.attention_mask[i].bool()].clone(),
                delta_rel=(d_i[attacked].norm() / h_norm[i][attacked].norm().clamp_min(1e-12)).item(),
                drift_abs=diff, drift_rel=diff / (a_def.norm().item() + 1e-6),
                reactivation=(act_att[off] > 0).float().mean().item() if off.any() else None,
                c1_change=c1, h_norm_mean=h_norm[i][attacked].mean().item(),
            )

        # budget used by the update after forward t; forward t scores the delta made under schedule[t - 1]
        schedule = [eps for eps in self.cfg.eps for _ in range(self.cfg.steps)]
        for t in range(len(schedule) + 1):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            sub = batch.select(idx)
            cols = slice(p - sub.input_ids.shape[1], p)
            d = delta[idx, cols].clone().requires_grad_(True)
            logits, seen_att = self._forward(sub, d, grad=True)
            b = self.task.behavior(logits, sub).detach()
            reads = self._readouts(seen_att)
            newly = b > 0
            final = t == len(schedule)
            budget = schedule[t - 1] if t > 0 else self.cfg.eps[0]
            for r, i in enumerate(idx.tolist()):
                if newly[r] or final:
                    finish(i, float(b[r]), bool(newly[r]), budget if newly[r] else None, reads, r)
                    active[i] = False
                    bar.update(1)
            if final or bool(newly.all()):
                break
            eps = schedule[t]
            self.task.attack_loss(logits, sub)[~newly].sum().backward()
            keep = ~newly
            rows, g = idx[keep], d.grad[keep]
            steps_used[rows] += 1
            hn = h_norm[rows, cols]
            if self.cfg.optimizer == "adam":
                direction = adam.direction(rows, cols, g) / math.sqrt(self.model.d_model)
            else:
                direction = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            new = delta[rows, cols] - self.cfg.lr * eps * hn[..., None] * direction
            delta[rows, cols] = self.project(new, hn, pos_mask[rows, cols], eps)
            bar.set_postfix(eps=eps, step=t + 1, active=int(active.sum()))
        return [done[i] for i in sorted(done)]


def _align(t: Tensor, p: int) -> Tensor:
    """Left-pad a sub-batch row [p', ...] back to the chunk's width p (sub-batches drop leading padding)."""
    missing = p - t.shape[0]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(missing, *t.shape[1:]), t], 0)
