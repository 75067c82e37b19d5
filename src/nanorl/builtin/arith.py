"""The built-in offline task `arith`: generated multiple-choice arithmetic word problems, AQuA-RAT style.

Every record has exactly the AQuA-RAT schema, `{"question", "options": ["A)..", .., "E).."], "rationale",
"correct"}`, and the task asks, extracts and rewards exactly like the AQuA task (`nanorl.multichoice`), so the
whole pipeline runs offline on it and the same code paths serve both.

Design, and why:
- Levels. `arith` (level 1): one addition or subtraction of numbers below 100. `arith2`: two steps (add then
  subtract, multiply then add, ...), numbers below 1000. `arith3`: three steps. Level 1 is sized for a tiny
  model on a CPU (docs/data.md has what a probe measured).
- Splits are disjoint by construction: a problem's split is fixed by a hash of its canonical form (the
  operation and the numbers, not the names or wording), so no dev/test problem appears in train with other
  names, whatever the seed. Sizes: train 20,000, dev 300, test 300. Level 1 has only ~12,700 distinct
  problems, so its train split renders a problem up to TRAIN_RENDERINGS times (other names, wording and
  options), which keeps additions and subtractions half and half; dev and test hold each problem once.
- Options are sorted ascending, like most AQuA questions. The correct value's rank among them is drawn
  uniformly (so the letters A-E are uniform), and the gaps between neighbouring options are drawn independently
  on both sides, so the set of options says nothing about which one is right: distractors are close (off by
  one or two, as slips are), and only computing finds the answer. Level 1 draws gaps from {1, 2}: the five
  options then span at most 8 and never share a last digit. Levels 2-3 draw from {1..5, 10} (10: a slipped
  tens digit). Level 1's train split gives half its problems wide options instead (WIDE_FRACTION, below):
  close options let a model guess the digits it should copy.
- Level 1 rationales add or subtract in columns (ones, then tens, with the carry or borrow), so every line is a
  one-digit fact and the result is copied from two lines (`_columns`); levels 2-3 write one equation per step.
- The rationale computes the value step by step, then walks the options in order and stops at the match; the
  last line is the answer line. Mapping a computed value back to its letter is what a tiny model finds hardest:
  looking the value up among the options (`154 is option C`) stayed at chance in the tiny pipeline (300-500
  base steps), with or without lookup drills in the corpus (docs/benchmarks.md). The walk turns the lookup into
  steps a small transformer learns: copy the next option from the prompt, compare, stop; the letter to write is
  then on the line above. Level 1 compares last digits (`C) 154: 4 vs 4 yes`), one token against one token,
  because a multi-digit equality against close distractors was not learned in the budget either; it is exact,
  since no two level-1 options share a last digit. Levels 2-3 compare whole values (`C) 154 yes`). It is a
  real procedure, not a leak: the comparison needs the computed answer.
- The pretraining corpus (`corpus()`) is the train split written as plain text (the prompt, then the rationale),
  so pretraining already sees the format and the copying it needs, and never sees a dev/test problem.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache

from nanorl.api import (
    LETTERS,
    Conversation,
    Example,
    NanorlError,
    Reward,
    Task,
    correct_reward,
    extract_letter,
    final_answer_line,
    format_reward,
    hookimpl,
    mc_conversation,
)

SPLIT_SIZES = {"train": 20_000, "dev": 300, "test": 300}
# 1 in 40 canonical problems goes to dev, 1 in 40 to test: level 1 has ~12,700 problems, ~318 each, >= 300
HASH_BUCKETS = 40
SEED = 1234  # the generator's seed; the split a problem lands in does not depend on it
# A train problem may appear up to this many times, each with its own names, wording and options; dev and test
# hold each problem once. Why: problems are drawn half additions, half subtractions, but level 1 has ~3,100
# subtractions (answer >= 20) against ~9,700 additions, so without repeats train was 24% subtraction, and the
# tiny model got 99% of additions but 28-32% of subtractions right (docs/benchmarks.md). With repeats train
# keeps the draw's half-and-half; dev/test keep the space's share (~77% additions), so their accuracy is
# reported per operation as well.
TRAIN_RENDERINGS = 6
# Level 1's train split gives this share of its problems wide options (gaps WIDE_GAPS, span up to 36), dev and
# test never: the walk must copy each option's last digit from the prompt, and with close options (span <= 8,
# all near the answer) a model can instead write digits near the answer's and be right often enough that the
# copy never forms. That happened on 2 of 5 seeds, whose base checkpoints copied the last digit 60-68% of the
# time against 99-100% on the good seeds (bench/copy_probe.py); with wide options the guess stops paying.
WIDE_FRACTION = 0.5
WIDE_GAPS = tuple(range(1, 10))

NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Ben", "Mia", "Ravi", "Zoe", "Ivan", "Nina", "Sam")
THINGS = ("apples", "books", "coins", "stamps", "marbles", "pens", "cards", "shells", "eggs", "stickers")

# A problem kind: draw(rng) -> canonical key (the operation and its numbers); render(key, rng) -> (question,
# rationale steps, value). Drawing is cheap and comes first, so repeated keys cost little.


def _words(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(THINGS)


def _draw_add(rng: random.Random) -> tuple:
    a = rng.randint(1, 99)
    b = rng.randint(max(1, 20 - a), 99)  # answer >= 20 (see LEVELS)
    return ("+", a, b)


def _draw_sub(rng: random.Random) -> tuple:
    a = rng.randint(21, 99)
    return ("-", a, rng.randint(1, a - 20))  # answer >= 20


def _render_1(key: tuple, rng: random.Random) -> tuple[str, list[str], int]:
    op, a, b = key
    name, thing = _words(rng)
    if op == "+":
        q = rng.choice(
            (
                f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
                f"A box holds {a} {thing}. {name} puts in {b} more {thing}. How many {thing} are in the box?",
                f"{name} collected {a} {thing} on Monday and {b} {thing} on Tuesday. How many {thing} in all?",
            )
        )
        return q, _columns(a, b, "+"), a + b
    q = rng.choice(
        (
            f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?",
            f"A shop had {a} {thing} and sold {b} of them. How many {thing} does the shop have now?",
            f"{name} needs {a} {thing} and already has {b}. How many more {thing} does {name} need?",
        )
    )
    return q, _columns(a, b, "-"), a - b


def _columns(a: int, b: int, op: str) -> list[str]:
    """Two-digit column arithmetic, ones then tens, as taught at school: every line is a one-digit fact (plus a
    carry or a borrow), and the result is the tens line's result followed by the ones line's last digit.

        ones: 8 + 5 = 13, carry 1        ones: 13 - 7 = 6, borrow 1
        tens: 6 + 7 + 1 = 14             tens: 8 - 1 - 2 = 5
        68 + 75 = 143.                   83 - 27 = 56.
    """
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        ones = ua + ub
        carry = ones >= 10
        tens = ta + tb + carry
        lines = [
            f"ones: {ua} + {ub} = {ones}" + (", carry 1" if carry else ""),
            f"tens: {ta} + {tb}" + (" + 1" if carry else "") + f" = {tens}",
        ]
        return [*lines, f"{a} + {b} = {a + b}."]
    borrow = ua < ub
    ones = ua + 10 * borrow - ub
    tens = ta - borrow - tb
    lines = [
        f"ones: {ua + 10 * borrow} - {ub} = {ones}" + (", borrow 1" if borrow else ""),
        f"tens: {ta}" + (" - 1" if borrow else "") + f" - {tb} = {tens}",
    ]
    return [*lines, f"{a} - {b} = {a - b}."]


def _draw_2(rng: random.Random) -> tuple:
    """Two steps, every number and result below 1000, the answer >= 40 (see LEVELS)."""
    while True:
        op = rng.choice(("+-", "*+", "*-", "/+"))
        if op == "+-":
            key = (op, rng.randint(10, 999), rng.randint(10, 999), rng.randint(10, 999))
            ok = key[1] + key[2] <= 999 and key[1] + key[2] - key[3] >= 40
        elif op == "*+":
            key = (op, rng.randint(2, 12), rng.randint(2, 40), rng.randint(1, 99))
            ok = key[1] * key[2] + key[3] >= 40
        elif op == "*-":
            key = (op, rng.randint(2, 12), rng.randint(5, 60), rng.randint(1, 99))
            ok = key[1] * key[2] - key[3] >= 40
        else:
            b, quotient = rng.randint(2, 9), rng.randint(5, 99)
            key = (op, b * quotient, b, rng.randint(10, 99))
            ok = quotient + key[3] >= 40
        if ok:
            return key


def _render_2(key: tuple, rng: random.Random) -> tuple[str, list[str], int]:
    op, a, b, c = key
    name, thing = _words(rng)
    if op == "+-":
        q = f"{name} has {a} {thing}, buys {b} more and then gives away {c}. How many {thing} does {name} have now?"
        return q, [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c
    if op == "*+":
        q = f"{name} has {a} bags with {b} {thing} in each bag, and {c} more {thing} loose. How many {thing} in total?"
        return q, [f"{a} * {b} = {a * b}.", f"{a * b} + {c} = {a * b + c}."], a * b + c
    if op == "*-":
        q = f"There are {a} boxes of {b} {thing}. {name} takes {c} {thing} away. How many are left in the boxes?"
        return q, [f"{a} * {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c
    share = a // b
    q = (
        f"{a} {thing} are shared equally among {b} friends. {name} is one of them and already had {c}. "
        f"How many {thing} does {name} have now?"
    )
    return q, [f"{a} / {b} = {share}.", f"{share} + {c} = {share + c}."], share + c


def _draw_3(rng: random.Random) -> tuple:
    while True:
        a, b, c, d = rng.randint(2, 9), rng.randint(5, 50), rng.randint(10, 99), rng.randint(10, 99)
        if a * b + c - d >= 40:
            return ("*+-", a, b, c, d)


def _render_3(key: tuple, rng: random.Random) -> tuple[str, list[str], int]:
    _, a, b, c, d = key
    name, thing = _words(rng)
    s1, s2 = a * b, a * b + c
    q = (
        f"{name} buys {a} packs of {b} {thing}, then finds {c} more {thing} and gives {d} {thing} to a friend. "
        f"How many {thing} does {name} have?"
    )
    return q, [f"{a} * {b} = {s1}.", f"{s1} + {c} = {s2}.", f"{s2} - {d} = {s2 - d}."], s2 - d


# level -> (draw, render, gap choices between neighbouring options). Answers are kept >= 4 x the largest gap, so
# the smallest option is never negative (a count of things can't be) without bending the letters' uniformity.
LEVELS: dict[int, tuple[Callable, Callable, tuple[int, ...]]] = {
    1: (lambda r: (_draw_add if r.random() < 0.5 else _draw_sub)(r), _render_1, (1, 2)),
    2: (_draw_2, _render_2, (1, 2, 3, 4, 5, 10)),
    3: (_draw_3, _render_3, (1, 2, 3, 4, 5, 10)),
}


def _bucket(key: tuple) -> str:
    h = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big") % HASH_BUCKETS
    return "dev" if h == 0 else "test" if h == 1 else "train"


def _options(rng: random.Random, value: int, gaps: tuple[int, ...], k: int | None = None) -> tuple[list[int], str]:
    """Five sorted option values containing `value` at rank `k` (drawn uniformly when not given); gaps iid on
    both sides."""
    k = rng.randrange(5) if k is None else k
    below, above = [], []
    v = value
    for _ in range(k):
        v -= rng.choice(gaps)
        below.append(v)
    v = value
    for _ in range(4 - k):
        v += rng.choice(gaps)
        above.append(v)
    return [*reversed(below), value, *above], LETTERS[k]


def _wide_options(rng: random.Random, value: int) -> tuple[list[int], str]:
    """Level 1's wide train options (WIDE_FRACTION): gaps from WIDE_GAPS, redrawn at the same rank (so the
    letters stay uniform) until no option is negative and no two share a last digit (the walk compares them)."""
    k = rng.randrange(5)
    while True:
        values, letter = _options(rng, value, WIDE_GAPS, k)
        if values[0] >= 0 and len({v % 10 for v in values}) == 5:
            return values, letter


def _walk_line(letter: str, v: int, value: int, by_last_digit: bool) -> str:
    """One line of the walk over the options: the option as the prompt writes it, then whether it is the answer.
    By last digit (level 1, whose options all differ there): `C) 154: 4 vs 4 yes`; by value: `C) 154 yes`."""
    verdict = "yes" if v == value else "no"
    return f"{letter}) {v}: {v % 10} vs {value % 10} {verdict}" if by_last_digit else f"{letter}) {v} {verdict}"


def _record(
    question: str, steps: list[str], value: int, rng: random.Random, gaps: tuple[int, ...], wide: random.Random | None
) -> dict:
    """One AQuA-RAT record. `wide`: the generator of level 1's wide train options, None elsewhere."""
    values, letter = _options(rng, value, gaps)
    if wide is not None and wide.random() < WIDE_FRACTION:
        # drawn from their own generator, after the close ones (which are dropped): the main generator's draws,
        # and so the dev and test splits, are the same as without wide options
        values, letter = _wide_options(wide, value)
    # with neighbouring gaps <= 2 the five options span at most 8, so no two share a last digit and the digit
    # alone tells the answer apart (level 1)
    by_last_digit = max(gaps) <= 2
    walk = []
    for lt, v in zip(LETTERS, values, strict=False):
        walk.append(_walk_line(lt, v, value, by_last_digit))
        if v == value:
            break
    rationale = "\n".join([*steps, f"The answer is {value}.", *walk, final_answer_line(letter)])
    return {
        "question": question,
        "options": [f"{lt}){v}" for lt, v in zip(LETTERS, values, strict=False)],
        "rationale": rationale,
        "correct": letter,
    }


@lru_cache(maxsize=8)
def generate(level: int = 1, seed: int = SEED) -> dict[str, tuple[dict, ...]]:
    """All three splits of a level as AQuA-RAT records, deterministic for (level, seed). Cached per process."""
    if level not in LEVELS:
        raise NanorlError(f"unknown arith level {level} (1, 2 or 3)", exit_code=2)
    draw, render, gaps = LEVELS[level]
    rng = random.Random(f"arith-{level}-{seed}")
    wide = random.Random(f"arith-wide-{seed}") if level == 1 else None
    out: dict[str, list[dict]] = {s: [] for s in SPLIT_SIZES}
    renderings: Counter[tuple] = Counter()
    # Stop when every split is full, or when 20,000 draws in a row added nothing: a level whose space is
    # nearly exhausted (level 1 has ~12,700 problems) would otherwise spend most of its time on repeats.
    misses = 0
    while misses < 20_000:
        key = draw(rng)
        split = _bucket(key)
        if renderings[key] >= (TRAIN_RENDERINGS if split == "train" else 1) or len(out[split]) >= SPLIT_SIZES[split]:
            misses += 1
            continue
        misses = 0
        renderings[key] += 1
        out[split].append(_record(*render(key, rng), rng, gaps, wide if split == "train" else None))
        if all(len(out[s]) >= n for s, n in SPLIT_SIZES.items()):
            break
    return {s: tuple(recs) for s, recs in out.items()}


class ArithTask(Task):
    description = "generated multiple-choice arithmetic word problems (offline, AQuA-RAT format)"
    default_rewards = {"arith.correct": 1.0, "arith.format": 1.0}  # format_reward itself pays the 0.1

    def __init__(self, level: int = 1, seed: int = SEED):
        self.level = level
        self.seed = seed
        self.name = "arith" if level == 1 else f"arith{level}"
        self.description = f"{ArithTask.description}, level {level}"

    def records(self, split: str) -> list[dict]:
        """One split as AQuA-RAT records: {"question", "options", "rationale", "correct"}."""
        split = "dev" if split == "validation" else split
        if split not in SPLIT_SIZES:
            raise NanorlError(
                f"unknown split {split!r} for task {self.name} (train, dev, test)",
                hint="dev is what the pipeline evaluates; test is held out",
                exit_code=2,
            )
        return [dict(r) for r in generate(self.level, self.seed)[split]]

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        split = "dev" if split == "validation" else split
        return [
            Example(
                id=f"{self.name}-{split}-{i}",
                question=r["question"],
                answer=r["correct"],
                options=r["options"],
                rationale=r["rationale"],
                meta={"level": self.level},
            )
            for i, r in enumerate(self.records(split))
        ]

    def prompt(self, example: Example) -> Conversation:
        return mc_conversation(example.question, example.options or [])

    def target(self, example: Example) -> str:
        return example.rationale or final_answer_line(example.answer)

    def extract(self, completion: str) -> str | None:
        return extract_letter(completion)

    def corpus(self, split: str = "train") -> Iterator[str]:
        """Plain-text documents: each train problem as the prompt shows it, then its rationale."""
        for ex in self.load(split):
            yield self.prompt(ex)[0]["content"] + "\n\n" + self.target(ex)


@hookimpl
def register_tasks(register):
    for level in LEVELS:
        register(ArithTask(level))


_STATED = re.compile(r"^The answer is (-?\d+)\.$", re.M)


def value_reward(example: Example, completion: str, answer: str | None) -> float:
    """1.0 when the completion's `The answer is V.` line states the true value (the gold rationale's), else 0.0:
    a reward for the arithmetic itself, where the letter can also be right by a matching last digit."""
    gold = _STATED.search(example.rationale or "")
    got = _STATED.search(completion)
    return 1.0 if gold is not None and got is not None and got.group(1) == gold.group(1) else 0.0


@hookimpl
def register_rewards(register):
    register(Reward("arith.correct", correct_reward, "1.0 when the answer letter is the correct one"))
    register(Reward("arith.value", value_reward, "1.0 when the rationale states the true value ('The answer is V.')"))
    register(Reward("arith.format", format_reward, "0.1 when the completion ends with 'Final Answer: <letter>'"))
