"""Run records: schema acceptance and rejection, strict JSON, atomic writes, committed records."""

import copy
import json
from pathlib import Path

import pytest

from benchmark.errors import BenchmarkError
from benchmark.records import RECORDS_DIR, load_record, record_files, validate_record, write_json_atomic


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
