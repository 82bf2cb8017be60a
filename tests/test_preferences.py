"""The simulated human (data/preferences.py): the gold reward on hand-written responses (true
facts add, false facts subtract heavily, repetition and rambling subtract), the Bradley-Terry /
Plackett-Luce labeller, and the train/held-out prompt split."""
import numpy as np
import pytest

from data import conversations as conv
from data import preferences as P
from data import synthetic


@pytest.fixture(scope="module")
def world():
    return synthetic.make_world(seed=0, n_entities=60)


@pytest.fixture(scope="module")
def judge(world):
    return P.GoldJudge(world)


def _person(world):
    return next(e for e in world.entities if e.kind == "person" and {"birth_year", "occupation"} <= set(e.attrs))


def test_gold_reward_hand_written_responses(world, judge):
    e = _person(world)
    t = judge.truth(e.name)
    year, job = t["birth_year"], t["occupation"]
    w = P.GoldWeights()
    true1 = f"{e.name} was born in {year}."
    true2 = f"{e.name} worked as {'an' if job[0] in 'aeiou' else 'a'} {job}."
    false1 = f"{e.name} was born in {int(year) + 7}."
    s_true = judge.score(e.name, true1)
    assert (s_true.true_facts, s_true.false_facts, s_true.on_topic, s_true.complete) == (1, 0, True, True)
    assert s_true.total == pytest.approx(w.true_fact + w.on_topic + w.complete)
    # a second true fact adds exactly true_fact
    s_two = judge.score(e.name, true1 + " " + true2)
    assert s_two.true_facts == 2 and s_two.total == pytest.approx(s_true.total + w.true_fact)
    # a false fact subtracts heavily: stating the wrong year is worse than saying nothing checkable
    s_false = judge.score(e.name, false1)
    assert s_false.false_facts == 1 and s_false.true_facts == 0
    assert s_false.total == pytest.approx(w.false_fact + w.on_topic + w.complete)
    assert judge.score(e.name, true1 + " " + false1).total < s_true.total
    # the pronoun form of another corpus sentence is recognised too
    pron = e.pronoun.capitalize()
    assert judge.classify(e.name, f"{pron} was born in {year}.") == ("true", "birth_year")
    # "born in the city of X" is never read as a (wrong) year
    assert judge.classify(e.name, f"{e.name} was born in the city of Nowhere.")[0] != "true"
    # claims of the wrong kind, about a subject the world lacks, or true but about another entity
    assert judge.classify(e.name, f"{e.name} is a city in Korvania.")[0] == "false"
    assert judge.classify(e.name, "Zorbax Quill was founded in 1800.")[0] == "false"
    other = next(x for x in world.entities if x.kind == "person" and x.name != e.name and "birth_year" in x.attrs)
    assert judge.classify(e.name, f"{other.name} was born in {other.attrs['birth_year']}.") == ("other", "birth_year")
    assert judge.classify(e.name, f"{other.name} was born in {other.attrs['birth_year'] + 1}.")[0] == "false"
    # repetition: the same sentence twice scores below once
    s_rep = judge.score(e.name, true1 + " " + true1)
    assert s_rep.repeated_sentences == 1 and s_rep.total < s_true.total
    # rambling: filler past the word budget costs per word
    ramble = true1 + " " + " ".join(f"Word{i} is nice." for i in range(15))
    s_ram = judge.score(e.name, ramble)
    assert s_ram.words > w.word_budget and s_ram.total < s_true.total
    # incomplete / empty / off-topic
    assert judge.score(e.name, true1[:-1]).complete is False
    assert judge.score(e.name, "").total == pytest.approx(w.empty)
    assert judge.score(e.name, "The weather is nice.").on_topic is False


def test_rank_noise_zero_sorts_and_bradley_terry_marginal():
    g = np.array([0.0, 2.0, 1.0, -1.0])
    assert P.rank(g, np.random.default_rng(0), 0.0) == [1, 2, 0, 3]
    # K = 2: P(first beats second) = sigmoid((g1 - g2) / noise)
    rng = np.random.default_rng(1)
    wins = np.mean([P.rank(np.array([1.0, 0.0]), rng, 1.0)[0] == 0 for _ in range(4000)])
    assert wins == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.03)
    with pytest.raises(ValueError, match="noise"):
        P.rank(g, rng, -1.0)


def test_prompts_split_and_label(world, judge):
    held = conv.heldout_entities(world)
    names = {world.entities[i].name for i in held}
    train = P.preference_prompts(world, 50, seed=0)
    val = P.preference_prompts(world, 20, seed=0, split="heldout")
    assert not any(p.entity in names for p in train) and all(p.entity in names for p in val)
    assert all(p.entity in p.messages[0]["content"] for p in train + val)
    k = 3
    texts = [f"{p.entity} is nice." if j == 0 else "" for p in train[:4] for j in range(k)]
    comps = P.label(train[:4], [[1, 2]] * len(texts), texts, judge, k, noise=0.0, seed=0)
    assert all(c.ranking[0] == 0 for c in comps)  # on-topic and complete beats empty
    assert len(P.preference_pairs(comps)) == 4 * 3
    c2 = P.Comparison.from_json(comps[0].to_json())
    assert c2 == comps[0]
