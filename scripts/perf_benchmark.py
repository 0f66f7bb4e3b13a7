"""Speed of the recovery attacker against plain torch, and how its cost grows (issue: speed and scale).

Run from the repository root on a quiet machine:

    .venv/bin/python scripts/perf_benchmark.py [--threads 2] [--quick]

It writes ``leaderboard/perf.md`` (tables) and ``leaderboard/perf.json`` (headline figures, with the commit and
thread count). Everything runs on the default model with the reference ``sae_clamp`` on IOI.

- **step ratio**: one attack step (defended forward from the site with ``delta``, behavior, backward, projection)
  against the floor, a plain torch forward+backward over exactly the same blocks, batch and tokens with a bare
  hook adding ``delta`` (the blocks below the site replaced by the cached residual, as the attacker does); the
  two are timed alternately in one process, median over rounds. The ratio against a plain full-network pass is
  reported beside it.
- **speedup vs per-example loop**: the attacker's wall time on N valid flips with the default schedule, against
  a loop over the same flips at batch 1, full network every step, no early stop (timed on a few steps and
  extrapolated to the whole schedule, which it would run for every example).
- **scaling**: steps per second and peak resident memory of the attack steps (each configuration in a fresh
  process, the peak mark reset after the model is loaded) against batch size, prompt length and number of
  defended sites, and attack wall time against number of examples.
- **allocator**: attack steps per second at batch 64 with prompts of refusal's length, glibc's allocator at its
  defaults against the freed memory kept (:func:`benchmark.cli.keep_freed_memory`, what ``benchmark`` does),
  each in a fresh process, alternating, median over rounds.
- **default battery**: the summed ``wall_seconds`` of the committed records of the default command
  (``benchmark evaluate --defense reference``: every suite with its reference defense, encoder attack) at the
  commits they name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark.attack import AttackConfig, RecoveryAttack  # noqa: E402
from benchmark.cli import GLIBC_DEFAULTS_ENV, keep_freed_memory  # noqa: E402
from benchmark.engine import behavior_scores  # noqa: E402
from benchmark.models import DEFAULT_MODEL, load_model  # noqa: E402
from benchmark.records import RECORDS_DIR, git_state, write_text_atomic  # noqa: E402
from defenses import DEFENSES, FitContext  # noqa: E402
from tasks import TASKS  # noqa: E402
from tasks.base import PromptBatch  # noqa: E402

NEVER = (1e-9,)  # a budget at which no valid flip recovers: every step runs on the whole batch
FILLER = "The weather report said the morning would be cool and the afternoon bright over the hills. "


def setup(defense: str = "sae_clamp", params: dict | None = None, n_test: int | None = None):
    """The default model, IOI, the fitted defense and the valid flips among the first ``n_test`` test prompts."""
    model = load_model(DEFAULT_MODEL)
    task = TASKS.get("ioi")(model.tokenizer)
    task.prepare(model)
    defense = DEFENSES.get(defense).create(**(params or {}))
    defense.fit(FitContext(model, task))
    test = task.encode(task.examples("test")[:n_test])
    valid = (behavior_scores(model, task, test, None) > 0) & (behavior_scores(model, task, test, defense) <= 0)
    return model, task, defense, test.select(valid.nonzero()[:, 0])


def with_filler(batch: PromptBatch, tokenizer, tokens: int) -> PromptBatch:
    """``batch`` with about ``tokens`` tokens of neutral text before every prompt (longer prompts, same task)."""
    if tokens <= 0:
        return batch
    ids = tokenizer(FILLER * (1 + tokens // 16), add_special_tokens=False)["input_ids"][:tokens]
    pre = torch.tensor(ids).expand(len(batch), -1)
    return PromptBatch(batch.ids, torch.cat([pre, batch.input_ids], 1),
                       torch.cat([torch.ones_like(pre), batch.attention_mask], 1), batch.targets, batch.read_len)


def attack_step_seconds(model, task, defense, batch, steps: int) -> float:
    """Seconds per attacker step on ``batch``: no example recovers and none leaves early (no patience), so each of
    the ``steps`` updates runs on all of them; the final judging forward counts against the attacker."""
    cfg = AttackConfig(eps=NEVER, steps=steps, batch_size=len(batch), patience=None)
    attack = RecoveryAttack(model, defense, task, cfg)
    chunk = attack.prepare(batch)  # timed apart: done once per chunk, not per step
    t0 = time.perf_counter()
    outcomes = attack.run_chunk(chunk)
    seconds = time.perf_counter() - t0
    assert all(o.steps_used == steps and not o.recovered for o in outcomes), "every example must take every step"
    return seconds / steps


def plain_step_seconds(model, task, batch, layer: int, steps: int, reuse_prefix: bool) -> float:
    """Seconds per plain torch forward+backward with a bare hook adding ``delta`` after block ``layer``; with
    ``reuse_prefix`` the blocks up to ``layer`` are replaced by their cached output (the attacker's blocks)."""
    hf = model.hf
    blocks = hf.get_decoder().layers
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    cached = {}
    grab = blocks[layer].register_forward_hook(lambda m, i, o: cached.setdefault("h", o.detach()))
    with torch.no_grad():
        hf(**inputs, logits_to_keep=1, use_cache=False)
    grab.remove()
    delta = torch.zeros_like(cached["h"], requires_grad=True)
    hooks = [blocks[layer].register_forward_hook(lambda m, i, o: o + delta)]
    saved = {}
    if reuse_prefix:
        for L in range(layer + 1):
            saved[L] = blocks[L].forward
            blocks[L].forward = lambda *a, **k: cached["h"]
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = hf(**inputs, logits_to_keep=1, use_cache=False).logits  # as the attacker: no key/value cache
            task.attack_loss(logits, batch).sum().backward()
            delta.grad = None
        return (time.perf_counter() - t0) / steps
    finally:
        for h in hooks:
            h.remove()
        for L, fwd in saved.items():
            blocks[L].forward = fwd


def step_ratio(model, task, defense, flips, batch_size: int, steps: int, rounds: int) -> dict:
    batch = flips.select(list(range(min(batch_size, len(flips)))))
    layer = min(defense.sites)
    ours, same, full = [], [], []
    for _ in range(rounds):  # alternate, so drifting machine load hits all three alike
        ours.append(attack_step_seconds(model, task, defense, batch, steps))
        same.append(plain_step_seconds(model, task, batch, layer, steps, reuse_prefix=True))
        full.append(plain_step_seconds(model, task, batch, layer, steps, reuse_prefix=False))
    o, s, f = (statistics.median(x) for x in (ours, same, full))
    return {"batch": len(batch), "tokens": int(batch.input_ids.shape[1]), "layer": layer, "attack_step_s": o,
            "plain_same_blocks_s": s, "plain_full_network_s": f, "ratio_same_blocks": o / s, "ratio_full": o / f}


def per_example_speedup(model, task, defense, flips, n: int, probe_steps: int) -> dict:
    """Our attack on ``n`` flips against a per-example loop (batch 1, full network, no early stop)."""
    batch = flips.select(list(range(min(n, len(flips)))))
    cfg = AttackConfig()
    t0 = time.perf_counter()
    outcomes = RecoveryAttack(model, defense, task, cfg).run(batch, progress=False)
    ours = time.perf_counter() - t0
    per_step = statistics.median(
        plain_step_seconds(model, task, batch.select([i]), min(defense.sites), probe_steps, reuse_prefix=False)
        for i in range(min(3, len(batch))))
    schedule = len(cfg.eps) * cfg.steps
    loop = per_step * schedule * len(batch)
    return {"examples": len(batch), "attack_seconds": ours, "per_example_step_s": per_step,
            "schedule_steps": schedule, "per_example_loop_seconds": loop, "speedup": loop / ours,
            "recovered": sum(o.recovered for o in outcomes),
            "mean_steps_used": sum(o.steps_used for o in outcomes) / max(len(outcomes), 1)}


def one_config(spec: dict) -> dict:
    """Steps per second and peak memory of one configuration (run in a fresh process by :func:`scaling`)."""
    torch.set_num_threads(spec["threads"])
    model, task, defense, flips = setup(spec.get("defense", "sae_clamp"), spec.get("params"),
                                        n_test=4 * spec["batch"] + 16)
    filled = with_filler(flips, model.tokenizer, spec.get("filler", 0))  # still flips with the filler?
    still = (behavior_scores(model, task, filled, None) > 0) & (behavior_scores(model, task, filled, defense) <= 0)
    batch = filled.select(still.nonzero()[:spec["batch"], 0])
    base = rss_mib("VmRSS")
    reset_peak_rss()  # loading the model peaks far above an attack step: measure the attack's own peak
    sec = attack_step_seconds(model, task, defense, batch, spec["steps"])
    return {**spec, "batch": len(batch), "tokens": int(batch.input_ids.shape[1]), "steps_per_s": 1 / sec,
            "peak_rss_mib": rss_mib("VmHWM"), "attack_peak_over_rest_mib": rss_mib("VmHWM") - base}


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this measurement needs Linux)")


def in_fresh_process(spec: dict, env: dict | None = None) -> dict:
    """:func:`one_config` of ``spec`` in a fresh process (with ``env`` added to its environment)."""
    out = subprocess.run([sys.executable, __file__, "--one-config", json.dumps(spec)], capture_output=True,
                         text=True, check=True, cwd=ROOT, env={**os.environ, **(env or {})})
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {row}", file=sys.stderr, flush=True)
    return row


def scaling(threads: int, steps: int, quick: bool) -> list[dict]:
    configs = [{"family": "batch", "batch": b} for b in ((1, 8, 32) if quick else (1, 8, 32, 64))]
    configs += [{"family": "prompt length", "batch": 8, "filler": f} for f in ((0, 64) if quick else (0, 32, 96, 224))]
    configs += [{"family": "defended sites", "batch": 8, "defense": "multi_layer_clamp", "params": {"layers": layers}}
                for layers in ([12, 16], [8, 12, 16])]
    return [in_fresh_process({**spec, "threads": threads, "steps": steps}) for spec in configs]


ALLOCATOR_HEADER = "## Allocator"


def allocator(threads: int, steps: int, rounds: int) -> dict:
    """Attack steps per second with glibc's allocator defaults and with the freed memory kept, alternating."""
    spec = {"family": "allocator", "batch": 64, "filler": 32, "threads": threads, "steps": steps}
    runs = {"glibc defaults": [], "freed memory kept": []}
    for _ in range(rounds):
        runs["glibc defaults"].append(in_fresh_process(spec, {GLIBC_DEFAULTS_ENV: "1"})["steps_per_s"])
        runs["freed memory kept"].append(in_fresh_process(spec)["steps_per_s"])
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"commit": git_state()[0][:10], "threads": threads, "batch": spec["batch"], "filler_tokens": spec["filler"],
            "rounds": rounds,
            **{f"steps_per_s ({k})": v for k, v in medians.items()},
            "speedup": medians["freed memory kept"] / medians["glibc defaults"]}


def allocator_section(ab: dict) -> list[str]:
    return [ALLOCATOR_HEADER, "", "Attack steps per second, each measurement in a fresh process, median over "
            "rounds: glibc's allocator at its defaults against the freed memory kept (what `benchmark` does).", "",
            table([ab], list(ab)), ""]


def update_allocator(out: Path, threads: int, steps: int, rounds: int) -> None:
    """Measure the allocator comparison and put it into ``out``/perf.json and perf.md; the other figures stay."""
    ab = allocator(threads, steps, rounds)
    headline = {**json.loads((out / "perf.json").read_text()), "allocator_speedup": ab["speedup"]}
    md = (out / "perf.md").read_text()
    start = md.find(ALLOCATOR_HEADER)
    cut = md.index(BATTERY_HEADER)
    md = md[:start if start >= 0 else cut] + "\n".join(allocator_section(ab)) + md[cut:]
    write_text_atomic(out / "perf.md", md)
    write_text_atomic(out / "perf.json", json.dumps(headline, indent=2) + "\n")
    print(json.dumps(ab, indent=2))


def examples_scaling(model, task, defense, flips, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        batch = flips.select(list(range(min(n, len(flips)))))
        t0 = time.perf_counter()
        RecoveryAttack(model, defense, task, AttackConfig()).run(batch, progress=False)
        rows.append({"examples": len(batch), "attack_seconds": time.perf_counter() - t0})
    return rows


def default_battery_seconds(model_name: str = DEFAULT_MODEL) -> dict:
    """Summed wall time of the committed records the default command writes (``benchmark evaluate --defense
    reference``: every suite with its reference defense, encoder attack)."""
    per_suite, commits, threads = {}, set(), set()
    for task, cls in TASKS.items():
        path = RECORDS_DIR / model_name / cls.reference_defense / f"{task}__encoder.json"
        if path.exists():
            rec = json.loads(path.read_text())
            per_suite[task] = rec["provenance"]["wall_seconds"]
            commits.add(rec["provenance"]["git_commit"][:10])
            threads.add(rec["provenance"]["cpu_threads"])
    return {"seconds": sum(per_suite.values()), "per_suite": per_suite, "commits": sorted(commits),
            "threads": sorted(threads)}


BATTERY_HEADER = "## Default battery"


def battery_keys(battery: dict) -> dict:
    return {"default_battery_seconds": battery["seconds"] if battery["per_suite"] else None,
            "default_battery_suites": list(battery["per_suite"]),
            "default_battery_suite_seconds": battery["per_suite"],
            "default_battery_record_commits": battery["commits"], "default_battery_threads": battery["threads"]}


def battery_section(battery: dict) -> list[str]:
    return [BATTERY_HEADER, "", "Summed wall time of the reference records (`benchmark evaluate --defense "
            "reference`): per suite and in all (`seconds`), each run at the commit and thread count shown.", "",
            table([{**battery["per_suite"], **battery}], [*battery["per_suite"], "seconds", "commits", "threads"]), ""]


def update_battery(out: Path) -> None:
    """Rewrite the default battery's figures in ``out``/perf.json and perf.md from the records now committed."""
    battery = default_battery_seconds()
    headline = {**json.loads((out / "perf.json").read_text()), **battery_keys(battery)}
    md = (out / "perf.md").read_text()
    md = md[:md.index(BATTERY_HEADER)] + "\n".join(battery_section(battery))
    write_text_atomic(out / "perf.md", md)
    write_text_atomic(out / "perf.json", json.dumps(headline, indent=2) + "\n")
    print(json.dumps(battery_keys(battery), indent=2))


def table(rows: list[dict], cols: list[str]) -> str:
    from tabulate import tabulate

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else v

    return tabulate([[fmt(r.get(c)) for c in cols] for r in rows], headers=cols, tablefmt="github")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="fewer configurations and rounds (a smoke run)")
    ap.add_argument("--one-config", help=argparse.SUPPRESS)
    ap.add_argument("--battery-only", action="store_true",
                    help="only re-read the default battery's wall time from the committed records into perf.json and "
                         "perf.md (after the reference records are run again); the other figures stay")
    ap.add_argument("--allocator-only", action="store_true",
                    help="only measure the allocator comparison into perf.json and perf.md; the other figures stay")
    ap.add_argument("--out", type=Path, default=ROOT / "leaderboard")
    args = ap.parse_args()
    keep_freed_memory()  # as `benchmark` does (unless BENCHMARK_GLIBC_MALLOC_DEFAULTS=1)
    if args.one_config:
        print(json.dumps(one_config(json.loads(args.one_config))))
        return
    if args.battery_only:
        update_battery(args.out)
        return
    steps, rounds = (3, 2) if args.quick else (5, 3)
    if args.allocator_only:
        update_allocator(args.out, args.threads, steps, rounds)
        return
    torch.set_num_threads(args.threads)
    commit, dirty = git_state()
    t_start, load_start = time.time(), os.getloadavg()[0]
    model, task, defense, flips = setup()
    print("step ratio ...", file=sys.stderr, flush=True)
    ratio = step_ratio(model, task, defense, flips, 64, steps, rounds)
    print(f"  {ratio}\nper-example speedup ...", file=sys.stderr, flush=True)
    speed = per_example_speedup(model, task, defense, flips, 32 if args.quick else 64, steps)
    print(f"  {speed}\nscaling ...", file=sys.stderr, flush=True)
    scale = scaling(args.threads, steps, args.quick)
    print("allocator ...", file=sys.stderr, flush=True)
    ab = allocator(args.threads, steps, rounds)
    print("examples ...", file=sys.stderr, flush=True)
    by_examples = examples_scaling(model, task, defense, flips, (16, 32) if args.quick else (16, 32, 64, 128))
    battery = default_battery_seconds()
    headline = {
        "step_ratio_vs_raw": ratio["ratio_same_blocks"],
        "step_ratio_vs_raw_full_network": ratio["ratio_full"],
        "speedup_vs_per_example": speed["speedup"],
        "allocator_speedup": ab["speedup"],
        **battery_keys(battery),
        "cpu_threads": args.threads,
        "device": "cpu",
        "quick": args.quick,
        "git_commit": commit,
        "git_dirty": dirty,
        "benchmark_seconds": time.time() - t_start,
        "load_average_start_end": [load_start, os.getloadavg()[0]],  # other work on the machine meanwhile
    }
    md = [
        "# Attacker speed (generated by `scripts/perf_benchmark.py`; do not edit)", "",
        f"Commit `{commit[:10]}`{' (dirty)' if dirty else ''}, {args.threads} CPU thread(s), "
        f"default model, `sae_clamp` on IOI, float32.", "",
        "## One attack step against plain torch", "",
        table([ratio], list(ratio)), "",
        "## Batched attack with early stop against a per-example loop", "",
        table([speed], list(speed)), "",
        "## Scaling (each configuration in a fresh process)", "",
        table(scale, ["family", "batch", "tokens", "defense", "params", "steps_per_s", "peak_rss_mib",
                      "attack_peak_over_rest_mib"]), "",
        "## Attack wall time against number of examples", "",
        table(by_examples, ["examples", "attack_seconds"]), "",
        *allocator_section(ab),
        *battery_section(battery),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "perf.md", "\n".join(md))
    write_text_atomic(args.out / "perf.json", json.dumps(headline, indent=2) + "\n")
    print(json.dumps(headline, indent=2))


if __name__ == "__main__":
    main()
