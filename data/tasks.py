"""Prompts with checkable answers for RL on verifiable rewards.

Three sources, each deterministic by seed and each returning `TaskItem`s:

    train = synthetic_math_tasks(seed=0, split="train", n=1000)   # the synthetic world's word problems
    test = synthetic_math_tasks(seed=0, split="test", n=200)      # unseen templates + unseen numbers
    gsm = gsm8k_tasks("../shared/data/gsm8k", split="test")      # GSM8K from its jsonl files
    cd = countdown_tasks(seed=0, split="train", n=1000)           # Countdown, solvable by construction
    item.score("... Answer: 42")                                  # -> core.rewards.Score

A TaskItem holds the prompt (core/chat.py messages, without the assistant reply), the reference
answer, `info` (what the reward function needs besides the answer, and metadata for reports),
and `reward_fn`, a reference to a core/rewards.py scorer with its knobs bound (a picklable
functools.partial): `reward_fn(response, answer, info) -> Score`.

Splits:
  synthetic math: synthetic.math_problems' own split. 'test' draws half its problems from
    templates the train split never uses and half from train templates with number tuples the
    train split never draws (crc32 rule), so no test question appears in train.
    info['heldout_template'] says which half an item is in.
  GSM8K: its train.jsonl / test.jsonl.
  Countdown: an instance (sorted numbers, target) is test iff crc32 of its text is 0 mod 8, so
    the two splits never share an instance.

Answer formats (core.rewards.FORMATS) decide the instruction added to the prompt:
  'answer' (default for synthetic math): nothing added; the SFT data ends replies with 'Answer: N'.
  'any':    nothing added; any explicit answer marker counts.
  'gsm8k':  asks for a last line '#### N'.
  'think':  a system prompt asks for <think> ... </think> then 'Answer: N'.
  'r1':     DeepSeek-R1-Zero's template as the system prompt (<think> and <answer> tags).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from core import rewards
from data import readers, synthetic

# DeepSeek-R1 paper, Table 1 (the R1-Zero training template), as a system message.
R1_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.")
THINK_SYSTEM = ("Think through the problem inside <think> </think> tags first, then give the final "
                "answer on its own line as 'Answer: <number>'.")
GSM8K_INSTRUCTION = ("Solve the problem step by step. Write the final answer on its own last line "
                     "as '#### <number>'.")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One RL prompt with a checkable answer.

    Attributes:
      id: a stable identifier ('<source>/<split>/<seed>/<index>' or the GSM8K line).
      prompt: tuple of core/chat.py messages {"role", "content"} (system and user turns).
      answer: the reference answer (a number as a string; Countdown: a reference solution).
      reward_fn: `fn(response, answer, info) -> core.rewards.Score`.
      info: what the scorer needs beyond the answer (Countdown: numbers, target) plus metadata
        (source, split, template, ...).
    """

    id: str
    prompt: tuple
    answer: str
    reward_fn: Callable[..., rewards.Score]
    info: Mapping[str, Any]

    @property
    def messages(self) -> list[dict]:
        """The prompt as a fresh list of message dicts (safe to append a reply to)."""
        return [dict(m) for m in self.prompt]

    def score(self, response: str) -> rewards.Score:
        """The response's reward and accuracies."""
        return self.reward_fn(response, self.answer, self.info)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _messages(question: str, fmt: str, instruction: Optional[str]) -> tuple:
    """Prompt messages for a question in the given answer format (see the module docstring)."""
    system = {"think": THINK_SYSTEM, "r1": R1_SYSTEM}.get(fmt)
    if instruction is None:
        instruction = GSM8K_INSTRUCTION if fmt == "gsm8k" else ""
    user = f"{question}\n{instruction}" if instruction else question
    msgs = ({"role": "system", "content": system},) if system else ()
    return msgs + ({"role": "user", "content": user},)


def _math_reward(fmt: str, reward: str, format_weight: float):
    _check(fmt in rewards.FORMATS, f"unknown answer format {fmt!r}; choose one of {rewards.FORMATS}")
    _check(reward in ("strict", "lenient"), f"reward must be 'strict' or 'lenient', got {reward!r}")
    return functools.partial(rewards.score_math, fmt=fmt, reward=reward, format_weight=format_weight)


# ----------------------------------------------------------------------------- math


def short_math_tasks(seed: int = 0, split: str = "train", n: int = 100, *, fmt: str = "answer",
                     reward: str = "strict", format_weight: float = 0.0) -> list[TaskItem]:
    """data/conversations.py's short two-step one-digit word problems (the SFT mixture's
    `math_short` kind; split 'heldout' has templates and numbers never trained on), for RL on a
    model small enough that the full synthetic_math problems are out of reach."""
    from data import conversations as conv

    fn = _math_reward(fmt, reward, format_weight)
    return [TaskItem(f"short_math/{split}/{seed}/{i}", ({"role": "user", "content": p["question"]},), p["answer"], fn,
                     {"source": "short_math", "split": split, "template": p["template"], "format": fmt,
                      "heldout_template": p["template"] in conv.SHORT_MATH_HELDOUT_TEMPLATES})
            for i, p in enumerate(conv.short_math_problems(seed, split, n))]


def synthetic_math_tasks(seed: int, split: str = "train", n: int = 100, *, fmt: str = "answer",
                         reward: str = "strict", format_weight: float = 0.0,
                         instruction: Optional[str] = None) -> list[TaskItem]:
    """The synthetic world's GSM8K-style word problems (data/synthetic.py `math_problems`).

    Args:
      seed: any int; the same (seed, split, n) gives the same items, and item i does not depend on n.
      split: 'train' or 'test' (see the module docstring for how they are disjoint).
      n: number of items.
      fmt: the required answer format (core.rewards.FORMATS) for strict accuracy.
      reward: which accuracy the reward pays, 'strict' or 'lenient'.
      format_weight: a format bonus added to the reward.
      instruction: text appended to the question (default: the format's, see the module docstring).
    """
    _check(split in ("train", "test"), f"synthetic math split must be 'train' or 'test', got {split!r}")
    _check(n >= 0, f"n must be >= 0, got {n}")
    fn = _math_reward(fmt, reward, format_weight)
    out = []
    for i, p in enumerate(synthetic.math_problems(seed, split, n)):
        info = {"source": "synthetic_math", "split": split, "template": p["template"],
                "heldout_template": p["template"] in synthetic.MATH_TEST_TEMPLATES,
                "question": p["question"], "solution": p["solution"], "format": fmt}
        out.append(TaskItem(f"synthetic_math/{split}/{seed}/{i}", _messages(p["question"], fmt, instruction),
                            p["answer"], fn, info))
    return out


def gsm8k_tasks(path, split: str = "train", n: Optional[int] = None, *, fmt: str = "any",
                reward: str = "strict", format_weight: float = 0.0,
                instruction: Optional[str] = None) -> list[TaskItem]:
    """GSM8K problems from a directory holding {train,test}.jsonl (or one .jsonl file).

    Args:
      path: e.g. '../shared/data/gsm8k', or a .jsonl file (then `split` only labels the items).
      split: 'train' or 'test'.
      n: the first n problems (None = all).
      fmt, reward, format_weight, instruction: as in `synthetic_math_tasks`; an imported chat
        model usually gets fmt='any' with BOXED_INSTRUCTION.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        _check(split in ("train", "test"), f"gsm8k split must be 'train' or 'test', got {split!r}")
        p = p / f"{split}.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"gsm8k tasks: {p} not found "
                                "(expected a directory with train.jsonl / test.jsonl)")
    problems = readers.read_gsm8k(p)
    if n is not None:
        problems = problems[:n]
    fn = _math_reward(fmt, reward, format_weight)
    return [TaskItem(f"gsm8k/{split}/{i}", _messages(q["question"], fmt, instruction), q["answer"], fn,
                     {"source": "gsm8k", "split": split, "question": q["question"],
                      "solution": q["solution"], "format": fmt})
            for i, q in enumerate(problems)]


# ----------------------------------------------------------------------------- Countdown


def countdown_is_test(numbers: Sequence[int], target: int) -> bool:
    """The split rule: an instance is test iff crc32('sorted numbers:target') % 8 == 0."""
    return zlib.crc32(f"{sorted(numbers)}:{target}".encode()) % 8 == 0


def _countdown_instance(rng: random.Random, n_numbers: int, max_number: int, max_target: int):
    """Random numbers and a target reached by combining all of them (so it is solvable): repeatedly
    take two values from the pool and combine them with an operation whose result stays a positive
    integer (subtract the smaller from the larger; divide only exactly). Returns (numbers, target,
    solution expression) or None when the result is out of range or trivial."""
    numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
    pool = [(v, str(v)) for v in numbers]  # (value, expression)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (a, ea), (b, eb) = pool[i], pool[j]
        if a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [(v, f"({ea} {op} {eb})")]
    target, expr = pool[0]
    if not 1 <= target <= max_target or target in numbers:
        return None
    return numbers, target, expr[1:-1] if expr.startswith("(") else expr


def countdown_prompt(numbers: Sequence[int], target: int, fmt: str = "r1", use_all: bool = False) -> str:
    """TinyZero's Countdown prompt (Pan et al. 2025), with the answer instruction for `fmt`."""
    rule = "each number must be used exactly once" if use_all else "each number can be used at most once"
    base = (f"Using the numbers {list(numbers)}, create an equation that equals {target}. You can use "
            f"basic arithmetic operations (+, -, *, /) and {rule}.")
    if fmt == "r1":
        return (base + " Show your work in <think> </think> tags. And return the final answer in "
                "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
    if fmt == "think":
        return (base + " Show your work in <think> </think> tags, then write the equation alone on "
                "the last line.")
    return base + " Write the equation alone on the last line."


def countdown_tasks(seed: int, split: str = "train", n: int = 100, *, n_numbers: Sequence[int] = (3, 4),
                    max_number: int = 99, max_target: int = 100, fmt: str = "r1", use_all: bool = False,
                    format_weight: float = 0.0) -> list[TaskItem]:
    """Countdown instances: reach `target` with the given numbers and + - * /, exact arithmetic.

    Every instance is solvable (its target is built from all its numbers; info['solution'] holds
    that expression). Deterministic by seed: item i depends only on (seed, split, i).

    Args:
      seed: any int.
      split: 'train' or 'test' (disjoint by `countdown_is_test`).
      n: number of items.
      n_numbers: how many numbers an instance may have (drawn uniformly from these).
      max_number: numbers are drawn from 1..max_number.
      max_target: targets lie in 1..max_target (and are not one of the numbers).
      fmt: 'r1' (TinyZero's <think>/<answer> prompt), 'think' or 'any'.
      use_all: require every number exactly once (TinyZero's checker) instead of at most once.
      format_weight: a format bonus added to the reward.
    """
    _check(split in ("train", "test"), f"countdown split must be 'train' or 'test', got {split!r}")
    _check(fmt in ("any", "think", "r1"), f"countdown format must be 'any', 'think' or 'r1', got {fmt!r}")
    _check(len(n_numbers) > 0 and all(k >= 2 for k in n_numbers),
           f"n_numbers must be sizes >= 2, got {n_numbers}")
    _check(max_number >= 2 and max_target >= 1,
           f"need max_number >= 2 and max_target >= 1, got {max_number}, {max_target}")
    fn = functools.partial(rewards.score_countdown, fmt=fmt, use_all=use_all, format_weight=format_weight)
    want_test = split == "test"
    out = []
    for i in range(n):
        rng = random.Random(f"countdown:{seed}:{split}:{i}")
        for _ in range(10_000):
            inst = _countdown_instance(rng, rng.choice(list(n_numbers)), max_number, max_target)
            if inst is not None and countdown_is_test(inst[0], inst[1]) == want_test:
                break
        else:
            raise ValueError(f"countdown_tasks: no instance found for max_number={max_number}, "
                             f"max_target={max_target}, n_numbers={n_numbers}")
        numbers, target, solution = inst
        info = {"source": "countdown", "split": split, "numbers": tuple(numbers), "target": target,
                "solution": solution, "use_all": use_all, "format": fmt}
        system = ({"role": "system", "content": R1_SYSTEM},) if fmt == "r1" else ()
        prompt = system + ({"role": "user", "content": countdown_prompt(numbers, target, fmt, use_all)},)
        out.append(TaskItem(f"countdown/{split}/{seed}/{i}", prompt, solution, fn, info))
    return out


def solve_countdown(numbers: Sequence[int], target: int, *, use_all: bool = False) -> Optional[str]:
    """An expression reaching `target` from `numbers` (exhaustive search over pairings, exact
    fractions), or None. For checking generated instances; fine for up to 5 numbers."""
    from fractions import Fraction

    def search(items):
        for v, e in items:
            if v == target and (not use_all or len(items) == 1):
                return e
        if len(items) == 1:
            return None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea), (b, eb) = items[i], items[j]
                rest = [x for k, x in enumerate(items) if k not in (i, j)]
                cands = [(a + b, f"({ea} + {eb})"), (a - b, f"({ea} - {eb})"), (a * b, f"({ea} * {eb})")]
                if b != 0:
                    cands.append((a / b, f"({ea} / {eb})"))
                for c in cands:
                    r = search(rest + [c])
                    if r is not None:
                        return r
        if not use_all:  # drop a number (each at most once)
            for i in range(len(items)):
                r = search(items[:i] + items[i + 1:]) if len(items) > 1 else None
                if r is not None:
                    return r
        return None

    return search([(Fraction(v), str(v)) for v in numbers])


# ----------------------------------------------------------------------------- specs


def open_tasks(spec: str) -> list[TaskItem]:
    """Tasks from a flag value:
      'synthetic_math[:seed=0,split=train,n=100,fmt=answer,reward=strict]'
      'gsm8k:PATH[,split=train,n=,fmt=any,reward=strict]'
      'countdown[:seed=0,split=train,n=100,fmt=r1,use_all=0,max_number=99,max_target=100]'
      'short_math[:seed=0,split=train|heldout,n=100,fmt=answer,reward=strict]'
    """
    name, _, rest = spec.partition(":")
    args = [a for a in rest.split(",") if a] if rest else []
    path = None
    if name == "gsm8k":
        _check(bool(args) and "=" not in args[0],
               f"gsm8k tasks need a path: 'gsm8k:PATH[,split=test]', got {spec!r}")
        path, args = args[0], args[1:]
    kw: dict[str, Any] = {}
    for a in args:
        _check("=" in a, f"task spec {spec!r}: expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        kw[k] = v
    ints = {"seed", "n", "max_number", "max_target"}
    for k in list(kw):
        if k in ints:
            kw[k] = int(kw[k])
        elif k == "format_weight":
            kw[k] = float(kw[k])
        elif k == "use_all":
            kw[k] = kw[k].lower() in ("1", "true", "yes")
    try:
        if name == "synthetic_math":
            return synthetic_math_tasks(**{"seed": 0, **kw})
        if name == "short_math":
            return short_math_tasks(**kw)
        if name == "gsm8k":
            return gsm8k_tasks(path, **kw)
        if name == "countdown":
            return countdown_tasks(**{"seed": 0, **kw})
    except TypeError as e:
        raise ValueError(f"task spec {spec!r}: {e}") from None
    raise ValueError(f"unknown task source {name!r} in {spec!r}; choose synthetic_math, short_math, gsm8k or countdown")
