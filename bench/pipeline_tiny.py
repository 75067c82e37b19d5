"""The offline demo, measured: `nanorl pipeline --task arith --preset tiny` in a fresh NANORL_HOME.

Reports wall time, peak RSS of the pipeline process, SFT vs RL dev accuracy on the same questions (greedy, and
the `sampled` mode's pass@1 with its sign test when eval.samples is set, as the tiny preset does), whether the
goals hold (<= 10 min, <= 2 GB, dev accuracy >= 60%, RL > SFT), and, measured after the run,
how well the base and SFT models copy the options and the operands (bench/copy_probe.py).

    .venv/bin/python bench/pipeline_tiny.py [--home DIR] [extra `nanorl pipeline` arguments: key=value ...]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanorl.multichoice import compare

sys.path.insert(0, str(Path(__file__).parent))
from _shape import arg_parser, print_table  # noqa: E402
from copy_probe import probe  # noqa: E402


def _dev_truth() -> dict[str, tuple[int, str]]:
    """(true value, operation) of each dev question of the default `arith` task, by eval record id."""
    from nanorl.plugins import get_plugins

    task = get_plugins().task("arith")
    return {
        ex.id: (int(re.search(r"The answer is (\d+)\.", ex.rationale).group(1)), _op(ex.rationale))
        for ex in task.load("dev")
    }


def _op(rationale: str) -> str:
    return "add" if re.search(r"^\d+ \+ \d+ = ", rationale, re.M) else "sub"


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--home", help="the NANORL_HOME to run in (default: a new temporary folder)")
    # everything else (key=value overrides, `--steps base=200`) goes to `nanorl pipeline` as it is, in order;
    # --help is this script's (passed on, it would print the pipeline's help and leave this script to report on
    # a run that never happened)
    opts, args = ap.parse_known_args()
    home = opts.home or tempfile.mkdtemp(prefix="nanorl-bench-")
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
    acc, value_right, records, baselines, by_op = {}, {}, {}, {}, {}
    sampled, sampled_records = {}, {}
    truth = _dev_truth()
    for stage, name in (("rl", "arith-dev.json"), ("sft", "arith-dev-sft.json")):
        p = run / "eval" / name
        if p.is_file():
            modes = json.loads(p.read_text())["modes"]
            gen = modes["generative"]
            acc[stage], records[stage] = gen["accuracy"], gen["records"]
            if "sampled" in modes:  # eval.samples completions per question at eval.sample_temperature
                s = modes["sampled"]
                sampled[stage] = {k: round(s[k], 4) for k in ("accuracy", "pass_at_k", "maj_at_k")}
                sampled_records[stage] = s["records"]
            baselines = {"chance": gen["chance_baseline"], "majority": gen["majority_baseline"]}
            # did the rationale reach the right number? (the letter can be right by luck, or wrong after it)
            stated = [re.search(r"The answer is (\d+)\.", r.get("completion") or "") for r in gen["records"]]
            value_right[stage] = sum(
                m is not None and int(m.group(1)) == truth[r["id"]][0]
                for m, r in zip(stated, gen["records"], strict=True)
            ) / max(1, len(gen["records"]))
            for op in ("add", "sub"):
                mine = [r for r in gen["records"] if truth[r["id"]][1] == op]
                by_op[f"{stage}_acc_{op}"] = round(sum(r["pred"] == r["gold"] for r in mine) / max(1, len(mine)), 3)
                by_op[f"n_{op}"] = len(mine)
    paired = compare(records["rl"], records["sft"]) if len(records) == 2 else None
    paired_sampled = compare(sampled_records["rl"], sampled_records["sft"]) if len(sampled_records) == 2 else None
    stage_s = {}
    for d in run.iterdir() if run.is_dir() else []:
        done = d / "DONE"
        if done.is_file():
            stage_s[d.name] = round(json.loads(done.read_text() or "{}").get("wall_s", 0), 1)
    # after the timing: do the base and SFT models copy the options and operands? (bench/copy_probe.py)
    copies = {
        stage: {k: round(v, 3) for k, v in probe(run, stage, 200).items() if k in ("copy_last", "operand")}
        for stage in ("base", "sft")
        if (run / stage / "DONE").is_file()
    }
    result = {
        "bench": "pipeline_tiny",
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb),
        "sft_dev_acc": acc.get("sft"),
        "rl_dev_acc": acc.get("rl"),
        "sft_value_right": value_right.get("sft"),
        "rl_value_right": value_right.get("rl"),
        **by_op,
        **{f"{k}_baseline": v for k, v in baselines.items()},
        "rl_minus_sft": paired and round(paired["diff"], 3),
        "rl_minus_sft_ci95": paired and [round(x, 3) for x in paired["diff_ci95"]],
        "mcnemar_p": paired and round(paired["p_value"], 4),
        "sft_dev_sampled": sampled.get("sft"),
        "rl_dev_sampled": sampled.get("rl"),
        "rl_minus_sft_sampled": paired_sampled and round(paired_sampled["diff"], 4),
        "rl_minus_sft_sampled_ci95": paired_sampled and [round(x, 4) for x in paired_sampled["diff_ci95"]],
        "sampled_questions_rl_better_worse": paired_sampled and [paired_sampled["a_only"], paired_sampled["b_only"]],
        "sampled_sign_test_p": paired_sampled and round(paired_sampled["p_value"], 4),
        "stage_s": stage_s,
        "copy_probe": copies,
        # a pipeline that failed meets no goal, however quickly it failed
        "goal_time": proc.returncode == 0 and wall <= 600,
        "goal_memory": proc.returncode == 0 and peak_mb <= 2048,
        "goal_acc": (acc.get("rl") or 0) >= 0.6,
        "goal_rl_above_sft": acc.get("rl") is not None and acc.get("sft") is not None and acc["rl"] > acc["sft"],
        # the policy RL trains (sampled), above SFT's on the same questions at p < 0.05
        "goal_rl_above_sft_sampled": bool(paired_sampled)
        and paired_sampled["diff"] > 0
        and paired_sampled["p_value"] < 0.05,
        "load_avg_end": round(os.getloadavg()[0], 1),
    }
    print_table(
        "nanorl pipeline --task arith --preset tiny", ("measure", "value"), [(k, str(v)) for k, v in result.items()]
    )
    print(json.dumps(result))
    sys.exit(proc.returncode)  # `make bench` stops at a pipeline that failed


if __name__ == "__main__":
    main()
