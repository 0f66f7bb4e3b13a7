"""Defenses from installed packages (entry-point group ``sae_recovery_benchmark.defenses``): the example plugin under
``examples/defense_plugin`` found, validated and evaluated on the tiny model, beside a plugin whose import fails and
plugins whose names are taken. Packages are "installed" as pip leaves them: a ``.dist-info`` folder (metadata and
entry points) and the code on ``sys.path``."""

import os
import tomllib
from pathlib import Path

import pytest

from benchmark.attacks import AttackConfig
from benchmark.cli import main
from benchmark.running.engine import evaluate
from benchmark.errors import BenchmarkError
from defenses import DEFENSES

GROUP = "sae_recovery_benchmark.defenses"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "defense_plugin"


def install(site: Path, dist: str, version: str, entry_points: dict[str, str]) -> None:
    """The metadata pip writes for distribution ``dist`` with ``entry_points`` in our group."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A site folder on ``sys.path`` (and on child processes' PYTHONPATH) holding the example plugin, installed from
    its pyproject.toml, and a plugin whose import fails; the defense registry lists its plugins afresh."""
    site = tmp_path / "site"
    site.mkdir()
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    install(site, project["name"], project["version"], project["entry-points"][GROUP])
    install(site, "broken-defense-plugin", "0.1", {"broken_defense": "broken_defense_plugin:Defense"})
    (site / "broken_defense_plugin.py").write_text("import a_dependency_nobody_installed\n")
    for folder in (site, EXAMPLE):
        monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(EXAMPLE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))  # both restored after the test
    monkeypatch.setattr(DEFENSES, "_plugins", None)
    return site


def test_a_broken_plugin_is_one_line_of_the_listing(site, capsys):
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("contrast_clamp ") for line in out), "the working plugin is listed"
    assert any(line.startswith("sae_clamp ") for line in out), "so are the built-ins"
    broken = [line for line in out if "broken" in line]
    assert len(broken) == 1
    assert ("defense plugin broken-defense-plugin 0.1 (entry point broken_defense = broken_defense_plugin:Defense) "
            "does not import: ModuleNotFoundError: No module named 'a_dependency_nobody_installed'") in broken[0]


def test_a_broken_plugin_fails_only_the_command_that_asks_for_it(site, capsys, tiny_model, tiny_dir, tmp_path):
    cfg = AttackConfig(eps=(0.05, 0.5), steps=5)
    record, _ = evaluate(tiny_model, "contrast_clamp", "ioi", cfg, {"layer": 2, "k": 8}, tiny_dir / "saes",
                         tmp_path / "records", progress=False)
    assert record["defense"]["name"] == "contrast_clamp" and record["defense"]["version"] == "0.1.0"
    assert record["defense"]["params"] == {"layer": 2, "k": 8} and len(record["defense"]["defended"][0]["features"]) == 8
    assert main(["evaluate", "--defense", "broken_defense", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: defense plugin broken-defense-plugin 0.1")


def test_a_taken_name_is_an_error_naming_both_owners(site, capsys):
    install(site, "clashing-plugin", "2.0", {"sae_clamp": "contrast_clamp:ContrastClamp",
                                            "contrast_clamp": "contrast_clamp:ContrastClamp"})
    with pytest.raises(BenchmarkError) as built_in:
        DEFENSES.get("sae_clamp")
    assert str(built_in.value).startswith(
        "defense 'sae_clamp' is defined twice: by defenses.sae_clamp.SAEClamp and by plugin clashing-plugin 2.0 "
        "(entry point sae_clamp = contrast_clamp:ContrastClamp); rename the plugin's entry point")
    with pytest.raises(BenchmarkError, match="defense 'contrast_clamp' is defined twice: by plugin .* and by plugin "):
        DEFENSES.get("contrast_clamp")
    assert DEFENSES.get("multi_layer_clamp").name == "multi_layer_clamp", "other names are unaffected"
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    assert out.count("is defined twice") == 2 and "clashing-plugin 2.0" in out


def test_validate_takes_an_installed_plugins_name(site, capsys):
    code = main(["validate", "contrast_clamp", "-D", "layer=2", "-D", "k=4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "defense 'contrast_clamp' (contrast_clamp.ContrastClamp) satisfies the Defense interface" in out
    assert "gradient through the defended model at layer 2 is finite and non-zero" in out
    assert out.rstrip().endswith("ok: defense 'contrast_clamp' 0.1.0 is valid")
    assert main(["validate", "broken_defense"]) == 2
    assert "does not import: ModuleNotFoundError" in capsys.readouterr().err
