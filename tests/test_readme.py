"""The README's Python example runs as printed, and again as a re-run notebook cell would; `evaluate` refuses a
Defense instance that cannot make a record, naming the fix."""

import re
from pathlib import Path

import pytest

from benchmark.running.engine import build_defense
from benchmark.errors import BenchmarkError
from benchmark.reporting.frame import records_to_frame
from defenses import DEFENSES
from defenses.sae_clamp import SAEClamp

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_python_example_runs_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCHMARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))  # the example registers a defense
    code = compile(python_example(), "README.md (From Python)", "exec")
    namespace = {"__name__": "__main__"}
    exec(code, namespace)
    first = records_to_frame(tmp_path / "runs")
    exec(code, namespace)  # the cell again: the class is defined and registered again, the runs are done already
    assert "done already" in capsys.readouterr().out
    frame = records_to_frame(tmp_path / "runs")
    assert frame.equals(first)
    assert list(frame["defense"]) == ["half_clamp", "sae_clamp"] and set(frame["suite"]) == {"ioi"}
    assert list(frame["limit"]) == [16, 16] and not frame["comparable"].any()
    assert {"suppression_rate", "recovery_rate", "robust_suppression", "side_effect", "valid_flips"} <= set(frame)
    assert frame.loc[0, "params"] == {"layer": None, "k": 4}


def test_the_committed_records_make_one_row_each():
    frame = records_to_frame()
    assert len(frame) == len(set(zip(frame["model"], frame["defense"], frame["suite"], frame["attack"])))
    assert frame["comparable"].all() and frame["robust_suppression"].between(0, 1).all()


class Unnamed(SAEClamp):
    """A subclass of a registered defense that forgot its own name."""

    version = "0"


def test_an_instance_must_carry_what_its_record_needs():
    with pytest.raises(BenchmarkError, match=r"defense name 'sae_clamp' belongs to the registered SAEClamp; give Unnamed "
                                             r"a name of its own"):
        build_defense(Unnamed.create())
    with pytest.raises(BenchmarkError, match=r"build the SAEClamp with SAEClamp.create\(...\)"):
        build_defense(SAEClamp(k=4))
    with pytest.raises(BenchmarkError, match="defense_params go to a registered defense's constructor"):
        build_defense(SAEClamp.create(), {"k": 4})
    assert build_defense(SAEClamp.create(k=4)).params["k"] == 4
