"""The offline demo, measured: `nanorl pipeline --task arith --preset tiny` in a fresh NANORL_HOME.

Reports wall time, peak RSS of the pipeline process, SFT vs RL dev accuracy (generative, the same questions),
and whether the goals hold (<= 10 min, <= 2 GB, dev accuracy >= 60%, RL > SFT).

    .venv/bin/python bench/pipeline_tiny.py [--home DIR] [extra key=value overrides...]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    home = None
    if args[:1] == ["--home"]:
        home, args = args[1], args[2:]
    home = home or tempfile.mkdtemp(prefix="nanorl-bench-")
    env = {
        **os.environ,
        "NANORL_HOME": home,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    exe = Path(sys.executable).with_name("nanorl")
    cmd = [str(exe), "pipeline", "--task", "arith", "--preset", "tiny", "--name", "bench-tiny", *args]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env)
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    run = Path(home) / "runs" / "bench-tiny"
    acc = {}
    for stage, name in (("rl", "arith-dev.json"), ("sft", "arith-dev-sft.json")):
        p = run / "eval" / name
        if p.is_file():
            acc[stage] = json.loads(p.read_text())["modes"]["generative"]["accuracy"]
    stage_s = {}
    for d in run.iterdir() if run.is_dir() else []:
        done = d / "DONE"
        if done.is_file():
            stage_s[d.name] = round(json.loads(done.read_text() or "{}").get("wall_s", 0), 1)
    result = {
        "bench": "pipeline_tiny",
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb),
        "sft_dev_acc": acc.get("sft"),
        "rl_dev_acc": acc.get("rl"),
        "stage_s": stage_s,
        "goal_time": wall <= 600,
        "goal_memory": peak_mb <= 2048,
        "goal_acc": (acc.get("rl") or 0) >= 0.6,
        "goal_rl_above_sft": acc.get("rl") is not None and acc.get("sft") is not None and acc["rl"] > acc["sft"],
        "load_avg_end": round(os.getloadavg()[0], 1),
    }
    for k, v in result.items():
        print(f"{k:>20}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
