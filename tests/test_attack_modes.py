"""Attack modes jacobian and soft_suffix, the budget curve, and path replay on constructed cases (tiny model)."""

import copy
import math

import pytest
import torch
from conftest import site_input

from benchmark.attacks import AttackConfig, build_attack

from benchmark.attacks.base import clip_per_position

from benchmark.attacks.soft_suffix import with_suffix

from benchmark.modeling.forward import add, capture, compose, defense_edits, input_embeddings, run_edited
from benchmark.running.engine import behavior_scores, evaluate
from benchmark.errors import BenchmarkError
from benchmark.running.metrics import budget_curve
from benchmark.running.records import validate_record
from benchmark.running.replay import replay_parts, split_delta
from benchmark.modeling.saes import LoadedSAE
from defenses import DEFENSES, FitContext

MLC = {"layers": [1, 2, 3], "k": 4, "value": -4.0}  # multi_layer_clamp on the tiny model


@pytest.fixture(scope="module")
def mlc(tiny_model, tiny_dir, ioi):
    defense = DEFENSES.get("multi_layer_clamp").create(**MLC)
    defense.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    return defense


def _flips(model, task, defense, count):
    batch = task.encode(task.examples("test"))
    base = behavior_scores(model, task, batch, None)
    defended = behavior_scores(model, task, batch, defense)
    idx = ((base > 0) & (defended <= 0)).nonzero()[:, 0]
    assert len(idx) >= count, "the tiny setup should give valid flips to attack"
    return batch.select(idx[:count])


@pytest.fixture(scope="module")
def mlc_flips(tiny_model, ioi, mlc):
    return _flips(tiny_model, ioi, mlc, 12)


# -- mode jacobian ---------------------------------------------------------------------------------------------------


def _readout_jacobian(model, defense, one, layer: int, sites: list[int]) -> torch.Tensor:
    """Exact Jacobian [R, p, d] of the defended readouts at ``sites`` (editable positions, read before the defense
    acts at each site) with respect to ``delta`` added at ``layer``, for a one-example batch; computed here with
    torch.autograd.functional.jacobian, independently of the attacker's code."""
    mask = one.token_mask[0]

    def readouts(delta):
        seen = {}
        edits = defense_edits(defense, one)
        for L in defense.sites:
            edits[L] = compose(add(delta[None]) if L == layer else None, capture(seen, L), edits[L])
        run_edited(model, one, edits)
        return torch.cat([defense.readouts(L, seen[L])[0][mask].flatten() for L in sites])

    return torch.autograd.functional.jacobian(readouts, torch.zeros(one.input_ids.shape[1], model.d_model))


def _drift_ratios(tiny_model, mlc, flips, attack, chunk, n_examples=4, n_vectors=3):
    """``||J P v|| / ||J v||`` for random v, J over ALL defended readouts (C1 rows at site 1 and sites 2, 3)."""
    gen = torch.Generator().manual_seed(1)
    p = flips.input_ids.shape[1]
    ratios = []
    for i in range(n_examples):
        one = flips.select([i])
        width = one.input_ids.shape[1]
        jac = _readout_jacobian(tiny_model, mlc, one, 1, [1, 2, 3]).reshape(-1, width * tiny_model.d_model)
        for _ in range(n_vectors):
            v = torch.randn(1, p, tiny_model.d_model, generator=gen) * chunk.slot_mask[i, :, None]
            pv = attack.subspace(v, chunk.slot_mask[i:i + 1], None if chunk.basis is None else chunk.basis[i:i + 1])
            before = jac @ v[0, p - width:].flatten()
            after = jac @ pv[0, p - width:].flatten()
            assert before.norm() > 0
            ratios.append(float(after.norm() / before.norm()))
    return ratios


def test_jacobian_projection_removes_first_order_drift(tiny_model, ioi, mlc, mlc_flips):
    attack = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="jacobian"))
    chunk = attack.prepare(mlc_flips)
    assert chunk.jac_exact and int(chunk.jac_rank.min()) > 0
    assert max(_drift_ratios(tiny_model, mlc, mlc_flips, attack, chunk)) <= 1e-3
    assert float(chunk.jac_residual.max()) <= 1e-3, "the recorded residual agrees"
    # the encoder constraint alone leaves most of the downstream first-order drift
    encoder = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="encoder"))
    assert min(_drift_ratios(tiny_model, mlc, mlc_flips, encoder, encoder.prepare(mlc_flips))) > 0.05


def test_randomized_estimate_at_full_rank_matches_exact(tiny_model, ioi, mlc, mlc_flips):
    exact = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="jacobian"))
    ex = exact.prepare(mlc_flips)
    rows = 2 * 4 * int(mlc_flips.token_mask.sum(1).max())  # sites 2, 3 x k x editable positions
    full = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="jacobian", jacobian_exact_rows=0,
                                                            jacobian_rank=rows + 8))
    lr = full.prepare(mlc_flips)
    assert lr.jac_exact is False and torch.equal(lr.jac_rank, ex.jac_rank)
    v = torch.randn(len(mlc_flips), *mlc_flips.input_ids.shape[1:], tiny_model.d_model) * ex.slot_mask[..., None]
    diff = exact.subspace(v, ex.slot_mask, ex.basis) - full.subspace(v, lr.slot_mask, lr.basis)
    assert float(diff.norm() / v.norm()) < 1e-4
    assert float(lr.jac_residual.max()) <= 1e-3
    assert max(_drift_ratios(tiny_model, mlc, mlc_flips, full, lr, n_examples=2)) <= 1e-3
    # a rank-8 estimate cannot remove a rank-100 Jacobian, and the residual metric says so
    low = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="jacobian", jacobian_exact_rows=0, jacobian_rank=8))
    small = low.prepare(mlc_flips)
    assert int(small.jac_rank.max()) == 8 and float(small.jac_residual.min()) > 0.5


def test_jacobian_projection_and_clip_keep_subspace_and_budget(tiny_model, ioi, mlc, mlc_flips):
    attack = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="jacobian"))
    chunk = attack.prepare(mlc_flips)
    torch.manual_seed(0)
    n, p = mlc_flips.input_ids.shape
    # position norms spread over two orders of magnitude, so a per-position clip scales positions unevenly
    raw = torch.randn(n, p, tiny_model.d_model) * torch.logspace(-1, 1, p)[torch.randperm(p)][None, :, None]
    eps = 0.05
    cap = eps * chunk.ref_norm
    out = attack.project(raw, chunk.ref_norm, chunk.slot_mask, eps, chunk.basis)
    in_basis = lambda x: (chunk.basis.transpose(1, 2) @ x.flatten(1)[..., None]).norm()  # noqa: E731
    assert float(in_basis(out)) <= 1e-5 * float(out.norm())
    assert float((out @ attack.basis).abs().max()) <= 1e-5 * float(out.abs().max()), "C1 per position"
    assert (out.norm(dim=-1) <= cap * (1 + 1e-5) + 1e-7).all(), "C4 per position"
    assert (out[chunk.slot_mask == 0] == 0).all()
    assert float(out.norm(dim=-1).max(dim=1).values.min()) > 0.5 * eps * float(chunk.ref_norm.min())
    # a per-position clip after the projection would leave the cross-site null space
    naive = clip_per_position(attack.subspace(raw, chunk.slot_mask, chunk.basis), cap)
    assert float(in_basis(naive)) > 1e-2 * float(naive.norm())


def _downstream_drift(model, defense, flips, outcomes, layer=1, sites=(2, 3)) -> float:
    """Mean over examples of ||a_att - a_def|| / ||a_def|| of the later sites' readouts, recomputed here."""
    from benchmark.running.replay import stack_deltas

    delta = stack_deltas(flips, [o.delta for o in outcomes])
    reads = []
    for d in (None, delta):
        seen = {}
        edits = defense_edits(defense, flips)
        for L in defense.sites:
            edits[L] = compose(add(d) if L == layer and d is not None else None, capture(seen, L), edits[L])
        with torch.no_grad():
            run_edited(model, flips, edits)
        m = flips.token_mask[..., None]
        reads.append(torch.cat([(defense.readouts(L, seen[L]) * m).flatten(1) for L in sites], 1))
    return float(((reads[1] - reads[0]).norm(dim=1) / reads[0].norm(dim=1)).mean())


def test_jacobian_attack_keeps_c1_and_drifts_less_than_encoder(tiny_model, ioi, mlc, mlc_flips):
    cfg = dict(eps=(0.5,), steps=10)
    enc = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="encoder", **cfg)).run(mlc_flips, progress=False)
    jac = build_attack(tiny_model, mlc, ioi, AttackConfig(mode="jacobian", **cfg)).run(mlc_flips, progress=False)
    assert max(o.c1_change for o in jac) < 1e-4
    assert any(o.recovered for o in jac), "the null space still leaves room to recover on the tiny model"
    assert all(o.jacobian_rank > 0 and o.jacobian_exact and o.jacobian_residual < 1e-3 for o in jac)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([o.drift_rel for o in jac]) < 0.1 * mean([o.drift_rel for o in enc])
    drift_jac = _downstream_drift(tiny_model, mlc, mlc_flips, jac)
    drift_enc = _downstream_drift(tiny_model, mlc, mlc_flips, enc)
    assert drift_enc > 0.01 and drift_jac < 0.1 * drift_enc


def test_jacobian_record_end_to_end(tiny_model, tiny_dir, tmp_path):
    cfg = AttackConfig(mode="jacobian", eps=(0.2, 0.5), steps=6)
    record, _ = evaluate(tiny_model, "multi_layer_clamp", "ioi", cfg, MLC, tiny_dir / "saes", tmp_path,
                         progress=False)
    validate_record(record)
    a, m = record["attack"], record["metrics"]
    assert a["mode"] == "jacobian" and a["jacobian_estimate"] == "exact" and a["jacobian_rank"] > 0
    assert a["jacobian_probes"] == cfg.jacobian_rank and a["layer"] == 1
    assert m["c1_max_preact_change"] < 1e-4
    assert m["jacobian_residual_drift"] is not None and m["jacobian_residual_drift"] < 1e-3
    flips = [e for e in record["examples"] if e["valid_flip"]]
    assert flips and all(e["jacobian_residual_drift"] is not None for e in flips)


def test_encoder_record_has_no_jacobian_fields(tiny_run):
    record, _ = tiny_run
    assert record["attack"]["jacobian_rank"] is None
    assert record["metrics"]["jacobian_residual_drift"] is None


def test_new_config_fields_are_checked():
    with pytest.raises(BenchmarkError, match="jacobian_rank"):
        AttackConfig(mode="jacobian", jacobian_rank=0)
    with pytest.raises(BenchmarkError, match="suffix_len"):
        AttackConfig(mode="soft_suffix", suffix_len=0)


# -- mode soft_suffix ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suffix_run(tiny_model, ioi, fitted_clamp):
    flips = _flips(tiny_model, ioi, fitted_clamp, 12)
    attack = build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(mode="soft_suffix", eps=(0.5, 2.0), steps=10))
    return flips, attack, attack.run(flips, progress=False)


def _residuals(model, defense, batch, embeds=None) -> dict[int, torch.Tensor]:
    """Residual after every block (before the defense where it acts), defense active."""
    seen = {}
    edits = defense_edits(defense, batch)
    for L in range(model.n_layers):
        edits[L] = compose(capture(seen, L), edits.get(L))
    with torch.no_grad():
        run_edited(model, batch, edits, all_logits=True, inputs_embeds=embeds)
    return seen


def test_suffix_leaves_prompt_positions_untouched(tiny_model, fitted_clamp, suffix_run):
    flips, attack, outcomes = suffix_run
    k = attack.cfg.suffix_len
    ext = with_suffix(flips, k, attack.suffix_id)
    embed = input_embeddings(tiny_model).detach()
    init = embed[ext.input_ids]
    attacked = init.clone()
    attacked[:, -k:] += torch.stack([o.delta for o in outcomes])
    plain = _residuals(tiny_model, fitted_clamp, flips)
    before = _residuals(tiny_model, fitted_clamp, ext, init)
    after = _residuals(tiny_model, fitted_clamp, ext, attacked)
    p = flips.input_ids.shape[1]
    real = flips.attention_mask.bool()
    for L in range(tiny_model.n_layers):
        scale = float(plain[L][real].abs().max())
        assert float((after[L][:, :p] - plain[L])[real].abs().max()) <= 1e-4 * scale
        assert float((after[L][:, :p] - before[L][:, :p])[real].abs().max()) <= 1e-4 * scale
    last = tiny_model.n_layers - 1
    assert float((after[last][:, p:] - before[last][:, p:]).abs().max()) > 1e-2 * float(before[last].abs().max())


def test_suffix_recovers_within_its_budget(tiny_model, ioi, fitted_clamp, suffix_run):
    flips, attack, outcomes = suffix_run
    assert any(o.recovered and o.steps_used > 0 for o in outcomes), "a generous suffix budget recovers a flip"
    e0 = float(input_embeddings(tiny_model)[attack.suffix_id].norm())
    for o in outcomes:
        assert o.c1_change is None and o.delta.shape == (attack.cfg.suffix_len, tiny_model.d_model)
        assert (o.delta.norm(dim=-1) <= 2.0 * e0 * (1 + 1e-5)).all()
        assert o.delta_rel == pytest.approx(float(o.delta.norm()) / (e0 * attack.cfg.suffix_len**0.5), rel=1e-4)
        if o.steps_used == 0:
            assert o.recovery_budget in (0.0, None)
    rec = [o for o in outcomes if o.recovered]
    sub = with_suffix(flips.select([o.index for o in rec]), attack.cfg.suffix_len, attack.suffix_id)
    embeds = input_embeddings(tiny_model).detach()[sub.input_ids]
    embeds[:, -attack.cfg.suffix_len:] += torch.stack([o.delta for o in rec])
    with torch.no_grad():
        b = ioi.behavior(run_edited(tiny_model, sub, defense_edits(fitted_clamp, sub), inputs_embeds=embeds), sub)
    assert (b > 0).all(), "recovered suffixes recover with the defense active"


def test_run_edited_from_embeddings_matches_token_ids(tiny_model, ioi):
    batch = ioi.encode(ioi.examples("test")[:5])
    embeds = input_embeddings(tiny_model).detach()[batch.input_ids]
    with torch.no_grad():
        a = run_edited(tiny_model, batch, {}, all_logits=True)
        b = run_edited(tiny_model, batch, {}, all_logits=True, inputs_embeds=embeds)
    assert torch.allclose(a, b, atol=1e-4)


def test_suffix_record_end_to_end(tiny_model, tiny_dir, tmp_path):
    cfg = AttackConfig(mode="soft_suffix", eps=(0.5, 2.0), steps=5)
    record, _ = evaluate(tiny_model, "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0}, tiny_dir / "saes",
                         tmp_path, progress=False)
    validate_record(record)
    a, m = record["attack"], record["metrics"]
    assert a["suffix_len"] == 8 and a["suffix_init"] and "layer" not in a and a["jacobian_rank"] is None
    assert m["c1_max_preact_change"] is None
    assert m["residual_replay_recovery"] is None and m["latent_replay_recovery"] is None
    assert record["counts"]["valid_flips"] > 0 and m["drift_rel"] is not None


# -- budget curve ----------------------------------------------------------------------------------------------------


def _row(valid, recovered, budget=None):
    return {"valid_flip": valid, "recovered": recovered, "recovery_budget": budget, "b_base": 1.0}


def test_budget_curve_counts_flips_recovered_within_each_budget():
    rows = [_row(True, True, 0.02), _row(True, True, 0.05), _row(True, True, 0.0), _row(True, False),
            _row(False, False)]
    curve = budget_curve(rows, (0.01, 0.02, 0.05, 0.1))
    assert [c["eps_rel"] for c in curve] == [0.01, 0.02, 0.05, 0.1]
    assert [c["recovered"] for c in curve] == [1, 2, 3, 3]
    assert [c["recovery_rate"] for c in curve] == [0.25, 0.5, 0.75, 0.75]
    assert [c["robust_suppression"] for c in curve] == pytest.approx([0.6, 0.4, 0.2, 0.2])  # suppression 4/5
    assert [c["recovery_rate"] for c in budget_curve([_row(False, False)], (0.1,))] == [None]


def test_budget_curve_in_the_record(tiny_run):
    record, _ = tiny_run
    curve = record["budget_curve"]
    flips = [e for e in record["examples"] if e["valid_flip"]]
    assert [c["eps_rel"] for c in curve] == record["attack"]["eps_sweep"]
    for c in curve:
        assert c["recovered"] == sum(1 for e in flips if e["recovered"] and e["recovery_budget"] <= c["eps_rel"])
        assert c["recovery_rate"] == pytest.approx(c["recovered"] / len(flips))
    counts = [c["recovered"] for c in curve]
    assert counts == sorted(counts) and counts[-1] == record["counts"]["recovered"]
    bad = copy.deepcopy(record)
    bad["budget_curve"][0]["recovered"] = "3"
    with pytest.raises(BenchmarkError, match="budget_curve"):
        validate_record(bad)
    bad = copy.deepcopy(record)
    del bad["budget_curve"][0]["recovery_rate"]
    with pytest.raises(BenchmarkError, match="recovery_rate"):
        validate_record(bad)


# -- path replay on constructed cases --------------------------------------------------------------------------------


def _constructed_sae(w_enc: torch.Tensor, w_dec: torch.Tensor, b_enc: torch.Tensor, threshold: float) -> LoadedSAE:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    d_in, d_sae = w_enc.shape
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
    sae.requires_grad_(False)
    return LoadedSAE(sae, 2, "constructed", "constructed")


def _clamp_with(model, task, sae: LoadedSAE, features: list[int], mode: str, value: float):
    defense = DEFENSES.get("sae_clamp").create(layer=2, k=len(features), mode=mode, value=value, features=features)
    defense.fit(FitContext(model, task, saes={2: sae}))
    return defense


def _orth_complement(directions: torch.Tensor):
    """Projection [b, p, d] -> [b, p, d] onto the orthogonal complement of the columns of ``directions`` [d, n]."""
    q, _ = torch.linalg.qr(directions.double())
    q = q.float()
    return lambda v: v - (v @ q) @ q.T


def _ascend(model, defense, task, batch, project, layer=2, steps=60, rate=0.05):
    """Projected gradient ascent on the behavior with ``delta`` added at ``layer`` before the defense acts;
    returns ``delta`` [b, p, d] and the behavior scores [b] it gives with the defense active."""
    seen = {}
    edits = defense_edits(defense, batch)
    edits[layer] = compose(capture(seen, layer), edits[layer])
    with torch.no_grad():
        run_edited(model, batch, edits)
    scale = seen[layer].norm(dim=-1, keepdim=True)
    mask = batch.token_mask[..., None].float()
    delta = torch.zeros_like(seen[layer])

    def score(d):
        edits = defense_edits(defense, batch)
        edits[layer] = compose(add(d), edits[layer])
        return task.behavior(run_edited(model, batch, edits), batch)

    for _ in range(steps):
        d = delta.clone().requires_grad_(True)
        b = score(d)
        if (b > 1.0).all():
            break
        b.sum().backward()
        g = project(d.grad) * mask
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        delta = project(delta + rate * scale * g * (b <= 1.0)[:, None, None].float()) * mask
    with torch.no_grad():
        return delta, score(delta)


def _suppressed(model, task, defense, count=8):
    batch = task.encode(task.examples("test"))
    b = behavior_scores(model, task, batch, defense)
    idx = (b < -0.5).nonzero()[:, 0]
    assert len(idx) >= count
    return batch.select(idx[:count])


def _error_carried(tiny_model, ioi):
    """A narrow SAE (d_sae 32 < d_in 64), a clamp on it, suppressed examples, and a ``delta`` found by projected
    gradient ascent inside the null space of its encoder (so all of ``delta`` is the SAE error term's change),
    with the behavior scores it gives: ``(sae, defense, batch, delta, b)``."""
    torch.manual_seed(0)
    w_enc = torch.randn(64, 32) / 8
    sae = _constructed_sae(w_enc, w_enc.T / w_enc.T.norm(dim=-1, keepdim=True), torch.zeros(32), 0.05)
    defense = _clamp_with(tiny_model, ioi, sae, [0, 1, 2, 3], "negative", -4.0)
    batch = _suppressed(tiny_model, ioi, defense)
    delta, b = _ascend(tiny_model, defense, ioi, batch, _orth_complement(w_enc))
    return sae, defense, batch, delta, b


def test_replay_recovery_carried_by_the_sae_error_term(tiny_model, ioi):
    """An SAE narrower than the residual (d_sae = 32 < d_in = 64) has a 32-dimensional null space of ``W_enc^T``
    at every position. A ``delta`` inside it changes no pre-activation, so ``encode(h + delta) == encode(h)``:
    no latent moves, the defense does not see it, and the whole of ``delta`` is the SAE error term's change.
    Such a delta, found by projected gradient ascent with the defense active, recovers the behavior; the error
    replay (which is ``delta``) must recover and the latent and defended replays (zero) must not."""
    sae, defense, batch, delta, b = _error_carried(tiny_model, ioi)
    ok = b > 0.5
    assert ok.sum() >= 2, "the error subspace alone should carry a recovery on the tiny model"
    parts = split_delta(sae.sae, defense.sae_at(2)[1], site_input(tiny_model, defense, batch, 2), delta,
                        batch.token_mask)
    assert float((parts["latent"] + parts["defended"]).norm()) <= 1e-4 * float(delta.norm())
    scores = replay_parts(tiny_model, defense, ioi, batch, delta, 2)
    assert (scores["error"][ok] > 0).all()
    assert (scores["latent"] <= 0).all() and (scores["defended"] <= 0).all()


def test_replay_recovery_carried_by_non_defended_latents(tiny_model, ioi):
    """The reverse case, built so the SAE reconstructs exactly and linearly: ``W_enc = [A, -A]`` (d_sae = 128),
    ``W_dec = pinv(W_enc)`` so ``W_enc W_dec = I``, and ``b_enc = c * 1`` with ``c`` far above any ``|h W_enc|``
    so every latent is active (JumpReLU with threshold 0 is then the identity: ``z = h W_enc + c``). As
    ``W_enc 1 = 0``, ``decode(encode(h)) = h + c 1 W_dec = h``: the error term is zero for every input. A
    ``delta`` orthogonal to the defended encoder columns (C1) moves only non-defended latents, by ``delta W_enc``,
    which decode back to exactly ``delta``; so the latent part is all of ``delta`` and the error part is ~0. The
    clamp (``set`` to ``c``) removes the input-dependent part of the defended latents. The latent replay must
    recover where ``delta`` does and the error and defended replays must not."""
    torch.manual_seed(1)
    a = torch.randn(64, 64) / 8
    w_enc = torch.cat([a, -a], 1)
    c = 200.0
    sae = _constructed_sae(w_enc, torch.linalg.pinv(w_enc.double()).float(), torch.full((128,), c), 0.0)
    feats = [0, 1, 2, 3]
    defense = _clamp_with(tiny_model, ioi, sae, feats, "set", c)
    batch = _suppressed(tiny_model, ioi, defense)
    h = site_input(tiny_model, defense, batch, 2)
    assert float((h @ w_enc).abs().max()) < c / 4, "every latent stays active under attack too"
    delta, b = _ascend(tiny_model, defense, ioi, batch, _orth_complement(w_enc[:, feats]))
    assert float(((h + delta) @ w_enc).abs().max()) < c
    ok = b > 0.5
    assert ok.sum() >= 2, "non-defended latents alone should carry a recovery on the tiny model"
    parts = split_delta(sae.sae, defense.sae_at(2)[1], h, delta, batch.token_mask)
    assert float(parts["error"].norm()) <= 1e-3 * float(delta.norm())
    assert float(parts["defended"].norm()) <= 1e-3 * float(delta.norm())
    scores = replay_parts(tiny_model, defense, ioi, batch, delta, 2)
    assert (scores["latent"][ok] > 0).all()
    assert (scores["error"] <= 0).all() and (scores["defended"] <= 0).all()


def test_constructed_saes_are_what_the_replay_tests_claim():
    """Sanity of the constructions themselves, without the model."""
    torch.manual_seed(0)
    h = torch.randn(3, 5, 64) * 3
    w_enc = torch.randn(64, 32) / 8
    narrow = _constructed_sae(w_enc, w_enc.T, torch.zeros(32), 0.05).sae
    null = _orth_complement(w_enc)(torch.randn(3, 5, 64))
    assert torch.allclose(narrow.encode(h + null), narrow.encode(h), atol=1e-5)
    a = torch.randn(64, 64) / 8
    w = torch.cat([a, -a], 1)
    exact = _constructed_sae(w, torch.linalg.pinv(w.double()).float(), torch.full((128,), 200.0), 0.0).sae
    err = h - exact.decode(exact.encode(h))
    assert float(err.abs().max()) < 1e-3 * float(h.abs().max())
    assert not math.isnan(float(err.sum()))


# -- shares of the margin gain and the margin replay ---------------------------------------------------------------


def test_shares_sum_to_one_for_a_linear_readout():
    """Known answer: with a readout linear in the residual, ``b(h + x) = w . (h + x)``, the three parts of an exact
    split add up to ``delta``, so their shares of the gain ``b(h + delta) - b(h)`` sum to 1."""
    from benchmark.running.replay import PARTS, margin_shares

    torch.manual_seed(3)
    w_enc = torch.randn(64, 32) / 8
    sae = _constructed_sae(w_enc, torch.randn(32, 64) / 8, torch.zeros(32), 0.0).sae
    h, delta, w = torch.randn(5, 7, 64) * 3, torch.randn(5, 7, 64) * 3, torch.randn(64)
    mask = torch.ones(5, 7, dtype=torch.bool)
    parts = split_delta(sae, torch.tensor([0, 1, 2]), h, delta, mask)
    readout = lambda x: (x @ w).sum(1)  # noqa: E731
    margins = {p: readout(h + parts[p]) for p in PARTS}
    margins.update(none=readout(h), all=readout(h + delta))
    shares = margin_shares(margins)
    total = sum(shares[p] for p in PARTS)
    assert torch.allclose(total[(margins["all"] - margins["none"]) > 1e-3], torch.ones(1), atol=1e-4)
    assert all(float(parts[p].norm()) > 1e-2 * float(delta.norm()) for p in PARTS), "every part is some of delta"
    no_gain = margin_shares({**margins, "all": margins["none"]})
    assert all(bool(torch.isnan(no_gain[p]).all()) for p in PARTS)


def test_error_share_is_one_when_the_error_term_carries_delta(tiny_model, ioi):
    """The construction of :func:`test_replay_recovery_carried_by_the_sae_error_term` (``delta`` in the null space
    of the narrow SAE's encoder, so all of it is the error part): replayed margins give an error share of 1 and
    latent and defended shares of 0, through real forward passes with the defense active."""
    from benchmark.running.replay import margin_shares

    sae, defense, batch, delta, b = _error_carried(tiny_model, ioi)
    margins = replay_parts(tiny_model, defense, ioi, batch, delta, 2, judged=False)
    assert torch.allclose(margins["all"], b, atol=1e-4)
    shares = margin_shares(margins)
    moved = ~torch.isnan(shares["error"])
    assert moved.sum() >= 4
    assert torch.allclose(shares["error"][moved], torch.ones(1), atol=1e-3)
    assert float(shares["latent"][moved].abs().max()) < 1e-3 and float(shares["defended"][moved].abs().max()) < 1e-3


def test_push_to_margin_raises_the_margin_within_the_constraints(tiny_model, ioi, fitted_clamp):
    """Continued at its recovery budget, a just-recovered example's margin rises towards the target, C1 still
    holds (defended pre-activations at the site unchanged) and every position stays within its budget."""
    from benchmark.running.replay import stack_deltas

    flips = ioi.encode(ioi.examples("test"))
    b_base = behavior_scores(tiny_model, ioi, flips, None)
    b_def = behavior_scores(tiny_model, ioi, flips, fitted_clamp)
    flips = flips.select(((b_base > 0) & (b_def <= 0)).nonzero()[:, 0])
    attack = build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(mode="encoder", eps=(0.1, 0.3, 0.5), steps=15))
    outcomes = attack.run(flips, progress=False)
    rec = [o for o in outcomes if o.recovered]
    assert len(rec) >= 2
    batch = flips.select([o.index for o in rec])
    delta = stack_deltas(batch, [o.delta for o in rec])
    eps = torch.tensor([o.recovery_budget for o in rec])
    target = torch.tensor([o.b_attacked for o in rec]) + 1.0
    pushed, reached = attack.push_to_margin(batch, delta, eps, target)
    assert (reached >= torch.tensor([o.b_attacked for o in rec]) - 1e-4).all()
    assert (reached > torch.tensor([o.b_attacked for o in rec]) + 0.1).any()
    h = site_input(tiny_model, fitted_clamp, batch, 2)
    mask = batch.token_mask
    before, after = fitted_clamp.readouts(2, h), fitted_clamp.readouts(2, h + pushed)
    assert float((after - before)[mask].abs().max() / before[mask].pow(2).mean().sqrt()) < 1e-4
    assert (pushed.norm(dim=-1) <= eps[:, None] * h.norm(dim=-1) * (1 + 1e-4) + 1e-6).all()


def test_path_fields_in_the_record(tiny_run):
    """Every recovered example of an SAE clamp run is replayed: shares, margin target and the margin replay, and
    the record's medians are those of its rows."""
    import statistics

    record, _ = tiny_run
    rec = [e for e in record["examples"] if e["recovered"]]
    assert rec and record["counts"]["path_replayed"] == len(rec)
    assert all("margin_target" in e and "margin_replay_error" in e for e in rec)
    shares = [e["share_error"] for e in rec if e.get("share_error") is not None]
    assert record["metrics"]["share_error_median"] == pytest.approx(statistics.median(shares))
    assert record["metrics"]["margin_reached_rate"] == pytest.approx(
        sum(e["margin_b"] >= e["margin_target"] for e in rec) / len(rec))
    assert not any("margin_target" in e for e in record["examples"] if not e["recovered"])
