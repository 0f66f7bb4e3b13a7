"""The generated leaderboard: byte-for-byte what the committed records give, ranking, missing suites and modes."""

import copy
import csv
import io
import json
from pathlib import Path

import pytest

from benchmark.errors import BenchmarkError
from benchmark.leaderboard import (LEADERBOARD_DIR, README, README_END, README_START, SUITES, _rank_key, load_records,
                                   render_files, splice_readme, write_leaderboard)
from benchmark.records import shard_path
from conftest import committed_record_as as _record



def test_committed_leaderboard_regenerates_byte_for_byte():
    files = render_files(load_records(), LEADERBOARD_DIR, README)
    assert sorted(p.name for p in files) == ["README.md", "README.md", "index.html", "leaderboard.csv"]
    for path, text in files.items():
        assert path.read_text() == text, f"{path} is stale: run `benchmark leaderboard` and commit the result"


def test_leaderboard_ranks_a_defense_without_flips_last(tiny_run):
    nothing = copy.deepcopy(tiny_run[0])
    nothing["counts"]["valid_flips"] = 0
    nothing["metrics"].update(robust_suppression=0.0, recovery_budget_median=None)
    broken = copy.deepcopy(tiny_run[0])
    broken["metrics"].update(robust_suppression=0.0, recovery_budget_median=0.01)
    held = copy.deepcopy(tiny_run[0])
    held["metrics"].update(robust_suppression=0.0, recovery_budget_median=None)
    keys = [_rank_key([r]) for r in (held, broken, nothing)]
    assert keys == sorted(keys), "never recovered < recovered at a small budget < nothing suppressed"


@pytest.fixture
def synthetic(tmp_path):
    """Records of three defenses over two of the four suites, with a shard file beside them."""
    root = tmp_path / "records"
    records = [_record("alpha", "ioi", "encoder", 0.4), _record("alpha", "ioi", "soft_suffix", 0.0),
               _record("alpha", "tpp", "jacobian", 0.2), _record("alpha", "tpp", "encoder", 0.3),
               _record("beta", "ioi", "encoder", 0.5), _record("beta", "ioi", "none", 0.0),
               _record("gamma", "ioi", "encoder", 0.0, budget=0.2), _record("delta", "ioi", "encoder", 0.0)]
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
    # beta 0.5 (ioi); alpha mean of ioi 0.4 and tpp 0.2 (the strongest constrained attack; soft_suffix never
    # counts); gamma and delta 0.0, gamma's larger recovery budget first
    assert [r.split("|")[2].strip() for r in rows] == ["beta", "alpha", "gamma", "delta"]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "3", "4"]
    cells = [c.strip() for c in rows[0].split("|")[4:-1]]
    assert len(cells) == len(SUITES) and cells[SUITES.index("tpp")] == "–" and cells[SUITES.index("wmdp_bio")] == "–"
    assert "[encoder](../records/smollm2-135m-instruct/beta/ioi__encoder.json)" in cells[SUITES.index("ioi")]
    assert "**20.0%** · [jacobian]" in rows[1], "alpha ranks on tpp's jacobian attack (lower robust suppression)"

    ioi = text.split("### ioi: every attack mode")[1].split("###")[0]
    assert "soft_suffix (eps≤0.5)" in ioi and "none (eps≤0.5)" in ioi and "residual replay" in ioi
    assert "No records yet." in text.split("### wmdp_bio: every attack mode")[1].split("###")[0]

    table = list(csv.DictReader(io.StringIO(files[out / "leaderboard.csv"])))
    assert len(table) == 8 and {r["defense"] for r in table} == {"alpha", "beta", "gamma", "delta"}
    ranked = {(r["defense"], r["suite"], r["attack"]) for r in table if r["ranked"] == "true"}
    assert ("alpha", "tpp", "jacobian") in ranked and ("alpha", "ioi", "soft_suffix") not in ranked

    html = files[out / "index.html"]
    assert html.count("<svg") == 4, "recovery against drift, budget curves for ioi and tpp, suppression against side effect"
    assert '<a href="../records/smollm2-135m-instruct/beta/ioi__encoder.json">encoder</a>' in html

    spliced = files[readme]
    assert spliced.startswith("# Project\n\n" + README_START) and spliced.endswith(README_END + "\n\nMore text.\n")
    assert "old table" not in spliced and "[encoder](records/smollm2-135m-instruct/beta/ioi__encoder.json)" in spliced
    assert render_files(load_records(root), out, readme) == files, "the same records give the same bytes"


def test_write_leaderboard_writes_every_file(synthetic):
    root, out, readme = synthetic
    written = write_leaderboard(root, out, readme)
    assert sorted(p.name for p in written) == ["README.md", "README.md", "index.html", "leaderboard.csv"]
    assert all(p.exists() for p in written) and README_START in readme.read_text()


def test_readme_without_markers_is_an_error(tmp_path):
    with pytest.raises(BenchmarkError, match="leaderboard:start"):
        splice_readme("# no markers\n", "section", Path("README.md"))
