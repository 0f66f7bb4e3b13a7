"""The generated leaderboard: byte-for-byte what the committed records give, ranking, missing suites and modes."""

import copy
import csv
import io
import json
from pathlib import Path

import pytest

from benchmark.errors import BenchmarkError
from benchmark.reporting.leaderboard import (LEADERBOARD_DIR, README, README_END, README_START, SUITES, load_records,
                                   render_files, splice_readme, write_leaderboard)
from benchmark.running.metrics import MIN_FLIPS, SIDE_EFFECT_CAP
from benchmark.reporting.ranking import OVER_CAP, RANKED_SUITES, standings
from benchmark.running.records import shard_path
from conftest import committed_record_as as _record



def test_committed_leaderboard_regenerates_byte_for_byte():
    files = render_files(load_records(), LEADERBOARD_DIR, README)
    assert sorted(p.name for p in files) == ["README.md", "README.md", "index.html", "leaderboard.csv"]
    for path, text in files.items():
        assert path.read_text() == text, f"{path} is stale: run `benchmark leaderboard` and commit the result"


def test_ranking_orders_by_the_area_under_the_budget_curve():
    """Every flip recovered (the same final recovery rate), but at larger budgets ranks higher; never recovered
    highest; a defense whose curve equals another's ties with it, and one without enough flips comes last."""
    runs = {"small": 0.002, "large": 0.2, "large_too": 0.2, "never": None}
    entries = [(Path(f"{d}.json"), _record(d, "ioi", "encoder", b)) for d, b in runs.items()]
    entries.append((Path("few.json"), _record("few", "ioi", "encoder", None, flips=MIN_FLIPS - 1)))
    table = standings(entries)
    assert [s.defense for s in table] == ["never", "large", "large_too", "small", "few"]
    assert [s.rank for s in table] == [1, 2, 2, 4, 5]
    assert table[-1].mean_auc is None and table[-1].counted == 0
    supp = table[0].cells["ioi"].record["metrics"]["suppression_rate"]
    assert table[0].mean_auc == pytest.approx(supp), "never recovered: robust suppression is flat at suppression"


def test_side_effect_over_the_cap_counts_as_zero():
    held = (Path("a.json"), _record("breaks", "ioi", "encoder", None, side_effect=SIDE_EFFECT_CAP * 2))
    mild = (Path("b.json"), _record("mild", "ioi", "encoder", 0.2))
    table = standings([held, mild])
    assert [s.defense for s in table] == ["mild", "breaks"]
    assert table[1].mean_auc == 0.0 and table[1].cells["ioi"].status == OVER_CAP


@pytest.fixture
def synthetic(tmp_path):
    """Records of four defenses over two of the four suites, with a shard file beside them."""
    root = tmp_path / "records"
    records = [_record("alpha", "ioi", "encoder", None), _record("alpha", "ioi", "soft_suffix", 0.001),
               _record("alpha", "tpp", "jacobian", 0.02), _record("alpha", "tpp", "encoder", 0.1),
               _record("beta", "ioi", "encoder", None), _record("beta", "ioi", "none", 0.001),
               _record("gamma", "ioi", "encoder", 0.05), _record("delta", "ioi", "encoder", 0.001, flips=3)]
    for r in records:
        path = root / "smollm2-135m-instruct" / r["defense"]["name"] / f"{r['task']['name']}__{r['attack']['mode']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    shard_path(path, 0, 2).write_text("{}")  # not a record: must be ignored, not fail validation
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{README_START}\nold table\n{README_END}\n\nMore text.\n")
    return root, tmp_path / "out", readme


def test_tables_rank_on_constrained_attacks_and_dash_missing_suites(synthetic):
    root, out, readme = synthetic
    files = render_files(load_records(root), out, readme)
    text = files[out / "README.md"]
    main = text.split("### Ranking")[1].split("###")[0]
    rows = [line for line in main.splitlines() if line.startswith("| ") and "defense" not in line]
    # beta: ioi never recovered; alpha: the mean of ioi (never recovered) and tpp's worst case over encoder and
    # jacobian (recovered at 0.02; soft_suffix never counts); gamma: recovered at 0.05; delta: 3 flips, out of the ranking
    assert [r.split("|")[2].strip() for r in rows] == ["beta", "alpha", "gamma", "delta"]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "3", "4"]
    cells = [c.strip() for c in rows[0].split("|")[6:-1]]
    assert len(cells) == len(SUITES) and cells[SUITES.index("tpp")] == "–" and cells[SUITES.index("wmdp_bio")] == "–"
    assert "vs [encoder](../records/smollm2-135m-instruct/beta/ioi__encoder.json)" in cells[SUITES.index("ioi")]
    assert ("vs [encoder](../records/smollm2-135m-instruct/alpha/tpp__encoder.json) "
            "[jacobian](../records/smollm2-135m-instruct/alpha/tpp__jacobian.json)") in rows[1], \
        "alpha's tpp cell is the worst case over both feature-preserving attacks"
    assert "too few flips (3)" in rows[3] and "0 of 4" in rows[3]

    ioi = text.split("### ioi: every attack mode")[1].split("###")[0]
    assert "soft_suffix (eps≤0.5)" in ioi and "none (eps≤0.5)" in ioi and "margin replay" in ioi
    tpp = text.split("### tpp: every attack mode")[1].split("###")[0]
    assert "*worst case · feature_preserving* (encoder + jacobian)" in tpp
    assert "No records yet." in text.split("### wmdp_bio: every attack mode")[1].split("###")[0]

    table = list(csv.DictReader(io.StringIO(files[out / "leaderboard.csv"])))
    assert len(table) == 8 and {r["defense"] for r in table} == {"alpha", "beta", "gamma", "delta"}
    ranked = {(r["defense"], r["suite"], r["attack"]) for r in table if r["ranked"] == "true"}
    assert ("alpha", "tpp", "jacobian") in ranked and ("alpha", "ioi", "soft_suffix") not in ranked
    assert all(r["robust_suppression_auc"] != "" for r in table)

    html = files[out / "index.html"]
    assert html.count("<svg") == 2, "budget curves and the side-effect plane, one panel per suite each"
    assert '<a href="../records/smollm2-135m-instruct/beta/ioi__encoder.json">' in html

    spliced = files[readme]
    assert spliced.startswith("# Project\n\n" + README_START) and spliced.endswith(README_END + "\n\nMore text.\n")
    assert "old table" not in spliced and "(records/smollm2-135m-instruct/beta/ioi__encoder.json)" in spliced
    assert render_files(load_records(root), out, readme) == files, "the same records give the same bytes"


def test_cross_model_table_sets_each_models_cell_side_by_side(synthetic):
    """A second model's records add a cross-model table (default model first, `–` where a model has no record) and the
    second model's own ranking; refusal_harmbench is shown but stays out of the mean (refusal is not counted twice)."""
    root, out, readme = synthetic
    for defense, suite, budget in (("beta", "ioi", 0.05), ("alpha", "refusal_harmbench", None)):
        r = _record(defense, suite, "encoder", budget)
        r["model"]["name"] = "gemma-3-270m"
        path = root / "gemma-3-270m" / defense / f"{suite}__encoder.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    text = render_files(load_records(root), out, readme)[out / "README.md"]
    cross = text.split("## Across models")[1].split("\n## ")[0]
    header = next(line for line in cross.splitlines() if line.startswith("| defense"))
    assert [c.strip() for c in header.split("|")[1:-1]] == ["defense", "suite", "smollm2-135m-instruct", "gemma-3-270m"]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in cross.splitlines()
            if line.startswith("| ") and not line.startswith("| defense")}
    assert "(../records/smollm2-135m-instruct/beta/ioi__encoder.json)" in rows[("beta", "ioi")]
    assert "(../records/gemma-3-270m/beta/ioi__encoder.json)" in rows[("beta", "ioi")]
    assert rows[("gamma", "ioi")].rstrip(" |").endswith("–"), "gamma has no record on the second model"
    gemma = text.split("## gemma-3-270m")[1].split("\n## ")[0]
    alpha = next(line for line in gemma.split("### Ranking")[1].splitlines() if line.startswith("| ") and "alpha" in line)
    assert "0 of 4" in alpha and "refusal_harmbench" not in RANKED_SUITES, "harmbench alone counts no suite"
    assert "#across-models" in render_files(load_records(root), out, readme)[readme]
    base = text.split("## Refusal suites: the base model's own answers")[1].split("\n## ")[0]
    assert "| gemma-3-270m " in base and "refusal_harmbench" in base, "a refusal suite's base answers, per model"
    assert "## Across models" not in render_files(load_records(root / "smollm2-135m-instruct"), out, readme)[out / "README.md"]


def test_write_leaderboard_writes_every_file(synthetic):
    root, out, readme = synthetic
    written = write_leaderboard(root, out, readme)
    assert sorted(p.name for p in written) == ["README.md", "README.md", "index.html", "leaderboard.csv"]
    assert all(p.exists() for p in written) and README_START in readme.read_text()


def test_readme_without_markers_is_an_error(tmp_path):
    with pytest.raises(BenchmarkError, match="leaderboard:start"):
        splice_readme("# no markers\n", "section", Path("README.md"))


def test_worst_case_per_example_over_the_attacks_of_a_threat_model():
    """Two feature-preserving attacks, each recovering a different half of the flips at a different budget: the
    cell counts an example as recovered if either did, at the smaller budget; the unconstrained ceiling and the
    input-space attack do not enter it."""
    from benchmark.reporting.ranking import cells, worst_case

    enc = _record("split", "ioi", "encoder", 0.01)
    jac = _record("split", "ioi", "jacobian", 0.1)
    flips = [i for i, e in enumerate(enc["examples"]) if e["valid_flip"]]
    half = set(flips[: len(flips) // 2])
    for i in flips:  # encoder recovers the first half (at 0.01), jacobian the second (at 0.1)
        (jac if i in half else enc)["examples"][i].update(recovered=False, recovery_budget=None, b_attacked=-1.0)
    ceiling = _record("split", "ioi", "none", 0.001)
    rows = worst_case([enc, jac])
    assert all(rows[i]["recovered"] for i in flips)
    assert [rows[i]["recovery_budget"] for i in flips] == [0.01 if i in half else 0.1 for i in flips]
    cell = cells([(Path("e.json"), enc), (Path("j.json"), jac), (Path("n.json"), ceiling)])["ioi"]
    assert cell.attacks == ["encoder", "jacobian"]
    supp = enc["metrics"]["suppression_rate"]
    expected = {0.001: supp, 0.005: supp, 0.01: supp * (1 - len(half) / len(flips)), 0.05: supp * (1 - len(half) / len(flips)), 0.1: 0.0}
    curve = dict(cell.score.curve)
    assert all(curve[e] == pytest.approx(v) for e, v in expected.items())
    assert cell.score.auc < min(cells([(Path("e.json"), enc)])["ioi"].score.auc,
                                cells([(Path("j.json"), jac)])["ioi"].score.auc), "worse than either attack alone"
    other_fit = copy.deepcopy(jac)
    other_fit["examples"][flips[0]]["valid_flip"] = False
    with pytest.raises(ValueError, match="different fits"):
        worst_case([enc, other_fit])


def test_a_cell_is_marked_unchecked_until_the_adaptive_attacks_it_needs_have_run(tmp_path):
    """A defense that abstains on a monitor needs the evasion attack and both gradient-free checks; a cell that holds
    at the headline budget needs the gradient-free checks; a broken cell needs nothing more."""
    from benchmark.reporting.leaderboard import _suite_cell
    from benchmark.reporting.ranking import cells

    def entries(defense: str, budget: float | None, modes: list[str], monitor: bool = False) -> list:
        out = []
        for mode in modes:
            r = _record(defense, "ioi", mode, budget=budget)
            if monitor:
                r["metrics"].update(monitor_fpr_test=0.05, monitor_fpr_control=0.04, monitor_detection_rate=0.5)
            out.append((tmp_path / f"{defense}-{mode}.json", r))
        return out

    assert cells(entries("broken", 0.001, ["encoder"]))["ioi"].unchecked == []
    assert cells(entries("holds", None, ["encoder"]))["ioi"].unchecked == ["transfer", "random_search"]
    assert cells(entries("holds", None, ["encoder", "transfer", "random_search"]))["ioi"].unchecked == []
    monitored = entries("abstains", 0.001, ["encoder", "transfer"], monitor=True)
    assert cells(monitored)["ioi"].unchecked == ["evasive_encoder", "random_search"]
    text = _suite_cell(cells(monitored)["ioi"], tmp_path)
    assert "**unchecked**: evasive_encoder, random_search" in text and "abstains on 4.0% of control" in text


def test_the_goal_line_names_a_defense_only_when_two_checked_suites_hold(tmp_path):
    from benchmark.reporting.leaderboard import goal_status

    def runs(defense: str, modes: list[str], budget: float | None = None) -> list:
        return [(tmp_path / f"{defense}-{suite}-{m}.json", _record(defense, suite, m, budget=budget))
                for suite in ("ioi", "tpp") for m in modes]

    unchecked = standings(runs("strong", ["encoder"]) + runs("weak", ["encoder"], budget=0.001))
    line = goal_status(unchecked)
    assert "Not reached by any defense. Closest: strong" in line and "unchecked: transfer, random_search" in line
    assert "(2 counted suites at or above 50%, 0 of them checked" in line
    assert "What broke it" not in line, "both of its best suites hold; only the checks are missing"
    checked = standings(runs("strong", ["encoder", "transfer", "random_search"]))
    assert goal_status(checked).endswith("Reached by: strong.")
    half = [(tmp_path / "half-tpp.json", _record("half", "tpp", "encoder", budget=None)),
            (tmp_path / "half-ioi.json", _record("half", "ioi", "encoder", budget=0.01))]
    flips = sum(e["valid_flip"] for e in half[1][1]["examples"])
    assert goal_status(standings(half)).endswith(
        f"What broke it: on ioi the encoder attack recovers {flips} of {flips} valid flips within the headline budget.")


def test_the_paper_table_never_takes_a_limit_run_for_the_suite(tmp_path):
    """A `--limit` run (a few test examples) sits beside the full record in the suite's table, marked; the paper's
    figures come from the full record only."""
    from benchmark.reporting.paper import paper_rows

    full = _record("sae_clamp", "ioi", "encoder", 0.01)
    few = copy.deepcopy(full)
    few["task"]["limit"] = 8
    few["counts"]["valid_flips"] = 3
    rows = paper_rows(standings([(tmp_path / "ioi__encoder.json", full), (tmp_path / "ioi__encoder.limit-8.json", few)]),
                      tmp_path)
    ioi = next(r for r in rows if r[4].startswith("[sae_clamp · encoder]"))
    assert "ioi__encoder.json" in ioi[4] and ioi[3] == f"{full['counts']['recovered']} of {full['counts']['valid_flips']} valid flips"
