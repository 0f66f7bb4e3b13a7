"""The TPP suite and its reference defense tpp_ablation, on the tiny stand-in model with the suite's real texts."""

import json

import pytest
import torch

from benchmark.attacks import AttackConfig

from benchmark.modeling.forward import defense_edits, run_edited
from benchmark.running.engine import behavior_scores, evaluate
from benchmark.errors import BenchmarkError
from defenses import DEFENSES, FitContext
from defenses.probe_ablation import tpp_effects
from tasks import TASKS
from tasks.tpp import build_data
from tasks.tpp.suite import DATA, balanced_accuracy, fit_probe, mean_pool


@pytest.fixture(scope="session")
def tpp_dir(tmp_path_factory):
    from benchmark.modeling.tiny import build_tiny

    data = json.loads(DATA.read_text())
    texts = [ex["text"] for split in data["splits"].values() for ex in split] + [c["text"] for c in data["control"]]
    return build_tiny(tmp_path_factory.mktemp("tpp_tiny"), extra_texts=tuple(texts))


@pytest.fixture(scope="session")
def tpp_model(tpp_dir):
    from benchmark.modeling.models import load_model

    return load_model(str(tpp_dir / "model"))


@pytest.fixture(scope="session")
def tpp(tpp_model):
    suite = TASKS.get("tpp")(tpp_model.tokenizer)
    suite.prepare(tpp_model)
    return suite


@pytest.fixture(scope="session")
def ablation(tpp_model, tpp_dir, tpp):
    d = DEFENSES.get("tpp_ablation").create(n=8)
    d.fit(FitContext(tpp_model, tpp, tpp_dir / "saes"))
    return d


def _residual(model, batch, layer):
    return run_edited(model, batch, {}, read_layer=layer)


def test_committed_data_is_rebuilt_exactly_and_splits_are_disjoint(tpp):
    data = json.loads(DATA.read_text())
    assert build_data.build() == data, "tpp.json must be what build_data.py makes (fixed seed)"
    seen = [{ex["text"] for ex in tpp.class_examples(s)} for s in ("fit", "dev", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(tpp.classes) == 5 and tpp.target in tpp.classes
    for split in ("fit", "dev", "test"):
        assert {ex["label"] for ex in tpp.examples(split)} == {tpp.target}
        assert {ex["label"] for ex in tpp.class_examples(split)} == set(tpp.classes)
    assert len(tpp.examples("test")) >= 200
    assert len(set(tpp.split_hashes().values())) == 3


def test_relabel_check_rejects_a_wrong_mapping(monkeypatch):
    from benchmark.modeling.data_sources import sae_probes_frame

    frame = sae_probes_frame(build_data.SOURCE)
    build_data.check_relabel(frame)
    swapped = dict(build_data.RELABEL, **{"cardiovascular diseases": "digestive system diseases",
                                          "neoplasms": "neoplasms"})
    monkeypatch.setattr(build_data, "RELABEL", swapped)
    with pytest.raises(BenchmarkError, match="RELABEL no longer matches"):
        build_data.check_relabel(frame)


def test_hub_loader_fails_clearly_offline():
    with pytest.raises(BenchmarkError, match="unknown hub set"):
        build_data.hub_frame("someone/else")
    with pytest.raises(BenchmarkError, match="needs network access"):
        build_data.hub_frame("canrager/amazon_reviews_mcauley_1and5")


def test_fit_probe_is_balanced_and_finds_the_direction():
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
    y = torch.arange(400) < 80  # 1 : 4, as one class against the rest
    x = torch.randn(400, 16) + 3.0 * direction * torch.where(y, 1.0, -1.0)[:, None] + 5.0
    w, b = fit_probe(x, y)
    logits = x @ w + b
    assert balanced_accuracy(logits, y) > 0.99
    assert torch.nn.functional.cosine_similarity(w, direction, dim=0) > 0.95
    assert torch.equal(fit_probe(x, y)[0], w), "deterministic"
    with pytest.raises(BenchmarkError, match="both the class and the rest"):
        fit_probe(x, torch.ones(400, dtype=torch.bool))


def test_probes_separate_the_classes(tpp, tpp_model):
    """The tiny model's pooled residual is a random 64-d bag of words: every probe beats chance on the fit split,
    and the target probe also on the held-out dev split."""
    assert tpp.read_layer == tpp_model.n_layers // 2
    batch, is_target = tpp.class_contrast()
    logits = tpp.probes.logits(tpp.pooled(lambda p: _residual(tpp_model, p, tpp.read_layer), batch))
    labels = batch.targets["label"]
    for c in range(len(tpp.classes)):
        assert balanced_accuracy(logits[:, c], labels == c) > 0.6, tpp.classes[c]
    assert torch.equal(is_target, labels == tpp.classes.index(tpp.target))
    dev = tpp.encode(tpp.class_examples("dev"))
    t = tpp.classes.index(tpp.target)
    dev_logits = tpp.probes.logits(tpp.pooled(lambda p: _residual(tpp_model, p, tpp.read_layer), dev))[:, t]
    assert balanced_accuracy(dev_logits, dev.targets["label"] == t) > 0.6


def test_behavior_is_the_target_probe_margin_over_real_tokens(tpp, tpp_model):
    batch = tpp.encode(tpp.examples("dev")[:6])
    h = _residual(tpp_model, batch, tpp.read_layer)
    b = tpp.behavior(h, batch)
    t = tpp.classes.index(tpp.target)
    want = torch.stack([h[i, batch.token_mask[i]].mean(0) for i in range(len(batch))]) @ tpp.probe_direction()
    assert torch.allclose(b, want + tpp.probes.bias[t], atol=1e-4)
    moved = h.clone()
    moved[~batch.token_mask] += 1e3  # padding and the attention sink are not pooled
    assert torch.allclose(tpp.behavior(moved, batch), b)
    with pytest.raises(BenchmarkError, match="reads the residual"):
        tpp.behavior(torch.zeros(6, 1, 17), batch)
    rows = {i: r for r, i in enumerate(batch.ids)}

    def stored(part):  # the residual h of each row of ``part``, cut to the part's columns
        return h[[rows[i] for i in part.ids]][:, -part.input_ids.shape[1]:]

    assert torch.equal(mean_pool(h, batch.token_mask), tpp.pooled(stored, batch))


def test_tpp_effects_match_a_hand_computation():
    pos = torch.tensor([1.0, 0.5, 2.0, 0.0])
    neg = torch.tensor([0.5, 1.0, 1.0, 0.0])
    w_probe = torch.tensor([1.0, -1.0])
    w_dec = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    # diffs 0.5, -0.5 -> 0, 1.0, 0; dots 2, 1, 3, 0
    assert torch.equal(tpp_effects(pos, neg, w_probe, w_dec), torch.tensor([1.0, 0.0, 3.0, 0.0]))


def test_ablation_chooses_the_top_effects_over_the_fit_split(ablation, tpp, tpp_model):
    (layer,) = ablation.sites
    assert layer == tpp.read_layer
    sae, feats = ablation.sae_at(layer)
    batch, is_pos = tpp.class_contrast()
    z = sae.sae.encode(_residual(tpp_model, batch, layer))
    pooled = torch.stack([z[i, batch.token_mask[i]].mean(0) for i in range(len(batch))])
    diff = (pooled[is_pos].mean(0) - pooled[~is_pos].mean(0)).clamp(min=0)
    effects = diff * (sae.sae.W_dec @ tpp.probe_direction())
    assert feats.tolist() == sorted(effects.topk(8).indices.tolist())
    assert ablation.params == {"n": 8, "features": None}


def test_zero_ablation_keeps_the_error_term(ablation, tpp):
    sae, feats = ablation.sae_at(tpp.read_layer)
    torch.manual_seed(0)
    h = torch.randn(2, 5, sae.sae.cfg.d_in) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 0] = False
    z = sae.sae.encode(h)
    ablated = z.clone()
    ablated[..., feats] = 0.0
    want = sae.sae.decode(ablated) + (h - sae.sae.decode(z))
    got = ablation.edit(tpp.read_layer, h, mask)
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-4)
    assert torch.equal(got[:, 0], h[:, 0])
    assert not torch.allclose(got, h), "the chosen latents are active somewhere"


def test_ablation_lowers_the_margin_and_sae_clamp_runs_unchanged(ablation, tpp, tpp_model, tpp_dir):
    batch = tpp.encode(tpp.examples("dev"))
    base = behavior_scores(tpp_model, tpp, batch, None)
    assert behavior_scores(tpp_model, tpp, batch, ablation).mean() < base.mean()
    clamp = DEFENSES.get("sae_clamp").create(k=4)
    clamp.fit(FitContext(tpp_model, tpp, tpp_dir / "saes"))
    assert clamp.sites == [tpp.read_layer] and len(clamp.defended()[0]["features"]) == 4
    assert not torch.allclose(behavior_scores(tpp_model, tpp, batch, clamp), base)


def test_shared_residuals_serve_a_defense_without_sites_at_the_read_layer(tpp, tpp_model):
    from benchmark.running.engine import shared_prefix

    none = DEFENSES.get("none").create()
    store = shared_prefix(tpp_model, tpp, none)
    assert store is not None and store.layer == tpp.read_layer
    batch = tpp.encode(tpp.examples("dev")[:6])
    full = behavior_scores(tpp_model, tpp, batch, None)
    assert torch.allclose(behavior_scores(tpp_model, tpp, batch, none, residuals=store), full, atol=1e-4)
    assert len(store) == 6


def test_sites_above_the_read_layer_are_refused(tpp_model, tpp_dir, tpp, tmp_path):
    above = tpp.read_layer + 1
    with pytest.raises(BenchmarkError, match=f"layer {above} lies above the residual suite 'tpp' reads"):
        DEFENSES.get("multi_layer_clamp").create(layers=[1, above], k=4).fit(
            FitContext(tpp_model, tpp, tpp_dir / "saes"))
    with pytest.raises(BenchmarkError, match=f"layer {above} lies above"):  # no attribution: the engine checks
        evaluate(tpp_model, "directional_ablation", "tpp", AttackConfig(eps=(0.5,), steps=1), {"layer": above},
                 tpp_dir / "saes", tmp_path, progress=False)


def test_ablation_needs_a_suite_with_probes(tpp_model, tpp_dir):
    ioi = TASKS.get("ioi")(tpp_model.tokenizer)
    with pytest.raises(BenchmarkError, match="tpp_ablation needs a suite with class probes"):
        DEFENSES.get("tpp_ablation").create().fit(FitContext(tpp_model, ioi, tpp_dir / "saes"))
    unprepared = TASKS.get("tpp")(tpp_model.tokenizer)
    with pytest.raises(BenchmarkError, match="tpp_ablation needs a suite with class probes"):
        DEFENSES.get("tpp_ablation").create().fit(FitContext(tpp_model, unprepared, tpp_dir / "saes"))


def test_task_metrics_are_tpp_accuracy_drops(ablation, tpp, tpp_model):
    def forward(defense):
        return lambda part: run_edited(tpp_model, part, defense_edits(defense, part), read_layer=tpp.read_layer)

    m = tpp.task_metrics(forward(None), forward(ablation))
    assert m["tpp"] == pytest.approx(m["tpp_intended_drop"] - m["tpp_unintended_drop"])
    assert 0.5 < m["probe_accuracy_base"] <= 1.0
    same = tpp.task_metrics(forward(None), forward(None))
    assert same["tpp"] == 0.0 and same["tpp_intended_drop"] == 0.0


def test_evaluate_writes_a_valid_record_with_task_metrics(tpp_model, tpp_dir, tmp_path):
    cfg = AttackConfig(mode="encoder", eps=(0.05, 0.5), steps=5)
    record, path = evaluate(tpp_model, "tpp_ablation", "tpp", cfg, {"n": 8}, tpp_dir / "saes", tmp_path,
                            progress=False)
    assert path.exists() and record["task"]["name"] == "tpp"
    assert record["counts"]["examples"] == len(TASKS.get("tpp")(tpp_model.tokenizer).examples("test"))
    assert record["counts"]["valid_flips"] == sum(r["valid_flip"] for r in record["examples"]) > 0
    assert record["counts"]["recovered"] > 0, "the attacker ran on the flips"
    tm = record["task_metrics"]
    assert set(tm) == {"tpp", "tpp_intended_drop", "tpp_unintended_drop", "probe_accuracy_base"}
    assert tm["tpp"] == pytest.approx(tm["tpp_intended_drop"] - tm["tpp_unintended_drop"])
    assert tm["tpp_intended_drop"] > 0
    assert record["defense"]["defended"][0]["site"]["layer"] == tpp_model.n_layers // 2
