"""The GSM8K plugin: loading and the dev slice, the calculator, the SFT target with tool calls, answer
extraction and rewards, registration, and the real train split's calculator notes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanorl.api import BadRowsWarning, Example, NanorlError
from nanorl_gsm8k.calculator import CalculatorError, calculate
from nanorl_gsm8k.data import DEV_SHARE, is_dev, load_split, normalize_number
from nanorl_gsm8k.plugin import NOTE, GSM8KTask, correct_reward, extract_number, format_reward, target_parts

# ../shared/data from the repository root (this file is plugins/gsm8k/tests/test_gsm8k.py)
TRAIN = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"

ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def _rows(n: int) -> list[dict]:
    """n distinct problems: the question names its number, so the hash puts each in train or dev on its own."""
    return [
        {"question": f"Problem {i}: what is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
        for i in range(n)
    ]


def _write(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_train_and_dev_split_the_train_file_and_test_is_its_own(tmp_path):
    rows = _rows(300)
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "test.jsonl", [ROW])
    train, dev = load_split("train", tmp_path), load_split("dev", tmp_path)
    # every problem on exactly one side, by its hash; about one in DEV_SHARE on the dev side
    assert sorted(e.question for e in train + dev) == sorted(r["question"] for r in rows)
    assert all(is_dev(e.question) for e in dev) and not any(is_dev(e.question) for e in train)
    assert 300 / DEV_SHARE / 2 < len(dev) < 300 / DEV_SHARE * 2
    assert [e.id for e in load_split("validation", tmp_path)] == [e.id for e in dev]
    (test,) = load_split("test", tmp_path)
    assert (test.id, test.answer) == ("gsm8k-test-1", "72")
    assert test.rationale == ROW["answer"].rsplit("\n", 1)[0]  # the solution without its `####` line


def test_bad_rows_are_reported_and_no_valid_row_is_an_error(tmp_path):
    rows = [
        ROW,
        {"question": "No answer line?", "answer": "It is 5."},
        "{not json",
        {"question": "", "answer": "#### 1"},
        {"question": "Words?", "answer": "so\n#### five"},
    ]
    with pytest.warns(BadRowsWarning, match="skipped 4 of 5 rows") as caught:
        examples = load_split("test", _write(tmp_path / "test.jsonl", rows).parent)
    text = str(caught[0].message)
    assert "line 2: the answer's last line is not `#### N`" in text and "line 3: not valid JSON" in text
    assert "line 4: empty or missing question" in text and "line 5: the final answer 'five' is not a number" in text
    assert [e.answer for e in examples] == ["72"] and len(examples.bad_rows) == 4
    _write(tmp_path / "test.jsonl", rows[1:])
    with pytest.raises(NanorlError, match="holds no valid GSM8K row"):
        load_split("test", tmp_path)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(NanorlError, match="no GSM8K file for this split") as e:
        load_split("test", tmp_path)
    assert "grade-school-math" in e.value.hint
    pytest.importorskip("datasets")  # without it the error says to install it (a lent GPU's image has none)
    with pytest.raises(NanorlError, match="offline and not cached") as e:  # the conftest sets HF_DATASETS_OFFLINE
        load_split("train")
    assert "--data-dir DIR" in e.value.hint  # `nanorl data show` takes no data.data_dir=DIR override, only the flag
    with pytest.raises(NanorlError, match="no split 'val'"):
        load_split("val", tmp_path)


@pytest.mark.parametrize(
    ("text", "number"),
    [("72", "72"), ("1,000", "1000"), ("-3", "-3"), ("+4", "4"), ("2.50", "2.5"), ("3.0", "3"), ("007", "7"),
     (".5", "0.5"), ("-0", "0"), ("18.", "18"), ("1,00", None), ("five", None), ("3/4", None), ("", None)],
)  # fmt: skip
def test_numbers_are_normalized(text, number):
    assert normalize_number(text) == number


@pytest.mark.parametrize(
    ("expr", "value"),
    [("48/2", "24"), ("12/60", "0.2"), ("10/3", "3.333333"), ("2**10", "1024"), ("-(3-5)*4", "8"), ("7//2", "3"),
     ("7%4", "3"), ("1,000*3", "3000"), ("$5*2", "10"), ("0.1+0.2", "0.3"), ("3 × 4", "12"), (" 1.5 * 4 ", "6"),
     ("-1/3000000", "0"), ("-1/3", "-0.333333")],
)  # fmt: skip
def test_calculator_computes_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    ("expr", "why"),
    [("__import__('os').system('true')", "not Call"), ("x + 1", "not Name"), ("(1).real", "not Attribute"),
     ("9**9**9", "exponent"), ("1/0", "division by zero"), ("10.0**400", "exponent"), ("1e300*1e300", "range"),
     ("999999999999*999999999999", "range"),
     ("2 +", "not an arithmetic"), ("1" * 201, "longer than"), ("True + 1", "not Constant"),
     ("[1][0]", "not Subscript")],
)  # fmt: skip
def test_calculator_refuses_what_is_not_bounded_arithmetic(expr, why):
    with pytest.raises(CalculatorError, match=why):
        calculate(expr)


def test_target_turns_calculator_notes_into_tool_calls():
    ex = load_split_free(ROW)
    parts = GSM8KTask().target(ex)
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # a note the calculator refuses is dropped, its text kept; a solution with no text still ends with the answer
    assert target_parts("So x = <<x*2=4>>4 apples.", "4") == [{"type": "text", "text": "So x = 4 apples.\n#### 4"}]
    assert target_parts("", "9") == [{"type": "text", "text": "#### 9"}]


def test_target_renders_with_tool_outputs_left_out_of_the_loss():
    from nanorl.tokenizer import train_tokenizer

    task = GSM8KTask()
    ex = load_split_free(ROW)
    tok = train_tokenizer([ex.question, ex.rationale] * 4, vocab_size=400)
    conv = [*task.prompt(ex), {"role": "assistant", "content": task.target(ex)}]
    ids, mask = tok.render_conversation(conv)
    out_start, out_end = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    inside, trained_inside, trained_calls = False, 0, 0
    for i, m in zip(ids, mask, strict=True):
        inside = (inside or i == out_start) and i != out_end
        trained_inside += m and (inside or i == out_end)
        trained_calls += m and i == tok.special_id("<|python_start|>")
    assert trained_inside == 0 and trained_calls == 2  # the model writes the calls, the calculator the outputs
    text = tok.decode(ids)
    assert "<|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>24 clips" in text
    assert text.endswith("#### 72<|assistant_end|>")
    assert task.extract(text.removesuffix("<|assistant_end|>")) == "72"  # a sample's text ends before the stop


def test_extraction_rewards_and_correctness():
    task, ex = GSM8KTask(), load_split_free(ROW)
    assert extract_number("... so 70 + 2\n#### 72") == "72"
    assert extract_number("#### 70\nwait, no\n#### 1,072.00") == "1072"  # the last answer line counts
    assert extract_number("The answer is 72.") is None and extract_number("#### seventy-two") is None
    assert task.is_correct(ex, "72.0") and not task.is_correct(ex, "71") and not task.is_correct(ex, None)
    assert correct_reward(ex, "#### 72", "72") == 1.0 and correct_reward(ex, "#### 7", "7") == 0.0
    assert format_reward(ex, "steps\n#### 72\n", "72") == 0.1 and format_reward(ex, "#### 72 apples", None) == 0.0
    assert format_reward(ex, "#### 72\nand more words", "72") == 0.0  # the answer line must come last
    assert task.choices(ex) is None  # free-form: no categorical evaluation


@pytest.mark.parametrize(
    "line, number",
    [
        ("#### $18", "18"),  # a currency sign, a unit, a percent sign or bold: the number is still stated
        ("#### -$5", "-5"),
        ("#### $1,200.00", "1200"),
        ("#### 18 dollars", "18"),
        ("#### 4.5 km/h.", "4.5"),
        ("#### 5%", "5"),
        ("#### **72**", "72"),
        ("#### 3/4", None),  # an expression, two numbers, words: no one number
        ("#### 1 200", None),
        ("#### 18 + 2", None),
        ("#### 18 dollars 5", None),
        ("#### x = 5", None),
    ],
)
def test_extraction_reads_past_currency_and_units_but_format_wants_the_bare_number(line, number):
    ex = load_split_free({**ROW, "answer": ROW["answer"].replace("#### 72", f"#### {number or 72}")})
    assert extract_number(f"steps\n{line}") == number
    assert correct_reward(ex, line, extract_number(line)) == (1.0 if number else 0.0)
    assert format_reward(ex, line, extract_number(line)) == 0.0  # the prompt asks for a number alone


@pytest.mark.timeout(30)  # a guard: linear takes milliseconds, the lazy `(.*?)[ \t]*$` it replaced ~10 s here
def test_extraction_is_linear_on_long_runs_of_spaces():
    for text in ["#### 5" + " " * 50_000 + "x", "#### **" + " " * 50_000 + "x", "####" + " " * 50_000 + "7"]:
        extract_number(text)
        format_reward(load_split_free(ROW), text, None)


def test_registration():
    from nanorl.plugins import get_plugins

    pm = get_plugins()
    task = pm.task("gsm8k")
    assert isinstance(task, GSM8KTask) and task.tools()["python"]("6*7") == "42"
    # the task's default rewards are registered; a right, well-formed answer earns both
    ex = load_split_free(ROW)
    total = sum(w * pm.reward(name)(ex, "so\n#### 72", "72") for name, w in task.default_rewards.items())
    assert total == pytest.approx(1.1)


def test_categorical_evaluation_of_free_form_answers_is_refused_with_a_hint():
    from types import SimpleNamespace

    from nanorl.stages.eval import evaluate

    ctx = SimpleNamespace(
        cfg=SimpleNamespace(eval=SimpleNamespace(samples=0)),
        task=GSM8KTask(),
        examples=lambda split: [load_split_free(ROW)],
    )
    with pytest.raises(NanorlError, match="gsm8k answers are free-form") as e:
        evaluate(ctx, model=None, split="dev", mode="categorical")
    assert e.value.hint == "use --mode generative" and e.value.exit_code == 2


def test_data_show_prints_the_target_with_its_tool_calls(tmp_path):
    import os
    import subprocess
    import sys

    _write(tmp_path / "test.jsonl", [ROW])
    cmd = [sys.executable, "-m", "nanorl", "data", "show", "--task", "gsm8k", "--split", "test", "--data-dir"]
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "gsm8k test: 1 examples" in r.stdout
    assert "Natalia sold 48/2 = <|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>24 clips" in r.stdout
    r = subprocess.run([*cmd, str(tmp_path), "--json"], capture_output=True, text=True, env=env, timeout=60)
    (shown,) = json.loads(r.stdout)["examples"]
    assert shown["answer"] == "72" and shown["target"][1] == {"type": "python", "text": "48/2"}


@pytest.mark.skipif(not TRAIN.is_file(), reason="../shared/data/gsm8k/train.jsonl is absent")
def test_real_train_split_every_calculator_note_computes_to_its_result():
    train, dev = load_split("train", TRAIN.parent), load_split("dev", TRAIN.parent)
    assert len(train) + len(dev) == 7473 and not train.bad_rows and 450 < len(dev) < 550
    notes = [m for ex in [*train, *dev] for m in NOTE.finditer(ex.rationale)]
    assert len(notes) > 20_000
    # the calculator reproduces every note GSM8K wrote: SFT trains on outputs the engine will really return
    assert [m.group(0) for m in notes if calculate(m.group(1)) != normalize_number(m.group(2))] == []
    task = GSM8KTask()
    assert all(task.extract("".join(p["text"] for p in task.target(ex))) == ex.answer for ex in dev)


def load_split_free(row: dict) -> Example:
    """One Example from a row, as load_split makes it (without a file)."""
    from nanorl_gsm8k.data import validate_rows

    return validate_rows([(1, row)], "test", "memory")[0]


def test_the_task_pretrains_offline_on_its_own_files(tmp_path):
    """`data.corpus=task` with --data-dir: each train problem, then its solution with the calculator notes as the
    plain arithmetic they state (a tool call is special tokens, not text), then the answer line."""
    from nanorl.data import open_corpus

    _write(tmp_path / "train.jsonl", [ROW])
    task = GSM8KTask()
    docs = list(open_corpus("task", task=task, data_dir=str(tmp_path)).docs())
    assert docs == [
        f"{ROW['question']}\n\nNatalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    ]
