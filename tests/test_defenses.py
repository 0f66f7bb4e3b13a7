"""The clamp does what its docstring says, in the SAE's own decomposition."""

import dataclasses

import pytest
import torch

from benchmark.errors import BenchmarkError
from defenses import DEFENSES, FitContext


def _clamp(tiny_model, tiny_dir, ioi, **params):
    d = DEFENSES.get("sae_clamp").create(layer=2, features=[3, 17, 40, 99], **params)
    d.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    return d


@pytest.mark.parametrize("mode,value", [("zero", 0.0), ("set", 1.5), ("negative", -3.0), ("multiply", 0.25)])
def test_clamped_latents_take_the_clamp_value_and_error_term_is_kept(tiny_model, tiny_dir, ioi, mode, value):
    d = _clamp(tiny_model, tiny_dir, ioi, mode=mode, value=value)
    sae, feats = d.sae_at(2)
    sae = sae.sae
    torch.manual_seed(0)
    h = torch.randn(3, 5, 64) * 3
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 0] = False
    z = sae.encode(h)
    expected = z.clone()
    a = z[..., feats]
    target = {"zero": torch.zeros_like(a), "set": torch.full_like(a, value),
              "negative": torch.where(a > 0, torch.full_like(a, value), a), "multiply": a * value}[mode]
    expected[..., feats] = target
    error = h - sae.decode(z)
    want = sae.decode(expected) + error
    got = d.edit(2, h, mask)
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-4)
    assert torch.equal(got[:, 0], h[:, 0]), "masked positions (the attention sink) are never edited"
    if mode == "set":
        assert (target == value).all()


def test_fit_picks_k_attributed_features(fitted_clamp):
    (entry,) = fitted_clamp.defended()
    assert entry["site"] == {"layer": 2, "hook": "resid_post"}
    assert len(entry["features"]) == 8 and len(set(entry["features"])) == 8


def test_bad_parameters_are_rejected():
    with pytest.raises(BenchmarkError, match="mode"):
        DEFENSES.get("sae_clamp").create(mode="explode")
    with pytest.raises(BenchmarkError, match="value < 0"):
        DEFENSES.get("sae_clamp").create(mode="negative", value=2.0)
    with pytest.raises(BenchmarkError, match="no parameter"):
        DEFENSES.get("sae_clamp").create(kk=3)


def test_registry_suggests_close_names():
    with pytest.raises(BenchmarkError, match="did you mean 'sae_clamp'"):
        DEFENSES.get("sae_clmap")


def test_attribution_totals_are_computed_once_per_pinned_fit(tiny_model, tiny_dir, ioi, tmp_path, monkeypatch):
    """The act x grad totals come from the cache when model file, SAE file, suite data and layer match; another
    layer is another entry, computed."""
    from defenses import base

    monkeypatch.setenv("BENCHMARK_CACHE", str(tmp_path))
    folder = dataclasses.replace(tiny_model, revision="local:config")  # a local folder's config does not pin weights
    base.attribution_totals(FitContext(folder, ioi, tiny_dir / "saes"), 2)
    assert not (tmp_path / "attribution").exists()
    tiny_model = dataclasses.replace(tiny_model, revision="sha256:" + "0" * 64)  # as `--model tiny` loads it
    passes = []
    compute = base._attribution_pass
    monkeypatch.setattr(base, "_attribution_pass", lambda ctx, layer, chunk: passes.append(layer) or compute(
        ctx, layer, chunk))
    first = base.attribution_totals(FitContext(tiny_model, ioi, tiny_dir / "saes"), 2)
    again = base.attribution_totals(FitContext(tiny_model, ioi, tiny_dir / "saes"), 2)
    base.attribution_totals(FitContext(tiny_model, ioi, tiny_dir / "saes"), 1)
    assert passes == [2, 1] and torch.equal(first, again) and first.abs().sum() > 0
    assert len(list((tmp_path / "attribution").glob("*.json"))) == 2
