"""Tiny offline stand-ins: a random 4-layer Llama (or Gemma 3, the second offline model's architecture), a word-level
tokenizer over the IOI data's words, and random JumpReLU SAEs at every layer. Nothing is downloaded and nothing is
trained.

The tests build them once per session; ``benchmark validate`` builds them in a temporary folder to run a
submitted defense end to end in a few seconds; ``--model tiny`` (:func:`cached_tiny`) builds them once into the
cache, for a first run in seconds (its figures mean nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

IOI_DATA = Path(__file__).resolve().parents[2] / "tasks" / "ioi" / "data" / "ioi.json"
D_MODEL, D_SAE, N_LAYERS = 64, 256, 4


def words_of(text: str) -> list[str]:
    """The tiny tokenizer's pre-tokenization: runs of word characters, and runs of other non-space characters."""
    return re.findall(r"\w+|[^\w\s]+", text)


def _vocab(extra_texts: tuple[str, ...] = ()) -> list[str]:
    data = json.loads(IOI_DATA.read_text())
    words = {w for text in extra_texts for w in words_of(text)}
    for split in data["splits"].values():
        for ex in split:
            words.update(words_of(ex["prompt"]))
    for c in data["control"]:
        words.update(words_of(c["text"]))
    return ["[PAD]", "[UNK]", "[EOS]"] + sorted(words)


#: the stand-ins' architectures (the ``model_type`` of their configs, as the site maps name them)
ARCHITECTURES = ("llama", "gemma3_text")


def _random_model(architecture: str, vocab_size: int):
    """A random causal LM of ``architecture`` with the stand-ins' sizes."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    shared = dict(vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                  eos_token_id=2, bos_token_id=2)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **shared))
    if architecture == "gemma3_text":  # Gemma 3 270M's shape in small: one KV head, a sliding window, local + global
        return Gemma3ForCausalLM(Gemma3TextConfig(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                                  sliding_window=8, layer_types=["sliding_attention"] * (N_LAYERS - 1)
                                                  + ["full_attention"], **shared))
    raise ValueError(f"no tiny stand-in of architecture '{architecture}' (have: {', '.join(ARCHITECTURES)})")


def build_tiny_model(folder: Path, extra_texts: tuple[str, ...] = (), architecture: str = "llama") -> None:
    """The tiny model of ``architecture`` and its word-level tokenizer over the IOI data, plus the words of
    ``extra_texts`` (a suite's own tests pass its texts so its prompts have no unknown words)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab(tuple(extra_texts))
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = _random_model(architecture, len(vocab))
    with torch.no_grad():  # larger embeddings so the random model has non-trivial logit differences
        model.model.embed_tokens.weight.mul_(50)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def build_tiny_saes(folder: Path, d_in: int = D_MODEL, layers=range(N_LAYERS), seed: int = 0) -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    for layer in layers:
        torch.manual_seed(seed + layer)
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=D_SAE))
        with torch.no_grad():
            w = torch.randn(d_in, D_SAE) / d_in**0.5
            sae.W_enc.copy_(w)
            sae.W_dec.copy_(w.T / w.T.norm(dim=-1, keepdim=True))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
            sae.threshold.fill_(0.05)
        sae.save_model(folder / f"layer_{layer}")


def build_tiny(root: Path, extra_texts: tuple[str, ...] = (), architecture: str = "llama") -> Path:
    """``root/model`` (the tiny model of ``architecture`` and its tokenizer) and ``root/saes/layer_<L>/``; returns
    ``root``."""
    root = Path(root)
    build_tiny_model(root / "model", extra_texts, architecture)
    build_tiny_saes(root / "saes")
    return root


def cached_tiny(cache: Path) -> Path:
    """:func:`build_tiny`'s folder under ``cache``, built on first use and kept, keyed by this file and the IOI data
    (what it is made from)."""
    key = hashlib.sha256(Path(__file__).read_bytes() + IOI_DATA.read_bytes()).hexdigest()[:16]
    target = Path(cache) / key
    if not (target / "saes").is_dir():
        tmp = target.with_name(f"{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny(tmp)
        try:
            tmp.rename(target)  # atomic: a crash never leaves a half-built entry
        except OSError:  # another process built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return target
