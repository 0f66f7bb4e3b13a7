"""A defense that abstains on a monitor (error_monitor), and the attacks that adapt to it: the evasion term, the
smoothed surrogate of the monitor's gate, and the transfer of sae_clamp's recovering deltas (issue 18)."""

from __future__ import annotations

import pytest
import torch

from benchmark.attacks import AttackConfig, build_attack
from benchmark.attacks.evasive import smoothed_gate
from benchmark.errors import BenchmarkError
from benchmark.running.engine import behavior_scores, evaluate
from benchmark.running.metrics import is_valid_flip
from benchmark.running.replay import stack_deltas
from defenses import DEFENSES, FitContext
from defenses.base import abstained

CLAMP = {"layer": 2, "k": 8, "value": -4.0}


@pytest.fixture(scope="module")
def monitor(tiny_model, tiny_dir, ioi):
    d = DEFENSES.get("error_monitor").create(**CLAMP)
    d.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    return d


@pytest.fixture(scope="module")
def flips(tiny_model, ioi, monitor):
    """The tiny IOI test examples the monitor's clamp flips (base > 0, defended <= 0)."""
    batch = ioi.encode(ioi.examples("test"))
    base = behavior_scores(tiny_model, ioi, batch, None)
    defended = behavior_scores(tiny_model, ioi, batch, monitor)
    return batch.select([i for i in range(len(batch)) if is_valid_flip(float(base[i]), float(defended[i]))][:24])


def _attack(tiny_model, ioi, defense, mode, eps=(0.05, 0.2, 0.5), steps=8, **params):
    cfg = AttackConfig(mode=mode, eps=eps, steps=steps, params=tuple(params.items()))
    return build_attack(tiny_model, defense, ioi, cfg)


def test_the_monitor_flags_about_its_target_share_of_its_clean_inputs_and_an_anomalous_error(tiny_model, ioi, monitor,
                                                                                            monkeypatch):
    from benchmark.modeling.forward import defense_edits, monitor_flags
    from defenses.error_monitor import generic_batch

    clean = [ioi.encode(ioi.examples("fit")), generic_batch(tiny_model.tokenizer, monitor.generic)]
    flags = torch.cat([monitor_flags(tiny_model, monitor, b, defense_edits(monitor, b)) for b in clean])
    assert flags.dtype == torch.bool and flags.shape == (sum(map(len, clean)),)
    assert 0 < float(flags.float().mean()) <= monitor.fpr + 1 / len(flags)
    assert float(monitor.scores(monitor.center)) == 0.0
    precision = monitor.whitener.T @ monitor.whitener
    values, vectors = torch.linalg.eigh(precision)  # the last: the direction clean error terms use least
    u = monitor.center.expand(3, 5, -1).clone()
    u[1, 3] += (2 * monitor.threshold * 64 / values[-1]) ** 0.5 * vectors[:, -1]  # twice the threshold's score
    assert float(monitor.scores(u[1, 3])) == pytest.approx(2 * monitor.threshold, rel=1e-3)
    monkeypatch.setattr(monitor, "relative_error", lambda h: u)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert monitor.abstains({2: torch.zeros(3, 5, 64)}, mask).tolist() == [False, True, False]
    mask[1, 3] = False
    assert not bool(monitor.abstains({2: torch.zeros(3, 5, 64)}, mask).any()), "only positions in token_mask count"


def test_a_flagged_clean_input_gets_the_null_readout(tiny_model, ioi, monitor):
    from benchmark.modeling.forward import defense_edits, monitor_flags

    batch = ioi.encode(ioi.examples("test"))
    flags = monitor_flags(tiny_model, monitor, batch, defense_edits(monitor, batch))
    assert 0 < int(flags.sum()) < len(batch)
    clamp = DEFENSES.get("sae_clamp").create(**CLAMP)
    clamp.chosen = monitor.chosen
    scores, clamped = behavior_scores(tiny_model, ioi, batch, monitor), behavior_scores(tiny_model, ioi, batch, clamp)
    assert torch.equal(scores[flags], torch.zeros(int(flags.sum())))
    assert torch.equal(scores[~flags], clamped[~flags])


def test_the_surrogate_has_a_gradient_where_the_gate_has_none(tiny_model, ioi, monitor, flips):
    attack = _attack(tiny_model, ioi, monitor, "evasive_encoder")
    delta = torch.zeros(*flips.input_ids.shape, 64, requires_grad=True)
    read, seen = attack.forward(flips, delta)
    flags = monitor.abstains(seen, flips.token_mask)
    assert 0 < int(flags.sum()) < len(flips), "the test needs inputs the monitor flags, and others"
    gated = abstained(ioi.behavior(read, flips), flags)
    (gate_grad,) = torch.autograd.grad(gated.sum(), delta, retain_graph=True)
    assert torch.count_nonzero(gate_grad[flags]) == 0, "through the real gate a flagged input gives the attacker nothing"
    assert torch.count_nonzero(gate_grad[~flags]) > 0, "where the gate lets the input through, the behavior's own"
    surrogate = smoothed_gate(monitor.monitor_margin(seen, flips.token_mask), 0.1)
    (surrogate_grad,) = torch.autograd.grad(surrogate.sum(), delta)
    assert bool((surrogate_grad[flags].flatten(1).norm(dim=1) > 0).all())


def _final_margin(attack, batch, outcomes) -> torch.Tensor:
    """[b]: the monitor's largest margin under each outcome's final delta."""
    with torch.no_grad():
        _, seen = attack.forward(batch, stack_deltas(batch, [o.delta for o in outcomes]))
    return attack.defense.monitor_margin(seen, batch.token_mask).max(-1).values


def test_the_evasion_term_lowers_the_detector_score(tiny_model, ioi, monitor, flips):
    plain = _attack(tiny_model, ioi, monitor, "evasive_encoder", weight=0.0)
    evasive = _attack(tiny_model, ioi, monitor, "evasive_encoder", weight=5.0)
    without, with_ = (a.run(flips, progress=False) for a in (plain, evasive))
    score_without, score_with = _final_margin(plain, flips, without), _final_margin(evasive, flips, with_)
    assert float(score_with.mean()) < float(score_without.mean())
    assert sum(o.flagged for o in with_) < sum(o.flagged for o in without)


def test_the_evasive_attack_records_its_weight_and_refuses_a_defense_without_monitor(tiny_model, tiny_dir, ioi,
                                                                                   fitted_clamp, monitor, tmp_path):
    with pytest.raises(BenchmarkError, match="has none"):
        _attack(tiny_model, ioi, fitted_clamp, "evasive_encoder")
    with pytest.raises(BenchmarkError, match="no setting"):
        _attack(tiny_model, ioi, monitor, "evasive_encoder", wieght=1.0)
    cfg = AttackConfig(mode="evasive_encoder", eps=(0.5,), steps=2, params=(("weight", 2.0),))
    record, _ = evaluate(tiny_model, "error_monitor", "ioi", cfg, CLAMP, tiny_dir / "saes", tmp_path, progress=False)
    assert record["attack"]["evasion_weight"] == 2.0 and record["attack"]["params"] == {"weight": 2.0}
    m = record["metrics"]
    assert 0 < m["monitor_fpr_test"] < 1 and 0 <= m["monitor_detection_rate"] <= 1
    flagged = [r["flagged"] for r in record["examples"] if r["valid_flip"]]
    assert len(flagged) == record["counts"]["valid_flips"]
    assert m["monitor_detection_rate"] == pytest.approx(sum(flagged) / len(flagged))
    assert all(not r["recovered"] for r in record["examples"] if r.get("flagged")), "a flagged input is not recovered"


def test_transfer_replays_exactly_the_stored_deltas(tiny_model, ioi, monitor, flips, monkeypatch):
    attack = _attack(tiny_model, ioi, monitor, "transfer")
    chunk = attack.prepare(flips)
    stored = attack.source_outcomes(chunk)
    assert 0 < sum(o.recovered for o in stored) < len(stored), "the test needs recovered and unrecovered examples"
    applied = []
    forward = attack.forward
    monkeypatch.setattr(attack, "source_outcomes", lambda c: stored)
    monkeypatch.setattr(attack, "forward", lambda b, d, **kw: applied.append(d.clone()) or forward(b, d, **kw))
    replayed = attack.run_chunk(chunk)
    (delta,) = applied
    for o, r in zip(stored, replayed):
        row = delta[o.index][chunk.real[o.index]]
        if o.recovered:
            assert torch.equal(row, o.delta) and torch.equal(r.delta, o.delta)
            assert r.recovery_budget in (None, o.recovery_budget)
        else:
            assert torch.count_nonzero(row) == 0 and not r.recovered
    assert max(r.c1_change for r in replayed) < 1e-4, "the defense defends the source's latents: C1 holds"


def test_transfer_refuses_a_defense_that_defends_other_latents(tiny_model, tiny_dir, ioi):
    other = DEFENSES.get("sae_clamp").create(layer=2, features=[0, 1, 2], value=-4.0)
    other.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    with pytest.raises(BenchmarkError, match="keeps C1 only"):
        _attack(tiny_model, ioi, other, "transfer")


def test_random_search_recovers_without_a_gradient_within_its_constraints(tiny_model, ioi, monitor, flips,
                                                                          monkeypatch):
    attack = _attack(tiny_model, ioi, monitor, "random_search", eps=(0.05, 0.5), steps=6)
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("the search asked for a gradient"))
    outcomes = attack.run(flips, progress=False)
    recovered = [o for o in outcomes if o.recovered]
    assert recovered, "random search at half the residual norm recovers some tiny-model flip"
    assert all(not o.flagged and o.recovery_budget in (0.05, 0.5) for o in recovered)
    assert all(o.b_attacked <= 0 for o in outcomes if not o.recovered)
    assert max(o.c1_change for o in outcomes) < 1e-4
    assert max(o.delta_rel for o in outcomes) <= 0.5 + 1e-4


def test_the_adversarial_projection_adds_directions_from_the_attacks_recovering_deltas(tiny_model, tiny_dir, ioi):
    params = {**CLAMP, "rounds": 2, "per_round": 4, "fit_examples": 8, "fit_eps": [0.05, 0.5], "fit_steps": 4}
    fitted = DEFENSES.get("adversarial_projection_clamp").create(**params)
    fitted.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    plain = DEFENSES.get("error_projection_clamp").create(**CLAMP)
    plain.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    basis, start = fitted.error_basis[2], plain.error_basis[2]
    assert 1 < basis.shape[1] <= 1 + 2 * 4, "the attack's directions join the decoder direction"
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    assert float((basis.T @ start).norm()) == pytest.approx(1.0, abs=1e-5), "it starts from error_projection_clamp's"
