"""The built-in defenses beyond sae_clamp do what their docstrings say, and each runs through the engine."""

import pytest
import torch

from benchmark.attacks import AttackConfig

from benchmark.modeling.forward import capture, defense_edits, run_edited
from benchmark.cli import main
from benchmark.running.engine import behavior_scores, evaluate
from benchmark.errors import BenchmarkError
from benchmark.running.records import load_record, validate_record
from defenses import DEFENSES, FitContext
from defenses.sae_clamp import SAEClamp

FEATS = [3, 17, 40, 99]
BUILT_INS = ["adversarial_projection_clamp", "concept_scrubbing", "directional_ablation", "error_monitor",
             "error_projection_clamp", "multi_layer_clamp", "none", "sae_clamp", "sae_reconstruct_clamp",
             "trajectory_clamp"]


def _fit(tiny_model, tiny_dir, ioi, name, **params):
    d = DEFENSES.get(name).create(**params)
    d.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    return d


def _h_and_mask():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 64) * 3
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 0] = False
    return h, mask


def test_every_builtin_is_registered_under_its_own_name(capsys):
    assert set(BUILT_INS) <= set(DEFENSES.names())
    for name in BUILT_INS:
        cls = DEFENSES.get(name)
        assert cls.name == name, "a subclass must not inherit its parent's registered name"
        assert cls.version and cls.description and cls.__doc__
    assert main(["defenses"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in BUILT_INS:
        assert DEFENSES.get(name).description in listed[name]


def test_multi_layer_clamp_clamps_each_layer(tiny_model, tiny_dir, ioi):
    d = _fit(tiny_model, tiny_dir, ioi, "multi_layer_clamp", layers=[1, 2, 3], mode="set", value=1.5,
             features=[FEATS, FEATS[:2], [5]])
    assert d.sites == [1, 2, 3]
    assert type(d).edit is SAEClamp.edit, "the clamp is sae_clamp's, not a copy"
    assert [e["features"] for e in d.defended()] == [FEATS, FEATS[:2], [5]]
    h, mask = _h_and_mask()
    for layer in d.sites:
        sae, feats = d.sae_at(layer)
        sae = sae.sae
        z = sae.encode(h)
        clamped = z.clone()
        clamped[..., feats] = 1.5
        want = sae.decode(clamped) + (h - sae.decode(z))
        got = d.edit(layer, h, mask)
        assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-4), f"layer {layer}: clamped latents take the value"
        assert torch.equal(got[:, 0], h[:, 0])


def test_multi_layer_clamp_fits_k_features_per_layer_and_checks_params(tiny_model, tiny_dir, ioi):
    d = _fit(tiny_model, tiny_dir, ioi, "multi_layer_clamp", layers=[1, 3], k=4, value=-4.0)
    assert d.sites == [1, 3] and all(len(set(e["features"])) == 4 for e in d.defended())
    with pytest.raises(BenchmarkError, match="one feature list per layer"):
        DEFENSES.get("multi_layer_clamp").create(layers=[1, 2], features=[[1]])
    with pytest.raises(BenchmarkError, match="multi_layer_clamp mode 'nope'"):
        DEFENSES.get("multi_layer_clamp").create(mode="nope")
    assert DEFENSES.get("multi_layer_clamp").create().params["layers"] is None  # the model's reference layers
    assert _fit(tiny_model, tiny_dir, ioi, "multi_layer_clamp", k=4, value=-4.0).sites == [2]  # a folder: its middle
    with pytest.raises(BenchmarkError, match="layer 7 is out of range"):
        _fit(tiny_model, tiny_dir, ioi, "multi_layer_clamp", layers=[1, 7], k=4, value=-4.0)


@pytest.mark.parametrize("mode,value", [("zero", 0.0), ("negative", -3.0)])
def test_sae_reconstruct_clamp_output_is_the_reconstruction_without_error_term(tiny_model, tiny_dir, ioi, mode, value):
    d = _fit(tiny_model, tiny_dir, ioi, "sae_reconstruct_clamp", layer=2, features=FEATS, mode=mode, value=value)
    sae = d.sae_at(2)[0].sae
    h, mask = _h_and_mask()
    z = sae.encode(h)
    clamped = z.clone()
    a = z[..., FEATS]
    clamped[..., FEATS] = torch.zeros_like(a) if mode == "zero" else torch.where(a > 0, torch.full_like(a, value), a)
    got = d.edit(2, h, mask)
    assert torch.allclose(got[:, 1:], sae.decode(clamped)[:, 1:], atol=1e-6, rtol=0)
    assert torch.equal(got[:, 0], h[:, 0])
    # the only difference from sae_clamp is the error term it drops
    ref = _fit(tiny_model, tiny_dir, ioi, "sae_clamp", layer=2, features=FEATS, mode=mode, value=value)
    error = h - sae.decode(z)
    assert error[:, 1:].norm() > 1.0
    assert torch.allclose((ref.edit(2, h, mask) - got)[:, 1:], error[:, 1:], atol=1e-4)


@pytest.mark.parametrize("direction", ["decoder_sum", "decoder_span"])
def test_error_projection_clamp_removes_the_behavior_direction_from_the_error_term(tiny_model, tiny_dir, ioi,
                                                                                   direction):
    d = _fit(tiny_model, tiny_dir, ioi, "error_projection_clamp", layer=2, features=FEATS, mode="zero",
             direction=direction)
    sae = d.sae_at(2)[0].sae
    rows = sae.W_dec[FEATS]
    basis = d.error_basis[2]
    if direction == "decoder_sum":
        r = rows.sum(0) / rows.sum(0).norm()
        assert basis.shape == (64, 1) and torch.allclose(basis[:, 0], r, atol=1e-6)
    else:
        assert basis.shape == (64, len(FEATS))
        assert torch.allclose(rows - (rows @ basis) @ basis.T, torch.zeros_like(rows), atol=1e-5)
    h, mask = _h_and_mask()
    z = sae.encode(h)
    clamped = z.clone()
    clamped[..., FEATS] = 0.0
    error = h - sae.decode(z)
    got = d.edit(2, h, mask)
    kept_error = got - sae.decode(clamped)  # the error term the edit lets through
    assert (kept_error[:, 1:] @ basis).abs().max() < 1e-4, "no error component along the behavior direction"
    assert (error[:, 1:] @ basis).abs().max() > 0.1, "the undefended error term had one"
    along = (error @ basis) @ basis.T
    assert torch.allclose(kept_error[:, 1:], (error - along)[:, 1:], atol=1e-4), "the rest of the error is kept"
    assert torch.equal(got[:, 0], h[:, 0])
    with pytest.raises(BenchmarkError, match="direction 'mean'"):
        DEFENSES.get("error_projection_clamp").create(direction="mean")


def _mean_residual(model, batch, layer):
    seen = {}
    with torch.no_grad():
        run_edited(model, batch, {layer: capture(seen, layer)})
    m = batch.token_mask
    return seen[layer][m].mean(0)


def test_directional_ablation_ablates_the_difference_of_means(tiny_model, tiny_dir, ioi):
    d = _fit(tiny_model, tiny_dir, ioi, "directional_ablation", layer=2)
    diff = _mean_residual(tiny_model, ioi.encode(ioi.examples("fit")), 2) - _mean_residual(tiny_model, ioi.control_batch(), 2)
    r = diff / diff.norm()
    assert torch.allclose(d.direction, r, atol=1e-5)
    assert d.sites == [2] and d.sae_at(2) is None and d.saes_used() == []
    assert d.defended() == [{"site": {"layer": 2, "hook": "resid_post"}, "features": []}]
    h, mask = _h_and_mask()
    out = d.edit(2, h, mask)
    assert (out[:, 1:] @ r).abs().max() < 1e-5
    assert (h[:, 1:] @ r).abs().max() > 0.1
    assert torch.equal(out[:, 0], h[:, 0]), "position 0 (the attention sink) is untouched"
    assert torch.allclose(out - h, -(h @ r)[..., None] * r * mask[..., None], atol=1e-5)
    assert d.readouts(2, h).shape == (3, 5, 1) and torch.allclose(d.readouts(2, h)[..., 0], h @ d.direction)
    pre = d.readouts(2, h)
    assert torch.equal(d.readout_activations(2, pre), pre)
    assert torch.equal(d.protected_directions(2), d.direction[None])


def test_directional_ablation_behavior_contrast_uses_the_fit_split_only(tiny_model, tiny_dir, ioi):
    fit = ioi.encode(ioi.examples("fit"))
    b = behavior_scores(tiny_model, ioi, fit, None)
    has = b > 0
    assert has.any() and not has.all(), "the tiny model gives both kinds of fit examples"
    d = _fit(tiny_model, tiny_dir, ioi, "directional_ablation", layer=1, contrast="behavior")
    diff = (_mean_residual(tiny_model, fit.select(has.nonzero()[:, 0]), 1)
            - _mean_residual(tiny_model, fit.select((~has).nonzero()[:, 0]), 1))
    assert torch.allclose(d.direction, diff / diff.norm(), atol=1e-4)
    with pytest.raises(BenchmarkError, match="contrast 'other'"):
        DEFENSES.get("directional_ablation").create(contrast="other")


def test_none_defense_changes_nothing(tiny_model, tiny_dir, ioi):
    d = _fit(tiny_model, tiny_dir, ioi, "none")
    assert d.sites == [] and d.defended() == [] and d.saes_used() == []
    batch = ioi.encode(ioi.examples("test"))
    assert defense_edits(d, batch) == {}
    assert torch.equal(behavior_scores(tiny_model, ioi, batch, d), behavior_scores(tiny_model, ioi, batch, None))
    h, mask = _h_and_mask()
    assert torch.equal(d.edit(0, h, mask), h) and d.readouts(0, h).shape == (3, 5, 0)


ENGINE_PARAMS = {
    "multi_layer_clamp": {"layers": [1, 2], "k": 8, "value": -4.0},
    "sae_reconstruct_clamp": {"layer": 2, "k": 8, "value": -4.0},
    "error_projection_clamp": {"layer": 2, "k": 8, "value": -4.0},
    "error_monitor": {"layer": 2, "k": 8, "value": -4.0},
    "adversarial_projection_clamp": {"layer": 2, "k": 8, "value": -4.0, "rounds": 2, "fit_examples": 8,
                                     "fit_eps": [0.05, 0.5], "fit_steps": 4},
    "directional_ablation": {"layer": 2},
    "trajectory_clamp": {"first_layer": 1, "k": 8, "value": -4.0},
    "concept_scrubbing": {"first_layer": 1},
    "none": {},
}
#: the sites each engine run defends (the tiny model has blocks 0-3; IOI reads the logits after block 3)
ENGINE_SITES = {"multi_layer_clamp": [1, 2], "trajectory_clamp": [1, 2, 3], "concept_scrubbing": [1, 2, 3]}


@pytest.mark.parametrize("name", sorted(ENGINE_PARAMS))
def test_each_builtin_runs_through_the_engine(tiny_model, tiny_dir, tmp_path, name):
    cfg = AttackConfig(mode="encoder", eps=(0.5,), steps=2)
    record, path = evaluate(tiny_model, name, "ioi", cfg, ENGINE_PARAMS[name], tiny_dir / "saes", tmp_path,
                            progress=False)
    validate_record(record)
    assert load_record(path) == record
    assert record["defense"]["name"] == name and record["defense"]["params"].items() >= ENGINE_PARAMS[name].items()
    assert record["provenance"]["fit_seconds"] >= 0
    counts, metrics = record["counts"], record["metrics"]
    if name == "none":
        assert counts["valid_flips"] == 0 and metrics["suppression_rate"] == 0.0
        assert metrics["recovery_rate"] is None and metrics["side_effect"] == 0.0 and record["saes"] == []
        assert all(r["b_base"] == r["b_defended"] for r in record["examples"])
        return
    assert counts["valid_flips"] > 0, "the tiny setup gives every real defense something to suppress"
    assert metrics["c1_max_preact_change"] < 1e-4
    sites = ENGINE_SITES.get(name, [2])
    assert [d["site"]["layer"] for d in record["defense"]["defended"]] == sites
    if name in ("directional_ablation", "concept_scrubbing"):
        assert record["saes"] == [] and metrics["latent_replay_recovery"] is None
    else:
        assert [s["site"]["layer"] for s in record["saes"]] == sites


@pytest.mark.parametrize("name", BUILT_INS)
def test_each_builtin_edit_is_causal(tiny_model, tiny_dir, ioi, name):
    """The edit of a prefix is the prefix of the edit (generation with a key/value cache relies on it)."""
    d = _fit(tiny_model, tiny_dir, ioi, name, **ENGINE_PARAMS.get(name, {"layer": 2, "k": 8}))
    h, mask = _h_and_mask()
    edited = []
    for L in d.sites:
        full = d.edit(L, h, mask)
        assert torch.allclose(d.edit(L, h[:, :3], mask[:, :3]), full[:, :3], atol=1e-5)
        edited.append(not torch.allclose(full, h))
    if name != "none":
        assert any(edited), "the check must see an edit"


def test_trajectory_clamp_clamps_every_layer_from_the_first_site_to_the_readout(tiny_model, tiny_dir, ioi):
    from types import SimpleNamespace

    from defenses.base import trajectory

    d = _fit(tiny_model, tiny_dir, ioi, "trajectory_clamp", first_layer=1, k=3)
    assert d.sites == [1, 2, 3], "IOI reads the logits: every block from the first site to the last"
    assert type(d).edit is SAEClamp.edit and all(len(e["features"]) == 3 for e in d.defended())
    residual_suite = SimpleNamespace(task=SimpleNamespace(read_layer=2, name="tpp"), model=tiny_model,
                                     default_layer=lambda: 1)
    assert trajectory(residual_suite, None) == [1, 2], "a residual-reading suite's trajectory ends where it reads"
    with pytest.raises(BenchmarkError, match="first_layer 3 lies above the layer suite 'tpp' reads \\(2\\)"):
        trajectory(residual_suite, 3)
    with pytest.raises(BenchmarkError, match="out of range"):
        trajectory(residual_suite, 7)


def _residuals_and_concept(model, ioi, d, layer):
    """Residuals [n, d] at ``layer`` over editable positions of the fit split and the control set, with ``d``'s
    erasers below ``layer`` applied, and the concept z [n] (1 on fit examples, 0 on control text)."""
    xs, zs = [], []
    for batch, z in ((ioi.encode(ioi.examples("fit")), 1.0), (ioi.control_batch(), 0.0)):
        edits = {L: (lambda h, L=L: d.edit(L, h, batch.token_mask)) for L in d.sites if L < layer}
        with torch.no_grad():
            h = run_edited(model, batch, edits, read_layer=layer)
        xs.append(h[batch.token_mask.bool()])
        zs.append(torch.full((len(xs[-1]),), z))
    return torch.cat(xs).double(), torch.cat(zs).double()


def test_concept_scrubbing_leaves_no_linear_trace_of_the_concept_at_any_layer(tiny_model, tiny_dir, ioi):
    """LEACE's guarantee, checked independently: after each layer's eraser (fitted on residuals the erasers below
    it edited), the residual's cross-covariance with the concept is zero; before it, it is not."""
    d = _fit(tiny_model, tiny_dir, ioi, "concept_scrubbing", first_layer=1)
    assert d.sites == [1, 2, 3] and d.sae_at(1) is None and d.saes_used() == []
    assert d.protected_directions(1).shape[0] == 1, "the first site erases a concept direction"
    readable = {}  # layer: the concept's whitened cross-covariance with the residual before that layer's eraser
    for layer in d.sites:
        x, z = _residuals_and_concept(tiny_model, ioi, d, layer)
        erased = d.edit(layer, x.float()[None], torch.ones(1, len(x), dtype=torch.bool))[0].double()

        def cross_cov(v):
            return ((v - v.mean(0)) * (z - z.mean())[:, None]).mean(0)

        eigval, eigvec = torch.linalg.eigh(torch.cov(x.T))
        readable[layer] = float((eigvec @ torch.diag(eigval.clamp_min(1e-9).rsqrt()) @ eigvec.T @ cross_cov(x)).norm())
        if d.protected_directions(layer).shape[0]:
            assert cross_cov(erased).norm() < 1e-4 * cross_cov(x).norm(), f"layer {layer}: the concept is still there"
        else:  # the erasers below left too little to erase (under LEACE's tolerance): this one is the identity
            assert readable[layer] < 0.2 * readable[1] and torch.equal(erased, x), readable
    h, mask = _h_and_mask()
    assert torch.equal(d.edit(2, h, mask)[:, 0], h[:, 0]), "position 0 (the attention sink) is untouched"
    r = d.protected_directions(2)
    assert r.shape[-1] == 64 and r.shape[0] <= 2 and d.readouts(2, h).shape == (3, 5, r.shape[0])
    delta = torch.randn_like(h)
    delta -= (delta @ torch.linalg.pinv(r)) @ r  # C1: orthogonal to the protected directions
    assert torch.allclose(d.readouts(2, h + delta), d.readouts(2, h), atol=1e-4)


def test_concept_scrubbing_checks_its_parameters(tiny_model, tiny_dir, ioi):
    create = DEFENSES.get("concept_scrubbing").create
    with pytest.raises(BenchmarkError, match="concept 'other' is not one of control, behavior"):
        create(concept="other")
    with pytest.raises(BenchmarkError, match="first_layer or layers, not both"):
        create(first_layer=1, layers=[2])
    d = _fit(tiny_model, tiny_dir, ioi, "concept_scrubbing", layers=[2], concept="behavior")
    assert d.sites == [2], "layers=[L] is single-site LEACE"


def test_low_rank_keeps_the_erasers_change_and_drops_its_null_rows():
    from concept_erasure import LeaceEraser

    from defenses.concept_scrubbing import low_rank

    torch.manual_seed(0)
    left, right = torch.randn(16, 2), torch.randn(2, 16)
    padded = LeaceEraser(torch.cat([left, torch.zeros(16, 14)], 1), torch.cat([right, torch.zeros(14, 16)]), None)
    small = low_rank(padded)
    assert small.proj_left.shape == (16, 2) and small.proj_right.shape == (2, 16)
    assert torch.allclose(small.proj_left @ small.proj_right, left @ right, atol=1e-4)
