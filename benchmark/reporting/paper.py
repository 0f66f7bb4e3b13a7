"""The paper's headline figures beside this benchmark's, from a versioned file and the run records.

``leaderboard/paper.json`` holds the figures of arXiv:2606.18322 as the paper states them, each with the suite,
attack mode and record metric that measures the same thing here and a sentence on why the two may differ. This
benchmark's figure is read from the record of the suite's reference defense (:attr:`TaskSuite.reference_defense`)
under that attack on the default model, with its evidence (n) beside it; nothing here is typed in.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from benchmark.reporting.ranking import Standing
from benchmark.running.records import RECORDS_DIR, comparable
from tasks import TASKS

PAPER_FILE = RECORDS_DIR.parent / "paper.json"
PAPER_HEADERS = ["figure", "paper", "this benchmark (default model)", "evidence", "record", "why they may differ"]
#: record metrics that are rates over valid flips, and over examples replayed part by part
OVER_FLIPS = {"recovery_rate": "recovered"}
OVER_REPLAYED = ("margin_replay_error_recovery", "margin_replay_latent_recovery")


@lru_cache(maxsize=1)
def paper() -> dict:
    return json.loads(PAPER_FILE.read_text())


PAPER_NOTE = (f"The paper's figures ({paper()['citation']}) as it states them, beside the same quantity from this "
              f"benchmark's record of each suite's reference defense under the same attack. {paper()['setting']} "
              "The figures come from `leaderboard/paper.json` (the paper's side, versioned) and the records (ours).")


def _value(metric: str, x: float | None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if metric.endswith(("rate", "recovery")) else f"{x:.3g}"


def _evidence(metric: str, record: dict) -> str:
    c = record["counts"]
    if metric in OVER_FLIPS:
        return f"{c[OVER_FLIPS[metric]]} of {c['valid_flips']} valid flips"
    if metric in OVER_REPLAYED:
        return f"{c.get('path_replayed', 0)} replayed"
    return f"mean over {c['valid_flips']} valid flips"


def paper_rows(standing: list[Standing], base: Path) -> list[list[str]]:
    """One row per figure of the paper: its value, ours (from the reference defense's record), the evidence."""
    records = {(s.defense, r["task"]["name"], r["attack"]["mode"]): (p, r) for s in standing for p, r in s.entries
               if comparable(r)}  # a --limit run's few examples never stand for the suite
    rows = []
    for f in paper()["figures"]:
        theirs = ("~" if f.get("approximate") else "") + _value(f["metric"], f["paper"])
        if "paper_n" in f:
            theirs += f" (n={f['paper_n']})"
        defense = TASKS.get(f["suite"]).reference_defense
        found = records.get((defense, f["suite"], f["mode"]))
        if found is None:
            rows.append([f["figure"], theirs, "–", "no record yet", f"{defense} · {f['mode']}", f["why"]])
            continue
        path, r = found
        link = f"[{defense} · {f['mode']}]({Path(os.path.relpath(path, base)).as_posix()})"
        rows.append([f["figure"], theirs, _value(f["metric"], r["metrics"].get(f["metric"])),
                     _evidence(f["metric"], r), link, f["why"]])
    return rows
