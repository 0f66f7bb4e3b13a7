"""Run records: validation against the JSON schema, provenance, and crash-safe writing."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from benchmark.errors import BenchmarkError

SCHEMA_PATH = Path(__file__).parent / "schema" / "run_record.schema.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
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


def load_record(path: Path) -> dict:
    record = json.loads(Path(path).read_text(), parse_constant=_reject_constant)
    validate_record(record)
    return record


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def write_record(record: dict, path: Path) -> None:
    validate_record(record)
    write_json_atomic(path, record)


def record_path(model: str, defense: str, task: str, mode: str, root: Path = RECORDS_DIR) -> Path:
    safe = lambda s: s.replace("/", "--")  # noqa: E731
    return root / safe(model) / safe(defense) / f"{task}__{mode}.json"


def git_state() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # run outputs (records, generated tables) are not code: other runs writing them leave the code clean
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)leaderboard"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


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


def provenance(wall_seconds: float, command: str, git: tuple[str, bool]) -> dict:
    """Where and how a run was made; ``git`` is :func:`git_state` taken when the run started."""
    commit, dirty = git
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "packages": package_versions(),
        "device": f"cpu ({platform.machine()})" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "wall_seconds": round(wall_seconds, 1),
        "command": command,
    }
