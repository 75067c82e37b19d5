"""Multiple choice (nanorl.multichoice): prompt, extraction, rewards, statistics, letter telemetry."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanorl.api import Example, RolloutBatch, StageInfo
from nanorl.multichoice import (
    LetterTelemetry,
    compare,
    correct_reward,
    ends_with_final_answer,
    eval_record,
    extract_letter,
    final_answer_line,
    format_reward,
    letter_kl,
    majority_baseline,
    mc_conversation,
    mcnemar_chi2_p,
    mcnemar_p,
    option_text,
    paired_diff_interval,
    position_bias,
    shuffle_eval,
    shuffle_options,
    strip_answer_statement,
    summarize,
    unshuffle_letter,
    wilson_interval,
)

OPTIONS = ["A)32400", "B)6000", "C)600", "D)60000", "E)10"]


def test_prompt_text_is_exact():
    conv = mc_conversation("  What is 2+2? ", ["A)4", "B) 5", "(C) 6", "D. 7", "8"])
    assert conv == [
        {
            "role": "user",
            "content": "You are a careful math tutor. Solve step by step.\n\nWhat is 2+2?\n\n"
            "A) 4\nB) 5\nC) 6\nD) 7\nE) 8\n\n"
            "Think step by step. On the last line, output exactly: Final Answer: <LETTER>",
        }
    ]
    assert final_answer_line("C") == "Final Answer: C"
    assert option_text("A)32400") == "32400"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final Answer: C", "C"),
        ("final answer: (c)", "C"),
        ("Final Answer: B.\n", "B"),
        ("Final Answer:C", "C"),
        ("Final Answer: E, since 3 > 2", "E"),
        ("Final Answer: \\boxed{B}", "B"),
        ("**Final Answer:** C", "C"),
        ("Final Answer: **D**", "D"),
        ("**Answer:** B", "B"),
        ("Final Answer: <LETTER>", None),
        ("Final Answer: A * 2", None),
        # the last Final Answer wins, and it beats any other statement wherever that is
        ("Final Answer: A\nFinal Answer: B", "B"),
        ("Final Answer: D\nAnswer: A", "D"),
        ("Answer: A\nFinal Answer: D", "D"),
        # other explicit statements: the last one counts
        ("The answer is (C)", "C"),
        ("Answer is A.", "A"),
        ("Correct answer - A", "A"),
        ("ANSWER:E", "E"),
        ("Answer : C", "C"),
        ("Ans - C", "C"),
        ("Answer: Option B", "B"),
        ("CORRECT OPTION:OPTION E", "E"),
        ("correct option is B", "B"),
        ("Option C", "C"),
        ("Choice B.", "B"),
        ("Answer: [B]", "B"),
        ("Answer: (d)", "D"),
        ("Answer: D) 109 rolls", "D"),
        ("Thus, C is the correct answer", "C"),
        ("E is the answer.", "E"),
        ("Therefore A is correct", "A"),
        ("answer is A because 3 > 2", "A"),
        ("Answer: B then later Answer: D", "D"),
        ("so the answer is b.", "B"),
        ("answer: a", "A"),
        ("12-5=7 C", "C"),
        ("Total is 12.\nD", "D"),
        # articles, words and variables are not answers
        ("Answer: each of them", None),
        ("the answer is a multiple of 3", None),
        ("The answer: A total of 5 apples", None),
        ("A man walks 5 km.", None),
        ("Answer: a = 5", None),
        ("answer: E = mc^2", None),
        ("x = A + B", None),
        ("Answer: B-C", None),
        ("Final Answer: A+B", None),
        ("Answer: C's value", None),
        ("Option A is 5 and option B is 7", None),
        ("Answer: F", None),
        ("There is no answer here.", None),
        ("", None),
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_extract_letter_respects_letters_and_options():
    assert extract_letter("Answer: E", letters="ABCD") is None
    assert extract_letter("Final Answer: D", letters="ABCD") == "D"
    # the value fallback only runs when the options are given, and only on a unique match
    text = "so the total length should be 24."
    assert extract_letter(text) is None
    assert extract_letter(text, options=["A)6", "B)18", "C)24", "D)36", "E)48"]) == "C"
    assert extract_letter("= 15/4 hours", options=["A)15/4 h", "B)4", "C)3", "D)2", "E)1"]) == "A"
    assert extract_letter("it is 24", options=["A)24", "B)24", "C)1", "D)2", "E)3"]) is None
    assert extract_letter("it is 7", options=["A)24", "B)25", "C)1", "D)2", "E)3"]) is None
    # a stated letter beats the value
    assert extract_letter("24\nAnswer: B", options=["A)6", "B)18", "C)24", "D)36", "E)48"]) == "B"


@pytest.mark.parametrize(
    "text, ok",
    [
        ("reasoning\nFinal Answer: C", True),
        ("Final Answer: C\n\n", True),
        ("reasoning\nFinal Answer: C.", False),
        ("reasoning\nfinal answer: C", False),
        ("reasoning\nFinal Answer: F", False),
        ("Final Answer: C\nmore text", False),
        ("x Final Answer: C", False),
        ("", False),
    ],
)
def test_ends_with_final_answer(text, ok):
    assert ends_with_final_answer(text) is ok


def test_rewards():
    ex = Example(id="1", question="q", answer="C", options=OPTIONS)
    good = "3 * 200 = 600\nFinal Answer: C"
    assert correct_reward(ex, good, "C") == 1.0
    assert correct_reward(ex, good, None) == 1.0  # extracts itself when the caller did not
    assert correct_reward(ex, "Final Answer: B", "B") == 0.0
    assert correct_reward(ex, "no idea", None) == 0.0
    assert format_reward(ex, good, "C") == 0.1
    assert format_reward(ex, "The answer is C", "C") == 0.0
    assert format_reward(ex, "Final Answer: B", "B") == 0.1  # format, not correctness


@pytest.mark.parametrize(
    "rationale, body",
    [
        ("x = 3\nAnswer: E", "x = 3"),
        ("x = 3\nANSWER:E", "x = 3"),
        ("x = 3\nAnswer is A.", "x = 3"),
        ("x = 3\nCorrect answer - A", "x = 3"),
        ("x = 3\nThe answer is (C)", "x = 3"),
        ("x = 3\nAnswer : C", "x = 3"),
        ("x = 3\nAnswer: D) 109 rolls", "x = 3"),
        ("x = 250 m. Answer D", "x = 250 m."),
        ("= 10.25% Answer B", "= 10.25%"),
        ("is 17818 ==> the correct answer is D.", "is 17818"),
        ("y = 50%. Thus, C is the correct answer", "y = 50%."),
        ("to each child. So option A is correct.", "to each child."),
        ("we need the exponent for 4,\nANSWER:C", "we need the exponent for 4,"),
        ("= 8.33. Hence answer is a.\nAnswer:B", "= 8.33."),
        ("12-5=7 C", "12-5=7"),
        ("x = 3\nD", "x = 3"),
        # kept: no trailing statement, or removing it would lose words
        ("the answer is D\n0.497==>1\nx = 302", "the answer is D\n0.497==>1\nx = 302"),
        ("$40 - $8 = $32\nThis gives us B", "$40 - $8 = $32\nThis gives us B"),
        ("total length should be 24.", "total length should be 24."),
    ],
)
def test_strip_answer_statement(rationale, body):
    assert strip_answer_statement(rationale) == body
    assert "Answer" not in strip_answer_statement("Answer : C") + "|"  # the whole line goes


# -- statistics ---------------------------------------------------------------------------------------------


def test_wilson_interval_hand_computed():
    # 8/10 at z = 1.96, worked in 30-digit decimals: center (0.8 + 0.19208) / 1.38416, half 1.96 / 1.38416 *
    # sqrt(0.016 + 0.009604); published to 4 places as [0.4902, 0.9433]
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4901568467207234, abs=1e-12) and hi == pytest.approx(0.9433190520193067, abs=1e-12)
    lo, hi = wilson_interval(0, 10)  # stays inside [0, 1] where the normal approximation gives [0, 0]
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(69, 254)
    assert lo < 69 / 254 < hi


def test_mcnemar_hand_computed():
    assert mcnemar_p(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert mcnemar_p(6, 1) == mcnemar_p(1, 6)
    assert mcnemar_p(0, 5) == pytest.approx(2 / 2**5)  # 0.0625
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 0) == 1.0
    assert 0 < mcnemar_p(600, 400) < 1e-9  # exact integers: no underflow at large n
    # chi-square with continuity: (|10-20| - 1)^2 / 30 = 2.7, P(chi2_1 > 2.7) = 0.100348
    assert mcnemar_chi2_p(10, 20) == pytest.approx(0.100348, abs=1e-5)


def _records(pairs):
    return [{"gold": g, "pred": p, "format_ok": p is not None} for g, p in pairs]


def test_summarize():
    recs = _records([("A", "A"), ("A", "B"), ("A", None), ("B", "B"), ("C", "A")])
    m = summarize(recs)
    assert m["n"] == 5 and m["correct"] == 2 and m["accuracy"] == pytest.approx(0.4)
    assert m["accuracy_ci95"] == pytest.approx(list(wilson_interval(2, 5)))
    assert m["chance_baseline"] == pytest.approx(0.2)
    assert (m["majority_letter"], m["majority_baseline"]) == ("A", pytest.approx(0.6))
    assert m["beats_majority"] is False
    assert m["format_rate"] == pytest.approx(0.8) and m["answered_rate"] == pytest.approx(0.8)
    assert m["pred_counts"] == {"A": 2, "B": 2, "C": 0, "D": 0, "E": 0, "none": 1}
    assert m["confusion"]["A"] == {"A": 1, "B": 1, "C": 0, "D": 0, "E": 0, "none": 1}
    assert m["confusion"]["C"]["A"] == 1
    assert majority_baseline(["B", "A", "A", "B"]) == ("A", 0.5)  # ties: the earliest letter
    assert summarize([])["n"] == 0


def test_compare_paired():
    golds = ["A", "B", "C", "D", "E", "A", "B"]
    a = _records(zip(golds, ["A", "B", "C", "D", "E", "A", "C"], strict=True))  # 6 right
    b = _records(zip(golds, ["A", "C", "D", "E", "A", "A", "B"], strict=True))  # 3 right
    c = compare(a, b)
    assert (c["both_correct"], c["a_only"], c["b_only"]) == (2, 4, 1)
    assert c["diff"] == pytest.approx(3 / 7)
    assert c["p_value"] == pytest.approx(mcnemar_p(4, 1))
    # matched by id when both carry one, whatever the order
    for i, r in enumerate(a):
        r["id"] = i
    for i, r in enumerate(b):
        r["id"] = i
    assert compare(a, list(reversed(b)))["a_only"] == 4
    with pytest.raises(ValueError):
        compare(a, b[:3])
    assert c["diff_ci95"] == pytest.approx(list(paired_diff_interval(4, 1, 7)))


def _tango_by_search(b, c, n, z=1.96):
    """Tango's limits found independently: the restricted MLE of P(only B right) by golden-section search on the
    multinomial log-likelihood (not the quadratic's root), the limits by a scan then bisection on the score."""

    def q_hat(d):
        lo, hi = max(0.0, -d) + 1e-15, (1 - d) / 2 - 1e-15  # q >= 0, q + d >= 0, 2q + d <= 1
        g = (math.sqrt(5) - 1) / 2

        def ll(q):
            terms = [(b, q + d), (c, q), (n - b - c, 1 - 2 * q - d)]
            return sum(k * math.log(p) for k, p in terms if k > 0)

        for _ in range(200):
            x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
            lo, hi = (lo, x2) if ll(x1) > ll(x2) else (x1, hi)
        return (lo + hi) / 2

    def z_of(d):
        return (b - c - n * d) / math.sqrt(n * (2 * q_hat(d) + d * (1 - d)))

    grid = [i / 2000 - 1 for i in range(1, 4000)]
    inside = [d for d in grid if abs(z_of(d)) <= z]
    out = []
    for edge, step in ((inside[0], -1 / 2000), (inside[-1], 1 / 2000)):
        a_, b_ = edge, edge + step  # inside, outside
        for _ in range(60):
            m = (a_ + b_) / 2
            a_, b_ = (m, b_) if abs(z_of(m)) <= z else (a_, m)
        out.append(a_)
    return out


@pytest.mark.parametrize("b,c,n", [(1, 7, 21), (6, 16, 161), (4, 1, 7), (40, 20, 160), (2, 0, 30), (12, 13, 254)])
def test_paired_diff_interval_is_tangos_score_interval(b, c, n):
    assert list(paired_diff_interval(b, c, n)) == pytest.approx(_tango_by_search(b, c, n), abs=1e-6)


def test_paired_diff_interval_published_and_limiting_cases():
    # Published: the complete-response table of Cavo et al. (2012) in Fagerland, Lydersen & Laake's "Statistical
    # Analysis of Contingency Tables" (2017), (a, b, c, d) = (59, 6, 16, 80): Tango's 95% interval is -0.1240 to
    # -0.0054 (the figure the book's R package, contingencytables, asserts in its own tests)
    lo, hi = paired_diff_interval(6, 16, 161)
    assert (round(lo, 4), round(hi, 4)) == (-0.1240, -0.0054)
    # no discordant pair: not a point (the normal interval was "+0.000 to +0.000") but +-z^2 / (n + z^2)
    for n in (8, 50, 254):
        assert paired_diff_interval(0, 0, n) == pytest.approx((-(1.96**2) / (n + 1.96**2), 1.96**2 / (n + 1.96**2)))
    # 0 is excluded exactly when McNemar's uncorrected z = (b - c) / sqrt(b + c) is past 1.96
    for b, c in [(3, 0), (4, 0), (9, 3), (10, 3), (20, 11), (21, 10)]:
        lo, hi = paired_diff_interval(b, c, 100)
        assert (lo > 0) == ((b - c) / math.sqrt(b + c) > 1.96)
    # all discordant pairs one way at large n: far from 0; every pair discordant one way (q(d) = (1 - d) / 2,
    # so Z(d) = sqrt(n (1 - d) / (1 + d))): the lower limit is (n - z^2) / (n + z^2), the upper stays at 1
    assert paired_diff_interval(30, 0, 100)[0] > 0.2
    assert paired_diff_interval(50, 0, 50) == pytest.approx(((50 - 1.96**2) / (50 + 1.96**2), 1.0))
    # few discordant pairs: wider than the normal interval the comparison used to give
    d, se = 3 / 100, math.sqrt((3 / 100 - (3 / 100) ** 2) / 100)
    lo, hi = paired_diff_interval(3, 0, 100)
    assert lo < d - 1.96 * se and hi > d + 1.96 * se and lo < 0


def test_shuffle_options_and_position_bias():
    ex = Example(id="q1", question="q", answer="B", options=OPTIONS)
    copies = shuffle_options(ex, 4, seed=1)
    assert copies == shuffle_options(ex, 4, seed=1)  # deterministic
    assert len(copies) == 4 and ex.options == OPTIONS and ex.answer == "B"
    for c in copies:
        # the gold letter follows its content, and every option keeps its content
        assert option_text(c.options["ABCDE".index(c.answer)]) == "6000"
        assert sorted(option_text(o) for o in c.options) == sorted(option_text(o) for o in OPTIONS)
        assert unshuffle_letter(c, c.answer) == "B"
    # a model that always answers the gold content: consistency 1; one that always says "A": letter-sticky
    content = position_bias(["B"], [copies], [[c.answer for c in copies]])
    assert content["shuffled_accuracy"] == 1.0 and content["content_consistency"] == 1.0
    sticky = position_bias(["A"], [copies], [["A"] * 4])
    assert sticky["same_letter_rate"] == 1.0
    expected = sum(unshuffle_letter(c, "A") == "A" for c in copies) / 4
    assert sticky["content_consistency"] == pytest.approx(expected)
    assert position_bias([None], [copies], [["A"] * 4])["answered_pairs"] == 0


def test_eval_record_and_shuffle_eval():
    ex = Example(id="q1", question="q", answer="B", options=OPTIONS)
    assert eval_record(ex, "B", "so\nFinal Answer: B") == {"id": "q1", "gold": "B", "pred": "B", "format_ok": True}
    assert eval_record(ex, "B", "The answer is B")["format_ok"] is False
    assert eval_record(ex, None)["format_ok"] is False and eval_record(ex, "C")["format_ok"] is True
    ex2 = Example(id="q2", question="q", answer="E", options=OPTIONS)

    def always_six_thousand(examples):  # answers the content "6000" wherever it is, else nothing
        out = []
        for e in examples:
            hits = [x for x, o in zip("ABCDE", e.options, strict=True) if option_text(o) == "6000"]
            out.append(hits[0] if hits else None)
        return out

    m = shuffle_eval([ex, ex2], ["B", "B"], 3, always_six_thousand, seed=5)
    assert m["shuffle_k"] == 3 and m["shuffled_n"] == 6
    assert m["shuffled_accuracy"] == pytest.approx(0.5)  # right on q1's copies, wrong on q2's
    assert m["content_consistency"] == 1.0
    with pytest.raises(ValueError):
        shuffle_eval([ex], ["B"], 3, lambda exs: ["A"])


# -- letter telemetry ---------------------------------------------------------------------------------------


class FakeScorer:
    """Characters are tokens (ord), except that " A".." E" are one token each when `spaced`.

    Letter logits: one list for every context, or a list of lists (one per context, in order).
    """

    def __init__(self, policy, reference, spaced=True, logprobs=None):
        self.logits = {"policy": policy, "reference": reference}
        self.spaced = spaced
        self.logprobs = logprobs or {}
        self.contexts = []

    def encode(self, text):
        if self.spaced and len(text) == 2 and text[0] == " " and text[1] in "ABCDE":
            return [1000 + ord(text[1])]
        return [ord(ch) for ch in text]

    def next_token_logits(self, which, contexts, candidates):
        self.contexts.append((which, [list(c) for c in contexts], list(candidates)))
        logits = self.logits[which]
        if isinstance(logits[0], list):
            return [list(row) for row in logits]
        return [list(logits) for _ in contexts]

    def token_logprobs(self, which, prompt_ids, completions):
        return [list(self.logprobs.get(which, {}).get(tuple(c), [0.0] * len(c))) for c in completions]


def _batch(scorer, completions, step=0, golds=("C",), correct=None, rewards=None):
    g = len(completions) // len(golds)
    return RolloutBatch(
        step=step,
        examples=[Example(id=str(i), question="q", answer=a, options=OPTIONS) for i, a in enumerate(golds)],
        group_size=g,
        prompt_ids=[[7, 7] for _ in golds],
        completions=list(completions),
        completion_ids=[[i + 1] * (i + 1) for i in range(len(completions))],
        answers=[extract_letter(c) for c in completions],
        rewards=rewards or [0.0] * len(completions),
        correct=correct or [False] * len(completions),
        scorer=scorer,
    )


def _hook(kl_every=1, task="aqua", answer_counts=None):
    hook = LetterTelemetry("aqua.letters", task="aqua")
    info = StageInfo("r", "/tmp/r", "rl", task, {"rl": {"kl_every": kl_every}}, 10)
    info.answer_counts = answer_counts or {}
    hook.on_stage_start(info)
    return hook


def test_letter_kl_hand_computed():
    # policy softmax([ln 4, 0, 0, 0, 0]) = [1/2, 1/8 x4]; reference uniform 1/5:
    # KL = 1/2 ln(2.5) + 4/8 ln(0.625) = 1/2 ln(1.5625) = ln(1.25)
    policy, reference = [math.log(4), 0, 0, 0, 0], [0.0] * 5
    assert letter_kl(policy, reference) == pytest.approx(math.log(1.25), rel=1e-12)
    assert letter_kl(reference, reference) == pytest.approx(0.0, abs=1e-15)
    # sequence KL, k3 = r - 1 - log r per token (log r = log p_ref - log p_pol), summed over each completion and
    # averaged over completions: completion 1 has tokens [1] (log r = -3), completion 2 [2, 2] (log r = -1, -2)
    logprobs = {
        "policy": {(1,): [-1.0], (2, 2): [-1.0, -1.0]},
        "reference": {(1,): [-4.0], (2, 2): [-2.0, -3.0]},
    }
    scorer = FakeScorer(policy, reference, logprobs=logprobs)
    batch = _batch(scorer, ["x\nFinal Answer: A", "no answer line"], correct=[False, True], rewards=[0.1, 1.1])
    m = _hook().on_rollouts(batch)
    assert m["rl/kl_letter_mean"] == pytest.approx(math.log(1.25))
    assert m["rl/letter_margin_mean"] == pytest.approx(math.log(4))
    assert [m[f"rl/letter_pred_counts/{x}"] for x in "ABCDE"] == [2, 0, 0, 0, 0]
    k3 = [math.exp(-3) + 2, (math.exp(-1) + 0) + (math.exp(-2) + 1)]
    assert m["rl/kl_sequence_mean"] == pytest.approx(sum(k3) / 2, rel=1e-12)
    assert m["rl/acc"] == 0.5 and m["rl/mean_reward"] == pytest.approx(0.6)
    # contexts: prompt + text up to the last "Final Answer:"; appended when the completion has none
    _, contexts, candidates = scorer.contexts[0]
    assert candidates == [1000 + ord(x) for x in "ABCDE"]
    assert contexts[0] == [7, 7] + [ord(ch) for ch in "x\nFinal Answer:"]
    assert contexts[1] == [7, 7] + [ord(ch) for ch in "no answer line\nFinal Answer:"]


class TableScorer:
    """Two autoregressive models over a 3-token vocabulary, completions of exactly 3 tokens: the next-token
    distribution is a fixed random table per prefix, so the exact sequence KL can be enumerated (27 sequences)."""

    def __init__(self, seed):
        import itertools
        import random

        rng = random.Random(seed)
        self.tables = {}
        for which in ("policy", "reference"):
            for n in range(3):
                for prefix in itertools.product(range(3), repeat=n):
                    w = [rng.random() ** 3 + 1e-3 for _ in range(3)]  # peaked, so the models differ a lot
                    self.tables[which, prefix] = [math.log(x / sum(w)) for x in w]

    def token_logprobs(self, which, prompt_ids, completions):
        return [[self.tables[which, tuple(c[:t])][c[t]] for t in range(len(c))] for c in completions]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_kl_is_unbiased_and_never_negative(seed):
    import itertools

    scorer = TableScorer(seed)
    exact = expected = 0.0
    old_k1_negative = False
    for seq in itertools.product(range(3), repeat=3):
        lp, lr = (scorer.token_logprobs(w, [], [list(seq)])[0] for w in ("policy", "reference"))
        p_seq = math.exp(sum(lp))
        exact += p_seq * (sum(lp) - sum(lr))  # KL(policy || reference) over the 27 sequences, float64
        batch = _batch(scorer, ["x"])
        batch.completion_ids = [list(seq)]
        est = _hook().sequence_kl(batch)
        assert est >= 0.0
        expected += p_seq * est  # the estimator's expectation when the completion is sampled from the policy
        old_k1_negative |= sum(lp) - sum(lr) < 0
    assert exact > 0.05 and expected == pytest.approx(exact, rel=1e-12)
    assert old_k1_negative  # the log-ratio sum it replaces is negative on some completion


def test_letter_telemetry_bare_letter_tokens():
    scorer = FakeScorer([0.0] * 5, [0.0] * 5, spaced=False)
    batch = _batch(scorer, ["Final Answer: B"])
    batch.completion_ids = [[]]
    m = _hook().on_rollouts(batch)
    _, contexts, candidates = scorer.contexts[0]
    assert candidates == [ord(x) for x in "ABCDE"]  # "A" alone, after a context ending in ": "
    assert contexts[0][-2:] == [ord(":"), ord(" ")]
    assert m["rl/kl_letter_mean"] == pytest.approx(0.0)


def test_letter_telemetry_gating_and_collapse(caplog):
    scorer = FakeScorer([5.0, 0, 0, 0, 0], [0.0] * 5)
    completions = ["Final Answer: A"] * 4
    batch = _batch(scorer, completions, step=3, golds=("B", "C"))
    batch.completion_ids = [[]] * 4
    assert _hook(task="arith").on_rollouts(batch) is None  # another task's stage: inactive
    hook = _hook(kl_every=2)  # KL on the first call, then once kl_every steps have passed
    kl_steps = []
    for step in range(3, 9):
        batch.step = step
        kl_steps += [step] if "rl/kl_letter_mean" in hook.on_rollouts(batch) else []
    assert kl_steps == [3, 5, 7]
    batch.step = 3
    assert _hook(kl_every=0).on_rollouts(batch).keys() == {"rl/acc", "rl/mean_reward"}
    with caplog.at_level(logging.WARNING, logger="nanorl.multichoice"):
        m = _hook(kl_every=3).on_rollouts(batch)
    assert m["rl/letter_collapse"] == 1.0  # A on 100% of rows, accuracy 0 <= the baseline (chance: no counts)
    assert "letter collapse" in caplog.text
    # A on 80% of rows but accuracy 0.8 above the baseline: a model that is right, no alarm
    peaked = [[5.0 if j == i else 0.0 for j in range(5)] for i in (0, 0, 0, 0, 1)]
    scorer = FakeScorer(peaked, [0.0] * 5)
    right = _batch(scorer, ["x"] * 5, step=0, golds=("A", "A", "A", "B", "B"), correct=[1, 1, 1, 0, 1])
    right.completion_ids = [[]] * 5
    m = _hook().on_rollouts(right)
    assert m["rl/letter_pred_counts/A"] == 4 and m["rl/acc"] == pytest.approx(0.8)
    assert m["rl/letter_collapse"] == 0.0


def test_letter_collapse_baseline_is_the_train_splits():
    # the train split's gold letters: A is the commonest, 30%
    train = {"A": 30, "B": 25, "C": 20, "D": 15, "E": 10}
    a_mostly = [[5.0 if j == i else 0.0 for j in range(5)] for i in (0, 0, 0, 1)]
    # a batch whose prompts happen to be A, A, A, B, answered A, A, A, B (all right): 75% A, but accuracy 1.0
    right = _batch(FakeScorer(a_mostly, [0.0] * 5), ["x"] * 4, golds=("A", "A", "A", "B"), correct=[1, 1, 1, 1])
    right.completion_ids = [[]] * 4
    m = _hook(answer_counts=train).on_rollouts(right)
    assert m["rl/letter_majority_baseline"] == pytest.approx(0.3)
    assert m["rl/letter_collapse"] == 0.0
    # answered A, A, A, B on prompts A, B, C, D: 75% A, accuracy 0.25 <= 0.3: the alarm. (The batch's own gold
    # letters, 4 different ones, made a baseline of 0.25 here and 0.75 above: a false alarm on a right model.)
    wrong = _batch(FakeScorer(a_mostly, [0.0] * 5), ["x"] * 4, golds=("A", "B", "C", "D"), correct=[1, 0, 0, 0])
    wrong.completion_ids = [[]] * 4
    m = _hook(answer_counts=train).on_rollouts(wrong)
    assert m["rl/letter_collapse"] == 1.0
    # the same predictions at 40% accuracy: above the baseline, no alarm
    wrong.correct = [1, 1, 0, 0]
    assert _hook(answer_counts=train).on_rollouts(wrong)["rl/letter_collapse"] == 0.0
    # answers that are not letters are not counted; no counts at all: chance, 1/5
    m = _hook(answer_counts={"A": 1, "B": 3, "none": 100}).on_rollouts(right)
    assert m["rl/letter_majority_baseline"] == pytest.approx(0.75)
    assert _hook().on_rollouts(right)["rl/letter_majority_baseline"] == pytest.approx(0.2)


def test_api_reexport_without_torch():
    code = (
        "import sys; from nanorl.api import extract_letter, summarize, LetterTelemetry; import nanorl.api as a; "
        "assert a.multichoice.extract_letter is extract_letter; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(30)  # a guard, not a timing: linear takes ~0.1 s here, the quadratic regex it replaced hours
def test_extraction_is_linear_on_pathological_text():
    texts = ["Final Answer:" + " " * 50_000, "Answer: A" + " " * 50_000 + "=", "answer is " * 5_000]
    texts += ["Final Answer" + "*" * 50_000, "Answer:" + " *" * 25_000]
    for text in texts:
        assert extract_letter(text) is None
        strip_answer_statement(text)
        ends_with_final_answer(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*"abcdeABCDE xyz=+-*():.,\n0123456789", "answer", "Final Answer:"])).map("".join))
def test_a_final_answer_line_always_wins(text):
    for letter in "ACE":
        assert extract_letter(f"{text}\nFinal Answer: {letter}") == letter
        body = strip_answer_statement(text)
        assert extract_letter(f"{body}\nFinal Answer: {letter}" if body else f"Final Answer: {letter}") == letter
    extract_letter(text)  # never raises


@pytest.fixture
def one_thread():
    """Tiny matmuls on 2 threads crawl when the cores are shared (10 s instead of 0.2 s): use one, then restore."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def test_letter_telemetry_with_the_rl_stage_scorer(one_thread):
    """The hook against the real Scorer (stages/rl.ModelScorer) on a tiny GPT, checked in float64 by hand."""
    torch = one_thread
    from nanorl.config import resolve
    from nanorl.model import GPT
    from nanorl.stages.rl import ModelScorer

    cfg = resolve(overrides=["model.depth=1", "model.n_embd=32", "model.n_head=1", "model.vocab_size=265"]).model
    torch.manual_seed(0)
    policy, reference = GPT(cfg), GPT(cfg)
    policy.init_weights()
    reference.init_weights()

    class Bytes:  # single bytes are tokens: " A" is two, so the hook reads "A" after a context ending in ": "
        def encode(self, text):
            return list(text.encode())

    texts = ["2+2=4\nFinal Answer: A", "I think", "x\nFinal Answer: C", "y"]
    ids = [Bytes().encode(t) for t in texts]
    prompts = [[1, 2, 3], [4, 5]]
    device = torch.device("cpu")
    scorer = ModelScorer(Bytes(), policy, lambda: reference, device, torch.float32)
    batch = _batch(scorer, texts, golds=("A", "C"))
    batch.prompt_ids, batch.completion_ids = prompts, ids
    m = _hook().on_rollouts(batch)

    def last_logits(model, seq):
        with torch.no_grad():
            return model(torch.tensor([seq]))[0, -1].double()

    letters = [ord(x) for x in "ABCDE"]
    kls, seq_k3 = [], []
    for row, text in enumerate(texts):
        prompt = prompts[row // 2]
        cut = text.rfind("Final Answer:")
        prefix = text[: cut + len("Final Answer:")] if cut >= 0 else text + "\nFinal Answer:"
        ctx_ids = prompt + Bytes().encode(prefix + " ")
        p = torch.log_softmax(last_logits(policy, ctx_ids)[letters], 0)
        q = torch.log_softmax(last_logits(reference, ctx_ids)[letters], 0)
        kls.append(float((p.exp() * (p - q)).sum()))
        full = prompt + ids[row]
        with torch.no_grad():
            lp = torch.log_softmax(policy(torch.tensor([full]))[0].double(), -1)
            lq = torch.log_softmax(reference(torch.tensor([full]))[0].double(), -1)
        log_r = [float(lq[t - 1, full[t]] - lp[t - 1, full[t]]) for t in range(len(prompt), len(full))]
        seq_k3.append(sum(math.exp(x) - 1 - x for x in log_r))  # token t is predicted at position t - 1
    assert m["rl/kl_letter_mean"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert m["rl/kl_sequence_mean"] == pytest.approx(sum(seq_k3) / len(seq_k3), rel=1e-4, abs=1e-6)
    assert sum(m[f"rl/letter_pred_counts/{x}"] for x in "ABCDE") == 4
    # the same model on both sides: no divergence at all
    same = ModelScorer(Bytes(), policy, lambda: policy, device, torch.float32)
    batch.scorer = same
    m = _hook().on_rollouts(batch)
    assert m["rl/kl_letter_mean"] == pytest.approx(0.0, abs=1e-9)
    assert m["rl/kl_sequence_mean"] == pytest.approx(0.0, abs=1e-9)


@pytest.fixture
def two_checkpoints(one_thread):
    """A run with a tokenizer and two untrained checkpoints (base, mid) of a tiny model, evaluating 5 questions."""
    torch = one_thread
    from nanorl import checkpoint as ckpt
    from nanorl.config import resolve, run_dir
    from nanorl.stages.runner import make_context, run_pipeline

    tiny = ["model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=128", "tokenizer.train_chars=20000"]
    evals = ["eval.max_new_tokens=8", "eval.max_examples=5", "telemetry.console=false", "name=mc"]
    cfg = resolve(preset="tiny", overrides=[*tiny, *evals])
    run_pipeline(cfg, only="tokenizer")
    ctx = make_context(cfg)
    for seed, stage in enumerate(("base", "mid")):
        torch.manual_seed(seed)
        ctx.save(stage, ctx.new_model(), None, {"step": 0})
        ckpt.mark_done(ctx.stage_dir(stage))
    ctx.bus.close()
    return run_dir("mc")


def _nanorl(*args: str) -> int:
    from nanorl.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


@pytest.mark.slow
def test_eval_compare_and_shuffle_options(two_checkpoints, tmp_path, monkeypatch, capsys):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a stray temporary folder would land
    run = two_checkpoints
    sampled = ["--samples", "2", "--sample-temperature", "0.5", "--sample-top-k", "7"]
    assert _nanorl("eval", "--checkpoint", str(run / "base"), *sampled, "--mode", "both", "--max-examples", "5") == 0
    table = capsys.readouterr().out
    assert "chance" in table and "0.200" in table and "majority" in table  # every accuracy beside its baselines
    mid_vs_base = ["--checkpoint", str(run / "mid"), "--compare", str(run / "base"), "--shuffle-options", "2"]
    assert _nanorl("eval", *mid_vs_base, *sampled, "--mode", "both", "--max-examples", "5") == 0
    base = json.loads((run / "eval" / "arith-dev-base.json").read_text())
    mid = json.loads((run / "eval" / "arith-dev-mid.json").read_text())
    for m in ("generative", "categorical", "sampled"):
        # the comparison is the paired test of the two evaluations' own records
        expected = compare(mid["modes"][m]["records"], base["modes"][m]["records"])
        assert mid["compare"][m] == {"a": str(run / "mid"), "b": str(run / "base"), **expected}
        if m == "sampled":  # --samples reached both evaluations
            assert (mid["modes"][m]["samples"], mid["modes"][m]["temperature"], mid["modes"][m]["top_k"]) == (2, 0.5, 7)
            assert len(base["modes"][m]["records"]) == 10
            continue
        shuffle = mid["modes"][m]["shuffle"]
        assert shuffle["shuffle_k"] == 2 and shuffle["shuffled_n"] == 10
        assert 0.0 <= shuffle["content_consistency"] <= 1.0
    assert mid["modes"]["categorical"]["shuffle"]["answered_pairs"] == 10  # categorical always answers
    assert _nanorl("eval", "--checkpoint", str(run / "mid"), "--shuffle-options", "-1") == 2
    assert _nanorl("eval", "--checkpoint", str(run / "mid"), "--samples", "-1") == 2
    assert _nanorl("eval", "--checkpoint", str(run / "mid"), "--samples", "2", "--sample-top-k", "-1") == 2
    # RUN/STAGE names a stage of a run under $NANORL_HOME/runs
    assert _nanorl("eval", "--checkpoint", "mc/base", "--max-examples", "2") == 0
    assert json.loads((run / "eval" / "arith-dev-base.json").read_text())["n"] == 2
    assert _nanorl("eval", "--checkpoint", "mc/sft", "--max-examples", "2") != 0  # no such stage
    assert _nanorl("eval", "--checkpoint", str(run / "mid"), "--samples", "2", "--sample-temperature", "0") == 2
    assert list(scratch.iterdir()) == []  # local checkpoints need no download folder (one leaked per eval once)


@pytest.mark.slow
def test_eval_compile_flag_reaches_the_engine(two_checkpoints, monkeypatch):
    # the compiled step replaced by one that fails: what is checked is the wiring (--compile reaches the engine,
    # --no-compile does not) and the fallback (the same records); tests/test_compiled_decode.py checks the graph
    from nanorl import compiled_decode

    calls = []

    def failing():
        def step(*args):
            calls.append(args[0].shape)
            raise RuntimeError("no C++ compiler found")

        return step

    monkeypatch.setattr(compiled_decode, "_compiled_step", failing)
    base = two_checkpoints / "base"
    out = two_checkpoints / "eval" / "arith-dev-base.json"
    records = {}
    for flag in ("--no-compile", "--compile"):
        assert _nanorl("eval", "--checkpoint", str(base), "--max-examples", "4", flag) == 0
        records[flag] = json.loads(out.read_text())["modes"]["generative"]["records"]
        assert bool(calls) == (flag == "--compile")
    assert records["--compile"] == records["--no-compile"]


def _sampled(rows):
    """Records of a sampled evaluation: rows of (id, gold, [preds of its completions])."""
    return [
        {"id": q, "sample": j, "gold": gold, "pred": p, "correct": p == gold}
        for q, gold, preds in rows
        for j, p in enumerate(preds)
    ]


def test_sampled_stats_hand_computed():
    from nanorl.multichoice import sampled_stats

    recs = _sampled([(0, "A", ["A", "A"]), (1, "B", ["B", "C"]), (2, "C", ["D", "D"]), (3, "D", ["E", "D"])])
    s = sampled_stats(recs)
    assert (s["n"], s["samples"], s["completions"]) == (4, 2, 8)
    assert s["accuracy"] == pytest.approx(0.5)  # (1 + 0.5 + 0 + 0.5) / 4
    assert s["pass_at_k"] == pytest.approx(0.75)
    # majority vote, ties to the answer sampled first: q0 A (right), q1 B (right), q2 D, q3 E (wrong)
    assert s["maj_at_k"] == pytest.approx(0.5)
    # per-question accuracies (1, .5, 0, .5): se^2 = sum (f - .5)^2 / (n (n - 1)) = 0.5 / 12, n_eff = .25 / se^2
    assert s["effective_n"] == pytest.approx(6.0)
    assert s["accuracy_ci95"] == pytest.approx(list(wilson_interval(3.0, 6.0)))
    # correlated completions: wider than treating the 8 completions as independent
    assert s["accuracy_ci95"][0] < wilson_interval(4, 8)[0]
    # every question alike: n_eff is the number of completions
    same = sampled_stats(_sampled([(0, "A", ["A", "B"]), (1, "B", ["C", "B"])]))
    assert same["effective_n"] == 4 and same["accuracy_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    with pytest.raises(ValueError, match="same number"):
        sampled_stats(_sampled([(0, "A", ["A", "B"]), (1, "B", ["B"])]))


def test_compare_sampled_is_a_sign_test_over_questions():
    a = _sampled([(0, "A", ["A", "A", "B"]), (1, "B", ["B", "B", "B"]), (2, "C", ["C", "D", "D"]), (3, "D", ["D"] * 3)])
    b = _sampled([(0, "A", ["A", "B", "B"]), (1, "B", ["B", "B", "B"]), (2, "C", ["C", "C", "D"]), (3, "D", ["E"] * 3)])
    c = compare(a, list(reversed(b)))  # matched by id, not by order
    # per question a - b: 1/3, 0, -1/3, 1
    assert (c["a_only"], c["b_only"], c["both_correct"]) == (2, 1, 1)
    assert c["diff"] == pytest.approx(0.25)
    assert c["accuracy_a"] == pytest.approx(9 / 12) and c["accuracy_b"] == pytest.approx(6 / 12)
    # Tango's interval on the expected discordant pairs of 12 completion pairs, shrunk by the design effect:
    # only-a k·sum fa(1 - fb) = 3(2/3·2/3 + 0 + 1/3·1/3 + 1) = 14/3, only-b 3(1/3·1/3 + 0 + 2/3·2/3 + 0) = 5/3
    # (their difference 3 = 12 pairs · diff)
    d = [1 / 3, 0, -1 / 3, 1]
    var_q = sum((x - 0.25) ** 2 for x in d) / (4 * 3)
    var_iid = ((14 / 3 + 5 / 3) / 12 - 0.25**2) / 12
    f = var_iid / var_q
    assert c["diff_ci95"] == pytest.approx(list(paired_diff_interval(14 / 3 * f, 5 / 3 * f, 12 * f)))
    assert c["p_value"] == pytest.approx(mcnemar_p(2, 1)) and c["test"].startswith("sign test")
    # the task's verdict ("correct") decides, not the letters
    a[0]["correct"] = False
    assert compare(a, b)["accuracy_a"] == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="different questions"):
        compare(a, b[:6])


def test_compare_sampled_interval_limiting_cases():
    # both models alike on every question: an interval around 0 of non-zero width (all 3 pairs per question)
    rows = [(q, "A", ["A", "B", "B"]) for q in range(10)]
    c = compare(_sampled(rows), _sampled(rows))
    lo, hi = c["diff_ci95"]
    assert c["diff"] == 0 and lo < 0 < hi and hi - lo > 0.05
    # a right on every completion, b on none, 100 questions: far above 0
    a = _sampled([(q, "A", ["A"] * 3) for q in range(100)])
    b = _sampled([(q, "A", ["B"] * 3) for q in range(100)])
    lo, hi = compare(a, b)["diff_ci95"]
    assert 0.95 < lo < hi == 1.0
    # the correlation of a question's completions widens the interval: half the questions a always right and b
    # never, the other half the reverse, against the same shares spread over every question
    split = compare(
        _sampled([(q, "A", ["A"] * 4 if q % 2 else ["B"] * 4) for q in range(20)]),
        _sampled([(q, "A", ["B"] * 4 if q % 2 else ["A"] * 4) for q in range(20)]),
    )["diff_ci95"]
    spread = compare(
        _sampled([(q, "A", ["A", "A", "B", "B"]) for q in range(20)]),
        _sampled([(q, "A", ["B", "B", "A", "A"]) for q in range(20)]),
    )["diff_ci95"]
    assert split[1] - split[0] > spread[1] - spread[0]


@pytest.mark.slow
def test_eval_sampled_mode_records_follow_their_questions(two_checkpoints, monkeypatch):
    # the engine replaced by one whose answers are known: question i gets (i mod 3) right answers among its 3
    # completions, the rest a wrong letter; the records, statistics and comparison must follow
    from nanorl.cli.eval_cmd import load_for_eval
    from nanorl.engine import Engine, Sample
    from nanorl.stages.eval import evaluate, shuffle_check

    ctx, model, _ = load_for_eval(str(two_checkpoints / "base"), None)
    examples = ctx.examples("dev")[:5]
    tok = ctx.tokenizer()
    index = {tuple(tok.render_for_completion(ctx.task.prompt(ex))): (i, ex) for i, ex in enumerate(examples)}
    seen = []

    def fake_sample(self, prompts, num_samples=1, max_new_tokens=128, temperature=1.0, top_k=0, seed=0, **kw):
        seen.append((num_samples, temperature, top_k))
        out = []
        for p in prompts:
            if tuple(p) not in index:  # a question with its options shuffled (position bias)
                out.append([Sample([1], True, [False], "Final Answer: A")] * num_samples)
                continue
            i, ex = index[tuple(p)]
            wrong = "A" if ex.answer != "A" else "B"
            letters = [ex.answer if j < i % 3 else wrong for j in range(num_samples)]
            out.append([Sample([1], True, [False], f"Final Answer: {x}") for x in letters])
        return out

    monkeypatch.setattr(Engine, "sample", fake_sample)
    ctx.cfg.eval.samples, ctx.cfg.eval.sample_temperature, ctx.cfg.eval.sample_top_k = 3, 0.6, 5
    calls: dict[str, list] = {}
    progress = lambda mode: lambda *args: calls.setdefault(mode, []).append(args)  # noqa: E731
    res = evaluate(ctx, model, "dev", "generative", 5, samples=None, progress=progress)
    assert list(res["modes"]) == ["generative", "sampled"]
    # progress per batch of questions: done, in all, completion tokens so far (one token per fake completion)
    assert calls["generative"][-1] == (5, 5, 5) and calls["sampled"][-1] == (5, 5, 15)
    assert (1, 0.0, 0) in seen and (3, 0.6, 5) in seen  # the sampled mode at eval.sample_top_k, greedy at none
    s = res["modes"]["sampled"]
    assert [(r["id"], r["sample"]) for r in s["records"]] == [(ex.id, j) for ex in examples for j in range(3)]
    right = [i % 3 for i in range(5)]  # 0, 1, 2, 0, 1 of 3
    assert [sum(r["correct"] for r in s["records"] if r["id"] == ex.id) for ex in examples] == right
    assert (s["n"], s["samples"], s["temperature"], s["top_k"]) == (5, 3, 0.6, 5)
    assert s["accuracy"] == pytest.approx(sum(right) / 15) and s["correct_completions"] == sum(right)
    assert s["pass_at_k"] == pytest.approx(3 / 5) and s["maj_at_k"] == pytest.approx(1 / 5)
    assert res["modes"]["generative"]["accuracy"] == pytest.approx(3 / 5)  # one completion: right when i mod 3 > 0
    shuffle_check(ctx, model, res, 1)  # position bias skips the sampled mode
    assert "shuffle" not in s and "shuffle" in res["modes"]["generative"]
    assert evaluate(ctx, model, "dev", "generative", 5, samples=0)["modes"].keys() == {"generative"}
    ctx.bus.close()
