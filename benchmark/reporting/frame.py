"""Run records as a pandas DataFrame, for notebooks and ad-hoc analysis (the leaderboard reads the records itself)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from benchmark.errors import BenchmarkError
from benchmark.running.records import RECORDS_DIR, comparable, load_record, record_files

if TYPE_CHECKING:
    import pandas as pd

#: the columns that say which run a row is, first in every frame
RUN_COLUMNS = ("model", "defense", "suite", "attack", "limit", "comparable")


def records_to_frame(root: Path | str = RECORDS_DIR) -> pd.DataFrame:
    """Every run record under ``root`` (searched recursively; shard files and checkpoints are not records), one row
    each, sorted by :data:`RUN_COLUMNS`: which run (``limit`` is None for a full run; ``comparable`` is False for a
    limited one, which is never ranked), the defense's version and parameters (``params``, a dict), the counts
    (``examples``, ``base_behavior``, ``valid_flips``, ``recovered``), every metric of ``metrics`` under its own name
    (null metrics are NaN), every suite metric as ``task.<name>``, and where the row came from (``git_commit``,
    ``git_dirty``, ``created_utc``, ``wall_seconds``, ``path``)."""
    import pandas as pd

    rows = [_row(path) for path in record_files(Path(root))]
    if not rows:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return pd.DataFrame(rows).sort_values(list(RUN_COLUMNS[:4]), ignore_index=True)


def _row(path: Path) -> dict:
    try:
        record = load_record(path)
    except (BenchmarkError, ValueError) as err:
        raise BenchmarkError(f"{path}: {err}") from None
    prov = record["provenance"]
    return {"model": record["model"]["name"], "defense": record["defense"]["name"], "suite": record["task"]["name"],
            "attack": record["attack"]["mode"], "limit": record["task"].get("limit"), "comparable": comparable(record),
            "defense_version": record["defense"]["version"], "params": record["defense"]["params"],
            **record["counts"], **record["metrics"],
            **{f"task.{k}": v for k, v in (record.get("task_metrics") or {}).items()},
            "git_commit": prov["git_commit"], "git_dirty": prov["git_dirty"], "created_utc": prov["created_utc"],
            "wall_seconds": prov["wall_seconds"], "path": str(path)}
