"""Five-way multiple choice, shared by the built-in `arith` task and the AQuA-RAT plugin.

Pure Python (no torch at import): the prompt, the answer line, answer extraction, the two rewards, the
statistics an honest evaluation needs (Wilson interval, McNemar test, Tango's interval for a paired difference,
chance and majority baselines, confusion table, option shuffling for position bias), and `LetterTelemetry`,
the RL telemetry hook over the answer letter.

Plugins reach it through `nanorl.api` (`from nanorl.api import extract_letter`, or `nanorl.api.multichoice`).

Extraction rules (`extract_letter`), in order:
1. the last `Final Answer: X` (any case, optional parentheses, trailing punctuation);
2. else the last other explicit answer statement: "Answer: C", "ANSWER:E", "Ans - C", "The answer is (C)",
   "Correct answer - A", "correct option is B", "Option C", "Choice B.", "C is the correct answer",
   "Therefore A is correct", "E is the answer";
3. else a last line that is nothing but a letter ("D", "(D)", "D."), or a letter closing it ("12-5=7 C");
4. only when the options are given (`extract_letter(text, options=...)`): else the last number of the last
   line, when it equals the value of exactly one option ("... = 24." with "C)24"). Used to read gold
   rationales; the tasks score model completions without it, since the prompt asks for a letter.
A letter only counts as a standalone token: not the start of a word ("Answer: each"), not a variable in an
expression ("answer: a = 5", "A + B"), not the English article ("the answer is a multiple of 3"); a lowercase
letter counts only in parentheses or as the last thing on its line. No statement: None.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from nanorl.api import LETTERS, Conversation, Example, RolloutBatch, Scorer, StageInfo, TelemetryHook

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# The prompt and the answer line (wording specified by the AQuA issue, after nanochatAquaRat)

PROMPT_HEAD = "You are a careful math tutor. Solve step by step."
PROMPT_TAIL = "Think step by step. On the last line, output exactly: Final Answer: <LETTER>"
FINAL_ANSWER = "Final Answer:"

# "A)12", "A) 12", "(A) 12", "A. 12", "A: 12": the labels option texts come with
_OPTION_LABEL = re.compile(r"^\s*\(?([A-Ea-e])\s*[).:]\s*")


def option_text(option: str) -> str:
    """An option without its letter label: "A)32400" -> "32400"."""
    return _OPTION_LABEL.sub("", option, count=1).strip()


def option_label(option: str) -> str | None:
    """The letter an option is labelled with ("A)32400" -> "A"), or None when it has no label."""
    m = _OPTION_LABEL.match(option)
    return m.group(1).upper() if m else None


def mc_conversation(question: str, options: Sequence[str]) -> Conversation:
    """The user turn that asks a multiple-choice question: instruction, problem, one choice per line, format.

    Options are written as "A) text" whatever label style the data uses (or none), so every task reads alike.
    """
    choices = [f"{letter}) {option_text(opt)}" for letter, opt in zip(LETTERS, options, strict=False)]
    content = "\n".join([PROMPT_HEAD, "", question.strip(), "", *choices, "", PROMPT_TAIL])
    return [{"role": "user", "content": content}]


def final_answer_line(letter: str) -> str:
    """The line a completion must end with: "Final Answer: C"."""
    return f"{FINAL_ANSWER} {letter}"


# ---------------------------------------------------------------------------------------------------------
# Answer extraction


def _letter_token(letters: str) -> str:
    """A letter as an answer: optional parentheses/brackets, then not glued to a word or an expression.

    Lookahead (?![\\w'’]) keeps "each"/"an"/"A's" out; the operator lookahead keeps "a = 5", "A+B", "B-C", "A * 2"
    out (but not markdown bold: "**C**"). Whitespace runs are never split between two `\\s*`: linear time.
    """
    cls = "".join(sorted(set(letters.upper() + letters.lower())))
    return rf"(?:\*\*)?(?:[(\[]\s*)?(?P<L>[{cls}])(?:\s*[)\]])?(?![\w'’])(?!\s*(?:[=+/^<>]|\*(?!\*))|-\w)"


# Words that may follow an uppercase "A" that is an answer ("Answer A is correct", "A because ..."); after
# any other word "A" is read as the article ("The answer: A total of 5 ...").
_AFTER_A_OK = {"is", "as", "because", "since", "which", "option", "choice", "the", "and", "will", "would"}


def _accept(text: str, m: re.Match) -> bool:
    letter, end = m.group("L"), m.end("L")
    rest = text[end:]
    if letter.islower():
        # lowercase: in parentheses, or the last thing on its line ("answer is b." / "final answer: (c)")
        before = text[: m.start("L")].rstrip()
        in_parens = before.endswith(("(", "[")) and rest.lstrip().startswith((")", "]"))
        return in_parens or re.match(r"[\s)\].!]*(?:\n|$)", rest) is not None
    if letter == "A":
        w = re.match(r"[ \t]+([a-z]+)", rest)
        if w and w.group(1) not in _AFTER_A_OK:
            return False
    return True


def _statements(pattern: re.Pattern, text: str) -> list[re.Match]:
    """All accepted matches of an answer-statement pattern, in text order."""
    return [m for m in pattern.finditer(text) if _accept(text, m)]


_PATTERNS: dict[str, tuple[re.Pattern, list[re.Pattern], re.Pattern]] = {}


def _patterns(letters: str) -> tuple[re.Pattern, list[re.Pattern], re.Pattern]:
    if letters not in _PATTERNS:
        tok = _letter_token(letters)
        sep = r"\s*(?:\*+\s*)?(?:(?:is|=|:|-|–|—|:-)\s*(?:\*+\s*)?)?"
        final = re.compile(
            rf"final\s+answer\s*(?:\*+\s*)?(?:(?:is\b|:|=|-)\s*(?:\*+\s*)?)?(?:(?:option|choice)\s*)?{tok}", re.I
        )
        # a strong cue names the answer ("answer", "ans", "correct option"); a bare "option"/"choice" only
        # counts when the letter ends its line ("Option C"), not in "option A is 5 and option B is 7"
        strong = (
            r"(?:the\s+)?(?:(?:correct|right|final|required)\s+(?:answer|option|choice)s?|answer|ans\b\.?)"
            r"(?:\s+(?:is|will\s+be|should\s+be|would\s+be|must\s+be|=|:|-|–|:-)){0,2}"
        )
        upper = letters.upper()
        explicit = [
            # "Answer: C", "ANSWER:E", "Ans - C", "The answer is (C)", "correct option is B",
            # "CORRECT OPTION:OPTION E", "Answer: Option B", "Answer = E"
            re.compile(rf"\b{strong}{sep}(?:(?:option|choice)\s*(?:[:\-]\s*)?)?{tok}", re.I),
            # "Option C", "Choice B.", "Hence option (D)" at the end of a line
            re.compile(rf"\b(?:option|choice)\s*(?:[:\-]\s*)?{tok}(?=[ \t.)\]]*(?:\n|$))", re.I),
            # "C is the correct answer", "E is the answer", "Therefore A is correct", "A is the right option"
            re.compile(
                rf"(?<![\w=+\-*/^<>])(?P<L>[{upper}])\s+is\s+(?:the\s+)?(?:correct|right|answer)"
                r"(?:\s+(?:answer|option|choice))?\b"
            ),
            # LaTeX habit: "\boxed{B}"
            re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?(?P<L>[{upper}])\}}?\s*\}}"),
        ]
        # a last line that is only a letter ("D", "(D)", "D."), or a letter closing a line after a word, number
        # or full stop ("12-5=7 C"); not after an operator ("x = A + B")
        last = re.compile(rf"(?:^|\n|(?<=[\w.)%])[ \t]+)[(\[]?(?P<L>[{upper}])[)\]]?\.?\s*$")
        _PATTERNS[letters] = (final, explicit, last)
    return _PATTERNS[letters]


def extract_letter(text: str, letters: str = "ABCDE", options: Sequence[str] | None = None) -> str | None:
    """The answer letter a text gives (uppercase), or None when it states none. Rules: the module docstring."""
    if not text:
        return None
    final, explicit, last = _patterns(letters)
    found = _statements(final, text)
    if not found:
        found = sorted((m for p in explicit for m in _statements(p, text)), key=lambda m: m.start("L"))
    if not found:
        m = last.search(text.rstrip())
        found = [m] if m else []
    if not found:
        return _letter_by_value(text, letters, options) if options else None
    letter = found[-1].group("L").upper()
    return letter if letter in letters.upper() else None


# a number as rationales write it: "-1,250", "4.5", "15/4" (a fraction is one number), "3.75"
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def _value(s: str) -> float | None:
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num.replace(",", "")) / float(den)
        return float(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _letter_by_value(text: str, letters: str, options: Sequence[str]) -> str | None:
    """The option whose only number equals the last number of the text's last line; None unless exactly one."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    numbers = _NUMBER.findall(lines[-1]) if lines else []
    said = _value(numbers[-1]) if numbers else None
    if said is None:
        return None
    hits = []
    for letter, opt in zip(letters.upper(), options, strict=False):
        nums = _NUMBER.findall(option_text(opt))
        value = _value(nums[0]) if len(nums) == 1 else None
        if value is not None and math.isclose(value, said, rel_tol=1e-9, abs_tol=1e-12):
            hits.append(letter)
    return hits[0] if len(hits) == 1 else None


# What may follow the letter of a trailing answer statement on its line and still be part of it ("Answer: D)
# 109 rolls", "Answer A is correct option"); 40 characters covers every such tail in the AQuA dev rationales.
_MAX_TAIL = 40
# Words and arrows that lead into an answer statement ("Hence, answer is B", "==> the correct answer is D")
_LEAD_IN = re.compile(
    r"(?:\b(?:hence|so|thus|therefore|then|and|the|option|choice)\b[,:]?|==>|=>|-->|[,;:])[ \t]*\Z", re.I
)
# a letter closing a line right after a number, percent or bracket ("12-5=7 C") may be cut; after a word it
# is left alone ("This gives us B" would lose its object)
_BARE_AFTER = re.compile(r"(?:^|[\d%).])[ \t]*$")


def strip_answer_statement(text: str, letters: str = "ABCDE") -> str:
    """The text without the answer statement(s) that end it: what SFT keeps before its own `Final Answer: X`.

    "x = 250 m. Answer D" -> "x = 250 m."; "...\nCorrect answer - A" -> "..."; "Thus, C is the correct answer"
    -> "" (the whole line). A statement is only cut when it is on the last line and at most a short tail
    follows its letter; anything else is kept, so no reasoning is lost.
    """
    text = text.rstrip()
    for _ in range(3):  # a rationale may repeat its answer ("Answer: B\nANSWER: B"); three is plenty
        cut = _trailing_statement(text, letters)
        if cut is None:
            break
        head = text[:cut].rstrip(" \t")
        # lead-in words belong to a statement that starts mid-line; a previous line keeps its punctuation
        while (m := _LEAD_IN.search(head)) and m.group(0).strip():
            head = head[: m.start()].rstrip(" \t")
        text = head.rstrip()
    return text


def _trailing_statement(text: str, letters: str) -> int | None:
    """Where the answer statement that ends the text starts, or None when it does not end with one."""
    final, explicit, last = _patterns(letters)
    line_start = text.rfind("\n") + 1
    starts = []
    for pattern in (final, *explicit):
        for m in _statements(pattern, text):
            if m.start("L") >= line_start and len(text) - m.end("L") <= _MAX_TAIL:
                starts.append(m.start())
    m = last.search(text)
    if m and _BARE_AFTER.search(text[line_start : m.start("L")].rstrip("([ \t")):
        starts.append(m.start("L") - (1 if text[m.start("L") - 1 : m.start("L")] in "([" else 0))
    return min(starts) if starts else None


_WELL_FORMED = re.compile(r"(?:^|\n)[ \t]*Final Answer: ([A-E])\s*\Z")


def ends_with_final_answer(text: str, letters: str = "ABCDE") -> bool:
    """True when the text's last non-empty line is exactly `Final Answer: X` (X one of `letters`)."""
    m = _WELL_FORMED.search(text)
    return m is not None and m.group(1) in letters


def correct_reward(example: Example, completion: str, answer: str | None) -> float:
    """1.0 when the answer extracted from the completion is the gold letter, else 0.0."""
    got = answer if answer is not None else extract_letter(completion)
    return 1.0 if got is not None and got == example.answer else 0.0


# The format bonus is a tenth of a correct answer (the AQuA issue): enough to teach the answer line, too little
# to be worth more than getting the answer right.
FORMAT_BONUS = 0.1


def format_reward(example: Example, completion: str, answer: str | None) -> float:
    """0.1 when the completion ends with a well-formed `Final Answer: <A-E>` line, else 0.0."""
    return FORMAT_BONUS if ends_with_final_answer(completion) else 0.0


# ---------------------------------------------------------------------------------------------------------
# Statistics for an honest evaluation


def wilson_interval(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (z = 1.96: 95%). (0, 1) when n is 0. (k and n may be
    effective counts, not integers: `sampled_stats`.)

    Wilson rather than the normal approximation p ± z·sqrt(p(1-p)/n): it stays inside [0, 1] and keeps its
    coverage at the small n (254 dev questions) and extreme p a small model gives.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b, c are the discordant pairs (only A right, only B right).

    Under the null each discordant pair goes either way with probability 1/2, so min(b, c) is Binomial(b+c,
    1/2); p = 2·P(X <= min(b, c)), capped at 1. Exact integer arithmetic, so no underflow at large b + c.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_chi2_p(b: int, c: int) -> float:
    """McNemar's chi-square test with continuity correction (1 degree of freedom), for comparison at large n."""
    n = b + c
    if n == 0:
        return 1.0
    chi2 = (abs(b - c) - 1) ** 2 / n if abs(b - c) > 1 else 0.0
    return math.erfc(math.sqrt(chi2 / 2))  # survival function of chi-square with 1 dof


def paired_diff_interval(b: float, c: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Tango's score interval (Tango 1998, Statistics in Medicine 17:891) for the difference of two paired
    proportions, p_a - p_b = (b - c) / n: b pairs only A got right, c only B, n pairs in all. (b, c and n may be
    effective counts, not integers: `compare` on a sampled evaluation.)

    The limits are the differences d at which the score statistic
        Z(d) = (b - c - n·d) / sqrt(n · (2·q(d) + d·(1 - d)))
    is ±z, q(d) being the maximum-likelihood estimate of P(only B right) when the difference is held at d (the
    root of a quadratic, below). Unlike the normal interval diff ± z·se it keeps its coverage at the few
    discordant pairs a small model gives, stays inside [-1, 1], and is never a point: with no discordant pair
    it is ±z²/(n + z²). Z(0) is McNemar's (uncorrected) statistic (b - c) / sqrt(b + c), so the interval
    excludes 0 exactly when that test rejects at the same level.
    """
    if n <= 0:
        return -1.0, 1.0
    est = (b - c) / n

    def score(d: float) -> float:
        # q maximises b·log(q + d) + c·log(q) + (n - b - c)·log(1 - 2q - d): 2n·q² + B·q + C = 0
        bq = -b - c + (2 * n - b + c) * d
        cq = -c * d * (1 - d)
        q = (-bq + math.sqrt(max(0.0, bq * bq - 8 * n * cq))) / (4 * n)
        var = n * (2 * q + d * (1 - d))
        num = b - c - n * d
        if var <= 0:
            return 0.0 if num == 0 else math.copysign(math.inf, num)
        return num / math.sqrt(var)

    def root(lo: float, hi: float, target: float) -> float:
        # Z decreases in d: bisection to float precision
        for _ in range(200):
            mid = (lo + hi) / 2
            if score(mid) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12:
                break
        return (lo + hi) / 2

    lower = -1.0 if est <= -1 else root(-1.0, est, z)
    upper = 1.0 if est >= 1 else root(est, 1.0, -z)
    return lower, upper


def majority_baseline(golds: Sequence[str]) -> tuple[str | None, float]:
    """The most common gold letter and the accuracy of always answering it (ties: the earliest letter)."""
    if not golds:
        return None, 0.0
    counts = Counter(golds)
    letter = max(sorted(counts), key=lambda x: counts[x])
    return letter, counts[letter] / len(golds)


def _record(r: Any) -> tuple[str, str | None, bool]:
    """(gold, predicted, format_ok) of one per-question record: a dict with keys gold, pred and format_ok."""
    gold, pred = r["gold"], r.get("pred")
    return gold, pred, bool(r.get("format_ok", pred is not None))


def summarize(records: Sequence[dict[str, Any]], letters: str = "ABCDE") -> dict[str, Any]:
    """Evaluation metrics from per-question records `{"gold": "C", "pred": "B" | None, "format_ok": bool}`.

    Returns accuracy with its 95% Wilson interval, the chance (1/letters) and majority-letter baselines of the
    records' gold letters, whether the interval's lower end clears the majority baseline, the format-valid
    rate, the predicted-letter distribution ("none": no answer) and the gold × predicted confusion table.
    """
    rows = [_record(r) for r in records]
    n = len(rows)
    k = sum(1 for gold, pred, _ in rows if pred is not None and pred == gold)
    lo, hi = wilson_interval(k, n)
    golds = [gold for gold, _, _ in rows]
    major, major_acc = majority_baseline(golds)
    cols = [*letters, "none"]
    pred_counts = {c: 0 for c in cols}
    confusion = {g: {c: 0 for c in cols} for g in letters}
    for gold, pred, _ in rows:
        col = pred if pred in pred_counts else "none"
        pred_counts[col] += 1
        confusion.setdefault(gold, {c: 0 for c in cols})[col] += 1
    return {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "chance_baseline": 1 / len(letters),
        "majority_letter": major,
        "majority_baseline": major_acc,
        "beats_majority": n > 0 and lo > major_acc,
        "format_rate": sum(ok for _, _, ok in rows) / n if n else 0.0,
        "answered_rate": sum(pred is not None for _, pred, _ in rows) / n if n else 0.0,
        "pred_counts": pred_counts,
        "gold_counts": {c: golds.count(c) for c in letters},
        "confusion": confusion,
    }


def eval_record(example: Example, pred: str | None, completion: str | None = None) -> dict[str, Any]:
    """One question's record for `summarize` / `compare`: id, gold, pred and whether the answer was well-formed
    (generative: the completion ends with `Final Answer: X`; categorical, no completion: a letter was chosen)."""
    format_ok = ends_with_final_answer(completion) if completion is not None else pred is not None
    return {"id": example.id, "gold": example.answer, "pred": pred, "format_ok": format_ok}


def _right(r: dict[str, Any]) -> bool:
    """Whether a record's answer is right: the task's verdict ("correct") where the record has one."""
    return bool(r["correct"]) if "correct" in r else r.get("pred") is not None and r.get("pred") == r["gold"]


def _by_question(records: Sequence[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    """Records grouped by question id, in first-seen order (a sampled evaluation has several per question)."""
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["id"], []).append(r)
    return out


def sampled_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of an evaluation with k sampled completions per question (records with "id", "pred", "correct").

    accuracy = pass@1, the mean over all completions. Its 95% interval is Wilson's at the effective sample size
    (Kish's design effect): completions of one question are not independent, so n_eff = p(1-p) / se^2, where se
    is the standard error of the mean of the per-question accuracies; at most n·k, and n·k when every question
    has the same accuracy. pass@k: some completion is right; maj@k: the most common answer (ties: the one
    sampled first) is right.
    """
    groups = list(_by_question(records).values())
    n = len(groups)
    k = max((len(g) for g in groups), default=0)
    if any(len(g) != k for g in groups):
        raise ValueError("a sampled evaluation needs the same number of completions for every question")
    fracs = [sum(map(_right, g)) / k for g in groups]
    p = sum(fracs) / n if n else 0.0
    var = sum((f - p) ** 2 for f in fracs) / (n * (n - 1)) if n > 1 else 0.0
    n_eff = min(n * k, p * (1 - p) / var) if var > 0 else n * k
    lo, hi = wilson_interval(p * n_eff, n_eff) if n_eff > 0 else (0.0, 1.0)
    maj = 0
    for g in groups:
        votes = Counter(r.get("pred") for r in g if r.get("pred") is not None)
        if votes:
            top = max(votes.values())
            first = next(r for r in g if r.get("pred") is not None and votes[r["pred"]] == top)
            maj += _right(first)
    return {
        "n": n,
        "samples": k,
        "completions": n * k,
        "accuracy": p,
        "accuracy_ci95": [lo, hi],
        "effective_n": n_eff,
        "pass_at_k": sum(f > 0 for f in fracs) / n if n else 0.0,
        "maj_at_k": maj / n if n else 0.0,
    }


def compare(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Paired comparison of two evaluations of the same questions (matched by "id", else by order).

    Per question, the share of its completions that are right (0 or 1 with one completion each). diff = mean
    share(a) - mean share(b); `a_only`/`b_only` count the questions a / b did better on, and p is the exact
    two-sided sign test on them: McNemar's exact test (`mcnemar_p`) when each question has one completion.
    `both_correct`: questions both got entirely right.

    `diff_ci95` is Tango's score interval (`paired_diff_interval`) on the discordant pairs. With k completions
    per question (sampled), each question stands for k pairs of one completion of a and one of b: of them
    k·fa·(1 - fb) are expected to have only a right and k·fb·(1 - fa) only b (fa, fb the shares; their
    difference over all n·k pairs is diff), and these counts are shrunk to the effective sample size as
    `sampled_stats` does: n·k divided by the design effect, the variance of diff from the per-question
    differences over the variance n·k independent pairs would give (at least 1, so never above n·k).
    """
    if all("id" in r for r in records_a) and all("id" in r for r in records_b):
        qa, qb = _by_question(records_a), _by_question(records_b)
        missing = [q for q in qa if q not in qb]
        if missing or len(qa) != len(qb):
            raise ValueError(f"the two evaluations cover different questions (e.g. {missing[:3]})")
        pairs = [(qa[q], qb[q]) for q in qa]
    else:
        if len(records_a) != len(records_b):
            raise ValueError(f"cannot pair {len(records_a)} records with {len(records_b)}")
        pairs = [([ra], [rb]) for ra, rb in zip(records_a, records_b, strict=True)]
    both = a_only = b_only = 0
    diffs, share_a, share_b = [], 0.0, 0.0
    only_a = only_b = 0.0  # expected discordant pairs among one-completion pairs, per question summed
    for ga, gb in pairs:
        if ga[0]["gold"] != gb[0]["gold"]:
            raise ValueError(f"paired records disagree on the gold answer ({ga[0]['gold']} vs {gb[0]['gold']})")
        fa, fb = sum(map(_right, ga)) / len(ga), sum(map(_right, gb)) / len(gb)
        share_a, share_b = share_a + fa, share_b + fb
        both += fa == 1 and fb == 1
        a_only += fa > fb
        b_only += fb > fa
        diffs.append(fa - fb)
        only_a, only_b = only_a + fa * (1 - fb), only_b + fb * (1 - fa)
    n = len(pairs)
    diff = sum(diffs) / n if n else 0.0
    single = all(len(ga) == 1 and len(gb) == 1 for ga, gb in pairs)
    if single:  # one completion each: the shares are 0/1 and the expected counts are the counts
        lo, hi = paired_diff_interval(a_only, b_only, n)
    else:
        k = min(min(len(ga), len(gb)) for ga, gb in pairs)
        pairs_n, b_n, c_n = n * k, k * only_a, k * only_b
        var_iid = max(0.0, (b_n + c_n) / pairs_n - diff * diff) / pairs_n
        var_q = sum((d - diff) ** 2 for d in diffs) / (n * (n - 1)) if n > 1 else 0.0
        shrink = min(1.0, var_iid / var_q) if var_q > 0 else 1.0  # 1 / design effect, capped at 1
        lo, hi = paired_diff_interval(b_n * shrink, c_n * shrink, pairs_n * shrink)
    return {
        "n": n,
        "accuracy_a": share_a / n if n else 0.0,
        "accuracy_b": share_b / n if n else 0.0,
        "diff": diff,
        "diff_ci95": [lo, hi],
        "both_correct": both,
        "a_only": a_only,
        "b_only": b_only,
        "p_value": mcnemar_p(a_only, b_only),
        "test": "McNemar exact (two-sided binomial on discordant pairs)"
        if single
        else "sign test (two-sided binomial on the questions' accuracy over their samples)",
    }


# ---------------------------------------------------------------------------------------------------------
# Position bias: re-ask with the options permuted


def shuffle_options(example: Example, k: int, seed: int = 0) -> list[Example]:
    """K copies of a multiple-choice example with its options permuted, the gold letter remapped.

    Each copy's `meta["perm"]` lists, for each new position, the index of the original option shown there,
    so `unshuffle_letter` maps a predicted letter back to the original option (its content). The seed and
    the example id fix the permutations, so two checkpoints are asked the same shuffled questions.
    """
    if not example.options:
        raise ValueError(f"example {example.id!r} has no options to shuffle")
    rng = random.Random(f"{seed}:{example.id}")  # str seeds hash deterministically across processes
    n = len(example.options)
    gold = LETTERS.index(example.answer)
    texts = [option_text(o) for o in example.options]
    out = []
    for j in range(k):
        perm = list(range(n))
        rng.shuffle(perm)
        options = [f"{LETTERS[i]}){texts[p]}" for i, p in enumerate(perm)]
        meta = {**example.meta, "perm": perm, "shuffle": j}
        out.append(replace(example, options=options, answer=LETTERS[perm.index(gold)], meta=meta))
    return out


def unshuffle_letter(example: Example, letter: str | None) -> str | None:
    """The original letter of the option a shuffled example shows at `letter` (None stays None)."""
    if letter is None or letter not in LETTERS[: len(example.meta["perm"])]:
        return None
    return LETTERS[example.meta["perm"][LETTERS.index(letter)]]


def position_bias(
    base_preds: Sequence[str | None],
    variants: Sequence[Sequence[Example]],
    variant_preds: Sequence[Sequence[str | None]],
) -> dict[str, Any]:
    """Accuracy under shuffled options and how often the chosen content survives the shuffle.

    `base_preds[i]`: the letter answered to question i as given; `variants[i]`: its shuffled copies
    (`shuffle_options`); `variant_preds[i][j]`: the letter answered to copy j. `content_consistency`: among
    pairs where both were answered, how often the same option content was chosen; `same_letter_rate`: how
    often the same letter was (a model that reads the options and ignores positions keeps the content, one
    that favours a position keeps the letter).
    """
    k = total = answered = same_content = same_letter = 0
    for base, copies, preds in zip(base_preds, variants, variant_preds, strict=True):
        for ex, pred in zip(copies, preds, strict=True):
            total += 1
            k += pred is not None and pred == ex.answer
            if base is None or pred is None:
                continue
            answered += 1
            same_content += unshuffle_letter(ex, pred) == base
            same_letter += pred == base
    lo, hi = wilson_interval(k, total)
    return {
        "shuffled_n": total,
        "shuffled_accuracy": k / total if total else 0.0,
        "shuffled_accuracy_ci95": [lo, hi],
        "answered_pairs": answered,
        "content_consistency": same_content / answered if answered else 0.0,
        "same_letter_rate": same_letter / answered if answered else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------
# Letter telemetry for RL


def letter_tokens(encode: Callable[[str], list[int]], letters: Sequence[str]) -> tuple[list[int], str]:
    """Where a model writes the letter of "Final Answer: C": the letters' tokens, and what must end the context
    before them after "Final Answer:". In a GPT-style BPE the space joins the letter (":" then " C"), so the
    letters are " A".." E" and nothing more is needed; otherwise they are bare and the context must end with
    the space (": "), or the letter would be read at the space's position. ValueError when the letters are
    not single tokens either way. The categorical evaluation and `LetterTelemetry` both read letters so."""
    spaced = [encode(" " + x) for x in letters]
    if all(len(ids) == 1 for ids in spaced):
        return [ids[0] for ids in spaced], ""
    bare = [encode(x) for x in letters]
    if not all(len(ids) == 1 for ids in bare):
        raise ValueError(f"the answer letters {''.join(letters)} are not single tokens of this tokenizer")
    return [ids[0] for ids in bare], " "


class LetterTelemetry(TelemetryHook):
    """RL telemetry over the answer letter, for any five-way multiple-choice task (docs/aqua.md).

    Active in the `rl` stage of its task only. Every call: rl/acc, rl/mean_reward. Every `rl.kl_every` steps
    (the first call, then the first call at least kl_every steps after the last KL step: right whether the RL
    stage hands over every step's rollouts or only every kl_every-th):
      rl/kl_letter_mean          KL(policy || reference) of the letter distributions (renormalised over 5)
      rl/letter_margin_mean      policy's top-1 minus top-2 letter logit
      rl/letter_pred_counts/X    how many rows the policy's most likely letter is X
      rl/kl_sequence_mean        mean over the completions of the k3 estimate of the sequence KL(policy ||
                                 reference) in nats: the sum over the tokens of r - 1 - log r, never negative
      rl/letter_collapse         1 when one letter is the policy's most likely letter on more than 60% of the
                                 rows while the batch accuracy is not above the majority-letter baseline (a
                                 warning is logged too), else 0
      rl/letter_majority_baseline  that baseline: the share of the commonest gold letter among the stage's
                                 training examples (`StageInfo.answer_counts`, counted once at the stage's
                                 start; chance, 1/5, when the stage gives no counts)

    The alarm reads "the policy answers mostly one letter and does no better than always answering the
    commonest letter would". The baseline is the train split's, not the batch's: a KL step sees a few prompts
    (8 gold letters give majority rates of 0.25 to 1 by chance alone). The batch accuracy is still a few
    prompts' worth, so a single alarm is a prompt to look at the letter counts, not a verdict.

    Where the letter is read: the prompt plus the completion's text up to and including its last
    "Final Answer:", re-encoded from text as the model would read it; a completion without one gets
    "\nFinal Answer:" appended to its whole text ("what would it answer if made to answer now").
    Letter tokens: " A".." E" when each is one token (in a GPT-style BPE "Final Answer: A" splits as ":" " A"),
    the context then ending at ":"; otherwise "A".."E" after a context ending in ": ".
    """

    COLLAPSE_SHARE = 0.6  # the alarm threshold: one letter above 60% of predictions

    def __init__(self, name: str, task: str, letters: str = "ABCDE"):
        self.name = name
        self.task = task
        self.letters = letters
        self.active = False
        self.kl_every = 0
        self.last_kl_step: int | None = None
        self.majority = 1 / len(letters)  # the collapse alarm's baseline, set at the stage's start

    def on_stage_start(self, info: StageInfo) -> dict[str, float] | None:
        self.active = info.stage == "rl" and info.task == self.task
        rl = info.config.get("rl", info.config) if isinstance(info.config, dict) else {}
        self.kl_every = int(rl.get("kl_every", 10))  # 10: the config's default
        self.last_kl_step = None
        golds = {x: n for x, n in info.answer_counts.items() if x in self.letters}
        total = sum(golds.values())
        self.majority = max(golds.values()) / total if total else 1 / len(self.letters)
        return None

    def on_rollouts(self, batch: RolloutBatch) -> dict[str, float] | None:
        if not self.active or not batch.completions:
            return None
        n = len(batch.completions)
        acc = sum(bool(c) for c in batch.correct) / n
        out: dict[str, float] = {"rl/acc": acc, "rl/mean_reward": sum(batch.rewards) / n}
        due = self.last_kl_step is None or batch.step - self.last_kl_step >= self.kl_every
        if self.kl_every and due:
            self.last_kl_step = batch.step
            out.update(self.letter_metrics(batch))
            out["rl/kl_sequence_mean"] = self.sequence_kl(batch)
            preds = [out[f"rl/letter_pred_counts/{x}"] for x in self.letters]
            majority = self.majority
            collapsed = max(preds) > self.COLLAPSE_SHARE * n and acc <= majority
            out["rl/letter_collapse"] = float(collapsed)
            out["rl/letter_majority_baseline"] = majority
            if collapsed:
                top = self.letters[preds.index(max(preds))]
                logger.warning(
                    "%s: letter collapse at step %d: %s is %.0f%% of predictions, accuracy %.3f <= majority "
                    "baseline %.3f",
                    self.name,
                    batch.step,
                    top,
                    100 * max(preds) / n,
                    acc,
                    majority,
                )
        return out

    def letter_ids(self, scorer: Scorer) -> tuple[list[int], str]:
        """The letter candidate tokens and the text that must end the context before them."""
        return letter_tokens(scorer.encode, self.letters)

    def letter_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        cands, pad = self.letter_ids(batch.scorer)
        contexts = []
        for row, text in enumerate(batch.completions):
            cut = text.rfind(FINAL_ANSWER)
            prefix = text[: cut + len(FINAL_ANSWER)] if cut >= 0 else text + "\n" + FINAL_ANSWER
            contexts.append(batch.prompt_ids[row // batch.group_size] + batch.scorer.encode(prefix + pad))
        pol = batch.scorer.next_token_logits("policy", contexts, cands)
        ref = batch.scorer.next_token_logits("reference", contexts, cands)
        kls, margins, counts = [], [], dict.fromkeys(self.letters, 0)
        for lp, lr in zip(pol, ref, strict=True):
            kls.append(letter_kl(lp, lr))
            top = sorted(lp, reverse=True)
            margins.append(top[0] - top[1])
            counts[self.letters[lp.index(top[0])]] += 1
        out = {"rl/kl_letter_mean": sum(kls) / len(kls), "rl/letter_margin_mean": sum(margins) / len(margins)}
        out.update({f"rl/letter_pred_counts/{x}": float(c) for x, c in counts.items()})
        return out

    def sequence_kl(self, batch: RolloutBatch) -> float:
        """Mean over the completions of the k3 estimate of KL(policy || reference) over the whole completion:
        the sum over its tokens of r - 1 - log r, r = p_reference(token) / p_policy(token).

        Each term is >= 0 (x - 1 >= log x), so the estimate is too, and E[r - 1] = 0 under the policy, so for
        completions sampled from the scored policy (temperature 1) the sum is unbiased for the sequence KL (the
        chain rule sums the per-position KLs). The plain log-ratio sum (k1) is unbiased too but is negative on
        many batches. What it measures in the RL stage: docs/aqua.md (Letter telemetry)."""
        total, count = 0.0, 0
        g = batch.group_size
        for i in range(len(batch.examples)):
            comps = batch.completion_ids[i * g : (i + 1) * g]
            pol = batch.scorer.token_logprobs("policy", batch.prompt_ids[i], comps)
            ref = batch.scorer.token_logprobs("reference", batch.prompt_ids[i], comps)
            for lp, lr in zip(pol, ref, strict=True):
                total += sum(math.expm1(b - a) - (b - a) for a, b in zip(lp, lr, strict=True))
                count += 1
        return total / count if count else 0.0


def shuffle_eval(
    examples: Sequence[Example],
    base_preds: Sequence[str | None],
    k: int,
    answer: Callable[[list[Example]], list[str | None]],
    seed: int = 0,
) -> dict[str, Any]:
    """`--shuffle-options K` in one call: ask every question again with its options permuted K times.

    `answer(examples)` is the evaluation's own way to get one letter (or None) per example (generative or
    categorical); `base_preds` are its answers to the questions as given. Returns `position_bias`'s metrics.
    """
    variants = [shuffle_options(ex, k, seed) for ex in examples]
    flat = answer([c for copies in variants for c in copies])
    if len(flat) != k * len(examples):
        raise ValueError(f"answer() returned {len(flat)} letters for {k * len(examples)} shuffled questions")
    preds = [flat[i * k : (i + 1) * k] for i in range(len(examples))]
    return {"shuffle_k": k, "shuffle_seed": seed, **position_bias(base_preds, variants, preds)}


def _log_softmax(logits: Sequence[float]) -> list[float]:
    m = max(logits)
    log_z = m + math.log(sum(math.exp(x - m) for x in logits))
    return [x - log_z for x in logits]


def letter_kl(policy_logits: Sequence[float], reference_logits: Sequence[float]) -> float:
    """KL(p || q) of the softmaxes of two logit vectors over the same candidates (renormalised over them)."""
    lp, lq = _log_softmax(policy_logits), _log_softmax(reference_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))
