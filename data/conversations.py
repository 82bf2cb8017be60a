"""Conversations with ground truth for supervised fine-tuning and the assistant evaluation.

Every conversation is generated from the synthetic world (data/synthetic.py), deterministic by
seed, and carries the answer a judge looks for. Readers for real chat data (`read_messages`:
role/content lists as SmolTalk and UltraChat ship them; `read_sharegpt`: from/value;
`read_gsm8k_conversations`: GSM8K with calculator calls) return the same `Example` type, and
`open_conversations("synthetic:n=20000+gsm8k:PATH", world)` reads a flag string.

    world = synthetic.make_world(seed=0, n_entities=300)
    train = sft_mixture(world, n=20_000, seed=0)                  # list[Example], split 'train'
    val = sft_mixture(world, n=500, seed=1, split="heldout")       # validation conversations
    probe = eval_set(world, "mult", n=100, seed=0, digits=5)       # held-out 5x5-digit products
    index = search_index(world)      # the search tool's index: tools.search_tool(index, q, k=SEARCH_K)
    ok = judge(probe[0], reply)      # reply: the text of the model's final assistant message

Evaluation sets for the assistant table (all held out; `templates='train'` keeps the train
phrasings around held-out material):

    eval_set(world, "identity", n, seed)                 identity_rate
    eval_set(world, "fact", n, seed, tier=t)             facts in chat form by tier, no tools
    eval_set(world, "mult", n, seed, digits=d)           d x d digits: ban tool tokens, or allow the calculator
    eval_set(world, "count_letters", n, seed)            without / with python
    eval_set(world, "search", n, seed, tier="held_out")  without / with search (`abstains` for hallucination)

Tokens to think: two SFT sets from the same problems, differing only in order, no tools:

    problems = short_math_problems(seed, "train", n)
    first = [math_example(p, order="answer_first", tools_on=False) for p in problems]
    last = [math_example(p, order="reasoning_first", tools_on=False) for p in problems]
    test = short_math_problems(seed, "heldout", n)     # judged on the 'Answer: N' line

Messages use core/chat.py's format; tool parts appear only in assistant messages, and every tool
output is exactly what core/tools.py returns for the call (calculator and search are called
here; python outputs are computed in-process the way `print` writes them, and a test checks a
sample against the sandbox).

Kinds (meta['judge'] says how `judge` checks the reply):

    identity            who it is / who made it ("I'm zipchat ...")               contains 'zipchat'
    identity_system     a system prompt gives another name; the reply uses it      contains name, no 'zipchat'
    fact                a question about an entity the base model saw (tiers few/popular/famous)
    fact_followup       two turns; the second refers back by pronoun ("And her year of birth?")
    search              a question about a held_out/once entity, answered through a search call
    search_followup     then a follow-up answered from the snippet already in the context
    math                GSM8K-style word problem, worked steps with calculator calls, 'Answer: N'
    math_short          two small steps on one-digit numbers, no tools (the tokens-to-think problems)
    mult, sum           products / sums: small ones answered directly, big ones via the calculator
    count_letters, spell, nth_letter, reverse, length
                        letters of a word, answered through the python tool
    system_instruction  a system prompt's instruction (capitals, prefix, suffix, answer only)
    memory              memories about the user in the system message (as experiments/chat.py)
    preset              preset instructions plus few-shot turns, then the query
    multi_turn          two or three unrelated exchanges (identity, fact, search, arithmetic, letters)

Held-out rules (split='heldout' draws only held-out material; split='train' never touches it):

* entities: a quarter (famous: half) of every (kind, tier) group (`heldout_entities`). The name of
  a held-out entity appears nowhere in a train example, not even inside a search snippet or as
  another entity's birthplace (examples that would mention one are redrawn).
* question templates: every kind has train phrasings and held-out phrasings; held-out persona
  names, user names, prefix words and preset parameters likewise.
* numbers: an operand tuple is held out when crc32 of its text is 0 mod 8 (`heldout_numbers`);
  math word problems use synthetic.math_problems' own 'test' split (unseen templates and numbers).
* words: a fifth of synthetic.WORDS (`HELDOUT_WORDS`) for the letter kinds and presets.

The tiny model has a 256-token context and a 2048-token vocabulary, so replies are one short,
regular sentence, a search returns one snippet (`SEARCH_K`) and search documents are compact.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Callable

from core import chat as chat_lib
from core import tools
from data import readers, synthetic

ANSWER_PREFIX = "Answer: "  # the fixed last line of a math solution
SEARCH_K = 1  # snippets per search, in the data and at evaluation: one fits a 256-token context
# Share of each (kind, tier) group of entities held out for evaluation. Famous entities are few
# (5%), so half of them are held out to give that row of the evaluation enough distinct facts.
EVAL_ENTITY_FRACTION = {"held_out": 0.25, "once": 0.25, "few": 0.25, "popular": 0.25, "famous": 0.5}

IDENTITY: dict[str, str] = {
    "name": "zipchat",
    "maker": "the zipchat project",
    "what": "a small AI assistant",
}

SPLITS = ("train", "heldout")


# ----------------------------------------------------------------------------------------------
# The example type


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation with its ground truth.

    Attributes:
      kind: one of KINDS (or 'chat' / 'gsm8k' for read data).
      messages: the whole conversation (core/chat.py message dicts), normally ending with the
        assistant's reference reply.
      answer: what `judge` looks for in the final reply ('' when the reply is not checkable).
      meta: entity, tier, attribute, template, split, tool, judge mode, ... (JSON-serialisable).
    """

    kind: str
    messages: tuple
    answer: str
    meta: dict

    @property
    def prompt(self) -> list[dict]:
        """The messages before the final assistant reply (what a model is asked to continue)."""
        msgs = list(self.messages)
        return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs

    @property
    def reply(self) -> dict | None:
        """The final assistant message (the reference reply), or None."""
        return self.messages[-1] if self.messages and self.messages[-1]["role"] == "assistant" else None

    @property
    def reply_text(self) -> str:
        """The reference reply's own text (tool calls and outputs left out)."""
        return reply_text(self.reply) if self.reply else ""

    def to_json(self) -> str:
        """One JSON line (kind, messages, answer, meta); `from_json` reads it back."""
        return json.dumps(dataclasses.asdict(self) | {"messages": list(self.messages)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "Example":
        d = json.loads(line)
        return cls(d["kind"], tuple(d["messages"]), d["answer"], d["meta"])


def reply_text(message: Mapping) -> str:
    """The text parts of a message joined (tool calls and tool outputs dropped)."""
    return "".join(p["text"] for p in chat_lib.message_parts(dict(message)) if p["type"] == "text")


def all_text(messages: Sequence[Mapping]) -> str:
    """Every string in a conversation (tool calls and outputs included), for leak checks."""
    return "\n".join(p["text"] for m in messages for p in chat_lib.message_parts(dict(m)))


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _call(tool: str, text: str) -> dict:
    return {"type": "tool_call", "tool": tool, "text": text}


def _output(text: str) -> dict:
    return {"type": "tool_output", "text": text}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(content) -> dict:
    return {"role": "assistant", "content": content}


def _system(text: str) -> dict:
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------------------------
# Determinism and held-out rules


def _rng(*parts) -> random.Random:
    """A Random seeded by ints and strings (crc32 of strings), stable across processes."""
    x = 0
    for p in parts:
        v = zlib.crc32(p.encode()) if isinstance(p, str) else int(p)
        x = (x * 0x9E3779B1 + (v & 0xFFFFFFFFFFFF) + 1) & 0xFFFFFFFFFFFFFFFF
    return random.Random(x)


def heldout_numbers(*numbers) -> bool:
    """True when this operand tuple is reserved for evaluation (1 in 8, by crc32 of its text)."""
    return zlib.crc32(repr(tuple(int(n) for n in numbers)).encode()) % 8 == 0


HELDOUT_WORDS: frozenset[str] = frozenset(
    w for w in dict.fromkeys(synthetic.WORDS) if zlib.crc32(w.encode()) % 5 == 0)
TRAIN_WORDS: tuple[str, ...] = tuple(w for w in dict.fromkeys(synthetic.WORDS) if w not in HELDOUT_WORDS)
_HELDOUT_WORD_LIST = tuple(sorted(HELDOUT_WORDS))


def _words(split: str) -> tuple[str, ...]:
    return TRAIN_WORDS if split == "train" else _HELDOUT_WORD_LIST


def heldout_entities(world: synthetic.World) -> frozenset[int]:
    """Ids of the entities reserved for evaluation: EVAL_ENTITY_FRACTION of each (kind, tier)
    group (at least one of any group of two or more), chosen by a seeded shuffle, so every tier
    can be measured."""
    out: set[int] = set()
    rng = _rng(world.seed, "heldout_entities")
    for kind in synthetic.KINDS:
        for tier in synthetic.TIERS:
            ids = [e.id for e in world.entities if e.kind == kind and e.tier == tier]
            rng.shuffle(ids)
            k = math.ceil(EVAL_ENTITY_FRACTION[tier] * len(ids)) if len(ids) >= 2 else 0
            out.update(ids[:k])
    return frozenset(out)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# Templates: kind -> {'train': (...), 'heldout': (...)}; meta['template'] records 'split:index'.
def _pick(ctx, rng: random.Random, templates: Mapping[str, Sequence[str]], split: str) -> tuple[str, str]:
    """A phrasing of the split (or of ctx.template_split when an evaluation asks for train
    phrasings with held-out material) and its id 'split:index'."""
    split = ctx.template_split or split
    i = rng.randrange(len(templates[split]))
    return templates[split][i], f"{split}:{i}"


# ----------------------------------------------------------------------------------------------
# Search documents and the index


# Attribute -> noun phrase: search document labels, search queries and follow-up questions.
NOUNS: dict[str, str] = {
    "birth_year": "year of birth", "death_year": "year of death", "birthplace": "birthplace",
    "occupation": "occupation", "employer": "employer", "country": "country",
    "population": "population", "founded_year": "founding year", "river": "river",
    "capital": "capital", "continent": "continent", "language": "official language",
    "currency": "currency", "founder": "founder", "headquarters": "headquarters",
    "industry": "industry", "employees": "number of employees",
}


def search_documents(world: synthetic.World) -> list[tuple[str, str]]:
    """One compact (title, text) document per entity, held-out entities included: what the
    search index is built from at train and at evaluation time. Every fact is one
    'Noun: value.' sentence, so a single snippet holds the answer and fits the context."""
    by_entity: dict[str, list[dict]] = {}
    for r in synthetic.facts(world):
        by_entity.setdefault(r["entity"], []).append(r)
    docs = []
    for e in world.entities:
        lines = [f"{e.name} is {'an' if e.kind[0] in 'aeiou' else 'a'} {e.kind}."]
        lines += [f"{NOUNS[r['attribute']].capitalize()}: {r['value']}." for r in by_entity.get(e.name, ())]
        docs.append((e.name, " ".join(lines)))
    return docs


def search_index(world: synthetic.World) -> tools.SearchIndex:
    """The BM25 index over `search_documents(world)` (default passage size: each document is
    one passage). Evaluation builds the search tool from this same index with k=SEARCH_K."""
    return tools.build_search_index(search_documents(world))


def search_query(entity_name: str, attribute: str) -> str:
    """The query the reference replies send: the entity's name and the attribute's noun."""
    return f"{entity_name} {NOUNS[attribute]}"


# ----------------------------------------------------------------------------------------------
# Generation context: the world plus everything derived from it once.


@dataclasses.dataclass
class _Context:
    world: synthetic.World
    heldout: frozenset[int]
    index: tools.SearchIndex
    facts: dict[str, list[dict]]        # entity name -> its fact records
    heldout_names: re.Pattern | None     # matches any held-out entity's name
    template_split: str | None = None    # eval_set(templates='train'): phrasings of this split


def _context(world: synthetic.World) -> _Context:
    heldout = heldout_entities(world)
    facts: dict[str, list[dict]] = {}
    for r in synthetic.facts(world):
        facts.setdefault(r["entity"], []).append(r)
    names = sorted((world.entities[i].name for i in heldout), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None
    return _Context(world, heldout, search_index(world), facts, pattern)


def _leaks(ctx: _Context, messages: Sequence[Mapping]) -> bool:
    """True when a train example would name a held-out entity anywhere."""
    return bool(ctx.heldout_names and ctx.heldout_names.search(all_text(messages)))


def _entities(ctx: _Context, split: str, tiers: Sequence[str]) -> list[synthetic.Entity]:
    want_heldout = split == "heldout"
    return [e for e in ctx.world.entities if e.tier in tiers and (e.id in ctx.heldout) == want_heldout]


# ----------------------------------------------------------------------------------------------
# Identity

# Training phrasings are composed (an optional lead-in x a core question, "Are you X?" over many
# assistant names) so that the model learns the intent rather than a couple of dozen strings; the
# held-out phrasings are never composed (tests check every training message against them).
_ID_LEAD_INS = ("", "Hey, ", "Quick question: ", "Excuse me, ", "Sorry, ", "I'm curious: ", "Just wondering, ",
                "Out of interest, ", "One thing first: ")
_ID_OTHER_ASSISTANTS = ("ChatGPT", "Alexa", "Cortana", "Gemini", "Claude", "Bard", "Jarvis", "Copilot", "a human",
                        "a person", "a robot", "a real person", "a search engine")


def _lead_in(lead: str, q: str) -> str:
    return lead + (q[0].lower() + q[1:] if lead and not q.startswith("I") else q)


def _compose(core: Sequence[str], leads: Sequence[str] = _ID_LEAD_INS) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_lead_in(lead, q) for q in core for lead in leads))


_IDENTITY_QUESTIONS = {
    "name": {"train": _compose(("Who are you?", "What is your name?", "What's your name?", "What should I call you?",
                                "Tell me your name.", "Introduce yourself.", "What are you called?",
                                "What are you?", "Do you have a name?", "Tell me about yourself.",
                                "Which model are you?", "What name do you go by?", "How should I address you?",
                                "Can you tell me who you are?", "Who is this?", "What kind of assistant are you?",
                                "Identify yourself, please.", "Who is answering me?")
                               + tuple(f"Are you {x}?" for x in _ID_OTHER_ASSISTANTS)),
             "heldout": ("May I ask who I am talking to?", "Please say your name.", "Who am I chatting with?",
                         "What do people call you?", "Could you introduce yourself?", "Are you Siri?",
                         "Who exactly are you?")},
    "maker": {"train": _compose(("Who made you?", "Who created you?", "Who built you?", "Who trained you?",
                                 "Where do you come from?", "Which company made you?", "Who wrote you?",
                                 "Who is behind you?", "Which organisation trained you?", "Who designed you?",
                                 "Who owns you?", "Who are your creators?")),
              "heldout": ("Who is your maker?", "Who developed you?", "Which team built you?", "Who programmed you?")},
    "greeting": {"train": ("Hi!", "Hello!", "Hey there.", "Good morning!", "Hi, who is this?", "Hey!", "Hi there!",
                           "Hiya!", "Good afternoon!", "Good day!", "Morning!", "Hello there!", "Hey, hello!",
                           "Hi hi!", "Hello friend!", "Hi again.", "Hey you!", "Hello to you!", "Yo!",
                           "Good morning to you."),
                 "heldout": ("Greetings!", "Hello, anyone there?", "Good evening!", "Howdy!")},
}
_ARE_YOU_X = re.compile(r"(?:^|[:,] )[Aa]re you ")


def _identity_reply(topic: str, question: str, name: str, maker: str, what: str = "an AI assistant") -> str:
    if topic == "maker":
        return f"I was made by {maker}. I'm {name}."
    if topic == "greeting":
        return f"Hello! I'm {name}. How can I help?"
    if _ARE_YOU_X.search(question):
        return f"No, I'm {name}, {what} made by {maker}."
    return f"I'm {name}, {what} made by {maker}."


# System prompts that do not name the assistant: identity questions under them still get zipchat.
_NEUTRAL_SYSTEM = ("You are a helpful assistant.", "Be concise.", "Answer briefly and politely.",
                   "You are a friendly assistant.")


def _gen_identity(ctx, rng, split):
    topic = rng.choice(tuple(_IDENTITY_QUESTIONS))
    q, template = _pick(ctx, rng, _IDENTITY_QUESTIONS[topic], split)
    reply = _identity_reply(topic, q, IDENTITY["name"], IDENTITY["maker"], IDENTITY["what"])
    messages = (_user(q), _assistant(reply))
    if rng.random() < 0.25:
        messages = (_system(rng.choice(_NEUTRAL_SYSTEM)), *messages)
    return Example("identity", messages, IDENTITY["name"],
                   dict(topic=topic, template=f"{topic}/{template}", split=split, judge="contains"))


_PERSONAS = {"train": ("Nova", "Atlas", "Sage", "Echo", "Orion", "Pixel", "Juniper", "Milo", "Aria",
                       "Iris", "Felix", "Luna", "Quill", "Rover", "Vega", "Wren", "Zephyr", "Basil",
                       "Clover", "Dash", "Ember", "Hazel", "Jasper", "Kit"),
             "heldout": ("Cobalt", "Maple", "Lyra", "Otto", "Piper", "Nimbus", "Tango", "Sprout")}
_MAKERS = {"train": ("Acme Labs", "Blue Harbor AI", "Northwind Research", "the Tinker Company",
                     "Silverleaf", "Orbit Systems", "Lantern Works", "Redwood AI"),
           "heldout": ("Brightpath", "Copperfield Labs", "Moonbeam Inc.")}
_PERSONA_PROMPTS = {"train": ("You are {name}, an assistant made by {maker}.",
                              "Your name is {name}. You were made by {maker}.",
                              "You are {name}, built by {maker}. Be helpful.",
                              "Act as {name}, the assistant of {maker}."),
                    "heldout": ("From now on your name is {name}, and {maker} created you.",)}


def _gen_identity_system(ctx, rng, split):
    name, maker = rng.choice(_PERSONAS[split]), rng.choice(_MAKERS[split])
    prompt, ptemplate = _pick(ctx, rng, _PERSONA_PROMPTS, split)
    topic = rng.choice(tuple(_IDENTITY_QUESTIONS))
    q, qtemplate = _pick(ctx, rng, _IDENTITY_QUESTIONS[topic], split)
    reply = _identity_reply(topic, q, name, maker)
    answer = maker if topic == "maker" else name
    return Example("identity_system", (_system(prompt.format(name=name, maker=maker)), _user(q), _assistant(reply)),
                   answer, dict(topic=topic, persona=name, maker=maker, template=f"{ptemplate}|{topic}/{qtemplate}",
                                split=split, judge="contains", forbidden=[IDENTITY["name"]]))


# ----------------------------------------------------------------------------------------------
# Facts about the world's entities

_FACT_WRAPPERS = {"train": ("{q}", "{q} Answer briefly.", "Quick question: {q}", "Do you know this? {q}",
                            "{q} Please tell me.", "Tell me: {q}"),
                  "heldout": ("I was wondering: {q}", "{q} Thanks!")}
_FOLLOWUPS = {"train": ("And {poss} {noun}?", "What about {poss} {noun}?", "Do you also know {poss} {noun}?",
                        "And what is {poss} {noun}?"),
              "heldout": ("Also, {poss} {noun}?", "Now tell me {poss} {noun}.")}
# Fact questions answered from memory in SFT data: only tiers the base model states mostly right
# (popular ~50%, famous ~94% as completions); for 'few' entities (~3%) a direct answer would teach
# it to state what it does not know, so it searches for them as for the rest. The line between the
# two is also easier to learn (names seen dozens of times vs a handful): searches on held-out
# entities in the main job 12% -> 26% with 'few' moved over (2026-12-03).
DIRECT_TIERS = ("popular", "famous")
SEARCH_TIERS = ("held_out", "once", "few")  # the model cannot know these: it searches


def _question(rng, name: str, kind: str, attr: str) -> str:
    """Either synthetic.QUESTIONS' phrasing (the corpus's Q&A pages use it) or 'What is the
    <noun> of <name>?'."""
    if rng.random() < 0.7:
        return synthetic.QUESTIONS[(kind, attr)].format(s=name)
    return f"What is the {NOUNS[attr]} of {name}?"


def fact_sentence(e: synthetic.Entity, attr: str, value: str, *, subject: str | None = None) -> str:
    """The reply sentence: the first (most frequent) sentence form the corpus uses for the fact."""
    subj = subject or e.name
    poss = {"she": "her", "he": "his", "it": "its"}[e.pronoun]
    tmpl = synthetic._SENTENCES[(e.kind, attr)][0]  # the form the base model saw most
    av = ("an " if value[0] in "aeiou" else "a ") + value
    return tmpl.format(S=subj[0].upper() + subj[1:], s=subj, v=value, av=av, poss=poss, Poss=poss.capitalize())


def _known_facts(ctx, e: synthetic.Entity) -> list[dict]:
    """Facts about e that the corpus states (a link to a held-out entity never is), so a direct
    answer never teaches the model to state what it cannot have learned. Held-out entities (asked
    about only in evaluation, where the base model's guess is measured) keep all their facts."""
    return [r for r in ctx.facts[e.name] if r["times_seen"] > 0 or e.tier == "held_out"]


def _fact_record(ctx, rng, split, tiers, tier=None, *, known_only=False):
    """(entity, one of its fact records) of the split and tiers; None when it has no usable fact."""
    pool = _entities(ctx, split, (tier,) if tier else tiers)
    if not pool and tier is None:  # a small world may lack these tiers in a split: the caller redraws
        return None
    if not pool:
        raise ValueError(f"no {split} entities of tiers {tier or tiers} in this world; use more entities")
    e = rng.choice(pool)
    records = _known_facts(ctx, e) if known_only else ctx.facts[e.name]
    return (e, rng.choice(records)) if records else None


def _gen_fact(ctx, rng, split, tier=None):
    drawn = _fact_record(ctx, rng, split, DIRECT_TIERS, tier, known_only=True)
    if drawn is None:
        return None
    e, r = drawn
    wrapper, template = _pick(ctx, rng, _FACT_WRAPPERS, split)
    q = wrapper.format(q=_question(rng, e.name, e.kind, r["attribute"]))
    reply = fact_sentence(e, r["attribute"], r["value"])
    return Example("fact", (_user(q), _assistant(reply)), r["value"],
                   dict(entity=e.name, tier=e.tier, attribute=r["attribute"], template=template,
                        split=split, judge="contains"))


def _gen_fact_followup(ctx, rng, split, tier=None):
    drawn = _fact_record(ctx, rng, split, DIRECT_TIERS, tier, known_only=True)
    if drawn is None:
        return None
    e, r1 = drawn
    others = [r for r in _known_facts(ctx, e) if r["attribute"] != r1["attribute"]]
    if not others:
        return None
    r2 = rng.choice(others)
    wrapper, t1 = _pick(ctx, rng, _FACT_WRAPPERS, split)
    follow, t2 = _pick(ctx, rng, _FOLLOWUPS, split)
    poss = {"she": "her", "he": "his", "it": "its"}[e.pronoun]
    subject = e.pronoun if e.kind == "person" else e.name  # "It has a population..." reads oddly
    messages = (
        _user(wrapper.format(q=_question(rng, e.name, e.kind, r1["attribute"]))),
        _assistant(fact_sentence(e, r1["attribute"], r1["value"])),
        _user(follow.format(poss=poss, noun=NOUNS[r2["attribute"]])),
        _assistant(fact_sentence(e, r2["attribute"], r2["value"], subject=subject)),
    )
    return Example("fact_followup", messages, r2["value"],
                   dict(entity=e.name, tier=e.tier, attribute=r2["attribute"], first_attribute=r1["attribute"],
                        template=f"{t1}|{t2}", split=split, judge="contains"))


def _gen_search(ctx, rng, split, tier=None):
    drawn = _fact_record(ctx, rng, split, SEARCH_TIERS, tier)  # any fact: the snippet states it
    if drawn is None:
        return None
    e, r = drawn
    wrapper, template = _pick(ctx, rng, _FACT_WRAPPERS, split)
    q = wrapper.format(q=_question(rng, e.name, e.kind, r["attribute"]))
    query = search_query(e.name, r["attribute"])
    snippet = tools.search_tool(ctx.index, query, k=SEARCH_K)
    found = f": {r['value']}." in snippet
    if split == "train" and not found:
        return None  # a training reply must take its answer from the snippet: redraw (rare)
    reply = search_reply(e, r["attribute"], r["value"], query, snippet)
    return Example("search", (_user(q), _assistant(reply)), r["value"],
                   dict(entity=e.name, tier=e.tier, attribute=r["attribute"], template=template, split=split,
                        tool="search", snippet_has_answer=found, judge="contains"))


def search_reply(e: synthetic.Entity, attribute: str, value: str, query: str, snippet: str) -> list[dict]:
    """An assistant reply that searches and answers from the snippet: the call, its output, then
    the snippet's own line quoted ('Year of birth: 1871.') before the answer sentence. The quote
    makes reading the snippet a copy of what follows a label the reply just wrote (the pattern
    induction heads complete), and the answer sentence then copies from the quote next to it; a
    small model asked to map "born in" onto "Year of birth:" across the snippet in one step
    often names the wrong field's value."""
    quote = f"{NOUNS[attribute].capitalize()}: {value}."
    return [_call("search", query), _output(snippet),
            _text(f'The search result says "{quote}" {fact_sentence(e, attribute, value)}')]


def _gen_search_followup(ctx, rng, split, tier=None):
    """A search, then a follow-up about another fact of the same entity: the snippet already in
    the context holds it, so the reply reads it from there without searching again."""
    first = _gen_search(ctx, rng, split, tier)
    if first is None:
        return None
    e = ctx.world.entity(first.meta["entity"])
    snippet = _tool_outputs(first.messages)[0]
    others = [r for r in ctx.facts[e.name] if r["attribute"] != first.meta["attribute"]
              and f": {r['value']}." in snippet]
    if not others:
        return None
    r = rng.choice(others)
    follow, template = _pick(ctx, rng, _FOLLOWUPS, split)
    poss = {"she": "her", "he": "his", "it": "its"}[e.pronoun]
    subject = e.pronoun if e.kind == "person" else e.name
    messages = (*first.messages, _user(follow.format(poss=poss, noun=NOUNS[r["attribute"]])),
                _assistant(fact_sentence(e, r["attribute"], r["value"], subject=subject)))
    return Example("search_followup", messages, r["value"],
                   dict(first.meta, attribute=r["attribute"], first_attribute=first.meta["attribute"], tool=None,
                        template=f"{first.meta['template']}|{template}"))


def _tool_outputs(messages) -> list[str]:
    return [p["text"] for m in messages for p in chat_lib.message_parts(m) if p["type"] == "tool_output"]


# ----------------------------------------------------------------------------------------------
# Math word problems

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def annotated_parts(text: str, *, tools_on: bool = True) -> str | list[dict]:
    """GSM8K-annotated text -> message content (canonical form: a str when no call is left).

    Each '<<expr=result>>' becomes a calculator call on expr with the calculator's own output
    (tools_on), or is dropped (tools off: the written result that follows it stays). An
    expression the calculator refuses is dropped too, so no training reply shows a tool error."""
    parts: list[dict] = []
    pos = 0
    for m in _ANNOTATION.finditer(text):
        parts.append(_text(text[pos:m.start()]))
        expr = m.group(1).strip()
        out = tools.calculator(expr) if tools_on else "error"
        if tools_on and not out.startswith("error"):
            parts += [_call("calculator", expr), _output(out)]
        pos = m.end()
    parts.append(_text(text[pos:]))
    return chat_lib.normalize_message({"role": "assistant", "content": parts})["content"]


def math_reply(steps: str, answer: str, *, order: str = "reasoning_first", tools_on: bool = True):
    """An assistant reply to a word problem.

    Args:
      steps: worked solution lines with '<<a*b=c>>' annotations (no '####' line).
      answer: the final answer.
      order: 'reasoning_first' (steps, then 'Answer: N') or 'answer_first' ('Answer: N', then
        the steps: the model must produce the answer before any token of reasoning).
      tools_on: annotations become calculator calls (else they are removed).
    Returns:
      message content (str or list of parts).
    """
    line = f"{ANSWER_PREFIX}{answer}"
    if order == "reasoning_first":
        text = f"{steps.strip()}\n{line}"
    elif order == "answer_first":
        text = f"{line}\n{steps.strip()}"
    else:
        raise ValueError(f"order must be 'reasoning_first' or 'answer_first', got {order!r}")
    return annotated_parts(text, tools_on=tools_on)


def math_example(problem: Mapping, *, order: str = "reasoning_first", tools_on: bool = True,
                 kind: str = "math") -> Example:
    """A {question, solution ('... #### N'), answer} problem (synthetic.math_problems,
    short_math_problems, readers.read_gsm8k) as a one-turn Example judged on the answer line."""
    steps = problem["solution"].rsplit("####", 1)[0]
    content = math_reply(steps, str(problem["answer"]), order=order, tools_on=tools_on)
    meta = {k: problem[k] for k in ("template", "split", "numbers") if k in problem}
    meta.update(order=order, tool="calculator" if tools_on else None, judge="answer_line")
    return Example(kind, (_user(problem["question"]), _assistant(content)), str(problem["answer"]), meta)


def _gen_math(ctx, rng, split):
    p = synthetic.math_problems(rng.randrange(2**31), "train" if split == "train" else "test", 1)[0]
    ex = math_example(p)
    return dataclasses.replace(ex, meta=ex.meta | {"split": split, "template": p["template"]})


# Short problems for the tokens-to-think experiment: one-digit numbers, one or two steps.
# name -> (question, steps with annotations, answer); a, b, c are drawn from 2..9. Every step is
# one table fact (a one-digit product or sum) or a two-digit number plus or minus a digit.
_SHORT_MATH = {
    "bags_give": ("{n} has {a} bags with {b} {things} in each bag. {P} gives away {c} {things}. "
                  "How many {things} does {n} have left?",
                  ("{n} has {a}*{b} = <<{a}*{b}={ab}>>{ab} {things}.",
                   "{ab}-{c} = <<{ab}-{c}={r}>>{r} {things} are left."),
                  lambda a, b, c: a * b - c),
    "buy_packs": ("{n} has {c} {things}. {P} buys {a} packs with {b} {things} in each pack. "
                  "How many {things} does {n} have now?",
                  ("The packs hold {a}*{b} = <<{a}*{b}={ab}>>{ab} {things}.",
                   "{ab}+{c} = <<{ab}+{c}={r}>>{r} {things} in all."),
                  lambda a, b, c: a * b + c),
    "three_friends": ("{n} has {a} {things}. A friend gives {o} {b} more, and another friend gives {o} {c} more. "
                      "How many {things} does {n} have?",
                      ("{a}+{b} = <<{a}+{b}={apb}>>{apb} {things}.", "{apb}+{c} = <<{apb}+{c}={r}>>{r} {things}."),
                      lambda a, b, c: a + b + c),
    "pages": ("{n} reads {a} pages a day for {b} days. Then {p} reads {c} more pages. "
              "How many pages does {n} read in all?",
              ("{a}*{b} = <<{a}*{b}={ab}>>{ab} pages.", "{ab}+{c} = <<{ab}+{c}={r}>>{r} pages in all."),
              lambda a, b, c: a * b + c),
    "boxes_sell": ("{n} packs {a} boxes with {b} {things} in each box and sells {c} {things}. "
                   "How many {things} are left?",
                   ("{a}*{b} = <<{a}*{b}={ab}>>{ab} {things} were packed.",
                    "{ab}-{c} = <<{ab}-{c}={r}>>{r} {things} are left."),
                   lambda a, b, c: a * b - c),
    "coins_spend": ("{n} saves {a} coins a week for {b} weeks and then spends {c} coins. "
                    "How many coins does {n} have left?",
                    ("{n} saved {a}*{b} = <<{a}*{b}={ab}>>{ab} coins.",
                     "{ab}-{c} = <<{ab}-{c}={r}>>{r} coins are left."),
                    lambda a, b, c: a * b - c),
    "shelf_add": ("A shelf has {a} rows with {b} books in each row. {n} puts {c} more books on it. "
                  "How many books are on the shelf?",
                  ("{a}*{b} = <<{a}*{b}={ab}>>{ab} books in the rows.",
                   "{ab}+{c} = <<{ab}+{c}={r}>>{r} books on the shelf."),
                  lambda a, b, c: a * b + c),
    "finds_loses": ("{n} has {a} {things}. {P} finds {b} more and then loses {c}. How many {things} does {n} "
                    "have now?",
                    ("{a}+{b} = <<{a}+{b}={apb}>>{apb} {things}.",
                     "{apb}-{c} = <<{apb}-{c}={r}>>{r} {things} now."),
                    lambda a, b, c: a + b - c),
    # held out: a new story over the same two operations
    "trays": ("{n} bakes {a} trays with {b} muffins on each tray and drops {c} muffins. How many muffins are left?",
              ("{a}*{b} = <<{a}*{b}={ab}>>{ab} muffins were baked.",
               "{ab}-{c} = <<{ab}-{c}={r}>>{r} muffins are left."),
              lambda a, b, c: a * b - c),
}
SHORT_MATH_HELDOUT_TEMPLATES = ("trays",)

# Three small steps over four one-digit numbers a, b, c, d: more than a small model computes in
# one forward pass, each step still one table fact or a two-digit sum or difference.
_THREE_STEP_MATH = {
    "bags_boxes": ("{n} has {a} bags with {b} {things} in each bag and {c} boxes with {d} {things} in each box. "
                   "How many {things} does {n} have?",
                   ("{a}*{b} = <<{a}*{b}={ab}>>{ab} {things} in the bags.",
                    "{c}*{d} = <<{c}*{d}={cd}>>{cd} {things} in the boxes.",
                    "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} {things} in all."),
                   lambda a, b, c, d: a * b + c * d),
    "pages_two_parts": ("{n} reads {a} pages a day for {b} days, then {c} pages a day for {d} days. "
                        "How many pages does {n} read?",
                        ("{a}*{b} = <<{a}*{b}={ab}>>{ab} pages first.",
                         "{c}*{d} = <<{c}*{d}={cd}>>{cd} pages then.",
                         "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} pages in all."),
                        lambda a, b, c, d: a * b + c * d),
    "share_out": ("{n} has {a} bags with {b} {things} in each bag. {P} gives {c} {things} to each of {d} "
                  "friends. How many {things} does {n} have left?",
                  ("{n} has {a}*{b} = <<{a}*{b}={ab}>>{ab} {things}.",
                   "{P} gives away {c}*{d} = <<{c}*{d}={cd}>>{cd} {things}.",
                   "{ab}-{cd} = <<{ab}-{cd}={r}>>{r} {things} are left."),
                  lambda a, b, c, d: a * b - c * d),
    "buy_then_give": ("{n} has {a} {things}. {P} buys {b} packs with {c} {things} in each pack and then gives "
                      "away {d}. How many {things} does {n} have now?",
                      ("The packs hold {b}*{c} = <<{b}*{c}={bc}>>{bc} {things}.",
                       "{a}+{bc} = <<{a}+{bc}={s}>>{s} {things}.",
                       "{s}-{d} = <<{s}-{d}={r}>>{r} {things} now."),
                      lambda a, b, c, d: a + b * c - d),
    "coins_two_jobs": ("{n} earns {a} coins a day for {b} days and {c} coins a day for {d} more days. How many "
                       "coins does {n} earn?",
                       ("{a}*{b} = <<{a}*{b}={ab}>>{ab} coins.",
                        "{c}*{d} = <<{c}*{d}={cd}>>{cd} coins.",
                        "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} coins in all."),
                       lambda a, b, c, d: a * b + c * d),
    "plates_jars": ("{n} puts {b} cookies on each of {a} plates and {d} cookies in each of {c} jars. How many "
                    "cookies does {n} use?",
                    ("{a}*{b} = <<{a}*{b}={ab}>>{ab} cookies on the plates.",
                     "{c}*{d} = <<{c}*{d}={cd}>>{cd} cookies in the jars.",
                     "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} cookies in all."),
                    lambda a, b, c, d: a * b + c * d),
    "seats": ("A hall has {a} tables with {b} chairs at each table and {c} benches with {d} seats on each bench. "
              "How many seats are in the hall?",
              ("{a}*{b} = <<{a}*{b}={ab}>>{ab} chairs.",
               "{c}*{d} = <<{c}*{d}={cd}>>{cd} bench seats.",
               "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} seats in all."),
              lambda a, b, c, d: a * b + c * d),
    "sells_two_days": ("{n} sells {a} boxes of {b} {things} on Monday and {c} boxes of {d} {things} on Tuesday. "
                       "How many {things} does {n} sell?",
                       ("{a}*{b} = <<{a}*{b}={ab}>>{ab} {things} on Monday.",
                        "{c}*{d} = <<{c}*{d}={cd}>>{cd} {things} on Tuesday.",
                        "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} {things} in all."),
                       lambda a, b, c, d: a * b + c * d),
    "buys_uses": ("{n} buys {a} packs with {b} {things} in each pack and uses {c} {things} a day for {d} days. "
                  "How many {things} are left?",
                  ("{n} buys {a}*{b} = <<{a}*{b}={ab}>>{ab} {things}.",
                   "{P} uses {c}*{d} = <<{c}*{d}={cd}>>{cd} {things}.",
                   "{ab}-{cd} = <<{ab}-{cd}={r}>>{r} {things} are left."),
                  lambda a, b, c, d: a * b - c * d),
    "garden": ("{n} plants {a} rows with {b} roses in each row and {c} rows with {d} tulips in each row. How many "
               "flowers does {n} plant?",
               ("{a}*{b} = <<{a}*{b}={ab}>>{ab} roses.",
                "{c}*{d} = <<{c}*{d}={cd}>>{cd} tulips.",
                "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} flowers in all."),
               lambda a, b, c, d: a * b + c * d),
    # held out: a new story over the same operations
    "trays_two": ("{n} bakes {a} trays with {b} muffins on each tray and {c} trays with {d} muffins on each "
                  "tray. How many muffins does {n} bake?",
                  ("{a}*{b} = <<{a}*{b}={ab}>>{ab} muffins on the first trays.",
                   "{c}*{d} = <<{c}*{d}={cd}>>{cd} muffins on the others.",
                   "{ab}+{cd} = <<{ab}+{cd}={r}>>{r} muffins in all."),
                  lambda a, b, c, d: a * b + c * d),
}
THREE_STEP_HELDOUT_TEMPLATES = ("trays_two",)
MATH_STEPS = (2, 3)  # the step counts short_math_problems offers


def short_math_problems(seed: int, split: str = "train", n: int = 100, *, steps: int = 2) -> list[dict]:
    """Problems a tiny model can solve with `steps` small worked steps (one-digit operands):
    two steps over a, b, c (_SHORT_MATH), or three over a, b, c, d (_THREE_STEP_MATH).

    Returns dicts like synthetic.math_problems: question, solution (steps with '<<a*b=c>>'
    annotations, last line '#### N'), answer, template, split, numbers. The 'heldout' split
    uses the held-out stories (SHORT_MATH_HELDOUT_TEMPLATES, THREE_STEP_HELDOUT_TEMPLATES) half of
    the time and otherwise number tuples that `heldout_numbers` reserves; 'train' never draws
    either."""
    _check_split(split)
    if steps not in MATH_STEPS:
        raise ValueError(f"steps must be one of {MATH_STEPS}, got {steps}")
    stories, held = (_SHORT_MATH, SHORT_MATH_HELDOUT_TEMPLATES) if steps == 2 else \
        (_THREE_STEP_MATH, THREE_STEP_HELDOUT_TEMPLATES)
    k = steps + 1  # numbers per problem
    train_t = [name for name in stories if name not in held]
    out = []
    for i in range(n):
        rng = _rng(seed, "short_math" if steps == 2 else f"math_{steps}_steps", split, i)
        unseen_template = split == "heldout" and rng.random() < 0.5
        name = rng.choice(held if unseen_template else train_t)
        q_t, steps_t, fn = stories[name]
        while True:
            nums = tuple(rng.randint(2, 9) for _ in range(k))
            if fn(*nums) >= 0 and (unseen_template or heldout_numbers(*nums) == (split == "heldout")):
                break
        who = rng.choice(synthetic._PEOPLE)
        pron = synthetic._PRONOUN[who]
        _, things = rng.choice(synthetic._ITEMS)
        r = fn(*nums)
        a, b, c = nums[:3]
        d = nums[3] if k > 3 else 0
        values = dict(n=who, p=pron, P=pron.capitalize(), o={"she": "her", "he": "him"}[pron], things=things,
                      a=a, b=b, c=c, d=d, ab=a * b, apb=a + b, cd=c * d, bc=b * c, s=a + b * c, r=r)
        text = "\n".join(t.format(**values) for t in steps_t)
        out.append(dict(question=q_t.format(**values), solution=f"{text}\n#### {r}", answer=str(r),
                        template=name, split=split, numbers=list(nums)))
    return out


def _gen_math_short(ctx, rng, split):
    p = short_math_problems(rng.randrange(2**31), split, 1)[0]
    return math_example(p, tools_on=False, kind="math_short")


# ----------------------------------------------------------------------------------------------
# Arithmetic: small answered directly, big through the calculator

# Arithmetic and letter phrasings are composed too (a lead-in x a core request), so that the model
# learns to read the request rather than a dozen strings; the held-out phrasings stay out.
_TASK_LEAD_INS = ("", "Quick one: ", "Please, ", "Hey, ", "Help me out: ", "I need this: ", "One more: ")
_MULT_QUESTIONS = {"train": _compose(("What is {a} * {b}?", "Compute {a} times {b}.", "{a} x {b} = ?",
                                      "What is {a} multiplied by {b}?", "Calculate {a}*{b}.", "What's {a} times {b}?",
                                      "Find the product of {a} and {b}.", "Work out {a} x {b}.", "{a} times {b}?",
                                      "Can you calculate {a} * {b}?", "What do you get from {a} times {b}?",
                                      "Compute the product {a} * {b}.", "Give me {a} times {b}.",
                                      "Evaluate {a} * {b}.", "Tell me the product of {a} and {b}.",
                                      "Solve {a} x {b}.", "{a} multiplied by {b} is what?",
                                      "What is the result of {a} times {b}?", "Determine {a} * {b}."),
                                     _TASK_LEAD_INS),
                   "heldout": ("How much is {a} times {b}?", "Multiply {a} by {b}.")}
_SUM_QUESTIONS = {"train": ("What is {expr}?", "Add these up: {expr}", "Compute {expr}.", "What's the sum of {list}?",
                            "Calculate {expr}."),
                  "heldout": ("How much is {expr}?", "Find the total of {list}.")}
# Products whose operands have at most this many digits in all are answered directly: the times
# table only. At 3 (2x1 digits direct, 2x2 through the calculator) the model often answered
# 2x2-digit products directly (12 of 60 held-out products); 'a number of 2+ digits -> call' is
# the easier rule, and 2x1 products are beyond it too. Calculator row 59% -> 90% (2026-12-03).
DIRECT_MULT_DIGITS = 2


def _operand(rng, digits: int) -> int:
    return rng.randint(2 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _draw_numbers(rng, split: str, draw: Callable[[], tuple]) -> tuple:
    """Draws operand tuples until one belongs to `split` (1 in 8 is held out, so a few draws do)."""
    for _ in range(1000):
        nums = draw()
        if heldout_numbers(*nums) == (split == "heldout"):
            return nums
    raise RuntimeError("could not draw numbers for this split")


def _gen_mult(ctx, rng, split, digits=None):
    if digits is None:  # 35% small (1x1 answered directly, 2x1 via the calculator), the rest up to 6 x 6 digits
        small = rng.random() < 0.35
        da, db = rng.choice(((1, 1), (1, 1), (2, 1), (1, 2))) if small else (rng.randint(1, 6), rng.randint(1, 6))
    elif isinstance(digits, int):
        da = db = digits
    else:
        da, db = digits
    a, b = _draw_numbers(rng, split, lambda: (_operand(rng, da), _operand(rng, db)))
    q, template = _pick(ctx, rng, _MULT_QUESTIONS, split)
    line = f"{a} * {b} = {a * b}."
    direct = da + db <= DIRECT_MULT_DIGITS
    reply = line if direct else [_call("calculator", f"{a}*{b}"), _output(tools.calculator(f"{a}*{b}")), _text(line)]
    return Example("mult", (_user(q.format(a=a, b=b)), _assistant(reply)), str(a * b),
                   dict(numbers=[a, b], digits=[da, db], template=template, split=split,
                        tool=None if direct else "calculator", judge="number"))


def _gen_sum(ctx, rng, split, n_terms=None, digits=None):
    if n_terms is None and digits is None:  # 30% two small numbers (direct), else a long sum (calculator)
        small = rng.random() < 0.3
        k, d = (2, rng.randint(1, 2)) if small else (rng.randint(3, 6), rng.randint(2, 4))
    else:
        k, d = n_terms or 2, digits or 2
    nums = _draw_numbers(rng, split, lambda: tuple(_operand(rng, d) for _ in range(k)))
    expr = " + ".join(map(str, nums))
    q, template = _pick(ctx, rng, _SUM_QUESTIONS, split)
    q = q.format(expr=expr, list=", ".join(map(str, nums[:-1])) + f" and {nums[-1]}")
    total = sum(nums)
    line = f"{expr} = {total}."
    direct = k == 2 and d <= 2
    call = expr.replace(" ", "")
    reply = line if direct else [_call("calculator", call), _output(tools.calculator(call)), _text(line)]
    return Example("sum", (_user(q), _assistant(reply)), str(total),
                   dict(numbers=list(nums), digits=d, template=template, split=split,
                        tool=None if direct else "calculator", judge="number"))


# ----------------------------------------------------------------------------------------------
# Letters of words, through the python tool

def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# Train phrasings quote the word or not, spell numbers as ordinals or digits, so that the held-out
# phrasings (never trained on) test paraphrase, not an unseen surface form.
_LETTER_QUESTIONS = {
    "count_letters": {"train": _compose(('How many times does the letter "{l}" appear in "{w}"?',
                                         'How many "{l}" are in the word "{w}"?', 'Count the letter "{l}" in "{w}".',
                                         'How often does "{l}" occur in "{w}"?', "How many {l}s does {w} have?",
                                         "Count how many {l} letters the word {w} contains.",
                                         "What is the number of {l} in {w}?",
                                         "In {w}, how often does the letter {l} appear?",
                                         'Tell me how often "{l}" shows up in "{w}".',
                                         "Could you count the {l}s in {w}?", 'Find the count of "{l}" in "{w}".',
                                         "Letter {l} in the word {w}: how many?",
                                         "Count the {l} letters in {w}."),
                                        _TASK_LEAD_INS),
                      "heldout": ("How many {l} in {w}?", 'In the word "{w}", how many times is there a "{l}"?')},
    "spell": {"train": ('Spell the word "{w}".', 'How do you spell "{w}"?', 'Spell "{w}" letter by letter.',
                        "Spell {w}.", "How is {w} spelled?"),
              "heldout": ("Can you spell {w} for me?",)},
    "nth_letter": {"train": ('What is the {nth} letter of "{w}"?', 'Which letter is {nth} in the word "{w}"?',
                             'Tell me the {nth} letter of "{w}".', "Which letter is at position {n} in {w}?",
                             "What is letter {n} of the word {w}?"),
                   "heldout": ("What's letter number {n} in {w}?",)},
    "reverse": {"train": ('Spell "{w}" backwards.', 'What is "{w}" reversed?', 'Write "{w}" backwards.',
                          "Write {w} in reverse.", "What is {w} spelled backwards?"),
                "heldout": ("Reverse the word {w}.",)},
    "length": {"train": ('How many letters are in "{w}"?', 'How long is the word "{w}"?',
                         "How many letters does {w} have?", "What is the length of the word {w}?"),
               "heldout": ("Count the letters of {w}.",)},
}


def _letter_task(kind: str, rng, w: str):
    """(python code, the value it prints, reply sentence, answer, judge mode, extra meta)."""
    if kind == "count_letters":
        absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in w]
        letter = rng.choice(w) if rng.random() < 0.85 else rng.choice(absent)  # sometimes 0
        c = w.count(letter)
        sentence = f'The letter "{letter}" appears {c} {"time" if c == 1 else "times"} in "{w}".'
        return f'print("{w}".count("{letter}"))', c, sentence, str(c), "number", dict(letter=letter)
    if kind == "spell":
        s = "-".join(w)
        return f'print("-".join("{w}"))', s, f'"{w}" is spelled {s}.', s, "contains", {}
    if kind == "nth_letter":
        n = rng.randint(1, len(w))
        sentence = f'The {_ordinal(n)} letter of "{w}" is "{w[n - 1]}".'
        return f'print("{w}"[{n - 1}])', w[n - 1], sentence, w[n - 1], "quoted", dict(n=n, nth=_ordinal(n))
    if kind == "reverse":
        return f'print("{w}"[::-1])', w[::-1], f'"{w}" backwards is "{w[::-1]}".', w[::-1], "quoted", {}
    if kind == "length":
        return f'print(len("{w}"))', len(w), f'"{w}" has {len(w)} letters.', str(len(w)), "number", {}
    raise ValueError(kind)


def python_output(value) -> str:
    """What the python tool returns for code that prints `value` once: print's text and newline."""
    return f"{value}\n"


def _gen_letters(kind):
    def gen(ctx, rng, split, word=None):
        w = word or rng.choice(_words(split))
        code, value, sentence, answer, mode, extra = _letter_task(kind, rng, w)
        q, template = _pick(ctx, rng, _LETTER_QUESTIONS[kind], split)
        q = q.format(w=w, l=extra.get("letter", ""), nth=extra.get("nth", ""), n=extra.get("n", ""))
        reply = [_call("python", code), _output(python_output(value)), _text(sentence)]
        return Example(kind, (_user(q), _assistant(reply)), answer,
                       dict(word=w, mention=w, template=template, split=split, tool="python", judge=mode,
                            code=code) | extra)
    return gen


# ----------------------------------------------------------------------------------------------
# System prompts, memory, presets

_INSTRUCTIONS = {
    "upper": {"train": ("Answer in capital letters.", "Write your replies in uppercase only.",
                        "ALWAYS REPLY IN CAPITALS."),
              "heldout": ("Use only upper-case letters when you answer.",)},
    "prefix": {"train": ('Begin every reply with "{w}"', 'Start each answer with the word "{w}".'),
               "heldout": ('Your replies must open with "{w}"',)},
    "suffix": {"train": ('End every reply with "{w}"', 'Finish each answer with the word "{w}".'),
               "heldout": ('Close all your replies with "{w}"',)},
    "answer_only": {"train": ("Reply with the answer only, no sentence.", "Give just the answer, nothing else."),
                    "heldout": ("Be terse: only the bare answer.",)},
}
_MARKER_WORDS = {"train": ("Sure!", "Okay.", "Ahoy!", "Indeed.", "Cheers!", "Bye!", "Done.", "Right.", "Hello!",
                           "Yes."),
                 "heldout": ("Roger.", "Splendid!", "Voila!")}


def _base_qa(ctx, rng, split) -> Example:
    """A plain question with a one-sentence reply and a short answer: a fact (direct tiers) or a
    small product, for the instruction-following kinds to wrap."""
    while True:  # no usable fact (rare; or no direct-tier entity in a small world's split): redraw
        ex = _gen_fact(ctx, rng, split) if rng.random() < 0.6 else _gen_mult(ctx, rng, split, digits=(1, 1))
        if ex is not None:
            return ex


def _gen_system_instruction(ctx, rng, split):
    base = _base_qa(ctx, rng, split)
    rule = rng.choice(tuple(_INSTRUCTIONS))
    tmpl, template = _pick(ctx, rng, _INSTRUCTIONS[rule], split)
    word = rng.choice(_MARKER_WORDS[split])
    reply = base.reply_text
    meta = dict(base.meta, base_kind=base.kind, instruction=rule, template=f"{rule}/{template}")
    if rule == "upper":
        reply = reply.upper()
    elif rule == "prefix":
        reply, meta["prefix"] = f"{word} {reply}", word
    elif rule == "suffix":
        reply, meta["suffix"] = f"{reply} {word}", word
    else:
        reply, meta["judge"] = base.answer, "exact"
    if rule == "upper":
        meta["upper"] = True
    messages = (_system(tmpl.format(w=word)), *base.prompt, _assistant(reply))
    return Example("system_instruction", messages, base.answer, meta)


MEMORY_HEADER = "Things to remember about the user:"  # as experiments/chat.py writes it


def opening_messages(system: str, instructions: str, memories: Sequence[str],
                     examples: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """The messages a chat starts with, exactly as experiments/chat.py builds them: one system
    message (system prompt, preset instructions, memories), then the preset's few-shot turns.
    (A copy, because data/ may not import experiments/; a test checks they agree.)"""
    parts = [s.strip() for s in (system, instructions) if s and s.strip()]
    if memories:
        parts.append(MEMORY_HEADER + "\n" + "\n".join(f"- {m}" for m in memories))
    messages = [_system("\n\n".join(parts))] if parts else []
    for user, assistant in examples:
        messages += [_user(user), _assistant(assistant)]
    return messages


# field -> (memory sentence, train values, held-out values, questions {split: ...}, reply)
_MEMORY_FIELDS = {
    "name": ("My name is {v}.", ("Tom", "Anna", "Ravi", "Lena", "Carlos", "Mei", "Jonas", "Fatima", "Peter", "Sara"),
             ("Boris", "Ingrid", "Kenji"), {"train": ("What's my name?", "Do you know my name?", "What is my name?"),
                                           "heldout": ("Remind me what I'm called.",)}, "Your name is {v}."),
    "city": ("I live in {v}.", ("Oslo", "Lima", "Cairo", "Dublin", "Perth", "Quito", "Porto", "Riga"),
             ("Accra", "Hanoi"),
             {"train": ("Where do I live?", "Which city do I live in?"), "heldout": ("What's my home town?",)},
             "You live in {v}."),
    "pet": ("My dog is called {v}.", ("Rex", "Bella", "Max", "Daisy", "Buddy", "Luna"), ("Pepper", "Biscuit"),
            {"train": ("What is my dog's name?", "What's my dog called?"),
             "heldout": ("Do you remember my dog's name?",)},
            "Your dog is called {v}."),
    "color": ("My favourite colour is {v}.", ("blue", "green", "red", "purple", "yellow", "orange"), ("teal", "maroon"),
              {"train": ("What is my favourite colour?", "Which colour do I like best?"),
               "heldout": ("Tell me my favourite colour.",)}, "Your favourite colour is {v}."),
    "job": ("I work as a {v}.", ("teacher", "nurse", "baker", "pilot", "farmer", "designer"), ("plumber", "librarian"),
            {"train": ("What do I do for a living?", "What is my job?"), "heldout": ("Remind me of my profession.",)},
            "You work as a {v}."),
}


def _gen_memory(ctx, rng, split):
    fields = rng.sample(tuple(_MEMORY_FIELDS), rng.randint(1, 4))
    values = {f: rng.choice(_MEMORY_FIELDS[f][1] if split == "train" else _MEMORY_FIELDS[f][2]) for f in fields}
    memories = [_MEMORY_FIELDS[f][0].format(v=values[f]) for f in fields]
    system = rng.choice(("", "", "You are a helpful assistant."))
    if rng.random() < 0.25:  # memories present but not asked about: answer as usual
        base = _base_qa(ctx, rng, split)
        msgs = (*opening_messages(system, "", memories), *base.prompt, base.reply)
        meta = dict(base.meta, base_kind=base.kind, uses_memory=False, memories=memories)
        return Example("memory", msgs, base.answer, meta)
    f = rng.choice(fields)
    q, template = _pick(ctx, rng, _MEMORY_FIELDS[f][3], split)
    msgs = (*opening_messages(system, "", memories), _user(q), _assistant(_MEMORY_FIELDS[f][4].format(v=values[f])))
    return Example("memory", msgs, values[f], dict(field=f, memories=memories, uses_memory=True,
                                                   template=f"{f}/{template}", split=split, judge="contains"))


# Presets: rule -> (name, instructions {split: ...}, function word -> reply). Few-shot inputs are
# words; the query is a word of the split.
_PRESETS = {
    "upper": ("shouter", {"train": ("Rewrite the user's word in capital letters.",),
                          "heldout": ("Capitalise every letter of the word.",)},
              lambda w, _: w.upper()),
    "repeat": ("echo", {"train": ("Repeat the user's word twice.",), "heldout": ("Say the word two times.",)},
               lambda w, _: f"{w} {w}"),
    "first_letter": ("initials", {"train": ("Reply with the first letter of the word.",),
                                  "heldout": ("Give only the word's initial.",)},
                     lambda w, _: w[0]),
    "tag": ("tagger", {"train": ('Reply with the word followed by "{m}"',), "heldout": ('Append "{m}" to the word.',)},
            lambda w, m: f"{w} {m}"),
}


def _gen_preset(ctx, rng, split):
    rule = rng.choice(tuple(_PRESETS))
    name, instructions, fn = _PRESETS[rule]
    marker = rng.choice(_MARKER_WORDS[split])
    inst, template = _pick(ctx, rng, instructions, split)
    inst = inst.format(m=marker)
    words = rng.sample(_words(split), rng.randint(2, 4) + 1)
    shots = [(w, fn(w, marker)) for w in words[:-1]]
    query = words[-1]
    msgs = (*opening_messages("", inst, (), shots), _user(query), _assistant(fn(query, marker)))
    preset = {"name": name, "instructions": inst, "examples": [{"user": u, "assistant": a} for u, a in shots]}
    return Example("preset", msgs, fn(query, marker), dict(rule=rule, word=query, preset=preset,
                                                           template=f"{rule}/{template}",
                                                           split=split, judge="exact"))


# ----------------------------------------------------------------------------------------------
# The mixture and the evaluation sets

_MULTI_TURN_KINDS = ("identity", "fact", "search", "mult", "sum", "count_letters", "nth_letter", "math_short")


def _gen_multi_turn(ctx, rng, split):
    """Two or three unrelated single-turn exchanges in one conversation (users change topic); the
    last one is judged. Teaches that earlier turns do not decide later answers."""
    turns = [_GENERATORS[rng.choice(_MULTI_TURN_KINDS)](ctx, rng, split) for _ in range(rng.randint(2, 3))]
    if any(t is None for t in turns) or sum(len(all_text(t.messages)) for t in turns) > 480:
        return None  # keep within a 256-token context
    last = turns[-1]
    # a system prompt (identity's neutral ones) may open the conversation, not interrupt it
    messages = tuple(m for i, t in enumerate(turns) for m in t.messages if i == 0 or m["role"] != "system")
    return Example("multi_turn", messages, last.answer,
                   dict(last.meta, last_kind=last.kind, kinds=[t.kind for t in turns]))


_GENERATORS: dict[str, Callable] = {
    "identity": _gen_identity, "identity_system": _gen_identity_system,
    "fact": _gen_fact, "fact_followup": _gen_fact_followup, "search": _gen_search,
    "search_followup": _gen_search_followup,
    "math": _gen_math, "math_short": _gen_math_short, "mult": _gen_mult, "sum": _gen_sum,
    **{k: _gen_letters(k) for k in _LETTER_QUESTIONS},
    "system_instruction": _gen_system_instruction, "memory": _gen_memory, "preset": _gen_preset,
    "multi_turn": _gen_multi_turn,
}
KINDS: tuple[str, ...] = tuple(_GENERATORS)
DEFAULT_WEIGHTS: dict[str, float] = {
    "identity": 1.0, "identity_system": 0.5, "fact": 3.0, "fact_followup": 1.5, "search": 3.0,
    "math": 1.5, "math_short": 1.0, "mult": 2.0, "sum": 1.0, "count_letters": 1.0, "spell": 0.5,
    "nth_letter": 0.5, "reverse": 0.5, "length": 0.5, "system_instruction": 1.0, "memory": 1.0, "preset": 1.0,
    "search_followup": 0.5, "multi_turn": 1.0,
}


def _generate(ctx: _Context, kind: str, rng: random.Random, split: str, options: Mapping) -> Example:
    """One example of `kind`, redrawn until it is valid and (for train) names no held-out entity."""
    for _ in range(200):
        ex = _GENERATORS[kind](ctx, rng, split, **options)
        if ex is not None and not (split == "train" and _leaks(ctx, ex.messages)):
            return ex
    raise RuntimeError(f"could not draw a valid {kind!r} example for split {split!r} in 200 tries")


def sft_mixture(world: synthetic.World, n: int, seed: int, *, split: str = "train",
                weights: Mapping[str, float] | None = None) -> list[Example]:
    """n conversations of mixed kinds; example i depends only on (world, seed, i, split, weights).

    Args:
      world: synthetic.make_world(...), the world the base model was pretrained on.
      n: number of examples.
      seed: any int.
      split: 'train' (never held-out material) or 'heldout' (validation conversations).
      weights: kind -> relative weight (missing kinds: 0); default DEFAULT_WEIGHTS.
    """
    _check_split(split)
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds in weights: {unknown}; known: {KINDS}")
    kinds = [k for k in KINDS if weights.get(k, 0) > 0]
    if not kinds or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be non-negative with at least one positive, got {weights}")
    ctx = _context(world)
    # A small world may have no entity of the tiers a fact kind draws from in this split (no
    # held-out famous entity among 20): such kinds leave the mixture rather than fail it.
    tiers = {"fact": DIRECT_TIERS, "fact_followup": DIRECT_TIERS, "search": SEARCH_TIERS,
             "search_followup": SEARCH_TIERS}
    kinds = [k for k in kinds if k not in tiers or _entities(ctx, split, tiers[k])]
    if not kinds:
        raise ValueError(f"no kind of {sorted(weights)} can be drawn from this world's {split} entities; "
                         f"use more entities")
    cum, total = [], 0.0
    for k in kinds:
        total += weights[k]
        cum.append(total)
    out = []
    for i in range(n):
        rng = _rng(seed, "mixture", split, i)
        u = rng.random() * total
        kind = next(k for k, c in zip(kinds, cum) if u < c)
        out.append(_generate(ctx, kind, rng, split, {}))
    return out


def eval_set(world: synthetic.World, kind: str, n: int, seed: int, *, split: str = "heldout",
             templates: str | None = None, **options) -> list[Example]:
    """Up to n distinct examples of one kind: distinct prompts, and distinct (entity, attribute)
    facts for the entity kinds; fewer when the split holds fewer (a 300-entity world has about 35
    held-out famous facts: use a larger world for n >= 50 per tier).

    Args:
      kind: one of KINDS.
      split: 'heldout' (default: entities, templates, numbers and words never in train data) or 'train'.
      templates: None (the split's own phrasings) or 'train' (train phrasings around held-out
        entities / numbers / words: measures generalisation to new material alone).
      options: per kind: fact / fact_followup / search: tier='famous'|...; mult: digits=d (d x d
        digits) or (da, db); sum: n_terms=, digits=; letter kinds: word=.
    """
    _check_split(split)
    if kind not in _GENERATORS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    if templates not in (None, *SPLITS):
        raise ValueError(f"templates must be None or one of {SPLITS}, got {templates!r}")
    ctx = dataclasses.replace(_context(world), template_split=templates)
    out, seen = [], set()
    for i in range(20 * n + 100):
        if len(out) == n:
            break
        ex = _generate(ctx, kind, _rng(seed, "eval", kind, split, i), split, options)
        # one question per fact: rephrasing a fact does not make a new measurement
        key = ((ex.meta["entity"], ex.meta["attribute"]) if "entity" in ex.meta
               else json.dumps(ex.prompt, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------
# Judging replies

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_QUOTED = re.compile(r'"([^"]*)"')


def numbers_in(text: str) -> list[str]:
    """Numbers written in text, thousands separators removed ('1,234.5' -> '1234.5')."""
    return [m.group(0).replace(",", "").rstrip(".") for m in _NUMBER.finditer(text)]


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return False


def extract_answer(text: str) -> str | None:
    """The value on the last 'Answer: ...' line, thousands separators removed; None if absent."""
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(ANSWER_PREFIX.strip())]
    if not lines:
        return None
    value = lines[-1].strip()[len(ANSWER_PREFIX.strip()):].strip().rstrip(".")
    nums = numbers_in(value)
    return nums[0] if nums else value


_ABSTAIN = re.compile(r"\b(i don'?t know|i do not know|not sure|no idea|i cannot|i can'?t|unknown|no information|"
                      r"not certain|unable to)\b", re.I)


def abstains(reply: str) -> bool:
    """Does the reply decline to answer ("I don't know", "I'm not sure", ...)? A wrong reply that
    does not abstain is a hallucination (issue 9's hallucination_rate; the honesty stage trains
    such replies)."""
    return bool(_ABSTAIN.search(reply))


def _norm(s: str) -> str:
    return " ".join(s.lower().replace(",", "").split())


def judge(example: Example, reply: str, *, strict: bool = True) -> bool:
    """Is `reply` (the text of the final assistant message; tool outputs may be included, they
    come before the model's own answer) right for `example`? Pure python.

    strict=False relaxes the format only: an 'answer_line' reply without an 'Answer:' line is
    judged on its last number (report strict and lenient accuracy side by side).

    Modes (example.meta['judge']):
      contains     the answer appears in the reply as whole words (case-insensitive, commas ignored)
      number       the last number in the reply equals the answer
      answer_line  the last 'Answer: N' line holds the answer (strict: no line, no credit)
      quoted       the last "quoted" string equals the answer, or the whole reply does
      exact        the stripped reply (one trailing period allowed) equals the answer
    and then the constraints in meta: forbidden (strings that must not appear), upper (no
    lower-case letters), prefix / suffix (the reply starts / ends with them), mention (a word the
    reply must name: a letter question answered about another word is wrong even when its
    number happens to be right, as small counts often are).
    """
    meta = example.meta
    text = reply.strip()
    mode = meta.get("judge", "contains")
    answer = example.answer
    if mode == "contains":  # as a whole word or number: '1850' is not found in '18501'
        ok = bool(answer) and re.search(r"(?<!\w)" + re.escape(_norm(answer)) + r"(?!\w)", _norm(text)) is not None
    elif mode == "number":
        nums = numbers_in(text)
        ok = bool(nums) and _same_number(nums[-1], answer)
    elif mode == "answer_line":
        got = extract_answer(text)
        if got is None and not strict:
            got = (numbers_in(text) or [None])[-1]
        ok = got is not None and (_same_number(got, answer) or _norm(got) == _norm(answer))
    elif mode == "quoted":
        quoted = _QUOTED.findall(text)
        ok = (bool(quoted) and quoted[-1] == answer) or text.rstrip(".").strip('"') == answer
    elif mode == "exact":
        ok = text.rstrip(".") == answer.rstrip(".")
    else:
        raise ValueError(f"unknown judge mode {mode!r}")
    if any(f.lower() in text.lower() for f in meta.get("forbidden", ())):
        return False
    if meta.get("upper") and text != text.upper():
        return False
    if meta.get("prefix") and not text.startswith(meta["prefix"]):
        return False
    if meta.get("suffix") and not text.endswith(meta["suffix"]):
        return False
    if meta.get("mention") and re.search(r"(?<!\w)" + re.escape(meta["mention"].lower()) + r"(?!\w)",
                                         text.lower()) is None:
        return False
    return bool(ok)


# ----------------------------------------------------------------------------------------------
# Readers for real conversation data

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


def _records(path, columns: Sequence[str]):
    """Yields (location, record) for every record under path, lazily (a `limit` stops reading):
    .jsonl one JSON object per line ('file:line'), .json one list of objects ('file[i]'), and
    .parquet rows ('file: row i'; only `columns` and any 'system' column are read: SmolTalk,
    UltraChat and GSM8K ship as parquet on the Hugging Face hub)."""
    for f in readers._expand(path, (".jsonl", ".json", ".parquet"), "conversation reader"):
        if f.suffix == ".parquet":
            yield from _parquet_records(f, columns)
            continue
        if f.suffix == ".json":
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(data, list):
                raise ValueError(f"{f}: a .json conversation file must hold a list of records")
            yield from ((f"{f}[{i}]", obj) for i, obj in enumerate(data))
            continue
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                yield f"{f}:{lineno}", obj


def _parquet_records(f: pathlib.Path, columns: Sequence[str]):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{f}: no column {missing[0]!r} (columns: {names})")
    columns = list(columns) + (["system"] if "system" in names and "system" not in columns else [])
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for obj in batch.to_pylist():
            yield f"{f}: row {row}", obj
            row += 1


def _conversation(where: str, messages: list[dict], source: str) -> Example:
    for i, m in enumerate(messages):
        try:
            chat_lib.message_parts(m, i)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message")
    return Example("chat", tuple(messages), "", dict(source=source, judge="contains"))


def read_messages(path, *, field: str = "messages", limit: int | None = None) -> list[Example]:
    """Conversations stored as {"messages": [{"role", "content"}, ...]}: one per line of .jsonl
    files (OpenAI fine-tuning files), a list in .json files, or a column of .parquet files
    (SmolTalk, UltraChat). Extra keys are ignored.

    Raises:
      ValueError naming file and line: bad JSON, a missing or non-list `field`, a message
      without role/content, an unknown role, a conversation with no assistant message.
    """
    out = []
    for where, obj in _records(path, (field,)):
        msgs = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: expected an object with a non-empty list {field!r}")
        conv = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
            conv.append({"role": m["role"], "content": m["content"]})
        out.append(_conversation(where, conv, where))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_sharegpt(path, *, field: str = "conversations", limit: int | None = None) -> list[Example]:
    """ShareGPT conversations: {"conversations": [{"from": "human"|"gpt"|"system", "value": str}]}
    per line of a .jsonl file, or a .json file holding a list of such records. A top-level
    "system" string (some exports) becomes the first message.

    Raises:
      ValueError naming file and line (item number for .json): as read_messages, plus an
      unknown 'from' value.
    """
    out = []
    for where, obj in _records(path, (field,)):
        turns = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: expected an object with a non-empty list {field!r}")
        conv = []
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            conv.append(_system(obj["system"]))
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ValueError(f"{where}: turn {i} needs 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise ValueError(f"{where}: turn {i} has unknown 'from' {t['from']!r} "
                                 f"(known: {sorted(_SHAREGPT_ROLES)})")
            if not isinstance(t["value"], str):
                raise ValueError(f"{where}: turn {i} 'value' must be a string")
            conv.append({"role": role, "content": t["value"]})
        out.append(_conversation(where, conv, where))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_gsm8k_conversations(path, *, order: str = "reasoning_first", tools_on: bool = True,
                             limit: int | None = None) -> list[Example]:
    """GSM8K jsonl ({"question", "answer": worked solution ending '#### N'}) -> 'gsm8k' Examples:
    the question, then the worked answer in which every '<<48/2=24>>' annotation becomes a
    calculator call with the calculator's output, ending with 'Answer: N' (judged like 'math').

    Raises:
      ValueError naming file and line: bad JSON, missing fields, no '#### N' line.
    """
    out = []
    for where, obj in _records(path, ("question", "answer")):
        if not (isinstance(obj, dict) and isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str)):
            raise ValueError(f"{where}: a GSM8K record needs string fields 'question' and 'answer'")
        if "####" not in obj["answer"]:
            raise ValueError(f"{where}: the answer has no '#### <number>' line")
        final = obj["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        problem = dict(question=obj["question"], solution=obj["answer"], answer=final, split="gsm8k")
        ex = math_example(problem, order=order, tools_on=tools_on, kind="gsm8k")
        out.append(dataclasses.replace(ex, meta=ex.meta | {"source": where}))
        if limit is not None and len(out) >= limit:
            break
    return out


def open_conversations(spec: str, world: synthetic.World | None = None) -> list[Example]:
    """Conversations from a flag string; several joined with '+' are concatenated (in order: the
    SFT pipeline shuffles).

    Forms (options after commas):
      synthetic[:n=20000,seed=0,split=train]      sft_mixture of `world` (the base model's world)
      messages:PATH[,field=messages,limit=N]        read_messages
      sharegpt:PATH[,field=conversations,limit=N]   read_sharegpt
      gsm8k:PATH[,limit=N,tools=1,order=reasoning_first]   read_gsm8k_conversations
    Raises:
      ValueError naming the part of the spec: unknown kind or option, missing path, a synthetic
      part without a world.
    """
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise ValueError("conversation spec is empty (try synthetic:n=20000)")
    out: list[Example] = []
    for part in parts:
        kind, _, rest = part.partition(":")
        fields = [f for f in rest.split(",") if f]
        path = None
        if kind != "synthetic":
            if not fields or "=" in fields[0]:
                raise ValueError(f"conversation source {part!r}: {kind} needs a path, e.g. {kind}:/data/file.jsonl")
            path, fields = fields[0], fields[1:]
        opts = {}
        for f in fields:
            k, eq, v = f.partition("=")
            if not eq:
                raise ValueError(f"conversation source {part!r}: option {f!r} is not key=value")
            opts[k.strip()] = v.strip()
        allowed = {"synthetic": ("n", "seed", "split"), "messages": ("field", "limit"),
                   "sharegpt": ("field", "limit"), "gsm8k": ("limit", "tools", "order")}.get(kind)
        if allowed is None:
            raise ValueError(f"conversation source {part!r}: unknown kind {kind!r} "
                             "(synthetic, messages, sharegpt, gsm8k)")
        unknown = sorted(set(opts) - set(allowed))
        if unknown:
            raise ValueError(f"conversation source {part!r}: unknown option(s) {unknown}; allowed: {allowed}")
        limit = int(opts["limit"]) if "limit" in opts else None
        if kind == "synthetic":
            if world is None:
                raise ValueError(f"conversation source {part!r}: synthetic conversations need the base model's world")
            out += sft_mixture(world, int(opts.get("n", 20000)), int(opts.get("seed", 0)),
                               split=opts.get("split", "train"))
        elif kind == "messages":
            out += read_messages(path, field=opts.get("field", "messages"), limit=limit)
        elif kind == "sharegpt":
            out += read_sharegpt(path, field=opts.get("field", "conversations"), limit=limit)
        else:
            out += read_gsm8k_conversations(path, order=opts.get("order", "reasoning_first"),
                                            tools_on=opts.get("tools", "1") not in ("0", "false", "False"), limit=limit)
    return out
