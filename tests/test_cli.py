"""Bad input exits non-zero with one clear line naming the problem."""

import argparse
import platform

import pytest

from benchmark.cli import GLIBC_DEFAULTS_ENV, keep_freed_memory, main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_defense(capsys):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clmp")
    assert code == 2 and err.count("\n") == 0
    assert "unknown defense 'sae_clmp'" in err and "did you mean 'sae_clamp'" in err


def test_unknown_task(capsys):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--tasks", "ioi,tpq")
    assert code == 2 and "unknown task suite 'tpq'" in err


def test_layer_out_of_range(capsys, tiny_dir):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--model", str(tiny_dir / "model"),
                     "--sae-dir", str(tiny_dir / "saes"), "-D", "layer=99", "--quiet")
    assert code == 2 and err.count("\n") == 0
    assert "layer 99 is out of range" in err and "0..3" in err


def test_sae_width_mismatch(capsys, tiny_dir):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--model", str(tiny_dir / "model"),
                     "--sae-dir", str(tiny_dir / "saes_wrong_width"), "-D", "layer=2", "--quiet")
    assert code == 2 and err.count("\n") == 0
    assert "d_in=32" in err and "d_model=64" in err


def test_missing_sae_file(capsys, tiny_dir, tmp_path):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--model", str(tiny_dir / "model"),
                     "--sae-dir", str(tmp_path), "-D", "layer=1", "--quiet")
    assert code == 2 and "no SAE for layer 1" in err and "benchmark train-saes" in err


def test_train_saes_trains_local_models_only(capsys):
    code, err = _run(capsys, "train-saes", "--model", "gpt2")
    assert code == 2 and err.count("\n") == 0
    assert "smollm2-135m-instruct, gemma-3-270m" in err and "'gpt2' is not one of them" in err


def test_unknown_attack_mode_and_bad_param(capsys):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--attack", "telepathy")
    assert code == 2 and "unknown attack 'telepathy'" in err
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "-D", "k")
    assert code == 2 and "not key=value" in err


def test_evaluate_and_leaderboard_on_tiny_model(capsys, tiny_dir, tmp_path):
    records = tmp_path / "records"
    code = main(["evaluate", "--defense", "sae_clamp", "--tasks", "ioi", "--model", str(tiny_dir / "model"),
                 "--sae-dir", str(tiny_dir / "saes"), "-D", "layer=1", "-D", "k=4", "--eps", "0.1,0.5", "--steps", "5",
                 "--records-dir", str(records), "--quiet"])
    assert code == 0
    assert "valid flips" in capsys.readouterr().out
    (path,) = records.rglob("*.json")
    assert path.name == "ioi__encoder.json"
    before = path.read_bytes()
    code = main(["evaluate", "--defense", "sae_clamp", "--tasks", "ioi", "--model", str(tiny_dir / "model"),
                 "--sae-dir", str(tiny_dir / "saes"), "-D", "layer=1", "-D", "k=4", "--eps", "0.1", "--steps", "3",
                 "--records-dir", str(records), "--quiet", "--keep-existing"])
    assert code == 0 and path.read_bytes() == before, "another setting, but the record exists: kept"
    assert "kept" in capsys.readouterr().out
    code = main(["leaderboard", "--records-dir", str(records), "--out-dir", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "README.md").read_text()
    assert "| sae_clamp" in table and "ioi" in table and "records/" in table
    written = [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()]
    assert sorted(written) == sorted(str(tmp_path / n) for n in ("README.md", "index.html", "leaderboard.csv")), \
        "with another --out-dir the repository README is left alone"


def test_bad_shard_and_nothing_to_merge(capsys, tmp_path):
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--shard", "2/2")
    assert code == 2 and err.count("\n") == 0 and "shard 2/2 does not exist" in err
    code, err = _run(capsys, "evaluate", "--defense", "sae_clamp", "--shard", "half")
    assert code == 2 and "--shard expects i/n" in err
    code, err = _run(capsys, "merge", str(tmp_path))
    assert code == 2 and err.count("\n") == 0 and "no shard files" in err


def test_sharded_evaluate_then_merge(capsys, tiny_dir, tmp_path, monkeypatch):
    from benchmark.running import engine

    monkeypatch.setattr(engine, "working_tree_hash", lambda: None)  # edits meanwhile must not split the shards
    records = tmp_path / "records"
    args = ["evaluate", "--defense", "sae_clamp", "--tasks", "ioi", "--model", str(tiny_dir / "model"), "--sae-dir",
            str(tiny_dir / "saes"), "-D", "layer=1", "-D", "k=4", "--eps", "0.1,0.5", "--steps", "5",
            "--batch-size", "16", "--records-dir", str(records), "--quiet"]
    for i in range(2):
        assert main([*args, "--shard", f"{i}/2"]) == 0
        assert f"shard {i}/2:" in capsys.readouterr().out
    assert sorted(p.name for p in records.rglob("*.json")) == ["ioi__encoder.shard-0-of-2.json",
                                                               "ioi__encoder.shard-1-of-2.json"]
    assert main(["merge", str(records)]) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    (path,) = records.rglob("*.json")
    assert path.name == "ioi__encoder.json", "the shard files are removed once merged"
    assert main(args) == 0
    assert "done already" in capsys.readouterr().out


def test_reference_defense_takes_no_parameters(capsys):
    code, err = _run(capsys, "evaluate", "--defense", "reference", "--tasks", "ioi", "-D", "k=4")
    assert code == 2 and err.count("\n") == 0 and "reference" in err and "-D" in err


def test_every_suite_names_a_registered_reference_defense():
    from defenses import DEFENSES
    from tasks import TASKS

    for name, cls in TASKS.items():
        assert cls.reference_defense in DEFENSES.names(), f"suite {name}: unknown reference defense"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_keeps_freed_memory_unless_its_defaults_are_asked_for(monkeypatch):
    """glibc accepts every setting (mallopt returns 1 for each); with the opt-out nothing is set."""
    monkeypatch.setenv(GLIBC_DEFAULTS_ENV, "1")
    assert keep_freed_memory() is False
    monkeypatch.delenv(GLIBC_DEFAULTS_ENV)
    assert keep_freed_memory() is True


def test_a_first_run_in_seconds_on_the_tiny_model(capsys, tmp_path, monkeypatch):
    """`--model tiny` builds the stand-in into the cache (with its SAEs as the default --sae-dir); `--limit` scores
    the first test examples (and the side effect on the first control texts), says so in the record and its file name, and the record is never ranked; `--quiet`
    drops the progress bars but not the stage lines."""
    import json

    from benchmark.running.records import RECORDS_DIR, comparable

    from benchmark.running import engine

    monkeypatch.setenv("BENCHMARK_CACHE", str(tmp_path / "cache"))
    control_sizes = []
    kl = engine.next_token_kl
    monkeypatch.setattr(engine, "next_token_kl", lambda m, batch, *a, **k: control_sizes.append(len(batch)) or kl(
        m, batch, *a, **k))
    records = tmp_path / "records"
    code = main(["evaluate", "--model", "tiny", "--defense", "sae_clamp", "--tasks", "ioi", "--limit", "8",
                 "--records-dir", str(records), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = records / "tiny" / "sae_clamp" / "ioi__encoder.limit-8.json"
    assert "(8 examples, the first 8 only: not comparable, never ranked)" in out and str(path) in out
    record = json.loads(path.read_text())
    assert record["task"]["limit"] == 8 and len(record["examples"]) == 8 and not comparable(record)
    assert control_sizes == [8], "the side effect is measured on the first 8 control texts"
    assert record["saes"][0]["release"].startswith(str(tmp_path / "cache" / "tiny"))
    assert comparable(json.loads((RECORDS_DIR / "smollm2-135m-instruct" / "sae_clamp" / "ioi__encoder.json").read_text()))
    stages = ["prepare task", "fit defense", "score base and defended", "side effect, edit size and task metrics",
              "chunk 1 of 1"]
    assert [line.split(":")[0].strip() for line in out.splitlines() if line.endswith(" s")] == stages
    assert "attack[encoder]" not in err, "no progress bar"
    with pytest.raises(SystemExit) as bad:
        main(["evaluate", "--defense", "sae_clamp", "--limit", "0"])
    assert bad.value.code == 2 and "--limit: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_every_help_shows_the_defaults(monkeypatch):
    from benchmark.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps long lines at hyphens, as in a checkout at /work/wt-gemma

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                shown = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
                assert f"(default: {shown})" in text, f"`benchmark {name} --help` hides the default of {action.dest}"
