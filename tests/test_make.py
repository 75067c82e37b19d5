"""The Makefile's targets as the README names them."""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_bench_runs_only_scripts_that_run_without_arguments():
    # `make bench` runs every CPU benchmark as it is: a helper module (bench/_*.py) is no benchmark, and
    # copy_probe.py (a run folder) and nanochat_anchor.py (nanochat's source) need an argument, so the loop
    # would stop at them with an error
    out = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    (loop,) = [line for line in out.splitlines() if line.startswith("for b in ")]
    scripts = sorted({Path(p).name for pat in re.findall(r"bench/\S+?\.py", loop) for p in glob.glob(str(ROOT / pat))})
    assert "attention.py" in scripts and "pipeline_tiny.py" in scripts
    assert not [s for s in scripts if s.startswith("_") or s in ("copy_probe.py", "nanochat_anchor.py")]
