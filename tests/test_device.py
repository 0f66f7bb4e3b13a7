"""Device and precision: bad choices fail before anything loads; a bfloat16 model keeps C1 to float32 precision; the
engine runs on CUDA where there is one (tests marked ``gpu``, skipped here otherwise)."""

import json

import pytest
import torch

from benchmark.attacks import AttackConfig, build_attack
from benchmark.errors import BenchmarkError
from benchmark.modeling.models import load_model, resolve_device, resolve_dtype
from benchmark.running.engine import behavior_scores, evaluate
from defenses import DEFENSES, FitContext
from tasks import TASKS

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_unusable_choices_fail_before_the_model_loads():
    with pytest.raises(BenchmarkError, match="float16 on the CPU is not supported"):
        load_model("no-such-model", device="cpu", dtype="float16")  # the dtype is refused before the name is looked up
    with pytest.raises(BenchmarkError, match="unknown dtype 'float8': use one of float32, bfloat16, float16"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(BenchmarkError, match="unknown device 'gpu0': use cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16


@no_cuda
def test_a_missing_cuda_device_is_named():
    with pytest.raises(BenchmarkError, match="device 'cuda:1' asked for, but this torch .* sees no CUDA device"):
        load_model("tiny", device="cuda:1")
    assert resolve_device(None) == torch.device("cpu")


def _bf16_flips(tiny_dir, device: str = "cpu"):
    model = load_model(str(tiny_dir / "model"), device=device, dtype="bfloat16")
    task = TASKS.get("ioi")(model.tokenizer)
    defense = DEFENSES.get("sae_clamp").create(layer=2, k=8, mode="negative", value=-4.0)
    with model.on_device():
        defense.fit(FitContext(model, task, tiny_dir / "saes"))
        batch = task.encode(task.examples("test"))
        base, defended = behavior_scores(model, task, batch, None), behavior_scores(model, task, batch, defense)
        flips = batch.select(((base > 0) & (defended <= 0)).nonzero()[:12, 0])
    return model, task, defense, flips


def test_a_bfloat16_model_keeps_c1_to_float32_precision(tiny_dir):
    """The weights are bfloat16 (eps 8e-3), yet the defended pre-activations move by float32 rounding only: edits,
    ``delta`` and the readouts inside them are float32 (benchmark.modeling.forward.run_edited)."""
    model, task, defense, flips = _bf16_flips(tiny_dir)
    assert model.hf.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16 and len(flips) >= 4
    outcomes = build_attack(model, defense, task, AttackConfig(mode="encoder", eps=(0.5,), steps=10)).run(
        flips, progress=False)
    assert any(o.delta.abs().max() > 0 for o in outcomes)
    assert max(o.c1_change for o in outcomes) < 1e-5, "C1 at float32 precision, far below bfloat16's 8e-3"


def test_the_record_names_device_and_dtype(tiny_dir, tmp_path):
    model = load_model(str(tiny_dir / "model"), dtype="bfloat16")
    cfg = AttackConfig(mode="encoder", eps=(0.05, 0.5), steps=5)
    record, path = evaluate(model, "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0}, tiny_dir / "saes",
                            tmp_path, progress=False, limit=16)
    assert record["model"]["dtype"] == "bfloat16" and record["provenance"]["dtype"] == "bfloat16"
    assert record["provenance"]["device"].startswith("cpu (")
    assert json.loads(path.read_text())["model"]["dtype"] == "bfloat16"
    f32, _ = evaluate(load_model(str(tiny_dir / "model")), "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0},
                      tiny_dir / "saes", tmp_path / "f32", progress=False, limit=16)
    assert "dtype" not in f32["model"], "a float32 run keeps the fingerprint it had before the dtype was a choice"
    assert f32["provenance"]["fingerprint"] != record["provenance"]["fingerprint"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_runs_on_cuda(tiny_dir, tmp_path, dtype):
    """End to end on the GPU: every tensor of the run on the model's device, and C1 still at float32 precision."""
    model = load_model(str(tiny_dir / "model"), device="cuda", dtype=dtype)
    cfg = AttackConfig(mode="encoder", eps=(0.05, 0.5), steps=10)
    record, _ = evaluate(model, "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0}, tiny_dir / "saes",
                         tmp_path, progress=False, limit=32)
    assert record["provenance"]["device"].startswith("cuda") and record["counts"]["valid_flips"] > 0
    c1 = [e["c1_change"] for e in record["examples"] if e.get("c1_change") is not None]
    assert c1 and max(c1) < 1e-5


@pytest.mark.gpu
@needs_cuda
def test_jacobian_and_soft_suffix_run_on_cuda(tiny_dir, tmp_path):
    model, task, defense, flips = _bf16_flips(tiny_dir, "cuda")
    with model.on_device():
        for mode in ("jacobian", "soft_suffix"):
            outcomes = build_attack(model, defense, task, AttackConfig(mode=mode, eps=(0.5,), steps=3)).run(
                flips, progress=False)
            assert len(outcomes) == len(flips)
