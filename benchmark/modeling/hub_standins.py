"""Faithful offline stand-ins of the registered hub models and their SAE releases, for tests.

Nothing here is downloaded. For a hub model of :data:`~benchmark.modeling.models.MODELS`, :func:`populate` writes
two repositories into a Hugging Face cache folder, in the layout huggingface_hub reads
(``models--<org>--<name>/snapshots/<commit>/...`` and ``refs/main``):

- the model's repository (its hub id): a random model of the same architecture and layer count, built from its
  transformers config class with tiny widths (except where the SAE format fixes the width), and a tokenizer of the
  model's own class (its pre-tokenizer, normalizer and special tokens) whose BPE vocabulary is trained here on the
  suites' texts, with the model's real chat template where the model has one;
- the SAE release's repository (as sae_lens's catalogue names it): a random SAE at each requested layer, in that
  release's own file format (``cfg.json`` + ``sae_weights.safetensors`` for sae_lens-format releases, Gemma Scope's
  ``params.npz``, Llama Scope's ``hyperparams.json`` + ``checkpoints/final.safetensors``, Gemma Scope 2's
  ``config.json`` + ``params.safetensors``), at the folder the catalogue gives for its id.

With ``HF_HUB_OFFLINE=1`` and ``huggingface_hub.constants.HF_HUB_CACHE`` pointing at that folder,
``load_model(name)`` and ``load_sae`` read them through transformers' ``from_pretrained(hf_id)`` and sae_lens'
``SAE.from_pretrained(release, sae_id)``, the code paths the real ones take. One step of sae_lens cannot be served
from a cache: its Gemma Scope 2 loader reads the weight file's header over HTTP
(``get_safetensors_tensor_shapes``); :func:`cached_safetensors_shapes` reads the same header from the cached file,
for a test to patch in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from benchmark.modeling.models import MODELS, ModelSpec

TASKS_ROOT = Path(__file__).resolve().parents[2] / "tasks"
D_MODEL, D_SAE = 64, 256  # widths where the SAE format leaves them free
COMMIT = "0" * 40  # the snapshot every stand-in repository is stored under (refs/main points at it)

GEMMA2_CHAT = (  # google/gemma-2-2b-it's chat template
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_CHAT = (  # the Gemma 3 instruct models' chat template (a system turn is folded into the first user turn)
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
LLAMA3_SPLIT = (  # Llama 3's pre-tokenizer pattern
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TokenizerKind:
    """A model family's tokenizer: its transformers class (by name), its special tokens (bos, eos, unk/pad and the
    chat template's markers, in vocabulary order), whether it is byte-level BPE (else Gemma's ▁-BPE with byte
    fallback) and whether it puts the BOS before a text (Gemma's and Llama 3's do, GPT-2's and Pythia's do not)."""

    cls: str
    bos: str
    eos: str
    specials: tuple[str, ...]
    byte_level: bool = True
    adds_bos: bool = False


TOKENIZERS = {
    "gpt2": TokenizerKind("GPT2Tokenizer", "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>",)),
    "gpt_neox": TokenizerKind("GPTNeoXTokenizer", "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>", "<|padding|>")),
    "llama3": TokenizerKind("PreTrainedTokenizerFast", "<|begin_of_text|>", "<|end_of_text|>",
                            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"), adds_bos=True),
    "gemma": TokenizerKind("GemmaTokenizer", "<bos>", "<eos>",
                           ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                            "<start_of_image>", "<end_of_image>", "<image_soft_token>"), byte_level=False,
                           adds_bos=True),
}


@dataclass(frozen=True)
class Shape:
    """What a stand-in keeps of the real model: architecture (from its spec), layer count, tokenizer family, chat
    template (models with ``spec.chat``), and the widths an SAE format fixes (Gemma Scope's loader sets d_in = 2304
    and the width from the folder name, whatever the file holds)."""

    n_layers: int
    tokenizer: str
    chat_template: str | None = None
    d_model: int = D_MODEL
    d_sae: int = D_SAE


GEMMA3_LAYERS = {"270m": 18, "1b": 26, "4b": 34, "12b": 48, "27b": 62}
SHAPES: dict[str, Shape] = {
    "gpt2": Shape(12, "gpt2"),
    "google/gemma-2-2b": Shape(26, "gemma", None, 2304, 16384),
    "google/gemma-2-2b-it": Shape(26, "gemma", GEMMA2_CHAT, 2304, 16384),
    "meta-llama/Llama-3.1-8B": Shape(32, "llama3"),
    "EleutherAI/pythia-70m-deduped": Shape(6, "gpt_neox"),
    **{name: Shape(GEMMA3_LAYERS[re.search(r"gemma-3-(\d+[mb])", name).group(1)], "gemma",
                   GEMMA3_CHAT if spec.chat else None)
       for name, spec in MODELS.items() if spec.architecture in ("gemma3_text", "gemma3") and spec.hf_id},
}


def hub_models() -> list[str]:
    """The registered models that come from the hub (each has a stand-in)."""
    return [name for name, spec in MODELS.items() if spec.hf_id is not None]


def _config(architecture: str, vocab: int, n_layers: int, d_model: int, kind: TokenizerKind, ids: dict[str, int]):
    """A transformers config of ``architecture`` with the stand-in's sizes (one table for every architecture)."""
    import transformers as tf

    special = dict(bos_token_id=ids[kind.bos], eos_token_id=ids[kind.eos])
    gemma_text = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=ids.get("<pad>"),
                      **special)
    table = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_positions=512, n_embd=d_model, n_layer=n_layers, n_head=4,
                                      **special),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                                             num_attention_heads=4, intermediate_size=4 * d_model, rotary_pct=0.25,
                                             max_position_embeddings=512, tie_word_embeddings=False, **special),
        "llama": lambda: tf.LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                        rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=False,
                                        **special),
        "gemma2": lambda: tf.Gemma2Config(**gemma_text),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**gemma_text, query_pre_attn_scalar=16),
        # text and vision (4B and up); the vision tower as small as SigLIP allows
        "gemma3": lambda: tf.Gemma3Config(
            text_config=dict(gemma_text, query_pre_attn_scalar=16), mm_tokens_per_image=4,
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"], **special),
    }
    return table[architecture]()


def _strings(value) -> list[str]:
    """Every string inside a parsed JSON value."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


@lru_cache(maxsize=None)
def _corpus() -> tuple[str, ...]:
    """The texts the stand-in tokenizers are trained on: every string of the IOI, WMDP-Bio and refusal data."""
    files = [TASKS_ROOT / "ioi/data/ioi.json", TASKS_ROOT / "wmdp_bio/data/wmdp_bio.json",
             TASKS_ROOT / "refusal/data/requests.json"]
    return tuple(s for f in files for s in _strings(json.loads(f.read_text())))


@lru_cache(maxsize=None)
def _bpe(byte_level: bool, specials: tuple[str, ...], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary and merges trained on :func:`_corpus`, words split as the family splits them (byte-level: GPT-2's
    way; else Gemma's ▁-words, with the 256 byte-fallback tokens), specials first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        alphabet = []
    fallback = [] if byte_level else [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials) + fallback,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_tokenizer(kind: TokenizerKind, chat_template: str | None, vocab_size: int = 50_000):
    """A tokenizer of ``kind``'s class over a BPE vocabulary trained on the suites' texts (the default size is above
    their word count, about 13k: every word of their data is then one token; a smaller one splits rare words)."""
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = _bpe(kind.byte_level, kind.specials, vocab_size)
    named = dict(bos_token=kind.bos, eos_token=kind.eos)
    if kind.cls == "PreTrainedTokenizerFast":  # Llama 3: a pipeline of its own in tokenizer.json, no class of its own
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.TemplateProcessing(
            single=f"{kind.bos} $A", pair=f"{kind.bos} $A {kind.bos} $B", special_tokens=[(kind.bos, vocab[kind.bos])])
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    else:
        tok = getattr(tf, kind.cls)(vocab=vocab, merges=merges, add_bos_token=kind.adds_bos, **named)
    tok.add_special_tokens({"additional_special_tokens": [s for s in kind.specials if s not in (kind.bos, kind.eos)]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of repository ``repo_id`` in the Hugging Face cache ``cache`` (made, with ``refs/main``
    pointing at it)."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build_model_repo(cache: Path, spec: ModelSpec, shape: Shape, seed: int = 0) -> Path:
    """The stand-in of ``spec``'s model repository in ``cache``: random weights of its architecture and layer count
    (``config.json`` + ``model.safetensors``) and its tokenizer; returns the snapshot folder."""
    from transformers import AutoModelForCausalLM

    kind = TOKENIZERS[shape.tokenizer]
    tok = build_tokenizer(kind, shape.chat_template)
    ids = {s: tok.convert_tokens_to_ids(s) for s in kind.specials}
    config = _config(spec.architecture, len(tok), shape.n_layers, shape.d_model, kind, ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder = snapshot(cache, spec.hf_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _random_sae(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """Random SAE weights in sae_lens's names and shapes: unit-norm decoder rows, encoder = decoder transposed."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in),
            "threshold": torch.full((d_sae,), 0.05)}


def _save_sae_lens(folder: Path, w: dict, hook_name: str, model_name: str) -> None:
    """sae_lens's own format, as the jbloom (GPT-2) and ctigges (Pythia) releases store it: a pre-6.0 ``cfg.json``
    (the keys sae_lens reads; the real files add training settings), ``sae_weights.safetensors`` (a standard ReLU SAE)
    and ``sparsity.safetensors``."""
    from safetensors.torch import save_file

    d_sae, d_in = w["W_dec"].shape
    cfg = {"model_name": model_name, "hook_point": hook_name, "hook_point_layer": int(re.findall(r"\d+", hook_name)[0]),
           "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": "torch.float32", "device": "cpu",
           "context_size": 128, "dataset_path": "Skylion007/openwebtext", "prepend_bos": True}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: w[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}, str(folder / "sae_weights.safetensors"))
    save_file({"sparsity": torch.full((d_sae,), -3.0)}, str(folder / "sparsity.safetensors"))


def _save_gemma_scope(folder: Path, w: dict, hook_name: str, model_name: str) -> None:
    """Gemma Scope's ``params.npz`` (JumpReLU; its loader takes d_in and the width from the names, not the file)."""
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})


def _save_llama_scope(folder: Path, w: dict, hook_name: str, model_name: str) -> None:
    """Llama Scope's ``hyperparams.json`` and ``checkpoints/final.safetensors`` (a JumpReLU with one threshold for
    every latent, encoder and decoder as torch Linear weights, stored in bfloat16)."""
    from safetensors.torch import save_file

    d_sae, d_in = w["W_dec"].shape
    hyper = {"d_model": d_in, "d_sae": d_sae, "hook_point_in": hook_name, "hook_point_out": hook_name,
             "jump_relu_threshold": 0.05, "act_fn": "jumprelu", "norm_activation": "dataset-wise",
             "dataset_average_activation_norm": {"in": d_in**0.5, "out": d_in**0.5}}
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    (folder / "checkpoints").mkdir(exist_ok=True)
    linear = {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T,
              "decoder.bias": w["b_dec"]}
    save_file({k: v.contiguous().to(torch.bfloat16) for k, v in linear.items()},
              str(folder / "checkpoints" / "final.safetensors"))


def _save_gemma_scope_2(folder: Path, w: dict, hook_name: str, model_name: str) -> None:
    """Gemma Scope 2's ``config.json`` and ``params.safetensors`` (JumpReLU, lower-case ``w_enc``/``w_dec``)."""
    from safetensors.torch import save_file

    layer = int(re.findall(r"\d+", hook_name)[0])
    cfg = {"architecture": "jump_relu", "model_name": model_name, "hf_hook_point_in": f"model.layers.{layer}.output"}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k.replace("W_", "w_"): v for k, v in w.items()}, str(folder / "params.safetensors"))


#: sae_lens's loader of a release (its catalogue's ``conversion_func``) -> the writer of that format
SAE_FORMATS = {"sae_lens": _save_sae_lens, "gemma_2": _save_gemma_scope, "llama_scope": _save_llama_scope,
               "gemma_3": _save_gemma_scope_2}


def build_sae_repo(cache: Path, spec: ModelSpec, shape: Shape, layers: tuple[int, ...]) -> None:
    """Stand-in SAEs of ``spec``'s release in ``cache``, reading the output of each block of ``layers``, each in
    the folder and format the release's catalogue entry names."""
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    from benchmark.modeling.saes import hub_sae_id

    source = spec.sae_source
    save = SAE_FORMATS[get_conversion_loader_name(source.release)]
    for layer in layers:
        sae_id = hub_sae_id(source, layer)
        repo_id, folder_name = get_repo_id_and_folder_name(source.release, sae_id)
        folder = snapshot(cache, repo_id) / folder_name
        if folder.is_dir():  # written for another model of the release (Gemma Scope reads Gemma-2-2B and -2B-it)
            continue
        folder.mkdir(parents=True)
        hook = layer + 1 if source.hook == "resid_pre" else layer
        save(folder, _random_sae(shape.d_model, shape.d_sae, seed=layer), f"blocks.{hook}.hook_{source.hook}",
             spec.hf_id.split("/")[-1])


def populate(cache: Path, name: str, layers: tuple[int, ...] | None = None) -> Path:
    """Stand-ins of hub model ``name`` and its SAEs at ``layers`` (default: its default layer) in the Hugging Face
    cache folder ``cache``; returns ``cache``. A model repository already there is kept, and so is an SAE already
    there (two models may share a release)."""
    spec, shape = MODELS[name], SHAPES[name]
    if not (Path(cache) / ("models--" + spec.hf_id.replace("/", "--"))).is_dir():
        build_model_repo(Path(cache), spec, shape)
    build_sae_repo(Path(cache), spec, shape, layers or (spec.sae_source.default_layer,))
    return Path(cache)


def cached_safetensors_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """What sae_lens's ``get_safetensors_tensor_shapes`` returns (each tensor's shape, by name), read from the file in
    the Hugging Face cache instead of over HTTP."""
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    with safe_open(hf_hub_download(repo_id, filename), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
