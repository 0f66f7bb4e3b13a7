"""Remote execution (NDIF) up to the network boundary: NDIF cannot be reached from here.

- The remote wrapper (no weights) builds and its trace is serialized and sent: pointed at a closed port, the
  request fails with "could not reach NDIF".
- ``FakeNDIF`` plays the server in-process: it serializes the trace as nnsight's remote backend does, deserializes it
  with this project's modules hidden (as on a server where they are not installed), runs the *deserialized* block
  and returns only its saved values through ``torch.save``/``torch.load``. What passes there is what a server that
  has the model can run: defended forward passes, residual reads and ``capture`` edits; gradients do not come back.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import io
import linecache
import sys

import pytest
import torch

from benchmark.errors import BenchmarkError
from benchmark.modeling.forward import add, capture, compose, run_edited
from benchmark.modeling.models import PROJECT_PACKAGES, load_model, remote_model


def _batch(ioi, n=4):
    return ioi.encode(ioi.examples("test")[:n])


@pytest.fixture
def ndif_env(monkeypatch):
    """A fake API key and an NDIF host on a closed local port (nothing listens on the discard port)."""
    monkeypatch.setenv("NDIF_API_KEY", "fake-key-for-tests")
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")


@pytest.fixture
def no_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)  # nor a key saved in nnsight's config


# -- the network boundary ----------------------------------------------------------------------------------------


def test_remote_wrapper_has_no_weights_and_its_trace_reaches_the_network(tiny_dir, ioi, ndif_env, monkeypatch):
    from nnsight.intervention.backends.remote import RemoteBackend

    model = remote_model(str(tiny_dir / "model"))  # a local folder stands in for a hub id: nothing is downloaded
    assert model.remote is True and model.n_layers == 4 and model.d_model == 64
    assert all(p.device.type == "meta" for p in model.hf.parameters())  # the wrapper holds no weights
    sent = []
    serialize = RemoteBackend._serialize

    def recording(self, tracer):
        blob = serialize(self, tracer)
        sent.append((self.host, self.api_key, self.model_key, len(blob)))
        return blob

    monkeypatch.setattr(RemoteBackend, "_serialize", recording)
    batch = _batch(ioi)
    with pytest.raises(BenchmarkError, match=r"could not reach NDIF at http://127\.0\.0\.1:9: .*refused"):
        run_edited(model, batch, {1: add(torch.ones(64))})
    assert len(sent) == 1  # the request was built and serialized before the connection failed
    host, key, model_key, size = sent[0]
    assert (host, key) == ("http://127.0.0.1:9", "fake-key-for-tests")
    assert str(tiny_dir / "model") in model_key and "text-generation" in model_key
    assert size > 1000


def test_missing_api_key_is_refused_before_anything_loads(no_key):
    with pytest.raises(BenchmarkError, match=r"set NDIF_API_KEY=\.\.\. \(https://login\.ndif\.us\)"):
        load_model("google/gemma-2-2b-it", remote=True)


def test_missing_api_key_is_refused_at_run_time_too(tiny_dir, ioi, ndif_env, monkeypatch):
    model = remote_model(str(tiny_dir / "model"))
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(BenchmarkError, match="set NDIF_API_KEY"):
        run_edited(model, _batch(ioi), {})


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "model.gguf", "not-a-hub-id", "a/b/c"])
def test_remote_needs_a_hub_model(name, ndif_env):
    with pytest.raises(BenchmarkError, match="--remote"):
        load_model(name, remote=True)


def test_cli_remote_with_a_local_folder_exits_2(tiny_dir, capsys, ndif_env):
    from benchmark.cli import main

    folder = str(tiny_dir / "model")
    code = main(["evaluate", "--model", folder, "--remote", "--defense", "none", "--tasks", "ioi", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: --remote needs a model that NDIF hosts" in err and folder in err


def test_cli_remote_without_a_key_exits_2(capsys, no_key):
    from benchmark.cli import main

    code = main(["evaluate", "--model", "gpt2", "--remote", "--defense", "none", "--tasks", "ioi", "--quiet"])
    assert code == 2
    assert "set NDIF_API_KEY=... (https://login.ndif.us)" in capsys.readouterr().err


def test_attack_refuses_a_remote_model(tiny_model, ioi):
    from benchmark.attacks import AttackConfig, build_attack

    remote = dataclasses.replace(tiny_model, remote=True)
    with pytest.raises(BenchmarkError, match=r"recovery attack needs gradients .*\(NDIF\) trace returns saved"):
        build_attack(remote, None, ioi, AttackConfig())


# -- what a server runs: FakeNDIF ---------------------------------------------------------------------------------


class NotOnServer(importlib.abc.MetaPathFinder):
    """Imports of this project's packages fail, as on NDIF (nnsight's own hiding misses an editable install)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT_PACKAGES:
            raise ModuleNotFoundError(f"No module named '{name}' (not installed on the server)")
        return None


class FakeNDIF:
    """Stands in for the server behind ``RemoteBackend.request`` (the network round trip; see the module doc)."""

    def __init__(self, model):
        self.lm, self.payloads = model.lm, []

    def request(self, backend, request, tracer):
        from nnsight.intervention.backends.local import LocalSimulationBackend
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        blob = backend._serialize(tracer)
        self.payloads.append((request.model_key, len(blob)))
        filename = tracer.info.frame.f_code.co_filename
        cached = linecache.cache.get(filename)
        simulation = LocalSimulationBackend(self.lm)
        hidden = simulation._hide_local_modules()
        blocker = NotOnServer()
        sys.meta_path.insert(0, blocker)
        try:
            served = RequestModel.deserialize(blob, self.lm._remoteable_persistent_objects(), backend.compress)
        finally:
            sys.meta_path.remove(blocker)
            simulation._restore(hidden)
            if cached is not None:  # deserialize registers the block's source under this file's name
                linecache.cache[filename] = cached
        inc()
        try:
            served.execute(served.info.code)  # the deserialized block, on deserialized values
            saved = {k: v for k, v in served.info.frame.f_locals.items() if id(v) in _saves()}
        finally:
            dec()
        out = io.BytesIO()
        torch.save(saved, out)
        return torch.load(io.BytesIO(out.getvalue()), weights_only=False)


@pytest.fixture
def served(tiny_model, monkeypatch, ndif_env):
    """The tiny model marked remote, its requests served by FakeNDIF; returns (model, fake)."""
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.modeling import huggingface

    fake = FakeNDIF(tiny_model)
    monkeypatch.setattr(RemoteBackend, "request", lambda backend, request, tracer: fake.request(backend, request,
                                                                                                 tracer))
    monkeypatch.setitem(huggingface._ID_CACHE, tiny_model.lm.repo_id, "tiny/model")  # no hub look-up
    return dataclasses.replace(tiny_model, remote=True), fake


def test_served_defended_forward_matches_local(tiny_model, tiny_dir, ioi, served):
    from benchmark.modeling.forward import defense_edits
    from defenses import DEFENSES, FitContext

    remote, fake = served
    defense = DEFENSES.get("directional_ablation").create(layer=2)
    defense.fit(FitContext(remote, ioi, tiny_dir / "saes"))  # its fit reads residuals through capture()
    local = DEFENSES.get("directional_ablation").create(layer=2)
    local.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    assert fake.payloads and torch.allclose(defense.direction, local.direction, atol=1e-5)
    batch = _batch(ioi)
    with torch.no_grad():
        want = run_edited(tiny_model, batch, defense_edits(local, batch))
        base = run_edited(tiny_model, batch, {})
        got = run_edited(remote, batch, defense_edits(defense, batch))
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the defense acted on the server


def test_served_capture_and_residual_come_back(tiny_model, ioi, served):
    remote, fake = served
    batch = _batch(ioi)
    before, after, seen = {}, {}, {}
    shift = torch.randn(64)
    with torch.no_grad():
        run_edited(tiny_model, batch, {1: compose(capture(before, 1), add(shift), capture(after, 1))}, read_layer=1)
        got = run_edited(remote, batch, {1: compose(capture(seen, "pre"), add(shift), capture(seen, "post"))},
                         read_layer=1)
    assert set(seen) == {"pre", "post"} and len(fake.payloads) == 1 and "tiny/model" in fake.payloads[0][0]
    assert torch.allclose(seen["pre"], before[1], atol=1e-5)
    assert torch.allclose(seen["post"], after[1], atol=1e-5)
    assert torch.allclose(got, after[1], atol=1e-5)


def test_served_gradients_do_not_come_back(ioi, served):
    remote, _ = served
    batch = _batch(ioi)
    delta = torch.zeros(*batch.input_ids.shape, 64, requires_grad=True)
    logits = run_edited(remote, batch, {1: add(delta)})  # the forward runs, on a copy of delta
    with pytest.raises(BenchmarkError, match="gradient was asked through a remote"):
        ioi.behavior(logits, batch).sum().backward()
    assert delta.grad is None
