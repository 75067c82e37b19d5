"""The benchmark scripts in bench/ still run: each at its smallest size prints a table and, as its last line, one
JSON object with the keys docs/benchmarks.md reads. Nothing here times anything (speed and memory goals live in
bench/ and docs/benchmarks.md); it catches a script that rots: an import that moved, an argument that broke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# script -> (its smallest arguments, keys its JSON line must hold: "a.b" is a nested key)
SMOKE = {
    "cli_startup.py": (["--reps", "1"], ["results.--help.median_s", "results.plugins list.median_s", "meets_goal"]),
    "train_speed.py": (["--steps", "1", "--warmup", "0", "--threads", "1"], ["tok_s", "gflops", "vs_nanochat_adamw"]),
    "model_speed.py": (["--steps", "1", "--warmup", "0", "--threads", "1"],
                       ["nanorl.tokens_per_s", "nanorl.pct_of_ceiling", "nanorl.tokens_per_s_at_68"]),
    "generate.py": (["--reps", "1", "--threads", "1", "--nocache-tokens", "1", "--no-compile"],
                    ["cached_tok_s", "nocache_tok_s", "speedup", "vs_nanochat"]),
    "letter_telemetry.py": (["--prompts", "1", "--group", "2", "--prompt-len", "8", "--completion-len", "24",
                             "--reps", "1", "--threads", "1"], ["update_s", "telemetry_s", "telemetry_over_update"]),
    "loader.py": (["--batches", "1"], ["results.arith 8x256.tokens_s", "results.arith 8x256.dropped_frac"]),
    "train_memory.py": (["--depths", "2", "--seq-len", "32", "--rows", "1"], ["device", "runs"]),
}  # fmt: skip
SLOW = {
    "grpo_step.py": (["--steps", "1", "--threads", "1"], ["rollout_s", "train_s", "step_s", "vs_trl"]),
}
# run by tests of their own below: tokenizer.py, attention.py (CPU: a correctness check), pipeline_tiny.py and
# copy_probe.py (a pipeline run), nanochat_anchor.py (nanochat's source, which is not here: its refusal)
OWN_TESTS = {"tokenizer.py", "attention.py", "pipeline_tiny.py", "copy_probe.py", "nanochat_anchor.py"}


def run(script: str, *args: str, timeout: int = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "150", **(env or {})}
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


def last_json(proc: subprocess.CompletedProcess, keys: list[str]) -> dict:
    """The script succeeded and its last line of stdout is one JSON object holding `keys` and a "bench" name."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, "a table (or some text) must come before the JSON line"
    out = json.loads(lines[-1])
    assert isinstance(out, dict) and isinstance(out.get("bench"), str), lines[-1]
    for key in keys:
        node = out
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} missing from {lines[-1][:500]}"
            node = node[part]
    return out


def test_every_bench_script_has_a_smoke_test():
    # a new script without an entry here would rot unnoticed
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SMOKE) | set(SLOW) | OWN_TESTS


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_script_runs_at_its_smallest_size(script):
    args, keys = SMOKE[script]
    last_json(run(script, *args), keys)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SLOW))
def test_slower_bench_script_runs_at_its_smallest_size(script):
    args, keys = SLOW[script]
    last_json(run(script, *args), keys)


@pytest.mark.slow
def test_tokenizer_bench_runs_with_or_without_hugging_face_tokenizers():
    # `tokenizers` is no dependency of nanorl's: without it the reference column reads null; it used to stop the
    # script with a ModuleNotFoundError (and with it `make bench`, before train_memory.py and train_speed.py)
    import importlib.util

    keys = ["results.arith.train_mb_s", "results.arith.encode_tok_s", "results.arith.hf_tokenizers_train_mb_s"]
    out = last_json(run("tokenizer.py", "--reps", "1", "--vocab", "300", timeout=120), keys)
    has_hf = importlib.util.find_spec("tokenizers") is not None
    assert (out["results"]["arith"]["hf_tokenizers_train_mb_s"] is not None) == has_hf


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")))
def test_bench_help_shows_what_the_script_measures(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: " + script)
    # the module docstring's first line: what is timed, so --help answers it without opening the file
    first = (BENCH / script).read_text().split('"""')[1].strip().splitlines()[0]
    assert first[:60] in proc.stdout


@pytest.mark.parametrize(("script", "arg"), [("model_speed.py", "--steps"), ("cli_startup.py", "--reps"),
                                             ("loader.py", "--batches"), ("grpo_step.py", "--steps")])  # fmt: skip
def test_a_count_of_zero_is_one_line_not_a_traceback(script, arg):
    # zero steps used to reach statistics.median([]) and end in a StatisticsError traceback
    proc = run(script, arg, "0")
    assert proc.returncode == 2
    assert f"argument {arg}: 0 is below 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA attention.py times the kernel (minutes)")
def test_attention_bench_without_cuda_checks_correctness_only():
    out = last_json(run("attention.py", "--reps", "1"), ["max_abs_err.out", "max_abs_err.dq"])
    assert out["mode"] == "correctness_only" and out["ok"] is True


def test_nanochat_anchor_without_its_source_says_what_to_pass():
    proc = run("nanochat_anchor.py", env={"NANOCHAT_SRC": ""})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "pass the folder that holds nanochat's package" in proc.stderr


def test_copy_probe_on_a_wrong_folder_is_one_line(tmp_path):
    proc = run("copy_probe.py", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds no run.toml: give a run folder" in proc.stderr


def test_pipeline_bench_help_is_its_own():
    # --help went to `nanorl pipeline`, which printed its help, and the script then reported on a run that never
    # happened: every goal but accuracy "met"
    proc = run("pipeline_tiny.py", "--help")
    assert proc.returncode == 0 and "--home" in proc.stdout and "goal_time" not in proc.stdout


def test_pipeline_bench_that_fails_meets_no_goal_and_exits_with_its_code(tmp_path):
    proc = run("pipeline_tiny.py", "--home", str(tmp_path), "model.no_such_key=1")
    assert proc.returncode == 2, proc.stdout[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == 2 and not out["goal_time"] and not out["goal_memory"]


@pytest.mark.slow
def test_pipeline_bench_and_copy_probe_on_a_tiny_run(tmp_path):
    # the whole offline pipeline cut to a few steps a stage (~15 s), then the copy probe on its checkpoints
    tiny = ["base.steps=2", "mid.steps=1", "sft.steps=2", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2",
            "rl.dynamic_sampling=false", "rl.max_new_tokens=16", "eval.max_examples=4", "eval.samples=0",
            "eval.max_new_tokens=16", "tokenizer.train_chars=100000"]  # fmt: skip
    out = last_json(run("pipeline_tiny.py", "--home", str(tmp_path), *tiny, timeout=120),
                    ["wall_s", "peak_rss_mb", "sft_dev_acc", "rl_dev_acc", "stage_s", "copy_probe.sft"])  # fmt: skip
    assert out["rc"] == 0 and 0.0 <= out["rl_dev_acc"] <= 1.0
    assert {"base", "sft", "rl", "eval"} <= set(out["stage_s"])
    run_dir = tmp_path / "runs" / "bench-tiny"
    probe = last_json(run("copy_probe.py", str(run_dir), "--examples", "5"), ["base.copy_last", "sft.operand"])
    assert probe["bench"] == "copy_probe"


GPU_SESSION = ["bash", str(BENCH / "gpu_session.sh")]


def gpu_session(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "GPU_SESSION_SITE": str(tmp_path / "site"), "GPU_SESSION_HOME": str(tmp_path / "home"), **env}  # fmt: skip
    return subprocess.run([*GPU_SESSION, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_gpu_session_without_a_step_prints_its_usage(tmp_path):
    proc = gpu_session(tmp_path)
    assert proc.returncode == 2 and "bash bench/gpu_session.sh bench" in proc.stdout
    proc = gpu_session(tmp_path, "benchmarks")
    assert proc.returncode == 2 and "unknown step benchmarks (setup, tests, bench, pipeline, all)" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only without CUDA")
def test_gpu_session_refuses_the_cpu_unless_told(tmp_path):
    proc = gpu_session(tmp_path, "setup")
    assert proc.returncode != 0
    assert "no CUDA device: set GPU_SESSION_ALLOW_CPU=1 for a dry run on the CPU" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's")
def test_gpu_session_bench_dry_run_writes_each_benchmarks_json(tmp_path):
    proc = gpu_session(tmp_path, "bench", GPU_SESSION_ALLOW_CPU="1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "bench.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in records] == ["train_memory", "attention"]
    assert not [r for r in records if "error" in r] and records[1]["ok"] is True
