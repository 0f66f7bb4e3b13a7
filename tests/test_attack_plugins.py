"""Attacks as plug-ins: the registry, `benchmark attacks`, an attack from another package found by entry point and
evaluated on the tiny model (the worked example in examples/quiet_attack), and the threat-model contract."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch

from benchmark.attacks import ATTACKS, FEATURE_PRESERVING, AttackConfig, RecoveryAttack, build_attack
from benchmark.attacks.encoder import EncoderAttack
from benchmark.cli import main
from benchmark.errors import BenchmarkError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quiet_attack"


def test_attacks_command_lists_every_builtin_with_its_threat_model(capsys):
    assert main(["attacks"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()}
    assert rows["encoder"] == ["feature_preserving", "C1+C4"]
    assert rows["jacobian"] == ["feature_preserving", "C1+C2-C3+C4"]
    assert rows["soft_suffix"][0] == "input_space" and rows["none"][0] == "unconstrained"


@pytest.fixture
def quiet_plugin(tmp_path, monkeypatch):
    """The example package installed as pip leaves it (its ``.dist-info`` with the entry points of its
    pyproject.toml, and its code on ``sys.path``); the attack registry lists its plugins afresh."""
    site = tmp_path / "site"
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    group = "sae_recovery_benchmark.attacks"
    (info / "entry_points.txt").write_text(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in project["entry-points"][group].items()))
    for folder in (site, EXAMPLE):
        monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(ATTACKS, "_items", dict(ATTACKS._items))  # both restored after the test
    monkeypatch.setattr(ATTACKS, "_plugins", None)
    yield
    sys.modules.pop("quiet_attack", None)


def test_an_attack_from_another_package_is_found_by_entry_point_and_evaluated(quiet_plugin, tiny_model, tiny_dir,
                                                                                tmp_path, capsys):
    from benchmark.running.engine import evaluate

    cls = ATTACKS.get("quiet_encoder")
    assert issubclass(cls, EncoderAttack) and cls.threat_model == FEATURE_PRESERVING
    assert main(["attacks"]) == 0 and "quiet_encoder" in capsys.readouterr().out
    cfg = AttackConfig(mode="quiet_encoder", eps=(0.05, 0.5), steps=8, params=(("weight", 0.5),))
    record, path = evaluate(tiny_model, "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0},
                            tiny_dir / "saes", tmp_path, progress=False)
    assert path.name == "ioi__quiet_encoder.json"
    assert record["attack"]["mode"] == "quiet_encoder" and record["attack"]["params"] == {"weight": 0.5}
    assert record["attack"]["threat_model"] == FEATURE_PRESERVING
    assert record["counts"]["valid_flips"] > 0 and record["counts"]["recovered"] > 0
    assert record["metrics"]["c1_max_preact_change"] < 1e-4, "the plug-in keeps the encoder attack's C1"


def test_the_extra_loss_enters_what_the_attack_minimizes(quiet_plugin, tiny_model, ioi, fitted_clamp):
    attack = build_attack(tiny_model, fitted_clamp, ioi,
                          AttackConfig(mode="quiet_encoder", params=(("weight", 2.0),)))
    batch = ioi.encode(ioi.examples("test")[:6])
    delta = torch.zeros(len(batch), batch.input_ids.shape[1], tiny_model.d_model)
    read, seen = attack.forward(batch, delta)
    extra = attack.extra_loss(read, seen, batch)
    assert extra.shape == (len(batch),) and bool((extra >= 0).all())
    assert torch.allclose(attack.loss(read, seen, batch), ioi.attack_loss(read, batch) + extra)


def test_an_attack_must_declare_a_known_threat_model(tiny_model, ioi, fitted_clamp):
    @ATTACKS.register("vague_test_attack")
    class Vague(EncoderAttack):
        threat_model = "whatever works"

    try:
        with pytest.raises(BenchmarkError, match="threat model 'whatever works'"):
            build_attack(tiny_model, fitted_clamp, ioi, AttackConfig(mode="vague_test_attack"))
    finally:
        del ATTACKS._items["vague_test_attack"]


def test_unknown_attack_names_the_registered_ones():
    with pytest.raises(BenchmarkError, match="unknown attack 'encodr'; did you mean 'encoder'"):
        ATTACKS.get("encodr")
    assert issubclass(ATTACKS.get("soft_suffix"), RecoveryAttack)
