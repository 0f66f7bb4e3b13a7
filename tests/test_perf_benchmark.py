"""The speed benchmark's bookkeeping: a partial run rewrites its own section of perf.md and its own keys of
perf.json, and leaves every other figure as it was (the measurements themselves are the script's recorded
output, not tests)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("perf_benchmark", ROOT / "scripts" / "perf_benchmark.py")
perf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf)

MD = "\n".join(["# Attacker speed", "", "## Scaling", "", "s", "", perf.ALLOCATOR_HEADER, "", "old allocator", "",
                perf.BATTERY_HEADER, "", "battery", ""])


def test_a_section_is_replaced_and_its_neighbours_kept():
    md = perf.replace_section(MD, perf.ALLOCATOR_HEADER, [perf.ALLOCATOR_HEADER, "", "new allocator", ""])
    assert md == MD.replace("old allocator", "new allocator")


def test_a_new_section_goes_before_the_default_battery_and_a_second_update_replaces_it():
    once = perf.replace_section(MD, perf.CEILING_HEADER, [perf.CEILING_HEADER, "", "first", ""])
    assert once.index("old allocator") < once.index("first") < once.index(perf.BATTERY_HEADER)
    twice = perf.replace_section(once, perf.CEILING_HEADER, [perf.CEILING_HEADER, "", "second", ""])
    assert twice == once.replace("first", "second")
    last = perf.replace_section(twice, perf.BATTERY_HEADER, [perf.BATTERY_HEADER, "", "battery 2", ""])
    assert last == twice.replace("\nbattery\n", "\nbattery 2\n")


def test_update_section_keeps_the_other_headline_keys(tmp_path):
    (tmp_path / "perf.md").write_text(MD)
    (tmp_path / "perf.json").write_text(json.dumps({"step_ratio_vs_raw": 1.1, "allocator_speedup": 1.0}))
    perf.update_section(tmp_path, perf.ALLOCATOR_HEADER, [perf.ALLOCATOR_HEADER, "", "x", ""],
                        {"allocator_speedup": 1.2})
    assert json.loads((tmp_path / "perf.json").read_text()) == {"step_ratio_vs_raw": 1.1, "allocator_speedup": 1.2}
    assert "old allocator" not in (tmp_path / "perf.md").read_text()


def test_the_strided_unembedding_is_the_model_without_our_hook_and_ours_comes_back(tiny_model, ioi):
    from benchmark.modeling.forward import run_edited

    batch = ioi.encode(ioi.examples("test")[:4])
    batch.read_len = 2
    head = tiny_model.hf.get_output_embeddings()
    contiguous = []
    hook = head.register_forward_hook(lambda module, args, out: contiguous.append(args[0].is_contiguous()))
    try:
        with perf.strided_unembedding(tiny_model):
            run_edited(tiny_model, batch, {})
        run_edited(tiny_model, batch, {})
    finally:
        hook.remove()
    assert contiguous == [False, True]
