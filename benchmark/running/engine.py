"""The flow of one run: fit the defense, score base and defended behavior, measure side effects, attack the valid
flips chunk by chunk (replaying each chunk's recovered ones), and write the run record. Chunks make a run
resumable and shardable (see :mod:`benchmark.running.shards`)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from benchmark import __version__
from benchmark.attacks import ATTACKS, AttackConfig, ExampleOutcome, RecoveryAttack, ResidualAttack, build_attack
from benchmark.modeling.base_residuals import BaseResiduals
from benchmark.errors import BenchmarkError, NonFiniteError
from benchmark.modeling.forward import (capture, compose, defense_edits, monitor_flags, next_token_kl, residual_prefix,
                                        run_edited, run_task, task_forward)
from benchmark.running.metrics import is_valid_flip
from benchmark.modeling.models import LoadedModel, dtype_name, load_model
from benchmark.running.records import (PATH_FIELDS, RECORDS_DIR, SCHEMA_VERSION, git_state, load_record, provenance,
                               record_path, working_tree_hash, write_record)
from benchmark.registry import same_definition
from benchmark.running.replay import PARTS, margin_shares, replay_parts, stack_deltas
from benchmark.modeling.saes import LoadedSAE
from benchmark.running.shards import (WHOLE, PartialRun, Shard, chunk_rows, fingerprint, partial_path,
                                      recorded_fingerprint)
from defenses.base import DEFENSES, Defense, FitContext, abstained
from tasks.base import TASKS, PromptBatch, TaskSuite


def shared_prefix(model: LoadedModel, task: TaskSuite, defense: Defense) -> BaseResiduals | None:
    """The store of undefended residuals at the lowest layer a run edits or reads (the defense's first site, or a
    residual-reading suite's read layer), which every scoring pass of the run starts from; None when nothing is
    shared (a suite reading logits against a defense without sites, or one that generates)."""
    touched = [*defense.sites, *([] if task.read_layer is None else [task.read_layer])]
    if not touched or task.score_runs_new_tokens:
        return None
    return BaseResiduals(model, min(touched))


@torch.no_grad()
def behavior_scores(model: LoadedModel, task: TaskSuite, batch: PromptBatch, defense: Defense | None,
                    chunk: int = 64, residuals: BaseResiduals | None = None) -> Tensor:
    """Judged behavior score [b] of every example (:meth:`TaskSuite.score`), with the defense active when given
    (starting from ``residuals`` when given, see :func:`shared_prefix`; 0, a null readout, where its monitor makes it
    abstain); without a defense, the suite's :meth:`TaskSuite.known_base_scores` when it has them."""
    known = task.known_base_scores(batch) if defense is None else None
    if known is None:
        forward = task_forward(model, task, lambda part: defense_edits(defense, part), residuals)
        known = batch.map_length_chunks(chunk, lambda part: task.score(forward, part))
        if defense is not None and defense.monitor_sites:  # an input the monitor flags gets a null readout
            known = abstained(known, clean_flags(model, defense, batch, chunk, residuals))
    bad = ~torch.isfinite(known)
    if bool(bad.any()):
        who = "the undefended model" if defense is None else f"defense '{defense.name}' (sites {defense.sites})"
        raise NonFiniteError(f"the behavior score is NaN or inf with {who}",
                             [batch.ids[i] for i in bad.nonzero()[:, 0].tolist()],
                             "usually the model's output or the suite's score function", suite=task.name)
    return known


@torch.no_grad()
def clean_flags(model: LoadedModel, defense: Defense, batch: PromptBatch, chunk: int = 64,
                residuals: BaseResiduals | None = None) -> Tensor:
    """[b] bool: the inputs of ``batch`` (clean: no attack) on which ``defense``'s monitor makes it abstain; their
    share on the suite's test and control inputs is the monitor's false-positive rate."""
    return batch.map_length_chunks(chunk, lambda part: monitor_flags(
        model, defense, part, defense_edits(defense, part), residual_prefix(residuals, part)))


@torch.no_grad()
def defense_edit_size(model: LoadedModel, defense: Defense, batch: PromptBatch, chunk: int = 64,
                      residuals: BaseResiduals | None = None) -> float | None:
    """Mean over sites of ``||D(h) - h|| / ||h||`` on the editable positions of ``batch`` (size of the defense)."""
    if not defense.sites:
        return None
    ratios = {L: [0.0, 0.0] for L in defense.sites}
    for part in batch.length_chunks(chunk):
        before, after = {}, {}
        edits = {L: compose(capture(before, L), e, capture(after, L)) for L, e in defense_edits(defense, part).items()}
        run_edited(model, part, edits, read_layer=max(edits), prefix=residual_prefix(residuals, part))
        m = part.token_mask
        for L in defense.sites:
            ratios[L][0] += float((after[L] - before[L])[m].pow(2).sum())
            ratios[L][1] += float(before[L][m].pow(2).sum())
    return sum((num / den) ** 0.5 for num, den in ratios.values()) / len(ratios)


@contextmanager
def _phase(name: str):
    """Print how long a phase of the run took, with or without progress bars (on stdout: stderr is for the bars
    and for errors)."""
    t0 = time.time()
    yield
    print(f"  {name}: {time.time() - t0:.1f} s", flush=True)


def evaluate(
    model: LoadedModel | str,
    defense: str | Defense,
    task: str,
    attack: AttackConfig = AttackConfig(),
    defense_params: dict | None = None,
    sae_dir: Path | None = None,
    records_dir: Path | str = RECORDS_DIR,
    progress: bool = True,
    command: str = "",
    shard: Shard = WHOLE,
    limit: int | None = None,
) -> tuple[dict, Path]:
    """Run ``defense`` on suite ``task`` against ``attack`` and write the run record; returns the record and its path.

    ``model``: a :class:`LoadedModel` or a name :func:`~benchmark.modeling.models.load_model` takes (``"tiny"``: the test
    stand-in, in seconds). ``defense``: a registered name, built with ``defense_params``, or a :class:`Defense`
    instance built with ``create(...)`` (fitted here). ``sae_dir``: the SAEs (default: the model's own).
    ``records_dir``: where the record goes, ``<records_dir>/<model>/<defense>/<task>__<mode>.json``. ``limit``: score
    the first ``limit`` test examples only, and measure the side effect on the first ``limit`` control texts (a cheap
    check; the record says so and is never ranked: see
    :func:`benchmark.running.records.comparable`). ``progress``: progress bars (the stages are printed either way).

    Finished chunks of an interrupted run with the same fingerprint are not run again; a finished record with
    it is returned as it is. With ``shard`` i/n only that shard's chunks run, and the return value is the
    shard's partial run and its path (``benchmark merge`` makes the record).
    """
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit must be a number of test examples >= 1, got {limit}")
    loaded = load_model(model) if isinstance(model, str) else model
    try:
        with loaded.on_device():  # every tensor the run makes lives on the model's device
            return _run(loaded, build_defense(defense, defense_params), task, attack, sae_dir, Path(records_dir),
                        progress, command, shard, limit)
    except NonFiniteError as err:  # raised where the NaN appeared, which may not know the suite
        raise err.in_suite(task) from None


@dataclass(frozen=True)
class RunSpec:
    """One run of a command, as an executor receives it: registered ``defense`` (a submission's manifest name, with
    ``submission`` its folder, whose code the process that runs it registers first) built with ``params``, on
    ``suite`` against ``attack``, with the SAEs of ``sae_dir`` (None: the model's own), on the first ``limit`` test
    examples (None: every one)."""

    defense: str
    suite: str
    attack: AttackConfig
    params: dict = field(default_factory=dict)
    submission: str | None = None
    sae_dir: Path | None = None
    limit: int | None = None

    def label(self) -> str:
        return f"{self.defense} on {self.suite}, attack {self.attack.mode}"

    def record_path(self, model_name: str, root: Path) -> Path:
        return record_path(model_name, self.defense, self.suite, self.attack.mode, root, self.limit)

    def prepare(self, model: LoadedModel) -> PreparedRun:
        """:func:`prepare_run` of this run on ``model``."""
        if self.submission is not None:
            from benchmark.running import submissions

            if submissions.active(self.submission) is None:  # registered in this process once
                submissions.register(self.submission)
        return prepare_run(model, build_defense(self.defense, self.params), self.suite, self.attack, self.sae_dir,
                           self.limit)


def build_defense(defense: str | Defense, params: dict | None = None) -> Defense:
    """The unfitted defense of a run: a registered name built with ``params``, or a :class:`Defense` instance as it
    is (it must carry what its record needs: ``name`` and ``version``, and ``params`` from ``create``)."""
    if isinstance(defense, str):
        return DEFENSES.get(defense).create(**(params or {}))
    cls = type(defense).__qualname__
    if not isinstance(defense, Defense):
        raise BenchmarkError(f"defense must be a registered name or a defenses.base.Defense instance, got a {cls}")
    if params:
        raise BenchmarkError(f"defense_params go to a registered defense's constructor; build the instance with "
                             f"{cls}.create(...) instead")
    missing = [a for a in ("name", "version") if not isinstance(getattr(defense, a, None), str)]
    if missing:
        raise BenchmarkError(f"{cls} needs class attributes {' and '.join(missing)} (strings) for its run record, "
                             "e.g. name = 'my_defense' and version = '0.1'")
    if not isinstance(getattr(defense, "params", None), dict):
        raise BenchmarkError(f"build the {cls} with {cls}.create(...): it records the constructor's arguments as "
                             "the defense's parameters")
    owner = DEFENSES.get(defense.name) if defense.name in DEFENSES.names() else type(defense)
    if not same_definition(owner, type(defense)):  # the same class, or defined again by a re-run notebook cell
        raise BenchmarkError(f"defense name '{defense.name}' belongs to the registered {owner.__qualname__}; give {cls} "
                             "a name of its own (a class attribute name = '...', or register it under one)")
    return defense


def _run(model: LoadedModel, defense: Defense, task_name: str, attack_cfg: AttackConfig, sae_dir: Path | None,
         records_root: Path, progress: bool, command: str, shard: Shard, limit: int | None) -> tuple[dict, Path]:
    """:func:`evaluate` with its arguments resolved."""
    started = time.time()
    git = git_state()  # the code that runs is the code at the start, whatever changes meanwhile
    code = code_state(git)
    run = prepare_run(model, defense, task_name, attack_cfg, sae_dir, limit)
    run_id = fingerprint(run.head, attack_cfg.to_record(), code)
    path = record_path(model.name, defense.name, task_name, attack_cfg.mode, records_root, limit)
    if recorded_fingerprint(path) == run_id:
        print(f"done already: {path} comes from this very run (same fingerprint); delete it to run again", flush=True)
        return load_record(path), path
    run.measure()
    partial = PartialRun.resume(partial_path(path, shard), run_id, shard, run.n_chunks, run.head,
                                lambda seconds: provenance(seconds, command, git, run_id, model, run.fit_seconds),
                                started)
    for c in partial.todo():
        with _phase(f"chunk {c + 1} of {run.n_chunks}"):
            partial.add(c, run.chunk(c, progress))
    if shard != WHOLE:
        return partial.save(), partial.path
    record = partial.record()
    write_record(record, path)
    partial.path.unlink(missing_ok=True)
    return record, path


def code_state(git: tuple[str, bool]) -> dict:
    """The code part of a run's fingerprint: commit, dirty flag and a hash of uncommitted changes (``git``:
    :func:`~benchmark.running.records.git_state`)."""
    return {"commit": git[0], "dirty": git[1], "diff": working_tree_hash() if git[1] else None}


@dataclass
class PreparedRun:
    """A run up to its attack (:func:`prepare_run`): the defense fitted, the test examples scored, the valid flips in
    length order, the attack built and the record's ``head``. Its chunks (:meth:`chunk`) can then run in any order,
    in any process that prepared the same run: their results depend on the chunk alone."""

    model: LoadedModel
    task: TaskSuite
    defense: Defense
    cfg: AttackConfig
    test: PromptBatch
    flips: PromptBatch
    attack: RecoveryAttack | None
    residuals: BaseResiduals | None
    head: dict
    limit: int | None
    fit_seconds: float | None = None  # how long fitting the defense took (provenance.fit_seconds)

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.flips) / self.cfg.batch_size)

    def measure(self) -> None:
        """Add the head's side effect (on the first ``limit`` control texts), defense edit size and task metrics
        (the attack does not need them)."""
        model, task, defense, residuals = self.model, self.task, self.defense, self.residuals
        with _phase("side effect, edit size and task metrics"):
            defended = lambda part: defense_edits(defense, part)  # noqa: E731
            control = task.control_batch()
            if self.limit is not None and self.limit < len(control):
                control = control.select(list(range(self.limit)))
            self.head["side_effect"] = (next_token_kl(model, control, defended, residuals=residuals)
                                        if defense.sites else 0.0)
            self.head["defense_edit_rel"] = defense_edit_size(model, defense, self.test, residuals=residuals)
            if defense.monitor_sites:
                self.head["monitor"] = {f"monitor_fpr_{name}": float(clean_flags(model, defense, inputs,
                                                                                 residuals=residuals).float().mean())
                                        for name, inputs in (("test", self.test), ("control", control))}
            self.head["task_metrics"] = task.task_metrics(task_forward(model, task, lambda part: {}, residuals),
                                                          task_forward(model, task, defended, residuals))

    def chunk(self, index: int, progress: bool) -> list[dict]:
        """The results of attack chunk ``index`` (:func:`attack_chunk`)."""
        rows = chunk_rows(index, self.cfg.batch_size, len(self.flips))
        return attack_chunk(self.attack, self.flips.select(rows), progress, self.residuals)


def prepare_run(model: LoadedModel, defense: Defense, task_name: str, attack_cfg: AttackConfig,
                sae_dir: Path | None, limit: int | None) -> PreparedRun:
    """Fit ``defense`` (unfitted, see :func:`build_defense`) on suite ``task_name``, score the first ``limit`` (None:
    every) test examples with and without it, and build the attack on the valid flips."""
    torch.manual_seed(attack_cfg.seed)
    task = TASKS.get(task_name)(model.tokenizer)
    with _phase("prepare task"):
        task.prepare(model)
    with _phase("fit defense"):
        fit_started = time.time()
        ctx = FitContext(model, task, sae_dir)
        defense.fit(ctx)
        for layer in defense.sites:
            ctx.check_site(layer)
        fit_seconds = time.time() - fit_started
    test = task.encode(task.examples("test")[:limit])
    residuals = shared_prefix(model, task, defense)
    with _phase("score base and defended"):
        scored = [{"id": i, "b_base": float(b), "b_defended": float(d)} for i, b, d in
                  zip(test.ids, behavior_scores(model, task, test, None, residuals=residuals),
                      behavior_scores(model, task, test, defense, residuals=residuals))]
    # attacked in chunks of similar length (less padding); results go back to test order by id
    flips = test.select([r for r in test.length_order() if is_valid_flip(scored[r]["b_base"], scored[r]["b_defended"])])
    attack = build_attack(model, defense, task, attack_cfg) if len(flips) else None
    head = run_head(model, defense, task, attack_cfg, attack, scored, limit)
    return PreparedRun(model, task, defense, attack_cfg, test, flips, attack, residuals, head, limit, fit_seconds)


def run_head(model: LoadedModel, defense: Defense, task: TaskSuite, cfg: AttackConfig,
             attack: RecoveryAttack | None, scored: list[dict], limit: int | None = None) -> dict:
    """Every part of the record that does not come from the attack: model, SAEs, fitted defense, task (with the
    ``limit`` on test examples, if any), the attack's settings, and each test example's base and defended scores
    (``examples``). The engine adds ``side_effect``, ``defense_edit_rel`` and ``task_metrics``;
    :func:`benchmark.running.records.build_record` the rest."""
    kind = ATTACKS.get(cfg.mode)
    settings = {"mode": cfg.mode, "threat_model": kind.threat_model, "steps": cfg.steps, "lr": cfg.lr,
                "eps_rel": cfg.eps[-1], "eps_sweep": list(cfg.eps), "positions": cfg.positions, "jacobian_rank": None,
                "seed": cfg.seed, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "patience": cfg.patience}
    if attack is not None and attack.layer is not None:
        settings["layer"] = attack.layer
    settings.update(kind.settings(cfg, model))
    if cfg.params:
        settings["params"] = dict(cfg.params)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark_version": __version__,
        "model": {"name": model.name, "revision": model.revision,
                  # float32 runs keep the fingerprint they had before the dtype was a choice
                  **({} if model.dtype == torch.float32 else {"dtype": dtype_name(model.dtype)})},
        "saes": [_describe_sae(s) for s in defense.saes_used()],
        "defense": {"name": defense.name, "version": defense.version, "params": defense.params,
                    "defended": defense.defended()},
        "task": {"name": task.name, "version": task.version, "data_hash": task.data_hash(), "split": "test",
                 "split_hashes": task.split_hashes(), **({} if limit is None else {"limit": limit})},
        "attack": settings,
        "examples": scored,
    }


def attack_chunk(attack: RecoveryAttack, batch: PromptBatch, progress: bool,
                 residuals: BaseResiduals | None = None) -> list[dict]:
    """Attack one chunk of valid flips and replay its recovered ones (from ``residuals``, the run's store of
    undefended residuals, when given): one result per example, in order.

    A result holds the record's per-example attack fields (:data:`benchmark.running.records.ATTACK_FIELDS`) and what the
    record's attack section needs (``h_norm_mean``, ``jacobian_rank``, ``jacobian_exact``), all JSON values.
    """
    outcomes = attack.run(batch, progress=progress)
    recovered = [o.index for o in outcomes if o.recovered]
    paths: dict[int, dict] = {}
    if recovered and isinstance(attack, ResidualAttack):  # path replay splits a residual delta
        paths = path_attribution(attack, batch.select(recovered), [outcomes[i] for i in recovered], residuals)
        paths = dict(zip(recovered, paths)) if paths else {}
    return [_result(batch.ids[o.index], o, paths.get(o.index, {})) for o in outcomes]


def path_attribution(attack: ResidualAttack, batch: PromptBatch, outcomes: list[ExampleOutcome],
                     residuals: BaseResiduals | None) -> list[dict] | None:
    """Per recovered example of ``batch`` (with its ``outcomes``), the record's path fields
    (:data:`benchmark.running.records.PATH_FIELDS`), or None where the defense has no SAE at the attacked site.

    On the ``delta`` that recovered it: each part's share of the margin gain and the binary replay (judged). Then
    the margin replay: the attack continues at the example's recovery budget until its margin reaches the
    undefended model's margin on the same example (at most ``steps`` more updates), and the parts of
    that ``delta`` are replayed again (shares, and whether the part alone gives a margin above 0).
    """
    model, defense, task, layer = attack.model, attack.defense, attack.task, attack.layer
    delta = stack_deltas(batch, [o.delta for o in outcomes])
    margins = replay_parts(model, defense, task, batch, delta, layer, residuals, judged=False)
    if margins is None:
        return None
    judged = replay_parts(model, defense, task, batch, delta, layer, residuals) if task.confirms else margins
    shares = margin_shares(margins)
    with torch.no_grad():
        target = task.behavior(run_task(model, task, batch, {}, prefix=residual_prefix(residuals, batch)), batch)
    eps = torch.tensor([o.recovery_budget for o in outcomes])
    pushed, reached = attack.push_to_margin(batch, delta, eps, target)
    at_margin = replay_parts(model, defense, task, batch, pushed, layer, residuals, judged=False)
    margin_shared = margin_shares(at_margin)
    out = []
    for j in range(len(batch)):
        row = {"residual_replay": bool(judged["error"][j] > 0), "latent_replay": bool(judged["latent"][j] > 0),
               "margin_target": float(target[j]), "margin_b": float(reached[j]),
               "margin_replay_error": bool(at_margin["error"][j] > 0),
               "margin_replay_latent": bool(at_margin["latent"][j] > 0)}
        for part in PARTS:
            row[f"share_{part}"] = _finite_or_none(shares[part][j])
            row[f"margin_share_{part}"] = _finite_or_none(margin_shared[part][j])
        out.append(row)
    return out


def _finite_or_none(x: Tensor) -> float | None:
    return float(x) if bool(torch.isfinite(x)) else None


def _result(example_id: str, o: ExampleOutcome, path: dict) -> dict:
    return {"id": example_id, "b_attacked": o.b_attacked, "recovered": o.recovered, "steps_used": o.steps_used,
            "recovery_budget": o.recovery_budget, "delta_rel": o.delta_rel, "drift_abs": o.drift_abs,
            "drift_rel": o.drift_rel, "reactivation": o.reactivation, "c1_change": o.c1_change,
            "jacobian_residual_drift": o.jacobian_residual, **{k: path.get(k) for k in PATH_FIELDS},
            "h_norm_mean": o.h_norm_mean, "jacobian_rank": o.jacobian_rank, "jacobian_exact": o.jacobian_exact,
            "flagged": o.flagged}


def _describe_sae(sae: LoadedSAE) -> dict:
    from benchmark.modeling.saes import weights_hash

    out = sae.describe()
    digest = weights_hash(sae)
    if digest:
        out["weights_hash"] = digest
    return out
