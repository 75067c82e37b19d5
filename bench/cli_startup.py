"""CLI start-up time: `nanorl --help` and `nanorl plugins list`, wall seconds, warm (after one untimed run).

Goal (../shared/BENCHMARKS.md): <= 0.5 s, against ~3 s for a CLI that imports torch at start-up.
Usage: python bench/cli_startup.py [--reps N]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count  # noqa: E402

COMMANDS = {"--help": ["--help"], "plugins list": ["plugins", "list"], "--version": ["--version"]}


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--reps", type=count, default=7, help="timed runs of each command (default 7)")
    args = ap.parse_args()
    exe = shutil.which("nanorl") or str(Path(sys.executable).parent / "nanorl")
    results = {}
    for label, argv in COMMANDS.items():
        subprocess.run([exe, *argv], capture_output=True, check=True)  # warm the file cache
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            subprocess.run([exe, *argv], capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        results[label] = {
            "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
        }
    print(f"{'command':<22}{'median s':>10}{'min s':>10}{'max s':>10}")
    for label, r in results.items():
        print(f"{'nanorl ' + label:<22}{r['median_s']:>10}{r['min_s']:>10}{r['max_s']:>10}")
    worst = max(r["median_s"] for r in results.values())
    print(
        json.dumps(
            {"bench": "cli_startup", "reps": args.reps, "results": results, "goal_s": 0.5, "meets_goal": worst <= 0.5}
        )
    )


if __name__ == "__main__":
    main()
