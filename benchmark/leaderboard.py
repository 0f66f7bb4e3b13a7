"""Regenerate the leaderboard from the run records alone (never edited by hand).

Written: ``leaderboard/README.md`` (the tables), ``leaderboard/leaderboard.csv`` (one row per record, every metric),
``leaderboard/index.html`` (the tables and plots, inline SVG) and the main table in the top-level ``README.md``,
between :data:`README_START` and :data:`README_END`. Per model (the default model first): the main table, one
row per defense with a cell per suite, ranked by mean robust suppression under the constrained attacks; for the
default model, which runs of the full battery's plan (:mod:`benchmark.battery`) have a record; then per suite a
table of every record (all attack modes, the soft-suffix baseline, path replay).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from html import escape
from pathlib import Path

from tabulate import tabulate

from benchmark.battery import planned_runs
from benchmark.errors import BenchmarkError
from benchmark.models import DEFAULT_MODEL
from benchmark.records import RECORDS_DIR, REPO_ROOT, load_record, record_files, schema, write_text_atomic
from benchmark.svgplot import MARKERS, PALETTE, Axis, Series, chart

LEADERBOARD_DIR = RECORDS_DIR.parent
README = REPO_ROOT / "README.md"
README_START, README_END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"

#: the attacks a defense is ranked on: the constrained residual attacks (the others are shown for comparison)
RANKED_MODES = ("encoder", "jacobian")
SUITES: tuple[str, ...] = tuple(schema()["properties"]["task"]["properties"]["name"]["enum"])
MODES: tuple[str, ...] = RANKED_MODES + tuple(
    m for m in schema()["properties"]["attack"]["properties"]["mode"]["enum"] if m not in RANKED_MODES)

Entry = tuple[Path, dict]

RANKING_NOTE = ("Defenses are ranked by mean robust suppression over suites (suppression rate x (1 - recovery rate)), "
                "each suite counted once, with its strongest constrained attack (encoder or jacobian); ties are broken "
                "by the median recovery budget (`||delta|| / ||h||` needed to recover; `–` = most flips never "
                "recovered within the largest budget). Metric definitions: DESIGN.md and `benchmark/metrics.py`.")
MAIN_LEGEND = ("Each suite's cell: **robust suppression** · the attack it is ranked on (its record) @ commit; "
               "suppression · recovery rate [95% CI]; median recovery budget · drift of the defended features, "
               "relative / absolute; reactivation · side effect (KL) · valid flips. `–`: no record yet.")
SUITE_LEGEND = ("Every record of the suite: all attack modes, the soft-suffix baseline (no residual access) for "
                "comparison, and path replay (recovery rate when only the SAE-error part, or only the non-defended "
                "latents' part, of the attack's change is replayed), and the suite's own metrics (TPP's metric, "
                "refusal's harmless refusal rates and base-like recovery). **Bold**: the attack the defense is ranked "
                "on.")


def load_records(root: Path = RECORDS_DIR) -> list[Entry]:
    return [(p, load_record(p)) for p in record_files(root)]


# -- ranking ------------------------------------------------------------------------------------------------------


def _ranked(records: list[dict]) -> dict[str, dict]:
    """Per suite, the record a defense is ranked on: its constrained attack (``RANKED_MODES``) with the lowest robust
    suppression (the first in mode order on ties); suites without one are left out."""
    best: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: MODES.index(r["attack"]["mode"])):
        robust = r["metrics"]["robust_suppression"]
        if r["attack"]["mode"] not in RANKED_MODES or robust is None:
            continue
        task = r["task"]["name"]
        if task not in best or robust < best[task]["metrics"]["robust_suppression"]:
            best[task] = r
    return best


def _rank_key(records: list[dict]) -> tuple:
    """Mean robust suppression (higher first), ties broken by the median recovery budget (higher first), over the
    records :func:`_ranked` picks."""
    entries = list(_ranked(records).values())
    robust = [e["metrics"]["robust_suppression"] for e in entries]
    # a null budget with flips means most were never recovered (the strongest result); without flips it
    # means nothing was suppressed, so it cannot break a tie in the defense's favour
    budgets = [(float("inf") if e["metrics"]["recovery_budget_median"] is None else e["metrics"]["recovery_budget_median"])
               for e in entries if e["counts"]["valid_flips"] > 0]
    budget = max(budgets) if budgets else 0.0
    return (-(sum(robust) / len(robust)) if robust else 1.0, -budget)


@dataclass
class Standing:
    """One defense on one model."""

    defense: str
    rank: int  # tied defenses share a rank
    entries: list[Entry]  # every record, in suite and mode order
    ranked: dict[str, Entry]  # per suite, the record the rank uses
    mean_robust: float | None


def _order(entry: Entry) -> tuple[int, int]:
    r = entry[1]
    return SUITES.index(r["task"]["name"]), MODES.index(r["attack"]["mode"])


def standings(entries: list[Entry]) -> list[Standing]:
    """The defenses of one model's records, best first."""
    by_defense: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_defense[e[1]["defense"]["name"]].append(e)
    keys = {name: _rank_key([r for _, r in es]) for name, es in by_defense.items()}
    out = []
    for name in sorted(by_defense, key=lambda n: (keys[n], n)):
        es = sorted(by_defense[name], key=_order)
        path_of = {id(r): p for p, r in es}
        ranked = {t: (path_of[id(r)], r) for t, r in _ranked([r for _, r in es]).items()}
        robust = [r["metrics"]["robust_suppression"] for _, r in ranked.values()]
        out.append(Standing(name, 1 + sum(k < keys[name] for k in keys.values()), es, ranked,
                            sum(robust) / len(robust) if robust else None))
    return out


def by_model(entries: list[Entry]) -> list[tuple[str, list[Standing]]]:
    """Standings per model, the default model first."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e[1]["model"]["name"]].append(e)
    return [(m, standings(groups[m])) for m in sorted(groups, key=lambda m: (m != DEFAULT_MODEL, m))]


# -- cells --------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _ci(m: dict) -> str:
    return f"{_pct(m['recovery_rate'])} [{_pct(m['recovery_ci_low'])}, {_pct(m['recovery_ci_high'])}]"


def _commit(r: dict) -> str:
    return r["provenance"]["git_commit"][:10] + (" (dirty)" if r["provenance"]["git_dirty"] else "")


def _href(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _suite_cell(entry: Entry, base: Path) -> str:
    path, r = entry
    m, c = r["metrics"], r["counts"]
    return "<br>".join([
        f"**{_pct(m['robust_suppression'])}** · [{r['attack']['mode']}]({_href(path, base)}) @ {_commit(r)}",
        f"supp {_pct(m['suppression_rate'])} · rec {_ci(m)}",
        f"budget {_num(m['recovery_budget_median'])} · drift {_num(m['drift_rel'])} / {_num(m['drift_abs'])}",
        f"react {_pct(m['reactivation'])} · side {_num(m['side_effect'])} · {c['valid_flips']} flips",
    ])


MAIN_HEADERS = ["rank", "defense", "mean robust suppression", *SUITES]
SUITE_HEADERS = ["rank", "defense", "attack", "suppression", "recovery [95% CI]", "robust suppression",
                 "recovery budget (median)", "drift rel / abs", "reactivation", "side effect (KL)", "defense edit",
                 "residual replay", "latent replay", "valid flips", "suite metrics", "commit", "record"]


def main_rows(standing: list[Standing], base: Path) -> list[list[str]]:
    return [[str(s.rank), s.defense, _pct(s.mean_robust),
             *(_suite_cell(s.ranked[t], base) if t in s.ranked else "–" for t in SUITES)] for s in standing]


def suite_rows(standing: list[Standing], suite: str, base: Path) -> list[list[str]]:
    rows = []
    for s in standing:
        for path, r in s.entries:
            if r["task"]["name"] != suite:
                continue
            m, c = r["metrics"], r["counts"]
            attack = f"{r['attack']['mode']} (eps≤{r['attack']['eps_rel']:g})"
            ranked = s.ranked.get(suite, (None, None))[1] is r
            rows.append([str(s.rank), s.defense, f"**{attack}**" if ranked else attack, _pct(m["suppression_rate"]),
                         _ci(m), _pct(m["robust_suppression"]), _num(m["recovery_budget_median"]),
                         f"{_num(m['drift_rel'])} / {_num(m['drift_abs'])}", _pct(m["reactivation"]),
                         _num(m["side_effect"]), _num(m.get("defense_edit_rel")),
                         _pct(m["residual_replay_recovery"]), _pct(m["latent_replay_recovery"]),
                         f"{c['valid_flips']} of {c['base_behavior']}", _suite_metrics(r), _commit(r),
                         f"[json]({_href(path, base)})"])
    return rows


COVERAGE_HEADERS = ["defense", *SUITES]


def coverage(standing: list[Standing]) -> tuple[str, list[list[str]]]:
    """The default model's battery coverage: a sentence, and per planned defense (plan order) a cell per suite
    with the planned attack modes that have a record and those that do not (:mod:`benchmark.battery`)."""
    recorded = {(s.defense, r["task"]["name"], r["attack"]["mode"]) for s in standing for _, r in s.entries}
    plan = planned_runs()
    modes: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for defense, suite, mode in plan:
        modes[defense][suite].append(mode)

    def cell(defense: str, suite: str) -> str:
        have = [m for m in modes[defense][suite] if (defense, suite, m) in recorded]
        lack = [m for m in modes[defense][suite] if (defense, suite, m) not in recorded]
        if not have and not lack:
            return "not planned"
        return " · ".join([*have, *(f"**missing** {m}" for m in lack)])

    done = sum(run in recorded for run in plan)
    note = (f"{done} of {len(plan)} planned runs of the full battery have a record (the plan: "
            "`benchmark/battery.py`; `benchmark battery` runs the rest and keeps what exists).")
    return note, [[d, *(cell(d, s) for s in SUITES)] for d in modes]


def _suite_metrics(r: dict) -> str:
    """The record's ``task_metrics`` (the suite's own metrics), ``name value`` each, or ``–``."""
    return "<br>".join(f"{k} {_num(v)}" for k, v in sorted((r.get("task_metrics") or {}).items())) or "–"


# -- markdown -----------------------------------------------------------------------------------------------------


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def render_markdown(models: list[tuple[str, list[Standing]]], base: Path) -> str:
    lines = ["# Leaderboard", "",
             "Generated by `benchmark leaderboard` from the run records in `records/`; do not edit by hand. "
             "Also as [CSV](leaderboard.csv) (every metric of every record) and as a [page with plots](index.html).",
             "", RANKING_NOTE, ""]
    for model, standing in models:
        lines += [f"## {model}" + (" (default model)" if model == DEFAULT_MODEL else ""), "", "### Ranking", "",
                  MAIN_LEGEND, "", _md_table(MAIN_HEADERS, main_rows(standing, base)), ""]
        if model == DEFAULT_MODEL:
            note, rows = coverage(standing)
            lines += ["### Battery coverage", "", note, "", _md_table(COVERAGE_HEADERS, rows), ""]
        for suite in SUITES:
            rows = suite_rows(standing, suite, base)
            lines += [f"### {suite}: every attack mode", ""]
            lines += [SUITE_LEGEND, "", _md_table(SUITE_HEADERS, rows), ""] if rows else ["No records yet.", ""]
    return "\n".join(lines)


def readme_section(models: list[tuple[str, list[Standing]]], readme: Path) -> str:
    """The top-level README's leaderboard section: the default model's main table, links relative to ``readme``."""
    standing = dict(models).get(DEFAULT_MODEL)
    leaderboard = _href(LEADERBOARD_DIR / "README.md", readme.parent)
    lines = [README_START, "<!-- generated by `benchmark leaderboard` from leaderboard/records; do not edit -->", "",
             f"Defenses on the default model, {DEFAULT_MODEL}, ranked by mean robust suppression under the "
             f"constrained attacks (ties: median recovery budget). Every table, every attack mode, a CSV and plots: "
             f"[the leaderboard]({leaderboard}).", ""]
    if standing:
        lines += [MAIN_LEGEND, "", _md_table(MAIN_HEADERS, main_rows(standing, readme.parent)), "",
                  coverage(standing)[0], ""]
    else:
        lines += ["No records for the default model yet.", ""]
    return "\n".join([*lines, README_END])


def splice_readme(text: str, section: str, readme: Path) -> str:
    """``text`` with what lies between the leaderboard markers (markers included) replaced by ``section``."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise BenchmarkError(f"{readme} has no '{README_START}' ... '{README_END}' markers: add them on their own "
                             "lines where the leaderboard table goes")
    return text[:start] + section + text[end + len(README_END):]


# -- csv ----------------------------------------------------------------------------------------------------------

METRICS: tuple[str, ...] = tuple(schema()["properties"]["metrics"]["properties"])
COUNTS = ("examples", "base_behavior", "valid_flips", "recovered")


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def render_csv(models: list[tuple[str, list[Standing]]], base: Path) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "rank", "defense", "suite", "attack", "ranked", "eps_rel", *COUNTS, *METRICS,
                     "task_metrics", "commit", "dirty", "record"])
    for model, standing in models:
        for s in standing:
            for path, r in s.entries:
                ranked = s.ranked.get(r["task"]["name"], (None, None))[1] is r
                writer.writerow([_csv_value(v) for v in (
                    model, s.rank, s.defense, r["task"]["name"], r["attack"]["mode"], ranked, r["attack"]["eps_rel"],
                    *(r["counts"][k] for k in COUNTS), *(r["metrics"].get(k) for k in METRICS),
                    json.dumps(r.get("task_metrics") or {}, sort_keys=True), r["provenance"]["git_commit"],
                    r["provenance"]["git_dirty"], _href(path, base))])
    return out.getvalue()


# -- html ---------------------------------------------------------------------------------------------------------

STYLE = """body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
.plots svg { margin: 0 1em 1em 0; }"""


def _inline_md(text: str) -> str:
    """The little markdown the cells use (bold, links, code, ``<br>``) as HTML, everything else escaped."""
    t = escape(text, quote=False).replace("&lt;br&gt;", "<br>")
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', t)


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def plots(standing: list[Standing]) -> list[str]:
    """Recovery rate against drift, recovery against budget (per suite), suppression against side effect."""
    color = {name: PALETTE[k % len(PALETTE)] for k, name in enumerate(sorted(s.defense for s in standing))}
    records = [(s.defense, r) for s in standing for _, r in s.entries]
    drift: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for name, r in records:
        m = r["metrics"]
        if m["drift_rel"] is not None and m["recovery_rate"] is not None:
            drift[(name, r["attack"]["mode"])].append((m["drift_rel"], m["recovery_rate"]))
    out = [chart("Recovery rate against defended-feature drift", Axis("relative drift (log)", log=True),
                 Axis("recovery rate", rate=True),
                 [Series(f"{d} · {mode}", color[d], MARKERS[MODES.index(mode)], tuple(p))
                  for (d, mode), p in drift.items()])]
    for suite in SUITES:
        curves = [Series(f"{d} · {r['attack']['mode']}", color[d], MARKERS[MODES.index(r["attack"]["mode"])],
                         tuple((c["eps_rel"], c["recovery_rate"]) for c in r.get("budget_curve", [])
                               if c["recovery_rate"] is not None), line=True)
                  for d, r in records if r["task"]["name"] == suite]
        if curves:
            out.append(chart(f"{suite}: recovery against budget", Axis("relative budget ||delta|| / ||h|| (log)", log=True),
                             Axis("recovered (share of valid flips)", rate=True), curves))
    side: dict[tuple[str, str], tuple[float, float]] = {}
    for name, r in records:  # suppression and side effect do not depend on the attack: the first record per suite
        m, key = r["metrics"], (name, r["task"]["name"])
        if key not in side and m["side_effect"] is not None and m["suppression_rate"] is not None:
            side[key] = (m["side_effect"], m["suppression_rate"])
    out.append(chart("Suppression against side effect", Axis("side effect (KL on control text)"),
                     Axis("suppression rate", rate=True),
                     [Series(f"{d} · {suite}", color[d], MARKERS[SUITES.index(suite) % len(MARKERS)], (p,))
                      for (d, suite), p in side.items()]))
    return out


def render_html(models: list[tuple[str, list[Standing]]], base: Path) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>SAE recovery benchmark: leaderboard</title>", f"<style>\n{STYLE}\n</style>", "</head>", "<body>",
             "<h1>Leaderboard</h1>",
             f"<p>Generated by <code>benchmark leaderboard</code> from the run records; do not edit by hand. "
             f'Also as <a href="leaderboard.csv">CSV</a>. {_inline_md(RANKING_NOTE)}</p>']
    for model, standing in models:
        parts += [f"<h2>{escape(model)}{' (default model)' if model == DEFAULT_MODEL else ''}</h2>", "<h3>Ranking</h3>",
                  f"<p>{_inline_md(MAIN_LEGEND)}</p>", _html_table(MAIN_HEADERS, main_rows(standing, base)),
                  "<h3>Plots</h3>", '<div class="plots">', *plots(standing), "</div>"]
        if model == DEFAULT_MODEL:
            note, rows = coverage(standing)
            parts += ["<h3>Battery coverage</h3>", f"<p>{_inline_md(note)}</p>", _html_table(COVERAGE_HEADERS, rows)]
        for suite in SUITES:
            rows = suite_rows(standing, suite, base)
            parts.append(f"<h3>{escape(suite)}: every attack mode</h3>")
            parts += ([f"<p>{_inline_md(SUITE_LEGEND)}</p>", _html_table(SUITE_HEADERS, rows)] if rows
                      else ["<p>No records yet.</p>"])
    return "\n".join([*parts, "</body>", "</html>", ""])


# -- files --------------------------------------------------------------------------------------------------------


def render_files(entries: list[Entry], out_dir: Path = LEADERBOARD_DIR, readme: Path | None = README) -> dict[Path, str]:
    """Every generated file's path and full text (``readme``: its current text with the section replaced)."""
    models = by_model(entries)
    files = {out_dir / "README.md": render_markdown(models, out_dir),
             out_dir / "leaderboard.csv": render_csv(models, out_dir),
             out_dir / "index.html": render_html(models, out_dir)}
    if readme is not None:
        files[readme] = splice_readme(readme.read_text(), readme_section(models, readme), readme)
    return files


def write_leaderboard(root: Path = RECORDS_DIR, out_dir: Path = LEADERBOARD_DIR, readme: Path | None = README) -> list[Path]:
    files = render_files(load_records(root), out_dir, readme)
    for path, text in files.items():
        write_text_atomic(path, text)
    return list(files)
