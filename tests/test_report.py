"""The run report: report.md and its figure are written whole or not at all (a temp file, then a rename).

matplotlib is optional and not installed for the tests, so a stand-in module plays it: its savefig writes the
bytes it is given, or half of them and then fails as a full disk would.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from nanorl.report import write_report


def _fake_matplotlib(monkeypatch, fail: bool) -> None:
    class Fig:
        def tight_layout(self):
            pass

        def savefig(self, path, dpi=None, format=None):
            assert format == "png"  # the temp file's name says no format
            if fail:
                Path(path).write_bytes(b"\x89PNG half")
                raise OSError(28, "No space left on device", str(path))
            Path(path).write_bytes(b"\x89PNG whole")

    class Ax:
        def __getattr__(self, name):
            return lambda *a, **k: None

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda rows, cols, figsize=None: (Fig(), [Ax() for _ in range(cols)] if cols > 1 else Ax())
    pyplot.close = lambda fig: None
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda backend: None
    mpl.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"stage": "base", "step": s, "time": 0.0, "metrics": {"loss": 3.0 - s / 10}} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_the_report_shows_its_figure(tmp_path, monkeypatch):
    _fake_matplotlib(monkeypatch, fail=False)
    run = _run(tmp_path)
    report = write_report(run)
    assert (run / "report_curves.png").read_bytes() == b"\x89PNG whole"
    assert "![training curves](report_curves.png)" in report.read_text()
    assert not list(run.glob("*.tmp"))


def test_a_figure_that_fails_mid_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    _fake_matplotlib(monkeypatch, fail=True)
    run = _run(tmp_path)
    (run / "report_curves.png").write_bytes(b"\x89PNG previous")
    with pytest.raises(OSError):
        write_report(run)
    assert (run / "report_curves.png").read_bytes() == b"\x89PNG previous"
    assert not list(run.glob("*.tmp"))


def test_the_report_marks_what_a_free_form_task_lacks(tmp_path, monkeypatch):
    # GSM8K's summary has no chance level and no format rate: "-", not an empty cell; the paired comparison
    # shows its (asymmetric) interval
    _fake_matplotlib(monkeypatch, fail=False)
    run = _run(tmp_path)
    (run / "eval").mkdir()
    gen = {"n": 10, "accuracy": 0.3, "accuracy_ci95": [0.1, 0.6], "majority_baseline": 0.1}
    mc = {**gen, "chance_baseline": 0.2, "format_rate": 0.9}
    comp = {"a": "rl", "b": "sft", "accuracy_a": 0.3, "accuracy_b": 0.3, "diff": 0.0, "diff_ci95": [-0.278, 0.278]}
    comp.update(p_value=1.0, n=10, test="McNemar exact")
    for task, summary in (("gsm8k", gen), ("aqua", mc)):
        res = {"task": task, "split": "dev", "stage": "rl", "modes": {"generative": summary}}
        res["compare"] = {"generative": comp}
        (run / "eval" / f"{task}-dev.json").write_text(json.dumps(res))
    text = write_report(run).read_text()
    cells = {ln.split(" | ")[0].strip("| "): ln.strip("| ").split(" | ") for ln in text.splitlines() if ".json" in ln}
    assert cells["gsm8k-dev.json"][-3:] == ["-", "0.1", "-"]  # chance, majority, format rate
    assert "-" not in cells["aqua-dev.json"][-3:]
    assert "diff +0.000, 95% CI -0.278 to +0.278, McNemar p = 1, n = 10" in text
