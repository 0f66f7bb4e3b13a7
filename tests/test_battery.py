"""The full battery's plan: it covers every built-in defense, each step is a valid `benchmark evaluate`, and its
coverage (CLI list and leaderboard table) reports exactly the runs without a record."""

import json

from benchmark.running.battery import PLAN, SUITES, coverage, planned_runs
from benchmark.cli import build_parser, main
from benchmark.reporting.leaderboard import coverage as coverage_table
from benchmark.reporting.leaderboard import standings
from defenses import DEFENSES
from defenses.base import check_params
from tasks import TASKS

from conftest import committed_record_as

MODEL = "smollm2-135m-instruct"


def test_plan_runs_every_builtin_defense_and_each_suites_reference_with_every_mode():
    runs = planned_runs()
    assert len(runs) == len(set(runs))
    planned = {d for d, _, _ in runs}
    assert planned == set(DEFENSES.names()) | {"decoder_span_ablation"}
    for suite in SUITES:
        ref = TASKS.get(suite).reference_defense
        assert {m for d, s, m in runs if (d, s) == (ref, suite)} == {"encoder", "none", "soft_suffix"}
    multi = {(s, m) for d, s, m in runs if d == "multi_layer_clamp"}
    assert multi == {(s, m) for s in SUITES for m in ("jacobian", "encoder", "none", "soft_suffix")}


def test_every_step_is_a_valid_evaluate_command():
    parser = build_parser()
    for step in PLAN:
        args = parser.parse_args(step.argv())
        assert args.tasks == list(step.suites) and args.attack == list(step.modes)
        if "jacobian" in step.modes and step.suites == ("tpp",):
            assert args.batch_size == 16  # 64 long TPP prompts' cross-site basis outgrew 22 GB
        if step.defense not in ("reference",) and "/" not in step.defense:
            params = dict(p.split("=", 1) for p in step.params)
            check_params(DEFENSES.get(step.defense), {k: json.loads(v) for k, v in params.items()})


def test_coverage_lists_a_written_record_and_only_it(tmp_path, capsys):
    run = ("sae_clamp", "ioi", "none")
    path = tmp_path / MODEL / "sae_clamp" / "ioi__none.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(committed_record_as(*run)))
    have = coverage(tmp_path)
    assert have[run] == path and sum(p is not None for p in have.values()) == 1

    assert main(["battery", "--list", "--records-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"1 of {len(have)} planned runs have a record"
    assert [line.split() for line in out if line.startswith("recorded")] == [["recorded", *run]]


def test_leaderboard_coverage_marks_missing_modes_and_counts_recorded_runs(tmp_path):
    records = [(tmp_path / f"{i}.json", committed_record_as(*run)) for i, run in
               enumerate([("sae_clamp", "ioi", "encoder"), ("sae_clamp", "ioi", "none"), ("alpha", "ioi", "encoder")])]
    note, rows = coverage_table(standings(records))
    assert note.startswith(f"2 of {len(planned_runs())} planned runs")  # alpha is not in the plan
    by_defense = {row[0]: dict(zip(SUITES, row[1:])) for row in rows}
    assert by_defense["sae_clamp"]["ioi"] == "encoder · none · **missing** soft_suffix"
    assert by_defense["tpp_ablation"]["ioi"] == "not planned"
    assert "alpha" not in by_defense
