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
  defaults against the freed memory kept (:func:`benchmark.allocator.keep_freed_memory`, what ``benchmark`` does),
  each in a fresh process, alternating, median over rounds.
- **ceiling**: one attack step's FLOPs per second against a large float32 matrix product at the same thread
  count (the practical ceiling of the dense layers); and the same steps in one single-thread process per core,
  side by side, against one process using every thread (would parallel suites beat torch's threads?).
- **soft suffix**: one soft-suffix step (prompt prefilled once) against a plain full pass over prompt + suffix.
- **unembedding**: attack steps with the read positions handed to the unembedding as one contiguous block (what
  :func:`benchmark.modeling.models.unembed_contiguously` does) against the strided slice the model passes by itself,
  alternating in one process, median over rounds.
- **first run** (``--first-run-only``): the README's one-minute run, without and with the attribution cache.
- **GPU** (``--gpu-only``, needs CUDA): one attack step at batch 64 on the GPU in float32 and bfloat16 against
  2 CPU threads of the same machine, in one process, and the default command's wall time on the GPU.
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
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark.attacks import AttackConfig, build_attack  # noqa: E402
from benchmark.attacks.soft_suffix import SoftSuffixAttack, with_suffix  # noqa: E402
from benchmark.modeling.forward import defense_edits  # noqa: E402
from benchmark.allocator import GLIBC_DEFAULTS_ENV, keep_freed_memory  # noqa: E402
from benchmark.running.engine import behavior_scores  # noqa: E402
from benchmark.modeling.forward import run_task  # noqa: E402
from benchmark.modeling.models import DEFAULT_MODEL, contiguous_first_input, load_model  # noqa: E402
from benchmark.files import write_text_atomic  # noqa: E402
from benchmark.running.records import RECORDS_DIR, git_state  # noqa: E402
from defenses import DEFENSES, FitContext  # noqa: E402
from tasks import TASKS  # noqa: E402
from tasks.base import PromptBatch  # noqa: E402

NEVER = (1e-9,)  # a budget at which no valid flip recovers: every step runs on the whole batch
FILLER = "The weather report said the morning would be cool and the afternoon bright over the hills. "


def setup(defense: str = "sae_clamp", params: dict | None = None, n_test: int | None = None,
          device: str = "cpu", dtype: str = "float32"):
    """The default model, IOI, the fitted defense and the valid flips among the first ``n_test`` test prompts."""
    model = load_model(DEFAULT_MODEL, device=device, dtype=dtype)
    with model.on_device():
        task = TASKS.get("ioi")(model.tokenizer)
        task.prepare(model)
        defense = DEFENSES.get(defense).create(**(params or {}))
        defense.fit(FitContext(model, task))
        test = task.encode(task.examples("test")[:n_test])
        valid = (behavior_scores(model, task, test, None) > 0) & (behavior_scores(model, task, test, defense) <= 0)
        return model, task, defense, test.select(valid.nonzero()[:, 0])


def filled_flips(model, task, defense, flips: PromptBatch, filler: int, n: int) -> PromptBatch:
    """The first ``n`` of ``flips`` that are still valid flips with ``filler`` tokens of neutral text before them."""
    filled = with_filler(flips, model.tokenizer, filler)
    still = (behavior_scores(model, task, filled, None) > 0) & (behavior_scores(model, task, filled, defense) <= 0)
    return filled.select(still.nonzero()[:n, 0])


def with_filler(batch: PromptBatch, tokenizer, tokens: int) -> PromptBatch:
    """``batch`` with about ``tokens`` tokens of neutral text before every prompt (longer prompts, same task)."""
    if tokens <= 0:
        return batch
    ids = tokenizer(FILLER * (1 + tokens // 16), add_special_tokens=False)["input_ids"][:tokens]
    pre = torch.tensor(ids).expand(len(batch), -1)
    return PromptBatch(batch.ids, torch.cat([pre, batch.input_ids], 1),
                       torch.cat([torch.ones_like(pre), batch.attention_mask], 1), batch.targets, batch.read_len)


def _attack_steps(model, task, defense, batch, steps: int, mode: str = "encoder"):
    """A callable running ``steps`` attacker steps on ``batch``: no example recovers and none leaves early (no
    patience), so each update runs on all of them; the final judging forward counts against the attacker. The
    chunk is prepared here, apart: that is done once per chunk, not per step."""
    cfg = AttackConfig(mode=mode, eps=NEVER, steps=steps, batch_size=len(batch), patience=None)
    attack = build_attack(model, defense, task, cfg)
    chunk = attack.prepare(batch)

    def run() -> None:
        outcomes = attack.run_chunk(chunk)
        assert all(o.steps_used == steps and not o.recovered for o in outcomes), "every example must take every step"

    return run


def attack_step_seconds(model, task, defense, batch, steps: int, mode: str = "encoder") -> float:
    """Seconds per attacker step on ``batch`` (see :func:`_attack_steps`)."""
    run = _attack_steps(model, task, defense, batch, steps, mode)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) / steps


def attack_step_flops(model, task, defense, batch, steps: int) -> float:
    """Matrix-multiply and attention FLOPs per attacker step on ``batch``, forward and backward, as torch's
    ``FlopCounterMode`` counts them (elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = _attack_steps(model, task, defense, batch, steps)
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / steps


def matmul_gflops(size: int = 2048, rounds: int = 5) -> float:
    """GFLOP/s of a square float32 matrix product of ``size``, median over ``rounds``: what this CPU's BLAS
    reaches at the current thread count, the practical ceiling of the model's dense layers."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


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


SUFFIX_HEADER = "## Soft suffix: the prompt run once"


@torch.no_grad()
def suffix_flips(attack: SoftSuffixAttack, batch: PromptBatch) -> PromptBatch:
    """The rows of ``batch`` whose behavior with ``attack``'s suffix at its initialization is still off."""
    ext = with_suffix(batch, attack.cfg.suffix_len, attack.suffix_id)
    read = run_task(attack.model, attack.task, ext, defense_edits(attack.defense, ext),
                    inputs_embeds=attack.suffix_embeds(ext, None))
    return batch.select((attack.task.behavior(read, ext) <= 0).nonzero()[:, 0])


def plain_suffix_step_seconds(attack: SoftSuffixAttack, batch: PromptBatch, steps: int) -> float:
    """Seconds per plain forward+backward of the whole prompt + suffix, defense active, gradient to the suffix
    embeddings: a soft-suffix step without the prefilled prompt (a floor of what the attacker ran before)."""
    ext = with_suffix(batch, attack.cfg.suffix_len, attack.suffix_id)
    delta = torch.zeros(len(ext), attack.cfg.suffix_len, attack.embed.shape[1], requires_grad=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.enable_grad():
            read = run_task(attack.model, attack.task, ext, defense_edits(attack.defense, ext),
                            inputs_embeds=attack.suffix_embeds(ext, delta))
            attack.task.attack_loss(read, ext).sum().backward()
        delta.grad = None
    return (time.perf_counter() - t0) / steps


def suffix_speed(model, task, defense, flips, steps: int, rounds: int) -> dict:
    """A soft-suffix attack step (8 tokens after prompts lengthened to about TPP's ~240 tokens, batch 8) against the
    plain full pass over prompt + suffix, alternating, median over ``rounds``."""
    attack = build_attack(model, defense, task, AttackConfig(mode="soft_suffix"))
    batch = suffix_flips(attack, with_filler(flips, model.tokenizer, 224))
    batch = batch.select(list(range(min(8, len(batch)))))
    ours, plain = [], []
    for _ in range(rounds):
        ours.append(attack_step_seconds(model, task, defense, batch, steps, mode="soft_suffix"))
        plain.append(plain_suffix_step_seconds(attack, batch, steps))
    o, f = statistics.median(ours), statistics.median(plain)
    return {"commit": git_state()[0][:10], "batch": len(batch), "prompt_tokens": int(batch.input_ids.shape[1]),
            "suffix_tokens": attack.cfg.suffix_len, "steps": steps, "rounds": rounds, "soft_suffix_step_s": o,
            "plain_full_pass_s": f, "speedup": f / o}


def suffix_section(r: dict) -> list[str]:
    return [SUFFIX_HEADER, "", "One soft-suffix attack step (the prompt before the suffix run once per chunk, each "
            "step only the suffix columns after its keys and values) against a plain forward+backward over the whole "
            "prompt + suffix with the defense active, what a step cost before (a floor: the attacker's own overhead "
            "comes on top). `sae_clamp` on IOI prompts lengthened to about TPP's length.", "", table([r], list(r)), ""]


def update_suffix(out: Path, steps: int, rounds: int) -> None:
    model, task, defense, flips = setup()
    r = suffix_speed(model, task, defense, flips, steps, rounds)
    update_section(out, SUFFIX_HEADER, suffix_section(r), {"soft_suffix_speedup_vs_full_pass": r["speedup"]})
    print(json.dumps(r, indent=2))


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
    outcomes = build_attack(model, defense, task, cfg).run(batch, progress=False)
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
    """Steps per second and peak memory of one configuration (run in a fresh process by :func:`in_fresh_processes`);
    with ``flops``, also the FLOPs per step and this CPU's matrix-product rate (:func:`matmul_gflops`)."""
    torch.set_num_threads(spec["threads"])
    model, task, defense, flips = setup(spec.get("defense", "sae_clamp"), spec.get("params"),
                                        n_test=4 * spec["batch"] + 16)
    batch = filled_flips(model, task, defense, flips, spec.get("filler", 0), spec["batch"])
    if spec.get("barrier"):  # processes run side by side: time them together, not each set-up
        print(READY, flush=True)
        sys.stdin.readline()
    base = rss_mib("VmRSS")
    reset_peak_rss()  # loading the model peaks far above an attack step: measure the attack's own peak
    sec = attack_step_seconds(model, task, defense, batch, spec["steps"])
    row = {**spec, "batch": len(batch), "tokens": int(batch.input_ids.shape[1]), "steps_per_s": 1 / sec,
           "peak_rss_mib": rss_mib("VmHWM"), "attack_peak_over_rest_mib": rss_mib("VmHWM") - base}
    if spec.get("flops"):
        flops = attack_step_flops(model, task, defense, batch, spec["steps"])
        row.update(step_s=sec, gflop_per_step=flops / 1e9, step_gflops=flops / sec / 1e9,
                   matmul_gflops=matmul_gflops())
        row["share_of_matmul_rate"] = row["step_gflops"] / row["matmul_gflops"]
    return row


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this measurement needs Linux)")


READY = "ready"


def in_fresh_processes(specs: list[dict], env: dict | None = None) -> list[dict]:
    """:func:`one_config` of each of ``specs``, each in a fresh process (with ``env`` added to its environment);
    several run side by side, their timed steps started together once every one is set up."""
    import tempfile

    together = len(specs) > 1
    procs = []
    for spec in specs:
        log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, __file__, "--one-config", json.dumps({**spec, "barrier": together})]
        procs.append((subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                       cwd=ROOT, env={**os.environ, **(env or {})}), log))
    if together:
        for proc, _ in procs:
            while (line := proc.stdout.readline()) and line.strip() != READY:
                pass
        for proc, _ in procs:
            try:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            except BrokenPipeError:  # it died before the barrier: its exit code and log are reported below
                pass
    rows = []
    for proc, log in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"a measuring process failed ({proc.returncode}):\n{log.read()[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def in_fresh_process(spec: dict, env: dict | None = None) -> dict:
    return in_fresh_processes([spec], env)[0]


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
    update_section(out, ALLOCATOR_HEADER, allocator_section(ab), {"allocator_speedup": ab["speedup"]})
    print(json.dumps(ab, indent=2))


CEILING_HEADER = "## The machine's ceiling"


def ceiling(threads: int, steps: int, rounds: int) -> dict:
    """An attack step (batch 64, prompts of refusal's length) against this CPU's matrix-product rate; and the same
    steps in ``threads`` processes of one thread each, side by side, against one process with ``threads``
    threads (alternating, median over ``rounds``), at a full and a nearly drained batch."""
    base = {"filler": 32, "steps": steps}
    step = in_fresh_process({**base, "family": "ceiling", "batch": 64, "threads": threads, "flops": True})
    processes = []
    for batch in (64, 4):
        spec = {**base, "family": "processes", "batch": batch}
        one, side = [], []
        for _ in range(rounds):
            one.append(in_fresh_process({**spec, "threads": threads})["steps_per_s"])
            side.append(sum(r["steps_per_s"] for r in in_fresh_processes([{**spec, "threads": 1}] * threads)))
        processes.append({"batch": batch, "tokens": step["tokens"], "steps": steps, "rounds": rounds,
                          f"steps_per_s (1 process x {threads} threads)": statistics.median(one),
                          f"steps_per_s ({threads} processes x 1 thread, summed)": statistics.median(side),
                          "gain": statistics.median(side) / statistics.median(one)})
    keep = ["batch", "tokens", "threads", "steps", "step_s", "gflop_per_step", "step_gflops", "matmul_gflops",
            "share_of_matmul_rate"]
    return {"commit": git_state()[0][:10], "step": {k: step[k] for k in keep}, "processes": processes}


def ceiling_keys(c: dict) -> dict:
    return {"attack_step_gflops": c["step"]["step_gflops"], "matmul_gflops": c["step"]["matmul_gflops"],
            "attack_step_share_of_matmul_rate": c["step"]["share_of_matmul_rate"],
            "processes_gain": {str(r["batch"]): r["gain"] for r in c["processes"]}}


def ceiling_section(c: dict) -> list[str]:
    return [CEILING_HEADER, "", f"Commit `{c['commit']}`. One attack step (`sae_clamp` on IOI prompts lengthened to "
            "refusal's length) in FLOPs (matrix products and attention, forward and backward, as torch's "
            "`FlopCounterMode` counts them) and GFLOP/s, against a 2048 x 2048 float32 matrix product at the same "
            "thread count: the practical ceiling of the model's dense layers.", "",
            table([c["step"]], list(c["step"])), "",
            "The same steps in one process per core (one thread each, side by side, summed) against one process "
            "using every core: whether running suites in parallel processes would beat torch's own threads.", "",
            table(c["processes"], list(c["processes"][0])), ""]


def update_ceiling(out: Path, threads: int, steps: int, rounds: int) -> None:
    c = ceiling(threads, steps, rounds)
    update_section(out, CEILING_HEADER, ceiling_section(c), ceiling_keys(c))
    print(json.dumps(c, indent=2))


UNEMBED_HEADER = "## Unembedding the read positions"


@contextmanager
def strided_unembedding(model):
    """The model without :func:`benchmark.modeling.models.unembed_contiguously`'s hook: the unembedding takes the strided
    slice of the read positions (torch then runs one product per row, each reading the whole weight)."""
    hooks = model.hf.get_output_embeddings()._forward_pre_hooks
    ours = {k: h for k, h in hooks.items() if h is contiguous_first_input}
    for k in ours:
        del hooks[k]
    try:
        yield
    finally:
        hooks.update(ours)


def unembedding(steps: int, rounds: int) -> list[dict]:
    """Attack steps (batch 64, IOI's length and refusal's, one read position and refusal's 12) with the contiguous
    and the strided unembedding input, alternating, median over ``rounds``. IOI's behavior reads the last of the
    12 positions; the unembedding and its backward still run over all of them, as refusal's do."""
    model, task, defense, flips = setup(n_test=4 * 64 + 16)
    rows = []
    for filler, read_len in ((0, 1), (32, 1), (32, 12)):
        batch = filled_flips(model, task, defense, flips, filler, 64)
        batch.read_len = read_len
        contiguous, strided = [], []
        for _ in range(rounds):
            contiguous.append(attack_step_seconds(model, task, defense, batch, steps))
            with strided_unembedding(model):
                strided.append(attack_step_seconds(model, task, defense, batch, steps))
        c, s = statistics.median(contiguous), statistics.median(strided)
        rows.append({"commit": git_state()[0][:10], "threads": torch.get_num_threads(), "batch": len(batch),
                     "tokens": int(batch.input_ids.shape[1]), "read_positions": read_len, "steps": steps,
                     "rounds": rounds,
                     "step_s (strided slice)": s, "step_s (contiguous)": c, "speedup": s / c})
    return rows


def unembedding_keys(rows: list[dict]) -> dict:
    return {"unembedding_speedup": {f"{r['tokens']}x{r['read_positions']}": r["speedup"] for r in rows}}


def unembedding_section(rows: list[dict]) -> list[str]:
    return [UNEMBED_HEADER, "", "Seconds per attack step (`sae_clamp` on IOI, batch 64, at IOI's length and lengthened "
            "to refusal's, reading logits at the last position or at refusal's 12) with the read positions handed to "
            "the unembedding as one contiguous block (what `benchmark` does) against the strided slice the model "
            "passes by itself, which torch runs as one product per row, each reading the whole 49152 x 576 weight; "
            "alternating in one process, median over rounds.", "", table(rows, list(rows[0])), ""]


def update_unembedding(out: Path, steps: int, rounds: int) -> None:
    rows = unembedding(steps, rounds)
    update_section(out, UNEMBED_HEADER, unembedding_section(rows), unembedding_keys(rows))
    print(json.dumps(rows, indent=2))


FIRST_RUN_HEADER = "## A first run: one suite, 8 examples"
FIRST_RUN = ["evaluate", "--defense", "sae_clamp", "--tasks", "ioi", "--limit", "8", "--quiet"]


def first_run(threads: int) -> list[dict]:
    """The README's one-minute run (``benchmark evaluate`` + :data:`FIRST_RUN`) as a user starts it, a fresh process
    each: once with an empty attribution cache (the first run of a defense on a suite) and once with it filled (every
    later run, and every other defense that fits from the same attribution). The model's float32 copy is taken from
    the user's cache both times (on a fresh machine set-up makes it once, 20-30 s). Wall time of the whole command and
    each stage's line as the run printed it."""
    import re
    import tempfile

    from benchmark.modeling.models import cache_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        for entry in cache_dir().iterdir():  # everything but the attribution totals
            if entry.name != "attribution":
                (cache / entry.name).symlink_to(entry)
        env = {**os.environ, "BENCHMARK_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
        for label in ("attribution not cached", "attribution cached"):
            cmd = [sys.executable, "-m", "benchmark.cli", *FIRST_RUN, "--threads", str(threads),
                   "--records-dir", str(Path(tmp) / label.replace(" ", "_"))]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
            stages = {m[1]: float(m[2]) for m in re.finditer(r"^  (.+): ([0-9.]+) s$", out, re.M)}
            rows.append({"run": label, "wall_s": time.perf_counter() - t0, **stages})
    return rows


def update_first_run(out: Path, threads: int) -> None:
    commit, dirty = git_state()
    load = os.getloadavg()[0]
    rows = first_run(threads)
    lines = [FIRST_RUN_HEADER, "",
             f"`benchmark {' '.join(FIRST_RUN)}` on the default model, {threads} thread(s), commit `{commit[:10]}`"
             f"{' (dirty)' if dirty else ''}, load average {load:.2f} at the start: the whole command's wall time "
             "(start-up and model load included) and each stage as the run printed it.", "",
             table(rows, list(rows[0])), ""]
    update_section(out, FIRST_RUN_HEADER, lines, {"first_run_seconds": {r["run"]: r["wall_s"] for r in rows}})
    print("\n".join(lines))


GPU_HEADER = "## GPU against the 2-core CPU"


def gpu_speed(steps: int, rounds: int, cpu_threads: int = 2) -> dict:
    """One attack step at batch 64 (IOI, ``sae_clamp``) on ``cpu_threads`` CPU threads and on the GPU in float32
    and bfloat16, each the median over ``rounds``, in this one process; the GPU's peak memory over those steps; and
    the wall time of the default command (``benchmark evaluate --defense reference``) on the GPU, records to a
    temporary folder."""
    import tempfile

    rows = []
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        torch.set_num_threads(cpu_threads if device == "cpu" else torch.get_num_threads())
        model, task, defense, flips = setup(device=device, dtype=dtype)
        batch = flips.select(list(range(min(64, len(flips)))))
        with model.on_device():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = statistics.median(attack_step_seconds(model, task, defense, batch, steps) for _ in range(rounds))
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        rows.append({"device": device if device == "cuda" else f"cpu ({cpu_threads} threads)", "dtype": dtype,
                     "batch": len(batch), "attack_step_s": step, "peak_gpu_mib": peak})
    for r in rows:
        r["speedup_vs_cpu"] = rows[0]["attack_step_s"] / r["attack_step_s"]
    with tempfile.TemporaryDirectory() as records:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "benchmark.cli", "evaluate", "--defense", "reference", "--device",
                        "cuda", "--records-dir", records, "--quiet"], cwd=ROOT, check=True)
        battery = time.time() - t0
    return {"rows": rows, "default_battery_gpu_seconds": battery,
            "gpu": torch.cuda.get_device_name(), "cpu_threads": cpu_threads}


def gpu_section(g: dict) -> list[str]:
    return [GPU_HEADER, "",
            f"On {g['gpu']}, in one process: one attack step of `sae_clamp` on IOI at batch 64 on the GPU against "
            f"{g['cpu_threads']} threads of the same machine's CPU (speedup: the CPU's step time over the row's), "
            "and the default command (`benchmark evaluate --defense reference`, every suite, bfloat16) on the GPU. "
            "Run by `scripts/gpu_check.sh`.", "",
            table(g["rows"], ["device", "dtype", "batch", "attack_step_s", "speedup_vs_cpu", "peak_gpu_mib"]), "",
            f"Default command on the GPU: {g['default_battery_gpu_seconds']:.1f} s.", ""]


def update_gpu(out: Path, steps: int, rounds: int) -> None:
    g = gpu_speed(steps, rounds)
    keys = {"gpu": g["gpu"], "gpu_step_speedup_bfloat16": g["rows"][2]["speedup_vs_cpu"],
            "gpu_step_speedup_float32": g["rows"][1]["speedup_vs_cpu"],
            "default_battery_gpu_seconds": g["default_battery_gpu_seconds"]}
    update_section(out, GPU_HEADER, gpu_section(g), keys)
    print(json.dumps(g, indent=2))


def replace_section(md: str, header: str, lines: list[str]) -> str:
    """``md`` with the ``## `` section ``header`` replaced by ``lines``, or inserted before the default battery's."""
    text = "\n".join(lines)
    start = md.find(header + "\n")
    if start < 0:
        cut = md.index(BATTERY_HEADER)
        return md[:cut] + text + "\n" + md[cut:]
    end = md.find("\n## ", start)
    return md[:start] + text + ("" if end < 0 else md[end:])


def update_section(out: Path, header: str, lines: list[str], keys: dict) -> None:
    """Rewrite one section of ``out``/perf.md and its headline ``keys`` in perf.json; the other figures stay."""
    headline = {**json.loads((out / "perf.json").read_text()), **keys}
    write_text_atomic(out / "perf.md", replace_section((out / "perf.md").read_text(), header, lines))
    write_text_atomic(out / "perf.json", json.dumps(headline, indent=2) + "\n")


def examples_scaling(model, task, defense, flips, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        batch = flips.select(list(range(min(n, len(flips)))))
        t0 = time.perf_counter()
        build_attack(model, defense, task, AttackConfig()).run(batch, progress=False)
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
    update_section(out, BATTERY_HEADER, battery_section(battery), battery_keys(battery))
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
    ap.add_argument("--ceiling-only", action="store_true",
                    help="only measure the machine's ceiling and threads against processes into perf.json and "
                         "perf.md; the other figures stay")
    ap.add_argument("--suffix-only", action="store_true",
                    help="only measure the soft suffix's step against a full pass into perf.json and perf.md")
    ap.add_argument("--unembedding-only", action="store_true",
                    help="only measure attack steps with the contiguous against the strided unembedding input into "
                         "perf.json and perf.md")
    ap.add_argument("--first-run-only", action="store_true",
                    help="only time the README's one-minute run (sae_clamp on IOI, --limit 8), without and with the "
                         "attribution cache, into perf.json and perf.md")
    ap.add_argument("--gpu-only", action="store_true",
                    help="only measure attack steps on the GPU against 2 CPU threads, and the default command on the "
                         "GPU, into perf.json and perf.md (needs CUDA; scripts/gpu_check.sh runs it)")
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
    if args.ceiling_only:
        update_ceiling(args.out, args.threads, steps, rounds)
        return
    if args.gpu_only:
        update_gpu(args.out, steps, rounds)
        return
    if args.first_run_only:
        update_first_run(args.out, args.threads)
        return
    torch.set_num_threads(args.threads)
    if args.suffix_only:
        update_suffix(args.out, steps, rounds)
        return
    if args.unembedding_only:
        update_unembedding(args.out, steps, rounds)
        return
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
    print("ceiling ...", file=sys.stderr, flush=True)
    top = ceiling(args.threads, steps, rounds)
    print("soft suffix ...", file=sys.stderr, flush=True)
    suffix = suffix_speed(model, task, defense, flips, steps, rounds)
    print("unembedding ...", file=sys.stderr, flush=True)
    unembed = unembedding(steps, rounds)
    print("examples ...", file=sys.stderr, flush=True)
    by_examples = examples_scaling(model, task, defense, flips, (16, 32) if args.quick else (16, 32, 64, 128))
    battery = default_battery_seconds()
    headline = {
        "step_ratio_vs_raw": ratio["ratio_same_blocks"],
        "step_ratio_vs_raw_full_network": ratio["ratio_full"],
        "speedup_vs_per_example": speed["speedup"],
        "allocator_speedup": ab["speedup"],
        **ceiling_keys(top),
        "soft_suffix_speedup_vs_full_pass": suffix["speedup"],
        **unembedding_keys(unembed),
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
        *ceiling_section(top),
        *suffix_section(suffix),
        *unembedding_section(unembed),
        *battery_section(battery),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "perf.md", "\n".join(md))
    write_text_atomic(args.out / "perf.json", json.dumps(headline, indent=2) + "\n")
    print(json.dumps(headline, indent=2))


if __name__ == "__main__":
    main()
