"""The base model's own answers on the refusal suites, per model and request source, from run records alone.

A refusal record's ``b_base`` is the judged score of the undefended model's greedy answer to each test request
(:mod:`tasks.refusal.judge`: refusal, degenerate text, or an answer), and its ``task_metrics`` hold the harmless
control requests' base refusal rate; neither depends on the defense or the attack, so one record per model and suite
gives them. They say what the behavior under test is on that model: a model that already refuses or babbles leaves
little to suppress.
"""

from __future__ import annotations

from benchmark.reporting.ranking import SUITES, Entry
from tasks.refusal.judge import DEGENERATE, REFUSAL

REFUSAL_SUITES = tuple(s for s in SUITES if s.startswith("refusal"))
BASE_HEADERS = ["model", "suite", "harmful test requests", "refused", "degenerate", "answered (base behavior)",
                "harmless: refused", "from record"]
BASE_LEGEND = (
    "The undefended model's greedy answers (24 tokens) to the harmful test requests of each refusal suite, judged "
    "as the suite judges them (tasks/refusal/README.md): refused, degenerate text, or answered (`b > 0`, the behavior "
    "a defense must suppress); and the refusal rate on the harmless control requests. Read from one full-run record "
    "per model and suite (the base answers do not depend on the defense).")


def _share(n: int, total: int) -> str:
    return f"{n}/{total} ({100 * n / total:.1f}%)" if total else "–"


def base_rows(entries: list[Entry], href) -> list[list[str]]:
    """One row per (model, refusal suite) with a full-run record: the first such record by path."""
    first: dict[tuple[str, str], Entry] = {}
    for path, r in sorted(entries, key=lambda e: str(e[0])):
        key = (r["model"]["name"], r["task"]["name"])
        if key[1] in REFUSAL_SUITES and r["task"].get("limit") is None:
            first.setdefault(key, (path, r))
    rows = []
    for (model, suite), (path, r) in sorted(first.items(), key=lambda kv: (kv[0][0], SUITES.index(kv[0][1]))):
        b = [e["b_base"] for e in r["examples"]]
        harmless = (r.get("task_metrics") or {}).get("harmless_refusal_base")
        rows.append([model, suite, str(len(b)), _share(sum(x == REFUSAL for x in b), len(b)),
                     _share(sum(x == DEGENERATE for x in b), len(b)), _share(sum(x > 0 for x in b), len(b)),
                     "–" if harmless is None else f"{100 * harmless:.1f}%", f"[json]({href(path)})"])
    return rows
