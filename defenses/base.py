"""The defense adapter interface and its registry.

A defense is fitted on a task suite's ``fit`` split (it chooses features and values), then edits the residual
stream at its sites in every forward pass. The attacker and the scorer see it only through this interface:
its sites, its edit (differentiable), its defended readouts (encoder pre-activations of the defended features)
and the directions the encoder constraint C1 must avoid.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from benchmark.modeling import sae_math
from benchmark.errors import BenchmarkError
from benchmark.files import write_json_atomic
from benchmark.modeling.models import LoadedModel
from benchmark.registry import Registry
from benchmark.modeling.saes import LoadedSAE, load_sae
from tasks.base import PromptBatch, TaskSuite


@dataclass
class FitContext:
    """What a defense may see while fitting: the model, its SAEs, and the suite's ``fit`` split only."""

    model: LoadedModel
    task: TaskSuite
    sae_dir: Path | None = None
    saes: dict[int, LoadedSAE] = field(default_factory=dict)

    def sae(self, layer: int) -> LoadedSAE:
        if layer not in self.saes:
            self.saes[layer] = load_sae(self.model, layer, self.sae_dir)
        return self.saes[layer]

    def fit_batch(self) -> PromptBatch:
        return self.task.encode(self.task.examples("fit"))

    def default_layer(self) -> int:
        """The layer a single-site defense uses when none is given: the model's reference SAE layer, or the
        middle block for a model folder without a registered spec."""
        if self.model.spec is not None:
            return self.model.spec.sae_source.default_layer
        return self.model.n_layers // 2

    def reference_layers(self) -> list[int]:
        """The layers a multi-site defense uses when none are given: those of the model's reference SAEs (8, 12, 16 on
        the default model; 6, 9, 12 on Gemma 3 270M), or the default layer alone."""
        spec = self.model.spec
        return list(spec.sae_source.layers) if spec is not None and spec.sae_source.layers else [self.default_layer()]

    def check_site(self, layer: int) -> None:
        """Refuse a site out of the model's range, or above the layer a residual-reading suite reads (an edit there
        cannot change the behavior, and the forward pass stops before it)."""
        self.model.check_layer(layer)
        read = self.task.read_layer
        if read is not None and layer > read:
            raise BenchmarkError(
                f"layer {layer} lies above the residual suite '{self.task.name}' reads (after block {read}): an "
                f"edit there cannot change its behavior; choose layers up to {read} (e.g. -D layers=[8,{read}])")


def check_layers(name: str, layers: list[int], features: list[list[int]] | None) -> None:
    """Refuse a multi-site defense's ``layers`` that repeat or are empty, or ``features`` without one list per layer."""
    if not layers or len(set(layers)) != len(layers):
        raise BenchmarkError(f"{name} needs distinct layers, got {layers}")
    if features is not None and len(features) != len(layers):
        raise BenchmarkError(f"{name} needs one feature list per layer: {len(layers)} layers, {len(features)} lists")


def trajectory(ctx: FitContext, first_layer: int | None) -> list[int]:
    """Every block from ``first_layer`` (default: the model's default SAE layer) to the readout: the block whose
    residual a residual-reading suite reads, else the last block (the logits read its output)."""
    first = ctx.default_layer() if first_layer is None else first_layer
    ctx.model.check_layer(first)
    last = ctx.task.read_layer if ctx.task.read_layer is not None else ctx.model.n_layers - 1
    if first > last:
        raise BenchmarkError(f"first_layer {first} lies above the layer suite '{ctx.task.name}' reads ({last}): "
                             f"choose first_layer <= {last}")
    return list(range(first, last + 1))


def behavior_present(ctx: FitContext, batch: PromptBatch, chunk: int, what: str, instead: str) -> Tensor:
    """[b] bool: which examples of ``batch`` (the fit split) show the behavior undefended (score > 0); refuses a split
    without both kinds, naming ``what`` needs them and the setting to use ``instead``."""
    from benchmark.modeling.forward import run_task

    with torch.no_grad():
        b = torch.cat([ctx.task.behavior(run_task(ctx.model, ctx.task, part, {}), part) for part in batch.chunks(chunk)])
    has = b > 0
    if has.all() or not has.any():
        raise BenchmarkError(f"{what} needs fit examples with and without the behavior ({int(has.sum())} of "
                             f"{len(has)} have it); use {instead}")
    return has


class Defense(ABC):
    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def create(cls, **overrides) -> "Defense":
        """Build with the constructor defaults updated by ``overrides``; ``params`` keeps every argument.

        Unknown names, missing required arguments and values that do not match the constructor's annotations
        (or, unannotated, the type of its default) are rejected with a :class:`BenchmarkError`.
        """
        params = check_params(cls, overrides)
        obj = cls(**params)
        obj.params = params
        return obj

    @abstractmethod
    def fit(self, ctx: FitContext) -> None:
        """Choose what to defend from ``ctx`` (the suite's fit split and the model's SAEs)."""

    @property
    @abstractmethod
    def sites(self) -> list[int]:
        """Blocks whose output (residual stream) the defense edits."""

    @abstractmethod
    def edit(self, layer: int, h: Tensor, token_mask: Tensor) -> Tensor:
        """Defended residual [b, p, d] from ``h`` [b, p, d]; ``token_mask`` [b, p] marks positions it may edit.

        Causal: the output at a position depends on ``h`` at that position and earlier ones only (generation with
        a key/value cache, :meth:`benchmark.modeling.forward.EditedForward.greedy`, relies on it)."""

    @abstractmethod
    def readouts(self, layer: int, h: Tensor) -> Tensor:
        """Encoder pre-activations [b, p, n] of the defended features at ``layer`` for residual ``h``."""

    @abstractmethod
    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        """The SAE activation function applied to ``readouts`` (for the reactivation metric)."""

    @abstractmethod
    def protected_directions(self, layer: int) -> Tensor:
        """[n, d]: directions a C1-constrained ``delta`` at ``layer`` must be orthogonal to."""

    @abstractmethod
    def defended(self) -> list[dict]:
        """``[{"site": {"layer": L, "hook": "resid_post"}, "features": [...]}]`` for the run record."""

    def sae_at(self, layer: int) -> tuple[LoadedSAE, Tensor] | None:
        """The SAE and defended latents at ``layer``, for path replay; ``None`` for non-SAE defenses."""
        return None

    @property
    def monitor_sites(self) -> list[int]:
        """Defended sites whose input a monitor reads (:meth:`monitor_margin`); [] (default): no monitor."""
        return []

    def monitor_margin(self, seen: dict[int, Tensor], token_mask: Tensor) -> Tensor:
        """[b, p]: per position, how far the monitor's score lies above its threshold (> 0: flagged), differentiable
        in ``seen`` ({layer: [b, p, d]}, each monitored site's input before the defense acts there); ``token_mask``
        [b, p] marks the positions it reads (the others get a negative margin). Only for a defense with
        :attr:`monitor_sites`."""
        raise BenchmarkError(f"defense '{self.name}' has no monitor")

    def abstains(self, seen: dict[int, Tensor], token_mask: Tensor) -> Tensor | None:
        """[b] bool: the inputs on which the defended model abstains (its monitor flags a position), or None for a
        defense without a monitor. An abstaining model gives a null readout: its behavior score is 0, so the
        behavior counts as suppressed (:func:`abstained`)."""
        if not self.monitor_sites:
            return None
        return (self.monitor_margin(seen, token_mask) > 0).any(dim=-1)

    def saes_used(self) -> list[LoadedSAE]:
        return []


class SAEFeatureDefense(Defense):
    """Base for defenses that act on chosen latents of one SAE per site (``self.chosen[layer] = (sae, ids)``)."""

    def __init__(self) -> None:
        self.chosen: dict[int, tuple[LoadedSAE, Tensor]] = {}

    @property
    def sites(self) -> list[int]:
        return sorted(self.chosen)

    def readouts(self, layer: int, h: Tensor) -> Tensor:
        sae, feats = self.chosen[layer]
        return sae_math.preacts(sae.sae, h, feats)

    def readout_activations(self, layer: int, pre: Tensor) -> Tensor:
        sae, feats = self.chosen[layer]
        return sae_math.activations(sae.sae, pre, feats)

    def protected_directions(self, layer: int) -> Tensor:
        sae, feats = self.chosen[layer]
        return sae_math.encoder_directions(sae.sae, feats)

    def defended(self) -> list[dict]:
        return [
            {"site": {"layer": L, "hook": "resid_post"}, "sae_id": sae.sae_id, "features": feats.tolist()}
            for L, (sae, feats) in sorted(self.chosen.items())
        ]

    def sae_at(self, layer: int) -> tuple[LoadedSAE, Tensor] | None:
        return self.chosen.get(layer)

    def saes_used(self) -> list[LoadedSAE]:
        return [sae for _, (sae, _) in sorted(self.chosen.items())]


def _constructor_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named constructor parameters (without ``self``), and whether it also takes ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = {p.name: p for p in params if p.kind not in skip}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _annotations(cls: type) -> dict:
    """Resolved constructor annotations (string annotations evaluated in the defining module); {} if they
    cannot be resolved, in which case defaults' types are used."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an unresolvable annotation only disables the type check
        return {}


def _type_name(ann) -> str:
    if ann is type(None):
        return "null"
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin is not None:
        args = typing.get_args(ann)
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    return getattr(ann, "__name__", str(ann))


def _matches(value, ann) -> bool:
    """Whether a JSON-like ``value`` fits annotation ``ann`` (lenient where the annotation is not a plain type)."""
    if ann is typing.Any or ann is inspect.Parameter.empty:
        return True
    if ann is type(None) or ann is None:
        return value is None
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set, frozenset) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or ann is dict:
        return isinstance(value, dict) and (len(args) < 2 or all(_matches(v, args[1]) for v in value.values()))
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def check_params(cls: type, overrides: dict) -> dict:
    """Constructor arguments of defense ``cls``: its defaults updated by ``overrides``, checked by name and type.

    Types come from the constructor's annotations; an unannotated parameter must match the type of its default
    (unless the default is None). Raises :class:`BenchmarkError` with one line naming the first problem.
    """
    name = getattr(cls, "name", cls.__name__)
    named, any_keyword = _constructor_parameters(cls)
    unknown = set() if any_keyword else set(overrides) - set(named)
    if unknown:
        raise BenchmarkError(
            f"defense '{name}' has no parameter {', '.join(sorted(unknown))} "
            f"(parameters: {', '.join(named) or 'none'})"
        )
    params = {n: p.default for n, p in named.items() if p.default is not p.empty}
    params.update(overrides)
    missing = [n for n in named if n not in params]
    if missing:
        raise BenchmarkError(f"defense '{name}' needs parameter {', '.join(missing)} (pass it with -D {missing[0]}=...)")
    hints = _annotations(cls)
    for n, value in params.items():
        if n not in named:  # taken by **kwargs: nothing to check against
            continue
        ann = hints.get(n, inspect.Parameter.empty)
        if ann is inspect.Parameter.empty:
            default = named[n].default
            if default is named[n].empty or default is None:
                continue
            ann = float if isinstance(default, float) else type(default)
        if not _matches(value, ann):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise BenchmarkError(
                f"parameter '{n}' of defense '{name}' must be {_type_name(ann)}, got {type(value).__name__} {shown}"
            )
    return params


def abstained(b: Tensor, flags: Tensor | None) -> Tensor:
    """Behavior scores [b] with a monitor's abstentions ``flags`` [b] (None: none) as null readouts (score 0)."""
    return b if flags is None else torch.where(flags, torch.zeros_like(b), b)


DEFENSES: Registry[type[Defense]] = Registry("defense", entry_point_group="sae_recovery_benchmark.defenses")


def top_attributed_features(ctx: FitContext, layer: int, k: int, chunk: int = 32) -> Tensor:
    """Latents of the SAE at ``layer`` with the ``k`` largest :func:`attribution_totals`, in index order."""
    return torch.topk(attribution_totals(ctx, layer, chunk), k).indices.sort().values


def attribution_totals(ctx: FitContext, layer: int, chunk: int = 32) -> Tensor:
    """[d_sae]: each latent's act x grad attribution on the behavior score over the fit split.

    Attribution of latent f: sum over fit examples and editable positions of ``z_f * d b / d z_f``, with the
    SAE spliced in and its error term kept (held constant), so the forward pass equals the clean one. Every defense
    that chooses features this way on a suite needs the same totals, so they are kept in the cache when every input
    is pinned by a hash (a model file and SAE file with sha256, the suite's data and version): the second run of
    any such defense on the suite skips this pass (seconds to minutes).
    """
    path = _attribution_cache(ctx, layer)
    if path is not None and path.exists():
        return torch.tensor(json.loads(path.read_text())["totals"])
    ctx.check_site(layer)
    total = _attribution_pass(ctx, layer, chunk)
    if path is not None:
        write_json_atomic(path, {"totals": total.tolist()})
    return total


def _attribution_cache(ctx: FitContext, layer: int) -> Path | None:
    """Where :func:`attribution_totals` keeps the totals of this fit, or None when an input is not pinned."""
    from benchmark import __version__
    from benchmark.modeling.models import cache_dir
    from benchmark.modeling.saes import weights_hash

    sae = ctx.sae(layer)
    sae_hash = weights_hash(sae)
    if sae_hash is None or not ctx.model.revision.startswith("sha256:"):
        return None
    task = ctx.task
    key = json.dumps([__version__, ctx.model.revision, sae_hash, task.name, task.version, task.data_hash(),
                      task.split_hashes()["fit"], layer, str(ctx.model.dtype),
                      ctx.model.device.type])
    return cache_dir() / "attribution" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _attribution_pass(ctx: FitContext, layer: int, chunk: int) -> Tensor:
    """:func:`attribution_totals` computed: one forward and backward pass over the fit split."""
    from benchmark.modeling.forward import run_task

    sae = ctx.sae(layer).sae
    batch = ctx.fit_batch()
    total = torch.zeros(sae.cfg.d_sae)
    for part in batch.length_chunks(chunk):
        probe = torch.zeros(*part.input_ids.shape, sae.cfg.d_sae, requires_grad=True)
        latents = {}

        def splice(h: Tensor) -> Tensor:
            z = sae.encode(h).detach()
            latents["z"] = z
            err = (h - sae.decode(z)).detach()
            return sae.decode(z + probe) + err

        ctx.task.behavior(run_task(ctx.model, ctx.task, part, {layer: splice}), part).sum().backward()
        mask = part.token_mask[..., None]
        total += (latents["z"] * probe.grad * mask).sum((0, 1))
    return total
