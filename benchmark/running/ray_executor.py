"""Many runs, and the attack chunks of each, as work for Ray workers (``--executor ray``; the optional extra ``ray``).

A worker is a Ray actor holding one loaded model, reused for every run and chunk it gets, on a GPU of its own or on
CPU threads (:class:`RayOptions`); SAEs load per run, as serially (well under a second, and no run's defense can
touch another's SAE). The work of a run is its
preparation (fit the defense, score base and defended, measure side effects: :class:`~benchmark.running.engine.
PreparedRun`), which returns the record's head, then one item per attack chunk, which returns that chunk's results.
A chunk's results depend on the chunk alone (see :mod:`benchmark.running.shards`), so any worker can take it: one that
prepared the run reuses what it prepared, another prepares the run again (fit and scores are deterministic). Nothing
assumes a shared filesystem: workers only return values, and this process (the driver) keeps each run's finished
chunks in its ``.partial`` file, rewritten atomically after every chunk, and joins them into the record exactly as an
unsharded run and ``benchmark merge`` do (:class:`~benchmark.running.shards.PartialRun`). A driver that is stopped and
started again resumes from those files.

Faults: a work item whose worker process dies (killed, out of memory, a lost node) goes again on a restarted worker,
up to :data:`WORKER_DEATHS` times; a run whose work raises (a broken defense, a bad parameter) fails once, is reported
with its error, and the other runs go on.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmark.errors import BenchmarkError, one_line
from benchmark.running.engine import PreparedRun, RunSpec, code_state
from benchmark.running.records import git_state, provenance, summary, write_record
from benchmark.running.shards import WHOLE, PartialRun, fingerprint, partial_path, recorded_fingerprint

#: times the worker of one work item may die before its run is reported as failed
WORKER_DEATHS = 3
#: prepared runs a worker keeps for chunks still to come (each holds the run's scored examples and residual store)
KEEP_PREPARED = 2
INSTALL = 'pip install -e ".[ray]"'


def import_ray():
    """The ``ray`` module, or a :class:`BenchmarkError` naming the install."""
    try:
        import ray
    except ImportError:
        raise BenchmarkError(f"--executor ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """``model``: the model every worker loads, on ``device`` (``cuda``: one GPU of its own per worker; ``cpu``; None:
    ``cuda`` when the cluster has GPUs) with weights in ``dtype`` (see :func:`~benchmark.modeling.models.resolve_dtype`).
    ``threads``: torch CPU threads (and Ray CPUs) per worker. ``workers``: how many (None: the cluster's GPUs, or on
    CPUs its CPUs / ``threads``). ``address``: an existing cluster (None: ``RAY_ADDRESS`` if set, else a local
    instance for this command)."""

    model: str
    threads: int = 1
    workers: int | None = None
    address: str | None = None
    device: str | None = None
    dtype: str | None = None


class Worker:
    """One Ray actor: a loaded model and the runs it prepared lately (:data:`KEEP_PREPARED`)."""

    def __init__(self, model: str, threads: int, device: str, dtype: str | None) -> None:
        import torch

        from benchmark.allocator import keep_freed_memory
        from benchmark.modeling.models import load_model

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub at run time, as on the command line
        keep_freed_memory()  # as the command does
        torch.set_num_threads(threads)
        self.model = load_model(model, device=device, dtype=dtype)  # cuda: the GPU Ray gave this worker
        self.prepared: OrderedDict[int, PreparedRun] = OrderedDict()

    def identity(self) -> dict:
        """What must agree with the driver: the code and the model; and the process, for a report."""
        return {"code": code_state(git_state()), "model": self.model.name, "pid": os.getpid()}

    def prepare(self, key: int, spec: RunSpec) -> dict:
        """Prepare run ``key`` and measure its side effects: its head, its number of chunks and where it ran."""
        from benchmark.running.records import machine

        with self.model.on_device():
            run = self._prepared(key, spec)
            run.measure()
        return {"head": run.head, "chunks": run.n_chunks, "machine": machine(self.model)}

    def chunk(self, key: int, spec: RunSpec, index: int) -> dict:
        """The results of chunk ``index`` of run ``key``, and where they were computed."""
        from benchmark.running.records import machine

        with self.model.on_device():
            results = self._prepared(key, spec).chunk(index, progress=False)
        return {"results": results, "machine": machine(self.model)}

    def _prepared(self, key: int, spec: RunSpec) -> PreparedRun:
        if key not in self.prepared:
            self.prepared[key] = spec.prepare(self.model)
            while len(self.prepared) > KEEP_PREPARED:
                self.prepared.popitem(last=False)
        self.prepared.move_to_end(key)
        return self.prepared[key]


@dataclass
class _Run:
    """The driver's state of one run."""

    key: int
    spec: RunSpec
    path: Path
    started: float = 0.0
    partial: PartialRun | None = None
    devices: set[str] = field(default_factory=set)
    threads: set[int] = field(default_factory=set)
    dtype: str = "float32"
    failed: bool = False


@dataclass
class _Item:
    """One piece of work: a run's preparation (``chunk`` None) or one of its chunks."""

    run: _Run
    chunk: int | None = None
    deaths: int = 0


class _Driver:
    """Hands work to idle workers, collects results, writes checkpoints and records, reports."""

    def __init__(self, ray: Any, new_worker: Callable[[], Any], workers: list, specs: list[RunSpec], model: str,
                 records_root: Path, command: str, progress: bool) -> None:
        from tqdm import tqdm

        self.ray, self.new_worker, self.actors, self.command = ray, new_worker, workers, command
        self.git = git_state()
        self.code = code_state(self.git)
        self.new = deque(_Run(i, s, s.record_path(model, records_root)) for i, s in enumerate(specs))
        self.queue: deque[_Item] = deque()
        self.has: dict[int, set[int]] = {a: set() for a in range(len(workers))}  # actor -> runs it prepared
        self.failures: list[tuple[str, str]] = []
        self.bar = tqdm(total=len(specs), unit="run", disable=not progress, file=sys.stderr)

    def run(self) -> list[tuple[str, str]]:
        in_flight: dict[Any, tuple[int, _Item]] = {}
        idle = list(range(len(self.actors)))
        while self.new or self.queue or in_flight:
            while idle and (item := self._next_for(idle[0])) is not None:
                a = idle.pop(0)
                in_flight[self._submit(a, item)] = (a, item)
            ready, _ = self.ray.wait(list(in_flight), num_returns=1)
            a, item = in_flight.pop(ready[0])
            idle.append(a)
            self._collect(a, item, ready[0])
        self.bar.close()
        return self.failures

    def _next_for(self, a: int) -> _Item | None:
        """Work for worker ``a``: a chunk of a run it prepared, else a preparation, else any chunk (the worker
        prepares that run again)."""
        choice = next((i for i in self.queue if i.chunk is None or i.run.key in self.has[a]), None)
        if choice is None and self.new:
            return _Item(self.new.popleft())
        if choice is None and self.queue:
            choice = self.queue[0]
        if choice is not None:
            self.queue.remove(choice)
        return choice

    def _submit(self, a: int, item: _Item):
        run, actor = item.run, self.actors[a]
        self.has[a].add(run.key)
        if item.chunk is None:
            run.started = run.started or time.time()
            return actor.prepare.remote(run.key, run.spec)
        return actor.chunk.remote(run.key, run.spec, item.chunk)

    def _collect(self, a: int, item: _Item, ref) -> None:
        run = item.run
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:  # the worker process died: a new one takes its place
            self.ray.kill(self.actors[a], no_restart=True)
            self.actors[a], self.has[a] = self.new_worker(), set()
            item.deaths += 1
            what = "preparation" if item.chunk is None else f"chunk {item.chunk + 1}"
            if item.deaths >= WORKER_DEATHS:
                return self._fail(run, f"its worker died {item.deaths} times ({what}): {one_line(err, 200)}")
            if not run.failed:
                self._line(f"   worker {a} died during {run.spec.label()} ({what}) and is replaced; the work goes "
                           "again")
                self.queue.appendleft(item)
            return
        except self.ray.exceptions.RayTaskError as err:  # the run's own code raised: it would raise again
            cause = err.cause if isinstance(err.cause, BaseException) else err
            text = str(cause) if isinstance(cause, BenchmarkError) else f"{type(cause).__name__}: {one_line(cause)}"
            return self._fail(run, one_line(text, 1000))
        if run.failed:
            return
        run.devices.add(value["machine"]["device"])
        run.threads.add(value["machine"]["cpu_threads"])
        run.dtype = value["machine"]["dtype"]
        if item.chunk is None:
            self._prepared(run, value)
        else:
            run.partial.add(item.chunk, value["results"])
            self.bar.set_postfix_str(f"{run.spec.label()}: chunk {item.chunk + 1} of {run.partial.total}")
            if not run.partial.todo():
                self._finish(run)

    def _prepared(self, run: _Run, value: dict) -> None:
        head = value["head"]
        run_id = fingerprint(head, run.spec.attack.to_record(), self.code)
        if recorded_fingerprint(run.path) == run_id:
            self._line(f"== {run.spec.label()}: done already ({run.path} comes from this very run)")
            self.bar.update()
            return
        run.partial = PartialRun.resume(partial_path(run.path, WHOLE), run_id, WHOLE, value["chunks"], head,
                                        lambda seconds: self._stamp(run, seconds, run_id), run.started)
        todo = run.partial.todo()
        self.queue.extend(_Item(run, c) for c in todo)
        if not todo:
            self._finish(run)

    def _stamp(self, run: _Run, seconds: float, run_id: str) -> dict:
        """The run's provenance: this command and code, the workers' devices, dtype and threads."""
        return {**provenance(seconds, self.command, self.git, run_id), "device": ", ".join(sorted(run.devices)),
                "dtype": run.dtype, "cpu_threads": max(run.threads)}

    def _finish(self, run: _Run) -> None:
        record = run.partial.record()
        write_record(record, run.path)
        run.partial.path.unlink(missing_ok=True)
        self._line(f"== {run.spec.label()}: {summary(record)}; {time.time() - run.started:.0f} s -> {run.path}")
        self.bar.update()

    def _fail(self, run: _Run, line: str) -> None:
        if run.failed:
            return
        run.failed = True
        self.queue = deque(i for i in self.queue if i.run is not run)
        self.failures.append((run.spec.label(), line))
        self._line(f"error: {run.spec.label()}: {line}", error=True)
        self.bar.update()

    def _line(self, text: str, error: bool = False) -> None:
        file = sys.stderr if error else sys.stdout
        self.bar.write(text, file=file)
        file.flush()


def run_on_ray(specs: list[RunSpec], options: RayOptions, records_root: Path, command: str = "",
               progress: bool = True) -> list[tuple[str, str]]:
    """Run ``specs`` on Ray workers, writing each record under ``records_root`` (one line per finished run, a
    progress bar over runs); returns the failed runs, each (label, error line), after every other run finished.

    Uses the Ray instance this process is connected to, else the cluster at ``options.address`` (or
    ``RAY_ADDRESS``), else a local instance started here and stopped at the end."""
    from benchmark.modeling.models import MODELS, model_name

    ray = import_ray()
    if not specs:
        return []
    if options.model not in MODELS and not Path(options.model).is_dir():
        raise BenchmarkError(f"unknown model '{options.model}': use one of {', '.join(MODELS)} or a local Hugging "
                             "Face model folder")
    started_here = not ray.is_initialized()
    if started_here:
        local = options.address is None and "RAY_ADDRESS" not in os.environ
        cpus = options.workers * options.threads if local and options.workers else None
        ray.init(address=options.address, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        device = options.device or ("cuda" if gpus else "cpu")
        if device not in ("cpu", "cuda") or device == "cuda" and not gpus:
            raise BenchmarkError(f"--device {device} with --executor ray: use cpu, or cuda on a Ray cluster with GPUs "
                                 f"(each worker gets one of its own; this one has {gpus})")
        gpu = device == "cuda"
        workers = options.workers or (gpus if gpu else max(1, int(resources.get("CPU", 1)) // options.threads))
        remote = ray.remote(num_cpus=options.threads, num_gpus=1 if gpu else 0, max_restarts=0)(Worker)
        new_worker = lambda: remote.remote(options.model, options.threads, device, options.dtype)  # noqa: E731
        actors = [new_worker() for _ in range(workers)]
        _check_workers(ray, actors, model_name(options.model))
        print(f"{len(actors)} Ray workers on {device}, {options.threads} thread(s) each; {len(specs)} runs",
              flush=True)
        return _Driver(ray, new_worker, actors, specs, model_name(options.model), records_root, command,
                       progress).run()
    finally:
        if started_here:
            ray.shutdown()


def _check_workers(ray: Any, actors: list, model: str) -> None:
    """Every worker loaded ``model`` and runs the driver's code (a record names the code it ran)."""
    try:
        seen = ray.get([a.identity.remote() for a in actors])
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None)
        raise BenchmarkError(f"a Ray worker could not start: {one_line(cause or err)}") from None
    code = code_state(git_state())
    for who in seen:
        if who["code"] != code:
            raise BenchmarkError(f"Ray worker (pid {who['pid']}) runs other code than this command (commit "
                                 f"{who['code']['commit'][:10]}, uncommitted changes {who['code']['diff']}, here "
                                 f"{code['commit'][:10]}, {code['diff']}): install the same checkout on every node")
        if who["model"] != model:
            raise BenchmarkError(f"Ray worker (pid {who['pid']}) loaded model '{who['model']}', not '{model}'")
