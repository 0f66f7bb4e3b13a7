"""The flow of one run: fit the defense, score base and defended behavior, attack the valid flips, replay the
recovered ones, measure side effects, and write the run record."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from benchmark import __version__
from benchmark.attack import AttackConfig, ExampleOutcome, RecoveryAttack, defense_edits
from benchmark.forward import capture, compose, next_token_kl, run_edited, task_forward
from benchmark.metrics import budget_curve, summarize
from benchmark.models import LoadedModel
from benchmark.records import RECORDS_DIR, SCHEMA_VERSION, git_state, provenance, record_path, write_record
from benchmark.replay import replay_parts, stack_deltas
from benchmark.saes import LoadedSAE
from defenses.base import DEFENSES, Defense, FitContext
from tasks.base import TASKS, PromptBatch, TaskSuite


@torch.no_grad()
def behavior_scores(model: LoadedModel, task: TaskSuite, batch: PromptBatch, defense: Defense | None,
                    chunk: int = 64) -> Tensor:
    """Judged behavior score [b] of every example (:meth:`TaskSuite.score`), with the defense active when given."""
    forward = task_forward(model, task, lambda part: defense_edits(defense, part))
    return torch.cat([task.score(forward, part) for part in batch.chunks(chunk)])


@torch.no_grad()
def defense_edit_size(model: LoadedModel, defense: Defense, batch: PromptBatch, chunk: int = 64) -> float | None:
    """Mean over sites of ``||D(h) - h|| / ||h||`` on the editable positions of ``batch`` (size of the defense)."""
    if not defense.sites:
        return None
    ratios = {L: [0.0, 0.0] for L in defense.sites}
    for part in batch.chunks(chunk):
        before, after = {}, {}
        edits = {L: compose(capture(before, L), e, capture(after, L)) for L, e in defense_edits(defense, part).items()}
        run_edited(model, part, edits, read_layer=max(edits))
        m = part.token_mask
        for L in defense.sites:
            ratios[L][0] += float((after[L] - before[L])[m].pow(2).sum())
            ratios[L][1] += float(before[L][m].pow(2).sum())
    return sum((num / den) ** 0.5 for num, den in ratios.values()) / len(ratios)


@contextmanager
def _phase(name: str, show: bool):
    """Print how long a phase of the run took (to stderr, beside the progress bars)."""
    t0 = time.time()
    yield
    if show:
        print(f"  {name}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)


def evaluate(
    model: LoadedModel,
    defense_name: str,
    task_name: str,
    attack_cfg: AttackConfig,
    defense_params: dict | None = None,
    sae_dir: Path | None = None,
    records_root: Path = RECORDS_DIR,
    progress: bool = True,
    command: str = "",
) -> tuple[dict, Path]:
    """Run one (model, defense, task, attack mode) and write its record; returns the record and its path."""
    started = time.time()
    git = git_state()  # the code that runs is the code at the start, whatever changes meanwhile
    torch.manual_seed(attack_cfg.seed)
    task = TASKS.get(task_name)(model.tokenizer)
    defense = DEFENSES.get(defense_name).create(**(defense_params or {}))
    with _phase("prepare task", progress):
        task.prepare(model)
    with _phase("fit defense", progress):
        defense.fit(FitContext(model, task, sae_dir))
    test = task.encode(task.examples("test"))
    with _phase("score base and defended", progress):
        b_base = behavior_scores(model, task, test, None)
        b_def = behavior_scores(model, task, test, defense)
    valid = (b_base > 0) & (b_def <= 0)
    flip_idx = valid.nonzero()[:, 0]
    flips = test.select(flip_idx)
    attack = RecoveryAttack(model, defense, task, attack_cfg) if len(flip_idx) else None
    outcomes = attack.run(flips, progress=progress) if attack else []

    rec_rows = [o.index for o in outcomes if o.recovered]
    replays = None
    if rec_rows and attack.layer is not None:  # path replay splits a residual delta (not the soft suffix)
        rec_batch = flips.select(rec_rows)
        delta = stack_deltas(rec_batch, [outcomes[i].delta for i in rec_rows])
        with _phase("path replay", progress):
            replays = replay_parts(model, defense, task, rec_batch, delta, attack.layer)
    replay_of = {}
    if replays is not None:
        for j, i in enumerate(rec_rows):
            replay_of[i] = {"residual_replay": bool(replays["error"][j] > 0), "latent_replay": bool(replays["latent"][j] > 0)}

    by_test_row = {int(flip_idx[o.index]): o for o in outcomes}
    rows = []
    for r, ex_id in enumerate(test.ids):
        o = by_test_row.get(r)
        row = {"id": ex_id, "b_base": float(b_base[r]), "b_defended": float(b_def[r]),
               "b_attacked": o.b_attacked if o else None, "valid_flip": bool(valid[r]),
               "recovered": bool(o and o.recovered), "steps_used": o.steps_used if o else 0,
               "recovery_budget": o.recovery_budget if o else None, "delta_rel": o.delta_rel if o else None,
               "drift_abs": o.drift_abs if o else None, "drift_rel": o.drift_rel if o else None,
               "reactivation": o.reactivation if o else None, "c1_change": o.c1_change if o else None,
               "jacobian_residual_drift": o.jacobian_residual if o else None,
               "residual_replay": None, "latent_replay": None}
        if o is not None and o.index in replay_of:
            row.update(replay_of[o.index])
        rows.append(row)

    replay_rates = {}
    if replays is not None:
        n = len(rec_rows)
        replay_rates = {"residual": sum(v["residual_replay"] for v in replay_of.values()) / n,
                        "latent": sum(v["latent_replay"] for v in replay_of.values()) / n}
    control = task.control_batch()
    with _phase("side effect and edit size", progress):
        side_effect = next_token_kl(model, control, lambda part: defense_edits(defense, part)) if defense.sites else 0.0
        edit_size = defense_edit_size(model, defense, test)
    counts, metrics = summarize(rows, side_effect, edit_size, replay_rates)
    record = {
        "schema_version": SCHEMA_VERSION,
        "benchmark_version": __version__,
        "model": {"name": model.name, "revision": model.revision},
        "saes": [_describe_sae(s) for s in defense.saes_used()],
        "defense": {"name": defense.name, "version": defense.version, "params": defense.params,
                    "defended": defense.defended()},
        "task": {"name": task.name, "version": task.version, "data_hash": task.data_hash(), "split": "test",
                 "split_hashes": task.split_hashes()},
        "attack": attack_section(attack_cfg, attack, outcomes),
        "counts": counts,
        "metrics": metrics,
        "budget_curve": budget_curve(rows, attack_cfg.eps),
        "examples": rows,
        "provenance": provenance(time.time() - started, command, git),
    }
    path = record_path(model.name, defense.name, task.name, attack_cfg.mode, records_root)
    write_record(record, path)
    return record, path


def attack_section(cfg: AttackConfig, attack: RecoveryAttack | None, outcomes: list[ExampleOutcome]) -> dict:
    """The record's ``attack`` object: the settings, plus what the mode used.

    ``eps_abs`` is the largest relative budget times the mean norm of the perturbed value (residual at the
    attacked site, or the suffix's initial embedding). ``jacobian_rank`` (mode jacobian): the largest rank of the
    cross-site subspace projected out of an example's ``delta``; ``jacobian_estimate`` says whether it came from
    the exact Jacobian, the randomized estimate with ``jacobian_probes`` probes, or both (different chunks).
    """
    h_norms = [o.h_norm_mean for o in outcomes]
    eps_rel = cfg.eps[-1]
    out = {"mode": cfg.mode, "steps": cfg.steps, "lr": cfg.lr,
           "eps_abs": eps_rel * (sum(h_norms) / len(h_norms) if h_norms else 0.0), "eps_rel": eps_rel,
           "eps_sweep": list(cfg.eps), "positions": cfg.positions, "jacobian_rank": None,
           "seed": cfg.seed, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size}
    if attack is not None and attack.layer is not None:
        out["layer"] = attack.layer
    if cfg.mode == "jacobian":
        exact = {o.jacobian_exact for o in outcomes}
        out.update(jacobian_probes=cfg.jacobian_rank, jacobian_exact_rows=cfg.jacobian_exact_rows,
                   jacobian_estimate=None if not exact else "mixed" if len(exact) > 1 else
                   "exact" if exact == {True} else "randomized")
        if outcomes:
            out["jacobian_rank"] = max(o.jacobian_rank for o in outcomes)
    if cfg.mode == "soft_suffix":
        out["suffix_len"] = cfg.suffix_len
        if attack is not None:
            out["suffix_init"] = attack.suffix_text
    return out


def _describe_sae(sae: LoadedSAE) -> dict:
    from benchmark.saes import weights_hash

    out = sae.describe()
    digest = weights_hash(sae)
    if digest:
        out["weights_hash"] = digest
    return out
