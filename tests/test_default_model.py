"""Checks on the real default model and the shipped reference SAEs (slow: `scripts/test.sh --slow`)."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from benchmark.modeling.models import load_model

    return load_model()


def test_default_model_shape_and_attention_sink(smollm):
    assert (smollm.n_layers, smollm.d_model) == (30, 576)
    assert smollm.revision.startswith("sha256:")
    from tasks import TASKS

    ioi = TASKS.get("ioi")(smollm.tokenizer)
    batch = ioi.encode(ioi.examples("dev")[:8])
    seen = {}
    from benchmark.modeling.forward import capture, run_edited

    with torch.no_grad():
        run_edited(smollm, batch, {12: capture(seen, 12)})
    norms = seen[12].norm(dim=-1)
    first = norms[batch.attention_mask.bool() & ~batch.token_mask]
    rest = norms[batch.token_mask]
    assert first.min() > 20 * rest.median(), "position 0 is the attention sink the SAEs exclude"


def test_base_model_solves_most_ioi_prompts(smollm):
    from benchmark.running.engine import behavior_scores
    from tasks import TASKS

    ioi = TASKS.get("ioi")(smollm.tokenizer)
    b = behavior_scores(smollm, ioi, ioi.encode(ioi.examples("dev")), None)
    assert (b > 0).float().mean() > 0.6


@pytest.mark.parametrize("layer", [8, 12, 16])
def test_reference_sae_loads_with_unit_decoder(smollm, layer):
    from benchmark.modeling.saes import load_sae

    sae = load_sae(smollm, layer)
    assert sae.sae.cfg.d_in == 576 and sae.sae.cfg.architecture() == "jumprelu"
    assert torch.allclose(sae.sae.W_dec.norm(dim=-1), torch.ones(sae.sae.cfg.d_sae), atol=1e-3)


def test_c1_invariant_on_default_model(smollm):
    from benchmark.attacks import AttackConfig, build_attack
    from benchmark.running.engine import behavior_scores
    from defenses import DEFENSES, FitContext
    from tasks import TASKS

    ioi = TASKS.get("ioi")(smollm.tokenizer)
    clamp = DEFENSES.get("sae_clamp").create()
    clamp.fit(FitContext(smollm, ioi))
    batch = ioi.encode(ioi.examples("dev"))
    base, defended = behavior_scores(smollm, ioi, batch, None), behavior_scores(smollm, ioi, batch, clamp)
    flips = batch.select(((base > 0) & (defended <= 0)).nonzero()[:8, 0])
    assert len(flips) > 0, "the reference clamp should flip some dev prompts"
    outcomes = build_attack(smollm, clamp, ioi, AttackConfig(eps=(0.1,), steps=4)).run(flips, progress=False)
    assert max(o.c1_change for o in outcomes) < 1e-4
