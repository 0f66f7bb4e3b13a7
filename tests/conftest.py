"""Tiny stand-ins built offline (see benchmark/modeling/tiny.py): a random 4-layer Llama, a word-level tokenizer over the
IOI data's words, and random JumpReLU SAEs at every layer. Nothing is downloaded and nothing is trained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # child processes the tests start (submissions) inherit it

import torch  # noqa: E402

# The tiny model gains nothing from intra-op threads, and on a busy 2-core machine oversubscribed threads
# make every forward pass 10-20x slower.
torch.set_num_threads(1)

from benchmark.modeling.tiny import D_MODEL, D_SAE, N_LAYERS, build_tiny, build_tiny_saes  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = build_tiny(tmp_path_factory.mktemp("tiny"))
    build_tiny_saes(root / "saes_wrong_width", d_in=32)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from benchmark.modeling.models import load_model

    return load_model(str(tiny_dir / "model"))


@pytest.fixture(scope="session")
def ioi(tiny_model):
    from tasks import TASKS

    return TASKS.get("ioi")(tiny_model.tokenizer)


@pytest.fixture(scope="session")
def fitted_clamp(tiny_model, tiny_dir, ioi):
    from defenses import DEFENSES, FitContext

    defense = DEFENSES.get("sae_clamp").create(layer=2, k=8, mode="negative", value=-4.0)
    defense.fit(FitContext(tiny_model, ioi, tiny_dir / "saes"))
    return defense


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tiny_dir, tmp_path_factory):
    """One end-to-end evaluate on the tiny model: (record, path)."""
    from benchmark.attacks import AttackConfig
    from benchmark.running.engine import evaluate

    out = tmp_path_factory.mktemp("records")
    cfg = AttackConfig(mode="encoder", eps=(0.05, 0.2, 0.5), steps=15)
    return evaluate(tiny_model, "sae_clamp", "ioi", cfg, {"layer": 2, "k": 8, "value": -4.0},
                    tiny_dir / "saes", out, progress=False)


def site_input(model, defense, batch, layer: int = 2):
    """The residual at ``layer`` just before the defense acts there (defense active everywhere, no attack)."""
    from benchmark.modeling.forward import defense_edits
    from benchmark.modeling.forward import capture, compose, run_edited

    seen = {}
    edits = defense_edits(defense, batch)
    edits[layer] = compose(capture(seen, layer), edits[layer])
    with torch.no_grad():
        run_edited(model, batch, edits)
    return seen[layer]


def committed_record_as(defense: str, suite: str, mode: str, budget: float | None = 0.01, flips: int | None = None,
                        side_effect: float = 0.1) -> dict:
    """A committed run record relabelled as ``defense`` on ``suite`` with ``mode``, whose valid flips (the first
    ``flips`` of them, the others made non-flips) are all recovered at ``budget`` (None: never recovered), with
    ``side_effect``; counts and metrics recomputed from the rows (for leaderboard and battery tests)."""
    import copy
    import json

    from benchmark.attacks import ATTACKS
    from benchmark.running.metrics import summarize
    from benchmark.running.records import RECORDS_DIR

    r = json.loads((RECORDS_DIR / "smollm2-135m-instruct" / "sae_clamp" / "ioi__encoder.json").read_text())
    r["defense"]["name"], r["task"]["name"], r["attack"]["mode"] = defense, suite, mode
    r["attack"]["threat_model"] = ATTACKS.get(mode).threat_model
    kept = 0
    for row in r["examples"]:
        if not row["valid_flip"]:
            continue
        kept += 1
        if flips is not None and kept > flips:
            row.update(valid_flip=False, b_defended=abs(row["b_base"]), recovered=False, recovery_budget=None)
            continue
        row.update(recovered=budget is not None, recovery_budget=budget,
                   b_attacked=1.0 if budget is not None else -1.0)
    r["examples"] = [copy.deepcopy(row) for row in r["examples"]]
    r["counts"], r["metrics"] = summarize(r["examples"], side_effect, r["metrics"].get("defense_edit_rel"), {},
                                          r["attack"]["eps_sweep"])
    return r
