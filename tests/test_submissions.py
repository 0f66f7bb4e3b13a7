"""Submissions: the manifest schema, `benchmark validate` (child process), the checks the child runs, and
`benchmark evaluate --defense submissions/<name>`.

Bad submissions fail with exit status 2 and one line starting `error:`. The checks that need the adapter's
code run in a child process under `benchmark validate`; most cases here call the child's entry point
(`benchmark.running.submissions.main`) in this process against the session's tiny model to stay fast, and a few go
through the real child process.
"""

import json
import sys
from pathlib import Path

import pytest

from benchmark.running import submissions
from benchmark.cli import main
from benchmark.running.records import load_record

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "submissions" / "decoder_span_ablation"

GOOD_CODE = '''
from defenses.sae_clamp import SAEClamp


class Clamp(SAEClamp):
    """A clamp, submitted."""
'''

DUCK_CODE = '''
import torch


class Duck:
    """Satisfies the interface without subclassing Defense: ablate the all-ones direction at one layer."""

    def __init__(self, layer: int = 2, scale: float = 1.0):
        self.layer, self.scale = layer, scale

    def fit(self, ctx):
        self.r = torch.ones(ctx.model.d_model) / ctx.model.d_model ** 0.5

    @property
    def sites(self):
        return [self.layer]

    def edit(self, layer, h, token_mask):
        return h - self.scale * (h @ self.r)[..., None] * self.r * token_mask[..., None]

    def readouts(self, layer, h):
        return (h @ self.r)[..., None]

    def readout_activations(self, layer, pre):
        return pre

    def protected_directions(self, layer):
        return self.r[None]

    def defended(self):
        return [{"site": {"layer": self.layer, "hook": "resid_post"}, "features": []}]
'''


def _manifest(name: str, module: str, cls: str = "Clamp", /, **overrides) -> dict:
    manifest = {
        "name": name, "version": "0.0.1", "authors": ["A. Tester"], "contact": "tester@example.org",
        "adapter": f"{module}:{cls}", "parameters": {"k": 4, "value": -4.0},
        "validation_parameters": {"layer": 2, "features": [3, 17, 40, 99]}, "license": "MIT", "description": "a test defense",
        "suites": ["ioi"], "models": ["smollm2-135m-instruct"],
    }
    manifest.update(overrides)
    return manifest


def write_submission(root: Path, folder_name: str, code: str = GOOD_CODE, cls: str = "Clamp", **overrides) -> Path:
    """A submission folder ``root/folder_name`` with adapter module ``adapter_<folder_name>.py``; the manifest's
    fields are the defaults of :func:`_manifest` updated by ``overrides``."""
    folder = root / folder_name
    folder.mkdir(parents=True)
    (folder / f"adapter_{folder_name}.py").write_text(code)
    manifest = _manifest(folder_name, f"adapter_{folder_name}", cls, **overrides)
    (folder / "submission.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(autouse=True)
def _restore_imports(monkeypatch):
    """Validation puts the submission folder on sys.path and imports its module; undo both after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("adapter_") or name == "span_ablation":
            del sys.modules[name]


def _child(capsys, folder: Path, tiny_dir: Path) -> tuple[int, str, str]:
    """The child's validation, run in this process against the session's tiny model."""
    code = submissions.main(["validate", str(folder), "--tiny-dir", str(tiny_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def _one_error(err: str, code: int) -> None:
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("error: "), err


# ------------------------------------------------------------------------------------------- the manifest


def test_example_manifest_matches_the_schema():
    manifest = submissions.load_manifest(EXAMPLE)
    assert manifest["name"] == "decoder_span_ablation" and manifest["adapter"] == "span_ablation:DecoderSpanAblation"
    assert submissions.schema()["additionalProperties"] is False


def test_missing_manifest(capsys, tmp_path):
    (tmp_path / "empty_one").mkdir()
    code, _, err = _cli(capsys, "validate", str(tmp_path / "empty_one"))
    _one_error(err, code)
    assert "has no submission.json" in err


def test_missing_folder(capsys, tmp_path):
    code, _, err = _cli(capsys, "validate", str(tmp_path / "nowhere"))
    _one_error(err, code)
    assert "no submission folder" in err


@pytest.mark.parametrize("change,where", [
    ({"homepage": "https://example.org"}, "(top level): Additional properties are not allowed ('homepage'"),
    ({"parameters": "k=4"}, "at parameters: 'k=4' is not of type 'object'"),
    ({"adapter": "no_colon_here"}, "at adapter: 'no_colon_here' does not match"),
    ({"authors": []}, "at authors"),
    ({"name": "Bad Name"}, "at name"),
])
def test_manifest_that_breaks_the_schema(capsys, tmp_path, change, where):
    folder = write_submission(tmp_path, "schema_case", **change)
    code, _, err = _cli(capsys, "validate", str(folder))
    _one_error(err, code)
    assert "breaks the submission schema" in err and where in err


def test_manifest_missing_a_required_key(capsys, tmp_path):
    folder = write_submission(tmp_path, "no_license")
    manifest = json.loads((folder / "submission.json").read_text())
    del manifest["license"]
    (folder / "submission.json").write_text(json.dumps(manifest))
    code, _, err = _cli(capsys, "validate", str(folder))
    _one_error(err, code)
    assert "'license' is a required property" in err


def test_manifest_that_is_not_json(capsys, tmp_path):
    folder = write_submission(tmp_path, "not_json")
    (folder / "submission.json").write_text("{name: 1")
    code, _, err = _cli(capsys, "validate", str(folder))
    _one_error(err, code)
    assert "is not valid JSON" in err


def test_name_must_match_folder(capsys, tmp_path):
    folder = write_submission(tmp_path, "folder_name", name="other_name")
    code, _, err = _cli(capsys, "validate", str(folder))
    _one_error(err, code)
    assert "must equal the folder's name 'folder_name'" in err


# -------------------------------------------------------------------------------- what the child checks


def test_good_and_duck_typed_submissions_pass(capsys, tmp_path, tiny_dir):
    code, out, err = _child(capsys, write_submission(tmp_path, "good_clamp"), tiny_dir)
    assert code == 0, err
    assert "ok: submission 'good_clamp' 0.0.1 is valid" in out
    code, out, err = _child(capsys, write_submission(tmp_path, "duck_ablation", DUCK_CODE, "Duck",
                                                     parameters={"scale": 1.0}, validation_parameters={}), tiny_dir)
    assert code == 0, err
    assert "gradient through the defended model at layer 2 is finite and non-zero" in out


def test_adapter_class_is_registered_under_the_manifest_name(tmp_path):
    sub = submissions.load(write_submission(tmp_path, "named_one", DUCK_CODE, "Duck", parameters={},
                                            validation_parameters={}))
    from defenses.base import Defense

    assert issubclass(sub.cls, Defense) and sub.cls.__name__ == "Duck"
    assert (sub.cls.name, sub.cls.version, sub.cls.description) == ("named_one", "0.0.1", "a test defense")
    assert sub.cls.create(scale=2.0).params == {"layer": 2, "scale": 2.0}


@pytest.mark.parametrize("code_text,message", [
    ("import not_a_module_anywhere\n", "does not import: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def broken(:\n", "does not import: SyntaxError"),
    ("raise RuntimeError('boom at import')\n", "does not import: RuntimeError: boom at import"),
    ("import sys\nsys.exit(0)\n", "does not import: SystemExit"),
    ("X = 1\n", "has no 'Clamp'"),
])
def test_entry_that_does_not_import(capsys, tmp_path, tiny_dir, code_text, message):
    code, _, err = _child(capsys, write_submission(tmp_path, "bad_import", code_text), tiny_dir)
    _one_error(err, code)
    assert message in err


def test_adapter_shadowing_an_installed_module(capsys, tmp_path, tiny_dir):
    folder = write_submission(tmp_path, "shadowing")
    (folder / "json.py").write_text(GOOD_CODE)
    manifest = json.loads((folder / "submission.json").read_text())
    manifest["adapter"] = "json:Clamp"
    (folder / "submission.json").write_text(json.dumps(manifest))
    code, _, err = _child(capsys, folder, tiny_dir)
    _one_error(err, code)
    assert "has the name of an installed module" in err


@pytest.mark.parametrize("code_text,cls,message", [
    (DUCK_CODE.replace("def edit(", "def not_edit("), "Duck", "missing edit"),
    ("from defenses.base import Defense\n\nclass Half(Defense):\n    def fit(self, ctx):\n        pass\n", "Half",
     "missing defended, edit, protected_directions, readout_activations, readouts, sites"),
    ("def Clamp():\n    pass\n", "Clamp", "is a function, not a class"),
])
def test_class_that_does_not_satisfy_the_interface(capsys, tmp_path, tiny_dir, code_text, cls, message):
    folder = write_submission(tmp_path, "not_a_defense", code_text, cls, parameters={})
    code, _, err = _child(capsys, folder, tiny_dir)
    _one_error(err, code)
    assert "does not satisfy the Defense interface" in err or "not a class" in err
    assert message in err


@pytest.mark.parametrize("params,message", [
    ({"k": "four"}, "parameter 'k' of defense 'wrong_params' must be int, got str 'four'"),
    ({"value": [1.0]}, "parameter 'value' of defense 'wrong_params' must be float, got list"),
    ({"kk": 3}, "defense 'wrong_params' has no parameter kk"),
])
def test_parameters_of_the_wrong_type(capsys, tmp_path, tiny_dir, params, message):
    code, _, err = _child(capsys, write_submission(tmp_path, "wrong_params", parameters=params), tiny_dir)
    _one_error(err, code)
    assert message in err


NAN_CODE = GOOD_CODE + '''
    def edit(self, layer, h, token_mask):
        return super().edit(layer, h, token_mask) * float("nan")
'''


def test_defense_that_produces_nan(capsys, tmp_path, tiny_dir):
    code, _, err = _child(capsys, write_submission(tmp_path, "nan_maker", NAN_CODE), tiny_dir)
    _one_error(err, code)
    assert "error: defense 'nan_maker' returned " in err and "NaN and 0 inf values from its edit at layer 2" in err


@pytest.mark.parametrize("code_text,message", [
    (GOOD_CODE + "\n    def edit(self, layer, h, token_mask):\n        return h * 0.5\n",
     "edit at layer 2 changed positions outside token_mask"),
    (GOOD_CODE + "\n    def edit(self, layer, h, token_mask):\n        return super().edit(layer, h.detach(), token_mask)\n",
     "gradient through the defense at layer 2 is zero"),
    ("import torch\n" + GOOD_CODE + "\n    def edit(self, layer, h, token_mask):\n        m = token_mask[..., None]\n"
                 "        return torch.where(m, h + (h * m).mean(1, keepdim=True), h)\n",
     "edit at layer 2 is not causal"),
    (GOOD_CODE + "\n    def fit(self, ctx):\n        raise ValueError('no\\nluck')\n",
     "submission 'misbehaving' failed in fit: ValueError: no luck"),
])
def test_defense_that_breaks_the_contract(capsys, tmp_path, tiny_dir, code_text, message):
    code, _, err = _child(capsys, write_submission(tmp_path, "misbehaving", code_text), tiny_dir)
    _one_error(err, code)
    assert message in err


def test_builtin_name_is_refused(capsys, tmp_path, tiny_dir):
    code, _, err = _child(capsys, write_submission(tmp_path, "sae_clamp"), tiny_dir)
    _one_error(err, code)
    assert "'sae_clamp' is already a registered defense" in err


# ------------------------------------------------------------------------------ through the child process


def test_example_submission_validates_in_a_child_process(capsys):
    code, out, err = _cli(capsys, "validate", str(EXAMPLE))
    assert code == 0, err
    assert "ok: submission 'decoder_span_ablation' 0.1.0 is valid" in out
    assert "runs the submission's code" in out


def test_nan_is_reported_from_the_child_process_as_one_line(capsys, tmp_path):
    code, _, err = _cli(capsys, "validate", str(write_submission(tmp_path, "nan_child", NAN_CODE)))
    _one_error(err, code)
    assert "defense 'nan_child' returned " in err and "NaN and 0 inf values from its edit at layer 2" in err


def test_validation_has_a_time_limit(capsys, tmp_path):
    slow = GOOD_CODE + "\n    def fit(self, ctx):\n        import time\n        time.sleep(600)\n"
    code, _, err = _cli(capsys, "validate", str(write_submission(tmp_path, "sleepy", slow)), "--timeout", "2")
    _one_error(err, code)
    assert "did not finish within 2 s" in err


def test_evaluate_a_submission_in_a_child_process(capfd, tiny_dir, tmp_path):
    records = tmp_path / "records"
    code = main(["evaluate", "--defense", str(EXAMPLE), "--tasks", "ioi", "--model", str(tiny_dir / "model"), "--sae-dir",
                 str(tiny_dir / "saes"), "-D", "layer=2", "-D", "features=[3,17,40,99]", "--eps", "0.5", "--steps", "2",
                 "--records-dir", str(records), "--quiet"])
    out = capfd.readouterr()
    assert code == 0, out.err
    assert "== decoder_span_ablation on ioi" in out.out
    (path,) = records.rglob("*.json")
    record = load_record(path)
    assert path.parent.name == "decoder_span_ablation"
    assert record["defense"]["name"] == "decoder_span_ablation" and record["defense"]["version"] == "0.1.0"
    assert record["defense"]["params"] == {"layer": 2, "k": 16, "features": [3, 17, 40, 99], "strength": 1.0}
    assert record["provenance"]["command"].startswith(f"benchmark evaluate --defense {EXAMPLE}")


def test_evaluate_a_bad_submission_fails_with_one_line(capfd, tmp_path, tiny_dir):
    folder = write_submission(tmp_path, "bad_eval", parameters={"k": "four"})
    code = main(["evaluate", "--defense", str(folder), "--model", str(tiny_dir / "model"), "--quiet"])
    err = capfd.readouterr().err.strip()
    _one_error(err, code)
    assert "parameter 'k' of defense 'bad_eval' must be int" in err


def test_a_child_that_exits_early_is_not_a_pass(capsys, tmp_path):
    folder = write_submission(tmp_path, "quitter", "import os\nos._exit(0)\n")
    code, _, err = _cli(capsys, "validate", str(folder))
    _one_error(err, code)
    assert "ended without a result" in err
