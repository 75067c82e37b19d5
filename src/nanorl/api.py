"""The public surface for plugins. A plugin imports this module and nothing else from nanorl.

Everything here is cheap to import (no torch, datasets or wandb): `nanorl --help` loads every plugin's entry
point, so a plugin module must stay light at import time too and import heavy libraries inside its functions.

What a plugin provides, through the hooks in `nanorl.hookspecs`:
- tasks      (`Task` subclasses: data, prompt, SFT target, answer extraction, scoring)
- rewards    (`Reward`: a named function `fn(example, completion, answer) -> float`)
- telemetry  (`TelemetryHook` subclasses: extra metrics at stage start/step/rollouts/eval/end)
- backends   (`CloudBackend` subclasses: launch a run on rented GPUs)
- commands   (extra Typer sub-commands on the `nanorl` app)

Multiple choice: `nanorl.multichoice` (prompt, answer extraction, rewards, evaluation statistics, letter
telemetry) is re-exported here lazily: `from nanorl.api import extract_letter` or `nanorl.api.multichoice`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pluggy

__all__ = [
    "hookimpl",
    "NanorlError",
    "Message",
    "Conversation",
    "Example",
    "Task",
    "Reward",
    "RewardFn",
    "TelemetryHook",
    "StageInfo",
    "RolloutBatch",
    "Scorer",
    "EvalResult",
    "CloudBackend",
    "LaunchSpec",
    "Instance",
    "Estimate",
    "InstanceType",
    "LETTERS",
]

PROJECT = "nanorl"
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Decorate a plugin's hook functions with this: `@hookimpl def register_tasks(register): ...`."""

LETTERS = ("A", "B", "C", "D", "E")
"""The answer letters of five-way multiple choice (AQuA-RAT and the built-in `arith` task)."""


class NanorlError(Exception):
    """An error the user can act on: what is wrong, and (hint) what to do about it.

    The CLI prints it as one red line plus the hint, without a traceback (`nanorl --debug ...` shows one).
    `exit_code` 2 means bad input (config, arguments), 1 anything else.
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


# ---------------------------------------------------------------------------------------------------------
# Conversations and examples

Message = dict[str, Any]
"""One turn: `{"role": "system"|"user"|"assistant", "content": str | list[part]}`.

An assistant turn that calls a tool has a list of parts as content, each `{"type": "text"|"python"|
"python_output", "text": str}`: the model writes `python` parts, the engine writes `python_output` parts (the
tool's answer), and the loss mask never trains on `python_output`.
"""

Conversation = list[Message]


@dataclass
class Example:
    """One problem of a task, in a task-independent shape.

    `answer` is the gold final answer as the task's `extract` would return it (a letter "A".."E" for multiple
    choice, a number as a string for GSM8K). `options` holds the choice texts as the data writes them
    ("A)12", ...) or None for free-form answers. `meta` carries anything else the task wants back.
    """

    id: str
    question: str
    answer: str
    options: list[str] | None = None
    rationale: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """A task: its data, how it is asked, what the model should answer, and how an answer is scored.

    Subclass it and set `name`. Only `load`, `prompt`, `target` and `extract` are required; the rest have
    defaults that fit most tasks.
    """

    name: str = ""
    description: str = ""
    #: reward names (registered through `register_rewards`) and their weights, used when the run config names none
    default_rewards: dict[str, float] = {}
    #: the splits `load` accepts; "dev" and "validation" should name the same split where both make sense
    splits: tuple[str, ...] = ("train", "dev", "test")

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        """Return the examples of one split. Raise `NanorlError` (saying how to get the data) when absent."""
        raise NotImplementedError

    def prompt(self, example: Example) -> Conversation:
        """The conversation the model is asked (usually one user message)."""
        raise NotImplementedError

    def target(self, example: Example) -> str | list[dict[str, str]]:
        """The assistant text that SFT trains on: the reasoning, then the final answer line; a list of content
        parts (see `Message`) when the reasoning calls a tool (GSM8K's calculator)."""
        raise NotImplementedError

    def extract(self, completion: str) -> str | None:
        """The final answer in a completion, in the form of `Example.answer`; None when it gives none."""
        raise NotImplementedError

    def is_correct(self, example: Example, answer: str | None) -> bool:
        return answer is not None and answer == example.answer

    def choices(self, example: Example) -> list[str] | None:
        """The answer letters for categorical evaluation (compare the logits of these tokens), or None."""
        return list(LETTERS[: len(example.options)]) if example.options else None

    def corpus(self, split: str = "train", data_dir: str | None = None) -> Iterable[str] | None:
        """Pretraining text of the task's own (`data.corpus=task`, the tiny preset's); None when it has none.
        `data_dir` is `load`'s (`--data-dir`): a task read from local files can pretrain on them offline. A
        task written as `corpus(self, split)` works too: nanorl passes `data_dir` only to a method that takes it."""
        return None

    def tools(self) -> dict[str, Callable[[str], str | None]]:
        """Tools the model may call while sampling, by name; `python` is the calculator (GSM8K).

        The engine calls `tools()["python"](code)` on the text between `<|python_start|>` and `<|python_end|>`
        and feeds the returned string back between `<|output_start|>` and `<|output_end|>` (None: no output).
        """
        return {}


# ---------------------------------------------------------------------------------------------------------
# Rewards

RewardFn = Callable[[Example, str, "str | None"], float]
"""`fn(example, completion, answer) -> float`; `answer` is what the task's `extract` found in the completion."""


@dataclass
class Reward:
    """A named reward. The run config combines rewards with weights: `rl.rewards = {"aqua.correct": 1.0}`.

    `fn` must return a finite number (int, float, bool or a 0-d tensor/array); anything else, or an exception
    other than `NanorlError`, stops the run with one line naming the reward and its plugin (`plugin`, filled in
    when the plugin registers it)."""

    name: str
    fn: RewardFn
    description: str = ""
    plugin: str = field(default="", compare=False)

    def __call__(self, example: Example, completion: str, answer: str | None) -> float:
        try:
            value = self.fn(example, completion, answer)
        except NanorlError:
            raise
        except Exception as e:
            raise self._error(f"raised {type(e).__name__}: {e}", "fix the reward function (--debug: where)") from e
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            kind = f" ({type(value).__name__})" if value is not None else ""
            raise self._error(f"returned {value!r}{kind}", "a reward returns a number (a float)")
        try:
            r = float(value)
        except (TypeError, ValueError) as e:  # a tensor of several values
            raise self._error(f"returned {type(value).__name__} that is not one number", "return a float") from e
        if r != r or r in (float("inf"), float("-inf")):
            raise self._error(f"returned {r}", "a reward returns a finite number")
        return r

    def _error(self, what: str, hint: str) -> NanorlError:
        by = f" (plugin {self.plugin!r})" if self.plugin else ""
        return NanorlError(f"reward {self.name!r}{by} {what}", hint=hint)


# ---------------------------------------------------------------------------------------------------------
# Telemetry


@dataclass
class StageInfo:
    """What a telemetry hook learns about the stage that starts or ends."""

    run_name: str
    run_dir: str
    stage: str
    task: str
    config: dict[str, Any]
    total_steps: int
    #: what a stage without training steps (tokenizer, eval) works on, e.g. "the rl and sft models on dev
    #: (generative)"; the console prints it instead of a step count. Empty for the training stages.
    description: str = ""
    #: how often each gold answer (`Example.answer`) occurs in the examples the stage trains on (the rl stage:
    #: the train split), known once at the stage's start: the baselines a hook compares rollouts against
    #: (`LetterTelemetry`'s collapse alarm). Empty where the stage gives none.
    answer_counts: dict[str, int] = field(default_factory=dict)


class Scorer(Protocol):
    """Handles into the models of an RL step, for telemetry that needs more than the sampled text.

    `which` is "policy" (the model being trained) or "reference" (the frozen model RL started from).
    Every call runs without gradients.
    """

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens)."""
        ...

    def next_token_logits(
        self, which: Literal["policy", "reference"], contexts: Sequence[Sequence[int]], candidates: Sequence[int]
    ) -> list[list[float]]:
        """For each context, the logits of the candidate tokens at the next position."""
        ...

    def token_logprobs(
        self, which: Literal["policy", "reference"], prompt_ids: Sequence[int], completions: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """For each completion of one prompt, the log-probability of each of its tokens."""
        ...


@dataclass
class RolloutBatch:
    """One RL step's rollouts, handed to `TelemetryHook.on_rollouts`.

    Rows are grouped: the completions of `examples[i]` are rows `i*group_size ... (i+1)*group_size - 1`.
    """

    step: int
    examples: list[Example]
    group_size: int
    prompt_ids: list[list[int]]
    completions: list[str]
    completion_ids: list[list[int]]
    answers: list[str | None]
    rewards: list[float]
    correct: list[bool]
    scorer: Scorer


@dataclass
class EvalResult:
    """A finished evaluation, handed to `TelemetryHook.on_eval` (metrics as written to eval/<task>-<split>.json)."""

    task: str
    split: str
    metrics: dict[str, Any]


class TelemetryHook:
    """Extra metrics for the metrics bus. Every method is optional; each may return a dict of metrics to log.

    A hook that raises is reported once and switched off for the rest of the run: telemetry never stops training.
    """

    name: str = ""

    def on_stage_start(self, info: StageInfo) -> dict[str, float] | None:
        return None

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> dict[str, float] | None:
        return None

    def on_rollouts(self, batch: RolloutBatch) -> dict[str, float] | None:
        return None

    def on_eval(self, result: EvalResult) -> dict[str, float] | None:
        return None

    def on_stage_end(self, info: StageInfo, metrics: dict[str, float]) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        """The command's metrics bus closes (its end, or a stage that raised before on_stage_end): release what
        the hook holds (a progress bar, a connection)."""
        return None


# ---------------------------------------------------------------------------------------------------------
# Cloud backends


@dataclass
class LaunchSpec:
    """What to run where: `command` runs on the new machine (e.g. `nanorl pipeline --task aqua --depth 8`), after
    `setup` (shell, e.g. installing nanorl), with `env` set. `max_hours` is what an estimate prices.

    `end_when_done` (the machine ends itself when the command has ended, whatever its exit code) and
    `end_after_hours` (it ends itself after so many hours, done or not) need a backend with `can_end_itself`."""

    instance_type: str
    command: str
    region: str | None = None
    name: str | None = None
    ssh_key: str | None = None
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    max_hours: float | None = None
    setup: str | None = None
    end_when_done: bool = False
    end_after_hours: float | None = None


@dataclass
class Instance:
    id: str
    status: str
    instance_type: str
    region: str | None = None
    ip: str | None = None
    name: str | None = None
    price_per_hour: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Estimate:
    instance_type: str
    price_per_hour: float
    hours: float
    total: float
    regions_available: list[str] = field(default_factory=list)


@dataclass
class InstanceType:
    """A machine a backend rents: its name (what `LaunchSpec.instance_type` takes), what it is, and where it is free."""

    name: str
    description: str
    price_per_hour: float
    gpus: int
    regions_available: list[str] = field(default_factory=list)


class CloudBackend:
    """A place to rent GPUs. Errors (credentials, capacity, quota) are raised as `NanorlError` with a hint.

    `can_end_itself`: a launched machine can terminate itself (`LaunchSpec.end_when_done`, `end_after_hours`)."""

    name: str = ""
    can_end_itself: bool = False

    def types(self) -> list[InstanceType]:
        raise self._unsupported("types")

    def estimate(self, spec: LaunchSpec) -> Estimate:
        raise self._unsupported("estimate")

    def launch(self, spec: LaunchSpec) -> Instance:
        raise self._unsupported("launch")

    def status(self, instance_id: str) -> Instance:
        raise self._unsupported("status")

    def list(self) -> list[Instance]:
        raise self._unsupported("list")

    def logs(self, instance_id: str) -> str:
        raise self._unsupported("logs")

    def terminate(self, instance_id: str) -> Instance:
        raise self._unsupported("terminate")

    def _unsupported(self, method: str) -> NanorlError:
        return NanorlError(
            f"the {self.name or type(self).__name__!r} cloud backend does not implement {method}()",
            hint="its plugin's author can add it; `nanorl plugins list` shows which plugin provides the backend",
        )


# ---------------------------------------------------------------------------------------------------------
# Multiple choice (re-exported lazily: nanorl.multichoice imports this module, so it cannot be imported here
# at the top; PEP 562 `__getattr__` resolves these names on first use)

MULTICHOICE = (
    "mc_conversation",
    "final_answer_line",
    "extract_letter",
    "ends_with_final_answer",
    "correct_reward",
    "format_reward",
    "option_text",
    "wilson_interval",
    "mcnemar_p",
    "paired_diff_interval",
    "majority_baseline",
    "summarize",
    "compare",
    "shuffle_options",
    "unshuffle_letter",
    "position_bias",
    "shuffle_eval",
    "eval_record",
    "mcnemar_chi2_p",
    "option_label",
    "strip_answer_statement",
    "LetterTelemetry",
)
__all__ += list(MULTICHOICE)

# Reading a task's data from a directory or the hub (nanorl.taskdata, which imports this module: lazily too)
TASKDATA = (
    "TaskExamples",
    "BadRowsWarning",
    "find_data_file",
    "read_rows",
    "hub_rows",
    "hf_offline",
    "collect_examples",
    "warn_bad_rows",
)
__all__ += list(TASKDATA)


def __getattr__(name: str) -> Any:
    import importlib

    if name == "multichoice" or name in MULTICHOICE:
        module = importlib.import_module("nanorl.multichoice")
        return module if name == "multichoice" else getattr(module, name)
    if name in TASKDATA:
        return getattr(importlib.import_module("nanorl.taskdata"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
