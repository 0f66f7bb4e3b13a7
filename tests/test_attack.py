"""The attacker's constraints, checked on the tiny model."""

import pytest
import torch
from conftest import site_input

from benchmark.attacks import AttackConfig, build_attack

from benchmark.modeling.forward import compose, defense_edits, run_edited
from benchmark.running.engine import behavior_scores, shared_prefix
from benchmark.running.replay import replay_parts, stack_deltas


def _valid_flips(model, ioi, defense):
    batch = ioi.encode(ioi.examples("test"))
    base = behavior_scores(model, ioi, batch, None)
    defended = behavior_scores(model, ioi, batch, defense)
    idx = ((base > 0) & (defended <= 0)).nonzero()[:, 0]
    assert len(idx) >= 10, "the tiny setup should give valid flips to attack"
    return batch.select(idx[:24])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_encoder_mode_leaves_defended_preactivations_unchanged(tiny_model, ioi, fitted_clamp, optimizer):
    flips = _valid_flips(tiny_model, ioi, fitted_clamp)
    cfg = AttackConfig(mode="encoder", eps=(0.5,), steps=10, optimizer=optimizer)
    outcomes = build_attack(tiny_model, fitted_clamp, ioi, cfg).run(flips, progress=False)
    assert any(o.delta.abs().max() > 0 for o in outcomes)
    # recompute independently of the attacker's own bookkeeping
    h = site_input(tiny_model, fitted_clamp, flips, 2)
    delta = stack_deltas(flips, [o.delta for o in outcomes])
    before = fitted_clamp.readouts(2, h)
    after = fitted_clamp.readouts(2, h + delta)
    mask = flips.token_mask
    rel = (after - before)[mask].abs().max() / before[mask].pow(2).mean().sqrt()
    assert rel < 1e-4
    assert max(o.c1_change for o in outcomes) < 1e-4


def test_unconstrained_mode_moves_defended_preactivations(tiny_model, ioi, fitted_clamp):
    flips = _valid_flips(tiny_model, ioi, fitted_clamp)
    cfg = AttackConfig(mode="none", eps=(0.5,), steps=10)
    outcomes = build_attack(tiny_model, fitted_clamp, ioi, cfg).run(flips, progress=False)
    assert max(o.c1_change for o in outcomes) > 1e-2


def test_budget_holds_per_position(tiny_model, ioi, fitted_clamp):
    flips = _valid_flips(tiny_model, ioi, fitted_clamp)
    eps = 0.05
    outcomes = build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(eps=(eps,), steps=5)).run(flips, progress=False)
    h = site_input(tiny_model, fitted_clamp, flips, 2)
    delta = stack_deltas(flips, [o.delta for o in outcomes])
    assert (delta.norm(dim=-1) <= eps * h.norm(dim=-1) * (1 + 1e-5) + 1e-7).all()
    assert (delta[~flips.token_mask] == 0).all(), "delta must not touch padding or the attention sink"


def test_recovered_examples_really_recover_with_defense_active(tiny_model, ioi, fitted_clamp):
    flips = _valid_flips(tiny_model, ioi, fitted_clamp)
    outcomes = build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(eps=(0.5,), steps=15)).run(flips, progress=False)
    rec = [o for o in outcomes if o.recovered]
    assert rec, "the attack should recover some flips on the tiny model"
    sub = flips.select([o.index for o in rec])
    delta = stack_deltas(sub, [o.delta for o in rec])
    edits = defense_edits(fitted_clamp, sub)
    edits[2] = compose(lambda h: h + delta, edits[2])
    with torch.no_grad():
        b = ioi.behavior(run_edited(tiny_model, sub, edits), sub)
    assert (b > 0).all()
    assert all(o.steps_used >= 1 for o in rec)


def test_replay_parts_sum_to_delta(tiny_model, ioi, fitted_clamp):
    from benchmark.running.replay import split_delta

    flips = _valid_flips(tiny_model, ioi, fitted_clamp)
    outcomes = build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(eps=(0.5,), steps=5)).run(flips, progress=False)
    h = site_input(tiny_model, fitted_clamp, flips, 2)
    delta = stack_deltas(flips, [o.delta for o in outcomes])
    sae, feats = fitted_clamp.sae_at(2)
    parts = split_delta(sae.sae, feats, h, delta, flips.token_mask)
    total = parts["error"] + parts["latent"] + parts["defended"]
    assert torch.allclose(total, delta, atol=1e-4 * float(delta.abs().max()))
    assert parts["latent"].abs().max() > 0 and parts["error"].abs().max() > 0


def test_replay_from_the_stored_residuals_equals_full_passes(tiny_model, ioi, fitted_clamp):
    flips = _valid_flips(tiny_model, ioi, fitted_clamp)
    outcomes = build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(eps=(0.5,), steps=5)).run(flips, progress=False)
    delta = stack_deltas(flips, [o.delta for o in outcomes])
    full = replay_parts(tiny_model, fitted_clamp, ioi, flips, delta, 2)
    store = shared_prefix(tiny_model, ioi, fitted_clamp)
    store.get(flips)
    calls = []
    hook = tiny_model.hf.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        stored = replay_parts(tiny_model, fitted_clamp, ioi, flips, delta, 2, residuals=store)
    finally:
        hook.remove()
    assert calls == [], "the blocks below the store's layer must not run again"
    assert set(stored) == set(full) == {"error", "latent", "defended"}
    for name in full:
        assert torch.allclose(stored[name], full[name], atol=1e-4)
