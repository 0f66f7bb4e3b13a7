"""Errors at the boundary between a user's code or files and ours: each names what is wrong, where, and the fix,
at the point it first shows (not as a torch traceback from deep inside a forward pass, or as NaN in a record)."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from benchmark.modeling import saes
from benchmark.attacks import AttackConfig
from benchmark.running.engine import evaluate
from benchmark.errors import BenchmarkError, NonFiniteError
from benchmark.modeling.saes import load_sae
from defenses.sae_clamp import SAEClamp
from tasks import TASKS

CFG = AttackConfig(eps=(0.05, 0.5), steps=5)
PARAMS = {"layer": 2, "k": 8, "value": -4.0}


def test_sae_of_another_model_names_the_file_and_both_widths(tiny_model, tiny_dir):
    path = tiny_dir / "saes_wrong_width" / "layer_2"
    with pytest.raises(BenchmarkError) as err:
        load_sae(tiny_model, 2, tiny_dir / "saes_wrong_width")
    assert str(err.value).startswith(f"{path / 'cfg.json'} has d_in=32, but the model has d_model=64: the SAE reads "
                                     "[..., 32] residuals and the model writes [..., 64]")


def test_sae_whose_weights_do_not_fit_its_config_names_the_file_and_the_shapes(tiny_model, tiny_dir, tmp_path):
    folder = tmp_path / "saes" / "layer_2"
    shutil.copytree(tiny_dir / "saes" / "layer_2", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 128}))
    with pytest.raises(BenchmarkError) as err:
        load_sae(tiny_model, 2, tmp_path / "saes")
    assert str(err.value) == (f"{folder / 'sae_weights.safetensors'} holds W_dec of shape [256, 64], but cfg.json "
                              "(d_in=64, d_sae=128) expects [128, 64]: the weights and the config come from different SAEs")


def test_a_missing_reference_sae_says_how_to_restore_the_committed_one_before_training(tiny_model, tiny_dir, tmp_path,
                                                                                       monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_dir / "saes", repo / "saes" / "tiny")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "saes"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True)
    (repo / "saes" / "tiny" / "layer_1" / "sae_weights.safetensors").unlink()
    monkeypatch.setattr(saes, "REPO_ROOT", repo)
    monkeypatch.setattr(saes, "REFERENCE_SAE_ROOT", repo / "saes")
    with pytest.raises(BenchmarkError) as err:
        load_sae(tiny_model, 1, repo / "saes" / "tiny")
    message = str(err.value)
    assert message.startswith(f"no SAE for layer 1 at {repo / 'saes' / 'tiny' / 'layer_1'}")
    restore = f"restore them with `git -C {repo} checkout -- saes/tiny/layer_1`"
    assert restore in message and message.index(restore) < message.index("train them again")
    with pytest.raises(BenchmarkError, match=r"the reference SAEs cover layer_0, layer_1, layer_2, layer_3; choose one "
                                             r"of those layers, or train one with `benchmark train-saes --layers 7"):
        load_sae(tiny_model.__class__(**{**vars(tiny_model), "n_layers": 8}), 7, repo / "saes" / "tiny")


class _Broken(SAEClamp):
    """A clamp whose edit goes wrong in the way ``flaw`` says."""

    version = "0"
    flaw = ""

    def edit(self, layer, h, token_mask):
        out = super().edit(layer, h, token_mask)
        if self.flaw == "shape":
            return out[..., :-1]
        if self.flaw == "dtype":
            return out.double()
        if self.flaw == "nan":
            spoil = torch.zeros_like(out)
            spoil[0, -1, 0] = float("nan")
            return out + spoil
        # "kink": finite values, but no derivative at the point the attack starts from (0 / 0 in sqrt's backward)
        return out + 0 * torch.sqrt((h - h.detach()).pow(2).sum(-1, keepdim=True))


def _broken(flaw: str) -> _Broken:
    cls = type(f"{flaw.capitalize()}Clamp", (_Broken,), {"name": f"{flaw}_clamp", "flaw": flaw})
    return cls.create(**PARAMS)


def _run(tiny_model, tiny_dir, tmp_path, defense):
    return evaluate(tiny_model, defense, "ioi", CFG, sae_dir=tiny_dir / "saes", records_dir=tmp_path, progress=False,
                    limit=16)


@pytest.mark.parametrize("flaw,found", [("shape", r"shape \[\d+, \d+, 63\] \(torch.float32\)"),
                                        ("dtype", r"shape \[\d+, \d+, 64\] \(torch.float64\)")])
def test_an_edit_of_the_wrong_shape_or_dtype_is_caught_where_the_defense_returns_it(tiny_model, tiny_dir, tmp_path,
                                                                                     flaw, found):
    with pytest.raises(BenchmarkError) as err:
        _run(tiny_model, tiny_dir, tmp_path, _broken(flaw))
    assert re.fullmatch(rf"defense '{flaw}_clamp' returned {found} from its edit at layer 2 for a residual of shape "
                        r"\[\d+, \d+, 64\] \(torch.float32\): edit\(layer, h, token_mask\) must return h's shape and "
                        r"dtype", str(err.value)), str(err.value)


def test_nan_in_a_defended_residual_stops_the_run_naming_defense_layer_suite_and_example(tiny_model, tiny_dir,
                                                                                         tmp_path):
    with pytest.raises(NonFiniteError) as err:
        _run(tiny_model, tiny_dir, tmp_path, _broken("nan"))
    assert re.fullmatch(r"defense 'nan_clamp' returned 1 NaN and 0 inf values from its edit at layer 2 on a finite "
                        r"residual \(suite 'ioi'; example ioi-test-\d+\); the run stops here: look for a division by "
                        r"zero, a log or sqrt of a non-positive number, or an overflow in the edit", str(err.value)), \
        str(err.value)
    assert not list(tmp_path.rglob("*.json*")), "nothing written"


def test_nan_in_the_attacks_gradient_stops_the_run_naming_defense_layer_suite_and_examples(tiny_model, tiny_dir,
                                                                                           tmp_path):
    with pytest.raises(NonFiniteError) as err:
        _run(tiny_model, tiny_dir, tmp_path, _broken("kink"))
    assert re.match(r"the attack's gradient is NaN or inf with defense 'kink_clamp' \(attack encoder at layer 2\) "
                    r"\(suite 'ioi'; examples? ioi-test-\d+.*\); the run stops here: usually a point where the edit has "
                    r"no derivative", str(err.value)), str(err.value)


def test_nan_in_a_score_stops_the_run_naming_the_suite_and_examples(tiny_model, tiny_dir, tmp_path, monkeypatch):
    ioi = TASKS.get("ioi")
    behavior = ioi.behavior

    def first_is_nan(self, read, batch):
        b = behavior(self, read, batch)
        return torch.where(torch.arange(len(b)) == 0, float("nan"), b)

    monkeypatch.setattr(ioi, "behavior", first_is_nan)
    with pytest.raises(NonFiniteError) as err:
        _run(tiny_model, tiny_dir, tmp_path, "sae_clamp")
    assert re.match(r"the behavior score is NaN or inf with the undefended model \(suite 'ioi'; examples? ioi-test-\d+",
                    str(err.value)), str(err.value)
