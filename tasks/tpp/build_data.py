"""Build ``tasks/tpp/data/tpp.json``: a five-class medical-abstract set split fit/dev/test per class.

Run ``python -m tasks.tpp.build_data`` to rebuild (deterministic for a seed; offline). The texts come from
``101_disease_class`` of the ``sae-probes`` package (Medical Abstracts: title and abstract, five disease
classes x 526), cut to their first :data:`MAX_CHARS` characters at a word boundary so a batch stays short
(about 50 tokens for the default model). The file repeats many abstracts (712 of 2,630 rows), 82 of them under
two labels: each text is kept once, and dropped if it has two labels, so no text is in two splits (303 to 404
distinct texts per class). Each class gets :data:`SPLIT_SIZES` examples in ``fit`` and ``dev`` and the rest in
``test``.

The class names in that file do not match the texts: by content (see :data:`KEYWORDS`; about 70% of the texts
named ``cardiovascular diseases`` mention a tumor or cancer, against at most 14% elsewhere) the labels are a
permutation of the original corpus's. :data:`RELABEL` maps each source label to the class its texts are about,
and :func:`check_relabel` fails the build if the keyword rates ever stop supporting it.

The control texts (next-token side effects) are news texts from ``97_news_class``, cut the same way.

``--hub REPO`` builds the same layout from one of SAEBench's hub sets instead (network access needed; see
:data:`HUB_SETS`), written to ``--out``. The suite reads ``tpp.json``, whose hash goes into every run record.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from benchmark.errors import BenchmarkError

OUT = Path(__file__).parent / "data" / "tpp.json"
SOURCE = "101_disease_class"
CONTROL_SOURCE = "97_news_class"
SEED = 0
MAX_CHARS = 240
SPLIT_SIZES = {"fit": 140, "dev": 60}  # per class; every other text of the class goes to test
MIN_TEST = 100
N_CONTROL = 48

#: source label in sae-probes' 101_disease_class -> the class its texts are about
RELABEL = {
    "cardiovascular diseases": "neoplasms",
    "neoplasms": "digestive system diseases",
    "nervous system diseases": "nervous system diseases",
    "general pathological conditions": "cardiovascular diseases",
    "digestive system diseases": "general pathological conditions",
}
#: keyword pattern (case-insensitive) per topical class, for :func:`check_relabel`
KEYWORDS = {
    "neoplasms": r"tumor|carcinoma|cancer|neoplas|lymphoma",
    "digestive system diseases": r"gastric|liver|hepat|bowel|colon|pancrea|intestin|esophag",
    "nervous system diseases": r"brain|neuro|nerve|seizure|epilep",
    "cardiovascular diseases": r"heart|cardiac|coronary|myocard|arter",
}
#: SAEBench's hub sets for TPP: repository -> (text column, class column, the classes SAEBench's TPP uses)
HUB_SETS = {
    "LabHC/bias_in_bios_class_set1": ("hard_text", "profession", ("0", "1", "2", "6", "9")),
    "canrager/amazon_reviews_mcauley_1and5": ("text", "category", ("1", "2", "3", "5", "6")),
}


def cut(text: str, max_chars: int = MAX_CHARS) -> str:
    """The first ``max_chars`` characters of ``text``, ending at a word boundary (whitespace normalized)."""
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars + 1].rsplit(" ", 1)[0]


def check_relabel(frame) -> None:
    """Fail unless each topical class's keywords are most frequent in the texts :data:`RELABEL` assigns it."""
    for name, pattern in KEYWORDS.items():
        rates = {src: float(g["prompt"].str.contains(pattern, case=False).mean()) for src, g in frame.groupby("target")}
        best = max(rates, key=rates.get)
        if RELABEL[best] != name:
            raise BenchmarkError(f"keywords of '{name}' are most frequent under source label '{best}' ({rates}); "
                                 "RELABEL no longer matches the data")


def hub_frame(repo: str):
    """SAEBench's hub set ``repo`` (train split, SAEBench's TPP classes) as a DataFrame with columns ``prompt``
    and ``target`` (the class id as a string)."""
    if repo not in HUB_SETS:
        raise BenchmarkError(f"unknown hub set '{repo}' (known: {', '.join(HUB_SETS)})")
    text_col, class_col, chosen = HUB_SETS[repo]
    try:
        from datasets import load_dataset

        frame = load_dataset(repo, split="train").to_pandas()
    except Exception as err:  # noqa: BLE001 - offline and hub errors vary by library version
        raise BenchmarkError(f"cannot load hub set {repo} ({err.__class__.__name__}): it needs network access; "
                             f"the offline default is sae-probes' {SOURCE}") from err
    frame = frame.rename(columns={text_col: "prompt", class_col: "target"})[["prompt", "target"]]
    frame["target"] = frame["target"].astype(str)
    return frame[frame["target"].isin(chosen)]


def split_classes(texts: dict[str, list[str]], sizes: dict[str, int], rng: random.Random) -> dict[str, list[dict]]:
    """Per class, shuffle its texts and cut them into ``sizes`` examples per split, the rest going to ``test``;
    ids are per split."""
    if len(texts) < 2:
        raise BenchmarkError(f"a one-vs-rest set needs at least two classes, got {sorted(texts)}")
    splits: dict[str, list[dict]] = {s: [] for s in [*sizes, "test"]}
    for label in sorted(texts):
        pool = sorted(texts[label])
        rng.shuffle(pool)
        if len(pool) < sum(sizes.values()) + MIN_TEST:
            raise BenchmarkError(f"class '{label}' has {len(pool)} distinct texts, fewer than "
                                 f"{sum(sizes.values()) + MIN_TEST}")
        start = 0
        for split, size in [*sizes.items(), ("test", len(pool))]:
            splits[split] += [{"text": t, "label": label} for t in pool[start : start + size]]
            start += size
    return {s: [dict(id=f"tpp-{s}-{i:04d}", **ex) for i, ex in enumerate(rows)] for s, rows in splits.items()}


def distinct_texts(frame, relabel: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Cut texts per class, each once; a text found (after the cut) under two labels is dropped."""
    labels: dict[str, set[str]] = {}
    for text, label in zip(frame["prompt"].astype(str), frame["target"].astype(str)):
        labels.setdefault(cut(text), set()).add(relabel[label] if relabel else label)
    out: dict[str, list[str]] = {}
    for text, found in labels.items():
        if len(found) == 1 and text:
            out.setdefault(found.pop(), []).append(text)
    return out


def build(hub: str | None = None) -> dict:
    from benchmark.modeling.data_sources import sae_probes_frame, sae_probes_texts

    rng = random.Random(SEED)
    if hub is None:
        frame = sae_probes_frame(SOURCE)
        check_relabel(frame)
        texts, source = distinct_texts(frame, RELABEL), f"sae-probes:{SOURCE}"
    else:
        texts, source = distinct_texts(hub_frame(hub)), f"hub:{hub}"
    splits = split_classes(texts, SPLIT_SIZES, rng)
    news = [cut(t) for t in sae_probes_texts(CONTROL_SOURCE) if len(t) > 120]
    rng.shuffle(news)
    control = [{"id": f"tpp-control-{i:03d}", "text": t} for i, t in enumerate(news[:N_CONTROL])]
    return {"source": source, "seed": SEED, "max_chars": MAX_CHARS, "classes": sorted(texts),
            "relabel": RELABEL if hub is None else None, "splits": splits, "control": control}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", choices=sorted(HUB_SETS), help="build from this SAEBench hub set (needs network)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = build(args.hub)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data["splits"].items())
    print(f"wrote {args.out}: {len(data['classes'])} classes, {sizes}, control {len(data['control'])}")
