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
