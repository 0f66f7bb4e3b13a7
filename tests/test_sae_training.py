"""The SAE trainer's report: SAEs added to a folder join it as another run; another model's folder is refused."""

import json

import pytest

from benchmark.errors import BenchmarkError
from benchmark.modeling.sae_training import TrainConfig, as_runs, train_reference_saes

SMALL = dict(d_sae=32, k=4, train_tokens=1500, heldout_tokens=200, steps=3, batch_size=64, max_seq_len=32)


def test_layers_trained_into_a_folder_join_its_report_as_another_run(tiny_dir, tmp_path):
    model = str(tiny_dir / "model")
    out = tmp_path / "saes"
    train_reference_saes(out, TrainConfig(layers=(1,), **SMALL), model)
    first = json.loads((out / "report.json").read_text())["saes"]["layer_1"]

    report = train_reference_saes(out, TrainConfig(layers=(0,), **{**SMALL, "d_sae": 16}), model, note="narrower")

    assert [r["config"]["d_sae"] for r in report["runs"]] == [32, 16]
    assert report["saes"]["layer_1"] == first and first["run"] == 0
    assert report["saes"]["layer_0"]["run"] == 1 and report["saes"]["layer_0"]["width"] == 16
    assert (out / "layer_0").is_dir() and (out / "layer_1").is_dir()
    text = (out / "REPORT.md").read_text()
    assert "## Run 1: layers 1" in text and "## Run 2: layers 0" in text and "narrower" in text
    assert "--layers 1 --width 32" in text and "--layers 0 --width 16" in text


def test_a_folder_of_another_model_file_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "saes"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"model": "other", "model_revision": "sha256:00", "saes": {},
                                                 "config": {}, "collect_seconds": 1.0}))
    with pytest.raises(BenchmarkError, match="holds SAEs of other at sha256:00, not of this model file"):
        train_reference_saes(out, TrainConfig(layers=(1,), **SMALL), str(tiny_dir / "model"))


def test_a_report_from_before_runs_reads_as_one_run():
    old = {"config": {"layers": [9]}, "model": "m", "model_revision": "r", "threads": 1, "collect_seconds": 2.0,
           "saes": {"layer_9": {"l0": 1.0}}}
    new = as_runs(old)
    assert new["runs"] == [{"config": {"layers": [9]}, "threads": 1, "collect_seconds": 2.0}]
    assert new["saes"] == {"layer_9": {"l0": 1.0, "run": 0}} and "config" not in new
