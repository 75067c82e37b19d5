"""Device set-up: the CPU allocator setting that keeps freed memory for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

_FAULTS = """
import resource, sys, torch
from nanorl.device import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # warm-up: the heap grows (2 to 6 times here) until freed blocks fit the next tensor
    torch.ones(32 << 20)
before = faults()
for _ in range(8):
    torch.ones(32 << 20)  # 128 MB tensors, one after the other
print(kept, faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_page_faults_on_reuse():
    # a tensor over glibc's mmap threshold is unmapped on free, and the next one is faulted in again page by page
    # (32,768 faults per 128 MB, 262k for the eight); with keep_freed_memory the heap keeps the freed pages, so once
    # it has grown (the warm-up) the same tensors cost next to no faults. How many steps the heap takes to grow
    # varies between machines, which is why faults are counted only after the warm-up.
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept, int(faults)

    kept, faults = run("keep")
    default = run("default")[1]
    assert kept == "True" and default > 8 * 30_000
    assert faults < default / 4
