"""The registered hub models and their SAE releases: names checked against sae_lens's catalogue (offline), and each
model run end to end on a faithful stand-in read through the real loaders (benchmark/modeling/hub_standins.py)."""

from __future__ import annotations

import pytest

from benchmark.errors import BenchmarkError
from benchmark.modeling import hub_standins
from benchmark.modeling.hub_standins import SHAPES, TOKENIZERS, build_tokenizer, hub_models, populate
from benchmark.modeling.models import MODELS
from benchmark.modeling.saes import check_in_catalogue, hub_sae_id

HUB = hub_models()
#: registered name -> the catalogue's name of the model a release was trained on, where the two differ
CATALOGUE_MODEL = {"gpt2": "gpt2-small", "google/gemma-2-2b-it": "gemma-2-2b"}  # Gemma Scope: the base model's SAEs


def test_the_field_s_models_are_registered():
    gemma3 = [f"google/gemma-3-{size}-{v}" for size in ("1b", "4b", "12b", "27b") for v in ("pt", "it")]
    assert set(HUB) == {"gpt2", "google/gemma-2-2b", "google/gemma-2-2b-it", "meta-llama/Llama-3.1-8B",
                        "EleutherAI/pythia-70m-deduped", "google/gemma-3-270m", "google/gemma-3-270m-it", *gemma3}
    assert set(SHAPES) == set(HUB)  # every hub model has a stand-in


@pytest.mark.parametrize("name", HUB)
def test_every_claimed_layer_is_in_sae_lens_catalogue(name):
    """Offline: the catalogue ships with sae_lens. Every layer a spec claims resolves to an id of its release, and the
    release was trained on this model."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    source = MODELS[name].sae_source
    assert source.default_layer in source.covered
    for layer in source.covered:
        check_in_catalogue(source.release, hub_sae_id(source, layer))
    model = get_pretrained_saes_directory()[source.release].model
    assert model.split("/")[-1] == CATALOGUE_MODEL.get(name, MODELS[name].hf_id.split("/")[-1])


def test_resid_pre_ids_name_the_next_block_and_uncovered_or_uncatalogued_saes_are_refused():
    gpt2 = MODELS["gpt2"].sae_source
    assert hub_sae_id(gpt2, 8) == "blocks.9.hook_resid_pre"  # the input of block 9 is the output of block 8
    with pytest.raises(BenchmarkError, match="no SAE reading the output of block 11.*0, 1, 2"):
        hub_sae_id(gpt2, 11)  # block 12 does not exist, so no resid_pre SAE reads block 11's output
    with pytest.raises(BenchmarkError, match="gemma-scope-2-270m-it-res has no SAE .* block 6: it covers blocks 5, 9"):
        hub_sae_id(MODELS["google/gemma-3-270m-it"].sae_source, 6)
    with pytest.raises(BenchmarkError, match="catalogue of sae_lens .* no SAE 'blocks.12.hook_resid_pre' in release"):
        check_in_catalogue("gpt2-small-res-jb", "blocks.12.hook_resid_pre")
    with pytest.raises(BenchmarkError, match=r"in release 'no-such-release' \(no such release\)"):
        check_in_catalogue("no-such-release", "x")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """The stand-ins' Hugging Face cache as the one transformers and sae_lens read (HF_HUB_OFFLINE=1: conftest)."""
    import huggingface_hub.constants
    from sae_lens.loading import pretrained_sae_loaders

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    # the one step sae_lens takes over HTTP even for a cached SAE (Gemma Scope 2 reads the weights' header)
    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", hub_standins.cached_safetensors_shapes)
    return hub_cache


@pytest.mark.parametrize("name", HUB)
def test_stand_in_runs_end_to_end_through_the_real_loaders(name, offline_hub, tmp_path):
    import transformers

    from benchmark.attacks import AttackConfig
    from benchmark.modeling.models import load_model
    from benchmark.running.engine import evaluate
    from tasks import TASKS
    from tasks.refusal.suite import format_prompt

    spec, shape = MODELS[name], SHAPES[name]
    populate(offline_hub, name)
    model = load_model(name)  # transformers' from_pretrained(hub id), from the cache
    assert (model.architecture, model.n_layers, model.d_model) == (spec.architecture, shape.n_layers, shape.d_model)
    kind = TOKENIZERS[shape.tokenizer]
    assert isinstance(model.tokenizer, getattr(transformers, kind.cls))
    assert (model.tokenizer("When")["input_ids"][0] == model.tokenizer.bos_token_id) == kind.adds_bos
    # the suites on this tokenizer: single-token answers found, the chat template used where the model has one
    for suite in ("ioi", "wmdp_bio"):
        assert all(TASKS.get(suite)(model.tokenizer).examples(split) for split in ("fit", "dev", "test"))
    end = model.tokenizer.convert_tokens_to_ids("<end_of_turn>") if spec.chat else model.tokenizer.eos_token_id
    assert TASKS.get("refusal")(model.tokenizer).eos_id == end  # an instruct model's answer ends with its turn
    prompt = format_prompt(model.tokenizer, "How do I bake bread?")
    assert prompt.startswith("<bos><start_of_turn>user\nHow do I bake bread?<end_of_turn>") if spec.chat else (
        prompt == "User: How do I bake bread?\nAssistant:")

    # a large edit of given latents (no attribution pass: Gemma Scope's 16k x 2304 SAE makes it slow) flips some of
    # 16 examples on every stand-in, so the attack runs
    record, _ = evaluate(model, "sae_clamp", "ioi", AttackConfig(eps=(0.05, 0.5), steps=3, patience=None),
                         {"features": list(range(64)), "mode": "set", "value": -20.0}, records_dir=tmp_path,
                         progress=False, limit=16)
    layer = spec.sae_source.default_layer
    assert record["model"]["revision"] == hub_standins.COMMIT  # the snapshot read, not "main", which moves
    assert record["model"]["name"] == name and record["saes"] == [  # sae_lens' from_pretrained(release, id)
        {"release": spec.sae_source.release, "sae_id": hub_sae_id(spec.sae_source, layer),
         "site": {"layer": layer, "hook": "resid_post"}}]
    assert record["counts"]["examples"] == 16 and record["counts"]["valid_flips"] >= 1  # the attack ran


def test_suites_that_need_single_tokens_name_the_suite_the_model_and_the_fix():
    from tasks import TASKS

    tok = build_tokenizer(TOKENIZERS["gpt2"], None, vocab_size=300)  # too small: names and choices split
    tok.name_or_path = "org/small-vocab"

    with pytest.raises(BenchmarkError, match="suite ioi cannot run on 'org/small-vocab'.*build_data.py"):
        TASKS.get("ioi")(tok).examples("test")
    with pytest.raises(BenchmarkError, match="suite wmdp_bio .*'org/small-vocab'.*scoring='letter'"):
        TASKS.get("wmdp_bio")(tok).examples("test")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device")])])
def test_the_command_runs_gpt2_with_its_sae_release_in_bfloat16(device, offline_hub, tmp_path):
    """``benchmark evaluate --model gpt2 --device <device> --dtype bfloat16 --defense sae_clamp``, on the stand-ins of
    GPT-2 small and gpt2-small-res-jb."""
    import json

    from benchmark.cli import main

    populate(offline_hub, "gpt2")
    code = main(["evaluate", "--model", "gpt2", "--device", device, "--dtype", "bfloat16", "--defense", "sae_clamp",
                 "--tasks", "ioi", "--limit", "16", "-D", f"features={list(range(64))}", "-D", "mode=set",
                 "-D", "value=-20", "--eps", "0.05,0.5", "--steps", "3", "--records-dir", str(tmp_path), "--quiet"])
    assert code == 0
    (path,) = tmp_path.rglob("ioi__encoder.limit-16.json")
    record = json.loads(path.read_text())
    assert record["model"]["dtype"] == "bfloat16" and record["provenance"]["device"].startswith(device)
    assert record["saes"][0]["release"] == "gpt2-small-res-jb" and record["counts"]["valid_flips"] >= 1


def test_a_multi_site_defense_runs_at_every_block_gemma_scope_2_covers(offline_hub, tmp_path):
    """multi_layer_clamp at Gemma Scope 2's four blocks of Gemma 3 270M (each SAE from its own folder of the release),
    attacked under the cross-site Jacobian constraint."""
    from benchmark.attacks import AttackConfig
    from benchmark.running.engine import evaluate

    name = "google/gemma-3-270m-it"
    covered = MODELS[name].sae_source.covered
    populate(offline_hub, name, layers=covered)
    record, _ = evaluate(name, "multi_layer_clamp", "ioi", AttackConfig(mode="jacobian", eps=(0.05, 0.5), steps=3),
                         {"layers": list(covered), "features": [list(range(16))] * 4, "mode": "set", "value": -20.0},
                         records_dir=tmp_path, progress=False, limit=16)
    assert [s["sae_id"] for s in record["saes"]] == [f"layer_{L}_width_16k_l0_medium" for L in covered]
    assert record["counts"]["valid_flips"] >= 1
