"""A run in chunks, on the tiny model: the same seed gives the same metrics, an interrupted run resumes to the record
an uninterrupted one writes, and merged shards give it too."""

import hashlib
import json
import math

import pytest

from benchmark.running import engine
from benchmark.attacks import AttackConfig, build_attack
from benchmark.running.engine import behavior_scores, evaluate
from benchmark.errors import BenchmarkError
from benchmark.running.records import checkpoint_path, load_record, record_files, record_path, shard_path
from benchmark.running.replay import replay_parts, stack_deltas
from benchmark.running.shards import Shard, chunk_rows, merge, shard_files

CFG = AttackConfig(mode="encoder", eps=(0.05, 0.2, 0.5), steps=15, batch_size=24)  # 3 chunks on the tiny model
PARAMS = {"layer": 2, "k": 8, "value": -4.0}


@pytest.fixture(autouse=True)
def fixed_code(monkeypatch):
    """Edits to the working tree while a test runs must not change its runs' fingerprints."""
    monkeypatch.setattr(engine, "working_tree_hash", lambda: None)


def _run(model, tiny_dir, root, **kwargs):
    return evaluate(model, "sae_clamp", "ioi", CFG, PARAMS, tiny_dir / "saes", root, progress=False, **kwargs)


def _without_provenance(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "provenance"}


@pytest.fixture(scope="module")
def clean(tiny_model, tiny_dir, tmp_path_factory):
    """One uninterrupted, unsharded run: (record, path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "working_tree_hash", lambda: None)
        return _run(tiny_model, tiny_dir, tmp_path_factory.mktemp("clean"))


def _chunks(record: dict) -> int:
    return math.ceil(record["counts"]["valid_flips"] / CFG.batch_size)


def test_the_tiny_run_has_several_chunks(clean):
    assert _chunks(clean[0]) >= 3 and clean[0]["counts"]["recovered"] > 0


def test_same_seed_gives_the_same_metric_hash(clean, tiny_model, tiny_dir, tmp_path):
    again, _ = _run(tiny_model, tiny_dir, tmp_path)
    digest = lambda r: hashlib.sha256(json.dumps(r["metrics"], sort_keys=True).encode()).hexdigest()  # noqa: E731
    assert digest(again) == digest(clean[0])


def _interrupt_after_first_chunk(monkeypatch):
    real, calls = engine.attack_chunk, []

    def interrupted(*args, **kwargs):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "attack_chunk", interrupted)


def _count_chunks(monkeypatch) -> list:
    real, calls = engine.attack_chunk, []
    monkeypatch.setattr(engine, "attack_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_interrupted_run_resumes_to_the_uninterrupted_record(clean, tiny_model, tiny_dir, tmp_path, monkeypatch,
                                                              capsys):
    path = record_path(tiny_model.name, "sae_clamp", "ioi", "encoder", tmp_path)
    _interrupt_after_first_chunk(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_model, tiny_dir, tmp_path)
    saved = json.loads(checkpoint_path(path).read_text())
    assert [c["index"] for c in saved["chunks"]] == [0] and not path.exists()

    monkeypatch.undo()
    monkeypatch.setattr(engine, "working_tree_hash", lambda: None)
    calls = _count_chunks(monkeypatch)
    record, out = _run(tiny_model, tiny_dir, tmp_path)
    n = _chunks(clean[0])
    assert f"resuming: 1 of {n} chunks done" in capsys.readouterr().out
    assert len(calls) == n - 1, "the finished chunk is not attacked again"
    assert _without_provenance(record) == _without_provenance(clean[0])
    assert record["provenance"]["fingerprint"] == clean[0]["provenance"]["fingerprint"]
    assert out == path and load_record(path) == record and not checkpoint_path(path).exists()


@pytest.fixture(scope="module")
def sharded(clean, tiny_model, tiny_dir, tmp_path_factory):
    """Shards 0/2 and 1/2 of the clean run's settings: their files' texts."""
    root = tmp_path_factory.mktemp("sharded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "working_tree_hash", lambda: None)
        return [_run(tiny_model, tiny_dir, root, shard=Shard(i, 2))[1].read_text() for i in range(2)]


def _shard_files(sharded, path):
    files = [shard_path(path, i, 2) for i in range(2)]
    path.parent.mkdir(parents=True)
    for f, text in zip(files, sharded):
        f.write_text(text)
    return files


def test_checkpoint_of_another_run_is_ignored(clean, sharded, tiny_model, tiny_dir, tmp_path, monkeypatch, capsys):
    path = record_path(tiny_model.name, "sae_clamp", "ioi", "encoder", tmp_path)
    stale = dict(json.loads(sharded[0]), shard={"index": 0, "count": 1}, fingerprint="sha256:" + "0" * 64)
    path.parent.mkdir(parents=True)
    checkpoint_path(path).write_text(json.dumps(stale))
    calls = _count_chunks(monkeypatch)
    record, _ = _run(tiny_model, tiny_dir, tmp_path)
    assert "comes from a different run" in capsys.readouterr().out
    assert len(calls) == _chunks(clean[0])
    assert _without_provenance(record) == _without_provenance(clean[0])


def test_finished_record_is_not_run_again(clean, tiny_model, tiny_dir, monkeypatch, capsys):
    calls = _count_chunks(monkeypatch)
    record, path = _run(tiny_model, tiny_dir, clean[1].parents[2])
    assert path == clean[1] and record == clean[0] and not calls
    assert "done already" in capsys.readouterr().out


def test_shards_run_their_chunks_and_merge_into_the_single_run_record(clean, sharded, tiny_model, tmp_path):
    for i, text in enumerate(sharded):
        data = json.loads(text)
        assert data["shard"] == {"index": i, "count": 2}
        assert [c["index"] for c in data["chunks"]] == Shard(i, 2).chunks(_chunks(clean[0]))
    path = record_path(tiny_model.name, "sae_clamp", "ioi", "encoder", tmp_path)
    files = _shard_files(sharded, path)
    assert record_files(tmp_path) == [], "shard files are not records: the leaderboard does not see them"
    assert shard_files([tmp_path]) == {path: files}

    with pytest.raises(BenchmarkError, match="missing: 1/2"):
        merge(path, files[:1])
    record = merge(path, files)
    assert _without_provenance(record) == _without_provenance(clean[0])
    assert load_record(path) == record
    assert record["provenance"]["fingerprint"] == clean[0]["provenance"]["fingerprint"]


def test_merge_refuses_stale_or_unfinished_shards(sharded, tiny_model, tmp_path):
    path = record_path(tiny_model.name, "sae_clamp", "ioi", "encoder", tmp_path)
    files = _shard_files(sharded, path)
    shard0 = json.loads(sharded[0])
    files[0].write_text(json.dumps(dict(shard0, chunks=shard0["chunks"][:1])))
    with pytest.raises(BenchmarkError, match=r"has 1 of 2 chunks.*--shard 0/2"):
        merge(path, files)
    files[0].write_text(json.dumps(dict(shard0, fingerprint="sha256:" + "1" * 64)))
    with pytest.raises(BenchmarkError, match="different runs"):
        merge(path, files)
    files[0].write_text("{}")
    with pytest.raises(BenchmarkError, match="is not a partial run"):
        merge(path, files)
    assert not path.exists()


def test_shard_parsing():
    assert Shard.parse("1/4") == Shard(1, 4) and Shard(1, 4).chunks(10) == [1, 5, 9]
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(BenchmarkError, match="shard"):
            Shard.parse(bad)


def test_path_replay_per_chunk_matches_replay_of_all_recovered(tiny_model, ioi, fitted_clamp):
    """The engine replays each chunk's recovered examples together; a batch of a different make-up changes
    floats only, never whether a replay recovers."""
    test = ioi.encode(ioi.examples("test"))
    valid = (behavior_scores(tiny_model, ioi, test, None) > 0) & (behavior_scores(tiny_model, ioi, test, fitted_clamp) <= 0)
    flips = test.select(valid.nonzero()[:, 0])
    attack = build_attack(tiny_model, fitted_clamp, ioi, CFG)
    outcomes = attack.run(flips, progress=False)

    def replay(rows):
        batch = flips.select(rows)
        return replay_parts(tiny_model, fitted_clamp, ioi, batch, stack_deltas(batch, [outcomes[i].delta for i in rows]),
                            attack.layer)

    recovered = [o.index for o in outcomes if o.recovered]
    together = replay(recovered)
    per_chunk = {name: [] for name in together}
    for c in range(math.ceil(len(flips) / CFG.batch_size)):
        rows = [i for i in chunk_rows(c, CFG.batch_size, len(flips)) if i in recovered]
        for name, scores in (replay(rows) if rows else {}).items():
            per_chunk[name] += scores.tolist()
    for name, scores in together.items():
        assert [s > 0 for s in per_chunk[name]] == [bool(s > 0) for s in scores], name
        assert per_chunk[name] == pytest.approx(scores.tolist(), abs=1e-4)
