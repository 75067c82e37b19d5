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


# ---- CUDA device choice, dtype and the process group, on a CPU-only machine (torch.cuda monkeypatched) ---------
@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with `n` visible CUDA GPUs as far as nanorl.device can tell; records torch.cuda.set_device."""
    import torch

    from nanorl import device as devmod

    state = {"n": 2, "current": [], "bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["n"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: state["current"].append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(devmod, "_bf16_supported", lambda d: state["bf16"])
    return state


def test_cuda_device_index_counts_the_visible_gpus(fake_gpus, monkeypatch):
    import torch

    from nanorl.api import NanorlError
    from nanorl.device import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    fake_gpus["n"] = 4  # one process per GPU, every GPU visible to each: cuda:LOCAL_RANK
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    fake_gpus["n"] = 1  # a launcher that binds each process to its GPU (CUDA_VISIBLE_DEVICES=3): it is cuda:0
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(NanorlError, match="1 CUDA GPU"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_run_on_cuda_1_makes_it_the_current_device(fake_gpus, monkeypatch):
    # Triton launches its kernels on the current CUDA device, not on their tensors': a single-process run on cuda:1
    # must make cuda:1 current (torchrun ranks did, in dist_setup; one process did not)
    import torch

    from nanorl.config import resolve
    from nanorl.stages.runner import make_context

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = resolve(preset="tiny", overrides=["name=gpu1", "device=cuda:1", "telemetry.console=false"])
    ctx = make_context(cfg)
    ctx.bus.close()
    assert ctx.device == torch.device("cuda", 1) and ctx.world_size == 1
    assert fake_gpus["current"] == [torch.device("cuda", 1)]
    assert ctx.dtype == torch.bfloat16
    # the CPU changes nothing
    fake_gpus["current"].clear()
    cfg = resolve(preset="tiny", overrides=["name=cpu", "device=cpu", "telemetry.console=false"])
    make_context(cfg).bus.close()
    assert fake_gpus["current"] == []


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_and_float16_does_not_train(fake_gpus):
    import torch

    from nanorl.api import NanorlError
    from nanorl.device import check_training_dtype, compute_dtype

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compute_dtype(cuda) == torch.bfloat16 and compute_dtype(cpu) == torch.float32
    fake_gpus["bf16"] = False  # a V100 or T4: float32 (float16 would need loss scaling), with a warning
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert compute_dtype(cuda, "auto") == torch.float32
    assert compute_dtype(cuda, "float16") == torch.float16  # asked for: fine for sampling and evaluation
    with pytest.raises(NanorlError, match="float16") as err:
        check_training_dtype(torch.float16, "base")
    assert "bfloat16" in err.value.hint
    for dt in (torch.float32, torch.bfloat16):
        check_training_dtype(dt, "base")
    with pytest.raises(NanorlError, match="unknown dtype"):
        compute_dtype(cpu, "fp8")


def test_the_process_group_backend_follows_the_run_device_with_a_long_timeout(fake_gpus, monkeypatch):
    # on a GPU machine a run with device=cpu must use gloo (nccl cannot reduce CPU tensors); the timeout is hours,
    # not NCCL's 10 minutes, as rank 0 alone trains the tokenizer and writes checkpoints while the others wait
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from nanorl import device as devmod
    from nanorl.api import NanorlError

    calls, registered = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init_process_group(backend=None, timeout=None, device_id=None):  # (the arguments torch's takes)
        given = {"backend": backend, "timeout": timeout, "device_id": device_id}
        calls.append({k: v for k, v in given.items() if v is not None})

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(devmod.atexit, "register", registered.append)
    monkeypatch.setitem(devmod._DIST, "joined", False)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("NANORL_DIST_TIMEOUT", raising=False)

    assert devmod.dist_setup(torch.device("cpu")) == (1, 1, 2)
    assert calls[-1] == {"backend": "gloo", "timeout": timedelta(hours=2)}
    assert fake_gpus["current"] == []
    assert registered == [devmod._leave_group]  # the group is left at exit (once the run finished)

    assert devmod.dist_setup(torch.device("cuda", 1)) == (1, 1, 2)
    kw = calls[-1]
    assert kw["backend"] == "nccl" and kw["timeout"] == timedelta(hours=2)
    assert kw["device_id"] == torch.device("cuda", 1)  # (torch >= 2.3 takes it; the project needs 2.4)
    assert fake_gpus["current"] == [torch.device("cuda", 1)]
    assert len(registered) == 1

    assert devmod.dist_setup() == (1, 1, 2)  # no device given: auto, on this machine the GPU of LOCAL_RANK
    assert calls[-1]["backend"] == "nccl"

    monkeypatch.setenv("NANORL_DIST_TIMEOUT", "600")
    devmod.dist_setup(torch.device("cpu"))
    assert calls[-1]["timeout"] == timedelta(minutes=10)
    for bad in ("0", "ten"):
        monkeypatch.setenv("NANORL_DIST_TIMEOUT", bad)
        with pytest.raises(NanorlError, match="NANORL_DIST_TIMEOUT"):
            devmod.dist_setup(torch.device("cpu"))
    monkeypatch.delenv("NANORL_DIST_TIMEOUT")
    with pytest.raises(NanorlError, match="mps"):
        devmod.dist_setup(torch.device("mps"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    n = len(calls)
    assert devmod.dist_setup(torch.device("cuda", 1)) == (0, 0, 1) and len(calls) == n  # one process: no group


@pytest.fixture
def one_rank_group(monkeypatch):
    """A real gloo process group of world size 1 in this process (destroyed afterwards)."""
    import socket

    import torch.distributed as dist

    from nanorl import device as devmod

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    monkeypatch.setitem(devmod._DIST, "finished", False)
    try:
        yield dist
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_collective_decisions_on_a_one_rank_group(one_rank_group, monkeypatch):
    from nanorl import device as devmod
    from nanorl.api import NanorlError

    assert devmod.is_distributed()
    assert devmod.max_over_ranks(3, 17.5) == [3.0, 17.5]
    assert devmod.min_over_ranks(3, -1) == [3.0, -1.0]
    assert devmod.any_rank(True) and not devmod.any_rank(False)
    devmod.raise_together(None)
    with pytest.raises(NanorlError, match="mine"):
        devmod.raise_together(NanorlError("mine"))
    # another rank's error reaches a rank that had none: it raises too, naming the rank and its message
    monkeypatch.setattr(devmod, "all_gather_objects", lambda o: [o, ("NanorlError", "the corpus is too small", "h")])
    with pytest.raises(NanorlError, match="rank 1: the corpus is too small") as err:
        devmod.raise_together(None)
    assert err.value.hint == "h"
    monkeypatch.setattr(devmod, "all_gather_objects", lambda obj: [obj, ("IndexError", "list index", None)])
    with pytest.raises(NanorlError, match="rank 1: IndexError: list index"):
        devmod.raise_together(None)


def test_the_group_is_left_at_exit_only_when_the_run_finished(one_rank_group, monkeypatch):
    # destroy_process_group waits for the ranks' pending collectives (NCCL), which after an error on one rank the
    # others may never join: the group is destroyed at exit only after a finished run
    import sys

    from nanorl import device as devmod

    dist = one_rank_group
    monkeypatch.delattr(sys, "last_value", raising=False)  # (pytest sets it after a failed test)
    devmod._leave_group()  # a run under way (an error): left alone
    assert dist.is_initialized()
    devmod.dist_finished()
    monkeypatch.setattr(sys, "last_value", RuntimeError("uncaught"), raising=False)
    devmod._leave_group()  # finished, then an uncaught error: left alone
    assert dist.is_initialized()
    monkeypatch.delattr(sys, "last_value")
    devmod._leave_group()
    assert not dist.is_initialized()


def test_exact_sums_are_float64_but_float32_on_mps():
    """Token counts and validation nats are summed in float64, except on MPS, which has no float64 at all
    (a float64 tensor there raises, so the validation pass and the SFT step would fail on a Mac)."""
    import torch

    from nanorl.device import exact_dtype

    assert exact_dtype(torch.device("cpu")) == torch.float64
    assert exact_dtype(torch.device("cuda", 0)) == torch.float64
    assert exact_dtype(torch.device("mps")) == torch.float32
    assert torch.tensor(float(2**24 - 1), dtype=exact_dtype(torch.device("mps"))).item() == 2**24 - 1
