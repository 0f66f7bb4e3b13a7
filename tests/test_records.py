"""Run records: schema acceptance and rejection, strict JSON, atomic writes, committed records, and the code state a
run records (generated outputs are not code)."""

import copy
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from benchmark.running import records
from benchmark.errors import BenchmarkError
from benchmark.files import write_json_atomic
from benchmark.running.records import RECORDS_DIR, load_record, record_files, validate_record


def test_end_to_end_record_validates_and_has_flips(tiny_run):
    record, path = tiny_run
    validate_record(record)
    assert load_record(path) == json.loads(path.read_text())
    assert record["counts"]["valid_flips"] > 0
    assert record["counts"]["recovered"] <= record["counts"]["valid_flips"]
    assert len(record["examples"]) == record["counts"]["examples"]
    assert record["metrics"]["c1_max_preact_change"] < 1e-4
    assert record["defense"]["params"]["k"] == 8 and record["defense"]["params"]["mode"] == "negative"


def test_string_metric_is_rejected(tiny_run):
    bad = copy.deepcopy(tiny_run[0])
    bad["metrics"]["recovery_rate"] = "0.9"
    with pytest.raises(BenchmarkError, match="metrics.recovery_rate"):
        validate_record(bad)


def test_missing_key_is_rejected(tiny_run):
    bad = copy.deepcopy(tiny_run[0])
    del bad["counts"]["valid_flips"]
    with pytest.raises(BenchmarkError, match="valid_flips"):
        validate_record(bad)


def test_unknown_key_and_nan_are_rejected(tiny_run):
    bad = copy.deepcopy(tiny_run[0])
    bad["metrics"]["made_up"] = 1.0
    with pytest.raises(BenchmarkError, match="made_up"):
        validate_record(bad)
    bad = copy.deepcopy(tiny_run[0])
    bad["metrics"]["drift_rel"] = float("nan")
    with pytest.raises(BenchmarkError, match="nan"):
        validate_record(bad)


def test_recovered_must_agree_with_the_attacked_score(tiny_run):
    bad = copy.deepcopy(tiny_run[0])
    i, row = next((i, r) for i, r in enumerate(bad["examples"]) if r["valid_flip"] and r["recovered"])
    row["b_attacked"] = -abs(row["b_attacked"])
    with pytest.raises(BenchmarkError, match=f"examples.{i} .*recovered must be b_attacked > 0"):
        validate_record(bad)


def test_atomic_write_keeps_old_file_when_serialization_fails(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "no temporary file is left behind"


@pytest.mark.parametrize("path", record_files(RECORDS_DIR), ids=lambda p: str(p.relative_to(RECORDS_DIR)))
def test_committed_records_validate(path: Path):
    load_record(path)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository shaped like this one: code, a README with a generated section, leaderboard/."""
    root = tmp_path / "repo"
    (root / "leaderboard").mkdir(parents=True)
    (root / "code.py").write_text("x = 1\n")
    (root / "README.md").write_text("# Title\n\n<!-- leaderboard:start -->\nold table\n<!-- leaderboard:end -->\n\nUsage.\n")
    (root / "leaderboard" / "README.md").write_text("old\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "start")
    return root


def _code_state(repo: Path, monkeypatch) -> tuple[tuple[str, bool], str | None]:
    """What a run started in ``repo`` records of its code: (commit, dirty) and the hash of uncommitted changes."""
    with monkeypatch.context() as mp:
        mp.setattr(records, "REPO_ROOT", repo)
        return records.git_state(), records.working_tree_hash()


def test_regenerating_the_leaderboard_leaves_later_runs_clean_and_their_fingerprint_unchanged(repo, tmp_path,
                                                                                              monkeypatch):
    from benchmark.reporting.leaderboard import write_leaderboard

    before = _code_state(repo, monkeypatch)
    assert before[0][1] is False and before[1] is None
    one = tmp_path / "records" / "m" / "sae_clamp"
    one.mkdir(parents=True)
    shutil.copy(RECORDS_DIR / "smollm2-135m-instruct" / "sae_clamp" / "ioi__encoder.json", one)
    write_leaderboard(tmp_path / "records", repo / "leaderboard", repo / "README.md")
    assert "old table" not in (repo / "README.md").read_text(), "the generated section was rewritten"
    assert _code_state(repo, monkeypatch) == before, "same code, same fingerprint: a checkpoint survives"


def test_a_change_outside_the_generated_section_is_still_code(repo, monkeypatch):
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace("old table", "new table"))
    assert _code_state(repo, monkeypatch)[0][1] is False
    readme.write_text(readme.read_text().replace("Usage.", "Usage, changed."))
    (_, dirty), changed_readme = _code_state(repo, monkeypatch)
    assert dirty is True and changed_readme is not None
    readme.write_text(readme.read_text().replace("new table", "newer table"))
    assert _code_state(repo, monkeypatch)[1] == changed_readme, "the generated section never enters the hash"
    (repo / "code.py").write_text("x = 2\n")
    assert _code_state(repo, monkeypatch)[1] not in (None, changed_readme)


def test_a_killed_write_leaves_no_lasting_temporary_file(tmp_path):
    target = tmp_path / "r.json"
    dead = tmp_path / ".r.json.999999999.x1y2.tmp"  # a pid no process has: the writer was killed
    old = tmp_path / ".r.json.abc123xy.tmp"  # from before temporary files named their process
    live = tmp_path / f".r.json.{os.getpid()}.zz.tmp"  # a write in progress in a live process
    other = tmp_path / ".s.json.999999999.x1y2.tmp"  # another file's
    for f in (dead, old, live, other):
        f.write_text("half")
    write_json_atomic(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_are_written_with_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == mode
