"""The battery on Ray workers against one process (issue 24), into ``leaderboard/perf.md`` and ``perf.json``.

Run from the repository root, with the extra installed (``bash scripts/setup.sh ray``), on a machine as quiet as
you can get:

    .venv/bin/python scripts/executor_benchmark.py [--model tiny] [--limit N]

- **measured**: ``benchmark battery`` (the full plan, on ``--model``), three times, each in a fresh process writing
  into an empty records folder: serially with 1 thread, serially with 2 threads, and ``--executor ray --workers 2
  --threads 1`` (a local Ray instance, started by the command and counted in its time); the ratios come from this
  one run. The three must write the same records, provenance aside (checked; the script fails otherwise). On the
  tiny model the runs whose defaults do not fit it fail quickly, in all three alike. ``--cap S`` stops a battery
  still running after S seconds (its time is then a lower bound, marked in the table).
- **estimated, 8 workers**: the default model's battery from the committed records' ``provenance.wall_seconds``
  (one per planned run), scheduled on 8 identical workers: longest run first onto the least loaded worker, each
  run whole (an upper bound: the Ray executor also splits a run's chunks over workers) and perfectly divided (the
  lower bound, the summed time over 8). The records were timed on CPU threads, some of them side by side, and no
  GPU was at hand: this is the scaling of the battery's work over 8 workers as fast as the ones that made the
  records, not a measurement of GPUs.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from perf_benchmark import table, update_section  # noqa: E402

from benchmark.modeling.models import DEFAULT_MODEL, TINY_MODEL, load_model  # noqa: E402
from benchmark.running.battery import coverage  # noqa: E402
from benchmark.running.records import RECORDS_DIR, git_state  # noqa: E402

HEADER = "## Executors: the battery on Ray workers against one process"
CONFIGS = {"serial, 1 thread": ["--threads", "1"],
           "ray, 2 workers x 1 thread": ["--executor", "ray", "--workers", "2", "--threads", "1"],
           "serial, 2 threads": ["--threads", "2"]}
RAY = "ray, 2 workers x 1 thread"
RAY_READY = " Ray workers on "  # the executor's line once its workers have loaded the model


def timed_battery(model: str, limit: int | None, options: list[str], records: Path, cap: float | None) -> dict:
    """Wall seconds of one ``benchmark battery`` in a fresh process (and, for Ray, until its workers were ready); a
    battery still running after ``cap`` seconds is stopped (``complete`` False: its time is a lower bound)."""
    cmd = [sys.executable, "-m", "benchmark.cli", "battery", "--model", model, "--quiet", "--records-dir",
           str(records), *(["--limit", str(limit)] if limit else []), *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start, ready = time.perf_counter(), None
    errors = records.with_name(records.name + ".stderr")
    with errors.open("w") as err, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                                    text=True) as proc:
        timer = threading.Timer(cap, proc.terminate) if cap else None
        if timer:
            timer.start()
        for line in proc.stdout:
            if ready is None and RAY_READY in line:
                ready = time.perf_counter() - start
    seconds = time.perf_counter() - start
    complete = not (timer and not timer.is_alive() and proc.returncode < 0)
    if timer:
        timer.cancel()
    if complete and proc.returncode not in (0, 2):  # 2: planned runs failed (on the tiny model: those not fitting it)
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}:\n{errors.read_text()[-3000:]}")
    return {"seconds": seconds, "complete": complete, "workers_ready_seconds": ready}


def records_of(root: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(root.rglob("*.json")):
        record = json.loads(path.read_text())
        record.pop("provenance")
        out[str(path.relative_to(root))] = record
    return out


def measure(model: str, limit: int | None, cap: float | None) -> list[dict]:
    load_model(model)  # built or converted into the cache once, before any timing
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in CONFIGS.items():
            root = Path(tmp) / name.replace(" ", "_").replace(",", "")
            row = {"executor": name, **timed_battery(model, limit, options, root, cap)}
            records = records_of(root)
            row["records"] = len(records)
            if first is None and row["complete"]:
                first = records
            elif row["complete"]:
                row["same_records"] = records == first
                if options[options.index("--threads") + 1] == "1" and not row["same_records"]:  # as the first
                    raise SystemExit(f"{name} wrote other records than {next(iter(CONFIGS))}: executors at one "
                                     "thread per process must agree")
            print(json.dumps(row), flush=True)
            rows.append(row)
    ray_seconds = next(row["seconds"] for row in rows if row["executor"] == RAY)
    for row in rows:
        row["ray_speedup"] = row["seconds"] / ray_seconds
    return rows


def lpt_makespan(durations: list[float], workers: int) -> float:
    """Longest first onto the least loaded of ``workers``: the finishing time of the last."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)


def estimate(workers: int = 8) -> dict:
    """The default model's battery on ``workers`` identical workers, from the committed records' wall seconds."""
    seconds = [json.loads(p.read_text())["provenance"]["wall_seconds"]
               for p in coverage(RECORDS_DIR, DEFAULT_MODEL).values() if p is not None]
    total = sum(seconds)
    whole = lpt_makespan(seconds, workers)
    return {"workers": workers, "runs": len(seconds), "one_worker_seconds": round(total, 1),
            "longest_run_seconds": max(seconds), "whole_runs_seconds": round(whole, 1),
            "divided_seconds": round(total / workers, 1), "speedup_whole_runs": total / whole,
            "speedup_divided": float(workers)}


def section(model: str, limit: int | None, rows: list[dict], est: dict, load: list[float], cap: float | None
            ) -> list[str]:
    commit = git_state()[0][:10]
    what = f"`{model}`" + (f", the first {limit} test examples of each suite" if limit else "")
    cores = os.cpu_count()
    busy = (f" The machine was busy (load above its {cores} cores, other users' runs): with the CPU shared among "
            "processes, two worker processes get a larger share of it than one process, and torch's two threads "
            "wait on each other whenever one of them is not scheduled, so the ratios favour Ray more than an idle "
            "machine would." if max(load) > cores else "")
    stopped = (f" A row with `complete` false was stopped after {cap:g} s: its time, and its ratio, are lower "
               "bounds, and its records are not compared." if any(not r["complete"] for r in rows) else "")
    return [HEADER, "", f"Commit `{commit}`, generated by `scripts/executor_benchmark.py`. `benchmark battery` "
            f"(the full plan) on {what}, each executor in a fresh process into an empty records folder, one after "
            "another in one run of the script. `same_records`: whether the row's records equal the first row's (provenance "
            "aside); the Ray battery's must, as both run one thread per process, while torch with 2 threads splits its "
            "reductions otherwise and its float results may differ in the last bits. "
            "`ray_speedup`: "
            "the row's wall time over the Ray battery's. `workers_ready_seconds`: when the Ray workers had started "
            "and loaded the model (Ray's local start-up included). Load average (1 min) at start and end: "
            f"{load[0]:.2f}, {load[1]:.2f}.{busy}{stopped}", "",
            table(rows, ["executor", "seconds", "complete", "workers_ready_seconds", "records", "same_records",
                         "ray_speedup"]), "",
            f"Estimated, {est['workers']} workers: the default model's battery ({est['runs']} committed records, "
            f"{est['one_worker_seconds']} s summed `provenance.wall_seconds`) scheduled longest run first onto the "
            "least loaded worker, each run whole (`whole_runs_seconds`, an upper bound: the executor also spreads a "
            "run's chunks) and perfectly divided (`divided_seconds`, the lower bound). The records were timed on CPU "
            "threads (some side by side), and no GPU was at hand to time a run on one, so this is the battery's work "
            f"spread over {est['workers']} workers as fast as the ones that made the records: its shape, not a GPU "
            "measurement. "
            "The longest run bounds the whole-run schedule.", "",
            table([est], list(est)), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=TINY_MODEL, help="the model the batteries run on")
    ap.add_argument("--limit", type=int, default=None, help="first N test examples of each suite")
    ap.add_argument("--cap", type=float, default=None,
                    help="stop a battery still running after this many seconds (its time is then a lower bound)")
    ap.add_argument("--out", type=Path, default=ROOT / "leaderboard")
    args = ap.parse_args()
    load = [os.getloadavg()[0]]
    rows = measure(args.model, args.limit, args.cap)
    load.append(os.getloadavg()[0])
    est = estimate()
    keys = {"ray_battery_speedup": {row["executor"]: {"ray_speedup": row["ray_speedup"], "complete": row["complete"]}
                                    for row in rows},
            "battery_8_workers_speedup_estimate": [est["speedup_whole_runs"], est["speedup_divided"]]}
    update_section(args.out, HEADER, section(args.model, args.limit, rows, est, load, args.cap), keys)
    print(json.dumps({**keys, "estimate": est}, indent=2))


if __name__ == "__main__":
    main()
