"""The synthetic world: determinism, held-out entities, exact repeat counts, correct answers."""
import collections
import json
import re

import pytest

from data import synthetic

MB = 1_000_000


@pytest.fixture(scope="module")
def world():
    return synthetic.make_world(seed=7, n_entities=200)


@pytest.fixture(scope="module")
def corpus(world):
    return synthetic.Corpus(world, seed=3, max_bytes=MB)


@pytest.fixture(scope="module")
def corpus_docs(corpus):
    return list(corpus)


def test_world_and_corpus_are_deterministic(world, corpus, corpus_docs):
    again = synthetic.make_world(seed=7, n_entities=200)
    assert again == world
    assert list(synthetic.iter_documents(again, seed=3, max_bytes=MB)) == corpus_docs
    # Random access agrees with the stream, in any order.
    for i in (len(corpus) - 1, 0, 1234, 17, 1234):
        assert corpus[i] == corpus_docs[i]
    other_world = synthetic.make_world(seed=8, n_entities=200)
    assert [e.name for e in other_world.entities] != [e.name for e in world.entities]
    other = synthetic.Corpus(world, seed=4, max_bytes=MB)
    assert other[:50] != corpus_docs[:50]


def test_corpus_size_and_mixture(corpus, corpus_docs):
    total = sum(len(d.encode()) for d in corpus_docs)
    assert abs(total - MB) / MB < 0.03, total
    kinds = collections.Counter(corpus.kind(i) for i in range(len(corpus)))
    assert set(kinds) == {"encyclopedia", "math", "arithmetic", "spelling", "patterns"}
    assert kinds["math"] > kinds["arithmetic"] > 0
    no_drills = synthetic.Corpus(corpus.world, seed=3, max_bytes=MB, mix=(0.5, 0.25, 0.25))
    assert "patterns" not in {no_drills.kind(i) for i in range(0, len(no_drills), 7)}
    with pytest.raises(ValueError, match="mix"):
        synthetic.Corpus(corpus.world, seed=0, max_bytes=MB, mix=(1.0, 0.0))
    with pytest.raises(ValueError, match="max_bytes"):
        synthetic.Corpus(corpus.world, seed=0, max_bytes=1000)
    with pytest.raises(IndexError):
        corpus[len(corpus)]


def test_held_out_entities_never_appear_in_training_text(world, corpus_docs):
    held = [e.name for e in world.held_out]
    assert len(held) >= 20 and {e.kind for e in world.held_out} == set(synthetic.KINDS)
    text = "\n".join(corpus_docs)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, held)) + r")\b")
    assert pattern.findall(text) == []
    # The check has teeth: every written-about entity is named in the same text.
    shown = [e.name for e in world.entities if e.tier != "held_out"]
    missing = [n for n in shown if n not in text]
    assert missing == []


def test_repeat_counts_and_times_seen_are_exact(world, corpus, corpus_docs):
    counts = collections.Counter(corpus_docs)
    for d in world.edition:
        assert counts[world.document(d.doc_id)] == d.copies, d
    assert len({world.document(d.doc_id) for d in world.edition}) == len(world.edition)
    copies = collections.Counter(d.copies for d in world.edition)
    assert copies[1] > 0 and max(copies) >= 16  # verbatim repeats from 1 to 16+ times
    # Every attribute a document claims to state, it states.
    for d in world.edition:
        e = world.entities[d.entity]
        text = world.document(d.doc_id)
        for a in d.attributes:
            assert synthetic._value(world, e, a) in text, (text, a)
    records = synthetic.facts(world)
    by_key = {(r["entity"], r["attribute"]): r for r in records}
    for e in world.entities:
        for a in synthetic.fact_attributes(world, e):
            r = by_key[(e.name, a)]
            assert r["held_out"] == (e.tier == "held_out")
            assert r["question"].endswith("?") and e.name in r["question"]
            if e.tier == "held_out":
                assert r["times_seen"] == 0
            elif e.tier == "once":  # one canonical article stating everything available
                assert r["times_seen"] == 1
            else:
                assert r["times_seen"] >= e.copies
    # times_seen of the canonical article's facts == occurrences of that exact text in the corpus
    canon = [d for d in world.edition if d.variant == 0 and world.entities[d.entity].tier == "popular"]
    for d in canon[:5]:
        e = world.entities[d.entity]
        stated_elsewhere = sum(1 for x in world.edition if x.entity == e.id and x.variant > 0
                               and d.attributes[0] in x.attributes)
        assert by_key[(e.name, d.attributes[0])]["times_seen"] == counts[world.document(d.doc_id)] + stated_elsewhere


_ANNOT = re.compile(r"<<([0-9+\-*/ ]+)=(-?\d+)>>(-?\d+)")


def _check_solution(solution: str, answer: str):
    lines = solution.strip().split("\n")
    assert re.fullmatch(r"#### -?\d+", lines[-1]), lines[-1]
    assert lines[-1] == f"#### {answer}"
    found = _ANNOT.findall(solution)
    assert found
    for expr, val, shown in found:
        assert eval(expr) == int(val) == int(shown), expr  # noqa: S307 (digits and operators only)
    assert found[-1][1] == answer


def test_math_problems_are_correct_and_test_split_is_unseen(corpus, corpus_docs):
    train = synthetic.math_problems(seed=1, split="train", n=3000)
    test = synthetic.math_problems(seed=1, split="test", n=600)
    for p in train + test:
        _check_solution(p["solution"], p["answer"])
    assert {p["template"] for p in train} == set(synthetic.MATH_TRAIN_TEMPLATES)
    unseen = [p for p in test if p["template"] in synthetic.MATH_TEST_TEMPLATES]
    seen = [p for p in test if p["template"] in synthetic.MATH_TRAIN_TEMPLATES]
    assert len(unseen) > 100 and len(seen) > 100
    assert not set(synthetic.MATH_TEST_TEMPLATES) & set(synthetic.MATH_TRAIN_TEMPLATES)
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    text = "\n".join(d for i, d in enumerate(corpus_docs) if corpus.kind(i) == "math")
    assert "####" in text
    assert [p["question"] for p in test if p["question"] in text] == []
    # Every worked solution inside the corpus is right too.
    for block in re.split(r"\n\n", text):
        if "####" in block:
            ans = block.strip().rsplit("#### ", 1)[1]
            _check_solution(block, ans)
    assert synthetic.math_problems(1, "test", 5) == test[:5]
    with pytest.raises(ValueError, match="split"):
        synthetic.math_problems(1, "dev", 5)


def test_arithmetic_is_correct(corpus, corpus_docs):
    probs = synthetic.arithmetic_problems(seed=2, n=400)
    assert {p["level"] for p in probs} == set(synthetic.ARITHMETIC_LEVELS)
    for p in probs:
        assert eval(p["expression"]) == int(p["answer"])  # noqa: S307
    hard = synthetic.arithmetic_problems(seed=2, n=50, level=8)
    assert all(len(p["expression"]) == 7 and "*" in p["expression"] for p in hard)
    n_lines = 0
    for i, d in enumerate(corpus_docs):
        if corpus.kind(i) != "arithmetic":
            continue
        for line in d.strip().split("\n")[1:]:
            parts = [eval(x) for x in line.split("=")]  # noqa: S307
            assert len(set(parts)) == 1, line
            n_lines += 1
    assert n_lines > 1000
    with pytest.raises(ValueError, match="level"):
        synthetic.arithmetic_problems(2, 3, level=9)


def test_spelling_facts_are_correct(corpus, corpus_docs):
    for p in synthetic.spelling_problems(seed=4, n=300):
        w = p["word"]
        expect = {"spell": "-".join(w), "length": str(len(w)), "reverse": w[::-1]}.get(p["task"])
        if p["task"] == "count":
            letter = re.search(r'letter "(.)"', p["question"]).group(1)
            expect = str(w.count(letter))
        assert p["answer"] == expect
    text = "\n".join(d for i, d in enumerate(corpus_docs) if corpus.kind(i) == "spelling")
    counts = re.findall(r'The letter "(.)" appears (\d+) times? in "(\w+)"', text)
    spelled = re.findall(r'The word "(\w+)" is spelled ([a-z-]+)\.', text)
    lengths = re.findall(r'"(\w+)" has (\d+) letters', text)
    assert len(counts) > 50 and len(spelled) > 50 and len(lengths) > 50
    assert all(w.count(ch) == int(n) for ch, n, w in counts)
    assert all(s.replace("-", "") == w for w, s in spelled)
    assert all(len(w) == int(n) for w, n in lengths)


def test_write_records(world, tmp_path):
    paths = synthetic.write_records(world, tmp_path, seed=0, n_math=20, n_arith=10, n_spell=10)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert len(rows["facts"]) == len(synthetic.facts(world))
    assert len(rows["documents"]) == len(world.edition)
    assert rows["documents"][0]["text"] == world.document(0)
    assert len(rows["math_test"]) == 20 and rows["math_test"][0]["split"] == "test"
    assert any(r["held_out"] for r in rows["facts"]) and any(r["times_seen"] > 10 for r in rows["facts"])


def test_bad_world_size():
    with pytest.raises(ValueError, match="n_entities"):
        synthetic.make_world(0, n_entities=5)


def test_pattern_drills_follow_their_rule_and_never_use_the_fewshot_format(corpus, corpus_docs):
    """Every line of a drill section applies the section's rule to a fresh input; formats vary
    (made-up separators included) and the '->' of the few-shot evaluation appears nowhere."""
    import random

    assert not any("->" in d for d in corpus_docs)
    drills = [d for i, d in enumerate(corpus_docs) if corpus.kind(i) == "patterns"]
    assert len(drills) > 100 and sum(map(len, drills)) > 0.1 * MB
    rules, formats = collections.Counter(), set()
    for seed in range(400):
        name, fmt, pairs = synthetic._pattern_example(random.Random(seed))
        n_words, sources, rule = synthetic._PATTERN_RULES[name]
        for x, y in pairs:
            ws = x.split(" ")
            assert len(ws) == n_words and rule(ws) == y
            assert sources != ("common",) or set(ws) <= set(synthetic.WORDS)
            assert sources != ("numbers",) or all(w.isdigit() and len(w) <= 6 for w in ws)
        inputs = [x for x, _ in pairs]
        assert len(set(inputs)) == len(inputs) >= 5  # fresh inputs: nothing to recall but the rule
        assert "->" not in fmt and fmt.count("{x}") == fmt.count("{y}") == 1
        rules[name] += 1
        formats.add(fmt)
    assert set(rules) == set(synthetic._PATTERN_RULES) and len(formats) > 100
    # Numbers appear in drills of every rule that may take them, so digits are copied too.
    numeric = [synthetic._pattern_example(random.Random(s)) for s in range(400)]
    assert {n for n, _, pairs in numeric if pairs[0][0].replace(" ", "").isdigit()} == {
        n for n, (_, sources, _) in synthetic._PATTERN_RULES.items() if "numbers" in sources}
    # Rendered lines are the pairs in the format, and rendering is deterministic.
    name, fmt, pairs = synthetic._pattern_example(random.Random(5))
    assert synthetic._pattern_lines(random.Random(5)) == [fmt.format(x=x, y=y) for x, y in pairs]
