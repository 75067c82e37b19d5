"""The metrics bus (telemetry.py) and the wandb sink (builtin/sinks.py): what metrics.jsonl holds, what wandb is
asked for. wandb itself is replaced by a recorder: these check nanorl's calls, not wandb's servers."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from rich.console import Console

from nanorl.api import StageInfo, TelemetryHook
from nanorl.telemetry import METRICS_FILE, Telemetry


def _strict_lines(run_dir) -> list[dict]:
    """metrics.jsonl read as standard JSON: NaN and Infinity are not JSON (jq, pandas, JavaScript refuse them)."""

    def refuse(const):
        raise AssertionError(f"{const} in metrics.jsonl: not valid JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_metrics_jsonl_stays_standard_json_with_nan_and_numpy_values_inside_lists(tmp_path):
    info = StageInfo("r", str(tmp_path), "eval", "arith", {}, 1)
    with Telemetry(tmp_path, hooks=[]) as bus:
        bus.log("base", 1, {"loss": np.float32(0.5), "grad_norm": float("inf")})
        # a stage's summary may hold a list (a confidence interval, per-layer values): each element cleaned too
        bus.stage_end(info, {"ci": [np.float32(0.25), float("nan")], "n": np.int64(3), "per": {"a": float("-inf")}})
    recs = _strict_lines(tmp_path)
    assert recs[0]["metrics"] == {"loss": 0.5, "grad_norm": None}
    assert recs[1]["metrics"] == {"ci": [0.25, None], "n": 3, "per": {"a": None}}


# ---- the wandb sink, against a recorder standing in for the wandb module ---------------------------------------
class _Run:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.defined, self.finished = kwargs, [], [], False

    def log(self, d):
        self.logged.append(d)

    def define_metric(self, name, step_metric=None, **kw):
        self.defined.append((name, step_metric))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """The wandb module as a recorder: `.runs` lists the runs `init` started (one per sink, as one per process)."""
    mod = types.ModuleType("wandb")
    mod.runs = []
    mod.Settings = lambda **kw: kw

    def init(**kwargs):
        mod.runs.append(_Run(kwargs))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    return mod


def _start(tmp_path, stage="base"):
    from nanorl.builtin.sinks import WandbSink

    sink = WandbSink()
    sink.on_stage_start(StageInfo("myrun", str(tmp_path), stage, "arith", {"telemetry": {"wandb": True}}, 6))
    return sink


def test_wandb_with_a_key_from_wandb_login_logs_online(fake_wandb, tmp_path, monkeypatch):
    """`wandb login` keeps the key in ~/.netrc, not in WANDB_API_KEY: such a user must not be sent offline."""
    import os

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    _start(tmp_path).close()
    assert "WANDB_MODE" not in os.environ
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))  # no key anywhere: offline, never a login prompt
    _start(tmp_path).close()
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_plots_each_stage_against_its_own_step(fake_wandb, tmp_path, monkeypatch):
    """wandb's own step counts log calls across the run: sft's first step would sit after base's last, and a stage
    resumed at its checkpoint would go on from where the killed process stopped, not from its step."""
    monkeypatch.setenv("WANDB_MODE", "online")
    sink = _start(tmp_path)
    sink.on_step("base", 5, {"loss": 2.0, "note": "x"})
    sink.on_stage_start(StageInfo("myrun", str(tmp_path), "sft", "arith", {"telemetry": {"wandb": True}}, 3))
    sink.on_step("sft", 1, {"loss": 1.0})
    run = fake_wandb.runs[0]
    assert len(fake_wandb.runs) == 1 and run.kwargs["id"] == "myrun" and run.kwargs["resume"] == "allow"
    assert ("base/*", "base/step") in run.defined and ("sft/*", "sft/step") in run.defined
    assert run.logged == [{"base/step": 5, "base/loss": 2.0}, {"sft/step": 1, "sft/loss": 1.0}]
    sink.close()


def test_offline_wandb_gives_each_process_a_run_of_its_own_grouped_under_the_run(fake_wandb, tmp_path, monkeypatch):
    """wandb cannot resume an offline run: a second process under the same id starts a fresh offline run whose
    `wandb sync` replaces the first one's history. Offline, each process gets its own id, grouped by the run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    first, second = _start(tmp_path), _start(tmp_path)
    a, b = (r.kwargs for r in fake_wandb.runs)
    assert a["id"] != b["id"] and a["id"].startswith("myrun-") and b["id"].startswith("myrun-")
    assert a["group"] == b["group"] == "myrun" and a["name"] == "myrun"
    first.close(), second.close()


def test_a_hook_cannot_overwrite_a_metric_the_stage_logged(tmp_path):
    """metrics.jsonl is the run's ground truth: a plugin's `loss` must not replace the stage's loss."""

    class Clash(TelemetryHook):
        name = "clash"

        def on_step(self, stage, step, metrics):
            return {"loss": 0.0, "mine": 1.0}

    with open(tmp_path / "out.txt", "w") as fh, Telemetry(tmp_path, None, [Clash()], console=Console(file=fh)) as bus:
        for step in (1, 2):
            bus.log("base", step, {"loss": torch.tensor(2.5)})
    recs = _strict_lines(tmp_path)
    assert [r["metrics"] for r in recs] == [{"loss": 2.5, "mine": 1.0}] * 2
    out = (tmp_path / "out.txt").read_text()
    assert out.count("telemetry hook 'clash' returned 'loss', a metric the stage logs: kept the stage's") == 1


def test_a_stage_that_fails_under_a_progress_bar_gives_the_terminal_its_cursor_back(tmp_path, monkeypatch, capsys):
    """In a terminal the console sink draws a live progress bar, which hides the cursor until it stops. A stage
    that raises never reaches on_stage_end: closing the bus (the pipeline's `finally`) must stop the bar, or the
    user's shell is left without a cursor, and the error printed under a bar still being redrawn."""
    from nanorl.builtin.sinks import ConsoleSink

    monkeypatch.setenv("FORCE_COLOR", "1")  # stderr counts as a terminal
    sink = ConsoleSink()
    with pytest.raises(RuntimeError), Telemetry(tmp_path, None, [sink]) as bus:
        bus.stage_start(StageInfo("r", str(tmp_path), "base", "arith", {}, 10))
        bus.log("base", 1, {"loss": 2.0})
        raise RuntimeError("out of memory")
    assert sink.progress is None
    err = capsys.readouterr().err
    assert err.count("\x1b[?25l") == 1 and err.rindex("\x1b[?25h") > err.rindex("\x1b[?25l")  # hidden, shown again


def test_a_slow_hook_is_named_once_with_its_time(tmp_path, monkeypatch):
    """A hook that takes seconds a call slows every step (under torchrun every rank waits for rank 0): the user
    must learn which one, once, and how to switch it off."""
    import time

    import nanorl.telemetry

    monkeypatch.setattr(nanorl.telemetry, "SLOW_HOOK_S", 0.05)

    class Slow(TelemetryHook):
        name = "plug.slow"

        def on_step(self, stage, step, metrics):
            time.sleep(0.06)
            return {"slow": 1.0}

    with open(tmp_path / "out.txt", "w") as fh, Telemetry(tmp_path, None, [Slow()], console=Console(file=fh)) as bus:
        for step in (1, 2):
            bus.log("base", step, {"loss": 2.0})
    out = (tmp_path / "out.txt").read_text()
    assert out.count("telemetry hook 'plug.slow' took ") == 1 and "s in on_step" in out
    assert "telemetry.disable=plug.slow" in out
    assert [r["metrics"]["slow"] for r in _strict_lines(tmp_path)] == [1.0, 1.0]  # still on: slow is not wrong
