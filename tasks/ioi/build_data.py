"""Build ``tasks/ioi/data/ioi.json``: templated IOI prompts in ABBA and BABA order, split fit/dev/test.

Run ``python -m tasks.ioi.build_data`` to rebuild (deterministic for a seed). Names are kept only if they are
a single token (with a leading space) for the default model's tokenizer; the control prompts are news texts
from the ``sae-probes`` package, cut to their first sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data" / "ioi.json"
SEED = 0
SPLIT_SIZES = {"fit": 160, "dev": 80, "test": 240}
N_CONTROL = 48

# {A} and {B} are the two names in the order they appear; {S} repeats one of them; the answer is the other.
TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S} handed the {object} to",
    "While {A} and {B} were working at the {place}, {S} passed the {object} to",
    "{A} and {B} went to the {place}. {S} gave the {object} to",
    "The {place} was quiet when {A} and {B} arrived. {S} offered the {object} to",
    "Then, {A} and {B} had a long argument at the {place}. Afterwards {S} said to",
    "When {A} and {B} found a {object} at the {place}, {S} decided to give it to",
    "Yesterday {A} and {B} met at the {place}, and {S} sent a {object} to",
]
PLACES = ["store", "park", "school", "office", "station", "garden", "hospital", "restaurant", "library",
          "market", "beach", "museum", "kitchen", "airport", "church", "hotel"]
OBJECTS = ["drink", "book", "letter", "ring", "gift", "ball", "bag", "key", "snack", "card", "phone",
           "flower", "hat", "ticket", "coin", "note"]
NAMES = ["Mary", "John", "Tom", "James", "Anna", "Sarah", "David", "Michael", "Paul", "Mark", "Lisa", "Emma",
         "Kate", "Jack", "Peter", "Alice", "Robert", "Daniel", "Laura", "Rachel", "Chris", "Steve", "Susan",
         "Karen", "Linda", "Kevin", "Jason", "Brian", "Adam", "Alex", "Ben", "Sam", "Max", "Lucy", "Amy", "Jane",
         "George", "Henry", "Frank", "Grace", "Helen", "Joe", "Mike", "Tim", "Eric", "Ryan", "Nick", "Dan",
         "Bob", "Jim", "Anne", "Julia", "Sophie", "Oliver", "Harry", "Charlie", "Victoria", "Thomas", "Richard",
         "William", "Elizabeth", "Joseph", "Andrew", "Matt", "Simon", "Martin", "Carl", "Roger", "Louis"]


def single_token_names(tokenizer) -> list[str]:
    return [n for n in NAMES if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]


def build(tokenizer) -> dict:
    from benchmark.modeling.data_sources import sae_probes_texts

    rng = random.Random(SEED)
    names = single_token_names(tokenizer)
    total = sum(SPLIT_SIZES.values())
    seen, examples = set(), []
    while len(examples) < total:
        t = rng.randrange(len(TEMPLATES))
        io, s = rng.sample(names, 2)
        order = rng.choice(["ABBA", "BABA"])
        a, b = (io, s) if order == "ABBA" else (s, io)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        key = (t, io, s, order, place, obj)
        if key in seen:
            continue
        seen.add(key)
        prompt = TEMPLATES[t].format(A=a, B=b, S=s, place=place, object=obj)
        examples.append({"prompt": prompt, "io": " " + io, "s": " " + s, "template": t, "order": order})
    splits, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = [dict(id=f"ioi-{split}-{i:04d}", **ex) for i, ex in enumerate(examples[start : start + size])]
        start += size
    news = [t for t in sae_probes_texts("97_news_class") if len(t) > 120]
    rng.shuffle(news)
    control = [{"id": f"ioi-control-{i:03d}", "text": t[:240].rsplit(" ", 1)[0]} for i, t in enumerate(news[:N_CONTROL])]
    return {"seed": SEED, "templates": TEMPLATES, "names": names, "splits": splits, "control": control}


if __name__ == "__main__":
    from benchmark.modeling.models import load_model

    data = build(load_model().tokenizer)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}: {len(data['names'])} names, " + ", ".join(f"{k} {len(v)}" for k, v in data["splits"].items()))
