"""Verifiable rewards as pure Python: answer extraction, exact numeric equality, format checks,
and an exact Countdown checker.

Answers (math word problems: GSM8K and the synthetic world's):
  - explicit final answers, in the order they are looked for: `<answer>...</answer>`, `\\boxed{...}`
    (nested braces ok), GSM8K's `#### 42`, "the (final) answer is 42" / "Answer: 42"; the LAST
    occurrence in the text wins (a model may restate earlier guesses);
  - numbers: signs (- + and the unicode minus), thousands separators (`1,234,567`), decimals,
    a leading `$`, a trailing `%` or unit word, simple fractions `3/4` and `\\frac{3}{4}`; compared
    exactly as Fractions, so `42`, `42.0`, `+42`, `$42.00` and `84/2` are all equal.

Two accuracies, reported separately because format gains can hide accuracy losses:
  - strict: the response has the required format (`FORMATS`) and its explicit answer is right;
  - lenient: the explicit answer is right, or the right number appears anywhere in the final
    non-empty line. strict implies lenient.

Formats (`check_format`):
  'any'    an explicit final answer exists (any of the markers above)
  'answer' a line is exactly `Answer: <number>` (data/conversations.py's SFT replies end with one,
           or start with one when the answer comes first); the last such line is the answer
  'gsm8k'  the last non-empty line is `#### <number>` (the SFT data's format)
  'think'  `<think>...</think>` first, then an explicit answer after it
  'r1'     exactly `<think>...</think> <answer>...</answer>` (DeepSeek-R1-Zero's template), the
           answer tag holding a number (or a \\boxed number)

Countdown: reach `target` with some of `numbers` (each at most once, or all exactly once with
use_all=True), + - * / and parentheses, exact rational arithmetic. The expression is parsed by a
small recursive-descent parser; nothing is ever eval'd.

A reward function here has the signature `fn(response: str, answer: str, info: Mapping) -> Score`
(data/tasks.py binds its knobs with functools.partial and stores it in each task item).
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Mapping, Optional, Sequence

FORMATS = ("any", "answer", "gsm8k", "think", "r1")


@dataclasses.dataclass(frozen=True)
class Score:
    """One response's score.

    reward: the scalar used for RL. strict / lenient: the two accuracies. format_ok: the required
    format holds. extracted: the explicit answer found (None when there is none).
    """

    reward: float
    strict: bool
    lenient: bool
    format_ok: bool
    extracted: Optional[str] = None


# ----------------------------------------------------------------------------- numbers

_MINUS = "\u2212\u2013"  # unicode minus, en dash (as typeset minus signs)
# A number: optional sign (not after a word character or ')', so '3-5' is 3 and 5, not 3 and -5),
# optional '$', digits with either proper thousands groups or none, optional decimals, or '.5'.
_NUM = (r"(?<![\w.)])[-+" + _MINUS + r"]?\$?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?![\d])"
        r"|(?<![\w.)])[-+" + _MINUS + r"]?\$?\.\d+")
_NUM_RE = re.compile(_NUM)
_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*([-+]?\d+)\s*\}")
_SLASH_RE = re.compile(r"^([-+]?\d+)\s*/\s*([-+]?\d+)$")


def parse_number(text: str) -> Optional[Fraction]:
    """The value of a string that is one number (with the decorations listed in the module
    docstring), else None. '1,234.50' -> 1234.5; '-$3' -> -3; '50%' -> 50; '\\frac{1}{2}' -> 1/2;
    '3/4' -> 3/4; 'twelve' -> None; '1,23' -> None."""
    if text is None:
        return None
    s = text.strip()
    for ch in _MINUS:
        s = s.replace(ch, "-")
    s = re.sub(r"^\\boxed\{(.*)\}$", r"\1", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    m = _FRAC_RE.fullmatch(s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    m = _SLASH_RE.match(s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    s = re.sub(r"\s*(%|percent)$", "", s)
    # a trailing unit word ("42 apples", "12 dollars") is allowed; anything else is not a number
    s = re.sub(r"\s+[A-Za-z]+\.?$", "", s)
    m = _NUM_RE.fullmatch(s)
    if not m:
        return None
    t = m.group(0).replace("$", "").replace(",", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def find_numbers(text: str) -> list[Fraction]:
    """Every number in the text, in order (thousands separators understood, '3-5' is 3 and 5)."""
    t = text
    for ch in _MINUS:
        t = t.replace(ch, "-")
    t = _FRAC_RE.sub(lambda m: f" {m.group(1)}/{m.group(2)} ", t)
    out = []
    for m in re.finditer(r"(?<![\w.)])([-+]?\d+)\s*/\s*([-+]?\d+)(?![\d.])|" + _NUM, t):
        if m.group(1) is not None:
            den = int(m.group(2))
            if den:
                out.append(Fraction(int(m.group(1)), den))
            continue
        v = parse_number(m.group(0))
        if v is not None:
            out.append(v)
    return out


def numbers_equal(a, b) -> bool:
    """Exact equality of two answers given as strings / numbers; False when either is not a number."""
    fa = a if isinstance(a, Fraction) else parse_number(str(a))
    fb = b if isinstance(b, Fraction) else parse_number(str(b))
    return fa is not None and fb is not None and fa == fb


# ----------------------------------------------------------------------------- extraction


def extract_boxed(text: str) -> Optional[str]:
    """Contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end():i - 1]
    return best.strip() if best is not None else None


def extract_gsm8k(text: str) -> Optional[str]:
    """The number after the last `####` (GSM8K's final-answer marker), else None."""
    ms = list(re.finditer(r"####\s*([^\n]*)", text))
    if not ms:
        return None
    nums = _NUM_RE.findall(ms[-1].group(1))
    return nums[0].strip() if nums else (ms[-1].group(1).strip() or None)


def extract_answer_tag(text: str) -> Optional[str]:
    """Contents of the last `<answer>...</answer>`, else None."""
    ms = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    return ms[-1].strip() if ms else None


_PHRASE_RE = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(?:\\boxed\{)?\s*("
    + r"\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|[-+" + _MINUS + r"]?\$?[\d.,]*\d(?:\s*/\s*\d+)?%?" + ")",
    flags=re.I)


def extract_answer_phrase(text: str) -> Optional[str]:
    """The number after the last 'the answer is' / 'final answer:' / 'Answer:' phrase, else None."""
    ms = list(_PHRASE_RE.finditer(text))
    return ms[-1].group(1).strip().rstrip(".,") if ms else None


def extract_answer_line(text: str) -> Optional[str]:
    """The number on the last line that is exactly 'Answer: <number>' (case-insensitive), else None."""
    for line in reversed(text.splitlines()):
        m = re.fullmatch(r"\s*answer\s*:\s*(.+?)\s*", line, flags=re.I)
        if m and parse_number(m.group(1)) is not None:
            return m.group(1).rstrip(".").strip()
    return None


def extract_answer(text: str) -> Optional[str]:
    """The explicit final answer: <answer> tag, then \\boxed, then ####, then 'the answer is';
    None when the response gives no explicit answer."""
    for f in (extract_answer_tag, extract_boxed, extract_gsm8k, extract_answer_phrase):
        a = f(text)
        if a:
            inner = extract_boxed(a) if f is extract_answer_tag else None
            return inner or a
    return None


def final_line(text: str) -> str:
    """The last non-empty line (stripped), '' for an empty response."""
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- format, accuracy


def check_format(response: str, fmt: str) -> bool:
    """Whether `response` has the format `fmt` (see FORMATS in the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown answer format {fmt!r}; choose one of {FORMATS}")
    if fmt == "any":
        return extract_answer(response) is not None
    if fmt == "answer":
        return extract_answer_line(response) is not None
    if fmt == "gsm8k":
        m = re.fullmatch(r"####\s*(.+)", final_line(response))
        return bool(m) and parse_number(m.group(1)) is not None
    if fmt == "think":
        m = re.fullmatch(r"\s*<think>(.+?)</think>(.*)", response, flags=re.S)
        return (bool(m) and "<think>" not in m.group(1) and "</think>" not in m.group(2)
                and extract_answer(m.group(2)) is not None)
    m = re.fullmatch(r"\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*", response, flags=re.S)
    if not m or "<think>" in m.group(1) or "<answer>" in m.group(2):
        return False
    a = m.group(2).strip()
    return parse_number(extract_boxed(a) or a) is not None


def _answer_part(response: str, fmt: str) -> str:
    """Where the explicit answer is looked for: after </think> for the thinking formats."""
    if fmt in ("think", "r1") and "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    return response


def score_math(response: str, answer: str, info: Optional[Mapping] = None, *, fmt: str = "any",
               reward: str = "strict", format_weight: float = 0.0) -> Score:
    """Scores a math response against the reference `answer` (a number as a string).

    strict  = check_format(response, fmt) and extract_answer(answer part) == answer
    lenient = extract_answer(response) == answer, or answer is among the numbers of the final line
    reward  = [strict or lenient, by `reward`] + format_weight * format_ok
    (R1-Zero: accuracy + format rewards; set format_weight > 0 to add a format bonus.)

    Args:
      response: the assistant's text.
      answer: the reference answer.
      info: unused (the common reward-function signature).
      fmt: the required format, one of FORMATS.
      reward: 'strict' or 'lenient', which accuracy the reward pays for.
      format_weight: the format bonus.
    """
    if reward not in ("strict", "lenient"):
        raise ValueError(f"reward must be 'strict' or 'lenient', got {reward!r}")
    if parse_number(answer) is None:
        raise ValueError(f"reference answer {answer!r} is not a number")
    fmt_ok = check_format(response, fmt)
    part = _answer_part(response, fmt)
    extracted = extract_answer_line(part) if fmt == "answer" else extract_answer(part)
    right = extracted is not None and numbers_equal(extracted, answer)
    strict = fmt_ok and right
    target = parse_number(answer)
    any_extracted = extract_answer(response)
    lenient = (right or (any_extracted is not None and numbers_equal(any_extracted, answer))
               or target in find_numbers(final_line(re.sub(r"</?\w+>", " ", response))))
    r = float(strict if reward == "strict" else lenient) + format_weight * float(fmt_ok)
    return Score(reward=r, strict=strict, lenient=lenient, format_ok=fmt_ok, extracted=extracted)


def format_reward(response: str, fmt: str) -> float:
    """1.0 when the response has the format, else 0.0 (R1-Zero's format reward)."""
    return float(check_format(response, fmt))


# ----------------------------------------------------------------------------- Countdown

_MAX_EXPR_CHARS = 300


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := INT | '(' expr ')'. No unary operators, no other tokens. Values are Fractions."""

    def __init__(self, text: str):
        self.toks = re.findall(r"\d+|[-+*/()]|\S", text)
        self.i = 0
        self.ints: list[int] = []
        self.depth = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def parse(self) -> Fraction:
        v = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")
        return v

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            v = v + self.term() if self.take() == "+" else v - self.term()
        return v

    def term(self) -> Fraction:
        v = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            w = self.factor()
            if op == "*":
                v = v * w
            elif w == 0:
                raise ValueError("division by zero")
            else:
                v = v / w
        return v

    def factor(self) -> Fraction:
        t = self.take()
        if t is None:
            raise ValueError("unexpected end")
        if t == "(":
            self.depth += 1
            if self.depth > 50:
                raise ValueError("too deeply nested")
            v = self.expr()
            if self.take() != ")":
                raise ValueError("missing ')'")
            self.depth -= 1
            return v
        if t.isdigit():
            self.ints.append(int(t))
            return Fraction(int(t))
        raise ValueError(f"unexpected {t!r}")


def evaluate_countdown(expression: str) -> tuple[Optional[Fraction], list[int]]:
    """(exact value, integers used in order) of an arithmetic expression over non-negative integer
    literals with + - * / and parentheses; (None, []) when it does not parse or divides by zero."""
    e = expression.strip().replace("\u00d7", "*").replace("\u00f7", "/").replace("x", "*") \
        .replace("\u2212", "-")
    if not e or len(e) > _MAX_EXPR_CHARS:
        return None, []
    p = _Parser(e)
    try:
        return p.parse(), p.ints
    except (ValueError, RecursionError):
        return None, []


def extract_countdown_expression(response: str) -> Optional[str]:
    """The candidate equation: the last <answer> tag, else the last \\boxed, else the final line;
    a trailing '= <target>' is dropped. None when nothing is there."""
    e = extract_answer_tag(response) or extract_boxed(response) or final_line(response)
    if not e:
        return None
    e = e.strip().strip("$").strip()
    if "=" in e:
        lhs, rhs = e.rsplit("=", 1)
        # "expr = 24" keeps expr; "24 = expr" keeps expr.
        e = lhs if re.fullmatch(r"\s*\d+\s*\.?\s*", rhs) else rhs
    return e.strip().rstrip(".").strip() or None


def check_countdown(expression: str, numbers: Sequence[int], target: int, *, use_all: bool = False) -> bool:
    """True iff the expression evaluates exactly to `target` using only `numbers`, each at most
    once (exactly once each when use_all), with + - * / and parentheses."""
    value, used = evaluate_countdown(expression)
    if value is None or value != target:
        return False
    pool = list(numbers)
    for u in used:
        if u not in pool:
            return False
        pool.remove(u)
    return not pool if use_all else True


def score_countdown(response: str, answer: str, info: Mapping, *, fmt: str = "any",
                    use_all: bool = False, format_weight: float = 0.0) -> Score:
    """Scores a Countdown response. info: {'numbers': [...], 'target': int}.

    fmt='r1' requires `<think>...</think><answer>expr</answer>` for strict; otherwise strict =
    lenient = the extracted expression checks. `answer` (a reference solution) is not used: any
    correct expression counts.
    """
    numbers, target = list(info["numbers"]), int(info["target"])
    fmt_ok = True
    if fmt == "r1":
        fmt_ok = bool(re.fullmatch(r"\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*", response,
                                   flags=re.S))
    elif fmt == "think":
        fmt_ok = bool(re.fullmatch(r"\s*<think>(.+?)</think>(.+)", response, flags=re.S))
    elif fmt != "any":
        raise ValueError(f"countdown format must be 'any', 'think' or 'r1', got {fmt!r}")
    expr = extract_countdown_expression(_answer_part(response, fmt))
    ok = expr is not None and check_countdown(expr, numbers, target, use_all=use_all)
    strict = fmt_ok and ok
    return Score(reward=float(strict) + format_weight * float(fmt_ok), strict=strict, lenient=ok,
                 format_ok=fmt_ok, extracted=expr)
