"""The AQuA-RAT plugin: loading and validation, prompt and SFT target, registration, the real dev figure."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from nanorl.api import Example, NanorlError, extract_letter
from nanorl_aqua.data import BadRowsWarning, load_split
from nanorl_aqua.plugin import AquaTask

# ../shared/data from the repository root (this file is plugins/aqua/tests/test_aqua.py)
DEV = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "aqua" / "dev.json"

ROW = {
    "question": "Three birds fly at 900 km/h. What is their speed in miles per minute?",
    "options": ["A)32400", "B)6000", "C)600", "D)60000", "E)9"],
    "rationale": "900 km/h = 540 miles/h = 9 miles per minute\nAnswer: E",
    "correct": "E",
}


def _row(**changes):
    return {**ROW, **changes}


def _write_lines(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_deepmind_json_lines(tmp_path):
    _write_lines(tmp_path / "train.json", [ROW, _row(correct="B", question="Another?")])
    examples = load_split("train", tmp_path)
    assert len(examples) == 2 and examples.bad_rows == [] and examples.total_rows == 2
    ex = examples[0]
    assert (ex.id, ex.answer, ex.options, ex.question) == ("aqua-train-1", "E", ROW["options"], ROW["question"])
    assert ex.rationale == ROW["rationale"] and ex.meta["line"] == 1


def test_dev_and_validation_are_one_split(tmp_path):
    _write_lines(tmp_path / "validation.jsonl", [ROW])  # JSONL under the hub's name
    assert [e.answer for e in load_split("dev", tmp_path)] == ["E"]
    assert [e.answer for e in load_split("validation", tmp_path)] == ["E"]
    # one name in the ids, whichever was asked for: evaluations of the two pair up by id (--compare)
    assert [e.id for e in load_split("validation", tmp_path)] == [e.id for e in load_split("dev", tmp_path)]
    assert [e.id for e in AquaTask().load("validation", str(tmp_path))] == ["aqua-dev-1"]


def test_loads_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ROW, _row(correct="Z")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    with pytest.warns(BadRowsWarning, match="line 2: correct is 'Z'"):
        examples = load_split("test", tmp_path)
    assert len(examples) == 1 and examples.bad_rows == [(2, "correct is 'Z' (expected one of A-E)")]


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    rows = [
        ROW,  # 1
        _row(options=ROW["options"][:4]),  # 2: four options
        "",  # 3: blank lines are not rows
        _row(options=["B)1", "A)2", "C)3", "D)4", "E)5"]),  # 4: labels out of order
        _row(correct="F"),  # 5
        _row(question="  "),  # 6
        "{not json",  # 7
        ROW,  # 8
    ]
    _write_lines(tmp_path / "dev.json", rows)
    with pytest.warns(BadRowsWarning) as caught:
        examples = load_split("dev", tmp_path)
    assert [e.meta["line"] for e in examples] == [1, 8]
    assert [n for n, _ in examples.bad_rows] == [2, 4, 5, 6, 7]
    reasons = dict(examples.bad_rows)
    assert "4 options" in reasons[2] and "option A" in reasons[4] and "question" in reasons[6]
    assert "not valid JSON" in reasons[7]
    message = str(caught[0].message)
    assert "skipped 5 of 7 rows" in message and "line 5:" in message


def test_an_empty_option_or_a_second_right_option_is_skipped(tmp_path):
    rows = [
        _row(options=["A)32400", "B)6000", "C) ", "D)60000", "E)9"]),  # 1: an empty option
        _row(options=["A)32400", "B) 9", "C)600", "D)60000", "E)9"]),  # 2: B reads as the correct E
        _row(options=["A)Rs 7925", "B)6000", "C)600", "D)rs  7925", "E)9"]),  # 3: twins, neither correct: kept
        ROW,  # 4
    ]
    _write_lines(tmp_path / "dev.json", rows)
    with pytest.warns(BadRowsWarning, match="skipped 2 of 4 rows"):
        examples = load_split("dev", tmp_path)
    assert [e.meta["line"] for e in examples] == [3, 4]
    assert examples.bad_rows == [(1, "option C is empty"), (2, "option B reads as the correct option E ('9')")]


def test_no_valid_row_is_an_error(tmp_path):
    _write_lines(tmp_path / "dev.json", [_row(correct="Q"), _row(options=[])])
    with pytest.raises(NanorlError, match="no valid AQuA row.*line 1"):
        load_split("dev", tmp_path)


def test_missing_data_errors(tmp_path):
    with pytest.raises(NanorlError, match="does not exist"):
        load_split("dev", tmp_path / "nowhere")
    with pytest.raises(NanorlError, match="dev.json") as e:
        load_split("dev", tmp_path)
    assert "--data-dir" in e.value.hint
    with pytest.raises(NanorlError) as e:
        load_split("holdout", tmp_path)
    assert e.value.exit_code == 2
    (tmp_path / "dev.json").write_bytes(gzip.compress(json.dumps(ROW).encode()))  # a compressed download
    with pytest.raises(NanorlError, match="cannot read .*dev.json") as e:
        load_split("dev", tmp_path)
    assert "UTF-8" in e.value.hint and "JSON lines" in e.value.hint


def test_offline_without_data_says_how_to_get_it():
    # conftest makes the hub unreachable and NANORL_HOME empty: nothing is cached
    pytest.importorskip("datasets")  # without it the error says to install it (a lent GPU's image has none)
    with pytest.raises(NanorlError, match="offline and not cached") as e:
        AquaTask().load("dev")
    assert "--data-dir" in e.value.hint and "train.json" in e.value.hint


def test_prompt_and_target(tmp_path):
    task = AquaTask()
    _write_lines(tmp_path / "dev.json", [ROW])
    ex = task.load("dev", str(tmp_path))[0]
    content = task.prompt(ex)[0]["content"]
    assert content.startswith("You are a careful math tutor. Solve step by step.\n\nThree birds")
    assert "\nA) 32400\nB) 6000\nC) 600\nD) 60000\nE) 9\n" in content
    assert content.endswith("On the last line, output exactly: Final Answer: <LETTER>")
    assert task.target(ex) == "900 km/h = 540 miles/h = 9 miles per minute\nFinal Answer: E"
    assert task.extract(task.target(ex)) == "E"


@pytest.mark.parametrize(
    "rationale, target",
    [
        ("x = 9\nAnswer: E", "x = 9\nFinal Answer: E"),
        ("x = 9\nANSWER:E", "x = 9\nFinal Answer: E"),
        ("x = 9\nAnswer is E.", "x = 9\nFinal Answer: E"),
        ("x = 9\nCorrect answer - E", "x = 9\nFinal Answer: E"),
        ("x = 9\nThe answer is (E)", "x = 9\nFinal Answer: E"),
        ("x = 9 Answer : E", "x = 9\nFinal Answer: E"),  # nanochatAquaRat made "...Answer : EAnswer: E"
        ("x = 9\nCORRECT OPTION:OPTION E", "x = 9\nFinal Answer: E"),
        ("x = 9\nE", "x = 9\nFinal Answer: E"),
        ("x = 9 miles per minute", "x = 9 miles per minute\nFinal Answer: E"),
        ("", "Final Answer: E"),
        ("Answer: E", "Final Answer: E"),
    ],
)
def test_target_removes_the_trailing_answer_line(rationale, target):
    example = Example(id="x", question="q", answer="E", options=ROW["options"], rationale=rationale)
    assert AquaTask().target(example) == target


def test_registration():
    from nanorl.plugins import Plugins

    plugins = Plugins()
    assert not [e for e in plugins.errors() if e[0] == "aqua"]
    task = plugins.task("aqua")
    ex_reward = {name: plugins.reward(name) for name in task.default_rewards}
    assert set(ex_reward) == {"aqua.correct", "aqua.format"}
    ex = Example(id="x", question="q", answer="C", options=ROW["options"])
    total = sum(w * ex_reward[n](ex, "so\nFinal Answer: C", "C") for n, w in task.default_rewards.items())
    assert total == pytest.approx(1.1)  # 1 for the answer, 0.1 for the format
    assert "aqua.letters" in plugins.registry["telemetry"]


@pytest.mark.parametrize(
    "completion, total",
    [
        ("so\nFinal Answer: C", 1.1),  # right and well-formed: the answer and the format bonus
        ("so\nFinal Answer: C\n\n", 1.1),
        ("so\nFinal Answer: B", 0.1),  # wrong but well-formed: the bonus alone
        ("so\nFinal Answer: C.", 1.0),  # a malformed answer line is still read, but earns no bonus
        ("so\nFinal Answer: (C)", 1.0),
        ("so\nfinal answer: C", 1.0),
        ("so\nFinal Answer:  C", 1.0),
        ("Final Answer: C\nbecause 3 * 200 = 600", 1.0),  # not the last line
        ("so the answer is C", 1.0),
        ("so\nFinal Answer: F", 0.0),
        ("", 0.0),
    ],
)
def test_the_default_reward_pays_the_format_bonus_only_for_a_well_formed_last_line(completion, total):
    from nanorl.plugins import Plugins

    plugins = Plugins()
    task = plugins.task("aqua")
    ex = Example(id="x", question="q", answer="C", options=ROW["options"])
    answer = task.extract(completion)
    got = sum(w * plugins.reward(n).fn(ex, completion, answer) for n, w in task.default_rewards.items())
    assert got == pytest.approx(total, abs=1e-12)


@pytest.mark.skipif(not DEV.is_file(), reason="../shared/data/aqua/dev.json is absent")
def test_dev_gold_rationale_extraction():
    """The figure in docs/aqua.md: the letter read from each gold rationale of the dev split."""
    examples = load_split("dev", DEV.parent)
    assert len(examples) == 254 and not examples.bad_rows
    with_options = [extract_letter(e.rationale, options=e.options) for e in examples]
    letters_only = [extract_letter(e.rationale) for e in examples]
    for got in (with_options, letters_only):
        wrong = [(e.meta["line"], g, e.answer) for e, g in zip(examples, got, strict=True) if g and g != e.answer]
        assert wrong == []  # it abstains rather than guess
    right = sum(g == e.answer for e, g in zip(examples, with_options, strict=True))
    assert right / len(examples) >= 0.95  # measured: 252 / 254
    assert sum(g == e.answer for e, g in zip(examples, letters_only, strict=True)) >= 239  # measured: 239
    # every SFT target ends with the gold answer line and states no other letter
    task = AquaTask()
    for e in examples:
        target = task.target(e)
        assert target.endswith(f"\nFinal Answer: {e.answer}") and extract_letter(target) == e.answer
        assert "Answer: " + e.answer + "Answer" not in target


def test_the_task_pretrains_offline_on_its_own_files(tmp_path):
    """`data.corpus=task` with --data-dir: the tokenizer and base stages read the split's own files, each problem
    as the prompt shows it and then the worked answer SFT teaches; nanorl passes the data folder through."""
    from nanorl.data import open_corpus

    _write_lines(tmp_path / "train.json", [ROW, _row(question="Another?", correct="B")])
    task = AquaTask()
    docs = list(open_corpus("task", task=task, data_dir=str(tmp_path)).docs())
    assert len(docs) == 2
    ex = load_split("train", tmp_path)[0]
    assert docs[0] == f"{task.prompt(ex)[-1]['content']}\n\n{task.target(ex)}"
    assert ROW["question"] in docs[0] and "C) 600" in docs[0] and docs[0].endswith("Final Answer: E")
    assert "Another?" in docs[1] and docs[1].endswith("Final Answer: B")
