"""Run records: assembly from a run's parts, validation against the JSON schema, provenance, crash-safe writing,
and where a run's files live."""

from __future__ import annotations

import json
import math
import hashlib
import platform
import re
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch

from benchmark.errors import BenchmarkError
from benchmark.files import write_json_atomic
from benchmark.modeling.models import LoadedModel, dtype_name
from benchmark.running.metrics import budget_curve, is_valid_flip, monitor_detection_rate, summarize

SCHEMA_PATH = Path(__file__).parent / "schema" / "run_record.schema.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
RECORDS_DIR = REPO_ROOT / "leaderboard" / "records"
SCHEMA_VERSION = "1.0"


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} is not allowed in a run record")


def _finite(obj, where: str = "record") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise BenchmarkError(f"{where} is {obj}; records hold finite numbers or null")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def validate_record(record: dict) -> None:
    """Raise :class:`BenchmarkError` naming the first schema violation (or a NaN/inf anywhere)."""
    import jsonschema

    _finite(record)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise BenchmarkError(f"run record invalid at {path}: {err.message}")
    for i, row in enumerate(record["examples"]):  # DESIGN.md's definitions, which the schema cannot state
        if row["valid_flip"] and row["recovered"] != (row["b_attacked"] is not None and row["b_attacked"] > 0):
            raise BenchmarkError(f"run record invalid at examples.{i} ({row['id']}): recovered must be "
                                 f"b_attacked > 0, got recovered={row['recovered']}, b_attacked={row['b_attacked']}")


def load_record(path: Path) -> dict:
    record = json.loads(Path(path).read_text(), parse_constant=_reject_constant)
    validate_record(record)
    return record


def write_record(record: dict, path: Path) -> None:
    validate_record(record)
    write_json_atomic(path, record)


def record_path(model: str, defense: str, task: str, mode: str, root: Path = RECORDS_DIR,
                limit: int | None = None) -> Path:
    """Where the record of a run goes: ``<root>/<model>/<defense>/<task>__<mode>.json``; a run on the first
    ``limit`` test examples only writes ``<task>__<mode>.limit-<limit>.json`` beside it, never over a full run's."""
    safe = lambda s: s.replace("/", "--")  # noqa: E731
    return root / safe(model) / safe(defense) / f"{task}__{mode}{'' if limit is None else f'.limit-{limit}'}.json"


def summary(record: dict) -> str:
    """A finished run's outcome in one line: valid flips, examples, recovered and the recovery rate."""
    c, m = record["counts"], record["metrics"]
    rate = "n/a" if m["recovery_rate"] is None else f"{m['recovery_rate']:.3f}"
    limited = "" if comparable(record) else f", the first {record['task']['limit']} only: not comparable, never ranked"
    return (f"{c['valid_flips']} valid flips of {c['base_behavior']} with the behavior ({c['examples']} examples"
            f"{limited}); recovered {c['recovered']} (rate {rate})")


def comparable(record: dict) -> bool:
    """Whether a record may be ranked against others: False for a run on the first ``task.limit`` test examples only
    (``benchmark evaluate --limit``), a cheap check whose figures come from a different, smaller test set."""
    return record["task"].get("limit") is None


#: a shard's partial run beside its record: ``<suite>__<mode>.shard-<i>-of-<n>.json`` (not a run record)
SHARD_FILE = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.json$")


def shard_path(record: Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` keeps its partial run (see :mod:`benchmark.running.shards`)."""
    return record.with_name(f"{record.stem}.shard-{index}-of-{count}.json")


def checkpoint_path(record: Path) -> Path:
    """Where an unsharded run keeps its finished chunks until the record is written."""
    return record.with_name(record.name + ".partial")


def record_files(root: Path = RECORDS_DIR) -> list[Path]:
    """Every run record under ``root`` (shard files are partial runs, not records)."""
    return sorted(p for p in Path(root).rglob("*.json") if not SHARD_FILE.match(p.name))


#: per-example fields that come from the attack (the rest of a row comes from scoring base and defended)
ATTACK_FIELDS = ("b_attacked", "recovered", "steps_used", "recovery_budget", "delta_rel", "drift_abs", "drift_rel",
                 "reactivation", "c1_change", "jacobian_residual_drift", "residual_replay", "latent_replay")
#: per-example path attribution of a recovered example (:func:`benchmark.running.engine.path_attribution`); a row has them
#: only where the example was replayed
SHARE_FIELDS = tuple(f"{prefix}share_{part}" for prefix in ("", "margin_") for part in ("error", "latent", "defended"))
MARGIN_FIELDS = ("margin_target", "margin_b", "margin_replay_error", "margin_replay_latent")
PATH_FIELDS = ("residual_replay", "latent_replay", *SHARE_FIELDS, *MARGIN_FIELDS)
#: per-example fields a row has only against a defense with a monitor
MONITOR_FIELDS = ("flagged",)


def _row(scored: dict, result: dict | None) -> dict:
    """One ``examples`` entry: a test example's scores, with its attack result when it is a valid flip."""
    row = {"id": scored["id"], "b_base": scored["b_base"], "b_defended": scored["b_defended"], "b_attacked": None,
           "valid_flip": result is not None, "recovered": False, "steps_used": 0}
    row.update({k: None for k in ATTACK_FIELDS if k not in row})
    if result is not None:
        if result["id"] != scored["id"]:
            raise BenchmarkError(f"attack result for '{result['id']}' where '{scored['id']}' was expected; "
                                 "the partial run does not belong to these scores: delete it and run again")
        row.update({k: result[k] for k in ATTACK_FIELDS})
        row.update({k: result[k] for k in (*SHARE_FIELDS, *MARGIN_FIELDS, *MONITOR_FIELDS) if result.get(k) is not None})
    return row


def attack_section(settings: dict, results: list[dict]) -> dict:
    """The record's ``attack`` object: the run's settings plus what the attack used.

    ``eps_abs`` is the largest relative budget times the mean norm of the perturbed value (residual at the
    attacked site, or the suffix's initial embedding). ``jacobian_rank`` (mode jacobian): the largest rank of the
    cross-site subspace projected out of an example's ``delta``; ``jacobian_estimate`` says whether it came from
    the exact Jacobian, the randomized estimate with ``jacobian_probes`` probes, or both (different chunks).
    """
    h_norms = [r["h_norm_mean"] for r in results]
    out = {**settings, "eps_abs": settings["eps_rel"] * (sum(h_norms) / len(h_norms) if h_norms else 0.0)}
    if settings["mode"] == "jacobian":
        exact = {r["jacobian_exact"] for r in results}
        out["jacobian_estimate"] = (None if not exact else "mixed" if len(exact) > 1 else
                                    "exact" if exact == {True} else "randomized")
        if results:
            out["jacobian_rank"] = max(r["jacobian_rank"] for r in results)
    return out


def build_record(head: dict, results: list[dict], provenance: dict,
                 outcome_metrics: Callable[[list[dict]], dict] | None = None) -> dict:
    """The run record from its parts: ``head`` (everything that does not come from the attack: see
    :func:`benchmark.running.engine.run_head`), one attack result per valid flip, in any order, and the suite's
    :meth:`TaskSuite.outcome_metrics` (the caller knows the suite; a record does not look suites up)."""
    flips = [is_valid_flip(s["b_base"], s["b_defended"]) for s in head["examples"]]
    by_id = {r["id"]: r for r in results}
    if sorted(by_id) != sorted(s["id"] for s, flip in zip(head["examples"], flips) if flip) or \
            len(by_id) != len(results):
        raise BenchmarkError(f"{len(results)} attack results do not match the {sum(flips)} valid flips; "
                             "the partial run does not belong to these scores: delete it and run again")
    rows = [_row(s, by_id[s["id"]] if flip else None) for s, flip in zip(head["examples"], flips)]
    replayed = [r for r in rows if r["residual_replay"] is not None]
    replay = {} if not replayed else {
        "residual": sum(r["residual_replay"] for r in replayed) / len(replayed),
        "latent": sum(r["latent_replay"] for r in replayed) / len(replayed)}
    counts, metrics = summarize(rows, head["side_effect"], head["defense_edit_rel"], replay, head["attack"]["eps_sweep"])
    if "monitor" in head:  # a defense that abstains on its monitor: its false-positive and detection rates
        metrics.update(head["monitor"], monitor_detection_rate=monitor_detection_rate(rows))
    record = {k: head[k] for k in ("schema_version", "benchmark_version", "model", "saes", "defense", "task")}
    record.update(attack=attack_section(head["attack"], results), counts=counts, metrics=metrics,
                  budget_curve=budget_curve(rows, head["attack"]["eps_sweep"]), examples=rows, provenance=provenance)
    task_metrics = {**(head.get("task_metrics") or {}), **(outcome_metrics(rows) if outcome_metrics else {})}
    if task_metrics:
        record["task_metrics"] = task_metrics
    return record


#: Tracked files with a section our commands generate (``benchmark leaderboard`` rewrites the README's table), by
#: path from the repository root: (start marker, end marker). Like ``leaderboard/``, generated text is not code.
GENERATED_SECTIONS = {"README.md": ("<!-- leaderboard:start -->", "<!-- leaderboard:end -->")}
#: what the code checks leave out: run outputs (records, generated tables) and the files with a generated section,
#: which :func:`_generated_files_change` compares outside that section
_NOT_CODE = [":(exclude)leaderboard", *(f":(exclude){name}" for name in GENERATED_SECTIONS)]


def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, check=True).stdout


def git_state() -> tuple[str, bool]:
    """(commit, dirty): dirty when tracked code differs from the commit; run outputs (``leaderboard/``, the
    generated section of the README) do not count, so writing them leaves later runs clean."""
    try:
        commit = _git("rev-parse", "HEAD").decode().strip()
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", *_NOT_CODE).strip())
        return commit, dirty or bool(_generated_files_change())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def working_tree_hash() -> str | None:
    """sha256 of the uncommitted changes to tracked code (outside ``leaderboard/`` and generated sections); None
    where there are none.

    With :func:`git_state` it names the code a run ran (untracked files are not covered)."""
    try:
        diff = _git("diff", "HEAD", "--binary", "--", ".", *_NOT_CODE) + _generated_files_change()
    except (OSError, subprocess.CalledProcessError):
        return None
    return "sha256:" + hashlib.sha256(diff).hexdigest() if diff else None


def mask_generated(text: str, start: str, end: str) -> str:
    """``text`` with everything between the markers ``start`` and ``end`` left out (the markers stay)."""
    return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: start + end, text, flags=re.DOTALL)


def _generated_files_change() -> bytes:
    """The files of :data:`GENERATED_SECTIONS` that differ from the commit outside their generated section: their
    names and masked texts (b"" when none does)."""
    out = b""
    for name, (start, end) in GENERATED_SECTIONS.items():
        try:
            committed = _git("show", f"HEAD:{name}").decode("utf-8")
        except subprocess.CalledProcessError:  # not in the commit: untracked, so not code here
            continue
        path = REPO_ROOT / name
        now = path.read_text(encoding="utf-8") if path.exists() else ""
        if now != committed and mask_generated(now, start, end) != mask_generated(committed, start, end):
            out += f"{name}\n{mask_generated(now, start, end)}".encode()
    return out


def package_versions() -> dict[str, str]:
    out = {}
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("nnsight", "nnsight"),
                       ("sae_lens", "sae-lens"), ("python", None)):
        if dist is None:
            out[name] = platform.python_version()
            continue
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(model: LoadedModel | None = None) -> dict:
    """The provenance fields that say where ``model`` (None: a float32 model on the CPU) computes in this process:
    ``device``, ``dtype`` and ``cpu_threads``."""
    device = torch.device("cpu") if model is None else model.device
    return {"device": (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                       f"{device.type} ({platform.machine()})"),
            "dtype": "float32" if model is None else dtype_name(model.dtype),
            "cpu_threads": torch.get_num_threads()}


def provenance(wall_seconds: float, command: str, git: tuple[str, bool], fingerprint: str | None = None,
               model: LoadedModel | None = None, fit_seconds: float | None = None) -> dict:
    """Where and how a run was made; ``git`` is :func:`git_state` taken when the run started, ``fingerprint``
    the run's (:func:`benchmark.running.shards.fingerprint`), ``model`` the model it ran (its device and dtype),
    ``fit_seconds`` how long fitting the defense took."""
    commit, dirty = git
    out = {
        "git_commit": commit,
        "git_dirty": dirty,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "packages": package_versions(),
        **machine(model),
        "wall_seconds": round(wall_seconds, 1),
        "command": command,
    }
    if fingerprint is not None:
        out["fingerprint"] = fingerprint
    if fit_seconds is not None:
        out["fit_seconds"] = round(fit_seconds, 1)
    return out
