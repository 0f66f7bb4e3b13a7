"""The full battery on the default model: its plan and how much of it has records.

The plan (:data:`PLAN`) runs every built-in defense and the example submission against every suite it fits, with
its constrained attack (encoder; jacobian for the multi-site clamp; the adaptive attacks for a defense that abstains
on a monitor), the unconstrained ``none`` attack and the soft-suffix baseline. Each :class:`Step` is one ``benchmark evaluate``; ``benchmark battery`` runs them in order
with ``--keep-existing`` (so a battery is filled in over several sessions or machines, and a deleted record runs
again), and the leaderboard shows the plan's coverage (:func:`coverage`), so a missing run is visible, not silent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from benchmark.modeling.models import DEFAULT_MODEL
from benchmark.running.records import RECORDS_DIR, REPO_ROOT, record_path

SUITES = ("tpp", "wmdp_bio", "ioi", "refusal")
BASELINES = ("none", "soft_suffix")  # unconstrained, and no residual access
#: the attacks that adapt to a defense with non-differentiable parts: an evasion term through a smoothed surrogate,
#: and two that need no gradient of the defense (DESIGN.md, "Adaptive attacks")
ADAPTIVE = ("evasive_encoder", "transfer", "random_search")
#: defenses that fit on any suite (a submission folder is named by its path from the repository root)
GENERIC = ("sae_clamp", "error_projection_clamp", "sae_reconstruct_clamp", "directional_ablation", "none",
           "submissions/decoder_span_ablation", "adversarial_projection_clamp")
#: the multi-site clamp's default layers are 8, 12 and 16; TPP reads the residual after block 12, so there 8 and 12
MULTI_TPP = ("layers=[8,12]",)
#: the trajectory defenses start at the default layer, 12, which is also where TPP reads: there they start at 8
TRAJECTORY_TPP = ("first_layer=8",)
#: the jacobian attack's cross-site basis grows with batch x prompt length: on TPP's long abstracts a chunk of 64
#: took more than 22 GB (killed on a 24 GB machine), so it runs in chunks of 16
JACOBIAN_TPP = ("--batch-size", "16")


@dataclass(frozen=True)
class Step:
    """One ``benchmark evaluate`` of the plan: ``defense`` (a registered name, a submission folder relative to the
    repository root, or ``reference``: each suite's own) on ``suites`` with ``modes``, ``-D`` ``params`` and
    other evaluate ``options``."""

    defense: str
    suites: tuple[str, ...]
    modes: tuple[str, ...]
    params: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """The step's ``benchmark`` arguments (a submission folder as a path from the working directory)."""
        defense = self.defense
        if "/" in defense:
            defense = os.path.relpath(REPO_ROOT / defense)
        out = ["evaluate", "--defense", defense, "--tasks", ",".join(self.suites), "--attack", ",".join(self.modes)]
        for p in self.params:
            out += ["-D", p]
        return out + list(self.options)

    @cached_property
    def runs(self) -> tuple[tuple[str, str, str], ...]:
        """(defense name as its records carry it, suite, attack mode) of every run of the step."""
        from tasks import TASKS

        def recorded(suite: str) -> str:
            if self.defense == "reference":
                return TASKS.get(suite).reference_defense
            if "/" in self.defense:
                from benchmark.running.submissions import load_manifest

                return load_manifest(REPO_ROOT / self.defense)["name"]
            return self.defense

        return tuple((recorded(s), s, m) for s in self.suites for m in self.modes)


PLAN: tuple[Step, ...] = (
    # each suite's reference defense (the default battery), then its other attack modes
    Step("reference", SUITES, ("encoder", *BASELINES)),
    # the refusal suite on HarmBench's behaviors (outside data beside the project's own requests)
    Step("reference", ("refusal_harmbench",), ("encoder",)),
    # constrained attacks first, so the main table fills before the comparison modes
    *(Step(d, SUITES, ("encoder",)) for d in GENERIC),
    Step("multi_layer_clamp", ("wmdp_bio", "ioi", "refusal"), ("jacobian",)),
    Step("multi_layer_clamp", ("tpp",), ("jacobian",), MULTI_TPP, JACOBIAN_TPP),
    *(Step(d, SUITES, BASELINES) for d in GENERIC),
    Step("multi_layer_clamp", ("wmdp_bio", "ioi", "refusal"), ("encoder", *BASELINES)),
    Step("multi_layer_clamp", ("tpp",), ("encoder", *BASELINES), MULTI_TPP),
    # a defense that abstains on a monitor, with the attacks that adapt to it (issue 18)
    Step("error_monitor", SUITES, ("encoder", *ADAPTIVE, *BASELINES)),
    # defenses over the whole trajectory from the first site to the readout (issue 18); on TPP, which reads the
    # residual after block 12 (the default first site), the trajectory starts at block 8
    Step("trajectory_clamp", ("wmdp_bio", "ioi", "refusal"), ("encoder",)),
    Step("trajectory_clamp", ("tpp",), ("encoder",), TRAJECTORY_TPP),
    Step("concept_scrubbing", ("wmdp_bio", "ioi", "refusal"), ("encoder",)),
    Step("concept_scrubbing", ("tpp",), ("encoder",), TRAJECTORY_TPP),
)


def planned_runs(plan: tuple[Step, ...] = PLAN) -> list[tuple[str, str, str]]:
    """Every (defense, suite, mode) of ``plan`` once, in plan order (a reference defense that is also generic,
    such as IOI's ``sae_clamp``, counts once)."""
    return list(dict.fromkeys(run for step in plan for run in step.runs))


def coverage(root: Path = RECORDS_DIR, model: str = DEFAULT_MODEL,
             plan: tuple[Step, ...] = PLAN) -> dict[tuple[str, str, str], Path | None]:
    """Each planned run of ``model`` and its record under ``root`` (None: not run yet)."""
    paths = {run: record_path(model, *run, root) for run in planned_runs(plan)}
    return {run: path if path.is_file() else None for run, path in paths.items()}
