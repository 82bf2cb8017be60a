"""The synthetic world: a seeded, procedurally generated mini-internet.

Everything here is a pure function of its seeds and sizes, so two machines (or two runs) that
ask for the same corpus get the same bytes, and later experiments can look up the ground truth.

Five kinds of text are generated:

* an encyclopedia of fictional people, cities, countries and organisations. Entities come in
  tiers: `held_out` (never written about, never even named: what the model cannot know),
  `once` (one article), `few` (an article and two paraphrases), `popular` and `famous` (an
  article repeated verbatim 2-32 times, like mirrored Wikipedia pages, plus 6-12 paraphrases).
  The `edition` of a world lists every distinct document with its number of copies, and
  `facts(world)` counts how often each fact is stated (`times_seen`).
* grade-school math word problems in GSM8K's format (worked solution with `<<a*b=c>>`
  calculator annotations, final line `#### 13`), with a test split of unseen templates and
  unseen numbers that never appears in the corpus;
* arithmetic drills of graded difficulty (levels 1-8, up to 3x3-digit multiplication);
* text about the spelling and letters of common English words;
* pattern drills: lists whose lines all apply one rule (repeat, swap, capitalise, spell, join two
  numbers into `a*b`, ...) in one of many formats to fresh inputs (words, invented words or
  numbers of 1-6 digits), and sequences of words or numbers shown twice. They reward in-context
  learning the way web tables and exercise sheets do, and teach exact copying of digits (a
  calculator call's operands, a tool's output); none uses the '->' format of the few-shot
  evaluation.

Typical use::

    world = make_world(seed=0, n_entities=1000)
    corpus = Corpus(world, seed=0, max_bytes=100_000_000)   # random access, len(corpus) docs
    for text in iter_documents(world, seed=0, max_bytes=10**6): ...
    records = facts(world)                                 # ground truth for judges
    test = math_problems(seed=0, split="test", n=500)      # held-out problems for rewards

A corpus holds each encyclopedia document exactly `copies` times (one pass = one epoch);
the rest of its bytes are math, arithmetic, spelling and pattern documents in the ratio `mix`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

KINDS = ("person", "city", "country", "organisation")
TIERS = ("held_out", "once", "few", "popular", "famous")
_TIER_FRACTIONS = (0.15, 0.35, 0.30, 0.15, 0.05)
# tier -> (choices for the canonical article's copies, number of paraphrases)
_TIER_DOCS = {
    "held_out": ((0,), 0),
    "once": ((1,), 0),
    "few": ((1,), 2),
    "popular": ((2, 4, 8), 6),
    "famous": ((16, 32), 12),
}
_STYLES = ("article", "infobox", "qa", "list", "narrative")
_FILLER_KINDS = ("math", "arithmetic", "spelling", "patterns")

# ----------------------------------------------------------------------------------------------
# Names. Fictional words from syllables; every word is used for one purpose only, so a held-out
# entity's full name cannot turn up inside anyone else's text by accident.

_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n",
           "p", "pr", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x", "v", "sk", "lt")


class _Words:
    """Draws capitalised pseudo-words, never the same word twice."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._used: set[str] = set()

    def claim(self, word: str) -> bool:
        """Reserves a word made elsewhere (a language name); False if it is already taken."""
        key = word.lower()
        if key in self._used:
            return False
        self._used.add(key)
        return True

    def word(self, min_syl: int = 2, max_syl: int = 3) -> str:
        rng = self._rng
        for _ in range(1000):
            n = rng.randint(min_syl, max_syl)
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                        for _ in range(n))
            if 4 <= len(w) <= 12 and w not in self._used:
                self._used.add(w)
                return w.capitalize()
        raise RuntimeError("ran out of fresh names; this should not happen below 10M entities")


_OCCUPATIONS = ("painter", "chemist", "architect", "poet", "astronomer", "engineer", "composer",
                "sculptor", "physician", "botanist", "novelist", "mathematician", "cartographer",
                "historian", "inventor", "economist", "geologist", "philosopher", "explorer",
                "violinist", "photographer", "surgeon", "lawyer", "merchant", "actor")
_INDUSTRIES = ("shipbuilding", "textiles", "publishing", "banking", "railways", "glassmaking",
               "pharmaceuticals", "mining", "telegraphy", "brewing", "aviation", "clockmaking",
               "insurance", "printing", "steelmaking", "shipping", "optics", "porcelain")
_ORG_SUFFIXES = ("Industries", "Institute", "Company", "Foundation", "Works", "Trading Company",
                 "Press", "Bank", "Shipyards", "Laboratories", "Society", "Group", "Academy")
_LANGUAGE_SUFFIXES = ("ish", "ese", "ian", "ic", "i")
_CURRENCY_UNITS = ("crown", "mark", "florin", "shilling", "ducat", "thaler", "real")


@dataclasses.dataclass(frozen=True)
class Entity:
    """One fictional entity.

    Attributes:
      id: index into `World.entities`.
      kind: 'person' | 'city' | 'country' | 'organisation'.
      name: unique display name.
      attrs: attribute -> int or str value (years, populations, occupations, ...).
      links: attribute -> id of another entity (birthplace, country, capital, founder, ...).
      tier: one of TIERS; 'held_out' entities are never written about nor named.
      copies: how many verbatim copies of the canonical article the edition holds.
      n_paraphrases: how many further distinct documents are written about it.
      pronoun: 'she' | 'he' for people, 'it' otherwise.
    """

    id: int
    kind: str
    name: str
    attrs: dict
    links: dict
    tier: str
    copies: int
    n_paraphrases: int
    pronoun: str


@dataclasses.dataclass(frozen=True)
class EditionDoc:
    """One distinct encyclopedia document of a world's edition.

    Attributes:
      doc_id: index into `World.edition`.
      entity: entity id the document is about.
      variant: 0 is the canonical article (the one repeated verbatim); 1.. are paraphrases.
      copies: how many times this exact text appears in one pass over a corpus.
      nbytes: UTF-8 length of the text.
      attributes: the facts (attribute names) that the text states.
    """

    doc_id: int
    entity: int
    variant: int
    copies: int
    nbytes: int
    attributes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class World:
    """A generated world: its entities and the edition of encyclopedia documents about them."""

    seed: int
    entities: tuple[Entity, ...]
    edition: tuple[EditionDoc, ...]

    @property
    def held_out(self) -> tuple[Entity, ...]:
        return tuple(e for e in self.entities if e.tier == "held_out")

    def entity(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(f"no entity named {name!r} in this world")

    def document(self, doc_id: int) -> str:
        """Text of edition document `doc_id` (deterministic)."""
        d = self.edition[doc_id]
        return _render(self, self.entities[d.entity], d.variant)[0]

    @property
    def encyclopedia_bytes(self) -> int:
        """Bytes of one pass over the edition (every copy counted)."""
        return sum(d.nbytes * d.copies for d in self.edition)


def _rng(*parts: int) -> random.Random:
    """A Random seeded by integer parts; cheap (~4 us) so every document gets its own."""
    x = 0
    for p in parts:
        x = (x * 0x9E3779B1 + (p & 0xFFFFFFFFFFFF) + 1) & 0xFFFFFFFFFFFFFFFF
    return random.Random(x)


_TAG_WORLD, _TAG_RENDER, _TAG_CORPUS, _TAG_FILL, _TAG_MATH, _TAG_ARITH, _TAG_SPELL = range(7)


def make_world(seed: int, n_entities: int = 1000) -> World:
    """Generates a world of about `n_entities` entities (a pure function of its arguments).

    Args:
      seed: any int.
      n_entities: total entities; split ~4% countries, 24% cities, 18% organisations, rest people.
        At least 20.
    Returns:
      World, with its edition rendered once to count bytes and facts stated.
    """
    if n_entities < 20:
        raise ValueError(f"n_entities must be >= 20, got {n_entities}")
    rng = _rng(seed, _TAG_WORLD)
    words = _Words(rng)
    n_countries = max(3, n_entities // 25)
    n_cities = max(6, (n_entities * 24) // 100)
    n_orgs = max(3, (n_entities * 18) // 100)
    n_people = n_entities - n_countries - n_cities - n_orgs

    continents = [words.word(2, 3) for _ in range(4)]
    rivers = [words.word(2, 2) + " River" for _ in range(max(3, n_cities // 3))]
    first_names = [words.word(2, 2) for _ in range(max(12, int(n_people ** 0.5) * 2))]
    last_names = [words.word(2, 3) for _ in range(max(12, int(n_people ** 0.5) * 2))]

    raw: list[dict[str, Any]] = []  # kind, name, attrs, links, pronoun

    def add(kind, name, attrs, links, pronoun="it"):
        raw.append(dict(kind=kind, name=name, attrs=attrs, links=links, pronoun=pronoun))
        return len(raw) - 1

    countries = []
    for _ in range(n_countries):
        while True:  # a language name must not be some other entity's name
            name = words.word(2, 3)
            suffixes = rng.sample(_LANGUAGE_SUFFIXES, len(_LANGUAGE_SUFFIXES))
            language = next((name + suf for suf in suffixes if words.claim(name + suf)), None)
            if language:
                break
        countries.append(add("country", name, {
            "continent": rng.choice(continents),
            "language": language,
            "population": rng.randint(500, 90_000) * 1000,
            "currency": words.word(2, 2) + " " + rng.choice(_CURRENCY_UNITS),
        }, {}))
    cities = []
    for i in range(n_cities):
        country = countries[i] if i < n_countries else rng.choice(countries)
        city = add("city", words.word(2, 3), {
            "population": rng.randint(50, 50_000) * 100,
            "founded_year": rng.randint(700, 1890),
            "river": rng.choice(rivers),
        }, {"country": country})
        cities.append(city)
        if i < n_countries:  # the first city of each country is its capital
            raw[country]["links"]["capital"] = city
    used_names = set()
    people = []
    for _ in range(n_people):
        while True:
            name = rng.choice(first_names) + " " + rng.choice(last_names)
            if name not in used_names:
                used_names.add(name)
                break
        birth = rng.randint(1750, 1990)
        attrs = {"birth_year": birth, "occupation": rng.choice(_OCCUPATIONS)}
        if birth + 95 < 2020 or rng.random() < 0.5 and birth < 1960:
            attrs["death_year"] = min(2020, birth + rng.randint(35, 95))
        people.append(add("person", name, attrs, {"birthplace": rng.choice(cities)},
                          pronoun=rng.choice(("she", "he"))))
    orgs = []
    founders = rng.sample(people, min(n_orgs, len(people)))
    for i in range(n_orgs):
        founder = founders[i % len(founders)]
        founded = raw[founder]["attrs"]["birth_year"] + rng.randint(22, 50)
        orgs.append(add("organisation", words.word(2, 3) + " " + rng.choice(_ORG_SUFFIXES), {
            "founded_year": founded,
            "industry": rng.choice(_INDUSTRIES),
            "employees": rng.choice((rng.randint(20, 999), rng.randint(1, 200) * 1000)),
        }, {"founder": founder, "headquarters": rng.choice(cities)}))
    for p in people:
        birth = raw[p]["attrs"]["birth_year"]
        if rng.random() < 0.4:
            options = [o for o in rng.sample(orgs, min(8, len(orgs)))
                       if raw[o]["attrs"]["founded_year"] <= birth + 40 and raw[o]["links"]["founder"] != p]
            if options:
                raw[p]["links"]["employer"] = options[0]

    # Tiers are drawn per kind, so every kind has held-out, rare and famous members.
    tiers = ["once"] * len(raw)
    for kind in KINDS:
        ids = [i for i, r in enumerate(raw) if r["kind"] == kind]
        rng.shuffle(ids)
        start = 0
        for tier, frac in zip(TIERS, _TIER_FRACTIONS):
            count = int(round(frac * len(ids)))
            for i in ids[start:start + count]:
                tiers[i] = tier
            start += count
    entities = []
    for i, r in enumerate(raw):
        copy_choices, n_para = _TIER_DOCS[tiers[i]]
        entities.append(Entity(id=i, kind=r["kind"], name=r["name"], attrs=r["attrs"],
                               links=r["links"], tier=tiers[i], copies=rng.choice(copy_choices),
                               n_paraphrases=n_para, pronoun=r["pronoun"]))
    world = World(seed=seed, entities=tuple(entities), edition=())
    edition = []
    for e in entities:
        if e.tier == "held_out":
            continue
        # Paraphrases that happen to equal an earlier text are skipped, so that `copies` is the
        # exact number of times each distinct text occurs (regurgitation studies rely on it).
        texts: set[str] = set()
        variant = 0
        while len(texts) < 1 + e.n_paraphrases and variant < 20 * (1 + e.n_paraphrases):
            text, attributes = _render(world, e, variant)
            if text not in texts:
                texts.add(text)
                edition.append(EditionDoc(doc_id=len(edition), entity=e.id, variant=variant,
                                          copies=e.copies if variant == 0 else 1,
                                          nbytes=len(text.encode()), attributes=attributes))
            variant += 1
    return dataclasses.replace(world, edition=tuple(edition))


# ----------------------------------------------------------------------------------------------
# Rendering encyclopedia documents. Templates: {S} subject at sentence start, {s} elsewhere,
# {v} value, {av} value with its indefinite article, {poss} possessive pronoun.

_SENTENCES: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "birth_year"): ("{S} was born in {v}.", "{S} was born in the year {v}.",
                               "In {v}, {s} was born.", "{Poss} year of birth is {v}."),
    ("person", "death_year"): ("{S} died in {v}.", "{S} passed away in {v}.", "In {v}, {s} died.",
                               "{Poss} death came in {v}."),
    ("person", "birthplace"): ("{S} was born in the city of {v}.", "{S} is a native of {v}.",
                               "{Poss} birthplace was {v}.", "{S} came into the world in {v}."),
    ("person", "occupation"): ("{S} worked as {av}.", "{S} was {av} by profession.",
                               "By trade, {s} was {av}.", "{S} is remembered as {av}."),
    ("person", "employer"): ("{S} worked for {v}.", "{S} was employed by {v}.",
                             "For much of {poss} career, {s} worked at {v}.",
                             "{S} spent many years at {v}."),
    ("city", "country"): ("{S} is a city in {v}.", "{S} lies in the country of {v}.",
                          "{S} is located in {v}.", "The city of {s} is part of {v}."),
    ("city", "population"): ("{S} has a population of {v}.", "About {v} people live in {s}.",
                             "The population of {s} is {v}.", "{S} is home to {v} people."),
    ("city", "founded_year"): ("{S} was founded in {v}.", "The city of {s} was founded in {v}.",
                               "In {v}, settlers founded {s}.", "{S} dates back to {v}."),
    ("city", "river"): ("{S} sits on the banks of the {v}.", "The {v} flows through {s}.",
                        "{S} was built along the {v}.", "{S} is a city on the {v}."),
    ("country", "capital"): ("The capital of {s} is {v}.", "{S} has its capital at {v}.",
                             "{v} is the capital city of {s}.", "{S} is governed from {v}, its capital."),
    ("country", "continent"): ("{S} is a country in {v}.", "{S} lies on the continent of {v}.",
                               "{S} is located in {v}.", "The country of {s} is part of {v}."),
    ("country", "language"): ("The official language of {s} is {v}.", "People in {s} speak {v}.",
                              "{S} is a {v}-speaking country.", "{v} is the language of {s}."),
    ("country", "population"): ("{S} has a population of {v}.", "About {v} people live in {s}.",
                                "The population of {s} is {v}.", "{S} is home to {v} people."),
    ("country", "currency"): ("The currency of {s} is the {v}.", "{S} pays in the {v}.",
                              "In {s}, people pay with the {v}.", "{S} uses the {v} as its money."),
    ("organisation", "founder"): ("{S} was founded by {v}.", "{v} founded {s}.",
                                  "The founder of {s} was {v}.", "{S} owes its existence to {v}, its founder."),
    ("organisation", "founded_year"): ("{S} was founded in {v}.", "{S} was established in {v}.",
                                       "In {v}, {s} opened its doors.", "{S} dates back to {v}."),
    ("organisation", "headquarters"): ("{S} is headquartered in {v}.", "The headquarters of {s} are in {v}.",
                                       "{S} has its main offices in {v}.", "{S} is based in {v}."),
    ("organisation", "industry"): ("{S} works in {v}.", "{S} is a {v} business.",
                                   "The main trade of {s} is {v}.", "{S} made its name in {v}."),
    ("organisation", "employees"): ("{S} employs {v} people.", "{S} has {v} employees.",
                                    "About {v} people work for {s}.", "The staff of {s} numbers {v}."),
}
QUESTIONS: dict[tuple[str, str], str] = {
    ("person", "birth_year"): "In what year was {s} born?",
    ("person", "death_year"): "In what year did {s} die?",
    ("person", "birthplace"): "In which city was {s} born?",
    ("person", "occupation"): "What was {s}'s occupation?",
    ("person", "employer"): "Which organisation did {s} work for?",
    ("city", "country"): "In which country is the city of {s}?",
    ("city", "population"): "What is the population of {s}?",
    ("city", "founded_year"): "In what year was the city of {s} founded?",
    ("city", "river"): "Which river flows through {s}?",
    ("country", "capital"): "What is the capital of {s}?",
    ("country", "continent"): "On which continent is {s}?",
    ("country", "language"): "What is the official language of {s}?",
    ("country", "population"): "What is the population of {s}?",
    ("country", "currency"): "What is the currency of {s}?",
    ("organisation", "founder"): "Who founded {s}?",
    ("organisation", "founded_year"): "In what year was {s} founded?",
    ("organisation", "headquarters"): "In which city is {s} headquartered?",
    ("organisation", "industry"): "In which industry does {s} work?",
    ("organisation", "employees"): "How many people does {s} employ?",
}
_LABELS = {"birth_year": "Born", "death_year": "Died", "birthplace": "Birthplace",
           "occupation": "Occupation", "employer": "Employer", "country": "Country",
           "population": "Population", "founded_year": "Founded", "river": "River",
           "capital": "Capital", "continent": "Continent", "language": "Language",
           "currency": "Currency", "founder": "Founder", "headquarters": "Headquarters",
           "industry": "Industry", "employees": "Employees"}
_ATTR_ORDER = {
    "person": ("occupation", "birth_year", "birthplace", "employer", "death_year"),
    "city": ("country", "population", "founded_year", "river"),
    "country": ("continent", "capital", "population", "language", "currency"),
    "organisation": ("industry", "founded_year", "founder", "headquarters", "employees"),
}
_KIND_WORD = {"person": "person", "city": "city", "country": "country", "organisation": "organisation"}
_NARRATIVE_OPENERS = ("Here is a short profile of {n}.", "Few people outside the region know much about {n}.",
                      "Readers often ask us about {n}.", "This page collects what is known about {n}.",
                      "A brief note on {n}.")
_POSS = {"she": "her", "he": "his", "it": "its"}


def _value(world: World, e: Entity, attr: str) -> str:
    if attr in e.links:
        return world.entities[e.links[attr]].name
    v = e.attrs[attr]
    if attr in ("population", "employees"):
        return f"{v:,}"
    return str(v)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def fact_attributes(world: World, e: Entity) -> tuple[str, ...]:
    """Attributes of `e` that documents may state: all but links to held-out entities."""
    return tuple(a for a in _ATTR_ORDER[e.kind]
                 if (a in e.attrs or a in e.links)
                 and not (a in e.links and world.entities[e.links[a]].tier == "held_out"))


def _render(world: World, e: Entity, variant: int) -> tuple[str, tuple[str, ...]]:
    """Renders document `variant` about `e`. Returns (text, attributes stated)."""
    rng = _rng(world.seed, _TAG_RENDER, e.id, variant)
    available = fact_attributes(world, e)
    if variant == 0:
        style, attrs = "article", list(available)
    else:
        style = rng.choice(_STYLES)
        attrs = [a for a in available if rng.random() < 0.75] or list(available[:2])
        rng.shuffle(attrs)
    name, pron = e.name, e.pronoun
    poss = _POSS[pron]
    if style == "infobox":
        lines = [name, f"Type: {_KIND_WORD[e.kind]}"]
        lines += [f"{_LABELS[a]}: {_value(world, e, a)}" for a in attrs]
        return "\n".join(lines) + "\n", tuple(attrs)
    sentences = []
    for i, a in enumerate(attrs):
        v = _value(world, e, a)
        tmpl = rng.choice(_SENTENCES[(e.kind, a)])
        # Later sentences may refer to the subject by pronoun, but only at a sentence start.
        subj = pron if (i > 0 and style != "qa" and tmpl.startswith("{S} ") and rng.random() < 0.5) else name
        sentences.append(tmpl.format(S=subj[0].upper() + subj[1:], s=subj, v=v,
                                     av=_article(v) if a == "occupation" else v,
                                     poss=poss, Poss=poss.capitalize()))
    if style == "article":
        return f"{name}\n\n" + " ".join(sentences) + "\n", tuple(attrs)
    if style == "qa":
        parts = [f"Questions and answers about {name}\n"]
        for a, sent in zip(attrs, sentences):
            parts.append("Q: " + QUESTIONS[(e.kind, a)].format(s=name) + "\nA: " + sent)
        return "\n".join(parts) + "\n", tuple(attrs)
    if style == "list":
        return f"Facts about {name}:\n" + "".join(f"- {s}\n" for s in sentences), tuple(attrs)
    opener = rng.choice(_NARRATIVE_OPENERS).format(n=name)
    return opener + " " + " ".join(sentences) + "\n", tuple(attrs)


def facts(world: World) -> list[dict]:
    """Ground truth for judges and knowledge probes: one record per (entity, attribute).

    Returns:
      list of dicts with keys entity, entity_type, attribute, value, question, times_seen (how
      many documents in one pass over a corpus state this fact, copies counted), held_out
      (the entity is never named in training text), tier, canonical_copies.
    """
    seen: dict[tuple[int, str], int] = {}
    for d in world.edition:
        for a in d.attributes:
            seen[(d.entity, a)] = seen.get((d.entity, a), 0) + d.copies
    records = []
    for e in world.entities:
        for a in _ATTR_ORDER[e.kind]:
            if a not in e.attrs and a not in e.links:
                continue
            records.append(dict(entity=e.name, entity_type=e.kind, attribute=a,
                                value=_value(world, e, a),
                                question=QUESTIONS[(e.kind, a)].format(s=e.name),
                                times_seen=seen.get((e.id, a), 0), held_out=e.tier == "held_out",
                                tier=e.tier, canonical_copies=e.copies))
    return records


def documents_manifest(world: World, with_text: bool = True) -> list[dict]:
    """Every distinct encyclopedia document: doc_id, entity, variant, copies, attributes (, text).

    `copies` > 1 marks verbatim repeats, for regurgitation-vs-times-seen experiments.
    """
    out = []
    for d in world.edition:
        rec = dict(doc_id=d.doc_id, entity=world.entities[d.entity].name, variant=d.variant,
                   copies=d.copies, attributes=list(d.attributes), nbytes=d.nbytes)
        if with_text:
            rec["text"] = world.document(d.doc_id)
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# Grade-school math in GSM8K's format.

_PEOPLE = ("Emily", "Jack", "Sofia", "Liam", "Olivia", "Noah", "Ava", "Mason", "Mia", "Lucas",
           "Chloe", "Ethan", "Grace", "Owen", "Zoe", "Leo", "Nora", "Ben", "Ella", "Sam", "Ruby",
           "Max", "Lily", "Adam", "Hannah", "Omar", "Priya", "Mateo", "Yuki", "Amara")
_PRONOUN = {n: ("she" if n in ("Emily", "Sofia", "Olivia", "Ava", "Mia", "Chloe", "Grace", "Nora",
                              "Ella", "Ruby", "Lily", "Hannah", "Priya", "Yuki", "Amara", "Zoe")
                else "he") for n in _PEOPLE}
_PRODUCTS = ("jacket", "bicycle", "lamp", "backpack", "board game", "telescope", "guitar", "scooter",
             "pair of boots", "watch", "tent", "camera")
_ITEMS = (("apple", "apples"), ("orange", "oranges"), ("pencil", "pencils"),
          ("notebook", "notebooks"), ("sticker", "stickers"), ("cookie", "cookies"),
          ("marble", "marbles"), ("book", "books"), ("candle", "candles"), ("toy car", "toy cars"),
          ("cupcake", "cupcakes"), ("balloon", "balloons"), ("shell", "shells"), ("card", "cards"))


def _calc(a: int, op: str, b: int) -> tuple[int, str]:
    """Computes `a op b` and its GSM8K-style annotated text 'a*b = <<a*b=c>>c'."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a}/{b} is not exact")
        c = a // b
    else:
        raise ValueError(op)
    return c, f"{a}{op}{b} = <<{a}{op}{b}={c}>>{c}"


def _two_items(rng):
    return rng.sample(_ITEMS, 2)


def _t_inverse_price(rng):
    name = rng.choice(_PEOPLE)
    (i1, i1s), (i2, i2s) = _two_items(rng)
    a, b, p1, p2 = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 12)
    total = a * p1 + b * p2
    x, s1 = _calc(b, "*", p2)
    y, s2 = _calc(total, "-", x)
    z, s3 = _calc(y, "/", a)
    q = (f"{name} buys {a} {i1s} and {b} {i2s}. Each {i2} costs ${p2}. The total cost is ${total}. "
         f"What is the cost of each {i1}?")
    steps = [f"The {i2s} cost {s1} dollars.", f"So the {i1s} cost {s2} dollars.",
             f"Each {i1} costs {s3} dollars."]
    return (a, b, p1, p2), q, steps, z


def _t_total_cost(rng):
    name = rng.choice(_PEOPLE)
    (i1, i1s), (i2, i2s) = _two_items(rng)
    a, b, p1, p2 = rng.randint(2, 15), rng.randint(2, 15), rng.randint(1, 20), rng.randint(1, 20)
    x, s1 = _calc(a, "*", p1)
    y, s2 = _calc(b, "*", p2)
    z, s3 = _calc(x, "+", y)
    q = (f"{name} buys {a} {i1s} for ${p1} each and {b} {i2s} for ${p2} each. "
         f"How much does {name} spend in total?")
    return (a, b, p1, p2), q, [f"The {i1s} cost {s1} dollars.", f"The {i2s} cost {s2} dollars.",
                               f"In total {name} spends {s3} dollars."], z


def _t_half_as_many(rng):
    name = rng.choice(_PEOPLE)
    _, things = rng.choice(_ITEMS)
    a = 2 * rng.randint(5, 60)
    m1, m2 = rng.choice((("April", "May"), ("June", "July"), ("March", "April"), ("May", "June")))
    x, s1 = _calc(a, "/", 2)
    y, s2 = _calc(a, "+", x)
    q = (f"{name} sold {a} {things} in {m1}, and then sold half as many {things} in {m2}. "
         f"How many {things} did {name} sell altogether in {m1} and {m2}?")
    return (a,), q, [f"In {m2}, {name} sold {s1} {things}.",
                     f"Altogether {name} sold {s2} {things}."], y


def _t_wage(rng):
    name = rng.choice(_PEOPLE)
    pron = _PRONOUN[name]
    r, h, d = rng.randint(8, 40), rng.randint(2, 10), rng.randint(2, 7)
    x, s1 = _calc(r, "*", h)
    y, s2 = _calc(x, "*", d)
    q = (f"{name} earns ${r} an hour. {pron.capitalize()} works {h} hours a day for {d} days. "
         f"How much money does {pron} earn?")
    return (r, h, d), q, [f"Each day {pron} earns {s1} dollars.",
                          f"Over {d} days {pron} earns {s2} dollars."], y


def _t_give_away(rng):
    name = rng.choice(_PEOPLE)
    pron = _PRONOUN[name]
    _, things = rng.choice(_ITEMS)
    b, k = rng.randint(2, 9), rng.randint(2, 8)
    a = b * k + rng.randint(1, 40)
    x, s1 = _calc(b, "*", k)
    y, s2 = _calc(a, "-", x)
    q = (f"{name} has {a} {things}. {pron.capitalize()} gives {b} {things} to each of {k} friends. "
         f"How many {things} does {name} have left?")
    return (a, b, k), q, [f"{name} gives away {s1} {things}.", f"{name} has {s2} {things} left."], y


def _t_ages(rng):
    n1, n2 = rng.sample(_PEOPLE, 2)
    a, b, c = rng.randint(4, 40), rng.randint(2, 30), rng.randint(2, 20)
    x, s1 = _calc(a, "+", b)
    y, s2 = _calc(x, "+", c)
    q = (f"{n1} is {a} years old. {n2} is {b} years older than {n1}. "
         f"How old will {n2} be in {c} years?")
    return (a, b, c), q, [f"{n2} is {s1} years old now.", f"In {c} years {n2} will be {s2} years old."], y


def _t_train(rng):
    v1, h1, v2, h2 = rng.randint(3, 12) * 5, rng.randint(2, 6), rng.randint(3, 12) * 5, rng.randint(1, 5)
    x, s1 = _calc(v1, "*", h1)
    y, s2 = _calc(v2, "*", h2)
    z, s3 = _calc(x, "+", y)
    q = (f"A train travels at {v1} miles per hour for {h1} hours, then at {v2} miles per hour for "
         f"{h2} hours. How many miles does the train travel in total?")
    return (v1, h1, v2, h2), q, [f"First it travels {s1} miles.", f"Then it travels {s2} miles.",
                                 f"In total it travels {s3} miles."], z


def _t_packs(rng):
    name = rng.choice(_PEOPLE)
    pron = _PRONOUN[name]
    _, things = rng.choice(_ITEMS)
    p, k = rng.randint(2, 12), rng.randint(3, 24)
    u = rng.randint(1, p * k - 1)
    x, s1 = _calc(p, "*", k)
    y, s2 = _calc(x, "-", u)
    q = (f"{name} buys {p} packs of {things}. Each pack has {k} {things}. {pron.capitalize()} uses "
         f"{u} of them. How many {things} are left?")
    return (p, k, u), q, [f"{name} has {s1} {things} in total.", f"{s2} {things} are left."], y


def _t_discount(rng):
    item = rng.choice(_PRODUCTS)
    pct = rng.choice((10, 20, 25, 50, 30, 40))
    price = rng.randint(1, 40) * 20
    x, s1 = _calc(price * pct, "/", 100)
    y, s2 = _calc(price, "-", x)
    q = (f"A {item} costs ${price}. It is on sale for {pct}% off. "
         f"How much does the {item} cost on sale?")
    return (price, pct), q, [f"The discount is {price}*{pct}/100 = <<{price}*{pct}/100={x}>>{x} dollars.",
                             f"The sale price is {s2} dollars."], y


def _t_savings(rng):
    name = rng.choice(_PEOPLE)
    pron = _PRONOUN[name]
    item = rng.choice(_PRODUCTS)
    w, weeks, s = rng.randint(2, 25), rng.randint(2, 20), rng.randint(0, 60)
    c = s + w * weeks
    x, s1 = _calc(c, "-", s)
    y, s2 = _calc(x, "/", w)
    q = (f"{name} wants to buy a {item} that costs ${c}. {pron.capitalize()} has ${s} "
         f"saved and saves ${w} each week. How many weeks will it take to have enough money?")
    return (w, weeks, s), q, [f"{name} still needs {s1} dollars.", f"That takes {s2} weeks."], y


def _t_garden(rng):
    r, k = rng.randint(3, 20), rng.randint(4, 25)
    d = rng.randint(1, r * k - 1)
    x, s1 = _calc(r, "*", k)
    y, s2 = _calc(x, "-", d)
    q = (f"A garden has {r} rows with {k} tomato plants in each row. {d} plants died. "
         f"How many tomato plants are left?")
    return (r, k, d), q, [f"The garden had {s1} plants.", f"There are {s2} plants left."], y


def _t_fraction(rng):
    num, den = rng.choice(((1, 2), (1, 3), (1, 4), (2, 5), (3, 4), (2, 3), (1, 5)))
    n = den * rng.randint(4, 12)
    x, s1 = _calc(n, "/", den)
    y, s2 = _calc(x, "*", num)
    z, s3 = _calc(n, "-", y)
    q = (f"There are {n} students in a class. {num}/{den} of them walk to school and the rest "
         f"take the bus. How many students take the bus?")
    return (n, num, den), q, [f"One part is {s1} students.", f"{s2} students walk to school.",
                              f"So {s3} students take the bus."], z


# Held-out templates: appear only in the test split, never in any corpus.
def _t_bakery(rng):
    a, k = rng.randint(2, 9), rng.randint(6, 24)
    s = rng.randint(1, a * k // 2)
    g = rng.randint(0, a * k - s - 1)
    x, s1 = _calc(a, "*", k)
    y, s2 = _calc(x, "-", s)
    z, s3 = _calc(y, "-", g)
    q = (f"A baker makes {a} trays of muffins with {k} muffins on each tray. She sells {s} muffins "
         f"and gives away {g}. How many muffins remain?")
    return (a, k, s, g), q, [f"She makes {s1} muffins.", f"After selling she has {s2} muffins.",
                             f"After giving some away {s3} muffins remain."], z


def _t_tickets(rng):
    a, c, x, y = rng.randint(8, 30), rng.randint(3, 15), rng.randint(1, 4), rng.randint(1, 5)
    total = a * x + c * y
    bill = (total // 50 + 1) * 50
    p, s1 = _calc(a, "*", x)
    r, s2 = _calc(c, "*", y)
    t, s3 = _calc(p, "+", r)
    ch, s4 = _calc(bill, "-", t)
    q = (f"Adult tickets cost ${a} and child tickets cost ${c}. A family buys {x} adult tickets and "
         f"{y} child tickets and pays with ${bill}. How much change do they get?")
    return (a, c, x, y), q, [f"Adult tickets cost {s1} dollars.", f"Child tickets cost {s2} dollars.",
                             f"Together they cost {s3} dollars.", f"The change is {s4} dollars."], ch


def _t_fence(rng):
    length, width, c = rng.randint(5, 60), rng.randint(5, 60), rng.randint(2, 15)
    x, s1 = _calc(length, "+", width)
    y, s2 = _calc(x, "*", 2)
    z, s3 = _calc(y, "*", c)
    q = (f"A rectangular yard is {length} feet long and {width} feet wide. Fencing costs ${c} per "
         f"foot. How much does it cost to put a fence around the whole yard?")
    return (length, width, c), q, [f"Length plus width is {s1} feet.", f"The perimeter is {s2} feet.",
                                   f"The fence costs {s3} dollars."], z


def _t_reading(rng):
    name = rng.choice(_PEOPLE)
    pron = _PRONOUN[name]
    m, k, d = rng.randint(5, 40), rng.randint(2, 4), rng.randint(5, 50)
    total = m + k * m + d
    x, s1 = _calc(total, "-", d)
    y, s2 = _calc(1, "+", k)
    z, s3 = _calc(x, "/", y)
    q = (f"{name} read some pages on Monday. On Tuesday {pron} read {k} times as many pages as on "
         f"Monday, and on Wednesday {pron} read {d} pages. {pron.capitalize()} read {total} pages in "
         f"all. How many pages did {name} read on Monday?")
    return (m, k, d), q, [f"Monday and Tuesday together make {s1} pages.",
                          f"Tuesday is {k} Mondays, so that is {s2} Mondays.",
                          f"On Monday {name} read {s3} pages."], z


_TRAIN_TEMPLATES = {f.__name__[3:]: f for f in (
    _t_inverse_price, _t_total_cost, _t_half_as_many, _t_wage, _t_give_away, _t_ages, _t_train,
    _t_packs, _t_discount, _t_savings, _t_garden, _t_fraction)}
_TEST_TEMPLATES = {f.__name__[3:]: f for f in (_t_bakery, _t_tickets, _t_fence, _t_reading)}
MATH_TRAIN_TEMPLATES = tuple(_TRAIN_TEMPLATES)
MATH_TEST_TEMPLATES = tuple(_TEST_TEMPLATES)


def _is_test_numbers(template: str, nums: tuple) -> bool:
    """One in eight number tuples of each train template is reserved for the test split."""
    return zlib.crc32(f"{template}:{nums}".encode()) % 8 == 0


def _math_problem(rng: random.Random, split: str) -> dict:
    if split == "test" and rng.random() < 0.5:
        name = rng.choice(MATH_TEST_TEMPLATES)
        nums, q, steps, ans = _TEST_TEMPLATES[name](rng)
    else:
        name = rng.choice(MATH_TRAIN_TEMPLATES)
        want_test = split == "test"
        while True:
            nums, q, steps, ans = _TRAIN_TEMPLATES[name](rng)
            if _is_test_numbers(name, nums) == want_test:
                break
    solution = "\n".join(steps) + f"\n#### {ans}"
    return dict(question=q, solution=solution, answer=str(ans), template=name, split=split)


def math_problems(seed: int, split: str = "train", n: int = 100) -> list[dict]:
    """GSM8K-format word problems.

    Args:
      seed: any int.
      split: 'train' (the templates and number tuples the corpus uses) or 'test' (half unseen
        templates, half seen templates with number tuples that the train split never draws).
      n: number of problems.
    Returns:
      list of dicts: question, solution (worked steps with <<a*b=c>> annotations, last line
      '#### answer'), answer (str of an int), template, split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [_math_problem(_rng(seed, _TAG_MATH, split == "test", i), split) for i in range(n)]


_MATH_FORMATS = ("Question: {q}\nAnswer: {s}\n", "Problem: {q}\nSolution:\n{s}\n", "{q}\n{s}\n",
                 "Q: {q}\nA: {s}\n")


def _math_document(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        p = _math_problem(rng, "train")
        parts.append(rng.choice(_MATH_FORMATS).format(q=p["question"], s=p["solution"]))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Arithmetic of graded difficulty: level -> (digits of a, digits of b, operators).

ARITHMETIC_LEVELS = {1: (1, 1, "+"), 2: (2, 2, "+-"), 3: (3, 3, "+-"), 4: (1, 1, "*"),
                     5: (2, 1, "*"), 6: (2, 2, "*"), 7: (3, 2, "*"), 8: (3, 3, "*")}


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _arith(rng: random.Random, level: int) -> tuple[int, str, int, int]:
    da, db, ops = ARITHMETIC_LEVELS[level]
    a, b, op = _operand(rng, da), _operand(rng, db), rng.choice(ops)
    if op == "-" and b > a:
        a, b = b, a
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return a, op, b, c


def arithmetic_problems(seed: int, n: int = 100, level: int | None = None) -> list[dict]:
    """Arithmetic questions: dicts with question, expression ('47*36'), answer (str), level.

    Args:
      level: 1-8 (see ARITHMETIC_LEVELS) or None for a uniform mix.
    """
    if level is not None and level not in ARITHMETIC_LEVELS:
        raise ValueError(f"level must be one of {sorted(ARITHMETIC_LEVELS)} or None, got {level}")
    out = []
    for i in range(n):
        rng = _rng(seed, _TAG_ARITH, i)
        lv = level or rng.randint(1, 8)
        a, op, b, c = _arith(rng, lv)
        out.append(dict(question=f"What is {a} {op} {b}?", expression=f"{a}{op}{b}",
                        answer=str(c), level=lv))
    return out


def _worked_multiplication(a: int, b: int) -> str:
    """'47 * 36 = 47 * 30 + 47 * 6 = 1410 + 282 = 1692': partial products by digit of b."""
    digits = [int(ch) * 10 ** k for k, ch in enumerate(reversed(str(b))) if ch != "0"][::-1]
    if len(digits) < 2:
        return f"{a} * {b} = {a * b}"
    terms = " + ".join(f"{a} * {d}" for d in digits)
    partial = " + ".join(str(a * d) for d in digits)
    return f"{a} * {b} = {terms} = {partial} = {a * b}"


def _arithmetic_document(rng: random.Random) -> str:
    level = rng.randint(1, 8)
    title = rng.choice(("Practice set, level {l}", "Arithmetic drill ({l} of 8)",
                        "Exercises: level {l}")).format(l=level)
    lines = [title]
    worked = level >= 6 and rng.random() < 0.5
    for _ in range(rng.randint(6, 14)):
        a, op, b, c = _arith(rng, level)
        lines.append(_worked_multiplication(a, b) if worked and op == "*" else f"{a} {op} {b} = {c}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Spelling and letters.

WORDS = tuple("""
apple banana cherry strawberry raspberry blueberry orange lemon melon grape peach pear plum
mango papaya coconut pineapple tomato potato carrot onion garlic pepper cucumber pumpkin lettuce
bread butter cheese yogurt coffee tea water juice sugar honey cookie biscuit pancake waffle
house window door kitchen garden table chair pillow blanket mirror ceiling carpet basement attic
school teacher student pencil notebook library science history language mathematics geography
computer keyboard monitor internet software program function variable algorithm database network
mountain river ocean forest desert island valley volcano glacier meadow canyon waterfall thunder
lightning rainbow weather summer winter autumn spring morning evening midnight yesterday tomorrow
elephant giraffe kangaroo penguin dolphin octopus butterfly squirrel rabbit tiger lion zebra
crocodile hippopotamus rhinoceros cheetah gorilla parrot flamingo peacock ostrich hedgehog turtle
bicycle airplane helicopter submarine bus train truck motorcycle rocket sailboat tractor scooter
happy sad angry excited nervous curious generous grateful brave honest patient gentle clever
beautiful wonderful terrible important different necessary possible difficult interesting
accommodate occurrence separate definitely embarrass necessary rhythm conscience mississippi
committee bookkeeper balloon coffee address success possession assessment millennium parallel
the and because before between through although however therefore whether everything nothing
music guitar piano violin trumpet drum orchestra melody harmony concert festival theater
doctor nurse hospital medicine vitamin protein skeleton muscle heart brain stomach
puzzle question answer problem solution example exercise sentence paragraph chapter alphabet
umbrella scissors envelope calendar backpack sandwich chocolate vanilla cinnamon broccoli
""".split())
_LETTER_NAMES = "abcdefghijklmnopqrstuvwxyz"
_DISTINCT_WORDS = tuple(dict.fromkeys(WORDS))  # WORDS lists a few words twice


def _spelling_facts(rng: random.Random, word: str) -> list[str]:
    letter = rng.choice(word)
    absent = rng.choice([ch for ch in _LETTER_NAMES if ch not in word])
    count = word.count(letter)
    times = "time" if count == 1 else "times"
    return [
        f'The word "{word}" is spelled {"-".join(word)}.',
        f'"{word}" has {len(word)} letters.',
        f'The letter "{letter}" appears {count} {times} in "{word}".',
        f'The letter "{absent}" does not appear in "{word}".',
        f'"{word}" spelled backwards is "{word[::-1]}".',
        f'The first letter of "{word}" is "{word[0]}" and the last letter is "{word[-1]}".',
        f'In capital letters, "{word}" is written {word.upper()}.',
        f'Spelled out with spaces: {" ".join(word)}.',
    ]


def _spelling_document(rng: random.Random) -> str:
    words = rng.sample(WORDS, rng.randint(2, 5))
    style = rng.random()
    out = []
    for w in words:
        fs = _spelling_facts(rng, w)
        chosen = rng.sample(fs, rng.randint(2, 5))
        if style < 0.5:
            out.append(" ".join(chosen))
        else:
            out.append(f"Word: {w}\n" + "\n".join(chosen))
    return "\n\n".join(out) + "\n"


def spelling_problems(seed: int, n: int = 100) -> list[dict]:
    """Letter questions: dicts with question, answer (str), word, task (count|spell|length|reverse)."""
    out = []
    for i in range(n):
        rng = _rng(seed, _TAG_SPELL, i)
        w = rng.choice(WORDS)
        task = rng.choice(("count", "spell", "length", "reverse"))
        if task == "count":
            letter = rng.choice(w) if rng.random() < 0.8 else rng.choice(_LETTER_NAMES)
            q, a = f'How many times does the letter "{letter}" appear in "{w}"?', str(w.count(letter))
        elif task == "spell":
            q, a = f'Spell the word "{w}" letter by letter, separated by dashes.', "-".join(w)
        elif task == "length":
            q, a = f'How many letters are in the word "{w}"?', str(len(w))
        else:
            q, a = f'What is "{w}" spelled backwards?', w[::-1]
        out.append(dict(question=q, answer=a, word=w, task=task))
    return out


# ----------------------------------------------------------------------------------------------
# Pattern drills: lists in which every line applies one rule to its input, the kind of structured
# repetition (tables, glossaries, exercise sheets) that makes web text reward in-context learning.
# Each document draws a rule, a line format and fresh inputs, so only the lines above predict a
# line: neither the rule nor the inputs can be memorised. No format uses '->': the phenomena
# evaluation writes its few-shot prompts with it, a form the corpus never shows.

_SYLLABLES = tuple(sorted({o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS}))


def _invented_words(rng: random.Random, n: int) -> list[str]:
    """n distinct lowercase pseudo-words of 1-2 syllables (entity names are capitalised, so these
    never spell one)."""
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choices(_SYLLABLES, k=rng.choice((1, 2, 2))))] = None
    return list(out)


def _number_inputs(rng: random.Random, n: int) -> list[str]:
    """n distinct random integers of 1-6 digits (digit count uniform), as strings."""
    out: dict[str, None] = {}
    while len(out) < n:
        d = rng.randint(1, 6)
        out[str(rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1))] = None
    return list(out)


# Where a drill's inputs come from: the numbers teach copying digits exactly (operands into an
# expression, a tool's output into a sentence), which words alone did not.
_INPUT_SOURCES = {"common": lambda rng, n: rng.sample(_DISTINCT_WORDS, n), "invented": _invented_words,
                  "numbers": _number_inputs}
_ANY_INPUT = ("common", "invented", "invented", "common", "common", "invented", "numbers", "numbers")


def _pattern_inputs(rng: random.Random, n: int, source: str) -> list[str]:
    """n distinct inputs from `source` ('common' English words, 'invented' words, 'numbers')."""
    return _INPUT_SOURCES[source](rng, n)


# rule name -> (inputs per line, sources the inputs are drawn from, rule)
_PATTERN_RULES: dict[str, tuple[int, tuple[str, ...], Callable[[list[str]], str]]] = {
    "copy": (1, _ANY_INPUT, lambda w: w[0]),
    "repeat": (1, _ANY_INPUT, lambda w: f"{w[0]} {w[0]}"),
    "triple": (1, _ANY_INPUT, lambda w: f"{w[0]} {w[0]} {w[0]}"),
    "swap": (2, _ANY_INPUT, lambda w: f"{w[1]} {w[0]}"),
    "first": (2, _ANY_INPUT, lambda w: w[0]),
    "second": (2, _ANY_INPUT, lambda w: w[1]),
    "upper": (1, ("common",), lambda w: w[0].upper()),
    "spell": (1, ("common",), lambda w: "-".join(w[0])),
    "join_times": (2, ("numbers",), lambda w: f"{w[0]}*{w[1]}"),
    "join_plus": (3, ("numbers",), lambda w: "+".join(w)),
}
_PATTERN_FORMATS = (
    "{x} => {y}", "{x}: {y}", "{x} = {y}", "{x} | {y}", "{x} becomes {y}", "{x} gives {y}",
    "{x}\t{y}", "input: {x}, output: {y}", "In: {x}\nOut: {y}", "Q: {x}\nA: {y}", "{x} >> {y}",
    # Quoted: a word after a quote is other BPE tokens than the same word after a space, so
    # copying `word` into `"word"` (a python tool call's string) is a mapping to be learned.
    '{x} is written "{y}"', '"{x}" => "{y}"', '{x}: "{y}"', "{x} ('{y}')",
)
# Separators made up per document, so the model learns to read the separator off the lines
# above rather than know a few. '-' is left out: no made-up separator can spell '->'.
_SEPARATOR_CHARS = "=:|/<>~*+#@%^&;."
_SEPARATOR_WORDS = ("to", "is", "means", "yields", "maps to", "then", "turns into", "goes to")
_PATTERN_HEADERS = ("", "Examples:", "Pattern practice", "Exercise", "Follow the pattern.",
                    "Continue the list:", "Table")


def _pattern_format(rng: random.Random) -> str:
    """A line format '{x}<sep>{y}': a common one, or a separator made up for this document."""
    u = rng.random()
    if u < 0.4:
        return rng.choice(_PATTERN_FORMATS)
    if u < 0.6:
        return "{x} " + rng.choice(_SEPARATOR_WORDS) + " {y}"
    sep = "".join(rng.choices(_SEPARATOR_CHARS, k=rng.choice((1, 2, 2, 3))))
    return "{x}" + rng.choice((" ", "")) + sep + " {y}"


def _pattern_example(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    """One drill section's content: (rule name, line format, [(input, output)] with fresh inputs)."""
    name = rng.choice(tuple(_PATTERN_RULES))
    n_words, sources, rule = _PATTERN_RULES[name]
    fmt = _pattern_format(rng)
    n_lines = rng.randint(5, 12)
    pool = _pattern_inputs(rng, n_lines * n_words, rng.choice(sources))
    pairs = []
    for i in range(n_lines):
        ws = pool[i * n_words: (i + 1) * n_words]
        pairs.append((" ".join(ws), rule(ws)))
    return name, fmt, pairs


def _pattern_lines(rng: random.Random) -> list[str]:
    _, fmt, pairs = _pattern_example(rng)
    return [fmt.format(x=x, y=y) for x, y in pairs]


def _sequence_lines(rng: random.Random) -> list[str]:
    """A random sequence of words or numbers and its exact repeat: pure in-context copying."""
    words = _pattern_inputs(rng, rng.randint(6, 24), rng.choice(_ANY_INPUT))
    first, again = rng.choice((("Sequence:", "Again:"), ("Original:", "Copy:"), ("Say:", "Repeat:"),
                               ("List:", "Same list:")))
    seq = " ".join(words)
    return [f"{first} {seq}", f"{again} {seq}"]


def _pattern_document(rng: random.Random) -> str:
    sections = []
    for _ in range(rng.randint(1, 3)):
        lines = _sequence_lines(rng) if rng.random() < 0.3 else _pattern_lines(rng)
        head = rng.choice(_PATTERN_HEADERS)
        sections.append("\n".join(([head] if head else []) + lines))
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------------------------
# The corpus: a random-access, deterministic mixture sized in bytes.

_FILLER_GENERATORS = {"math": _math_document, "arithmetic": _arithmetic_document,
                      "spelling": _spelling_document, "patterns": _pattern_document}


class Corpus(Sequence):
    """A world's training corpus of about `max_bytes` bytes, as a random-access sequence of str.

    Slot i is either an encyclopedia document (each edition document appears exactly `copies`
    times, spread evenly through the sequence in a seeded order) or a filler document (math,
    arithmetic, spelling, pattern drills in the ratio `mix`), each generated on demand from
    (seed, i): nothing is held in memory but one int32 per encyclopedia copy.

    Args:
      world: from make_world.
      seed: seeds the order of encyclopedia copies and all filler text.
      max_bytes: target UTF-8 size; the result lands within about 1% of it (filler document
        count is set from the mean size of a 4096-document sample).
      mix: relative weights (by document count) of (math, arithmetic, spelling, patterns)
        filler documents; three weights mean no pattern drills.
    """

    def __init__(self, world: World, seed: int, max_bytes: int,
                 mix: tuple[float, ...] = (0.3, 0.15, 0.15, 0.4)):
        if len(mix) not in (3, 4) or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError("mix must be three or four non-negative weights (math, arithmetic, spelling"
                             f"[, patterns]), not all zero; got {mix}")
        mix = tuple(mix) + (0.0,) * (4 - len(mix))
        enc_bytes = world.encyclopedia_bytes
        if max_bytes < enc_bytes:
            raise ValueError(
                f"max_bytes={max_bytes} is smaller than one pass over the encyclopedia of this world "
                f"({enc_bytes} bytes for {len(world.entities)} entities): raise max_bytes or lower n_entities")
        self.world, self.seed, self.max_bytes = world, seed, max_bytes
        total = float(sum(mix))
        self._cum_mix = tuple(float(x) for x in np.cumsum(np.asarray(mix, dtype=np.float64) / total))
        copies = np.array([d.copies for d in world.edition], dtype=np.int64)
        order = np.repeat(np.arange(len(world.edition), dtype=np.int32), copies)
        np.random.default_rng([seed & 0xFFFFFFFF, _TAG_CORPUS]).shuffle(order)
        self._enc_order = order
        sample = [len(self._filler(f).encode()) for f in range(4096)]
        mean = float(np.mean(sample))
        self.n_encyclopedia = len(order)
        self.n_filler = int(round((max_bytes - enc_bytes) / mean))
        self._n = self.n_encyclopedia + self.n_filler

    def __len__(self) -> int:
        return self._n

    def _locate(self, i: int) -> tuple[bool, int]:
        """Slot i -> (is_encyclopedia, index among those); copies are spread evenly."""
        e, n = self.n_encyclopedia, self._n
        lo, hi = (i * e) // n, ((i + 1) * e) // n
        return (hi > lo, lo) if hi > lo else (False, i - lo)

    def kind(self, i: int) -> str:
        """'encyclopedia' | 'math' | 'arithmetic' | 'spelling' | 'patterns' for slot i."""
        is_enc, j = self._locate(self._check(i))
        return "encyclopedia" if is_enc else self._filler_kind(_rng(self.seed, _TAG_FILL, j))

    def edition_doc(self, i: int) -> int | None:
        """Edition doc_id at slot i, or None for filler."""
        is_enc, j = self._locate(self._check(i))
        return int(self._enc_order[j]) if is_enc else None

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"corpus index {i} out of range [0, {self._n})")
        return i

    def _filler_kind(self, rng: random.Random) -> str:
        u = rng.random()
        return next((k for k, c in zip(_FILLER_KINDS, self._cum_mix) if u < c), _FILLER_KINDS[-1])

    def _filler(self, j: int) -> str:
        rng = _rng(self.seed, _TAG_FILL, j)
        return _FILLER_GENERATORS[self._filler_kind(rng)](rng)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        is_enc, j = self._locate(self._check(i))
        return self.world.document(int(self._enc_order[j])) if is_enc else self._filler(j)

    def __iter__(self) -> Iterator[str]:
        for i in range(self._n):
            yield self[i]


def iter_documents(world: World, seed: int, max_bytes: int, **kwargs) -> Iterator[str]:
    """Streams the documents of Corpus(world, seed, max_bytes, **kwargs) in order."""
    return iter(Corpus(world, seed, max_bytes, **kwargs))


def write_records(world: World, out_dir: str | os.PathLike, seed: int = 0,
                  n_math: int = 1000, n_arith: int = 1000, n_spell: int = 1000) -> dict[str, str]:
    """Exports the ground truth as JSONL files for judges and rewards.

    Writes facts.jsonl, documents.jsonl (edition with copies and text), math_train.jsonl,
    math_test.jsonl, arithmetic.jsonl and spelling.jsonl under out_dir.
    Returns:
      {name: path} of the files written.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "facts": facts(world),
        "documents": documents_manifest(world),
        "math_train": math_problems(seed, "train", n_math),
        "math_test": math_problems(seed, "test", n_math),
        "arithmetic": arithmetic_problems(seed, n_arith),
        "spelling": spelling_problems(seed, n_spell),
    }
    paths = {}
    for name, rows in tables.items():
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        paths[name] = str(path)
    return paths
