"""Load the SAE that reads the residual stream after a given decoder block, and check it fits the model.

Sources: the project's reference SAEs (``saes/<model>/layer_<L>/``, sae_lens disk format), any folder laid out
the same way (``--sae-dir``), or a sae_lens hub release for hub models (needs network access).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.errors import BenchmarkError
from benchmark.modeling.models import LoadedModel, SaeSource

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_SAE_ROOT = REPO_ROOT / "saes"
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"  # an SAE folder in sae_lens disk format


@dataclass
class LoadedSAE:
    sae: object  # sae_lens.SAE, float32 on the model's device, unit-norm decoder rows
    layer: int  # decoder block whose output the SAE reads
    release: str  # sae_lens release or the folder it came from
    sae_id: str
    path: Path | None = None  # folder of a disk SAE

    def describe(self) -> dict:
        return {"release": self.release, "sae_id": self.sae_id, "site": {"layer": self.layer, "hook": "resid_post"}}


def default_sae_dir(model: LoadedModel) -> Path | None:
    """Where a registered model's own SAEs are: the reference SAEs under ``saes/``, or beside a model made on this
    machine (the tiny stand-in); None for hub SAEs."""
    if model.spec is not None and model.spec.build is not None:
        return model.spec.build() / "saes"
    if model.spec is not None and model.spec.sae_source.release == "local":
        return REFERENCE_SAE_ROOT / model.spec.name
    return None


def load_sae(model: LoadedModel, layer: int, sae_dir: Path | None = None) -> LoadedSAE:
    """The SAE reading the residual stream after block ``layer`` of ``model``."""
    from sae_lens import SAE

    model.check_layer(layer)
    sae_dir = sae_dir or default_sae_dir(model)
    if sae_dir is not None:
        path = Path(sae_dir) / f"layer_{layer}"
        if not (path / CFG).exists() or not (path / WEIGHTS).exists():
            raise _missing(path, layer)
        check_disk_sae(path, model.d_model)
        sae = SAE.load_from_disk(str(path), device=str(model.device), dtype="float32")
        release = path.resolve().parent
        release = release.relative_to(REPO_ROOT) if release.is_relative_to(REPO_ROOT) else release
        loaded = LoadedSAE(sae, layer, str(release), path.name, path)
    else:
        source = model.spec.sae_source
        sae_id = hub_sae_id(source, layer)
        check_in_catalogue(source.release, sae_id)
        try:
            sae = SAE.from_pretrained(source.release, sae_id, device=str(model.device), dtype="float32")
        except Exception as err:  # noqa: BLE001 - hub errors vary by library version; re-raise as one line
            raise BenchmarkError(
                f"cannot load SAE {source.release}/{sae_id} ({err.__class__.__name__}): "
                "hub SAEs need network access or a local copy; pass --sae-dir for local SAEs"
            ) from err
        loaded = LoadedSAE(sae, layer, source.release, sae_id)
    if sae.cfg.d_in != model.d_model:
        raise BenchmarkError(
            f"SAE {loaded.release}/{loaded.sae_id} has d_in={sae.cfg.d_in} but {model.name} has "
            f"d_model={model.d_model}: use SAEs trained on this model"
        )
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            sae.fold_W_dec_norm()  # exact reparametrization; makes clamp values comparable across latents
    sae.requires_grad_(False)
    return loaded


def hub_sae_id(source: SaeSource, layer: int) -> str:
    """The id, in ``source``'s sae_lens release, of the SAE reading the output of block ``layer`` (a ``resid_pre`` SAE
    of block ``layer + 1`` reads just that)."""
    if source.covered and layer not in source.covered:
        raise BenchmarkError(f"{source.release} has no SAE reading the output of block {layer}: it covers blocks "
                             f"{', '.join(map(str, source.covered))}; choose among those (the defense's layer or "
                             "layers, -D layer=...)")
    return source.sae_id(layer + 1 if source.hook == "resid_pre" else layer)


def check_in_catalogue(release: str, sae_id: str) -> None:
    """Refuse an SAE that the installed sae_lens's pretrained catalogue (shipped with the package) does not list,
    before anything is downloaded."""
    import sae_lens
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    entry = get_pretrained_saes_directory().get(release)
    if entry is None or sae_id not in entry.saes_map:
        raise BenchmarkError(f"the catalogue of sae_lens {sae_lens.__version__} has no SAE '{sae_id}' in release "
                             f"'{release}'{'' if entry else ' (no such release)'}: install the sae_lens of "
                             "constraints.txt, whose catalogue tests/test_hub_models.py checks every registered model "
                             "against")


def _missing(path: Path, layer: int) -> BenchmarkError:
    """What to do about an SAE folder ``path`` without its files: restore the committed reference SAEs first (they
    are plain files in git), and only then train."""
    have = sorted(p.name for p in path.parent.glob("layer_*")) if path.parent.is_dir() else []
    problem = f"no SAE for layer {layer} at {path} (need {CFG} and {WEIGHTS}; available: {', '.join(have) or 'none'})"
    if _committed(path):
        report = path.parent / "REPORT.md"
        again = f"the command in {report}" if report.exists() else "`benchmark train-saes`"
        return BenchmarkError(f"{problem}: the reference SAEs are committed to git (plain files, no LFS); restore "
                              f"them with `git -C {REPO_ROOT} checkout -- {path.resolve().relative_to(REPO_ROOT)}`, or "
                              f"only if your copy of the repository lacks them, train them again with {again} (the "
                              "better part of an hour on 2 cores)")
    if path.resolve().is_relative_to(REFERENCE_SAE_ROOT):
        return BenchmarkError(f"{problem}: the reference SAEs cover {', '.join(have) or 'no layer'}; choose one of "
                              f"those layers, or train one with `benchmark train-saes --layers {layer} --out "
                              f"{path.parent}` (the better part of an hour on 2 cores)")
    return BenchmarkError(f"{problem}: pass --sae-dir a folder of layer_<L>/ SAEs in sae_lens disk format (or leave it "
                          "out for the model's own SAEs); `benchmark train-saes` trains SAEs for the default model")


def _committed(path: Path) -> bool:
    """Whether folder ``path`` of this repository has files in its checked-out commit."""
    if not path.resolve().is_relative_to(REPO_ROOT):
        return False
    try:
        listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD", "--", str(path.resolve())],
                                cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        return False
    return bool(listed.strip())


def check_disk_sae(path: Path, d_model: int) -> None:
    """Refuse an SAE folder whose config does not fit the model, or whose weights do not fit its config, naming the
    file and the expected and found shapes (sae_lens would stop with a long torch traceback)."""
    from safetensors import safe_open

    cfg = json.loads((path / CFG).read_text())
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if d_in != d_model:
        raise BenchmarkError(f"{path / CFG} has d_in={d_in}, but the model has d_model={d_model}: the SAE reads "
                             f"[..., {d_in}] residuals and the model writes [..., {d_model}]; use SAEs trained on this "
                             "model (--sae-dir)")
    expected = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in], "b_enc": [d_sae], "b_dec": [d_in],
                "threshold": [d_sae], "log_threshold": [d_sae]}
    with safe_open(str(path / WEIGHTS), "pt") as f:
        for key in f.keys():
            found = list(f.get_slice(key).get_shape())
            if key in expected and found != expected[key]:
                raise BenchmarkError(f"{path / WEIGHTS} holds {key} of shape {found}, but {CFG} (d_in={d_in}, "
                                     f"d_sae={d_sae}) expects {expected[key]}: the weights and the config come from "
                                     "different SAEs")


def weights_hash(sae: LoadedSAE) -> str | None:
    """sha256 of a disk SAE's weight file (None for hub SAEs, which sae_lens pins by release and id)."""
    if sae.path is None:
        return None
    from benchmark.modeling.models import file_sha256

    return "sha256:" + file_sha256(sae.path / WEIGHTS)
