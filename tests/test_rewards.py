"""core/rewards.py: answer parsing on tricky strings, strict vs lenient accuracy, formats, and the
Countdown checker (exact arithmetic, numbers at most once, never eval)."""
from fractions import Fraction

import pytest

from core import rewards as R


@pytest.mark.parametrize("text,value", [
    ("42", 42), ("-42", -42), ("+42", 42), ("\u221242", -42), ("42.", 42), ("42.0", 42), ("3.50", Fraction(7, 2)),
    (".5", Fraction(1, 2)), ("1,234", 1234), ("1,234,567.25", Fraction(123456725, 100)), ("$1,000", 1000),
    ("-$3", -3), ("50%", 50), ("\\$18", 18), ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac{-1}{2}", Fraction(-1, 2)),
    ("3/4", Fraction(3, 4)), ("\\boxed{7}", 7), ("12 apples", 12), ("5 dollars.", 5), ("1{,}000", 1000),
    ("twelve", None), ("1,23", None), ("12,3456", None), ("4/0", None), ("", None), ("42 43", None), ("1.2.3", None),
])
def test_parse_number(text, value):
    assert R.parse_number(text) == value


def test_find_numbers():
    got = R.find_numbers("He had 1,234 apples, 3-5 pears at -2 degrees; $4.50 each. x=-3, (7)-1, 1, 2, 3")
    assert got == [1234, 3, 5, -2, Fraction(9, 2), -3, 7, 1, 1, 2, 3]
    assert R.find_numbers("half is \\frac{1}{2} or 1/2") == [Fraction(1, 2), Fraction(1, 2)]
    assert R.find_numbers("v2 of model3 costs 10") == [10]  # digits inside words are not numbers


def test_extractors_take_the_last_answer():
    assert R.extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert R.extract_boxed(r"\boxed{ {nested} 3 }") == "{nested} 3"
    assert R.extract_boxed(r"\boxed{unclosed") is None
    assert R.extract_gsm8k("step 1\n#### 72\n") == "72"
    assert R.extract_gsm8k("#### 5\nno wait\n#### 1,234 dollars") == "1,234"
    assert R.extract_gsm8k("no marker") is None
    assert R.extract_answer_phrase("I think the answer is 5, but the final answer is -7.5.") == "-7.5"
    assert R.extract_answer_phrase("Answer: $1,234.") == "$1,234"
    assert R.extract_answer_phrase("The answer is \\boxed{12}") == "12"
    assert R.extract_answer_tag("<answer> 9 </answer> then <answer>10</answer>") == "10"
    assert R.extract_answer_line("Answer: 3\nsteps\nAnswer: 4.\nmore text") == "4"
    assert R.extract_answer_line("The answer: 4") is None
    # precedence: tag > boxed > #### > phrase
    assert R.extract_answer("the answer is 1 \\boxed{2} <answer>3</answer>") == "3"
    assert R.extract_answer("the answer is 1\n#### 2") == "2"
    assert R.extract_answer("<answer>\\boxed{8}</answer>") == "8"
    assert R.extract_answer("I do not know") is None


def test_numbers_equal():
    assert R.numbers_equal("42", "42.000")
    assert R.numbers_equal("1,000", "$1000")
    assert R.numbers_equal("84/2", "42")
    assert R.numbers_equal("0.5", "\\frac{1}{2}")
    assert not R.numbers_equal("0.333", "1/3")          # exact, no tolerance
    assert not R.numbers_equal("42", "forty-two")
    assert not R.numbers_equal("-42", "42")


@pytest.mark.parametrize("response,fmt,strict,lenient", [
    # the SFT format: a line 'Answer: N'
    ("12*3 = 36\n36+6 = 42\nAnswer: 42", "answer", True, True),
    ("Answer: 42\n12*3 = 36, 36+6 = 42", "answer", True, True),          # answer first
    ("12*3 = 36\nSo it is 42.", "answer", False, True),                   # no answer line: lenient only
    ("Answer: 41\nno, 42", "answer", False, True),                        # wrong line, right last line
    ("Answer: 42\nno, 41", "answer", True, True),                         # explicit answer wins
    ("the answer is 4,2", "answer", False, False),
    # GSM8K's marker must be the last line
    ("reasoning\n#### 42", "gsm8k", True, True),
    ("#### 42\nextra words", "gsm8k", False, True),
    ("reasoning\n#### 43", "gsm8k", False, False),
    # <think> then an explicit answer
    ("<think>6*7 = 42</think>\nThe answer is 42.", "think", True, True),
    ("<think>6*7 = 42</think>", "think", False, True),                    # nothing after </think>; 42 on the last line
    ("6*7 = 42. The answer is 42.", "think", False, True),
    ("<think>the answer is 42</think>\nThe answer is 41", "think", False, False),
    ("<think>a</think><think>b</think> Answer: 42", "think", False, True),  # two think blocks
    # R1-Zero: exactly <think>..</think><answer>..</answer>
    ("<think>6*7</think> <answer>42</answer>", "r1", True, True),
    ("<think>6*7</think>\n<answer>\\boxed{42}</answer>\n", "r1", True, True),
    ("<think>6*7</think> <answer>42</answer> bye", "r1", False, True),
    ("<answer>42</answer>", "r1", False, True),
    ("<think>6*7</think> <answer>forty-two</answer>", "r1", False, False),
    # any explicit marker
    ("so \\boxed{1,024}", "any", True, True),
    ("it's 1024", "any", False, True),
])
def test_strict_and_lenient(response, fmt, strict, lenient):
    s = R.score_math(response, "42" if "1024" not in response and "1,024" not in response else "1024", fmt=fmt)
    assert (s.strict, s.lenient) == (strict, lenient), s


def test_lenient_rule():
    """Lenient = explicit answer right OR the right number in the final non-empty line; strict
    implies lenient (an explicit right answer in the required format always counts)."""
    s = R.score_math("Answer: 42\nno, 41", "42", fmt="answer")
    assert s.strict and s.lenient
    s = R.score_math("The total is 42 apples.\n\n", "42", fmt="any", reward="lenient")
    assert not s.strict and s.lenient and s.reward == 1.0
    s = R.score_math("42 is wrong.\nIt is 41.", "42", fmt="any")
    assert not s.lenient


def test_reward_knobs():
    r = "<think>x</think> <answer>41</answer>"
    s = R.score_math(r, "42", fmt="r1", format_weight=0.1)
    assert s.format_ok and not s.strict and s.reward == pytest.approx(0.1)
    s = R.score_math("<think>x</think> <answer>42</answer>", "42", fmt="r1", format_weight=0.1)
    assert s.reward == pytest.approx(1.1)
    assert R.format_reward(r, "r1") == 1.0 and R.format_reward("41", "r1") == 0.0
    with pytest.raises(ValueError, match="format"):
        R.score_math("x", "1", fmt="latex")
    with pytest.raises(ValueError, match="not a number"):
        R.score_math("x", "forty")


# ----------------------------------------------------------------------------- Countdown


@pytest.mark.parametrize("expr,value,used", [
    ("(25 - 5) * 3", 60, [25, 5, 3]),
    ("6 / (1 - 3 / 4)", 24, [6, 1, 3, 4]),         # exact: 1 - 3/4 = 1/4
    ("100 / 7 * 7", 100, [100, 7, 7]),              # no rounding
    ("2 * 3 + 4 * 5", 26, [2, 3, 4, 5]),            # precedence
    ("10 - 2 - 3", 5, [10, 2, 3]),                  # left-associative
    ("((((7))))", 7, [7]),
    ("3 \u00d7 4 \u2212 2", 10, [3, 4, 2]),
])
def test_evaluate_countdown(expr, value, used):
    v, u = R.evaluate_countdown(expr)
    assert v == value and u == used


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "2**10", "-3 + 5", "1 / 0", "1 / (2 - 2)", "2.5 * 2", "2 3",
    "(1 + 2", "1 + 2)", "", "1 +", "abs(-3)", "1e3", "9" * 400, "(" * 60 + "1" + ")" * 60, "1; 2",
])
def test_evaluate_countdown_rejects(expr):
    assert R.evaluate_countdown(expr) == (None, [])


def test_check_countdown():
    nums = [25, 5, 3, 7]
    assert R.check_countdown("(25 - 5) * 3", nums, 60)
    assert not R.check_countdown("(25 - 5) * 3", nums, 60, use_all=True)        # 7 unused
    assert R.check_countdown("(25 - 5) * 3 + 7 - 7", [25, 5, 3, 7, 7], 60, use_all=True)
    assert not R.check_countdown("(25 - 5) * 3 + 7 - 7", nums, 60)              # 7 used twice
    assert not R.check_countdown("25 * 5", nums, 60)                            # wrong value
    assert not R.check_countdown("(20 + 5) * 3 - 15", nums, 60)                 # 20, 15 not given
    assert not R.check_countdown("253 - 193", nums, 60)                         # no concatenation
    assert R.check_countdown("6 / (1 - 3 / 4)", [6, 1, 3, 4], 24, use_all=True)


def test_score_countdown():
    info = {"numbers": (25, 5, 3, 7), "target": 60}
    good = "<think>20 * 3 = 60</think>\n<answer>(25 - 5) * 3</answer>"
    assert R.score_countdown(good, "", info, fmt="r1").strict
    s = R.score_countdown("<answer>(25 - 5) * 3 = 60</answer>", "", info, fmt="r1")
    assert (s.strict, s.lenient, s.extracted) == (False, True, "(25 - 5) * 3")
    s = R.score_countdown("Let me try.\n60 = (25 - 5) * 3", "", info, fmt="any")
    assert s.strict and s.lenient
    s = R.score_countdown("<think>x</think><answer>25 + 5 + 3 + 7</answer>", "", info, fmt="r1")
    assert not s.lenient and s.format_ok
