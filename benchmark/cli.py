"""Command line: ``benchmark evaluate | battery | merge | validate | leaderboard | defenses | tasks | train-saes``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmark.allocator import keep_freed_memory
from benchmark.errors import BenchmarkError

if TYPE_CHECKING:  # the commands import what they use when they run, so `--help` stays fast
    from benchmark.running.engine import RunSpec
    from benchmark.running.shards import Shard


def _parse_value(text: str):
    """``-D key=value`` values: JSON where it parses (numbers, lists, null, true/false), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_params(items: list[str], what: str = "defense parameter", flag: str = "-D k=32") -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchmarkError(f"{what} '{item}' is not key=value (example: {flag})")
        params[key] = _parse_value(value)
    return params


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return int(text)


#: ``--defense reference``: every suite runs its own reference defense (``TaskSuite.reference_defense``)
REFERENCE = "reference"


def _plan(args: argparse.Namespace) -> list[RunSpec] | int:
    """The runs (:class:`~benchmark.running.engine.RunSpec`) of ``benchmark evaluate`` arguments, every name and
    parameter checked before a model loads; or, for a submission with the serial executor, the exit status of its
    evaluation in a child process (which comes back here with the submission registered)."""
    from benchmark.running import submissions
    from benchmark.attacks import ATTACKS, AttackConfig
    from benchmark.running.engine import RunSpec
    from benchmark.running.shards import Shard
    from defenses import DEFENSES
    from defenses.base import check_params
    from tasks import TASKS

    shard = Shard.parse(args.shard)
    if args.executor == "ray" and shard.count > 1:
        raise BenchmarkError("--shard is for splitting a run by hand; with --executor ray the run's chunks go to "
                             "the workers and the record is written directly: drop --shard")
    args.tasks = args.tasks or TASKS.names()
    for t in args.tasks:
        TASKS.get(t)
    params = _parse_params(args.param)
    for m in args.attack:  # fail on a bad attack name before the model loads
        ATTACKS.get(m)
    attack_params = tuple(sorted(_parse_params(args.attack_param, "attack parameter", "-A weight=0.5").items()))
    cfgs = [AttackConfig(mode=m, eps=args.eps, steps=args.steps, lr=args.lr, positions=args.positions,
                         optimizer=args.optimizer, seed=args.seed, batch_size=args.batch_size, layer=args.attack_layer,
                         patience=args.patience or None,
                         jacobian_rank=args.jacobian_rank, jacobian_exact_rows=args.jacobian_exact_rows,
                         suffix_len=args.suffix_len, params=attack_params)
            for m in args.attack]
    submission = None
    if args.defense == REFERENCE:
        if params:
            raise BenchmarkError("-D parameters belong to one named defense; with --defense reference every suite "
                                 "runs its reference defense with its defaults")
        runs = [(TASKS.get(t).reference_defense, t) for t in args.tasks]
    else:
        if submissions.is_submission_ref(args.defense):
            sub = submissions.active(args.defense)
            if sub is not None:
                args.defense, params = sub.name, {**sub.params(), **params}
            elif args.executor == "serial":  # run the submitted code in a child process with a time limit
                return submissions.evaluate_in_child(args.defense, args.argv, args.timeout)
            else:  # the Ray workers run the submitted code; here only its manifest is read
                manifest = submissions.load_manifest(args.defense)
                submission = str(Path(args.defense).resolve())
                args.defense, params = manifest["name"], {**manifest["parameters"], **params}
        runs = [(args.defense, t) for t in args.tasks]
    if submission is None:
        for defense, _ in runs:  # fail on a bad name or parameter before the model loads
            check_params(DEFENSES.get(defense), params)
    return [RunSpec(defense, task, cfg, params, submission, args.sae_dir, args.limit)
            for defense, task in runs for cfg in cfgs]


def _to_run(specs: list[RunSpec], model: str, records_dir: str, keep_existing: bool) -> list[RunSpec]:
    """``specs`` less repeats, and less those whose record exists if ``keep_existing`` (a line each)."""
    from benchmark.modeling.models import model_name
    from benchmark.running.records import load_record

    name, root, out = model_name(model), Path(records_dir), {}
    for spec in specs:
        kept = spec.record_path(name, root)
        if kept in out:
            continue
        if keep_existing and kept.exists():
            commit = load_record(kept)["provenance"]["git_commit"][:10]
            print(f"== {spec.label()}: kept {kept} (commit {commit})", flush=True)
            continue
        out[kept] = spec
    return list(out.values())


def cmd_evaluate(args) -> int | None:
    from benchmark.running.shards import Shard

    specs = _plan(args)
    if isinstance(specs, int):
        return specs
    specs = _to_run(specs, args.model, args.records_dir, args.keep_existing)
    if args.remote and (args.device or args.dtype):
        raise BenchmarkError("--device and --dtype choose where the model runs here; with --remote it runs on NDIF")
    if args.executor == "ray":
        if args.remote:
            raise BenchmarkError("--remote runs every forward pass on NDIF, leaving nothing for Ray workers to do: "
                                 "drop --executor ray")
        return _on_ray(specs, args)
    return _serially(specs, args, Shard.parse(args.shard))


def _serially(specs: list[RunSpec], args: argparse.Namespace, shard: Shard) -> int:
    """Run ``specs`` one after another in this process; a run that fails with a :class:`BenchmarkError` is reported
    and the others go on (status 2 if any failed)."""
    import torch

    from benchmark.running.engine import evaluate
    from benchmark.modeling.models import load_model
    from benchmark.running.records import SHARD_FILE, summary

    if args.threads:
        torch.set_num_threads(args.threads)
    model = (load_model(args.model, device=args.device, dtype=args.dtype, remote=args.remote) if specs else None)
    command = "benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    failed = 0
    for spec in specs:
        t0 = time.time()
        print(f"== {spec.label()}" + (f", shard {shard}" if shard.count > 1 else ""), flush=True)
        try:
            out, path = evaluate(model, spec.defense, spec.suite, spec.attack, spec.params, spec.sae_dir,
                                 Path(args.records_dir), progress=not args.quiet, command=command, shard=shard,
                                 limit=spec.limit)
        except BenchmarkError as err:
            failed += 1
            print(f"error: {spec.label()}: {err}", file=sys.stderr, flush=True)
            continue
        if SHARD_FILE.match(path.name):
            print(f"   shard {shard}: {len(out['chunks'])} of {out['chunks_total']} chunks; "
                  f"{time.time() - t0:.0f} s -> {path} (`benchmark merge` makes the record)", flush=True)
        else:
            print(f"   {summary(out)}; {time.time() - t0:.0f} s -> {path}", flush=True)
    return 2 if failed else 0


def _on_ray(specs: list[RunSpec], args: argparse.Namespace) -> int:
    """Run ``specs`` on Ray workers (:mod:`benchmark.running.ray_executor`) as ``args`` (of ``evaluate`` or
    ``battery``) say; status 2 if any run failed."""
    from benchmark.running.ray_executor import RayOptions, run_on_ray

    options = RayOptions(model=args.model, threads=args.threads or 1, workers=args.workers, address=args.ray_address,
                         device=args.device, dtype=args.dtype)
    command = "benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return 2 if run_on_ray(specs, options, Path(args.records_dir), command, progress=not args.quiet) else 0


def cmd_battery(args) -> int | None:
    from benchmark.running.battery import PLAN, coverage
    from benchmark.modeling.models import model_name

    code = None
    if not args.list:
        extra = ["--keep-existing", "--records-dir", args.records_dir, "--model", args.model,
                 *(["--limit", str(args.limit)] if args.limit else []), *(["--quiet"] if args.quiet else []),
                 *(["--threads", str(args.threads)] if args.threads else []),
                 *(["--device", args.device] if args.device else []), *(["--dtype", args.dtype] if args.dtype else [])]
        if args.executor == "ray":  # every planned run at once, so the workers always have work
            parser = build_parser()
            steps = [parser.parse_args(step.argv() + extra + ["--executor", "ray"]) for step in PLAN]
            specs = [spec for step in steps for spec in _plan(step)]
            code = _on_ray(_to_run(specs, args.model, args.records_dir, keep_existing=True), args)
        else:  # a run that fails is reported and the battery goes on
            code = max(main(step.argv() + extra) for step in PLAN)
    have = coverage(Path(args.records_dir), model_name(args.model), PLAN)
    for (defense, suite, mode), path in have.items():
        print(f"{'recorded' if path else 'missing ':8s}  {defense:24s} {suite:9s} {mode}")
    print(f"{sum(p is not None for p in have.values())} of {len(have)} planned runs have a record", flush=True)
    return code


def cmd_merge(args) -> None:
    from benchmark.running.records import summary
    from benchmark.running.shards import merge, shard_files

    command = "benchmark " + " ".join(shlex.quote(a) for a in args.argv)
    for record_path, files in sorted(shard_files([Path(p) for p in args.paths]).items()):
        record = merge(record_path, files, command)
        print(f"   {summary(record)}; merged {len(files)} shards -> {record_path}", flush=True)
        if not args.keep_shards:
            for f in files:
                f.unlink()


def cmd_leaderboard(args) -> None:
    from benchmark.reporting.leaderboard import LEADERBOARD_DIR, README, write_leaderboard

    out_dir = Path(args.out_dir)
    readme = Path(args.readme) if args.readme else README if out_dir.resolve() == LEADERBOARD_DIR.resolve() else None
    for path in write_leaderboard(Path(args.records_dir), out_dir, readme):
        print(f"wrote {path}")


def cmd_defenses(args) -> None:
    from defenses import DEFENSES

    for name, cls in DEFENSES.items():
        print(f"{name:24s} {getattr(cls, 'description', '')}")
    _print_problems(DEFENSES.problems())


def cmd_attacks(args) -> None:
    from benchmark.attacks import ATTACKS

    for name, cls in ATTACKS.items():
        print(f"{name:14s} {cls.threat_model:20s} {'+'.join(cls.claims):12s} {cls.description}")
    _print_problems(ATTACKS.problems())


def cmd_tasks(args) -> None:
    from tasks import TASKS

    for name, cls in TASKS.items():
        print(f"{name:12s} reference defense {getattr(cls, 'reference_defense', '-'):18s} "
              f"{getattr(cls, 'description', '')}")
    _print_problems(TASKS.problems())


def _print_problems(lines: list[str]) -> None:
    """Installed plugins that cannot be used, one line each (the listing above stays usable)."""
    for line in lines:
        print(f"{'not usable:':24s} {line}")


def cmd_validate(args) -> None:
    from benchmark.running import submissions

    what = "the submission's" if submissions.is_submission_ref(args.folder) else "the defense's"
    print(f"validating {args.folder} (this runs {what} code in a child process)", flush=True)
    for line in submissions.validate_in_child(args.folder, args.timeout, _parse_params(args.param)):
        print(f"   {line}")


def cmd_train_saes(args) -> None:
    import torch

    from benchmark.modeling.models import MODELS
    from benchmark.modeling.sae_training import TrainConfig, train_reference_saes
    from benchmark.modeling.saes import REFERENCE_SAE_ROOT

    spec = MODELS.get(args.model)
    if spec is None or spec.sae_source.release != "local" or spec.build is not None:
        local = [name for name, s in MODELS.items() if s.sae_source.release == "local" and s.build is None]
        raise BenchmarkError(f"train-saes trains the project's own SAEs of {', '.join(local)}; '{args.model}' is not "
                             "one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(layers=tuple(args.layers or spec.sae_source.layers), d_sae=args.width, k=args.k,
                      train_tokens=args.tokens, heldout_tokens=args.heldout_tokens, steps=args.steps, seed=args.seed,
                      center=args.center)
    report = train_reference_saes(Path(args.out or REFERENCE_SAE_ROOT / spec.name), cfg, spec.name, args.note or "")
    print(json.dumps(report["saes"], indent=1))


def _executor_options(parser: argparse.ArgumentParser) -> None:
    """``--executor`` and the Ray executor's options (:mod:`benchmark.running.ray_executor`)."""
    parser.add_argument("--executor", choices=("serial", "ray"), default="serial",
                        help="serial: one run after another in this process; ray: every run, and every attack chunk "
                             "of a run, as work for Ray workers (each loads the model once), records written here "
                             "(needs the extra: pip install -e \".[ray]\")")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="Ray workers, each one run or chunk at a time with --threads CPU threads and, with "
                             "--device cuda, a GPU of its own (default: the cluster's GPUs, or its CPUs / --threads)")
    parser.add_argument("--ray-address", default=None,
                        help="an existing Ray cluster to use (default: RAY_ADDRESS if set, else a local instance "
                             "started for this command)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default, where it has a value (an unset option's help says what it means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from benchmark.attacks import AttackConfig
    from benchmark.attacks.base import OPTIMIZERS, POSITIONS
    from benchmark.modeling.models import DEFAULT_MODEL, TINY_MODEL
    from benchmark.running.records import RECORDS_DIR
    from benchmark.running.submissions import EVALUATE_TIMEOUT, VALIDATE_TIMEOUT

    parser = argparse.ArgumentParser(prog="benchmark", description=__doc__, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)
    default = AttackConfig()
    records_help = "folder of run records (one per model/defense/suite/attack mode)"

    ev = sub.add_parser("evaluate", help="run a defense against task suites and the recovery attacker",
                        formatter_class=_Help,
                        description="Run a defense against task suites and the recovery attacker; one record per "
                                    "(suite, attack mode). The attack runs in chunks of --batch-size valid flips, "
                                    "saved after each to <suite>__<mode>.json.partial: rerun the same command after "
                                    "an interruption and it resumes there. A record this very run (same fingerprint: "
                                    "inputs, settings, code) already wrote is not run again. A first run in seconds: "
                                    f"--model {TINY_MODEL} --tasks ioi --limit 8.")
    ev.add_argument("--defense", required=True,
                    help="registered defense name (see `benchmark defenses`), a submission folder "
                         "(submissions/<name>; runs its code in a child process), or `reference`: each suite's "
                         "own reference defense")
    ev.add_argument("--tasks", type=_csv, default=None,
                    help="comma-separated suites (see `benchmark tasks`; default: every registered suite)")
    ev.add_argument("--limit", type=_positive, default=None, metavar="N",
                    help="score only the first N test examples of each suite (and measure the side effect on its first N "
                         "control texts): a cheap check, written to "
                         "<suite>__<mode>.limit-N.json and never ranked (default: every test example)")
    ev.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"registered model name or a local HF model folder; `{TINY_MODEL}`: the tests' random "
                         "4-layer stand-in with its own SAEs, built into the cache on first use, for a first run "
                         "in seconds with --tasks ioi, whose figures mean nothing")
    ev.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:N or mps (default: cuda when this torch sees a GPU, else cpu)")
    ev.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="the model weights' dtype (default: float32 on cpu, bfloat16 on a GPU); defense edits, the "
                         "attacker and every score stay float32")
    ev.add_argument("--remote", action="store_true",
                    help="run every forward pass on NDIF (nnsight remote execution; needs NDIF_API_KEY, and a hub "
                         "model NDIF hosts). Gradients do not come back: the attack and gradient-attributed "
                         "fitting refuse to run (README: Remote execution)")
    ev.add_argument("--attack", type=_csv, default=default.mode,
                    help="comma-separated registered attacks (see `benchmark attacks`; built-ins: none, encoder, "
                         "jacobian, soft_suffix)")
    ev.add_argument("-A", "--attack-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a plug-in attack's own setting, repeatable; recorded verbatim under attack.params")
    ev.add_argument("--eps", type=_floats, default=",".join(map(str, default.eps)),
                    help="ascending relative budgets to sweep")
    ev.add_argument("--steps", type=int, default=default.steps, help="optimizer steps per budget")
    ev.add_argument("--lr", type=float, default=default.lr, help="step length as a fraction of the budget")
    ev.add_argument("--positions", choices=POSITIONS, default=default.positions,
                    help="prompt positions the attack may change")
    ev.add_argument("--optimizer", choices=OPTIMIZERS, default=default.optimizer, help="the attack's optimizer")
    ev.add_argument("--seed", type=int, default=default.seed, help="seed of the attack (and of its random probes)")
    ev.add_argument("--batch-size", type=int, default=default.batch_size,
                    help="valid flips attacked together: one chunk of work (resume and --shard work per chunk)")
    ev.add_argument("--patience", type=int, default=default.patience,
                    help="steps at a budget before the attacker may leave it early, when the recent gain of the "
                         "behavior score cannot reach 0 in the steps left (0: run every budget's steps)")
    ev.add_argument("--attack-layer", type=int, default=None, help="attacked block (default: first defended site)")
    ev.add_argument("--jacobian-rank", type=int, default=default.jacobian_rank,
                    help="random probes of the low-rank Jacobian estimate (mode jacobian)")
    ev.add_argument("--jacobian-exact-rows", type=int, default=default.jacobian_exact_rows,
                    help="use the exact Jacobian when an example has at most this many cross-site readouts")
    ev.add_argument("--suffix-len", type=int, default=default.suffix_len, help="soft tokens (mode soft_suffix)")
    ev.add_argument("-D", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="defense constructor parameter, repeatable (e.g. -D k=32 -D mode=zero)")
    ev.add_argument("--sae-dir", type=Path, default=None,
                    help="folder with layer_<L>/ SAEs in sae_lens disk format (default: the model's own: saes/<model>/ "
                         "for the default model, the stand-in's for the tiny one, the hub release for hub models)")
    ev.add_argument("--records-dir", default=str(RECORDS_DIR), help=records_help)
    ev.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's choice; with --executor ray: per worker, 0 meaning 1)")
    ev.add_argument("--keep-existing", action="store_true",
                    help="skip every run whose record exists already, whatever commit it ran at (its row on the "
                         "leaderboard names that commit); for filling in a battery over several sessions")
    ev.add_argument("--quiet", action="store_true",
                    help="no progress bars (one line per stage and the summary are still printed)")
    ev.add_argument("--timeout", type=float, default=EVALUATE_TIMEOUT,
                    help="time limit in seconds for a submission's child process")
    ev.add_argument("--shard", default="0/1", metavar="I/N",
                    help="run only shard I of N (attack chunks whose index is I modulo N) and write "
                         "<suite>__<mode>.shard-I-of-N.json beside the record; `benchmark merge` makes the record")
    _executor_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    ba = sub.add_parser("battery", help="run the full battery's planned runs that have no record yet",
                        formatter_class=_Help,
                        description="The full battery on the default model (benchmark/running/battery.py): every built-in "
                                    "defense and the example submission on every suite it fits, with its constrained "
                                    "attack, `none` and the soft-suffix baseline. Runs each planned `benchmark "
                                    "evaluate` with --keep-existing (a run that fails is reported and the others go "
                                    "on; with --executor ray all of them at once on Ray workers), then lists which "
                                    "planned runs have a record.")
    ba.add_argument("--list", action="store_true", help="only list the planned runs and which have a record")
    ba.add_argument("--records-dir", default=str(RECORDS_DIR), help=records_help)
    ba.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"the model the plan runs on (`{TINY_MODEL}`: the tests' stand-in, where the runs whose "
                         "defaults do not fit it fail and are reported)")
    ba.add_argument("--limit", type=_positive, default=None, metavar="N",
                    help="score only the first N test examples of each suite (records never ranked)")
    ba.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's choice; with --executor ray: per worker, 0 meaning 1)")
    ba.add_argument("--device", default=None, help="as for evaluate (default: cuda when available, else cpu)")
    ba.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="as for evaluate (default: float32 on cpu, bfloat16 on a GPU)")
    ba.add_argument("--quiet", action="store_true",
                    help="no progress bars (one line per stage and the summaries are still printed)")
    _executor_options(ba)
    ba.set_defaults(func=cmd_battery)

    me = sub.add_parser("merge", help="combine the shard files of `evaluate --shard` into run records",
                        formatter_class=_Help,
                        description="Combine shard files (<suite>__<mode>.shard-i-of-n.json) into the record a "
                                    "single run writes, beside them. Every shard of a run must be there and have "
                                    "the same fingerprint. The shard files are removed afterwards.")
    me.add_argument("paths", nargs="+", help="shard files, or folders to search for them (e.g. leaderboard/records)")
    me.add_argument("--keep-shards", action="store_true", help="keep the shard files after merging")
    me.set_defaults(func=cmd_merge)

    va = sub.add_parser("validate", help="check a submitted or installed defense (runs its code in a child process)",
                        formatter_class=_Help,
                        description="Check a defense the way a submission is checked: the interface, its parameters, "
                                    "and a run on the tiny stand-in model (fit, edit, readouts, a gradient; every "
                                    "output finite). Takes a submission folder or the name of a registered defense "
                                    "(a built-in, or a plugin an installed package provides).")
    va.add_argument("folder", help="submission folder (e.g. submissions/decoder_span_ablation), or a registered "
                                   "defense's name (e.g. one from an installed plugin)")
    va.add_argument("-D", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="constructor parameter of a named defense on the tiny model (4 layers, d_model 64), "
                         "repeatable; a submission uses its manifest's validation_parameters")
    va.add_argument("--timeout", type=float, default=VALIDATE_TIMEOUT, help="time limit in seconds")
    va.set_defaults(func=cmd_validate)

    lb = sub.add_parser("leaderboard", help="regenerate leaderboard/README.md, leaderboard.csv, index.html and the "
                                             "table in README.md from the run records", formatter_class=_Help)
    lb.add_argument("--records-dir", default=str(RECORDS_DIR), help=records_help)
    lb.add_argument("--out-dir", default=str(RECORDS_DIR.parent), help="folder of the generated tables and page")
    lb.add_argument("--readme", default=None,
                    help="README whose leaderboard section to rewrite (default: the repository's README.md when "
                         "--out-dir is the default, else none)")
    lb.set_defaults(func=cmd_leaderboard)

    sub.add_parser("defenses", help="list registered defenses (and installed plugins that cannot be used)",
                   formatter_class=_Help).set_defaults(func=cmd_defenses)
    sub.add_parser("tasks", help="list registered task suites (and installed plugins that cannot be used)",
                   formatter_class=_Help).set_defaults(func=cmd_tasks)
    sub.add_parser("attacks", help="list registered attacks: threat model, constraints claimed, what each does "
                                   "(and installed plugins that cannot be used)",
                   formatter_class=_Help).set_defaults(func=cmd_attacks)

    tr = sub.add_parser("train-saes", help="train a local model's reference SAEs (the better part of an hour on 2 "
                                           "cores)", formatter_class=_Help)
    tr.add_argument("--model", default=DEFAULT_MODEL, help="a registered local model whose SAEs to train")
    tr.add_argument("--layers", type=int, nargs="+", help="blocks whose output the SAEs read (default: the model's "
                                                          "reference layers)")
    tr.add_argument("--width", type=int, default=4608, help="latents per SAE")
    tr.add_argument("--k", type=int, default=64, help="active latents per token (BatchTopK) during training")
    tr.add_argument("--tokens", type=int, default=400_000, help="training tokens")
    tr.add_argument("--heldout-tokens", type=int, default=20_000, help="held-out tokens for the quality report")
    tr.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    tr.add_argument("--seed", type=int, default=0, help="seed of the data order and initialization")
    tr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    tr.add_argument("--center", action="store_true", help="train on residuals less their mean (folded back into the "
                                                          "biases after): for residuals with a large constant part")
    tr.add_argument("--out", help="folder to write layer_<L>/ SAEs to (default: saes/<model>); SAEs of other "
                                   "layers already there stay, and the report lists each training run")
    tr.add_argument("--note", help="why this budget (or anything a reader of the report should know), "
                                              "printed in REPORT.md")
    tr.set_defaults(func=cmd_train_saes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "remote", False):  # a remote model's config and tokenizer come from the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub at run time; avoids 30 s of retries per look-up
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    keep_freed_memory()
    try:
        return args.func(args) or 0
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # submitted code may raise anything: in its child process, one line
        from benchmark.running.submissions import child_failure

        line = child_failure(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
