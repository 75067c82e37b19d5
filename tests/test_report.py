"""The run report: report.md and its figure, drawn with the real matplotlib (a dev dependency) and written whole
or not at all (a temp file, then a rename)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nanorl.report import _ema, curves_figure, write_report


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"stage": "base", "step": s, "time": 0.0, "metrics": {"loss": 3.0 - s / 10}} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def _record(stage: str, step: int, **metrics) -> dict:
    return {"stage": stage, "step": step, "time": 0.0, "metrics": metrics}


def test_the_report_shows_its_figure(tmp_path):
    run = _run(tmp_path)
    report = write_report(run)
    assert (run / "report_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](report_curves.png)" in report.read_text()
    assert not list(run.glob("*.tmp"))


def test_without_matplotlib_the_report_has_its_tables_and_no_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    run = _run(tmp_path)
    text = write_report(run).read_text()
    assert "| base |" in text and "report_curves" not in text
    assert not (run / "report_curves.png").exists()


def test_a_figure_that_fails_mid_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, path, **kwargs):
        assert kwargs.get("format") == "png"  # the temp file's name says no format
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    run = _run(tmp_path)
    (run / "report_curves.png").write_bytes(b"\x89PNG previous")
    with pytest.raises(OSError):
        write_report(run)
    assert (run / "report_curves.png").read_bytes() == b"\x89PNG previous"
    assert not list(run.glob("*.tmp"))


def test_the_figure_draws_each_stage_with_its_validation_and_a_smoothed_curve():
    import matplotlib

    matplotlib.use("Agg")
    base = [_record("base", s, loss=4.0 / s + (0.3 if s % 2 else -0.3) / s) for s in range(1, 501)]
    val = [_record("base", s, val_bpb=2.0 / s) for s in (20, 40, 60)]
    sft = [_record("sft", s, loss=1.0 - s / 100) for s in range(1, 41)] + [_record("sft", 40, val_loss=0.5)]
    rl = [_record("rl", s, reward=0.1 * s, acc=0.05 * s) for s in (1, 2, 3)] + [_record("rl", 3, kl=0.01)]
    # a stage run again from scratch (`--from`): its earlier curve is not drawn
    stale = [_record("mid", 1, loss=9.0), {"stage": "mid", "step": 0, "kind": "clear", "metrics": {}}]
    fig = curves_figure(base + val + sft + rl + stale)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in shown]
    assert titles == [
        "base: train loss", "base: validation bits per byte", "sft: loss (train, dev)", "rl: mean reward",
        "rl: rollout accuracy", "rl: KL to the SFT model",
    ]  # fmt: skip
    assert len(fig.axes) == 8  # two rows of four, the last two hidden
    loss_ax, val_ax, sft_ax = shown[:3]
    assert loss_ax.get_yscale() == "log"
    raw, smooth = loss_ax.get_lines()  # 500 steps: raw and smoothed
    assert list(raw.get_xdata()) == list(range(1, 501))
    assert smooth.get_ydata()[0] == pytest.approx(raw.get_ydata()[0])  # debiased: starts at the first point

    def zigzag(ys):  # the summed second differences past the start: the step-to-step noise, not the trend
        ys = list(ys)[100:]
        return sum(abs(a - 2 * b + c) for a, b, c in zip(ys, ys[1:], ys[2:], strict=False))

    assert zigzag(smooth.get_ydata()) < zigzag(raw.get_ydata()) / 5
    (points,) = val_ax.get_lines()  # three validations: points, not smoothed
    assert list(points.get_xdata()) == [20, 40, 60] and points.get_marker() == "o"
    labels = [line.get_label() for line in sft_ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["train", "dev"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_ema_against_its_definition():
    ys = [1.0, 3.0, 2.0, 5.0]
    beta = 1 - 1 / 3
    avg, want = 0.0, []
    for i, y in enumerate(ys, start=1):
        avg = beta * avg + (1 - beta) * y
        want.append(avg / (1 - beta**i))
    assert _ema(ys, 3) == pytest.approx(want)
    assert _ema(ys, 1) == ys  # a span of one point: no smoothing
    assert curves_figure([]) is None


def test_the_report_marks_what_a_free_form_task_lacks(tmp_path, monkeypatch):
    # GSM8K's summary has no chance level and no format rate: "-", not an empty cell; the paired comparison
    # shows its (asymmetric) interval
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
