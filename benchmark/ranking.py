"""How the leaderboard ranks defenses (DESIGN.md, "Ranking"), from run records alone.

Per defense and suite one **cell**: of its records under the constrained attacks (:data:`RANKED_MODES`), the one
with the lowest robust suppression over the budget range (the weakest the defense looked). A cell's score is that
area (:func:`benchmark.metrics.robust_suppression_auc`); a cell with fewer than :data:`MIN_FLIPS` valid flips
shows its count and stays out of the mean; a cell whose side effect exceeds :data:`SIDE_EFFECT_CAP` counts as 0
(the suppression is bought by breaking the model). A defense's score is the mean over its counted cells; ties
(equal means) are broken by the mean robust suppression at the headline budget, and defenses with no counted
cell come last.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmark.metrics import (HEADLINE_BUDGET, MIN_FLIPS, SIDE_EFFECT_CAP, robust_suppression_at,
                               robust_suppression_auc)
from benchmark.records import schema

#: the attacks a defense is ranked on: the constrained residual attacks (the others are shown for comparison)
RANKED_MODES = ("encoder", "jacobian")
SUITES: tuple[str, ...] = tuple(schema()["properties"]["task"]["properties"]["name"]["enum"])
MODES: tuple[str, ...] = RANKED_MODES + tuple(
    m for m in schema()["properties"]["attack"]["properties"]["mode"]["enum"] if m not in RANKED_MODES)

Entry = tuple[Path, dict]

COUNTED, TOO_FEW, OVER_CAP = "counted", "too few flips", "over the side-effect cap"


@dataclass(frozen=True)
class Score:
    """The budget-indexed figures of one record, computed from its examples."""

    auc: float | None  # robust suppression, mean over log-budget across the sweep
    headline: float | None  # robust suppression at HEADLINE_BUDGET
    curve: tuple[tuple[float, float], ...]  # (budget, robust suppression) at every swept budget

    @classmethod
    def of(cls, record: dict) -> "Score":
        rows, sweep = record["examples"], sorted(record["attack"]["eps_sweep"])
        curve = tuple((e, r) for e in sweep if (r := robust_suppression_at(rows, e)) is not None)
        return cls(robust_suppression_auc(rows, sweep), robust_suppression_at(rows, HEADLINE_BUDGET), curve)


@dataclass(frozen=True)
class Cell:
    """The record one defense is ranked on for one suite."""

    path: Path
    record: dict
    score: Score

    @property
    def flips(self) -> int:
        return self.record["counts"]["valid_flips"]

    @property
    def side_effect(self) -> float | None:
        return self.record["metrics"]["side_effect"]

    @property
    def status(self) -> str:
        if self.flips < MIN_FLIPS:
            return TOO_FEW
        if self.side_effect is not None and self.side_effect > SIDE_EFFECT_CAP:
            return OVER_CAP
        return COUNTED

    def counted(self, value: float | None) -> float | None:
        """What ``value`` (this cell's area or headline figure) contributes to the defense's mean: itself, 0 over
        the side-effect cap, None (nothing) with too few flips."""
        return {COUNTED: value, OVER_CAP: 0.0, TOO_FEW: None}[self.status]


def cells(entries: list[Entry]) -> dict[str, Cell]:
    """Per suite, the cell of one defense's records: its constrained record with the lowest area (the first in
    mode order on ties); suites without one are left out."""
    best: dict[str, Cell] = {}
    for path, r in sorted(entries, key=lambda e: MODES.index(e[1]["attack"]["mode"])):
        if r["attack"]["mode"] not in RANKED_MODES:
            continue
        cell = Cell(path, r, Score.of(r))
        if cell.score.auc is None:
            continue
        task = r["task"]["name"]
        if task not in best or cell.score.auc < best[task].score.auc:
            best[task] = cell
    return best


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class Standing:
    """One defense on one model."""

    defense: str
    rank: int  # tied defenses share a rank
    entries: list[Entry]  # every record, in suite and mode order
    cells: dict[str, Cell]  # per suite, the record the rank uses

    @property
    def mean_auc(self) -> float | None:
        return _mean([c.counted(c.score.auc) for c in self.cells.values()])

    @property
    def mean_headline(self) -> float | None:
        return _mean([c.counted(c.score.headline) for c in self.cells.values()])

    @property
    def counted(self) -> int:
        """Suites that enter the mean."""
        return sum(c.status != TOO_FEW for c in self.cells.values())

    def key(self) -> tuple:
        """Sort key, best first: defenses with a counted suite before those without, then mean area, then mean
        headline figure (both higher first)."""
        auc, headline = self.mean_auc, self.mean_headline
        return (auc is None, -(auc or 0.0), -(headline or 0.0))


def _order(entry: Entry) -> tuple[int, int]:
    r = entry[1]
    return SUITES.index(r["task"]["name"]), MODES.index(r["attack"]["mode"])


def standings(entries: list[Entry]) -> list[Standing]:
    """The defenses of one model's records, best first (ties by name, sharing a rank)."""
    by_defense: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_defense[e[1]["defense"]["name"]].append(e)
    out = [Standing(name, 0, sorted(es, key=_order), cells(es)) for name, es in by_defense.items()]
    keys = [s.key() for s in out]
    for s in out:
        s.rank = 1 + sum(k < s.key() for k in keys)
    return sorted(out, key=lambda s: (s.key(), s.defense))
