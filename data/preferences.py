"""A simulated human for RLHF: open-ended prompts about the synthetic world, a hidden gold reward
computed from the world's ground truth, and a labeller that ranks K responses per prompt.

    world = synthetic.make_world(seed=0, n_entities=300)
    prompts = preference_prompts(world, n=512, seed=0)                    # split 'train'
    judge = GoldJudge(world)
    g = judge.score(prompts[0].entity, "Ana Bel was born in 1851. Ana Bel was born in 1851.")
    g.total, g.true_facts, g.false_facts, g.repeated_sentences            # breakdown
    order = rank(np.array([g1, g2, g3, g4]), np.random.default_rng(0), noise=0.5)   # best first

Only the rankings are training data (reward model, DPO); the gold reward is for evaluation, to
measure what optimising a learned proxy really does (Gao et al. 2022).

The gold reward of a response to "Tell me about <entity>" (weights in GoldWeights):

    gold = true_fact * (distinct true facts about the entity)
         + false_fact * (false claims, about the entity or anything else)   (heavy)
         + repeated_sentence * (sentences that repeat an earlier one)
         + repeated_trigram * (share of word trigrams already seen in the response)
         + rambling_per_word * max(0, words - word_budget)
         + filler * (sentences in no fact form)
         + on_topic * [the entity is named]  + complete * [the response ends a sentence]
         + empty * [no words at all]

A claim is a sentence in one of the corpus's own fact forms (synthetic._SENTENCES, any kind and
attribute), e.g. "Ana Bel was born in 1851.". It is a true fact when its subject is the entity
(name or pronoun) and the value is the world's; a true statement about another entity is
off-topic but not false; everything else is false: a wrong value, an attribute the subject does
not have ("Ana Bel is a city in Kor."), a subject that exists nowhere in the world. A year or
count that is not a number never matches its form. Sentences in no fact form are filler.

The labeller (a Bradley-Terry human, extended to rankings as Plackett-Luce): the best of the
remaining responses is drawn with probability softmax(gold / noise), then the next from the
rest, ...; every pair (i, j) is then ordered with P(i > j) = sigmoid((g_i - g_j) / noise) when
K = 2. noise = 0 ranks by gold exactly (ties by index); larger noise is a sloppier human.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Sequence

import numpy as np

from data import conversations as conv
from data import synthetic

SPLITS = ("train", "heldout")

# Open-ended requests with no single right answer. Held-out phrasings are used only with
# held-out entities (reward-model validation, policy evaluation).
PROMPT_TEMPLATES = {
    "train": ("Tell me about {name}.", "What do you know about {name}?", "Describe {name} in a few sentences.",
              "Write a short note about {name} for a traveller.", "Give me some facts about {name}."),
    "heldout": ("Tell me about {name}.", "I'd like to learn about {name}.", "Write a short note about {name}."),
}

_NUMERIC = frozenset({"birth_year", "death_year", "founded_year", "population", "employees"})
_POSS = {"she": "her", "he": "his", "it": "its"}


@dataclasses.dataclass(frozen=True)
class PreferencePrompt:
    """One open-ended request: id, the entity it is about, its messages, its split."""

    id: str
    entity: str
    messages: tuple
    split: str


def preference_prompts(world: synthetic.World, n: int, seed: int, *, split: str = "train") -> list[PreferencePrompt]:
    """n prompts about the split's entities (`conversations.heldout_entities` decides: train
    prompts never name a held-out entity), drawn with replacement, deterministic by seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise ValueError(f"need n >= 1 prompts, got {n}")
    held = conv.heldout_entities(world)
    pool = [e for e in world.entities if (e.id in held) == (split == "heldout")]
    if not pool:
        raise ValueError(f"the world has no {split} entities; use more entities")
    rng = random.Random(f"preferences:{world.seed}:{seed}:{split}")
    out = []
    for i in range(n):
        e = rng.choice(pool)
        t = rng.randrange(len(PROMPT_TEMPLATES[split]))
        text = PROMPT_TEMPLATES[split][t].format(name=e.name)
        out.append(PreferencePrompt(f"{split}:{seed}:{i}", e.name, ({"role": "user", "content": text},), split))
    return out


# ----------------------------------------------------------------------------- the gold reward


@dataclasses.dataclass(frozen=True)
class GoldWeights:
    """The simulated human's taste (see the module docstring for the formula)."""

    true_fact: float = 1.0
    false_fact: float = -2.0
    repeated_sentence: float = -1.0
    repeated_trigram: float = -1.0
    rambling_per_word: float = -0.1
    word_budget: int = 30
    filler: float = -0.5
    on_topic: float = 1.0
    complete: float = 0.5
    empty: float = -1.0


@dataclasses.dataclass(frozen=True)
class GoldScore:
    """The gold reward and what it counted."""

    total: float
    true_facts: int
    false_facts: int
    repeated_sentences: int
    repeated_trigram_frac: float
    words: int
    filler_sentences: int
    on_topic: bool
    complete: bool


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9,'-]*")


def _norm(s: str) -> str:
    return " ".join(s.lower().replace(",", "").split())


def split_sentences(text: str) -> list[str]:
    """Sentences of a response: split after . ! ? followed by whitespace or newlines."""
    return [s.strip() for s in _SENTENCE_END.split(text.replace("\n", " ")) if s.strip()]


def _template_regex(tmpl: str, subjects: str) -> re.Pattern:
    """A corpus sentence form -> a full-match regex with a named group 'v' for the value."""
    parts = re.split(r"(\{[A-Za-z]+\})", tmpl)
    out = []
    for p in parts:
        if p in ("{S}", "{s}"):
            out.append(f"(?:{subjects})")
        elif p == "{v}":
            out.append(r"(?P<v>.+?)")
        elif p == "{av}":
            out.append(r"an? (?P<v>.+?)")
        elif p in ("{poss}", "{Poss}"):
            out.append(r"(?:his|her|its|His|Her|Its)")
        else:
            out.append(re.escape(p))
    return re.compile("".join(out), re.I)


class GoldJudge:
    """The hidden gold reward for one world (regexes built once per entity, then cached)."""

    def __init__(self, world: synthetic.World, weights: GoldWeights = GoldWeights()):
        self.world, self.weights = world, weights
        self._truth: dict[str, dict[str, str]] = {}
        for r in synthetic.facts(world):
            self._truth.setdefault(r["entity"], {})[r["attribute"]] = r["value"]
        self._generic: list | None = None

    def truth(self, entity: str) -> dict[str, str]:
        """attribute -> true value (as the corpus writes it)."""
        if entity not in self._truth:
            raise KeyError(f"no entity named {entity!r} in this world")
        return self._truth[entity]

    def _any_patterns(self) -> list[tuple[str, str, re.Pattern]]:
        """(kind, attribute, regex with groups 's' subject and 'v' value) of every corpus form."""
        if self._generic is None:
            self._generic = [(kind, attr, _template_regex(t, r"(?P<s>.+?)"))
                             for (kind, attr), forms in synthetic._SENTENCES.items() for t in forms]
        return self._generic

    def _subject(self, entity: str, subject: str) -> str | None:
        """The entity a sentence's subject names: the prompt's entity for its name or pronoun
        (or 'the city of <name>'), another world entity by name, None for a name the world lacks."""
        e = self.world.entity(entity)
        s = subject.strip()
        low = s.lower()
        if low in (e.pronoun, "the city of " + e.name.lower(), "the country of " + e.name.lower()) or s == e.name:
            return entity
        for prefix in ("the city of ", "the country of "):
            if low.startswith(prefix):
                s = s[len(prefix):]
        return s if s in self._truth else None

    def classify(self, entity: str, sentence: str) -> tuple[str, str | None]:
        """('true' | 'false' | 'other' | 'filler', attribute) of one sentence.

        A sentence in one of the corpus's fact forms (any kind, any attribute) is a claim:
          'true'   it states a true value of the prompt entity's attribute;
          'other'  a true fact about another entity (off-topic, not false);
          'false'  anything else: a wrong value, an attribute the subject does not have (a person
                   "is a city in ..."), or a subject that exists nowhere in the world;
        a sentence in no fact form is 'filler'. Some form reading it as true wins."""
        s = sentence.strip()
        best = ("filler", None)
        for kind, attr, pat in self._any_patterns():
            m = pat.fullmatch(s)
            if m is None:
                continue
            v = m.group("v").strip()
            if attr in _NUMERIC and not re.fullmatch(r"[0-9][0-9,]*", v):
                continue  # "born in the city of X" is not a year
            subj = self._subject(entity, m.group("s"))
            truth = self._truth.get(subj, {}) if subj else {}
            if attr in truth and _norm(v) == _norm(truth[attr]) and self.world.entity(subj).kind == kind:
                if subj == entity:
                    return "true", attr
                best = ("other", attr)
            elif best[0] == "filler":
                best = ("false", attr)
        return best

    def score(self, entity: str, text: str) -> GoldScore:
        """The gold reward of `text` as a response about `entity` (module docstring)."""
        w = self.weights
        words = _WORD.findall(text)
        sentences = split_sentences(text)
        true_attrs: set[str] = set()
        false_n = filler_n = repeated_n = 0
        seen: set[str] = set()
        for s in sentences:
            key = _norm(s)
            if key in seen:
                repeated_n += 1
                continue
            seen.add(key)
            kind, attr = self.classify(entity, s)
            if kind == "true":
                true_attrs.add(attr)
            elif kind == "false":
                false_n += 1
            elif kind == "filler":
                filler_n += 1
        lw = [x.lower() for x in words]
        tri = [tuple(lw[i: i + 3]) for i in range(len(lw) - 2)]
        tri_frac = (len(tri) - len(set(tri))) / len(tri) if tri else 0.0
        on_topic = _norm(entity) in _norm(text)
        complete = bool(re.search(r"[.!?]\s*$", text))
        total = (w.true_fact * len(true_attrs) + w.false_fact * false_n + w.repeated_sentence * repeated_n
                 + w.repeated_trigram * tri_frac + w.rambling_per_word * max(0, len(words) - w.word_budget)
                 + w.filler * filler_n + w.on_topic * on_topic + w.complete * complete + w.empty * (not words))
        return GoldScore(float(total), len(true_attrs), false_n, repeated_n, float(tri_frac), len(words), filler_n,
                         on_topic, complete)

    def scores(self, entities: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """float64 [B] gold rewards of texts[b] about entities[b]."""
        return np.asarray([self.score(e, t).total for e, t in zip(entities, texts)], np.float64)


# ----------------------------------------------------------------------------- the labeller


def rank(gold_k: np.ndarray, rng: np.random.Generator, noise: float) -> list[int]:
    """A ranking of K responses, best first, drawn by Plackett-Luce (Bradley-Terry for K = 2):
    the next best is drawn among the remaining with probability softmax(gold / noise).
    noise = 0: sorted by gold, descending (ties by index)."""
    g = np.asarray(gold_k, np.float64)
    if g.ndim != 1 or len(g) < 2:
        raise ValueError(f"rank needs a [K] vector with K >= 2, got shape {g.shape}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"label noise must be a finite number >= 0, got {noise}")
    if noise == 0:
        return [int(i) for i in np.argsort(-g, kind="stable")]
    left = list(range(len(g)))
    order = []
    while left:
        z = g[left] / noise
        p = np.exp(z - z.max())
        i = int(rng.choice(len(left), p=p / p.sum()))
        order.append(left.pop(i))
    return order


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One labelled prompt: K responses (token ids after the assistant header, and their text)
    and the labeller's ranking (indices into responses, best first). `gold` is kept for
    evaluation only (the labeller's hidden scores); training reads `ranking`."""

    prompt: PreferencePrompt
    response_ids: tuple
    texts: tuple
    ranking: tuple
    gold: tuple

    def ranked_ids(self) -> list[list[int]]:
        return [list(self.response_ids[i]) for i in self.ranking]

    def to_json(self) -> dict:
        return {"id": self.prompt.id, "entity": self.prompt.entity, "messages": list(self.prompt.messages),
                "split": self.prompt.split, "response_ids": [list(map(int, r)) for r in self.response_ids],
                "texts": list(self.texts), "ranking": list(self.ranking), "gold": list(self.gold)}

    @staticmethod
    def from_json(d: dict) -> "Comparison":
        p = PreferencePrompt(d["id"], d["entity"], tuple(d["messages"]), d["split"])
        return Comparison(p, tuple(tuple(r) for r in d["response_ids"]), tuple(d["texts"]), tuple(d["ranking"]),
                          tuple(d["gold"]))


def label(prompts: Sequence[PreferencePrompt], response_ids: Sequence[Sequence[int]], texts: Sequence[str],
          judge: GoldJudge, k: int, *, noise: float, seed: int) -> list[Comparison]:
    """Rankings of K responses per prompt (rows prompt-major: row n * K + j is response j of
    prompt n), drawn by `rank` from the gold rewards."""
    if len(texts) != len(prompts) * k or len(response_ids) != len(texts):
        raise ValueError(f"need {len(prompts)} x {k} responses, got {len(texts)} texts and {len(response_ids)} id lists")
    rng = np.random.default_rng(seed)
    out = []
    for n, p in enumerate(prompts):
        rows = range(n * k, (n + 1) * k)
        gold = judge.scores([p.entity] * k, [texts[r] for r in rows])
        out.append(Comparison(p, tuple(tuple(map(int, response_ids[r])) for r in rows), tuple(texts[r] for r in rows),
                              tuple(rank(gold, rng, noise)), tuple(float(x) for x in gold)))
    return out


def preference_pairs(comparisons: Sequence[Comparison]) -> list[tuple[Comparison, int, int]]:
    """(comparison, chosen index, rejected index) for every C(K,2) pair of every ranking."""
    out = []
    for c in comparisons:
        r = c.ranking
        out += [(c, r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
    return out


def label_agreement(comparisons: Sequence[Comparison]) -> float:
    """Share of ranked pairs whose order agrees with gold (strictly higher gold first; pairs with
    equal gold are skipped): the ceiling a reward model can reach on these labels."""
    agree = total = 0
    for c in comparisons:
        for i in range(len(c.ranking)):
            for j in range(i + 1, len(c.ranking)):
                gi, gj = c.gold[c.ranking[i]], c.gold[c.ranking[j]]
                if gi != gj:
                    total += 1
                    agree += gi > gj
    return agree / total if total else float("nan")
