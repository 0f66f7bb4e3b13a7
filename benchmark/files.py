"""Crash-safe file writes, for every output of the benchmark (records, checkpoints, tables, caches)."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and a rename, so a crash never leaves half a file.

    The file gets mode 0666 less the umask (0644 under the usual umask 022), as ``open`` would give it, so a shared
    results folder stays readable. Temporary files that a killed earlier write of ``path`` left behind are removed
    first (:func:`remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates the file 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files (``.<name>.<pid>.*.tmp``) of writes of ``path`` whose process is gone (killed
    mid-write); those of a live process on this machine stay."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not (pid.isdigit() and int(pid) > 0 and _alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
