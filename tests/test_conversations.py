"""data/conversations.py: determinism, held-out splits, tool outputs, judges, readers, rendering."""
import contextlib
import io
import json
import re

import pytest

from core import chat as chat_lib
from core import tokenizer
from core import tools
from data import conversations as C
from data import synthetic


@pytest.fixture(scope="module")
def world():
    return synthetic.make_world(seed=0, n_entities=300)


@pytest.fixture(scope="module")
def mixture(world):
    return C.sft_mixture(world, 3000, seed=0)


@pytest.fixture(scope="module")
def heldout_sets(world):
    """A few held-out examples of every kind."""
    return {k: C.eval_set(world, k, 30, seed=0) for k in C.KINDS}


def _dump(examples):
    return [e.to_json() for e in examples]


def _tool_pairs(messages):
    """(call part, output part) for every tool call; fails if a call has no output right after."""
    pairs = []
    for m in messages:
        parts = chat_lib.message_parts(m)
        for i, p in enumerate(parts):
            if p["type"] == "tool_call":
                assert i + 1 < len(parts) and parts[i + 1]["type"] == "tool_output", m
                pairs.append((p, parts[i + 1]))
    return pairs


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_same_data_other_seed_other_data(world, mixture):
    assert _dump(C.sft_mixture(world, 3000, seed=0)[:300]) == _dump(mixture[:300])
    # example i does not depend on n
    assert _dump(C.sft_mixture(world, 50, seed=0)) == _dump(mixture[:50])
    other = C.sft_mixture(world, 300, seed=1)
    assert sum(a != b for a, b in zip(_dump(other), _dump(mixture[:300]))) > 250
    assert _dump(C.eval_set(world, "fact", 20, seed=5)) == _dump(C.eval_set(world, "fact", 20, seed=5))


def test_examples_round_trip_through_json(mixture, heldout_sets):
    for e in mixture[:200] + [e for es in heldout_sets.values() for e in es[:3]]:
        back = C.Example.from_json(e.to_json())
        assert back.to_json() == e.to_json() and C.judge(back, e.reply_text)


def test_mixture_covers_every_kind_in_proportion(mixture):
    counts = {k: sum(e.kind == k for e in mixture) for k in C.KINDS}
    total = sum(C.DEFAULT_WEIGHTS.values())
    for k, w in C.DEFAULT_WEIGHTS.items():
        expected = len(mixture) * w / total
        assert abs(counts[k] - expected) < 5 * expected ** 0.5 + 5, (k, counts[k], expected)


def test_weights_select_kinds_and_bad_weights_fail(world):
    only = C.sft_mixture(world, 40, seed=0, weights={"mult": 1, "identity": 0})
    assert {e.kind for e in only} == {"mult"}
    with pytest.raises(ValueError, match="unknown kinds"):
        C.sft_mixture(world, 1, seed=0, weights={"poetry": 1})
    with pytest.raises(ValueError, match="split"):
        C.eval_set(world, "mult", 1, seed=0, split="test")
    with pytest.raises(ValueError, match="unknown kind"):
        C.eval_set(world, "poetry", 1, seed=0)


# ---------------------------------------------------------------------------------- held-out splits


def test_heldout_entities_cover_every_tier_and_never_appear_in_train(world, mixture):
    held = C.heldout_entities(world)
    for tier in synthetic.TIERS:
        tier_ids = {e.id for e in world.entities if e.tier == tier}
        assert 0 < len(held & tier_ids) < len(tier_ids), tier
    names = [world.entities[i].name for i in held]
    text = "\n".join(C.all_text(e.messages) for e in mixture)
    leaked = [n for n in names if n in text]
    assert not leaked, leaked[:5]
    # and the train data does talk about the other entities, including search snippets
    assert sum(e.kind == "search" for e in mixture) > 100
    # held-out sets are about held-out entities only
    for kind in ("fact", "fact_followup", "search"):
        for e in C.eval_set(world, kind, 40, seed=0):
            assert world.entity(e.meta["entity"]).id in held


def test_direct_answers_state_only_facts_the_corpus_states(world, mixture):
    seen = {(r["entity"], r["attribute"]): r["times_seen"] for r in synthetic.facts(world)}
    direct = [e for e in mixture if e.kind in ("fact", "fact_followup")
              or e.meta.get("base_kind") == "fact" or e.meta.get("last_kind") == "fact"]
    assert len(direct) > 500
    for e in direct:
        assert seen[(e.meta["entity"], e.meta["attribute"])] > 0, e.meta
        if e.kind == "fact_followup":
            assert seen[(e.meta["entity"], e.meta["first_attribute"])] > 0
    # some facts (links to held-out entities) are never stated: they exist, so the filter matters
    assert any(v == 0 for (name, _), v in seen.items() if world.entity(name).tier != "held_out")


def _heldout_template_patterns():
    """Each held-out phrasing as a regex over a whole message: {q} any text, other fields one word."""
    groups = [C._PERSONA_PROMPTS, C._FACT_WRAPPERS, C._FOLLOWUPS, C._MULT_QUESTIONS, C._SUM_QUESTIONS,
              *C._IDENTITY_QUESTIONS.values(), *C._LETTER_QUESTIONS.values(), *C._INSTRUCTIONS.values(),
              *(f[3] for f in C._MEMORY_FIELDS.values()), *(p[1] for p in C._PRESETS.values())]
    patterns = []
    for g in groups:
        for t in g["heldout"]:
            pieces = re.split(r"(\{\w+\})", t)
            rx = "".join(".+" if p == "{q}" else r"\S+" if re.fullmatch(r"\{\w+\}", p) else re.escape(p)
                         for p in pieces)
            patterns.append((t, re.compile(rx, re.S)))
    return patterns


def test_heldout_templates_and_values_never_appear_in_train(mixture, heldout_sets):
    patterns = _heldout_template_patterns()
    assert len(patterns) > 30

    def prompts(examples):
        return [m["content"] for e in examples for m in e.messages if m["role"] in ("user", "system")]

    train_prompts = prompts(mixture)
    for t, rx in patterns:
        hits = [p for p in train_prompts if any(rx.fullmatch(seg) for seg in p.split("\n\n"))]
        assert not hits, (t, hits[:2])
    # the patterns do match the held-out data (so the check above can fail)
    held_prompts = prompts(e for es in heldout_sets.values() for e in es)
    assert sum(any(rx.fullmatch(seg) for _, rx in patterns for seg in p.split("\n\n")) for p in held_prompts) > 100
    assert all(not e.meta.get("template", "").startswith("heldout") and "heldout:" not in e.meta.get("template", "")
               for e in mixture)
    # held-out persona names, makers, user facts and marker words
    values = [*C._PERSONAS["heldout"], *C._MAKERS["heldout"], *C._MARKER_WORDS["heldout"],
              *(v for f in C._MEMORY_FIELDS.values() for v in f[2])]
    text = "\n".join(C.all_text(e.messages) for e in mixture)
    for v in values:
        assert not re.search(r"(?<!\w)" + re.escape(v.rstrip(".!")) + r"(?!\w)", text), v


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def test_heldout_numbers_and_words_never_appear_in_train(mixture, heldout_sets, world):
    for e in mixture:
        question = e.prompt[-1]["content"]
        if e.kind == "mult" or e.kind == "sum":
            assert not C.heldout_numbers(*_ints(question)), question
        if e.kind == "math_short":
            assert e.meta["template"] not in C.SHORT_MATH_HELDOUT_TEMPLATES
            assert not C.heldout_numbers(*e.meta["numbers"])
        if e.kind == "math":
            assert e.meta["template"] in synthetic.MATH_TRAIN_TEMPLATES
        if e.kind in C._LETTER_QUESTIONS:
            words = set(re.findall(r"[a-z]{3,}", question))
            assert e.meta["word"] in words and not words & C.HELDOUT_WORDS, question
        if e.kind == "preset":
            for m in e.messages:
                if m["role"] == "user":
                    assert m["content"] not in C.HELDOUT_WORDS
    for e in heldout_sets["mult"] + heldout_sets["sum"]:
        assert C.heldout_numbers(*_ints(e.prompt[-1]["content"]))
    for e in heldout_sets["math_short"]:
        assert e.meta["template"] in C.SHORT_MATH_HELDOUT_TEMPLATES or C.heldout_numbers(*e.meta["numbers"])
    train_math = {p["question"] for p in synthetic.math_problems(0, "train", 2000)}
    for e in heldout_sets["math"]:
        assert e.prompt[-1]["content"] not in train_math
    for kind in C._LETTER_QUESTIONS:
        assert all(e.meta["word"] in C.HELDOUT_WORDS for e in heldout_sets[kind])
    assert len(C.HELDOUT_WORDS) > 20 and len(C.TRAIN_WORDS) > 100


def test_eval_sets_with_train_phrasings_keep_heldout_material(world):
    probe = C.eval_set(world, "fact", 40, seed=0, templates="train")
    assert all(e.meta["template"].startswith("train:") for e in probe)
    held = C.heldout_entities(world)
    assert all(world.entity(e.meta["entity"]).id in held for e in probe)
    mult = C.eval_set(world, "mult", 20, seed=0, templates="train", digits=3)
    assert all(C.heldout_numbers(*e.meta["numbers"]) and e.meta["template"].startswith("train:") for e in mult)
    with pytest.raises(ValueError, match="templates"):
        C.eval_set(world, "fact", 1, seed=0, templates="test")


def test_eval_sets_are_distinct_and_selectable(world):
    for tier in synthetic.TIERS:
        probe = C.eval_set(world, "fact", 30, seed=0, tier=tier)
        assert probe and {e.meta["tier"] for e in probe} == {tier}
        assert len({(e.meta["entity"], e.meta["attribute"]) for e in probe}) == len(probe)
    assert len(C.eval_set(world, "fact", 50, seed=0, tier="few")) == 50
    assert len(C.eval_set(world, "identity", 50, seed=0)) == 50
    for d in (2, 4, 6):
        probe = C.eval_set(world, "mult", 20, seed=0, digits=d)
        assert len(probe) == 20
        assert all(len(str(n)) == d for e in probe for n in e.meta["numbers"])
        assert all(e.meta["tool"] == ("calculator" if 2 * d > C.DIRECT_MULT_DIGITS else None) for e in probe)


# ---------------------------------------------------------------------------------- tools


def _exec_print(code):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # our own generated one-liners (print of a str method)
    return buf.getvalue()


def test_every_tool_output_is_what_the_tool_returns(world, mixture, heldout_sets):
    index = C.search_index(world)
    examples = mixture + [e for es in heldout_sets.values() for e in es]
    seen = {"calculator": 0, "search": 0, "python": 0}
    for e in examples:
        for call, out in _tool_pairs(e.messages):
            tool = call["tool"]
            seen[tool] += 1
            if tool == "calculator":
                assert out["text"] == tools.calculator(call["text"]), call
            elif tool == "search":
                assert out["text"] == tools.search_tool(index, call["text"], k=C.SEARCH_K), call
            else:
                assert out["text"] == _exec_print(call["text"]), call
    assert all(v > 50 for v in seen.values()), seen
    # train search replies take their answer from the snippet; retrieval works for held-out entities
    # and quote the snippet's line that holds it, verbatim, before the answer sentence
    for e in mixture:
        if e.kind == "search":
            snippet = _tool_pairs(e.messages)[0][1]["text"]
            assert e.answer in snippet
            answer = e.messages[-1]["content"][-1]["text"]
            quote = answer.split('"')[1]
            assert quote in snippet and quote.endswith(f": {e.answer}.") and e.answer in answer.split('"')[2]
    probe = C.eval_set(world, "search", 60, seed=0, tier="held_out")
    assert sum(e.meta["snippet_has_answer"] for e in probe) >= 0.9 * len(probe)


def test_python_outputs_match_the_sandbox(mixture):
    if tools.run_python("print(1+1)") != "2\n":
        pytest.skip(f"python sandbox unavailable here: {tools.run_python('print(1+1)')!r}")
    done = set()
    for e in mixture:
        if e.kind in C._LETTER_QUESTIONS and e.kind not in done:
            done.add(e.kind)
            (call, out), = _tool_pairs(e.messages)
            assert tools.run_python(call["text"]) == out["text"], call
    assert done == set(C._LETTER_QUESTIONS)


def test_gsm8k_annotations_become_calculator_calls(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "Natalia sold 48 clips in April and half as many in May. How many?",
                             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
                                       "Altogether 48+24 = <<48+24=72>>72 clips.\n#### 72"}) + "\n")
    ex, = C.read_gsm8k_conversations(f)
    assert ex.kind == "gsm8k" and ex.answer == "72"
    content = ex.reply["content"]
    assert content == [
        {"type": "text", "text": "In May she sold 48/2 = "},
        {"type": "tool_call", "tool": "calculator", "text": "48/2"},
        {"type": "tool_output", "text": "24"},
        {"type": "text", "text": "24 clips.\nAltogether 48+24 = "},
        {"type": "tool_call", "tool": "calculator", "text": "48+24"},
        {"type": "tool_output", "text": "72"},
        {"type": "text", "text": "72 clips.\nAnswer: 72"},
    ]
    assert C.judge(ex, ex.reply_text)
    plain, = C.read_gsm8k_conversations(f, tools_on=False)
    assert plain.reply["content"] == "In May she sold 48/2 = 24 clips.\nAltogether 48+24 = 72 clips.\nAnswer: 72"


def test_gsm8k_real_data(shared_data):
    examples = C.read_gsm8k_conversations(shared_data / "gsm8k" / "test.jsonl")
    assert len(examples) == 1319
    n_calls = 0
    for e in examples:
        for call, out in _tool_pairs(e.messages):
            n_calls += 1
            assert out["text"] == tools.calculator(call["text"]) and not out["text"].startswith("error")
        assert C.extract_answer(e.reply_text) == e.answer.replace(",", "")
    assert n_calls > 3000


# ---------------------------------------------------------------------------------- math orders


def test_answer_first_and_reasoning_first_differ_only_in_order():
    p, = C.short_math_problems(0, "train", 1)
    first = C.math_example(p, order="answer_first", tools_on=False)
    last = C.math_example(p, order="reasoning_first", tools_on=False)
    a, b = first.reply_text.split("\n"), last.reply_text.split("\n")
    assert a[0] == f"Answer: {p['answer']}" and b[-1] == a[0]
    assert a[1:] == b[:-1] and len(b) == 3
    assert "<<" not in first.reply_text and isinstance(first.reply["content"], str)
    with_tools = C.math_example(p)
    assert [c["text"] for c, _ in _tool_pairs(with_tools.messages)] == re.findall(r"<<([^=]+)=", p["solution"])
    for e in (first, last, with_tools):
        assert C.judge(e, e.reply_text)
    with pytest.raises(ValueError, match="order"):
        C.math_reply("1+1 = 2", "2", order="sideways")
    # answers computed right, held-out stories and number tuples never in training problems
    for steps, held in ((2, C.SHORT_MATH_HELDOUT_TEMPLATES), (3, C.THREE_STEP_HELDOUT_TEMPLATES)):
        train = C.short_math_problems(3, "train", 200, steps=steps)
        heldout = C.short_math_problems(3, "heldout", 200, steps=steps)
        for q in heldout + train:
            lines = re.findall(r"<<([^=]+)=(\d+)>>", q["solution"])
            assert len(lines) == steps and len(q["numbers"]) == steps + 1
            for expr, val in lines:
                assert tools.calculator(expr) == val
            assert q["solution"].endswith(f"#### {q['answer']}") and int(q["answer"]) >= 0
        assert not {q["template"] for q in train} & set(held)
        assert not any(C.heldout_numbers(*q["numbers"]) for q in train)
        seen = {q["template"] for q in heldout}
        assert set(held) <= seen and len(seen) > len(held)  # both kinds of held-out problem
    with pytest.raises(ValueError, match="steps"):
        C.short_math_problems(0, "train", 1, steps=4)


# ---------------------------------------------------------------------------------- judges


def _ex(answer, judge="contains", **meta):
    return C.Example("x", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), answer,
                     dict(judge=judge, **meta))


@pytest.mark.parametrize("example, reply, ok", [
    (_ex("1850"), "Brana Tolk was born in 1850.", True),
    (_ex("1850"), "Brana Tolk was born in 1851.", False),
    (_ex("1850"), "Brana Tolk was born in 18501.", False),
    (_ex("8,014,000"), "It has a population of 8014000.", True),
    (_ex("Vestra Bank"), "She worked for vestra bank.", True),
    (_ex("Vestra Bank"), "She worked for Vestra Press.", False),
    (_ex("58617", "number"), "6513 * 9 = 58617.", True),
    (_ex("58617", "number"), "58617? No: 6513 * 9 = 58618.", False),
    (_ex("58617", "number"), "I don't know.", False),
    (_ex("1234567", "number"), "The product is 1,234,567.", True),
    (_ex("868", "answer_line"), "Each day 217 dollars.\nAnswer: 868", True),
    (_ex("868", "answer_line"), "Answer: 868\nEach day 217 dollars.", True),
    (_ex("868", "answer_line"), "Each day he earns 868 dollars.", False),
    (_ex("868", "answer_line"), "Answer: 867", False),
    (_ex("n", "quoted"), 'The 3rd letter of "banana" is "n".', True),
    (_ex("n", "quoted"), 'The 3rd letter of "banana" is "a".', False),
    (_ex("n", "quoted"), "n", True),
    (_ex("ananab", "quoted"), '"banana" backwards is "ananb".', False),
    (_ex("melody melody", "exact"), "melody melody", True),
    (_ex("melody melody", "exact"), "melody melody melody", False),
    (_ex("Nova", forbidden=["zipchat"]), "I'm Nova.", True),
    (_ex("Nova", forbidden=["zipchat"]), "I'm Nova, also known as zipchat.", False),
    (_ex("1850", upper=True), "BRANA TOLK WAS BORN IN 1850.", True),
    (_ex("1850", upper=True), "Brana Tolk was born in 1850.", False),
    (_ex("1850", prefix="Sure!"), "Sure! Brana Tolk was born in 1850.", True),
    (_ex("1850", prefix="Sure!"), "Brana Tolk was born in 1850. Sure!", False),
    (_ex("1850", suffix="Bye!"), "Brana Tolk was born in 1850. Bye!", True),
    (_ex("1850", suffix="Bye!"), "Brana Tolk was born in 1850.", False),
    (_ex("63", "exact"), "63", True),
    (_ex("63", "exact"), "9 * 7 = 63.", False),
    # a letter answer about another word is wrong even when the small count agrees by luck
    (_ex("1", "number", mention="desert"), 'The letter "s" appears 1 time in "desert".', True),
    (_ex("1", "number", mention="desert"), 'The letter "s" appears 1 time in "sad".', False),
    (_ex("1", "number", mention="desert"), 'The letter "s" appears 1 time in "deserts".', False),
    (_ex("d", "quoted", mention="sad"), 'The 3rd letter of "sad" is "d".', True),
])
def test_judge_hand_made_replies(example, reply, ok):
    assert C.judge(example, reply) is ok


def test_lenient_judge_relaxes_only_the_answer_line():
    e = _ex("868", "answer_line")
    assert not C.judge(e, "Each day he earns 868 dollars.")
    assert C.judge(e, "Each day he earns 868 dollars.", strict=False)
    assert not C.judge(e, "Each day he earns 867 dollars.", strict=False)
    assert not C.judge(e, "868 dollars.\nAnswer: 867", strict=False)
    assert C.judge(_ex("1850"), "born in 1850", strict=False) and not C.judge(_ex("1850"), "1851", strict=False)


@pytest.mark.parametrize("reply, abstain", [
    ("I don't know.", True), ("I'm not sure when she was born.", True), ("I do not know that.", True),
    ("Brana Tolk was born in 1850.", False), ("Known as a painter, she was born in 1850.", False),
])
def test_abstains(reply, abstain):
    assert C.abstains(reply) is abstain


def test_reference_replies_pass_and_others_fail(mixture, heldout_sets):
    examples = mixture + [e for es in heldout_sets.values() for e in es]
    for e in examples:
        assert e.answer and C.judge(e, e.reply_text), (e.kind, e.reply_text, e.answer)
    # a reference reply of one question does not answer another of the same kind
    wrong = 0
    by_kind = {}
    for e in mixture:
        by_kind.setdefault(e.kind, []).append(e)
    for kind, es in by_kind.items():
        pairs = [(a, b) for a, b in zip(es, es[1:]) if a.answer != b.answer]
        wrong += sum(C.judge(a, b.reply_text) for a, b in pairs)
        assert sum(C.judge(a, b.reply_text) for a, b in pairs) <= 0.1 * len(pairs), kind
    # identity: zipchat unless a persona says otherwise
    assert all("zipchat" in e.reply_text for e in heldout_sets["identity"])
    assert all("zipchat" not in e.reply_text.lower() and not C.judge(e, "I'm zipchat, " + e.reply_text)
               for e in heldout_sets["identity_system"])


# ---------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def tok(mixture):
    text = [C.all_text(e.messages) for e in mixture[:300]]
    return tokenizer.train_bpe(text, vocab_size=256 + 200 + len(tokenizer.SPECIAL_TOKENS))


def test_every_example_renders_and_the_mask_covers_only_assistant_tokens(tok, mixture, heldout_sets):
    t = chat_lib.chat_tokens(tok)
    template = chat_lib.zipchat_template(tok)
    examples = mixture[:600] + [e for es in heldout_sets.values() for e in es[:5]]
    for e in examples:
        ids, mask = chat_lib.render_conversation(tok, list(e.messages))
        assert len(ids) == len(mask)
        produced = [i for i, m in zip(ids, mask) if m and not tok.is_special(i)]
        expected = "".join(p["text"] for m in e.messages if m["role"] == "assistant"
                           for p in chat_lib.message_parts(m) if p["type"] in ("text", "tool_call"))
        assert tok.decode(produced) == expected
        n_assistant = sum(m["role"] == "assistant" for m in e.messages)
        assert sum(m for i, m in zip(ids, mask) if i == t.im_end) == n_assistant
        assert not any(m for i, m in zip(ids, mask) if i in (t.im_start, t.im_sep, t.output_start, t.output_end, t.bos))
        n_calls = len(_tool_pairs(e.messages))
        assert sum(m for i, m in zip(ids, mask) if i in t.start_to_tool) == n_calls
        assert chat_lib.parse_conversation(tok, ids) == [chat_lib.normalize_message(m) for m in e.messages]
        assert template.render(list(e.messages)) == (ids, mask)  # the template object SFT uses


def test_conversations_fit_the_tiny_models_context(world, mixture, heldout_sets):
    """The main job's setting: a 2048-token BPE trained on the corpus, a 256-token context."""
    docs = list(synthetic.iter_documents(world, seed=0, max_bytes=500_000))
    tok = tokenizer.train_bpe(docs, vocab_size=2048)
    examples = mixture[:1000] + [e for es in heldout_sets.values() for e in es]
    lengths = [len(chat_lib.render_conversation(tok, list(e.messages))[0]) for e in examples]
    assert max(lengths) <= 256, max(lengths)


def test_opening_messages_match_the_chat_cli():
    from experiments import chat as chat_cli

    preset = chat_cli.Preset(name="p", instructions="Repeat the word.", examples=(("a", "a a"), ("b", "b b")))
    for system, mem in (("Be brief.", ["My name is Tom."]), ("", ["My name is Tom.", "I live in Oslo."]), ("", [])):
        ours = C.opening_messages(system, preset.instructions, mem, preset.examples)
        assert ours == chat_cli.opening_messages(system, preset, mem)
        assert C.opening_messages(system, "", mem) == chat_cli.opening_messages(system, chat_cli.Preset(), mem)


# ---------------------------------------------------------------------------------- readers


def test_chat_readers(tmp_path):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}], "id": 1},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = C.read_messages(f)
    assert [list(e.messages) for e in out] == [r["messages"] for r in rows]
    assert out[1].prompt[-1]["content"] == "And 3+3?" and out[1].reply_text == "6"

    share = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                {"from": "gpt", "value": "A"}]},
             {"system": "Be terse.",
              "conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}]
    expected = [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                 {"role": "assistant", "content": "A"}],
                [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Q2"},
                 {"role": "assistant", "content": "A2"}]]
    (tmp_path / "sg.jsonl").write_text("\n".join(json.dumps(r) for r in share) + "\n")
    (tmp_path / "sg.json").write_text(json.dumps(share))
    for name in ("sg.jsonl", "sg.json"):
        assert [list(e.messages) for e in C.read_sharegpt(tmp_path / name)] == expected
    assert len(C.read_sharegpt(tmp_path / "sg.json", limit=1)) == 1


def test_parquet_conversations(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    msgs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(5)]
    pq.write_table(pa.table({"messages": msgs, "source": ["x"] * 5}), tmp_path / "smol.parquet", row_group_size=2)
    out = C.read_messages(tmp_path, limit=4)
    assert [list(e.messages) for e in out] == msgs[:4]
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"}]]}), tmp_path / "bad.parquet")
    where = f"{tmp_path / 'bad.parquet'}: row 0"
    with pytest.raises(ValueError, match=re.escape(f"{where}: the conversation has no assistant")):
        C.read_messages(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no column 'conversations'"):
        C.read_sharegpt(tmp_path / "smol.parquet")


def test_open_conversations(tmp_path, world):
    f = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}", "answer": f"{i}+1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(3)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = C.open_conversations(f"synthetic:n=5,seed=2+gsm8k:{f},limit=2,tools=0", world)
    assert [e.kind for e in out[5:]] == ["gsm8k", "gsm8k"] and len(out) == 7
    assert _dump(out[:5]) == _dump(C.sft_mixture(world, 5, seed=2))
    assert not _tool_pairs(out[5].messages)
    for bad, match in (("synthetic:n=5", "need the base model's world"), ("poems:x", "unknown kind"),
                       (f"gsm8k:{f},tool=1", "unknown option"), ("messages:limit=3", "needs a path"), ("", "empty")):
        with pytest.raises(ValueError, match=match):
            C.open_conversations(bad, None if "world" in match else world)


@pytest.mark.parametrize("reader, line2, match", [
    (C.read_messages, "{not json", "not valid JSON"),
    (C.read_messages, json.dumps({"text": "hi"}), "non-empty list 'messages'"),
    (C.read_messages, json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
    (C.read_messages, json.dumps({"messages": [{"role": "user"}]}), "needs 'role' and 'content'"),
    (C.read_messages, json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    (C.read_sharegpt, json.dumps({"conversations": [{"from": "alien", "value": "x"}]}), "unknown 'from'"),
    (C.read_sharegpt, json.dumps({"conversations": [{"from": "human"}]}), "needs 'from' and 'value'"),
    (C.read_gsm8k_conversations, json.dumps({"question": "q", "answer": "no final line"}), "'####"),
    (C.read_gsm8k_conversations, json.dumps({"question": "q"}), "'question' and 'answer'"),
])
def test_readers_name_file_and_line_on_bad_records(tmp_path, reader, line2, match):
    good = {C.read_messages: {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            C.read_sharegpt: {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            C.read_gsm8k_conversations: {"question": "q", "answer": "1+1 = <<1+1=2>>2\n#### 2"}}[reader]
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(good) + "\n" + line2 + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{f}:2")) as err:
        reader(f)
    assert re.search(match, str(err.value)) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        reader(tmp_path / "missing.jsonl")
