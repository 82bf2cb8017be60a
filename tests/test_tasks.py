"""data/tasks.py: disjoint splits, determinism, solvable Countdown, reward references that score."""
import pickle

import pytest

from core import rewards
from data import synthetic, tasks


def test_synthetic_math_splits_disjoint():
    train = tasks.synthetic_math_tasks(0, "train", 3000)
    test = tasks.synthetic_math_tasks(0, "test", 600)
    train_q = {t.info["question"] for t in train}
    test_q = {t.info["question"] for t in test}
    assert not train_q & test_q
    # by template: the held-out templates are test-only, and test has both halves
    assert not {t.info["template"] for t in train} & set(synthetic.MATH_TEST_TEMPLATES)
    held = [t for t in test if t.info["heldout_template"]]
    assert 0.3 < len(held) / len(test) < 0.7
    # by numbers: test items of train templates are new problems of familiar shapes
    seen = [t for t in test if not t.info["heldout_template"]]
    assert {t.info["template"] for t in seen} <= set(synthetic.MATH_TRAIN_TEMPLATES)
    # a different seed draws different train problems, still disjoint from test
    other = {t.info["question"] for t in tasks.synthetic_math_tasks(1, "train", 3000)}
    assert other != train_q and not other & test_q


def test_synthetic_math_items():
    items = tasks.synthetic_math_tasks(3, "test", 20)
    for it in items:
        assert it.prompt == ({"role": "user", "content": it.info["question"]},)
        # the reference solution's steps with an 'Answer: N' line score as strict
        steps = it.info["solution"].rsplit("####", 1)[0].strip()
        assert it.score(f"{steps}\nAnswer: {it.answer}").strict
        assert not it.score(f"{steps}\nAnswer: {int(it.answer) + 1}").lenient
    r1 = tasks.synthetic_math_tasks(3, "test", 2, fmt="r1")[0]
    assert r1.prompt[0] == {"role": "system", "content": tasks.R1_SYSTEM}
    assert r1.score(f"<think>ok</think><answer>{r1.answer}</answer>").strict
    assert not r1.score(f"Answer: {r1.answer}").strict


def test_determinism_and_prefix_stability():
    a = tasks.synthetic_math_tasks(7, "train", 50)
    b = tasks.synthetic_math_tasks(7, "train", 80)
    assert [(x.id, x.prompt, x.answer) for x in a] == [(x.id, x.prompt, x.answer) for x in b[:50]]
    c1 = tasks.countdown_tasks(7, "train", 50)
    c2 = tasks.countdown_tasks(7, "train", 80)
    assert [(x.prompt, x.info) for x in c1] == [(x.prompt, x.info) for x in c2[:50]]
    assert [x.info for x in tasks.countdown_tasks(8, "train", 50)] != [x.info for x in c1]


def test_countdown_solvable_and_disjoint():
    train = tasks.countdown_tasks(0, "train", 400)
    test = tasks.countdown_tasks(0, "test", 100)
    key = lambda t: (tuple(sorted(t.info["numbers"])), t.info["target"])
    assert not {key(t) for t in train} & {key(t) for t in test}
    assert all(tasks.countdown_is_test(t.info["numbers"], t.info["target"]) for t in test)
    assert not any(tasks.countdown_is_test(t.info["numbers"], t.info["target"]) for t in train)
    for t in train[:100] + test[:30]:
        nums, target = t.info["numbers"], t.info["target"]
        assert len(nums) in (3, 4) and all(1 <= v <= 99 for v in nums) and 1 <= target <= 100
        assert target not in nums
        # the stored solution uses every number once; an independent search agrees it is solvable
        assert rewards.check_countdown(t.info["solution"], nums, target, use_all=True)
        assert tasks.solve_countdown(nums, target, use_all=True) is not None
        assert t.score(f"<think>..</think><answer>{t.info['solution']}</answer>").strict
    assert len({key(t) for t in train}) > 390  # varied


def test_solve_countdown():
    assert tasks.solve_countdown([6, 1, 3, 4], 24, use_all=True) is not None   # needs fractions
    assert tasks.solve_countdown([1, 1], 5) is None
    e = tasks.solve_countdown([2, 3, 50], 5)
    assert e is not None and rewards.check_countdown(e, [2, 3, 50], 5)


def test_items_pickle():
    # grain workers and multiprocessing need the reward reference to travel
    for it in (tasks.synthetic_math_tasks(0, "train", 1)[0], tasks.countdown_tasks(0, "train", 1)[0]):
        it2 = pickle.loads(pickle.dumps(it))
        assert it2.score(it.info.get("solution", "")).lenient == it.score(it.info.get("solution", "")).lenient


def test_gsm8k_tasks(shared_data):
    items = tasks.gsm8k_tasks(shared_data / "gsm8k", "test", n=50, instruction=tasks.BOXED_INSTRUCTION)
    assert len(items) == 50
    assert items[0].answer == "18" and "\\boxed{}" in items[0].prompt[-1]["content"]
    for it in items:
        assert it.score(f"so the result is \\boxed{{{it.answer}}}").strict
        assert it.score(it.info["solution"]).strict          # GSM8K's own '#### N' solution
    train = tasks.gsm8k_tasks(shared_data / "gsm8k", "train", n=200)
    assert not {t.info["question"] for t in train} & {t.info["question"] for t in items}


def test_open_tasks_and_errors(tmp_path):
    assert len(tasks.open_tasks("synthetic_math:seed=2,split=test,n=5")) == 5
    short = tasks.open_tasks("short_math:split=heldout,n=4")
    assert [t.id for t in short] == [f"short_math/heldout/0/{i}" for i in range(4)]
    assert short[0].score(f"Answer: {short[0].answer}").strict and not short[0].score("Answer: -1").strict
    cd = tasks.open_tasks("countdown:n=3,use_all=1,fmt=any")
    assert len(cd) == 3 and cd[0].info["use_all"] and cd[0].info["format"] == "any"
    with pytest.raises(ValueError, match="unknown task source"):
        tasks.open_tasks("mmlu")
    with pytest.raises(ValueError, match="split"):
        tasks.synthetic_math_tasks(0, "val")
    with pytest.raises(ValueError, match="format"):
        tasks.synthetic_math_tasks(0, "train", 1, fmt="latex")
    with pytest.raises(FileNotFoundError, match="gsm8k"):
        tasks.gsm8k_tasks(tmp_path, "test")
    with pytest.raises(ValueError, match="task spec"):
        tasks.open_tasks("countdown:bogus=1")
