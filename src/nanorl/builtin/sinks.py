"""The built-in metric sinks: the console progress bar and Weights & Biases, registered as telemetry hooks.

They are ordinary `TelemetryHook`s (the plugin path runs in every run); `sink = True` makes the metrics bus
call them after every other hook, so they show what the other hooks added. metrics.jsonl is not a sink: the
bus writes it itself, because it must exist whatever plugins are loaded or disabled (the report reads it).

Both read their switches from the run config the stage hands over (`StageInfo.config["telemetry"]`):
`telemetry.console` and `telemetry.wandb` (off by default; wandb is imported only when on).

wandb writes nothing to stdout (`--json` output stays pure JSON): its console capture is off, and the run is
finished by the sink when the process ends, before wandb's own exit hook, so its closing lines ("You can sync
this run ...") go to stderr.
"""

from __future__ import annotations

import netrc
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from nanorl.api import EvalResult, StageInfo, TelemetryHook, hookimpl

# Metrics the progress line shows, in this order, when present (name, format).
SHOWN = (
    ("loss", "{:.4f}"),
    ("val_bpb", "{:.4f}"),
    ("reward", "{:.3f}"),
    ("acc", "{:.3f}"),
    ("signal_groups", "{:.0f}"),  # RL: the groups the step learned from (rewards that differ)
    ("tok_per_s", "{:,.0f}"),
)
LABELS = {"tok_per_s": "tok/s", "signal_groups": "groups"}


def _duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m: what a progress line can say in a few characters."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for key, f in SHOWN:
        v = metrics.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{LABELS.get(key, key)} {f.format(v)}")
    return "  ".join(parts)


def _what(info: StageInfo) -> str:
    """What a stage-start line says: the step count of a training stage ("1 step", "300 steps"); what a stage
    without steps works on (its `description`: the tokenizer's corpus, the models and splits eval answers)."""
    if info.description:
        return info.description
    return f"{info.total_steps} step" + ("" if info.total_steps == 1 else "s")


class ConsoleSink(TelemetryHook):
    """A rich progress bar per stage (step, loss, tokens/s, ETA); plain lines when stderr is not a terminal."""

    name = "console"
    sink = True

    def __init__(self) -> None:
        self.progress = None
        self.task_id = None
        self.on = True
        self.total = 0
        self.last_line = 0.0
        self.start = 0.0
        # the first step this process ran (a resumed stage starts past 1) and when it ended: the time left is
        # measured from there, so neither the steps done before a resume nor the first step's warm-up count
        self.first_step: int | None = None
        self.first_end = 0.0
        self.console = None

    def on_stage_start(self, info: StageInfo) -> None:
        from rich.console import Console
        from rich.markup import escape as esc

        self.on = bool(info.config.get("telemetry", {}).get("console", True))
        if not self.on:
            return None
        self.console = Console(stderr=True, soft_wrap=True)  # a log line stays one line, however long
        self.total = max(1, info.total_steps)
        self.start = time.time()
        self.first_step = None
        self.last_line = 0.0
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold cyan]{task.description:<5}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task_id = self.progress.add_task(info.stage, total=self.total, info=esc(info.description))
        else:
            self.console.print(f"[bold cyan]{esc(info.stage)}[/]: {esc(_what(info))}", highlight=False)
        return None

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if not self.on or self.console is None:
            return None
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, info=_fmt(metrics))
            return None
        # not a terminal (CI, a log file): a line every ~10 s and at the last step, with the time so far and the
        # time left
        now = time.time()
        if self.first_step is None:
            self.first_step, self.first_end = step, now
        if now - self.last_line >= 10 or step >= self.total:
            self.last_line = now
            when = _duration(now - self.start)
            if self.first_step < step < self.total:
                per_step = (now - self.first_end) / (step - self.first_step)
                when += f", ETA {_duration(per_step * (self.total - step))}"
            self.console.print(f"{stage} {step}/{self.total}  {_fmt(metrics)}  ({when})", highlight=False, markup=False)
        return None

    def close(self) -> None:
        """Stop the progress bar (the bus calls this when the run ends, a stage that raised included): a live bar
        hides the cursor until it stops."""
        progress, self.progress = self.progress, None
        if progress is not None:
            progress.stop()

    def on_eval(self, result: EvalResult) -> None:
        if not self.on or self.console is None:
            return None
        m = result.metrics
        acc = m.get("accuracy")
        if isinstance(acc, (int, float)):
            ci = m.get("accuracy_ci95")
            ci_s = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
            where = f"{result.task} {result.split} ({m.get('model_stage', '')}, {m.get('mode', '')})"
            self.console.print(f"eval {where}: accuracy {acc:.3f}{ci_s}, n={m.get('n')}", highlight=False, markup=False)
        return None

    def on_stage_end(self, info: StageInfo, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=self.total)
        self.close()
        if self.on and self.console is not None:
            self.console.print(f"[green]{info.stage} done[/] {_fmt(metrics)}", highlight=False)
        return None


class WandbSink(TelemetryHook):
    """Logs every record to Weights & Biases when `telemetry.wandb` is true (never otherwise: no import).

    Online, a nanorl run is one wandb run (id = the run's name, resumed by each later process: a resume, `nanorl
    train`, `nanorl eval`). Offline, wandb cannot resume: a second process under the same id starts a fresh
    offline run, and `wandb sync` of it replaces the first one's history. So offline each process is a wandb run
    of its own (id `NAME-<8 hex digits>`), all named after the nanorl run and grouped under it.

    Each stage's metrics are plotted against the stage's own step (`STAGE/step`), not wandb's count of log calls,
    which runs on across stages and across a resume."""

    name = "wandb"
    sink = True

    def __init__(self) -> None:
        self.run = None
        self.stages: set[str] = set()  # the stages whose step axis is defined in this run

    def on_stage_start(self, info: StageInfo) -> None:
        tel = info.config.get("telemetry", {})
        if not tel.get("wandb") or self.run is not None:
            return None
        # Never hang on a login prompt or an unreachable server: without an API key, log offline.
        if "WANDB_MODE" not in os.environ and not _wandb_key():
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no API key (WANDB_API_KEY, wandb login), logging offline (wandb sync later)", file=sys.stderr)
        import atexit

        import wandb

        if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            run_id, resume = f"{info.run_name}-{secrets.token_hex(4)}", None
        else:
            run_id, resume = info.run_name, "allow"
        self.run = wandb.init(
            project=tel.get("wandb_project", "nanorl"),
            name=info.run_name,
            group=info.run_name,
            dir=info.run_dir,
            config=info.config,
            resume=resume,
            id=run_id,
            # no capture of our stdout/stderr: wandb's wrapping of the streams is what sent its exit banner to
            # stdout, and the run's console is ours (the progress lines)
            settings=wandb.Settings(console="off"),
        )
        # atexit runs the last registered first: this finishes the run before wandb's own hook would, while the
        # streams are still ours (its closing lines to stderr)
        atexit.register(self.close)
        return None

    def close(self) -> None:
        """Finish the wandb run (once); the process's exit does it when no one called it before."""
        run, self.run = self.run, None
        self.stages.clear()
        if run is not None:
            run.finish()

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return None
        if stage not in self.stages:  # the stage's x axis: its step (a resumed stage goes on from its checkpoint)
            self.stages.add(stage)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        scalars = {f"{stage}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log({f"{stage}/step": step, **scalars})
        return None

    def on_eval(self, result: EvalResult) -> None:
        if self.run is not None:
            # one key per model and mode (eval/arith-dev/rl/generative/accuracy): the eval stage reports each
            # model stage in each mode, and under one key they would overwrite one another in wandb's summary
            m = result.metrics
            prefix = "/".join(
                str(p) for p in (result.task + "-" + result.split, m.get("model_stage"), m.get("mode")) if p
            )
            scalars = {k: v for k, v in m.items() if isinstance(v, (int, float))}
            self.run.log({f"eval/{prefix}/{k}": v for k, v in scalars.items()})
        return None


def _wandb_key() -> bool:
    """Whether wandb has an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes for its server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host) if path.is_file() else None
    except (OSError, netrc.NetrcParseError):  # unreadable or malformed: wandb would find no key there either
        return False
    return bool(entry and entry[2])


@hookimpl
def register_telemetry(register):
    register(ConsoleSink())
    register(WandbSink())
