"""The wmdp_bio suite (cloze and letter scoring, data, hub loader) and the unlearning_clamp defense, on the tiny
model with a tokenizer that knows the suite's words."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from benchmark.errors import BenchmarkError
from tasks.base import encode_prompts
from tasks.wmdp_bio import build_data
from tasks.wmdp_bio.suite import DATA, LETTERS, WMDPBioSuite, cloze_prompt, letter_prompt, rotated

LAYER = 2


def _suite_texts() -> tuple[str, ...]:
    """Every prompt the suite can make (both scorings), its choices and its contrast texts."""
    data = json.loads(DATA.read_text())
    questions = [ex for split in data["splits"].values() for ex in split]
    questions += data["control"] + data["contrast"]["other_questions"]
    texts = [p(ex) for ex in questions for p in (cloze_prompt, letter_prompt)]
    texts += [" ".join(ex["choices"]) for ex in questions]
    return tuple(texts + data["contrast"]["target_texts"] + data["contrast"]["other_texts"])


@pytest.fixture(scope="session")
def wmdp_dir(tmp_path_factory):
    from benchmark.modeling.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_wmdp"), extra_texts=_suite_texts())


@pytest.fixture(scope="session")
def wmdp_model(wmdp_dir):
    from benchmark.modeling.models import load_model

    return load_model(str(wmdp_dir / "model"))


@pytest.fixture(scope="session")
def suite(wmdp_model):
    return WMDPBioSuite(wmdp_model.tokenizer)


def _read(model, batch, **kw):
    from benchmark.modeling.forward import run_edited

    with torch.no_grad():
        return run_edited(model, batch, {}, **kw)


def test_cloze_behavior_is_continuation_logprob_of_right_minus_best_wrong(wmdp_model, suite):
    examples = suite.examples("test")[:6]
    batch = suite.encode(examples)
    b = suite.behavior(_read(wmdp_model, batch), batch)
    tok = wmdp_model.tokenizer
    for i, ex in enumerate(examples):
        scores = []
        for choice in ex["choices"]:  # the choice's log-probability as a continuation, from a full forward pass
            one = encode_prompts(tok, [ex["id"]], [suite.prompt(ex) + " " + choice], {})
            logits = _read(wmdp_model, one, all_logits=True)[0]
            n = len(tok(" " + choice, add_special_tokens=False)["input_ids"])
            lp = torch.log_softmax(logits[-n - 1 : -1], -1).gather(-1, one.input_ids[0, -n:, None])
            scores.append(float(lp.mean()))
        right = scores[ex["answer"]]
        wrong = max(s for j, s in enumerate(scores) if j != ex["answer"])
        assert float(b[i]) == pytest.approx(right - wrong, abs=1e-4)
    assert (b > 0).any() and (b < 0).any(), "a random model should get some right and some wrong"


def test_single_token_filter_rejects_multi_token_and_duplicate_choices(wmdp_model):
    suite = WMDPBioSuite(wmdp_model.tokenizer)
    ex = copy.deepcopy(suite.examples("dev")[0])
    assert suite.choice_tokens(ex) is not None
    multi = {**ex, "choices": [*ex["choices"][:-1], "two words"]}
    dup = {**ex, "choices": [*ex["choices"][:-1], ex["choices"][0]]}
    assert suite.choice_tokens(multi) is None and suite.choice_tokens(dup) is None
    suite._questions["dev"] = [multi, dup, ex]
    assert [e["id"] for e in suite.examples("dev")] == [ex["id"]]
    suite._questions["dev"] = [multi, dup]
    with pytest.raises(BenchmarkError, match="suite wmdp_bio.*one distinct token.*scoring='letter'"):
        suite.examples("dev")


def test_letter_scoring_reads_letters_and_keeps_questions_right_under_every_order(wmdp_model):
    letter = WMDPBioSuite(wmdp_model.tokenizer, scoring="letter", orders=3)
    ex = letter.examples("dev")[0]
    assert "\nA. " in letter.prompt(ex) and letter.prompt(ex).endswith("Answer:")
    batch = letter.encode([ex, rotated(ex, 1)])
    ids = [wmdp_model.tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in LETTERS[:4]]
    assert batch.targets["choices"].tolist() == [ids, ids]
    read = torch.zeros(2, 1, len(wmdp_model.tokenizer))
    read[0, 0, ids[ex["answer"]]] = 3.0  # row 0 favors the right letter by 3 nats over every wrong one
    read[1, 0, ids[ex["answer"]]] = 2.0  # row 1 (rotated) favors the letter that was right before, now wrong
    assert letter.behavior(read, batch).tolist() == pytest.approx([3.0, -2.0])

    test = letter.examples("test")
    batch = letter.encode(test)
    right = [ex["id"] for ex, b in zip(test, letter.behavior(_read(wmdp_model, batch), batch).tolist()) if b > 0]
    once = WMDPBioSuite(wmdp_model.tokenizer, scoring="letter", orders=1)
    once.prepare(wmdp_model)
    assert [ex["id"] for ex in once.examples("test")] == right and 0 < len(right) < len(test)
    letter.prepare(wmdp_model)  # the random tiny model answers every question with the same letter
    with pytest.raises(BenchmarkError, match="no wmdp_bio test question correctly under 3 choice orders"):
        letter.examples("test")


def test_letter_prepare_keeps_exactly_the_questions_right_under_every_rotation(wmdp_model, monkeypatch):
    import benchmark.modeling.forward

    letter = WMDPBioSuite(wmdp_model.tokenizer, scoring="letter", orders=3)
    knows = {ex["id"] for ex in letter.examples("test")[::3]}

    def oracle(model, batch, edits, **kw):  # right on the questions it knows, else always "C"
        read = torch.zeros(len(batch), 1, len(wmdp_model.tokenizer))
        for i, ex_id in enumerate(batch.ids):
            pick = int(batch.targets["answer"][i]) if ex_id in knows else 2
            read[i, 0, batch.targets["choices"][i, pick]] = 1.0
        return read

    monkeypatch.setattr(benchmark.modeling.forward, "run_edited", oracle)
    letter.prepare(wmdp_model)
    assert {ex["id"] for ex in letter.examples("test")} == knows


def test_splits_are_disjoint_and_the_data_is_well_formed(suite):
    data = json.loads(DATA.read_text())
    groups = {**data["splits"], "control": data["control"], "other": data["contrast"]["other_questions"]}
    seen: dict[str, str] = {}
    for name, examples in groups.items():
        assert examples, name
        for ex in examples:
            first = seen.setdefault(ex["question"], name)
            assert first == name, f"{ex['question']!r} is in {first} and {name}"
            assert len(ex["choices"]) == 4 and len(set(ex["choices"])) == 4 and 0 <= ex["answer"] < 4
    assert data["tokenizer"] == "smollm2-135m-instruct" and data["seed"] == build_data.SEED
    assert len(data["splits"]["test"]) >= 250
    assert set(suite.split_hashes()) == {"fit", "dev", "test"}
    assert len(set(suite.split_hashes().values())) == 3


def test_builder_rules():
    class NoNB:  # every question below is decided by its stem counts
        def p_biology(self, text):
            raise AssertionError("naive Bayes consulted for an unambiguous question")

    assert build_data.subject("Which organelle of the cell makes proteins? ribosomes", NoNB()) == "biology"
    assert build_data.subject("What force opposes motion between surfaces? friction", NoNB()) == "physchem"
    assert build_data.subject("What layer of the earth lies below the crust? mantle", NoNB()) is None
    assert not build_data.compatible("kidneys", "kidney") and not build_data.compatible("kidneys", "heart")
    assert build_data.compatible("kidneys", "lungs")
    item = build_data.SciQItem("Q?", ("lungs",), ("gills",))
    pool = ["hearts", "veins", "lungers", "bone", "cells", "lungs", "roots", "gills"]
    q = build_data.make_question(item, pool, random.Random(0))
    assert q["choices"][q["answer"]] == "lungs" and "gills" in q["choices"], "its own distractor comes first"
    assert len(set(q["choices"])) == 4 and "lungers" not in q["choices"] and "bone" not in q["choices"]
    assert build_data.make_question(item, ["bone", "lungs"], random.Random(0)) is None


def test_frequency_selection_picks_the_feature_that_fires_only_on_target_text(wmdp_model, wmdp_dir, suite):
    from benchmark.modeling.saes import load_sae
    from defenses import DEFENSES, FitContext
    from defenses.unlearning_clamp import firing_frequency, select_by_frequency

    other = [suite.prompt(ex) for ex in suite.control_examples()]
    target = [text + " the cell" for text in other]  # the same texts with a planted word

    class Contrast:
        name = "contrast"

        def contrast_texts(self):
            return target, other

    sae = load_sae(wmdp_model, LAYER, wmdp_dir / "saes")
    planted = 7
    emb = wmdp_model.hf.get_input_embeddings().weight[wmdp_model.tokenizer.convert_tokens_to_ids("cell")]
    with torch.no_grad():  # latent 7 reads the embedding of "cell", which the residual stream carries
        sae.sae.W_enc[:, planted] = emb / emb.norm()
        sae.sae.b_enc[planted] = 0.0
        sae.sae.threshold[planted] = 0.5 * float(emb.norm())
    ctx = FitContext(wmdp_model, Contrast(), saes={LAYER: sae})
    forget, retain = firing_frequency(ctx, LAYER, target), firing_frequency(ctx, LAYER, other)
    assert forget[planted] > 0.02 and retain[planted] < 0.002
    assert (retain > 0.01).float().mean() > 0.5, "the random latents fire on any text"
    assert select_by_frequency(forget, retain, 1, 0.02, 0.01, "forget").tolist() == [planted]
    assert select_by_frequency(forget, retain, 1, 0.005, 1.0, "ratio").tolist() == [planted]

    defense = DEFENSES.get("unlearning_clamp").create(layer=LAYER, k=1, value=-5.0)
    defense.fit(ctx)
    assert defense.defended()[0]["features"] == [planted]


def test_frequency_selection_ranks_by_target_frequency_or_by_ratio():
    from defenses.unlearning_clamp import select_by_frequency

    forget = torch.tensor([0.9, 0.5, 0.3, 0.0, 0.2, 0.004])
    retain = torch.tensor([0.5, 0.0, 0.005, 0.0, 0.01, 0.0])
    # SAEBench: rare on the other texts, then most frequent on the target
    assert select_by_frequency(forget, retain, 2, 0.0, 0.01, "forget").tolist() == [1, 2]
    assert select_by_frequency(forget, retain, 3, 0.0, 0.01, "forget").tolist() == [1, 2, 4]
    # ratio: forget / (retain + 0.001) = 1.8, 500, 50, -, 18.2, 4 (latent 5 is below forget_min 0.005)
    assert select_by_frequency(forget, retain, 3, 0.005, 1.0, "ratio").tolist() == [1, 2, 4]
    assert select_by_frequency(forget, retain, 4, 0.005, 1.0, "ratio").tolist() == [0, 1, 2, 4]
    with pytest.raises(BenchmarkError, match="only 4 latents"):
        select_by_frequency(forget, retain, 5, 0.005, 1.0, "ratio")  # latent 3 never fires on the target


def test_unlearning_clamp_needs_contrast_texts(wmdp_model, wmdp_dir):
    from defenses import DEFENSES, FitContext
    from tasks import TASKS

    ioi = TASKS.get("ioi")(wmdp_model.tokenizer)
    with pytest.raises(BenchmarkError, match="needs a suite with contrast texts.*'ioi'"):
        DEFENSES.get("unlearning_clamp").create(layer=LAYER).fit(FitContext(wmdp_model, ioi, wmdp_dir / "saes"))
    with pytest.raises(BenchmarkError, match="value < 0"):
        DEFENSES.get("unlearning_clamp").create(value=2.0)


def test_generic_sae_clamp_runs_on_the_suite(wmdp_model, wmdp_dir, suite):
    from benchmark.running.engine import behavior_scores
    from defenses import DEFENSES, FitContext

    defense = DEFENSES.get("sae_clamp").create(layer=LAYER, k=8, value=-4.0)
    defense.fit(FitContext(wmdp_model, suite, wmdp_dir / "saes"))
    dev = suite.encode(suite.examples("dev"))
    base, defended = behavior_scores(wmdp_model, suite, dev, None), behavior_scores(wmdp_model, suite, dev, defense)
    assert base.shape == defended.shape == (len(dev),)
    assert (base - defended).abs().max() > 0.1


def test_wmdp_hub_loader(monkeypatch, tmp_path, wmdp_model):
    monkeypatch.setenv("BENCHMARK_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkError, match="cannot load cais/wmdp wmdp-bio from the hub"):
        WMDPBioSuite(wmdp_model.tokenizer, source="wmdp", scoring="letter")

    import datasets

    rows = [{"question": f"Which of these is a cell part {i}?", "choices": ["the cell wall", "a gene", "an atom",
             "the force"], "answer": i % 4} for i in range(20)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    hub = WMDPBioSuite(wmdp_model.tokenizer, source="wmdp", scoring="letter")
    assert sorted(len(hub.examples(s)) for s in ("fit", "dev", "test")) == [4, 4, 12]
    assert any(p.name == "wmdp-bio.json" for p in hub.data_files) and hub.data_hash() != WMDPBioSuite(
        wmdp_model.tokenizer).data_hash()
    assert len(hub.control_examples()) > 0
    with pytest.raises(BenchmarkError, match="suite wmdp_bio .*cannot run on"):
        WMDPBioSuite(wmdp_model.tokenizer, source="wmdp").examples("test")  # phrases: no cloze


def test_end_to_end_evaluate_writes_a_valid_record(wmdp_model, wmdp_dir, tmp_path):
    from benchmark.attacks import AttackConfig
    from benchmark.running.engine import evaluate
    from benchmark.running.records import validate_record

    cfg = AttackConfig(mode="encoder", eps=(0.05, 0.5), steps=4)
    params = {"layer": LAYER, "k": 8, "value": -5.0}
    record, path = evaluate(wmdp_model, "unlearning_clamp", "wmdp_bio", cfg, params, wmdp_dir / "saes", tmp_path,
                            progress=False)
    validate_record(record)
    assert path.exists() and record["task"]["name"] == "wmdp_bio" and WMDPBioSuite.reference_defense == "unlearning_clamp"
    assert record["counts"]["examples"] == len(WMDPBioSuite(wmdp_model.tokenizer).examples("test"))
    assert record["counts"]["valid_flips"] > 0 and record["metrics"]["side_effect"] > 0
    assert record["defense"]["params"]["rank"] == "ratio" and len(record["defense"]["defended"][0]["features"]) == 8
