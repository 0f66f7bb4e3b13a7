"""Submitted defenses: a folder ``submissions/<name>/`` with a manifest and the adapter's code.

``benchmark validate submissions/<name>`` checks the manifest against ``schema/submission.schema.json`` in this
process (no submitted code runs for that), then runs ``python -m benchmark.running.submissions validate <folder>`` in a
child process with a time limit. The child imports the adapter (the submission folder is put on ``sys.path``),
checks that it satisfies the :class:`~defenses.base.Defense` interface and that the manifest's parameters fit its
constructor, and runs it on the tiny stand-in model (:mod:`benchmark.modeling.tiny`): fit on the IOI suite, edit a batch,
read its readouts, and take one gradient through the defended model; every output must be finite.

``benchmark validate NAME`` runs the same checks, in the same child process, on a registered defense: a built-in
or one an installed package provides through the entry-point group ``sae_recovery_benchmark.defenses``, with its
constructor's defaults updated by ``-D key=value``.

``benchmark evaluate --defense submissions/<name>`` also runs in a child process with a time limit: the child
registers the adapter under the manifest's name and runs the normal ``evaluate``, so run records carry the
submission's name, its manifest version and its parameters (``-D`` overrides them).

VALIDATING OR EVALUATING A SUBMISSION EXECUTES ITS CODE with your user's permissions. The child process bounds
its run time and keeps its crashes out of the calling process; it is not a sandbox. Read the code first, or run
it in a container.

Every failure is one line (the CLI prints it as ``error: ...`` and exits with status 2).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from benchmark.errors import BenchmarkError, one_line

MANIFEST = "submission.json"
SCHEMA_PATH = Path(__file__).parent / "schema" / "submission.schema.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
VALIDATE_TIMEOUT = 300.0  # seconds for `benchmark validate` (tiny model: a few seconds of real work)
EVALUATE_TIMEOUT = 4 * 3600.0  # seconds for `benchmark evaluate --defense submissions/<name>`
REQUIRED = ("fit", "sites", "edit", "readouts", "readout_activations", "protected_directions", "defended")


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def is_submission_ref(text: str) -> bool:
    """Whether ``--defense`` names a submission folder rather than a registered defense."""
    return "/" in text or os.sep in text or text.endswith(MANIFEST) or (Path(text) / MANIFEST).is_file()


def _folder(ref: str | Path) -> Path:
    path = Path(ref)
    return path.parent if path.name == MANIFEST else path


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def load_manifest(ref: str | Path) -> dict:
    """The manifest of submission folder ``ref``, checked against the schema (no submitted code runs)."""
    import jsonschema

    folder = _folder(ref)
    if not folder.is_dir():
        raise BenchmarkError(f"no submission folder {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise BenchmarkError(f"submission {folder} has no {MANIFEST} (see submissions/README.md)")
    try:
        manifest = json.loads(path.read_text(), parse_constant=_reject_constant)
    except ValueError as err:
        raise BenchmarkError(f"{path} is not valid JSON: {one_line(err)}") from None
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise BenchmarkError(f"{path} breaks the submission schema at {where}: {one_line(errors[0].message)}")
    if manifest["name"] != folder.resolve().name:
        raise BenchmarkError(f"{path}: name '{manifest['name']}' must equal the folder's name '{folder.resolve().name}'")
    return manifest


def _inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder)


def load_adapter(folder: Path, manifest: dict) -> type:
    """Import the manifest's ``module:Class`` from ``folder`` and return it as a registered-ready Defense class.

    The returned class is a subclass of the adapter (and of :class:`~defenses.base.Defense` for a duck-typed
    adapter) whose ``name``, ``version`` and ``description`` are the manifest's.
    """
    from defenses.base import Defense

    folder = Path(folder).resolve()
    entry = manifest["adapter"]
    module_name, _, class_name = entry.partition(":")
    top = module_name.split(".")[0]
    if not ((folder / f"{top}.py").is_file() or (folder / top).is_dir()):
        raise BenchmarkError(f"adapter '{entry}': no {top}.py or {top}/ in {folder}")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is not None:
        places = [found.origin] + list(found.submodule_search_locations or [])
        if not any(_inside(p, folder) for p in places if p):
            raise BenchmarkError(
                f"adapter module '{top}' has the name of an installed module ({found.origin or places[-1]}); rename it"
            )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure of submitted code becomes one line
        raise BenchmarkError(f"adapter '{entry}' does not import: {type(err).__name__}: {one_line(err)}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BenchmarkError(f"adapter '{entry}': module '{module_name}' has no '{class_name}'")
    if not isinstance(cls, type):
        raise BenchmarkError(f"adapter '{entry}' is a {type(cls).__name__}, not a class")
    if issubclass(cls, Defense):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        bases: tuple = (cls,)
    else:
        missing = [m for m in REQUIRED if not hasattr(cls, m) or (m != "sites" and not callable(getattr(cls, m)))]
        bases = (cls, Defense)
    if missing:
        raise BenchmarkError(
            f"adapter '{entry}' does not satisfy the Defense interface: missing {', '.join(missing)} "
            "(subclass defenses.base.Defense and implement them)"
        )
    own = {"name": manifest["name"], "version": manifest["version"], "description": manifest["description"],
           "__module__": cls.__module__, "__doc__": cls.__doc__}
    return types.new_class(cls.__name__, bases, exec_body=lambda ns: ns.update(own))


@dataclass
class Submission:
    folder: Path
    manifest: dict
    cls: type

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def params(self, tiny: bool = False) -> dict:
        """Constructor arguments: the manifest's ``parameters`` (updated by ``validation_parameters`` if ``tiny``)."""
        out = dict(self.manifest["parameters"])
        if tiny:
            out.update(self.manifest.get("validation_parameters", {}))
        return out


def load(ref: str | Path) -> Submission:
    """Manifest, adapter class and parameter check of one submission (runs the adapter module's code)."""
    from defenses import DEFENSES
    from defenses.base import check_params
    from tasks import TASKS

    folder = _folder(ref).resolve()
    manifest = load_manifest(folder)
    if manifest["name"] in DEFENSES:
        raise BenchmarkError(f"submission name '{manifest['name']}' is already a registered defense; choose another")
    for suite in manifest["suites"]:
        TASKS.get(suite)
    sub = Submission(folder, manifest, load_adapter(folder, manifest))
    check_params(sub.cls, sub.params())
    if "validation_parameters" in manifest:
        check_params(sub.cls, sub.params(tiny=True))
    return sub


def _guard(label: str, stage: str, fn: Callable):
    """Run submitted code; any exception but a BenchmarkError becomes one line naming the stage."""
    try:
        return fn()
    except BenchmarkError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001
        raise BenchmarkError(f"{label} failed in {stage}: {type(err).__name__}: {one_line(err)}") from None


def _check_tensor(label: str, what: str, t, shape: tuple | None = None, ndim: int | None = None):
    import torch

    if not isinstance(t, torch.Tensor):
        raise BenchmarkError(f"{label}: {what} returned {type(t).__name__}, not a tensor")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise BenchmarkError(f"{label}: {what} has shape {list(t.shape)}, expected {list(shape)}")
    if ndim is not None and t.ndim != ndim:
        raise BenchmarkError(f"{label}: {what} has shape {list(t.shape)}, expected {ndim} dimensions")
    if not torch.isfinite(t).all():
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise BenchmarkError(f"{label}: {what} produced non-finite values ({nan} NaN, {inf} inf)")
    return t


def smoke_test(label: str, name: str, version: str, cls: type, params: dict, tiny_dir: Path | None = None) -> list[str]:
    """Run defense ``cls`` (named ``name`` in its run-record entry, ``label`` in messages: "submission 'x'" or
    "defense 'x'") with ``params`` on the tiny stand-in model; returns what was checked, one line each."""
    import jsonschema
    import torch

    from benchmark.modeling.forward import defense_edits
    from benchmark.modeling.forward import add, capture, compose, run_edited
    from benchmark.modeling.models import load_model
    from benchmark.running.records import schema as record_schema
    from benchmark.modeling.tiny import build_tiny
    from defenses.base import FitContext
    from tasks import TASKS

    with tempfile.TemporaryDirectory(prefix="benchmark-validate-") as tmp:
        root = Path(tiny_dir) if tiny_dir is not None else build_tiny(Path(tmp))
        model = load_model(str(root / "model"))
        task = TASKS.get("ioi")(model.tokenizer)
        defense = _guard(label, "its constructor", lambda: cls.create(**params))
        _guard(label, "fit", lambda: defense.fit(FitContext(model, task, root / "saes")))
        sites = _guard(label, "sites", lambda: list(defense.sites))
        if any(not isinstance(L, int) or isinstance(L, bool) or not 0 <= L < model.n_layers for L in sites):
            raise BenchmarkError(f"{label}: sites {sites} are not layers 0..{model.n_layers - 1}")
        lines = [f"fit on ioi (tiny model, parameters {json.dumps(params)}): sites {sites}"]

        batch = task.encode(task.examples("dev")[:8])
        mask = batch.token_mask
        seen: dict = {}
        edits = defense_edits(defense, batch)
        probe = {L: compose(capture(seen, L), edits[L]) for L in sites}
        with torch.no_grad():
            _guard(label, "the defended forward pass", lambda: run_edited(model, batch, probe))
            for L in sites:
                h = seen[L]
                # its shape, dtype and values were checked where it returned in the pass above (DefenseEdit)
                out = _guard(label, f"edit at layer {L}", lambda: defense.edit(L, h, mask))
                if not torch.equal(out[~mask], h[~mask]):
                    raise BenchmarkError(f"{label}: edit at layer {L} changed positions outside "
                                         "token_mask (padding or the attention sink)")
                cut = h.shape[1] - 2  # the edit of a prefix must be the prefix of the edit (no look-ahead)
                early = _guard(label, f"edit at layer {L}", lambda: defense.edit(L, h[:, :cut], mask[:, :cut]))
                if not torch.allclose(early, out[:, :cut], atol=1e-5, rtol=1e-4):
                    raise BenchmarkError(f"{label}: edit at layer {L} is not causal (its output at a "
                                         "position changes with later positions); generation with a key/value "
                                         "cache needs causal edits")
                pre = _check_tensor(label, f"readouts at layer {L}",
                                    _guard(label, f"readouts at layer {L}", lambda: defense.readouts(L, h)), ndim=3)
                if tuple(pre.shape[:2]) != tuple(h.shape[:2]):
                    raise BenchmarkError(f"{label}: readouts at layer {L} have shape {list(pre.shape)}, "
                                         f"expected [{h.shape[0]}, {h.shape[1]}, n]")
                _check_tensor(label, f"readout_activations at layer {L}",
                              _guard(label, f"readout_activations at layer {L}",
                                     lambda: defense.readout_activations(L, pre)), pre.shape)
                dirs = _check_tensor(label, f"protected_directions at layer {L}",
                                     _guard(label, f"protected_directions at layer {L}",
                                            lambda: defense.protected_directions(L)), ndim=2)
                if dirs.shape[1] != model.d_model:
                    raise BenchmarkError(f"{label}: protected_directions at layer {L} have shape "
                                         f"{list(dirs.shape)}, expected [n, {model.d_model}]")
                lines.append(f"layer {L}: edit, {pre.shape[-1]} readouts and {dirs.shape[0]} protected directions are finite")
            logits = _guard(label, "the defended forward pass", lambda: run_edited(model, batch, edits))
            _check_tensor(label, "the defended model's logits", logits)
            b = _check_tensor(label, "the defended behavior score", task.behavior(logits, batch))
        lines.append(f"defended forward pass on {len(batch)} ioi prompts is finite (mean behavior score {float(b.mean()):.3f})")

        if sites:
            layer = min(sites)
            delta = torch.zeros(*batch.input_ids.shape, model.d_model, requires_grad=True)
            attacked = defense_edits(defense, batch)
            attacked[layer] = compose(add(delta), attacked[layer])

            def backward():
                loss = task.attack_loss(run_edited(model, batch, attacked), batch).sum()
                if loss.requires_grad:  # False when the edit cuts delta off the graph: a zero gradient
                    loss.backward()

            _guard(label, "the attacker's backward pass", backward)
            grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
            _check_tensor(label, f"the attacker's gradient at layer {layer}", grad, delta.shape)
            if not grad.abs().max() > 0:
                raise BenchmarkError(f"{label}: the attacker's gradient through the defense at layer "
                                     f"{layer} is zero (the edit must be differentiable)")
            lines.append(f"gradient through the defended model at layer {layer} is finite and non-zero")

        defended = _guard(label, "defended()", defense.defended)
        section = {"name": name, "version": version, "params": defense.params, "defended": defended}
        rs = record_schema()
        errors = list(jsonschema.Draft202012Validator({**rs["properties"]["defense"], "$defs": rs["$defs"]})
                      .iter_errors(section))
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path) or "(top level)"
            raise BenchmarkError(f"{label}: its run-record entry is invalid at {where}: "
                                 f"{one_line(errors[0].message)}")
        try:
            json.dumps(section, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise BenchmarkError(f"{label}: parameters or defended() are not JSON: {one_line(err)}") from None
        lines.append(f"run-record entry is valid ({sum(len(d['features']) for d in defended)} defended features)")
    return lines


def validate(ref: str | Path, tiny_dir: Path | None = None, params: dict | None = None) -> list[str]:
    """Everything ``benchmark validate`` checks, in this process (the child's work): a submission folder, or a
    registered defense's name (``params``: its constructor arguments on the tiny model)."""
    if not is_submission_ref(str(ref)):
        return validate_registered(str(ref), params or {}, tiny_dir)
    sub = load(ref)
    label = f"submission '{sub.name}'"
    lines = [f"manifest {sub.folder / MANIFEST} matches the schema",
             f"adapter {sub.manifest['adapter']} satisfies the Defense interface; parameters fit its constructor"]
    checks = smoke_test(label, sub.name, sub.manifest["version"], sub.cls, sub.params(tiny=True), tiny_dir)
    return lines + checks + [f"{label} {sub.manifest['version']} is valid"]


def validate_registered(name: str, params: dict, tiny_dir: Path | None = None) -> list[str]:
    """The checks of a submission, on the registered defense ``name`` (a built-in or an installed plugin) with its
    constructor's defaults updated by ``params``."""
    from defenses import DEFENSES
    from defenses.base import Defense, check_params

    cls = DEFENSES.get(name)
    label = f"defense '{name}'"
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise BenchmarkError(f"{label} is {cls!r}, not a subclass of defenses.base.Defense: its registration (or "
                             "entry point) must name the class")
    missing = sorted(getattr(cls, "__abstractmethods__", ())) + [
        a for a in ("version", "description") if not isinstance(getattr(cls, a, None), str)]
    if missing:
        raise BenchmarkError(f"{label} ({cls.__module__}.{cls.__qualname__}) does not satisfy the Defense interface: "
                             f"missing {', '.join(missing)} (implement the methods; version and description are "
                             "class attributes, strings)")
    check_params(cls, params)
    lines = [f"{label} ({cls.__module__}.{cls.__qualname__}) satisfies the Defense interface; parameters fit its "
             "constructor"]
    return lines + smoke_test(label, name, cls.version, cls, params, tiny_dir) + [f"{label} {cls.version} is valid"]


# ----------------------------------------------------------------------------------------------- parent side


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _child_failure(proc: subprocess.CompletedProcess, what: str) -> str:
    text = "\n".join(x for x in (proc.stderr, proc.stdout) if x)
    for line in reversed(text.splitlines()):
        if line.startswith("error: "):
            return line[len("error: "):]
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return f"{what} crashed (exit status {proc.returncode}): {one_line(last)}"


def validate_in_child(ref: str | Path, timeout: float = VALIDATE_TIMEOUT, params: dict | None = None) -> list[str]:
    """``benchmark validate``: a submission's manifest here, the rest in a child process bounded by ``timeout``
    seconds; a registered defense's name (``params``: its constructor arguments on the tiny model) all there."""
    if is_submission_ref(str(ref)):
        if params:
            raise BenchmarkError("-D applies to a defense named by its registered name; a submission is validated "
                                 "with its manifest's validation_parameters")
        label = f"submission '{load_manifest(ref)['name']}'"
        cmd = [sys.executable, "-m", "benchmark.running.submissions", "validate", str(_folder(ref).resolve())]
    else:
        label = f"defense '{ref}'"
        cmd = [sys.executable, "-m", "benchmark.running.submissions", "validate", str(ref), "--params", json.dumps(params or {})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"validation of {label} did not finish within {timeout:g} s "
                             "(its process was stopped; --timeout raises the limit)") from None
    if proc.returncode != 0:
        raise BenchmarkError(_child_failure(proc, f"validation of {label}"))
    lines = proc.stdout.splitlines()
    if not any(line.startswith(f"ok: {label}") for line in lines):
        raise BenchmarkError(f"validation of {label} ended without a result (did its code exit the process?)")
    return lines


def evaluate_in_child(ref: str | Path, argv: list[str], timeout: float = EVALUATE_TIMEOUT) -> int:
    """``benchmark evaluate --defense <submission>``: re-run the same command line in a child process that has
    the submission registered; output streams through. Returns the child's exit status."""
    manifest = load_manifest(ref)
    folder = _folder(ref).resolve()
    cmd = [sys.executable, "-m", "benchmark.cli", *argv]  # the CLI again, as a module: nothing here imports it
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        proc = subprocess.run(cmd, timeout=timeout, env={**_child_env(), CHILD_ENV: str(folder)})
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"evaluation of submission '{manifest['name']}' did not finish within {timeout:g} s "
                             "(its process was stopped; --timeout raises the limit)") from None
    if proc.returncode not in (0, 2):  # 2: the child has printed its own error line
        raise BenchmarkError(f"evaluation of submission '{manifest['name']}' crashed (exit status {proc.returncode})")
    return proc.returncode


# ------------------------------------------------------------------------------------------------ child side

ACTIVE: dict[str, Submission] = {}  # submissions registered in this (child) process, by resolved folder
#: set by :func:`evaluate_in_child` to the submission folder the child process evaluates
CHILD_ENV = "BENCHMARK_SUBMISSION_CHILD"


def active(ref: str | Path) -> Submission | None:
    """The submission at ``ref`` if this process evaluates it (the child :func:`evaluate_in_child` starts, which
    registers it here on first use), else None."""
    folder = str(_folder(ref).resolve())
    if folder not in ACTIVE and os.environ.get(CHILD_ENV) == folder:
        register(folder)
    return ACTIVE.get(folder)


def child_failure(err: Exception) -> str | None:
    """In the evaluating child, the one line that reports an exception raised by submitted code (which may raise
    anything; no traceback unless ``BENCHMARK_DEBUG`` is set); None elsewhere (the exception propagates)."""
    folder = os.environ.get(CHILD_ENV)
    if folder is None or os.environ.get("BENCHMARK_DEBUG"):
        return None
    return (f"submission {folder} failed: {type(err).__name__}: {one_line(err)} "
            "(BENCHMARK_DEBUG=1 shows the traceback)")


def register(ref: str | Path) -> Submission:
    """Load a submission and register its adapter under the manifest's name (child process only)."""
    from defenses import DEFENSES

    sub = load(ref)
    DEFENSES.register(sub.name)(sub.cls)
    ACTIVE[str(sub.folder)] = sub
    return sub


def main(argv: list[str] | None = None) -> int:
    """Child entry point of validation: ``python -m benchmark.running.submissions validate FOLDER`` (evaluation runs
    ``python -m benchmark.cli`` with :data:`CHILD_ENV` set)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m benchmark.running.submissions",
                                     description="run a submitted defense (executes its code)")
    sub = parser.add_subparsers(dest="command", required=True)
    va = sub.add_parser("validate")
    va.add_argument("folder", help="submission folder, or a registered defense's name")
    va.add_argument("--tiny-dir", type=Path, default=None, help="reuse tiny stand-ins built by benchmark.modeling.tiny.build_tiny")
    va.add_argument("--params", type=json.loads, default={}, help="a registered defense's constructor arguments (JSON)")
    args = parser.parse_args(argv)
    try:
        for line in validate(args.folder, args.tiny_dir, args.params):
            print(f"ok: {line}")
        return 0
    except BenchmarkError as err:
        print(f"error: {one_line(err, 1000)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - submitted code may raise anything; one line, no traceback
        if os.environ.get("BENCHMARK_DEBUG"):
            raise
        print(f"error: submission {args.folder} failed: {type(err).__name__}: {one_line(err)} "
              "(BENCHMARK_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
