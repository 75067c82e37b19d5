"""The built-in `arith` task: AQuA-RAT schema, disjoint splits, balanced letters, honest options, rewards."""

import re
from collections import Counter

import pytest

from nanorl.api import NanorlError, extract_letter
from nanorl.builtin import arith
from nanorl.multichoice import ends_with_final_answer, final_answer_line, option_text
from nanorl.plugins import get_plugins

LETTERS = "ABCDE"
# chi-square critical value, 4 degrees of freedom, p = 0.001: a fair die over 5 letters fails it 1 time in 1000
CHI2_4DOF_P001 = 18.47


def _chi2(letters):
    counts = Counter(letters)
    expected = len(letters) / 5
    return sum((counts.get(x, 0) - expected) ** 2 / expected for x in LETTERS)


def _steps(record):
    """The canonical problem: the computation lines before 'The answer is' (operation and numbers)."""
    return record["rationale"].split("\nThe answer is")[0]


@pytest.mark.parametrize("level", [1, 2, 3])
def test_schema_sizes_and_disjoint_splits(level):
    splits = arith.generate(level)
    assert len(splits["dev"]) == len(splits["test"]) == 300
    assert len(splits["train"]) == 20_000
    keys = {}
    for name, records in splits.items():
        for r in records:
            assert set(r) == {"question", "options", "rationale", "correct"}
            assert [o[:2] for o in r["options"]] == ["A)", "B)", "C)", "D)", "E)"]
        keys[name] = [_steps(r) for r in records]
        repeats = Counter(keys[name]).most_common(1)[0][1]
        # dev/test: each problem once; train: at most TRAIN_RENDERINGS renderings of one problem
        assert repeats <= (arith.TRAIN_RENDERINGS if name == "train" else 1), name
    assert not set(keys["train"]) & set(keys["dev"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["dev"]) & set(keys["test"])


@pytest.mark.parametrize("level", [1, 2, 3])
def test_letters_balanced(level):
    splits = arith.generate(level)
    for name in ("train", "dev", "test"):
        letters = [r["correct"] for r in splits[name]]
        assert _chi2(letters) < CHI2_4DOF_P001, (name, Counter(letters))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_rationale_is_right_and_ends_with_the_answer(level):
    splits = arith.generate(level)
    # train too: level 1's train split mixes close and wide options, and the walk must be exact on both
    for r in splits["dev"] + splits["train"][:3000]:
        rat = r["rationale"]
        assert rat.endswith(final_answer_line(r["correct"]))
        assert ends_with_final_answer(rat)
        assert extract_letter(rat) == r["correct"]
        # every computation step is true arithmetic
        for a, op, b, c in re.findall(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$", rat, re.M):
            assert eval(f"{a} {op} {b}") == int(c), rat  # noqa: S307 - digits and one operator
        value = int(re.search(r"The answer is (\d+)\.", rat).group(1))
        values = [int(option_text(o)) for o in r["options"]]
        assert values[LETTERS.index(r["correct"])] == value
        # options: distinct, sorted, non-negative, and close to the answer (at most 4 gaps of 10, or of 9: wide)
        assert values == sorted(set(values)) and values[0] >= 0
        assert max(abs(v - value) for v in values) <= 40
        # the walk over the options: each option in order, as the prompt writes it, "no" until the right one
        walk = re.findall(r"^([A-E])\) (\d+)(?:: (\d) vs (\d))? (yes|no)$", rat, re.M)
        k = LETTERS.index(r["correct"])
        assert [(lt, int(v)) for lt, v, *_ in walk] == list(zip(LETTERS, values, strict=True))[: k + 1]
        assert [w[-1] for w in walk] == ["no"] * k + ["yes"]
        if level == 1:
            # compared by last digit, which no two level-1 options share, so the digit decides exactly
            assert len({v % 10 for v in values}) == 5
            assert all(int(d) == int(v) % 10 and int(a) == value % 10 for _, v, d, a, _ in walk)


def test_level1_train_is_half_additions_half_subtractions():
    # the space has ~3x more additions than subtractions; train renders problems again to keep the draw's
    # half-and-half (dev/test keep the space's share: each problem once)
    ops = Counter(_steps(r).splitlines()[-1].split()[1] for r in arith.generate(1)["train"])
    assert set(ops) == {"+", "-"} and 0.4 < ops["-"] / (ops["+"] + ops["-"]) < 0.6, ops


def test_option_set_does_not_give_the_answer_away():
    """Closest-to-the-middle or any rank rule must be at chance: the correct rank is uniform (letters above),
    and the gaps below and above the answer come from the same distribution, for the close options (gaps
    uniform on {1, 2}: std 0.5) and for the wide ones (1..9, std 2.6) alike."""
    gaps: dict[tuple[bool, str], list[int]] = {}
    for r in arith.generate(1)["train"]:
        values = [int(option_text(o)) for o in r["options"]]
        k = LETTERS.index(r["correct"])
        wide = values[-1] - values[0] > 8  # a wide draw can also land within 8; it then counts as close
        gaps.setdefault((wide, "below"), []).extend(values[i + 1] - values[i] for i in range(k))
        gaps.setdefault((wide, "above"), []).extend(values[i + 1] - values[i] for i in range(k, 4))

    def mean(xs):
        return sum(xs) / len(xs)

    # n ~ 20k gaps per side and kind: 4 standard errors of the difference, 0.02 (close) and 0.1 (wide)
    assert abs(mean(gaps[False, "below"]) - mean(gaps[False, "above"])) < 0.02
    assert abs(mean(gaps[True, "below"]) - mean(gaps[True, "above"])) < 0.1


def test_level1_wide_options_in_train_only():
    """Half of level 1's train problems get wide options (so guessing digits near the answer does not pay and
    the walk has to copy), dev and test none: they keep the close options the task is measured on."""
    splits = arith.generate(1)

    def span(r):
        values = [int(option_text(o)) for o in r["options"]]
        return values[-1] - values[0]

    wide = sum(span(r) > 8 for r in splits["train"]) / len(splits["train"])
    # a wide draw spans more than 8 unless all four gaps are small: ~98% do
    assert arith.WIDE_FRACTION * 0.95 < wide <= arith.WIDE_FRACTION, wide
    assert all(span(r) <= 8 for r in splits["dev"] + splits["test"])


def test_wide_options_leave_dev_and_test_unchanged(monkeypatch):
    """The wide options come from their own generator: dev and test are the same records with or without them,
    so accuracies measured before and after they were introduced compare question for question."""
    with_wide = arith.generate(1)
    monkeypatch.setattr(arith, "WIDE_FRACTION", 0.0)
    arith.generate.cache_clear()
    try:
        without = arith.generate(1)
    finally:
        arith.generate.cache_clear()
    assert with_wide["dev"] == without["dev"] and with_wide["test"] == without["test"]
    assert with_wide["train"] != without["train"]


def test_deterministic():
    a = arith.generate(2)
    arith.generate.cache_clear()
    assert arith.generate(2) == a
    assert arith.generate(2, seed=7)["dev"] != a["dev"]


def test_registered_task_and_rewards():
    plugins = get_plugins()
    task = plugins.task("arith")
    assert {"arith", "arith2", "arith3"} <= set(plugins.registry["task"])
    assert task.default_rewards == {"arith.correct": 1.0, "arith.format": 1.0}  # the bonus itself is 0.1
    ex = task.load("dev")[0]
    assert task.load("validation")[0] == ex
    prompt = task.prompt(ex)
    assert prompt[0]["role"] == "user" and ex.question in prompt[0]["content"]
    target = task.target(ex)
    answer = task.extract(target)
    assert answer == ex.answer and task.is_correct(ex, answer)
    assert task.choices(ex) == list(LETTERS)
    correct, fmt = plugins.reward("arith.correct"), plugins.reward("arith.format")
    assert correct(ex, target, answer) == 1.0 and fmt(ex, target, answer) == pytest.approx(0.1)
    wrong = next(x for x in LETTERS if x != ex.answer)
    bad = f"12 + 3 = 15.\nFinal Answer: {wrong}"
    assert correct(ex, bad, task.extract(bad)) == 0.0 and fmt(ex, bad, task.extract(bad)) == pytest.approx(0.1)
    assert fmt(ex, "I think it is B", task.extract("I think it is B")) == 0.0
    # the value reward reads the rationale's stated value, not the letter
    value = plugins.reward("arith.value")
    true_value = int(re.search(r"The answer is (\d+)\.", target).group(1))
    assert value(ex, target, answer) == 1.0
    off_by_ten = target.replace(f"The answer is {true_value}.", f"The answer is {true_value + 10}.")
    assert value(ex, off_by_ten, task.extract(off_by_ten)) == 0.0  # same last digit, same letter: still wrong
    assert value(ex, f"Final Answer: {ex.answer}", ex.answer) == 0.0
    with pytest.raises(NanorlError, match="split"):
        task.load("nope")


def test_corpus_is_train_only():
    task = get_plugins().task("arith")
    docs = list(task.corpus())
    assert len(docs) == len(arith.generate(1)["train"])
    held_out = {_steps(r) for s in ("dev", "test") for r in arith.generate(1)[s]}
    # the problem's computation sits between the prompt's closing instruction and "The answer is"
    seen = {d.split("<LETTER>\n\n")[1].split("\nThe answer is")[0] for d in docs}
    assert not seen & held_out
    assert docs[0].endswith(final_answer_line(task.load("train")[0].answer))


def test_column_arithmetic_lines_assemble_the_result():
    """Level 1 rationales work in columns; the result is the tens result then the ones result's last digit."""
    for a in range(1, 100):
        for b in range(1, 100):
            for op, value in (("+", a + b), ("-", a - b)):
                if value < 20:
                    continue
                ones, tens, last = arith._columns(a, b, op)
                assert last == f"{a} {op} {b} = {value}."
                assert int(tens.split(" = ")[1] + ones.split(" = ")[1].split(",")[0][-1]) == value
                # every fact on the two column lines is true
                for line in (ones, tens):
                    expr, result = line.split(": ")[1].split(",")[0].split(" = ")
                    assert eval(expr) == int(result), line  # noqa: S307 - digits and + / -
