"""The stage runner on a very small model: exact resume, skip-if-done, telemetry, eval files, report."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from testkit import SMALL

from nanorl.config import resolve, run_dir
from nanorl.stages.common import Interrupted
from nanorl.stages.runner import run_pipeline
from nanorl.telemetry import read_metrics


def _cfg(name: str, *extra: str):
    return resolve(preset="tiny", overrides=[*SMALL, f"name={name}", *extra])


def _losses(name: str, stage: str) -> dict[int, float]:
    out = {}
    for rec in read_metrics(run_dir(name)):
        if rec["stage"] == stage and rec.get("kind") is None:
            out[rec["step"]] = rec["metrics"]["loss"]  # a step run twice (resume): the later record wins
    return out


def _weights(name: str, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir(name) / stage / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted_then_rerun_skips():
    # base accumulates 2 passes of 2 rows a step (as a GPU run does): resume must land between whole steps
    accum = "base.total_batch_tokens=512"
    full = run_pipeline(_cfg("full", accum))
    assert all(full[s] != "skipped" for s in full)
    assert full["base"]["tokens_per_step"] == 512

    # crash after base step 3 (checkpoint at 2), sft step 2 and rl step 2: each resume restarts from a checkpoint
    for stop in ({"base": 3}, {"sft": 2}, {"rl": 2}):
        with pytest.raises(Interrupted):
            run_pipeline(_cfg("crashy", accum), stop_after=stop)
    resumed = run_pipeline(_cfg("crashy", accum))
    assert resumed["tokenizer"] == "skipped" and resumed["base"] == "skipped"

    for stage in ("base", "mid", "sft", "rl"):
        assert _losses("crashy", stage) == _losses("full", stage), stage
        a, b = _weights("full", stage), _weights("crashy", stage)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)

    # a re-run skips every finished stage (report is rebuilt, it is cheap)
    again = run_pipeline(_cfg("full", accum))
    assert [s for s, r in again.items() if r != "skipped"] == ["report"]

    # eval wrote the final model's file with both modes and the paired comparison with SFT, and the report
    res = json.loads((run_dir("full") / "eval" / "arith-dev.json").read_text())
    # (the tiny preset's eval.samples adds the sampled mode: 4 completions of each of the 4 questions)
    assert res["stage"] == "rl" and set(res["modes"]) == {"generative", "categorical", "sampled"}
    assert res["modes"]["generative"]["n"] == 4 and set(res["compare"]) == set(res["modes"])
    assert (res["modes"]["sampled"]["n"], len(res["modes"]["sampled"]["records"])) == (4, 16)
    assert (run_dir("full") / "eval" / "arith-dev-sft.json").is_file()
    report = (run_dir("full") / "report.md").read_text()
    assert "## Evaluation" in report
    # every accuracy beside its baselines: chance (1 of 5 letters) and always answering the commonest letter
    assert "| accuracy | 95% CI | chance | majority |" in report and "| 0.2 |" in report

    # RL logged its metrics, and the telemetry records are well-formed
    rl = [r for r in read_metrics(run_dir("full")) if r["stage"] == "rl" and r.get("kind") is None]
    for key in ("reward", "acc", "completion_len", "zero_var_frac", "kl", "clip_frac", "grad_norm"):
        assert key in rl[-1]["metrics"], key

    # attention entropy was measured at every training stage's last step and is in the report
    records = read_metrics(run_dir("full"))
    for stage in ("base", "mid", "sft", "rl"):
        last = [r for r in records if r["stage"] == stage and r.get("kind") is None][-1]["metrics"]
        assert last["attn_entropy/L0"] == last["attn_entropy"] > 0, stage  # one layer: its mean is the mean
        assert 0 < last["attn_entropy_min_head"] <= last["attn_entropy_norm"] <= 1, stage
    assert "## Attention entropy" in report and "| layer | base | mid | sft | rl |" in report

    # --from rl redoes rl and every later stage, and nothing before
    part = run_pipeline(_cfg("full"), from_stage="rl")
    assert list(part) == ["rl", "eval", "report"]


@pytest.mark.slow
def test_from_a_stage_makes_every_later_stage_stale_at_once():
    """--from sft interrupted during sft: the resume without --from must redo rl and eval, not skip them on
    their old DONE markers (they were computed from the SFT model being replaced). Meanwhile `runs show` and the
    report show none of their old figures: rl, eval and the report not started, no evaluation of the old SFT or
    RL model (a `nanorl eval` of the base model, whose model stays, is kept)."""
    import json

    from nanorl import checkpoint as ckpt
    from nanorl.report import run_overview

    run_pipeline(_cfg("redo"))
    run = run_dir("redo")
    (run / "eval" / "arith-dev-base.json").write_text(json.dumps({"stage": "base", "modes": {}}))
    assert {e["file"] for e in run_overview(run)["evals"]} >= {"arith-dev.json", "arith-dev-sft.json"}
    with pytest.raises(Interrupted):
        run_pipeline(_cfg("redo"), from_stage="sft", stop_after={"sft": 2})
    for stage in ("rl", "eval"):
        assert not ckpt.is_done(run / stage), stage
    view = run_overview(run)
    status = {s["stage"]: (s["status"], s["metrics"]) for s in view["stages"]}
    assert status["rl"] == status["eval"] == status["report"] == ("not started", {}), status
    assert status["sft"][0] == "partial" and status["mid"][0] == "done"
    assert [e["file"] for e in view["evals"]] == ["arith-dev-base.json"]
    assert not (run / "report.md").exists()
    resumed = run_pipeline(_cfg("redo"))
    assert [s for s, r in resumed.items() if r == "skipped"] == ["tokenizer", "base", "mid"]

    # RL alone again (`nanorl train rl`, as --only rl): its model's evaluation goes, SFT's stays, and the eval
    # stage is not done any more, so that the next pipeline evaluates the new RL model instead of skipping it
    run_pipeline(_cfg("redo"), only="rl")
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["arith-dev-base.json", "arith-dev-sft.json"]
    assert not ckpt.is_done(run / "eval")
    again = run_pipeline(_cfg("redo"))
    assert [s for s, r in again.items() if r != "skipped"] == ["eval", "report"]
    assert (run / "eval" / "arith-dev.json").is_file()


def test_a_different_model_in_an_existing_run_is_refused():
    from nanorl.api import NanorlError
    from nanorl.config import write_run_config

    write_run_config(_cfg("clash"))
    with pytest.raises(NanorlError, match="another model"):
        run_pipeline(_cfg("clash", "model.n_embd=64", "model.n_head=1"))


def test_bad_stage_names_are_clear_errors():
    from nanorl.api import NanorlError

    with pytest.raises(NanorlError, match="not a stage"):
        run_pipeline(_cfg("x"), from_stage="pretrain")
    with pytest.raises(NanorlError, match="only base, mid, sft and rl"):
        run_pipeline(_cfg("x"), steps={"eval": 3})


def test_a_raising_telemetry_hook_is_reported_once_and_disabled(tmp_path):
    from rich.console import Console

    from nanorl.api import TelemetryHook
    from nanorl.telemetry import Telemetry

    class Bad(TelemetryHook):
        name = "bad"
        calls = 0

        def on_step(self, stage, step, metrics):
            Bad.calls += 1
            raise RuntimeError("boom")

    class Extra(TelemetryHook):
        name = "extra"

        def on_step(self, stage, step, metrics):
            return {"extra": 1.0, "one": torch.tensor([3.0])}

    # what a hook returns must be a dict of numbers: anything else used to fail the metrics file's write (or the
    # merge), which stopped the run (rank 0 alone under torchrun, the others left waiting for it)
    class Histogram(TelemetryHook):
        name = "histogram"

        def on_step(self, stage, step, metrics):
            return {"hist": torch.ones(3)}

    class NotADict(TelemetryHook):
        name = "not-a-dict"

        def on_step(self, stage, step, metrics):
            return 0.5

    with open(tmp_path / "out.txt", "w") as fh:
        console = Console(file=fh, width=300)
        with Telemetry(tmp_path, hooks=[Bad(), Histogram(), NotADict(), Extra()], console=console) as bus:
            for step in range(3):
                bus.log("base", step, {"loss": float("nan"), "x": torch.tensor(2.0)})
    assert Bad.calls == 1
    out = (tmp_path / "out.txt").read_text()
    assert out.count("boom") == 1
    assert out.count("telemetry hook 'histogram' failed in on_step: TypeError: returned metric 'hist' as a Tensor") == 1
    assert out.count("telemetry hook 'not-a-dict' failed in on_step: TypeError: returned a float, not a dict") == 1
    recs = read_metrics(tmp_path)
    assert len(recs) == 3 and recs[0]["metrics"] == {"loss": None, "x": 2.0, "extra": 1.0, "one": 3.0}


@pytest.mark.slow
def test_rl_steps_without_signal_leave_the_weights_alone(monkeypatch):
    # step 1's groups have rewards that differ, steps 2-3 all-equal rewards (dropped): with nothing to learn from,
    # a step must not move the weights (a zero gradient still would, through the optimizers' momentum: the
    # update used to run on every prompt and step), and the update must run with no prompt at all
    from nanorl.stages import rl

    calls = []

    def reward(example, completion, answer):
        calls.append(1)
        return float(len(calls) % 2) if len(calls) <= 4 else 1.0  # 2 prompts x 2 completions: step 1 only

    monkeypatch.setattr(rl, "resolve_rewards", lambda cfg, task: [(reward, 1.0)])
    # the untrained model's completions run to max_new_tokens: train on them rather than mask them
    flags = ("rl.drop_zero_variance=true", "rl.mask_truncated=false", "eval.max_examples=1")
    run_pipeline(_cfg("signal", "rl.steps=1", *flags))
    one, sft = _weights("signal", "rl"), _weights("signal", "sft")
    assert any(not torch.equal(one[k], sft[k]) for k in one)  # step 1 learned
    calls.clear()
    run_pipeline(_cfg("signal", "rl.steps=3", *flags), only="rl")
    three = _weights("signal", "rl")
    for k in one:
        assert torch.equal(one[k], three[k]), k
    rl_logs = [r["metrics"] for r in read_metrics(run_dir("signal")) if r["stage"] == "rl" and r.get("kind") is None]
    assert [m["zero_var_frac"] for m in rl_logs[-3:]] == [0.0, 1.0, 1.0]
    assert rl_logs[-1]["grad_norm"] == 0.0


@pytest.mark.slow
def test_dynamic_sampling_fills_the_batch_with_signal_and_resumes_exactly(monkeypatch):
    """rl.dynamic_sampling: a step samples prompt batches until prompts_per_step groups have rewards that differ,
    at most rl.max_sample_batches, and learns from those groups only; the prompt stream's position is saved, so
    an interrupted run resumes on the same prompts."""
    from nanorl.plugins import get_plugins
    from nanorl.stages import rl

    P, seed = 2, 42
    train = get_plugins().task("arith").load("train")
    batch = [[ex.id for ex in rl.prompts_for_step(train, b, P, seed, 0, 1)] for b in range(8)]
    # step 1: batch 0 has no signal, batches 1 and 2 one group each -> 3 batches; step 2: batch 3 both -> 1;
    # step 3: batches 4-7 none -> stops at max_sample_batches=4 with nothing to learn
    signal = {batch[1][0], batch[2][1], *batch[3]}
    assert not signal & {i for b in (0, 4, 5, 6, 7) for i in batch[b]}  # the fixed shuffle allows this design
    seen, calls = [], []

    def reward(example, completion, answer):
        calls.append(1)
        seen.append(example.id)
        # G = 2: the two rows of a signal group get 1 and 0
        return float(len(calls) % 2) if example.id in signal else 1.0

    monkeypatch.setattr(rl, "resolve_rewards", lambda cfg, task: [(reward, 1.0)])
    flags = (
        "rl.dynamic_sampling=true", "rl.max_sample_batches=4", "rl.mask_truncated=false", "rl.kl_every=0",
        f"seed={seed}", "eval.max_examples=1",
    )  # fmt: skip
    run_pipeline(_cfg("dyn", *flags))
    logs = [r["metrics"] for r in read_metrics(run_dir("dyn")) if r["stage"] == "rl" and r.get("kind") is None]
    assert [m["sample_batches"] for m in logs] == [3, 1, 4]
    assert [m["signal_groups"] for m in logs] == [2, 2, 0]
    assert [m["zero_var_frac"] for m in logs] == pytest.approx([4 / 6, 0.0, 1.0])
    assert seen[::2] == [i for b in batch for i in b]  # every batch's prompts, in the stream's order
    assert logs[-1]["grad_norm"] == 0.0 and logs[0]["grad_norm"] > 0

    # interrupted after step 1 (a checkpoint at every step) and resumed: the same prompts, losses and weights
    with pytest.raises(Interrupted):
        run_pipeline(_cfg("dyn-crash", *flags), stop_after={"rl": 1})
    seen.clear()
    run_pipeline(_cfg("dyn-crash", *flags))
    assert seen[::2][: 5 * P] == [i for b in batch[3:] for i in b]
    assert _losses("dyn-crash", "rl") == _losses("dyn", "rl")
    a, b = _weights("dyn", "rl"), _weights("dyn-crash", "rl")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gradient_accumulation_trains_like_one_pass_of_the_whole_batch():
    """A 512-token step as 2 passes of 2 rows takes the step that 1 pass of 4 rows takes: the same rows, the
    loss of each pass scaled by 1/passes (the sums differ in rounding only)."""
    runs = {}
    for name, rows in (("accum-4x1", 4), ("accum-2x2", 2)):
        cfg = _cfg(name, f"base.device_batch_size={rows}", "base.total_batch_tokens=512", "base.steps=3")
        run_pipeline(cfg, only="tokenizer")
        runs[name] = run_pipeline(cfg, only="base")["base"]
        assert runs[name]["tokens_per_step"] == 512  # 4 rows of 128 tokens, all of them targets
    one, two = _losses("accum-4x1", "base"), _losses("accum-2x2", "base")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5)
    # the weights agree to rounding: ~5e-7 in the matrices; up to ~6e-5 in an embedding row whose gradient is
    # ~0, where AdamW's update (g / sqrt(v)) turns a rounding difference into a sign (seen in CI)
    a, b = _weights("accum-4x1", "base"), _weights("accum-2x2", "base")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)


def test_split_rows_prefers_equal_passes():
    from nanorl.stages.common import split_rows

    assert split_rows(8, 32) == (8, 1)
    assert split_rows(256, 193) == (128, 2)
    assert split_rows(256, 28) == (16, 16)  # not 10 passes of 26 (260 rows)
    assert split_rows(86, 64) == (43, 2)
    assert split_rows(97, 64) == (49, 2)  # a prime: rounded up to 98 rows


def _batch_ctx(world_size: int, device: str, *extra: str):
    from types import SimpleNamespace

    from rich.console import Console

    cfg = resolve(overrides=[*extra])
    bus = SimpleNamespace(console=Console(quiet=True))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return SimpleNamespace(cfg=cfg, device=torch.device(device), dtype=dtype, rank=0, world_size=world_size, bus=bus)


def test_a_token_target_gives_the_same_step_on_one_rank_or_eight(monkeypatch):
    """The default recipe's 2^19 tokens a step, on 1 and on 8 GPUs of 80 GiB: the rows a pass come from the
    memory estimate, the passes make up the rest."""
    from types import SimpleNamespace

    from nanorl.api import NanorlError
    from nanorl.stages.common import micro_batch

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * gib))
    for depth, layouts in ((8, {1: (128, 2), 8: (32, 1)}), (20, {1: (16, 16), 8: (16, 2)})):
        for world, layout in layouts.items():
            ctx = _batch_ctx(world, "cuda", f"model.depth={depth}")
            B, accum = micro_batch(ctx, "base")
            assert (B, accum) == layout, (depth, world)
            assert B * accum * world * 2048 == 2**19
    # no target: one pass, at most 32 rows; the CPU takes 8
    assert micro_batch(_batch_ctx(1, "cuda", "model.depth=8", "base.total_batch_tokens=0"), "base") == (32, 1)
    assert micro_batch(_batch_ctx(1, "cpu", "model.depth=8", "base.total_batch_tokens=0"), "base") == (8, 1)
    # a model whose training step cannot fit gets a clear error, not an out-of-memory crash
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=8 * gib))
    with pytest.raises(NanorlError, match="does not fit") as err:
        micro_batch(_batch_ctx(1, "cuda", "model.depth=26"), "base")
    assert "seq_len" in err.value.hint


def test_base_says_how_many_passes_over_its_corpus_a_run_makes(tmp_path):
    """A budget larger than the text: the base stage estimates the passes before training (the corpus's bytes
    from its files, the tokenizer's bytes per token on its first documents), warns, and says when the data runs
    out."""
    import io
    import random

    from rich.console import Console

    from nanorl.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "theta", "kappa", "lambda", "zeta"]
    corpus = tmp_path / "corpus.jsonl"
    docs = [" ".join(rng.choice(words) for _ in range(150)) for _ in range(4)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = _cfg("passes", f"data.corpus={corpus}", "tokenizer.train_chars=100000", "base.steps=8")
    out = io.StringIO()
    console = Console(file=out, width=300)
    run_pipeline(cfg, only="tokenizer", console=console)
    run_pipeline(cfg, only="base", console=console)
    text = out.getvalue()

    tok = Tokenizer.load(run_dir("passes") / "tokenizer")
    truth = 8 * 2 * 128 / sum(len(ids) + 1 for ids in tok.encode_batch(docs))  # run tokens / corpus tokens
    passes = float(text.split("bytes a token): ~")[1].split(" passes")[0])
    assert passes == pytest.approx(truth, rel=0.05)  # JSON's quoting is the only error, ~1% here
    assert passes > 1.5 and "the run will see the same text" in text
    assert "the data ran out; pass 2 over it began at step" in text


def test_console_progress_line_names_its_metrics_in_order():
    # what a user reads during a stage: the RL line also says how many groups the step learned from
    from nanorl.builtin.sinks import _fmt

    metrics = {
        "tok_per_s": 7000.4,
        "signal_groups": 5.0,
        "zero_var_frac": 0.7,
        "acc": 0.95,
        "reward": 1.05,
        "loss": 0.25,
    }
    assert _fmt(metrics) == "loss 0.2500  reward 1.050  acc 0.950  groups 5  tok/s 7,000"
    assert _fmt({"loss": 1.0, "val_bpb": 0.5}) == "loss 1.0000  val_bpb 0.5000"


def test_console_lines_in_a_log_say_the_time_left_from_the_steps_this_process_ran(monkeypatch, capsys):
    # stderr is not a terminal under pytest: the sink prints plain lines, as in CI or a log file
    from nanorl.api import StageInfo
    from nanorl.builtin import sinks

    clock = [1000.0]
    monkeypatch.setattr(sinks.time, "time", lambda: clock[0])
    sink = sinks.ConsoleSink()
    info = StageInfo(run_name="r", run_dir="/tmp/r", stage="sft", task="arith", config={}, total_steps=100)
    sink.on_stage_start(info)
    # a stage resumed at step 41 whose first step took 5 s (a warm-up), then one second a step: the time left
    # counts neither the steps done before the resume nor the warm-up
    clock[0] += 5.0
    for step in range(41, 61):
        sink.on_step("sft", step, {"loss": 0.5})
        clock[0] += 1.0
    rl_like = {"loss": 0.25, "val_bpb": 0.1462, "reward": 1.064, "acc": 0.965, "signal_groups": 7, "tok_per_s": 9208.0}
    sink.on_step("sft", 100, rl_like)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "sft: 100 steps"
    assert lines[1] == "sft 41/100  loss 0.5000  (5s)"  # the first step: no rate yet
    assert lines[2] == "sft 51/100  loss 0.5000  (15s, ETA 49s)"  # 10 s after it: 1 s a step, 49 to go
    # the last step: no time left to announce; longer than the 80 columns a log gets, and still one line
    assert lines[3] == "sft 100/100  loss 0.2500  val_bpb 0.1462  reward 1.064  acc 0.965  groups 7  tok/s 9,208  (25s)"
    assert len(lines) == 4
    assert sinks._duration(185) == "3m05s" and sinks._duration(3725) == "1h02m"


def test_a_free_form_accuracy_comes_with_its_majority_baseline():
    # GSM8K-like numbers: no chance level, so the floor is always answering the commonest gold answer
    from nanorl.stages.eval import summary

    golds = ["5", "5", "5", "7", "9", "11", "5", "13", "5", "2"]  # "5": 5 of 10
    preds = ["5", "5", "5", "7", "9", None, "4", "13", "5", "3"]  # 7 right, 1 unanswered
    records = [
        {"gold": g, "pred": p, "correct": g == p, "format_ok": p is not None} for g, p in zip(golds, preds, strict=True)
    ]
    out = summary(records, multiple_choice=False)
    assert (out["n"], out["correct"], out["accuracy"]) == (10, 7, 0.7)
    assert (out["majority_answer"], out["majority_baseline"], out["answered_rate"]) == ("5", 0.5, 0.9)
    assert not out["beats_majority"]  # 70% of 10 is not clear of 50%: the interval's lower end is 39.7%
    many = summary(records * 10, multiple_choice=False)
    assert many["beats_majority"] and many["accuracy_ci95"][0] > 0.6


def _cli(*args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_a_run_mirrored_to_a_store_outlives_its_folder(moto_server, tmp_path):
    """checkpoint.store=s3://... mirrors the whole run as it goes: with the local folder gone (the rented machine
    terminated), `runs pull` brings back every file, and `eval --checkpoint s3://...` scores the same model."""
    import shutil

    import boto3

    from nanorl.store import open_store
    from nanorl.store.runs import run_files

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="runs")
    run_pipeline(_cfg("away", "checkpoint.store=s3://runs/team", "eval.samples=0", "rl.kl_every=0"))
    local = run_dir("away")
    store = open_store("s3://runs/team")
    # the store holds exactly the run folder: tokenizer, checkpoints (no stale optimizer state), DONE markers,
    # metrics, eval files, the report
    assert store.list("away/") == sorted(f"away/{f}" for f in run_files(local))
    assert {"away/tokenizer/tokenizer.json", "away/report.md", "away/eval/arith-dev.json"} <= set(store.list(""))
    before = {f: (local / f).read_bytes() for f in run_files(local)}
    want = json.loads((local / "eval" / "arith-dev.json").read_text())["modes"]["generative"]["accuracy"]
    shutil.rmtree(local)

    r = _cli("eval", "--checkpoint", "s3://runs/team/away", "--mode", "generative", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["stage"] == "rl" and res["modes"]["generative"]["accuracy"] == want

    r = _cli("runs", "pull", "s3://runs/team/away")
    assert r.returncode == 0, r.stderr
    assert {f: (local / f).read_bytes() for f in run_files(local)} == before
    r = _cli("runs", "pull", "s3://runs/team/away")  # a second pull would overwrite the run: refused
    assert r.returncode == 2 and "--force" in r.stderr
    r = _cli("runs", "pull", "s3://runs/team/nope")
    assert r.returncode == 1 and "runs there: away" in r.stderr and "Traceback" not in r.stderr
    r = _cli("runs", "list", "--json")
    (row,) = json.loads(r.stdout)
    assert row["name"] == "away" and row["done"][-1] == "eval" and row["evals"]["arith-dev"]["stage"] == "rl"

    # pushing a run elsewhere (a folder store) sends every file under the run's name
    r = _cli("runs", "push", "away", str(tmp_path / "backup"), "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["files"]) == sorted(before)
    assert (tmp_path / "backup" / "away" / "rl" / "model.safetensors").read_bytes() == before["rl/model.safetensors"]


def test_fewer_conversations_than_ranks_is_refused_by_every_rank_alike():
    # a rank with no conversation would fail alone at its first batch (an IndexError) while the others wait for it
    # in a collective; the count is the same on every rank, so every rank refuses at once
    from nanorl.api import NanorlError
    from nanorl.stages.common import ConversationLoader

    convs = [([1, 2, 3, 4], [0, 0, 1, 1])]
    for rank in (0, 1):
        with pytest.raises(NanorlError, match="1 conversations cannot be shared by 2 ranks"):
            ConversationLoader(convs, 2, 8, 0, packed=False, assistant_only=True, rank=rank, world_size=2)
    x, y = next(ConversationLoader(convs * 2, 2, 8, 0, packed=False, assistant_only=True, rank=1, world_size=2))
    assert x.tolist() == [[1, 2, 3]] * 2 and y.tolist() == [[-1, 3, 4]] * 2


def test_a_loader_error_on_one_rank_stops_every_rank_before_training(monkeypatch):
    # prepare_loader: each rank builds its first data (PackedLoader.prepare) and the ranks agree on any error
    from nanorl import device as devmod
    from nanorl.api import NanorlError
    from nanorl.stages.common import prepare_loader

    class Loader:
        def __init__(self, error=None):
            self.error = error

        def prepare(self):
            if self.error:
                raise NanorlError(self.error, hint="use a longer corpus")

    prepare_loader(Loader())
    prepare_loader(object())  # a loader without prepare
    with pytest.raises(NanorlError, match="too small"):
        prepare_loader(Loader("the corpus is too small"))
    # two ranks (simulated): this rank's shard is fine, rank 1's is not; this rank raises too
    monkeypatch.setattr(devmod, "is_distributed", lambda: True)
    monkeypatch.setattr(devmod, "all_gather_objects", lambda o: [o, ("NanorlError", "the corpus is too small", "h")])
    with pytest.raises(NanorlError, match="rank 1: the corpus is too small"):
        prepare_loader(Loader())


def test_float16_is_refused_for_training(monkeypatch):
    # float16 without loss scaling lets small gradients underflow silently: refused, with bfloat16 as the hint
    from types import SimpleNamespace

    from nanorl.api import NanorlError
    from nanorl.stages import rl

    cfg = _cfg("f16", "dtype=float16", "base.steps=1")
    run_pipeline(cfg, only="tokenizer")
    with pytest.raises(NanorlError, match="float16") as err:
        run_pipeline(cfg, only="base")
    assert "bfloat16" in err.value.hint
    with pytest.raises(NanorlError, match="rl: training in float16"):
        rl.run(SimpleNamespace(cfg=cfg, task=None, dtype=torch.float16))


def test_the_token_count_is_read_once_a_step_not_once_a_pass(monkeypatch):
    # int(tensor) waits for the GPU: the supervised loop adds each pass's target count on the device and reads the
    # step's total once, where it read every pass's (a sync per micro-step)
    cfg = _cfg("syncs", "base.device_batch_size=1", "base.total_batch_tokens=1024", "base.steps=2")
    run_pipeline(cfg, only="tokenizer")
    reads = []
    orig = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(1) or orig(t))
    res = run_pipeline(cfg, only="base")["base"]
    monkeypatch.undo()
    assert res["tokens_per_step"] == 1024  # 8 passes of one row of 128 tokens a step
    assert len(reads) <= 2, len(reads)  # one a step


def test_a_retrained_tokenizer_clears_the_models_trained_with_the_old_one():
    run_pipeline(_cfg("retok", "eval.samples=0", "rl.kl_every=0"))
    assert all((run_dir("retok") / s / "DONE").is_file() for s in ("base", "mid", "sft", "rl", "eval"))
    # another tokenizer (numbers split differently): every model of the run was trained with the old ids
    run_pipeline(_cfg("retok", "tokenizer.max_digits=3"), only="tokenizer")
    for stage in ("base", "mid", "sft", "rl"):
        assert not (run_dir("retok") / stage).exists(), stage
    assert not (run_dir("retok") / "eval" / "DONE").exists()
    # the same tokenizer again: nothing is stale, nothing is cleared
    again = run_pipeline(_cfg("retok", "tokenizer.max_digits=3", "eval.samples=0", "rl.kl_every=0"), from_stage="base")
    assert again["base"] != "skipped"
    run_pipeline(_cfg("retok", "tokenizer.max_digits=3"), only="tokenizer")
    assert (run_dir("retok") / "sft" / "DONE").is_file()


def _entropy_ctx():
    from types import SimpleNamespace

    cfg = SimpleNamespace(telemetry=SimpleNamespace(attn_entropy_every=5))
    return SimpleNamespace(device=torch.device("cpu"), dtype=torch.float64, cfg=cfg, rank=0)


def test_attention_entropy_telemetry_averages_the_counted_positions():
    from testkit import tiny_model

    from nanorl.stages.common import attention_entropy, entropy_due

    model = tiny_model()
    torch.manual_seed(1)
    idx = torch.randint(0, 300, (3, 12))
    counted = torch.rand(3, 12) < 0.6
    counted[0, 5] = True
    got = attention_entropy(_entropy_ctx(), model, idx, counted)
    assert model.training  # left as it was

    # the reference: per (layer, row, head, position), in float64, averaged by loops
    _, ent = model(idx, return_entropy=True)
    L, B, H, T = ent.shape
    cells = [(b, t) for b in range(B) for t in range(T) if counted[b, t]]
    for i in range(L):
        want = sum(float(ent[i, b, h, t]) for b, t in cells for h in range(H)) / (len(cells) * H)
        assert got[f"attn_entropy/L{i}"] == pytest.approx(want, rel=1e-9)
    later = [(b, t) for b, t in cells if t >= 1]
    norm = {(i, h): sum(float(ent[i, b, h, t]) / math.log(t + 1) for b, t in later) / len(later)
            for i in range(L) for h in range(H)}  # fmt: skip
    assert got["attn_entropy_norm"] == pytest.approx(sum(norm.values()) / len(norm), rel=1e-9)
    assert got["attn_entropy_min_head"] == pytest.approx(min(norm.values()), rel=1e-9)
    assert got["attn_entropy"] == pytest.approx(sum(got[f"attn_entropy/L{i}"] for i in range(L)) / L)

    # with every query zero, every score is 0: attention is uniform over the visible keys, entropy log(t + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_q.weight.zero_()
    uniform = attention_entropy(_entropy_ctx(), model, idx, counted)
    # (to float32's precision: the model returns entropy in float32)
    assert uniform["attn_entropy_norm"] == pytest.approx(1.0, abs=1e-6)
    assert uniform["attn_entropy_min_head"] == pytest.approx(1.0, abs=1e-6)
    mean_log = sum(math.log(t + 1) for _, t in cells) / len(cells)
    assert uniform["attn_entropy/L1"] == pytest.approx(mean_log, rel=1e-6)

    # nothing counted: nothing logged; measured every 5 steps and at the last, on rank 0 only
    assert attention_entropy(_entropy_ctx(), model, idx, torch.zeros_like(counted)) == {}
    ctx = _entropy_ctx()
    assert [d for d in range(1, 13) if entropy_due(ctx, d, 12)] == [5, 10, 12]
    ctx.rank = 1
    assert not any(entropy_due(ctx, d, 12) for d in range(1, 13))


def test_accumulated_passes_normalise_the_loss_over_the_whole_step():
    """SFT's passes count different numbers of targets (short and long answers): the step's loss is the mean over
    every counted target of the step, as if its rows went through in one pass, whatever the split into passes.
    (Averaging each pass's own mean would weight a token of the short pass 20/3 times as much.) The reference:
    float64 log-softmax of the logits over all rows at once, by autograd."""
    from types import SimpleNamespace

    from testkit import tiny_model

    from nanorl.stages.common import supervised_step

    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 300, (4, 12), generator=g)
    y = torch.randint(0, 300, (4, 12), generator=g)
    y[:2, :] = -1  # the first pass (rows 0-1): 3 counted targets, an SFT answer of a few tokens
    y[0, 9:] = torch.tensor([5, 6, 7])
    y[3, :2] = -1  # the second pass (rows 2-3): 22
    ctx = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float64)

    logp = torch.log_softmax(model(x).double(), -1)  # float32 logits, as the model's loss computes them
    kept = y >= 0
    ref_loss = -logp[kept].gather(1, y[kept][:, None]).mean()
    ref_loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    for passes in ([(x, y)], [(x[:2], y[:2]), (x[2:], y[2:])], [(x[i : i + 1], y[i : i + 1]) for i in range(4)]):
        model.zero_grad()
        loss, counted = supervised_step(ctx, model, passes)
        assert int(counted) == 25
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        for a, p in zip(ref, model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-8)


def test_sft_says_how_many_examples_its_seq_len_cuts():
    """A target longer than model.seq_len loses its end, the answer line: the stage says how many, and the rows
    it trains on are cut to seq_len + 1 as before."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from nanorl.api import Example
    from nanorl.stages.common import render_examples
    from nanorl.tokenizer import train_tokenizer

    tok = train_tokenizer(["question answer words " * 20], vocab_size=300)
    task = SimpleNamespace(
        prompt=lambda ex: [{"role": "user", "content": ex.question}],
        target=lambda ex: "words " * int(ex.answer) + "\nFinal Answer: A",
    )
    out = io.StringIO()
    bus = SimpleNamespace(console=Console(file=out, width=300))
    ctx = SimpleNamespace(tokenizer=lambda: tok, task=task, bus=bus, rank=0)
    examples = [Example(id=str(n), question="question", answer=str(n)) for n in (2, 60, 3, 90)]
    full = [len(tok.render_conversation([*task.prompt(e), {"role": "assistant", "content": task.target(e)}])[0])
            for e in examples]  # fmt: skip
    seq_len = 40
    assert [n > seq_len + 1 for n in full] == [False, True, False, True]
    rows = render_examples(ctx, examples, seq_len, "sft")
    assert [len(ids) for ids, _ in rows] == [min(n, seq_len + 1) for n in full]
    assert f"sft: 2 of 4 examples are longer than model.seq_len=40 tokens (the longest {max(full)})" in out.getvalue()
    out.truncate(0)
    render_examples(ctx, examples[::2], seq_len, "sft")  # none cut: nothing said
    assert out.getvalue() == ""


def test_generation_past_the_trained_context_is_warned_once_a_stage_on_rank_0():
    """Prompts plus the tokens to generate beyond model.seq_len run on rotary positions the model never trained
    on: RL and eval say how many, once a stage, on rank 0 only, and nothing when all fit."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from nanorl.stages.common import warn_past_context

    out = io.StringIO()

    def ctx(rank=0):
        bus = SimpleNamespace(console=Console(file=out, width=300))
        return SimpleNamespace(
            cfg=SimpleNamespace(model=SimpleNamespace(seq_len=100)), bus=bus, rank=rank, _warned=set()
        )

    prompts = [[0] * 40, [0] * 70, [0] * 61, [0] * 60]  # with 40 new tokens: 80, 110, 101, 100
    c = ctx()
    warn_past_context(c, "rl", prompts, 40, "rl.max_new_tokens")
    assert out.getvalue().strip() == (
        "rl: 2 of 4 prompts (the longest 70 tokens) plus rl.max_new_tokens=40 run past model.seq_len=100, the"
        " positions the model was trained on; raise model.seq_len or lower rl.max_new_tokens"
    )
    out.truncate(0), out.seek(0)
    warn_past_context(c, "rl", prompts, 40, "rl.max_new_tokens")  # once a stage
    warn_past_context(ctx(rank=1), "eval", prompts, 40, "eval.max_new_tokens")  # rank 0 only
    warn_past_context(ctx(), "eval", prompts, 30, "eval.max_new_tokens")  # the longest, 70 + 30 = 100: all fit
    assert out.getvalue() == ""
    warn_past_context(c, "eval", prompts, 40, "eval.max_new_tokens")  # another stage of the same context
    assert out.getvalue().startswith("eval: 2 of 4 prompts")


@pytest.mark.parametrize("joined", [True, False])
def test_categorical_eval_reads_the_letter_where_the_model_writes_it(joined):
    """The letter of "Final Answer: C" is read at the position the model writes it: after ":" when the BPE
    joins the space to the letter (" C"), after ": " when it does not (a byte-level vocabulary); read right
    after ":" there, it would be the logits of the space's position."""
    from types import SimpleNamespace

    from nanorl.api import Example
    from nanorl.multichoice import mc_conversation
    from nanorl.stages.eval import categorical_records
    from nanorl.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    text = "\n".join(f"Final Answer: {x}" for x in "ABCDE") if joined else "xyz qqq"
    tok = train_tokenizer([text] * 20, vocab_size=300 if joined else MIN_VOCAB_SIZE)
    assert (len(tok.encode(" C")) == 1) is joined
    line = tok.encode("Final Answer: C")

    class AnswerLineModel:
        """Writes the next token of "Final Answer: C" after any prefix of it; a distractor logit on A."""

        def eval(self):
            return self

        def __call__(self, x, logits="last"):
            out = torch.zeros(x.size(0), 1, tok.vocab_size)
            for r, row in enumerate(x.tolist()):
                out[r, 0, tok.encode("A")[0]] = out[r, 0, tok.encode(" A")[-1]] = 1.0
                j = next(j for j in range(len(line) - 1, 0, -1) if row[-j:] == line[:j])
                out[r, 0, line[j]] = 5.0
            return out

    task = SimpleNamespace(
        prompt=lambda ex: mc_conversation(ex.question, ex.options),
        choices=lambda ex: list("ABCDE"),
        is_correct=lambda ex, answer: answer == ex.answer,
    )
    ctx = SimpleNamespace(
        task=task, tokenizer=lambda: tok, device=torch.device("cpu"), dtype=torch.float32,
        cfg=SimpleNamespace(eval=SimpleNamespace(batch_size=4)),
    )  # fmt: skip
    examples = [Example(id=str(i), question=f"q{i}", answer="C", options=list("12345")) for i in range(3)]
    records = categorical_records(ctx, AnswerLineModel(), examples)
    assert [r["pred"] for r in records] == ["C", "C", "C"]


def _sigterm_on_call(fn, n: int):
    """`fn`, sending this process a SIGTERM on its `n`-th call (a preemption arriving in the middle of a step)."""
    import os
    import signal

    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.slow
def test_sigterm_saves_the_step_and_a_killed_save_or_a_torn_metrics_line_still_resume_exactly(monkeypatch):
    """SIGTERM (a preemption, `timeout`, torchrun stopping its workers) in the middle of a step: the step ends, its
    checkpoint is saved and the run stops (Stopped, exit code 143); a process killed between the renames of a
    checkpoint save, and a metrics line torn by a kill, do not stop the resume. The resumed run equals an
    uninterrupted one."""
    from nanorl import checkpoint as ckpt
    from nanorl.stages import common, rl
    from nanorl.stages.common import Stopped

    extra = ("rl.checkpoint_every=0", "rl.dynamic_sampling=true", "rl.max_sample_batches=2", "rl.kl_every=0")
    run_pipeline(_cfg("whole", *extra))

    # SIGTERM during base's step 3 (checkpoints every 2 steps): the run stops with step 3 saved
    with monkeypatch.context() as m:
        m.setattr(common, "lr_schedule", _sigterm_on_call(common.lr_schedule, 3))
        with pytest.raises(Stopped, match="base saved its checkpoint at step 3") as stop:
            run_pipeline(_cfg("preempted", *extra))
    assert stop.value.exit_code == 143
    assert ckpt.read_state(run_dir("preempted") / "base")["step"] == 3
    assert not ckpt.is_done(run_dir("preempted") / "base")

    # killed in the middle of sft's second checkpoint save, after its model file was renamed into place
    real_commit = ckpt._commit
    saves = [0]

    def killed_commit(d):
        saves[0] += d.name == "sft"
        if saves[0] == 2 and d.name == "sft":
            pending = json.loads((d / ckpt.NEXT_FILE).read_text())
            ckpt.os.replace(d / "model.safetensors.tmp", d / "model.safetensors")
            assert pending["step"] == 2
            raise KeyboardInterrupt
        return real_commit(d)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_commit", killed_commit)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(_cfg("preempted", *extra))

    # SIGTERM during RL's second step (no periodic checkpoints): step 2 is saved, with the prompt stream's position
    with monkeypatch.context() as m:
        m.setattr(rl, "sample_groups", _sigterm_on_call(rl.sample_groups, 3))
        with pytest.raises(Stopped, match="rl saved its checkpoint at step 2"):
            run_pipeline(_cfg("preempted", *extra))
    # and a kill tore the last metrics line
    with open(run_dir("preempted") / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "rl", "step": 2, "ti')

    run_pipeline(_cfg("preempted", *extra))
    for stage in ("base", "mid", "sft", "rl"):
        assert _losses("preempted", stage) == _losses("whole", stage), stage
        a, b = _weights("whole", stage), _weights("preempted", stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    # the resumed rl stage's first record was not swallowed by the torn line
    starts = [r for r in read_metrics(run_dir("preempted")) if r["stage"] == "rl" and r.get("kind") == "start"]
    assert len(starts) == 2  # the run the SIGTERM stopped, and the resume


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="a terminal of its own needs pty.fork (POSIX)")
def test_a_closed_terminal_saves_the_step_and_stops_cleanly():
    """The terminal a run was started in closes (an ssh session dropped outside tmux): the kernel sends SIGHUP and
    every later write to the terminal fails (EIO). The run finishes its step, saves it and stops with exit code
    129, as for SIGTERM; it was killed (SIGHUP's default) or crashed writing its progress bar or final message."""
    import pty
    import select
    import sys
    import time

    from nanorl import checkpoint as ckpt

    argv = [
        sys.executable, "-m", "nanorl", "pipeline", "--preset", "tiny", *SMALL, "name=hup", "base.steps=100000",
        "telemetry.console=true",  # the progress bar, drawn on the terminal until it hangs up
    ]  # fmt: skip
    pid, terminal = pty.fork()  # the child's controlling terminal: closing it hangs the child's session up
    if pid == 0:
        os.execv(sys.executable, argv)
    seen, deadline = b"", time.time() + 120
    try:  # until base has saved its first checkpoint (step 2), reading what the run draws
        while not (run_dir("hup") / "base" / "state.json").exists() and time.time() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                seen += os.read(terminal, 65536)
    except OSError:  # (EIO: the child ended)
        pass
    finally:
        os.close(terminal)  # the hangup
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + 1, seen.decode(errors="replace")[-2000:]
    state = ckpt.read_state(run_dir("hup") / "base")
    assert state is not None and state["step"] >= 1 and not ckpt.is_done(run_dir("hup") / "base")
    logged = [r for r in read_metrics(run_dir("hup")) if r["stage"] == "base" and r.get("kind") is None]
    assert logged and logged[-1]["step"] <= state["step"]


def test_a_second_process_on_a_run_is_refused_until_the_first_ends_however_it_ends(tmp_path):
    """Two `nanorl pipeline` on one run would write the same checkpoints: the second is refused with a line naming
    the first (its pid); once the first has died, even by SIGKILL with its lock file left behind, a run goes on."""
    import subprocess
    import sys

    from nanorl.api import NanorlError
    from nanorl.runlock import LOCK_FILE, holder, run_lock

    d = run_dir("shared")
    other = subprocess.Popen(
        [sys.executable, "-c", f"import time; from pathlib import Path; from nanorl.runlock import run_lock\n"
         f"with run_lock(Path({str(d)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "held"
        assert holder(d).startswith(f"pid {other.pid} on ")  # what `nanorl runs pull/push` ask
        with pytest.raises(NanorlError, match=f"run 'shared' is in use by pid {other.pid} on "):
            run_pipeline(_cfg("shared"))
        assert not (d / "run.toml").exists()  # refused before writing anything
    finally:
        other.kill()
        other.wait()
    assert f"pid {other.pid}" in (d / LOCK_FILE).read_text()  # what the killed process left
    assert holder(d) is None  # ... names no one who holds it
    with run_lock(d):
        assert f"pid {os.getpid()} " in (d / LOCK_FILE).read_text()
    assert (d / LOCK_FILE).read_text() == ""  # released: it names no one


def test_malformed_chat_data_stops_the_pipeline_at_its_preflight(tmp_path):
    """data.chat is read by the mid stage, after the tokenizer and base trained: a malformed conversation in it
    raised a KeyError there. The preflight reads it now and names the line."""
    from nanorl.api import NanorlError
    from nanorl.stages.runner import preflight

    chat = tmp_path / "chat.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    chat.write_text(good + '\n\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n')
    cfg = resolve(overrides=[f"data.chat={chat}"])
    with pytest.raises(NanorlError) as err:
        preflight(cfg, ["tokenizer", "base", "mid"])
    assert err.value.message == f"{chat}:3: message 2 (assistant) has no 'content'"
    chat.write_text(good + '\n{"messages": {"role": "user"}}\n')
    with pytest.raises(NanorlError, match=f'{chat}:2: "messages" is a dict, not a list'):
        preflight(cfg, ["tokenizer", "base", "mid"])
