"""The metrics bus: every metric a stage logs goes through one `Telemetry` object.

    bus = Telemetry(run_dir, cfg)                     # hooks: the registered TelemetryHooks (plugins, sinks)
    bus.stage_start(info)                             # StageInfo
    bus.log("base", step, {"loss": 2.1, ...})         # every training step
    bus.rollouts("rl", batch)                         # RL: a RolloutBatch, every rl.kl_every steps
    bus.eval("eval", step, result)                    # EvalResult (step: None outside a training loop)
    bus.stage_end(info, metrics)
    bus.close()                                       # closes the hooks too (the progress bar, the wandb run)

What it does with a record:
1. calls every plugin hook (`nanorl.api.TelemetryHook`) and merges the metrics they return into the record;
   a hook that raises, or returns something other than a dict of numbers, strings, booleans or None (a list,
   an array, a tensor of several elements), is reported once on the console, naming it, and switched off for
   the rest of the process: a hook never stops a run (nor, under torchrun, leaves rank 0 dead and the other
   ranks waiting for it). A call over SLOW_HOOK_S is named once; a metric named as one the stage logs is dropped
   (said once): the stage's loss stays the loss;
2. appends the record to `<run>/metrics.jsonl` (always: one JSON object per line, `stage`, `step`, `time`,
   `metrics`; standard JSON: NaN and infinity become null, tensors and numpy numbers Python numbers; the file is
   the run's ground truth, the report reads it);
3. hands it to the sinks: the console progress bar and wandb live in `nanorl.builtin.sinks` and register like
   any plugin hook; they run after the other hooks (`sink = True`), so they see the merged record.

Only rank 0 of a distributed run logs; on other ranks every method is a no-op (each rank computes its own
metrics, and rank 0's are representative; losses are averaged across ranks by the stages where it matters).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from nanorl.api import EvalResult, RolloutBatch, StageInfo, TelemetryHook

METRICS_FILE = "metrics.jsonl"


SCALARS = (int, float, bool, str, type(None))

# A hook call longer than this is named once on the console (it stays on: slow is not wrong, but every step waits
# for it, and under torchrun every rank does)
SLOW_HOOK_S = 10.0


def _hook_metrics(out: Any) -> dict[str, Any]:
    """What a hook returned, checked: a dict of JSON scalars (a tensor or numpy number of one element counts as
    its number). Anything else raises TypeError saying what: it would fail the metrics file's write later."""
    if not isinstance(out, dict):
        raise TypeError(f"returned a {type(out).__name__}, not a dict of metrics")
    for k, v in out.items():
        if isinstance(k, str) and hasattr(v, "item") and _elements(v) == 1:
            continue  # a one-element tensor or numpy number: `_clean` makes it a float
        if not isinstance(k, str) or not isinstance(v, SCALARS):
            raise TypeError(f"returned metric {k!r} as a {type(v).__name__}, not a number")
    return out


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values: tensors/numpy numbers become Python numbers, NaN/inf become None (JSON has neither), in
    lists and dicts too (a stage's summary may hold a confidence interval or per-layer values)."""
    return {k: _json_value(v) for k, v in metrics.items()}


def _json_value(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item) and _elements(v) == 1:
        v = v.item()
    elif hasattr(v, "tolist") and callable(v.tolist):  # an array or tensor of several elements: its numbers
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def _elements(v: Any) -> int | None:
    """How many elements a tensor or numpy value holds (None for anything else)."""
    return v.numel() if hasattr(v, "numel") else getattr(v, "size", None)


class Telemetry:
    def __init__(
        self,
        run_dir: str | Path | None,
        cfg=None,
        hooks: list[TelemetryHook] | None = None,
        rank: int = 0,
        console=None,
    ):
        self.enabled = rank == 0
        self.path = Path(run_dir) / METRICS_FILE if run_dir is not None else None
        if hooks is None:
            hooks = self._registered_hooks(cfg)
        # sinks last: they see what the other hooks added
        self.hooks = sorted(hooks, key=lambda h: bool(getattr(h, "sink", False)))
        self.disabled: set[str] = set()
        self.slow: set[str] = set()  # hooks named once for a slow call
        self.clashed: set[str] = set()  # hooks told that a metric they return has a name the stage's use
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self._fh = None
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # line-buffered: a crash loses at most one line; closed by close() (the bus lives for a whole run)
            self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115
            if self._fh.tell() and not _ends_a_line(self.path):
                # a process killed mid-write left a torn last line: end it, so that this run's first record starts
                # a line of its own instead of joining the torn one (and being skipped with it by read_metrics)
                self._fh.write("\n")

    @staticmethod
    def _registered_hooks(cfg) -> list[TelemetryHook]:
        from nanorl.plugins import get_plugins

        off = set(cfg.telemetry.disable) if cfg is not None else set()
        return [h for h in get_plugins().telemetry_hooks() if h.name not in off]

    # ---- the hook calls, isolated ---------------------------------------------------------------------------
    def _call(self, method: str, *args, keep=()) -> dict[str, Any]:
        """`keep`: the keys the stage itself logs in this record. A hook's metric of the same name is dropped (and
        said once per hook): the stage's loss stays the loss in metrics.jsonl, whatever a plugin returns."""
        extra: dict[str, Any] = {}
        for hook in self.hooks:
            name = hook.name or type(hook).__name__
            if name in self.disabled:
                continue
            try:
                t0 = time.perf_counter()
                out = getattr(hook, method)(*args)
                took = time.perf_counter() - t0
                out = _clean(_hook_metrics(out)) if out else None
            except Exception as e:  # telemetry never stops training
                self.disabled.add(name)
                self._say(
                    f"telemetry hook {name!r} failed in {method}: {type(e).__name__}: {e}; switched off for this run"
                )
                continue
            if took > SLOW_HOOK_S and name not in self.slow:
                self.slow.add(name)
                self._say(
                    f"telemetry hook {name!r} took {took:.1f}s in {method}; telemetry.disable={name} switches it off"
                )
            clash = sorted(k for k in (out or ()) if k in keep)
            if clash:
                out = {k: v for k, v in out.items() if k not in keep}
                if name not in self.clashed:
                    self.clashed.add(name)
                    names = ", ".join(map(repr, clash))
                    self._say(f"telemetry hook {name!r} returned {names}, a metric the stage logs: kept the stage's")
            if out:
                extra.update(out)
                if method == "on_step" and args and isinstance(args[-1], dict):
                    args[-1].update(out)  # later hooks (the sinks) see the merged record
        return extra

    def _say(self, msg: str) -> None:
        """A warning about a hook, on the console. As plain text: an exception's message may hold "[...]", which
        markup would misread or choke on."""
        from rich.text import Text

        self.console.print(Text(msg, style="yellow"), highlight=False, soft_wrap=True)

    def _write(self, stage: str, step: int | None, metrics: dict[str, Any], kind: str | None = None) -> None:
        if self._fh is None:
            return
        rec: dict[str, Any] = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        if kind:
            rec["kind"] = kind
        rec["metrics"] = _clean(metrics)
        try:
            # allow_nan=False: standard JSON only (_clean made NaN/inf None; a bare NaN would be a bug, not a line)
            self._fh.write(json.dumps(rec, allow_nan=False) + "\n")
        except OSError as e:  # a full disk, a folder gone read-only: say which file (the write's error names none)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    # ---- the bus --------------------------------------------------------------------------------------------
    def stage_start(self, info: StageInfo, record: bool = True) -> None:
        """`record=False`: tell the hooks only. A standalone `nanorl eval` does that: a hook (the wandb sink)
        starts its run on a stage start, while a "start" record would mark the run's own eval stage as re-run."""
        if not self.enabled:
            return
        extra = self._call("on_stage_start", info, keep=("total_steps",))
        if record:
            self._write(info.stage, 0, {"total_steps": info.total_steps, **extra}, kind="start")

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Log one step's metrics (hooks may add some); returns the merged record."""
        if not self.enabled:
            return metrics
        record = _clean(dict(metrics))
        self._call("on_step", stage, step, record, keep=set(record))
        self._write(stage, step, record)
        return record

    def rollouts(self, stage: str, batch: RolloutBatch) -> dict[str, Any]:
        if not self.enabled:
            return {}
        extra = self._call("on_rollouts", batch)
        if extra:
            self._write(stage, batch.step, extra, kind="rollouts")
        return extra

    def eval(self, stage: str, step: int | None, result: EvalResult) -> dict[str, Any]:
        if not self.enabled:
            return {}
        scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, bool))}
        extra = self._call("on_eval", result, keep={"task", "split", *scalars})
        self._write(stage, step, {"task": result.task, "split": result.split, **scalars, **extra}, kind="eval")
        return extra

    def cleared(self, stage: str) -> None:
        """A stage's output removed before it runs afresh (`--from`, `--only`): its earlier records are stale."""
        if self.enabled:
            self._write(stage, None, {}, kind="clear")

    def stage_end(self, info: StageInfo, metrics: dict[str, Any], record: bool = True) -> None:
        """`record=False`: tell the hooks only (see stage_start)."""
        if not self.enabled:
            return
        extra = self._call("on_stage_end", info, metrics, keep=set(metrics))
        if record:
            self._write(info.stage, info.total_steps, {**metrics, **extra}, kind="end")

    def close(self) -> None:
        """The run (or its failure) is over: each hook's `close()` (the console's live progress
        bar stops and gives the terminal its cursor back, even when a stage raised before its end), then the file."""
        hooks, self.hooks = (self.hooks if self.enabled else []), []  # once: a second close() closes nothing again
        for hook in hooks:
            try:
                hook.close()
            except Exception as e:  # as a hook's other calls: said, never raised over the run's own error
                name = hook.name or type(hook).__name__
                self._say(f"telemetry hook {name!r} failed in close: {type(e).__name__}: {e}")
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<run>/metrics.jsonl` (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
