"""Load the SAE that reads the residual stream after a given decoder block, and check it fits the model.

Sources: the project's reference SAEs (``saes/<model>/layer_<L>/``, sae_lens disk format), any folder laid out
the same way (``--sae-dir``), or a sae_lens hub release for hub models (needs network access).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.errors import BenchmarkError
from benchmark.models import LoadedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SAE_ROOT = REPO_ROOT / "saes"


@dataclass
class LoadedSAE:
    sae: object  # sae_lens.SAE, float32, unit-norm decoder rows
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
        if not (path / "cfg.json").exists() or not (path / "sae_weights.safetensors").exists():
            have = sorted(p.name for p in Path(sae_dir).glob("layer_*")) if Path(sae_dir).is_dir() else []
            raise BenchmarkError(
                f"no SAE for layer {layer} at {path} (need cfg.json and sae_weights.safetensors; "
                f"available: {', '.join(have) or 'none'}); rebuild the reference SAEs with `benchmark train-saes`"
            )
        sae = SAE.load_from_disk(str(path), device="cpu", dtype="float32")
        release = path.resolve().parent
        release = release.relative_to(REPO_ROOT) if release.is_relative_to(REPO_ROOT) else release
        loaded = LoadedSAE(sae, layer, str(release), path.name, path)
    else:
        source = model.spec.sae_source
        hub_layer = layer + 1 if source.hook == "resid_pre" else layer
        try:
            sae = SAE.from_pretrained(source.release, source.sae_id(hub_layer), device="cpu")
        except Exception as err:  # noqa: BLE001 - hub errors vary by library version; re-raise as one line
            raise BenchmarkError(
                f"cannot load SAE {source.release}/{source.sae_id(hub_layer)} ({err.__class__.__name__}): "
                "hub SAEs need network access or a local copy; pass --sae-dir for local SAEs"
            ) from err
        loaded = LoadedSAE(sae, layer, source.release, source.sae_id(hub_layer))
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


def weights_hash(sae: LoadedSAE) -> str | None:
    """sha256 of a disk SAE's weight file (None for hub SAEs, which sae_lens pins by release and id)."""
    if sae.path is None:
        return None
    from benchmark.models import file_sha256

    return "sha256:" + file_sha256(sae.path / "sae_weights.safetensors")
