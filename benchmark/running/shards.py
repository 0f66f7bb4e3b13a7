"""A run in chunks: resuming an interrupted run, sharding one over processes, and merging the shards.

The unit of work is one attack chunk: ``batch_size`` valid flips in length order (see
:meth:`tasks.base.PromptBatch.length_order`), attacked together and their recovered examples replayed together; a
chunk's results depend on that chunk alone. A run can therefore stop after any chunk and go on later, and ``n``
processes can share it: shard ``i`` of ``n`` runs the chunks whose index is ``i`` modulo ``n`` (fitting the
defense and scoring base and defended behavior are deterministic, so every shard repeats them).

A *partial run* file holds what finishing the record needs: the run's fingerprint, its head (every part of the
record that does not come from the attack: see :func:`benchmark.running.engine.run_head`) and the results of its finished
chunks. It is rewritten atomically after every chunk. An unsharded run keeps it at
``<suite>__<mode>.json.partial`` and deletes it once the record is written; shard ``i`` of ``n`` writes
``<suite>__<mode>.shard-i-of-n.json`` beside the record, and ``benchmark merge`` turns a complete set of shards
into the record one unsharded run writes (:func:`benchmark.running.records.build_record` on the first shard's head and
every chunk's results in chunk order).

The fingerprint hashes what determines the results: benchmark version, model revision, SAEs (with weight
hashes), defense name, version, parameters and defended features, task data and split hashes, every attack
setting, the code (commit, and a hash of uncommitted changes) and the valid flips. A file with another
fingerprint is never resumed from or merged.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmark.errors import BenchmarkError
from benchmark.files import remove_stale_temporaries, write_json_atomic
from benchmark.running.metrics import is_valid_flip
from benchmark.running.records import SCHEMA_PATH, SHARD_FILE, build_record, checkpoint_path, shard_path, write_record
from tasks import TASKS

FORMAT = "partial-run-1"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the chunks whose index is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise BenchmarkError(f"shard {self.index}/{self.count} does not exist: use i/n with 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, sep, count = text.partition("/")
        if not (sep and index.isdigit() and count.isdigit()):
            raise BenchmarkError(f"--shard expects i/n (e.g. 0/4), got '{text}'")
        return cls(int(index), int(count))

    def chunks(self, total: int) -> list[int]:
        return list(range(self.index, total, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()


def partial_path(record: Path, shard: Shard) -> Path:
    """Where a run (or one shard of it) keeps its partial run."""
    return checkpoint_path(record) if shard == WHOLE else shard_path(record, shard.index, shard.count)


def chunk_rows(chunk: int, size: int, n_flips: int) -> list[int]:
    """Positions among the valid flips (length order) of chunk ``chunk``."""
    return list(range(chunk * size, min((chunk + 1) * size, n_flips)))


def fingerprint(head: dict, attack_settings: dict, code: dict) -> str:
    """sha256 over what determines a run's results (see the module docstring); ``attack_settings`` is
    :meth:`AttackConfig.to_record`, ``code`` the commit, dirty flag and hash of uncommitted changes."""
    identity = {k: head[k] for k in ("benchmark_version", "model", "saes", "defense", "task")}
    identity.update(attack=attack_settings, code=code,
                    flips=[s["id"] for s in head["examples"] if is_valid_flip(s["b_base"], s["b_defended"])])
    return "sha256:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def recorded_fingerprint(path: Path) -> str | None:
    """The fingerprint a finished record at ``path`` was made with (None: no record, or one from before them)."""
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("provenance", {}).get("fingerprint")


def _read(path: Path) -> dict:
    """A partial run file, checked against ``schema/partial_run.schema.json``."""
    import jsonschema

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"cannot read partial run {path}: {err}") from None
    schema = json.loads(SCHEMA_PATH.with_name("partial_run.schema.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if errors:
        raise BenchmarkError(f"{path} is not a partial run ({errors[0].message}); remove it or pass shard files only")
    return data


class PartialRun:
    """The finished chunks of one run or shard, in a file rewritten atomically after every chunk."""

    def __init__(self, path: Path, fingerprint: str, shard: Shard, total: int, head: dict,
                 stamp: Callable[[float], dict], started: float, done: dict[int, list[dict]], seconds_before: float):
        self.path, self.fingerprint, self.shard, self.total, self.head = path, fingerprint, shard, total, head
        self.stamp, self.started, self.done, self.seconds_before = stamp, started, done, seconds_before

    @classmethod
    def resume(cls, path: Path, fingerprint: str, shard: Shard, total: int, head: dict,
               stamp: Callable[[float], dict], started: float) -> "PartialRun":
        """Pick up the chunks finished in ``path`` when it has this run's fingerprint (else start over, saying
        why). ``stamp(wall_seconds)`` gives the provenance saved with each write. Temporary files of a write of
        ``path`` that was killed are removed."""
        remove_stale_temporaries(path)
        done, before = {}, 0.0
        if path.exists():
            try:
                data = _read(path)
            except BenchmarkError as err:
                print(f"ignoring {path.name}: {err}; starting over", flush=True)
            else:
                if data["fingerprint"] != fingerprint:
                    print(f"ignoring {path.name}: it comes from a different run (other code, data, defense or "
                          "attack settings); starting over", flush=True)
                else:
                    done = {c["index"]: c["results"] for c in data["chunks"]}
                    before = data["provenance"]["wall_seconds"]
                    print(f"resuming: {len(done)} of {len(shard.chunks(total))} chunks done ({path.name})", flush=True)
        return cls(path, fingerprint, shard, total, head, stamp, started, done, before)

    def todo(self) -> list[int]:
        return [c for c in self.shard.chunks(self.total) if c not in self.done]

    def wall_seconds(self) -> float:
        """Seconds spent on this run, over every session that worked on it."""
        return self.seconds_before + time.time() - self.started

    def add(self, chunk: int, results: list[dict]) -> None:
        self.done[chunk] = results
        self.save()

    def content(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint,
                "shard": {"index": self.shard.index, "count": self.shard.count}, "chunks_total": self.total,
                "head": self.head, "provenance": self.stamp(self.wall_seconds()),
                "chunks": [{"index": c, "results": self.done[c]} for c in sorted(self.done)]}

    def save(self) -> dict:
        data = self.content()
        write_json_atomic(self.path, data)
        return data

    def results(self) -> list[dict]:
        """Every finished chunk's results, in chunk order (for the whole run: one per valid flip)."""
        return [r for c in sorted(self.done) for r in self.done[c]]

    def record(self) -> dict:
        """The run record (an unsharded run, every chunk done)."""
        return build_record(self.head, self.results(), self.stamp(self.wall_seconds()), _outcome_metrics(self.head))


def _outcome_metrics(head: dict) -> Callable[[list[dict]], dict]:
    """The suite's outcome metrics for the record (:meth:`TaskSuite.outcome_metrics`), from its registry."""
    return TASKS.get(head["task"]["name"]).outcome_metrics


def shard_files(paths: list[Path]) -> dict[Path, list[Path]]:
    """Shard files among ``paths`` (files, or folders searched recursively), grouped by the record they make."""
    groups: dict[Path, list[Path]] = defaultdict(list)
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise BenchmarkError(f"{path} does not exist")
        for f in sorted(path.rglob("*.json")) if path.is_dir() else [path]:
            m = SHARD_FILE.match(f.name)
            if m is None and not path.is_dir():
                raise BenchmarkError(f"{f} is not a shard file (<suite>__<mode>.shard-<i>-of-<n>.json)")
            if m is not None:
                groups[f.with_name(m["stem"] + ".json")].append(f)
    if not groups:
        raise BenchmarkError(f"no shard files (*.shard-<i>-of-<n>.json) in {', '.join(map(str, paths))}; "
                             "run `benchmark evaluate --shard i/n` first")
    return dict(groups)


def merge(record_path: Path, files: list[Path], command: str = "") -> dict:
    """The record of ``record_path`` from its complete set of shard files, written there.

    Its provenance is the first shard's, with the shards' wall seconds summed, every device named, the latest
    shard's time and ``command`` (the merge) noted after the first shard's command."""
    shards = {f: _read(f) for f in files}
    (first_file, first), *rest = sorted(shards.items(), key=lambda kv: kv[1]["shard"]["index"])
    for f, data in rest:
        if data["fingerprint"] != first["fingerprint"]:
            raise BenchmarkError(f"{f.name} and {first_file.name} come from different runs (fingerprints differ: "
                                 "code, data, defense or attack settings); rerun the stale shard")
    count = first["shard"]["count"]
    have = sorted(d["shard"]["index"] for d in shards.values())
    if have != list(range(count)) or any(d["shard"]["count"] != count for d in shards.values()):
        missing = sorted(set(range(count)) - set(have))
        raise BenchmarkError(f"{record_path.name} needs shards 0..{count - 1} of {count}, found "
                             f"{', '.join(sorted(f.name for f in files))}"
                             + (f" (missing: {', '.join(f'{i}/{count}' for i in missing)})" if missing else "")
                             + f"; run `benchmark evaluate ... --shard i/{count}` for each missing one and "
                             "remove stale shard files")
    done: dict[int, list[dict]] = {}
    for f, data in shards.items():
        shard = Shard(data["shard"]["index"], count)
        chunks = {c["index"]: c["results"] for c in data["chunks"]}
        if sorted(chunks) != shard.chunks(data["chunks_total"]):
            raise BenchmarkError(f"{f.name} has {len(chunks)} of {len(shard.chunks(data['chunks_total']))} chunks: "
                                 f"rerun its `benchmark evaluate ... --shard {shard}` to finish it")
        done.update(chunks)
    prov = [d["provenance"] for d in sorted(shards.values(), key=lambda d: d["shard"]["index"])]
    merged = {**prov[0], "wall_seconds": round(sum(p["wall_seconds"] for p in prov), 1),
              "device": ", ".join(sorted({p["device"] for p in prov})),
              "created_utc": max(p["created_utc"] for p in prov),
              "command": f"{prov[0]['command']} [{count} shards; {command or 'benchmark merge'}]".strip()}
    record = build_record(first["head"], [r for c in sorted(done) for r in done[c]], merged,
                          _outcome_metrics(first["head"]))
    write_record(record, record_path)
    return record
