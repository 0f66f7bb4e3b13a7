"""The defense registry: entry-point plugins, duplicates, and constructor parameters checked by type."""

import pytest

import benchmark.registry
from benchmark.cli import main
from benchmark.errors import BenchmarkError
from benchmark.registry import Registry
from defenses import DEFENSES
from defenses.none import NoDefense


class PluginDefense(NoDefense):
    """A third-party defense, as a package would expose it through the entry-point group."""

    version = "0.1"
    description = "plugin"


class _FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self._obj, self.loaded = name, obj, False
        self.value, self.dist = f"{__name__}:{obj.__name__}", None

    def load(self):
        self.loaded = True
        return self._obj


def test_entry_point_is_loaded_by_name(monkeypatch):
    ep = _FakeEntryPoint("third_party_defense", PluginDefense)
    asked = []

    def fake_entry_points(group):
        asked.append(group)
        return [ep] if group == "sae_recovery_benchmark.defenses" else []

    monkeypatch.setattr(benchmark.registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))  # restored after the test
    monkeypatch.setattr(DEFENSES, "_plugins", None)
    assert "third_party_defense" not in DEFENSES.names()
    assert DEFENSES.get("third_party_defense") is PluginDefense
    assert asked == ["sae_recovery_benchmark.defenses"] and ep.loaded
    assert PluginDefense.name == "third_party_defense"
    assert "third_party_defense" in dict(DEFENSES.items())
    assert DEFENSES.get("sae_clamp").name == "sae_clamp", "built-ins are still there"


def test_plugins_are_not_imported_for_builtin_names(monkeypatch):
    ep = _FakeEntryPoint("third_party_defense", PluginDefense)
    monkeypatch.setattr(benchmark.registry, "entry_points", lambda group: [ep])
    monkeypatch.setattr(DEFENSES, "_plugins", None)
    assert DEFENSES.get("sae_clamp").name == "sae_clamp"
    assert not ep.loaded, "listing entry points (metadata) is enough to know no plugin claims the name"


def test_duplicate_registration_is_rejected():
    reg = Registry("defense")

    @reg.register("a")
    class A:
        pass

    reg.register("a")(A)  # the same object again is harmless
    with pytest.raises(BenchmarkError, match="defense 'a' is already registered by test_registry.*A; register "
                                             ".*B under another name"):
        @reg.register("a")
        class B:
            pass


def test_the_same_class_defined_again_may_register_again():
    """A notebook cell that defines and registers a defense can be run twice; the newest definition wins."""
    reg = Registry("defense")
    classes = []
    for _ in range(2):  # the cell, run twice
        @reg.register("mine")
        class Mine:
            pass

        classes.append(Mine)
    assert classes[0] is not classes[1] and reg.get("mine") is classes[1]


def test_subclass_gets_its_own_registered_name():
    reg = Registry("thing")

    @reg.register("parent")
    class Parent:
        pass

    @reg.register("child")
    class Child(Parent):
        pass

    assert (Parent.name, Child.name) == ("parent", "child")


@pytest.mark.parametrize("params,message", [
    ({"k": "eight"}, "parameter 'k' of defense 'sae_clamp' must be int, got str 'eight'"),
    ({"k": True}, "parameter 'k' of defense 'sae_clamp' must be int, got bool"),
    ({"layer": 2.5}, "parameter 'layer' of defense 'sae_clamp' must be int or null, got float 2.5"),
    ({"value": "big"}, "parameter 'value' of defense 'sae_clamp' must be float"),
    ({"features": [1, "x"]}, "parameter 'features' of defense 'sae_clamp' must be list\\[int\\] or null"),
    ({"features": 3}, "parameter 'features'"),
])
def test_wrong_parameter_types_are_rejected(params, message):
    with pytest.raises(BenchmarkError, match=message):
        DEFENSES.get("sae_clamp").create(**params)


def test_lenient_where_json_is():
    d = DEFENSES.get("sae_clamp").create(value=-4, features=[1, 2], layer=None)  # an int is a fine float
    assert d.params["value"] == -4 and d.value == -4.0
    m = DEFENSES.get("multi_layer_clamp").create(layers=[1, 2], features=[[1], [2, 3]])
    assert m.params["layers"] == [1, 2]


def test_wrong_parameter_type_on_the_command_line_fails_before_the_model_loads(capsys):
    code = main(["evaluate", "--defense", "sae_clamp", "-D", "k=eight", "--model", "no-such-model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: parameter 'k' of defense 'sae_clamp' must be int, got str 'eight'")


def test_unannotated_parameters_are_checked_against_their_defaults_and_kwargs_pass():
    from defenses.base import check_params

    class Loose(NoDefense):
        def __init__(self, steps=3, scale=1.0, tag=None, **extra):
            super().__init__()

    assert check_params(Loose, {"steps": 5, "scale": 2, "tag": [1], "anything": "goes"})["anything"] == "goes"
    with pytest.raises(BenchmarkError, match=r"parameter 'steps' of defense '\w+' must be int, got str"):
        check_params(Loose, {"steps": "5"})

    class Strict(NoDefense):
        def __init__(self, needed: int):
            super().__init__()

    with pytest.raises(BenchmarkError, match="needs parameter needed"):
        check_params(Strict, {})
    assert Strict.create(needed=2).params == {"needed": 2}
