"""Registration of the gsm8k plugin with nanorl (entry point `nanorl` -> `gsm8k`).

Registers the `gsm8k` task (grade-school math word problems, a free-form number as the answer, solved with a
calculator tool) and the rewards `gsm8k.correct` and `gsm8k.format`. Imports only `nanorl.api` and the
standard library at import time; `datasets` / `pyarrow` load inside `GSM8KTask.load`.

The format the model learns (SFT's target, what RL rewards, what evaluation extracts):

    Natalia sold 48/2 = <|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>24 clips in May.
    ...
    #### 72

GSM8K writes its calculator notes as `<<48/2=24>>`; the target turns each into a tool call whose output is
the calculator's own answer (what the engine will feed back when the model calls it), which the loss mask
leaves out. The final line is GSM8K's own `#### N`.
"""

from __future__ import annotations

import re

from nanorl.api import Conversation, Example, Reward, Task, hookimpl
from nanorl_gsm8k.calculator import CalculatorError, calculate
from nanorl_gsm8k.data import normalize_number

PROMPT_TAIL = "Solve it step by step. On the last line, write #### followed by the final answer as a number."
# a calculator note in a GSM8K solution: <<expression=result>>
NOTE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# the final answer line; the last one counts (a model may restate it). The rest of the line is taken whole and
# stripped after: a lazy group before `[ \t]*$` backtracks quadratically on a long run of spaces.
FINAL = re.compile(r"^[ \t]*####([^\n]*)$", re.M)
FORMAT_BONUS = 0.1  # as the multiple-choice tasks: a tenth of a right answer for the answer line alone
# what an answer line may wrap its number in and still state it: "#### $1,200", "#### -$5", "#### 18 dollars",
# "#### 5%", "#### **72**", "#### 4.5 km/h." (no digit or operator after the number: "#### 3/4" and "#### 1 200"
# state no one number). No two runs that can match the same characters are adjacent: linear time.
DRESSED = re.compile(
    r"^(?:\*\*\s*)?(?P<sign>-\s*)?(?:\$\s*)?(?P<n>[-+]?[\d.,]*\d)\s*(?:\*\*\s*)?"
    r"(?:%|[A-Za-z][A-Za-z'/]*(?:[ .][A-Za-z][A-Za-z'/]*)*)?[\s.*]*$"
)


def target_parts(rationale: str, answer: str) -> list[dict[str, str]]:
    """SFT's assistant content: the rationale's text with every `<<expr=result>>` note turned into a `python`
    call of expr and a `python_output` of the calculator's result, then the line `#### answer`. A note the
    calculator refuses is dropped (the text after it states the result; see the tests for how few)."""
    parts: list[dict[str, str]] = []
    text, pos = [], 0
    for m in NOTE.finditer(rationale):
        text.append(rationale[pos : m.start()])
        pos = m.end()
        try:
            result = calculate(m.group(1))
        except CalculatorError:
            continue  # dropped: the text after a note states its result anyway
        parts.append({"type": "text", "text": "".join(text)})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": result})
        text = []
    text.append(rationale[pos:])
    tail = "".join(text)
    parts.append({"type": "text", "text": f"{tail}\n#### {answer}" if tail.strip() else f"#### {answer}"})
    return [p for p in parts if p["text"] or p["type"] != "text"]


def extract_number(completion: str) -> str | None:
    """The number on the completion's last `#### N` line, normalized (commas, trailing zeros), or None. A
    currency sign, a unit or bold around it are read past ("#### $18" and "#### 18 dollars" are 18): the number
    is right and grading it wrong would misreport the model. The format reward still asks for the bare number."""
    found = FINAL.findall(completion)
    if not found:
        return None
    m = DRESSED.match(found[-1].strip())
    return normalize_number(("-" if m.group("sign") else "") + m.group("n")) if m else None


def ends_with_answer_line(completion: str) -> bool:
    """Whether the completion's last non-empty line is `#### N` with N a number."""
    lines = completion.strip().splitlines()
    m = FINAL.match(lines[-1]) if lines else None
    return bool(m) and normalize_number(m.group(1).strip()) is not None


class GSM8KTask(Task):
    name = "gsm8k"
    description = "GSM8K: grade-school math word problems, a number as the answer, with a calculator tool"
    default_rewards = {"gsm8k.correct": 1.0, "gsm8k.format": 1.0}  # format_reward pays its own 0.1
    splits = ("train", "dev", "validation", "test")

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        from nanorl_gsm8k.data import load_split

        return load_split(split, data_dir)

    def prompt(self, example: Example) -> Conversation:
        return [{"role": "user", "content": f"{example.question}\n\n{PROMPT_TAIL}"}]

    def target(self, example: Example) -> list[dict[str, str]]:
        return target_parts(example.rationale or "", example.answer)

    def extract(self, completion: str) -> str | None:
        return extract_number(completion)

    def is_correct(self, example: Example, answer: str | None) -> bool:
        # both sides normalized: "1,000", "1000.0" and "1000" are one answer
        return answer is not None and normalize_number(answer) == example.answer

    def choices(self, example: Example) -> None:
        return None  # free-form: evaluation is generative only

    def corpus(self, split: str = "train", data_dir: str | None = None):
        """Pretraining text from the split's own files (`data.corpus=task`, offline with --data-dir): each problem,
        then its solution with the calculator notes written as plain arithmetic (`48/2 = 24`, where GSM8K writes
        `48/2 = <<48/2=24>>24`: a tool call is special tokens, which plain pretraining text does not hold)."""
        for ex in self.load(split, data_dir):
            solution = NOTE.sub("", ex.rationale or "")
            yield f"{ex.question}\n\n{solution}\n#### {ex.answer}"

    def tools(self):
        return {"python": calculate}


def correct_reward(example: Example, completion: str, answer: str | None) -> float:
    return 1.0 if answer is not None and normalize_number(answer) == example.answer else 0.0


def format_reward(example: Example, completion: str, answer: str | None) -> float:
    return FORMAT_BONUS if ends_with_answer_line(completion) else 0.0


@hookimpl
def register_tasks(register):
    register(GSM8KTask())


@hookimpl
def register_rewards(register):
    register(Reward("gsm8k.correct", correct_reward, "1.0 when the final `#### N` is the right number"))
    register(Reward("gsm8k.format", format_reward, "0.1 when the completion ends with a `#### N` line"))
