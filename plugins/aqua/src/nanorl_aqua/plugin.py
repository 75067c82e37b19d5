"""Registration of the aqua plugin with nanorl (entry point `nanorl` -> `aqua`).

Registers the `aqua` task, the rewards `aqua.correct` and `aqua.format`, and the telemetry hook
`aqua.letters` (letter KL and collapse alarm during RL on aqua). Imports only `nanorl.api` and the standard
library at import time; `datasets` / `pyarrow` load inside `AquaTask.load`.
"""

from __future__ import annotations

from nanorl.api import (
    Conversation,
    Example,
    LetterTelemetry,
    Reward,
    Task,
    correct_reward,
    extract_letter,
    final_answer_line,
    format_reward,
    hookimpl,
    mc_conversation,
    strip_answer_statement,
)


class AquaTask(Task):
    name = "aqua"
    description = "AQuA-RAT: algebra word problems, five options, with rationales (deepmind/aqua_rat)"
    # format_reward already returns 0.1 (a tenth of a correct answer), so both weights are 1
    default_rewards = {"aqua.correct": 1.0, "aqua.format": 1.0}
    splits = ("train", "dev", "validation", "test")

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        from nanorl_aqua.data import load_split

        return load_split(split, data_dir)

    def prompt(self, example: Example) -> Conversation:
        return mc_conversation(example.question, example.options or [])

    def target(self, example: Example) -> str:
        """The rationale without its own answer line, then `Final Answer: X`."""
        body = strip_answer_statement(example.rationale or "")
        return f"{body}\n{final_answer_line(example.answer)}" if body else final_answer_line(example.answer)

    def extract(self, completion: str) -> str | None:
        return extract_letter(completion)

    def corpus(self, split: str = "train", data_dir: str | None = None):
        """Pretraining text from the split's own files (`data.corpus=task`, offline with --data-dir): each problem
        as the prompt shows it, then its worked answer, as SFT will see them."""
        for ex in self.load(split, data_dir):
            yield f"{self.prompt(ex)[-1]['content']}\n\n{self.target(ex)}"


@hookimpl
def register_tasks(register):
    register(AquaTask())


@hookimpl
def register_rewards(register):
    register(Reward("aqua.correct", correct_reward, "1.0 when the extracted letter is the gold one"))
    register(Reward("aqua.format", format_reward, "0.1 when the completion ends with `Final Answer: <A-E>`"))


@hookimpl
def register_telemetry(register):
    register(LetterTelemetry("aqua.letters", task="aqua"))
