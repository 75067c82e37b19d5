"""`nanorl runs show RUN`: a run at a glance, from a run folder built by hand (no training).

The folder holds what a pipeline leaves: run.toml (`write_run_config`), metrics.jsonl, DONE markers, a checkpoint's
state.json, and an eval file made by the eval stage's own `summary` and `nanorl.multichoice.compare`, so its schema
is the real one. report.md renders from the same data (`nanorl.report.run_overview`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import heavy_imports

from nanorl.config import resolve, run_dir, write_run_config
from nanorl.report import run_overview, write_report


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=e, timeout=60)


def _entropy(shift: float) -> dict[str, float]:
    return {
        "attn_entropy/L0": 2.5 + shift,
        "attn_entropy/L1": 3.5 + shift,
        "attn_entropy": 3.0 + shift,
        "attn_entropy_norm": 0.75,
        "attn_entropy_min_head": 0.5,
    }


def _records(golds: str, preds: str, samples: int = 1) -> list[dict]:
    """Eval records of questions q0, q1, ...: `samples` completions each, answering preds[i] to golds[i]."""
    return [
        {"id": f"q{i}", "sample": s, "gold": g, "pred": p, "correct": g == p, "format_ok": True}
        for i, (g, p) in enumerate(zip(golds, preds, strict=True))
        for s in range(samples)
    ]


def make_run(name: str = "fake") -> Path:
    """A run whose tokenizer and base finished, sft stopped at step 3 (checkpoint at 2 of 4), mid and rl never ran;
    and an eval file of the base model: 10 questions, 6 right, with a paired comparison."""
    from nanorl.multichoice import compare
    from nanorl.stages.eval import summary, write_json

    cfg = resolve(preset="tiny", overrides=[f"name={name}", "model.depth=2", "model.n_embd=64", "model.n_head=1"])
    run = write_run_config(cfg)

    def rec(stage, step, metrics, kind=None):
        return {"stage": stage, "step": step, "time": 0.0, **({"kind": kind} if kind else {}), "metrics": metrics}

    lines = [
        rec("tokenizer", 0, {"total_steps": 1}, "start"),
        rec("tokenizer", 1, {"vocab_size": 300}),
        rec("tokenizer", 1, {"vocab_size": 300}, "end"),
        rec("base", 0, {"total_steps": 6}, "start"),
        *(rec("base", s, {"loss": 4.0 - s / 2, "tok_per_s": 1234.5}) for s in range(1, 6)),
        rec("base", 6, {"loss": 1.25, "val_bpb": 0.875, "tok_per_s": 1234.5, **_entropy(0.0)}),
        rec("base", 6, {"loss": 1.25, "val_bpb": 0.875, **_entropy(0.0)}, "end"),
        rec("sft", 0, {"total_steps": 4}, "start"),
        *(rec("sft", s, {"loss": 1.0 / s, **_entropy(0.25)}) for s in range(1, 4)),
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for stage, wall in (("tokenizer", 0.5), ("base", 12.5)):
        (run / stage).mkdir()
        (run / stage / "DONE").write_text(json.dumps({"wall_s": wall}) + "\n")
    (run / "sft").mkdir()
    (run / "sft" / "state.json").write_text(json.dumps({"format": "nanorl-ckpt-1", "files": {}, "step": 2}))

    golds, preds, other = "ABCDEABCDA", "ABCDEAEEEE", "ABCEEEEEEE"
    res = {"task": "arith", "split": "dev", "n": 10, "modes": {}}
    for mode, samples in (("generative", 1), ("sampled", 2)):
        records = _records(golds, preds, samples)
        res["modes"][mode] = {**summary(records, True, mode == "sampled"), "seconds": 0.1, "records": records}
    res["modes"]["sampled"]["temperature"] = 0.7
    res.update(accuracy=res["modes"]["generative"]["accuracy"], mode="generative", stage="base")
    res["checkpoint"] = str(run / "base")
    res["compare"] = {
        "generative": {"a": "base", "b": "sft", **compare(_records(golds, preds), _records(golds, other))}
    }
    write_json(run / "eval" / "arith-dev.json", res)
    return run


def test_show_has_the_model_stages_accuracy_with_its_baselines_and_entropy():
    from nanorl.model.counts import count_params

    make_run()
    r = _cli("runs", "show", "fake")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "task          │ arith (preset tiny)" in out
    assert "depth 2, width 64, 1 heads" in out
    total = count_params(resolve(preset="tiny", overrides=["model.depth=2", "model.n_embd=64", "model.n_head=1"]).model)
    assert f"{total['total']:,}" in out
    rows: dict[str, str] = {}  # the first table row of each name: the stages table's
    for line in out.splitlines():
        if line.count("│") > 3:
            rows.setdefault(line.split("│")[1].strip(), line)
    # each stage's status: done (DONE), partial at its checkpoint's step (no DONE), not started
    assert "done" in rows["base"] and "loss 1.25, val_bpb 0.875" in rows["base"] and "│     12 │" in rows["base"]
    assert "partial at step 2 of 4" in rows["sft"] and "│     3 │" in rows["sft"]
    assert "not started" in rows["mid"] and "not started" in rows["rl"]
    # the accuracy never without its baselines: 6 of 10, its Wilson interval, chance 1/5, the commonest letter 3/10
    (ev,) = [line for line in out.splitlines() if "│ generative │ 10 │" in line]
    assert [c.strip() for c in ev.split("│")[4:10]] == ["10", "0.600", "0.313-0.832", "0.200", "0.300", "yes"]
    assert "pass@k" in out and "McNemar" in out
    # attention entropy, a row per stage that measured it, layer by layer
    (base,) = [line for line in out.splitlines() if line.startswith("│ base ") and "2.50 3.50" in line]
    assert "3.000" in base and "0.750" in base
    assert any(line.startswith("│ sft ") and "2.75 3.75" in line for line in out.splitlines())


def test_show_at_80_columns_cuts_no_cell():
    """In an 80-column terminal rich cut the cells that did not fit to "…": the accuracy's interval read "0.31…",
    the file "arit…". Now the numbers stay whole on their line and the names wrap."""
    run = make_run()
    # `nanorl eval --compare` records the checkpoints' paths: shown as RUN/STAGE
    path = run / "eval" / "arith-dev.json"
    res = json.loads(path.read_text())
    res["compare"]["generative"].update(a=str(run / "base"), b="/elsewhere/home/runs/other/sft")
    path.write_text(json.dumps(res))
    r = _cli("runs", "show", "fake", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) <= 80
    (ev,) = [line for line in r.stdout.splitlines() if "0.313-0.832" in line]
    assert "0.600" in ev and "0.200" in ev and "0.300" in ev
    wide = _cli("runs", "show", "fake", env={"COLUMNS": "200"}).stdout
    assert "fake/base" in wide and "other/sft" in wide and "elsewhere" not in wide


def test_show_json_round_trips_the_overview_that_the_report_renders():
    run = make_run()
    r = _cli("runs", "show", str(run), "--json")  # a run folder's path works as well as its name
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # pure JSON on stdout
    assert data == json.loads(json.dumps(run_overview(run), default=str))
    assert data["config"]["model"]["depth"] == 2 and data["config"]["task"] == "arith"
    stages = {e["stage"]: e for e in data["stages"]}
    assert stages["sft"]["status"] == "partial" and (stages["sft"]["step"], stages["sft"]["total_steps"]) == (2, 4)
    assert stages["base"]["status"] == "done" and stages["base"]["wall_s"] == 12.5
    (ev,) = data["evals"]
    gen = ev["modes"]["generative"]
    assert (gen["accuracy"], gen["chance_baseline"], gen["majority_baseline"]) == (0.6, 0.2, 0.3)
    assert "records" not in gen and ev["modes"]["sampled"]["pass_at_k"] == 0.6
    assert ev["compare"]["generative"]["test"].startswith("McNemar")
    assert data["attention_entropy"]["layers"] == [0, 1] and list(data["attention_entropy"]["stages"]) == [
        "base",
        "sft",
    ]


def test_the_report_renders_the_same_data():
    run = make_run()
    report = write_report(run).read_text()
    assert "| stage | steps | wall s | loss | val_bpb | tok_per_s |" in report
    assert "| base | 6 | 12.5 | 1.25 | 0.875 | 1,234 |" in report
    assert "| sft | 3 |  | 0.3333 |  |  |" in report
    assert "| layer | base | sft |" in report and "| L1 | 3.5 | 3.75 |" in report
    assert "| arith-dev.json | base | generative | 10 | 0.6 | 0.3127–0.8318 | 0.2 | 0.3 | 1 |" in report
    assert "- arith-dev.json: 2 completions per question at temperature 0.7: pass@1 0.6, pass@2 0.6" in report
    c = run_overview(run)["evals"][0]["compare"]["generative"]
    lo, hi = c["diff_ci95"]  # the same interval `nanorl runs show` prints
    assert f"base 0.600 vs sft 0.400 (diff +0.200, 95% CI {lo:+.3f} to {hi:+.3f}, McNemar p = " in report


def test_a_run_with_nothing_logged_yet_shows_what_it_can():
    cfg = resolve(preset="tiny", overrides=["name=fresh"])
    write_run_config(cfg)
    r = _cli("runs", "show", "fresh")
    assert r.returncode == 0, r.stderr
    assert "arith (preset tiny)" in r.stdout and "no metrics logged yet" in r.stdout
    assert r.stdout.count("not started") == 7 and "no eval files yet" in r.stdout
    # no run.toml either: the folder of metrics alone still shows
    (run_dir("fresh") / "run.toml").unlink()
    (run_dir("fresh") / "eval").mkdir()
    (run_dir("fresh") / "eval" / "arith-dev.json").write_text('{"half": ')  # torn mid-write
    r = _cli("runs", "show", "fresh")
    assert r.returncode == 0, r.stderr
    assert "no run.toml in" in r.stdout and "arith-dev.json: not an eval result" in r.stdout


def test_an_unknown_run_exits_2_saying_where_it_looked_and_what_to_do(tmp_path):
    r = _cli("runs", "show", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: no run 'nope': looked for a run folder at {Path.cwd() / 'nope'} and {run_dir('nope')}" in r.stderr
    assert "hint: `nanorl runs list` lists the runs in" in r.stderr
    r = _cli("runs", "show", str(tmp_path))  # a folder, but no run in it
    assert r.returncode == 2 and "no run.toml, metrics.jsonl or stage folder" in r.stderr


@pytest.mark.parametrize("json_out", [False, True])
def test_runs_show_imports_no_heavy_library(json_out):
    run = make_run()
    assert heavy_imports(["runs", "show", str(run), *(["--json"] if json_out else [])]) == []
