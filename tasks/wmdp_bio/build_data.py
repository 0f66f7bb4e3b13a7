"""Build ``tasks/wmdp_bio/data/wmdp_bio.json``: WMDP-Bio-style multiple-choice biology questions from SciQ.

Run ``python -m tasks.wmdp_bio.build_data`` to rebuild (deterministic for a seed and tokenizer).

What the offline sources hold (``sae-probes`` 0.4.2, checked with pandas):

- ``36_sciq_tf``: 5,000 rows ``"Q: <question>\\nA: <answer>"`` with ``target`` 1 (the SciQ answer) or 0 (one
  SciQ distractor). They cover 4,017 distinct questions: 2,026 have a true row, 1,991 only false rows, and just 2
  have both (duplicate rows account for the rest). So a question's own distractors cannot be recovered; each
  question here is its correct answer plus :data:`N_DISTRACTORS` distractors drawn from the answers (true or
  false rows) of *other* questions of the same subject, all real SciQ answer strings.
- ``99_sci_cat``: 3,870 Reddit comments labelled Physics / Chemistry / Biology (1,290 each). They are not SciQ
  questions, so they cannot label SciQ directly; they train the naive-Bayes tie-breaker of :func:`subject` and
  give the free-text part of the contrast data a defense is fitted on.

Subjects (:func:`subject`): count word-initial matches of the biology, physics/chemistry and earth/space stem
lists below in question + answer; the largest count wins (earth/space questions are dropped: they are neither
the target nor a clean control). A tie (including no match) goes to a multinomial naive Bayes over
``99_sci_cat`` words when it is confident (posterior of Biology above 0.9 or below 0.1), else the question is
dropped.

Choices must be single tokens with a leading space for the default model's tokenizer (recorded in the file), so
one forward pass scores every choice by its exact cloze log-probability (see ``suite.py``); other tokenizers
re-filter at load time. A distractor must have the plural form of the answer (both end in "s" or neither)
and share no 5-letter prefix with the answer or another choice (so "kidney" is no distractor for
"kidneys"). Choice order is shuffled by the seed.

Splits of the biology questions (fit / dev / test) and the physics/chemistry questions (``control`` for side
effects, ``contrast_other`` for fitting) are disjoint, by a seeded shuffle.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).parent / "data" / "wmdp_bio.json"
SEED = 0
N_DISTRACTORS = 3
SPLIT_SHARES = {"fit": 0.2, "dev": 0.2, "test": 0.6}
N_CONTROL = 96  # physics/chemistry questions for the side-effect measurement
N_CONTRAST_OTHER = 120  # further physics/chemistry questions, only for fitting a defense
N_FORUM_TEXTS = 200  # 99_sci_cat texts per side (Biology; Physics + Chemistry) in the contrast data
FORUM_CHARS = (80, 400)  # keep forum texts at least this long, cut at a word boundary below the maximum
NB_CONFIDENT = 0.9

BIOLOGY = (
    r"cell|gene|genet|genom|dna|rna|protein|enzym|organism|species|plant|animal|bacteri|virus|viral|fung|blood|"
    r"heart|lung|kidney|liver|brain|neuron|nerv|muscl|bone|skelet|skin|tissue|organs?\b|hormon|immun|evolution|"
    r"evolv|photosynth|chlorophyll|mitochond|chloroplast|reproduc|sperm|egg|embryo|fetus|fetal|offspring|mammal|"
    r"reptil|amphibian|insect|bird|fish|arthropod|vertebra|invertebra|ecosystem|ecolog|predat|prey|digest|"
    r"stomach|intestin|metabol|mutat|chromosom|allele|trait|inherit|heredit|mitosis|meiosis|disease|infect|"
    r"pathogen|antibod|antigen|vaccin|seed|flower|pollen|pollinat|leaf|leaves|root|fruit|alga|protist|prokaryot|"
    r"eukaryot|biolog|gland|cancer|nutri|habitat|microb|parasit|symbio|larva|cili|flagell|spore|moss|fern|"
    r"gymnosperm|angiosperm|xylem|phloem|lipid|insulin|body|human|placent|uter|ovar|testes|testic|cytoplasm|"
    r"ribosom|vesicle|lymph|artery|arteries|vein|capillar|kingdom|phylum|taxonom|sponge|worm|cnidaria|mollus|"
    r"annelid|echinoderm|chordat|primate|homeostasis|behavior|mating|courtship|diet|vitamin|tooth|teeth|eye|"
    r"ear\b|hair|sex|zygote|gamete|haploid|diploid|clone|biome|food chain|food web|producer|consumer|decompos|"
    r"herbivor|carnivor|omnivor|population|extinct|natural selection|adapt"
)
PHYSICS_CHEMISTRY = (
    r"atom|electron|proton|neutron|ion\b|ions\b|ionic|covalent|bond|element|periodic|compound|acid|base\b|"
    r"bases\b|ph\b|reaction|solution|solvent|solute|mole\b|moles\b|molar|gas|liquid|solid|force|motion|velocit|"
    r"speed|accelerat|mass\b|weight|gravit|friction|wave|light|sound|frequenc|wavelength|electric|magnet|current|"
    r"voltage|circuit|resist|heat|temperature|thermal|thermo|nuclear|radioactiv|isotope|metal|crystal|densit|"
    r"momentum|newton|joule|watt|lens|mirror|refract|reflect|optic|laser|quantum|photon|kinetic|potential energy|"
    r"machine|lever|pulley|fluid|buoyan|oxid|reduct|catalyst|polymer|hydrocarbon|alkan|alken|alkyn|alcohol|ester|"
    r"salt|charge|volt|ampere|ohm|kelvin|celsius|pressure|volume|particle|physic|chemis|molecul|orbital|"
    r"valence|halogen|noble gas|alkali|equilibrium|entropy|enthalpy|vapor|boil|melt|freez|condens|evaporat|"
    r"spectr|radiation|electromagnet|fission|fusion|decay|half-life|torque|inertia|vector|work\b|power\b|energy"
)
EARTH_SPACE = (
    r"earth|planet|rock|mineral|magma|lava|volcan|ocean|sea\b|weather|climat|atmospher|star\b|stars\b|sun\b|"
    r"solar|moon|galax|universe|soil|erosion|glacier|fossil|geolog|earthquake|seismic|tecton|crust|mantle|"
    r"continent|sediment|river|lake|cloud|rain|storm|wind|hurricane|tornado|season|comet|asteroid|meteor|"
    r"telescop|orbit|ozone|pollution|groundwater|aquifer|tide|coast|mountain|desert|uranus|jupiter|mars\b|venus|"
    r"mercury|saturn|neptune"
)
STEMS = {"biology": BIOLOGY, "physchem": PHYSICS_CHEMISTRY, "earth": EARTH_SPACE}


@dataclass(frozen=True)
class SciQItem:
    question: str
    answers: tuple[str, ...]  # answers of its true rows (one in practice)
    wrong: tuple[str, ...]  # answers of its false rows (SciQ distractors)


def sciq_items() -> list[SciQItem]:
    """Every distinct question of ``36_sciq_tf`` with its true and false answers, in first-seen order."""
    from benchmark.modeling.data_sources import sae_probes_frame

    frame = sae_probes_frame("36_sciq_tf")
    true, false = collections.defaultdict(list), collections.defaultdict(list)
    for prompt, target in zip(frame["prompt"].astype(str), frame["target"]):
        question, answer = prompt.removeprefix("Q: ").split("\nA: ", 1)
        bucket = true if int(target) == 1 else false
        if answer.strip() not in bucket[question.strip()]:
            bucket[question.strip()].append(answer.strip())
    order = list(dict.fromkeys([*true, *false]))
    return [SciQItem(q, tuple(true[q]), tuple(false[q])) for q in order]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class NaiveBayes:
    """Multinomial naive Bayes (add-one smoothing, word presence) over ``99_sci_cat``'s three subjects."""

    def __init__(self) -> None:
        from benchmark.modeling.data_sources import sae_probes_frame

        frame = sae_probes_frame("99_sci_cat")
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for text, label in zip(frame["prompt"].astype(str), frame["target"]):
            self.counts[label].update(set(_words(text)))
        self.vocab = set().union(*self.counts.values())
        self.totals = {c: sum(v.values()) + len(self.vocab) for c, v in self.counts.items()}

    def p_biology(self, text: str) -> float:
        words = set(_words(text)) & self.vocab
        logp = {c: sum(math.log((self.counts[c][w] + 1) / self.totals[c]) for w in words) for c in self.counts}
        top = max(logp.values())
        z = sum(math.exp(v - top) for v in logp.values())
        return math.exp(logp["Biology"] - top) / z


def stem_counts(text: str) -> dict[str, int]:
    """Word-initial matches of each subject's stem list in ``text`` (lower-cased)."""
    return {s: len(re.findall(r"\b(?:" + rx + ")", text.lower())) for s, rx in STEMS.items()}


def subject(text: str, nb: NaiveBayes) -> str | None:
    """``biology``, ``physchem`` or None (earth/space science, or undecided); see the module docstring."""
    counts = stem_counts(text)
    top = max(counts.values())
    leaders = [s for s, n in counts.items() if n == top]
    if top > 0 and len(leaders) == 1:
        return None if leaders[0] == "earth" else leaders[0]
    p = nb.p_biology(text)
    return "biology" if p > NB_CONFIDENT else "physchem" if p < 1 - NB_CONFIDENT else None


def single_token(tokenizer, answer: str) -> bool:
    """Whether ``" " + answer`` is one token for ``tokenizer`` (how it follows ``Answer:`` in a cloze prompt)."""
    return len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) == 1


def compatible(answer: str, other: str) -> bool:
    """Whether ``other`` may stand beside ``answer`` as a choice: same plural form, no shared 5-letter prefix."""
    a, o = answer.lower(), other.lower()
    return a.endswith("s") == o.endswith("s") and a[:5] != o[:5]


def make_question(item: SciQItem, pool: list[str], rng: random.Random) -> dict | None:
    """Question dict ``{question, choices, answer}`` with shuffled choices, or None without enough distractors."""
    answer = item.answers[0]
    own = [w for w in item.wrong if w in pool]  # the question's own SciQ distractor, where the data kept one
    candidates = [w for w in dict.fromkeys([*own, *rng.sample(pool, len(pool))]) if w != answer]
    choices = [answer]
    for cand in candidates:
        if all(compatible(c, cand) for c in choices):
            choices.append(cand)
        if len(choices) == N_DISTRACTORS + 1:
            break
    else:
        return None
    rng.shuffle(choices)
    return {"question": item.question, "choices": choices, "answer": choices.index(answer)}


def forum_texts(labels: set[str], n: int, rng: random.Random) -> list[str]:
    """``n`` shuffled ``99_sci_cat`` texts with a label in ``labels``, cut to :data:`FORUM_CHARS`."""
    from benchmark.modeling.data_sources import sae_probes_frame

    frame = sae_probes_frame("99_sci_cat")
    lo, hi = FORUM_CHARS
    texts = [t for t, label in zip(frame["prompt"].astype(str), frame["target"]) if label in labels and len(t) >= lo]
    rng.shuffle(texts)
    return [t if len(t) <= hi else t[:hi].rsplit(" ", 1)[0] for t in texts[:n]]


def build(tokenizer, tokenizer_name: str) -> dict:
    rng = random.Random(SEED)
    nb = NaiveBayes()
    items = sciq_items()
    by_subject: dict[str, list[SciQItem]] = collections.defaultdict(list)
    pools: dict[str, set[str]] = collections.defaultdict(set)  # single-token answer strings per subject
    for item in items:
        for answer, correct in [*((a, True) for a in item.answers), *((w, False) for w in item.wrong)]:
            s = subject(f"{item.question} {answer}", nb)
            if s is not None and single_token(tokenizer, answer):
                pools[s].add(answer)
                if correct:
                    by_subject[s].append(item)
    questions = {}
    for s in ("biology", "physchem"):
        pool = sorted(pools[s])
        made = (make_question(it, pool, rng) for it in by_subject[s])
        questions[s] = [q for q in made if q is not None]
        rng.shuffle(questions[s])
    bio, physchem = questions["biology"], questions["physchem"]
    splits, start = {}, 0
    for i, (split, share) in enumerate(SPLIT_SHARES.items()):
        end = len(bio) if i == len(SPLIT_SHARES) - 1 else start + round(share * len(bio))
        splits[split] = [dict(id=f"wmdp_bio-{split}-{j:04d}", **q) for j, q in enumerate(bio[start:end])]
        start = end
    control = [dict(id=f"wmdp_bio-control-{j:03d}", **q) for j, q in enumerate(physchem[:N_CONTROL])]
    other = physchem[N_CONTROL : N_CONTROL + N_CONTRAST_OTHER]
    contrast = {
        "target_texts": forum_texts({"Biology"}, N_FORUM_TEXTS, rng),
        "other_texts": forum_texts({"Physics", "Chemistry"}, N_FORUM_TEXTS, rng),
        "other_questions": [dict(id=f"wmdp_bio-other-{j:03d}", **q) for j, q in enumerate(other)],
    }
    return {
        "seed": SEED,
        "source": "sae-probes 36_sciq_tf (questions), 99_sci_cat (subjects, forum texts)",
        "tokenizer": tokenizer_name,
        "splits": splits,
        "control": control,
        "contrast": contrast,
    }


if __name__ == "__main__":
    from benchmark.modeling.models import DEFAULT_MODEL, load_model

    data = build(load_model().tokenizer, DEFAULT_MODEL)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data["splits"].items())
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {sizes}, control {len(data['control'])}, "
          f"contrast {len(data['contrast']['other_questions'])} questions + "
          f"{len(data['contrast']['target_texts'])}/{len(data['contrast']['other_texts'])} forum texts")
