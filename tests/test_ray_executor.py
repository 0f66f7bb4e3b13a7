"""The Ray executor on a local instance with 2 single-thread workers and the tiny model: a battery's records equal the
serial battery's, example by example; a worker killed during a chunk is replaced and the records are still the same;
a run that raises is reported while the others finish.

The battery is a small plan in the shape of the real one (the full plan on the tiny model takes minutes and most of
its runs fail there: their default layers and wmdp_bio's tokens do not fit the tiny model): each suite's reference
defense on IOI and TPP with two attacks in chunks of 16 (several chunks a run), a repeat of one of those runs
(done once), a run that fails with a BenchmarkError (wmdp_bio on the tiny model), and a submitted defense that works
on IOI and raises in its fit on TPP.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.running import battery
from benchmark.running.battery import Step

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")  # CI must have the extra

FLAKY_FIT = '''
from defenses.sae_clamp import SAEClamp


class Clamp(SAEClamp):
    """A clamp, submitted, that breaks on TPP."""

    def fit(self, ctx):
        if ctx.task.name == "tpp":
            raise RuntimeError("broken on purpose")
        super().fit(ctx)
'''
MANIFEST = {"name": "flaky_fit", "version": "0.0.1", "authors": ["A. Tester"], "contact": "tester@example.org",
            "adapter": "adapter_flaky_fit:Clamp", "parameters": {"layer": 2, "k": 4, "value": -4.0},
            "license": "MIT", "description": "a clamp that raises in its fit on TPP", "suites": ["ioi", "tpp"],
            "models": ["tiny"]}
CHUNKS = ("--batch-size", "16")
FAILING = {"sae_clamp on wmdp_bio, attack encoder": "suite wmdp_bio (scoring='cloze') cannot run on",
           "flaky_fit on tpp, attack encoder": "RuntimeError: broken on purpose"}


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> tuple[Step, ...]:
    folder = tmp_path_factory.mktemp("submissions") / "flaky_fit"
    folder.mkdir()
    (folder / "adapter_flaky_fit.py").write_text(FLAKY_FIT)
    (folder / "submission.json").write_text(json.dumps(MANIFEST))
    return (Step("reference", ("ioi", "tpp"), ("encoder", "none"), options=CHUNKS),
            Step("sae_clamp", ("wmdp_bio", "ioi"), ("encoder",)),
            Step(str(folder), ("ioi", "tpp"), ("encoder",), options=CHUNKS))


def _battery(plan, root: Path, *extra: str) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(battery, "PLAN", plan)
        return main(["battery", "--model", "tiny", "--threads", "1", "--quiet", "--records-dir", str(root), *extra])


def _records(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}


@pytest.fixture(scope="module")
def serial(plan, tmp_path_factory):
    """The serial battery: (exit status, records by path under the records folder)."""
    root = tmp_path_factory.mktemp("serial")
    return _battery(plan, root), _records(root)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (the executor uses the instance it finds connected)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _same_records(ours: dict[str, dict], serial: dict[str, dict]) -> None:
    assert sorted(ours) == sorted(serial)
    for path, record in ours.items():
        reference = serial[path]
        assert record["examples"] == reference["examples"], path  # example by example
        assert {k: v for k, v in record.items() if k != "provenance"} == \
               {k: v for k, v in reference.items() if k != "provenance"}, path
        assert record["provenance"]["fingerprint"] == reference["provenance"]["fingerprint"], path


def test_serial_battery_reports_failed_runs_and_goes_on(serial):
    code, records = serial
    assert code == 2
    assert len(records) == 5  # sae_clamp and tpp_ablation with 2 attacks each, and the submission on IOI
    assert "tiny/flaky_fit/ioi__encoder.json" in records


def test_ray_battery_equals_the_serial_battery(plan, serial, local_ray, tmp_path, capsys):
    code = _battery(plan, tmp_path, "--executor", "ray", "--workers", "2")
    out, err = capsys.readouterr()
    assert code == 2
    _same_records(_records(tmp_path), serial[1])
    assert not list(tmp_path.rglob("*.partial")), "no checkpoint is left once a record is written"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(FAILING)
    for label, message in FAILING.items():
        assert any(line.startswith(f"error: {label}: ") and message in line for line in errors), errors
    finished = [line for line in out.splitlines() if line.startswith("== ") and " s -> " in line]
    assert len(finished) == 5 and "2 Ray workers on cpu, 1 thread(s) each; 7 runs" in out


def _kill_a_worker_in_a_chunk(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first worker of this process's Ray instance (a descendant: the instance's raylet starts them)
    seen attacking a chunk (its title is ``ray::Worker.chunk``)."""
    import psutil

    while not stop.is_set() and not killed:
        for proc in psutil.Process().children(recursive=True):
            try:
                busy = "ray::Worker.chunk" in " ".join(proc.cmdline())
            except psutil.Error:  # gone meanwhile
                continue
            if busy:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.01)


def test_a_worker_killed_during_a_chunk_leaves_the_records_unchanged(plan, serial, local_ray, tmp_path, capsys):
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_in_a_chunk, args=(killed, stop), daemon=True)
    killer.start()
    try:
        code = _battery(plan, tmp_path, "--executor", "ray", "--workers", "2")
    finally:
        stop.set()
        killer.join()
    out = capsys.readouterr().out
    assert len(killed) == 1, "no worker was seen in a chunk"
    assert "died during" in out and "is replaced; the work goes again" in out
    assert code == 2  # the two failing runs, as serially
    _same_records(_records(tmp_path), serial[1])


def test_executor_ray_without_ray_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code = main(["evaluate", "--model", "tiny", "--defense", "sae_clamp", "--tasks", "ioi", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[ray]"' in err


def test_shard_is_refused_with_ray(capsys):
    code = main(["evaluate", "--model", "tiny", "--defense", "sae_clamp", "--executor", "ray", "--shard", "0/2"])
    assert code == 2 and "drop --shard" in capsys.readouterr().err


def test_a_gpu_is_asked_for_only_where_the_cluster_has_one(local_ray, capsys):
    code = main(["evaluate", "--model", "tiny", "--defense", "sae_clamp", "--tasks", "ioi", "--executor", "ray",
                 "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda with --executor ray" in err and "this one has 0" in err
