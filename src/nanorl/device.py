"""Devices, precision and data parallelism: the few facts every stage, the engine and the benchmarks share.

- `resolve_device("auto")`: cuda when present, else mps, else cpu; `cuda` under torchrun means
  cuda:(LOCAL_RANK mod the visible GPUs), so a launcher that binds each process to its own GPU through
  CUDA_VISIBLE_DEVICES (one visible device, cuda:0) works as well as one that shows every process all of them.
- `use_device(device)`: makes a CUDA device the current one (Triton kernels launch on the current device, not
  on their tensors': without it a run on cuda:1 would launch them on cuda:0).
- `compute_dtype(device, name)`: "auto" is bf16 on a CUDA GPU that supports it, else float32 (with a warning on
  an older GPU: float16 without loss scaling is not safe to train in, see `check_training_dtype`).
- `autocast(device, dtype)`: bf16 autocast on CUDA (weights stay fp32, matmuls run in bf16); a no-op on CPU,
  where bf16 matmuls are slower than fp32, and on MPS.
- `keep_freed_memory()`: on Linux/glibc CPU runs, freed memory stays in the process for the next tensor.
- `dist_setup(device)`: under torchrun (RANK/WORLD_SIZE set) joins the process group (nccl when the run's
  device is CUDA, gloo when it is the CPU) with a generous timeout (`NANORL_DIST_TIMEOUT`, seconds, default 2
  hours: rank 0 alone trains the tokenizer and writes checkpoints while the others wait in a collective) and
  returns (rank, local_rank, world_size); otherwise (0, 0, 1) and no process group. The group is left
  (destroy_process_group) at exit when the run finished (`dist_finished`), not after an error, where leaving
  would wait on the other ranks.
- `raise_together(err)`, `together(fn)` and `any_rank`/`max_over_ranks`: decisions every rank takes together, so
  that an error met on one rank stops every rank instead of leaving the others waiting in their next collective;
  `mean_and_failed` carries an error's flag in an all-reduce a loop makes anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import sys
import warnings
from datetime import timedelta
from typing import Any

import torch

from nanorl.api import NanorlError


def _local_gpu() -> int:
    """This process's GPU among the visible ones: LOCAL_RANK modulo their number (a launcher may show each process
    only its own GPU, CUDA_VISIBLE_DEVICES=<local rank>, where cuda:LOCAL_RANK would not exist)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_gpu())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise NanorlError(f"unknown device {name!r}", hint="auto, cpu, cuda, cuda:N or mps", exit_code=2) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NanorlError("device=cuda but no CUDA GPU is visible", hint="use device=cpu (or auto)", exit_code=2)
        if dev.index is None:
            dev = torch.device("cuda", _local_gpu())
        elif dev.index >= torch.cuda.device_count():
            raise NanorlError(
                f"device={name} but {torch.cuda.device_count()} CUDA GPU(s) are visible",
                hint="cuda:N counts the visible GPUs (CUDA_VISIBLE_DEVICES) from 0; or use device=cuda",
                exit_code=2,
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise NanorlError("device=mps but MPS is not available", hint="use device=cpu (or auto)", exit_code=2)
    return dev


def use_device(device: torch.device) -> None:
    """Make a CUDA `device` the current CUDA device (a no-op for others). Triton launches its kernels (the fused
    attention and loss) on the current device whatever their tensors' device, and so does anything that allocates
    on plain "cuda": a single-process run on cuda:1 must make cuda:1 current, as torchrun ranks do."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_FREED_MEMORY_KEPT = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel. Returns whether it did.

    Why: PyTorch's CPU allocator is plain malloc, and glibc serves every block above its mmap threshold (which
    grows to at most 32 MB; a 4096 x 8192 float32 logits tensor is 134 MB) with a fresh mmap, unmapped on free.
    Each such tensor is then paid for again in page faults (one per 4 KB page, at first touch), every step.
    With mmap off and the heap trimmed only above 1 GiB, a GRPO step on the benchmark shape took 336k page
    faults instead of 804k and its training forward 0.56 s instead of 0.81 s; peak memory rose 8% (1.38 ->
    1.49 GB). Other platforms keep their allocator.
    Opt out with NANORL_CPU_MALLOC=default.
    """
    global _FREED_MEMORY_KEPT
    if _FREED_MEMORY_KEPT:
        return True
    if os.environ.get("NANORL_CPU_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _FREED_MEMORY_KEPT = ok
    return ok


def _bf16_supported(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively (Ampere and later); emulated bf16 (older GPUs) does not count."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the argument: it did not count emulation either
            return bool(torch.cuda.is_bf16_supported())


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype forward passes compute in: `name`, or for "auto" bf16 on a CUDA GPU that supports it and float32
    everywhere else. Not float16 on an older GPU: training in float16 needs loss scaling, which nanorl does not do
    (`check_training_dtype` refuses it), so such a GPU computes in float32, with a warning."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if _bf16_supported(device):
            return torch.bfloat16
        warnings.warn(
            f"{device} ({torch.cuda.get_device_name(device)}) has no native bfloat16: computing in float32 (slower;"
            " float16 would need loss scaling to train)",
            stacklevel=2,
        )
        return torch.float32
    if name not in DTYPES:
        raise NanorlError(f"unknown dtype {name!r}", hint="auto, float32, bfloat16 or float16", exit_code=2)
    return DTYPES[name]


def check_training_dtype(dtype: torch.dtype, stage: str) -> None:
    """Refuse to train in float16: without loss scaling (a GradScaler, which nanorl does not have) small
    gradients underflow to zero in float16 and the run degrades silently. Sampling and evaluation may use it."""
    if dtype == torch.float16:
        raise NanorlError(
            f"{stage}: training in float16 is not supported (no loss scaling: small gradients would underflow to 0)",
            hint="use dtype=bfloat16 (a GPU from Ampere on) or dtype=float32; float16 is fine for `nanorl eval`",
            exit_code=2,
        )


def autocast(device: torch.device, dtype: torch.dtype):
    """The context every forward pass runs in: autocast to `dtype` on CUDA, nothing elsewhere."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# How long a rank waits in a collective for the others before the run fails (NCCL's default is 10 minutes).
# Rank 0 alone trains the tokenizer, writes checkpoints (uploads them to checkpoint.store: gigabytes at depth 26)
# and runs the telemetry hooks while the other ranks wait in a barrier or their next all-reduce.
DIST_TIMEOUT_S = 2 * 3600


def dist_timeout() -> timedelta:
    """The process group's timeout: NANORL_DIST_TIMEOUT seconds, else DIST_TIMEOUT_S."""
    raw = os.environ.get("NANORL_DIST_TIMEOUT", "").strip()
    if not raw:
        return timedelta(seconds=DIST_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise NanorlError(f"NANORL_DIST_TIMEOUT={raw!r} is not a number of seconds > 0", exit_code=2)
    return timedelta(seconds=seconds)


def dist_backend(device: torch.device) -> str:
    """The process group's backend for a run on `device`: nccl for a CUDA device, gloo for the CPU (whatever GPUs
    the machine has: nccl cannot reduce CPU tensors)."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise NanorlError(
        f"data parallelism (torchrun) runs on CUDA or the CPU, not on {device.type}",
        hint="run one process, or use device=cpu",
        exit_code=2,
    )


_DIST = {"joined": False, "finished": False}


def dist_setup(device: torch.device | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size); joins the torchrun process group when there is one, its backend chosen for
    the run's `device` (default: resolve_device("auto"))."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 0, 1
    if not dist.is_initialized():
        device = resolve_device("auto") if device is None else device
        backend = dist_backend(device)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": dist_timeout()}
        if backend == "nccl":
            use_device(device)
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                kwargs["device_id"] = device  # binds the communicator to this GPU now, not at the first collective
        dist.init_process_group(**kwargs)
        if not _DIST["joined"]:
            _DIST["joined"] = True
            atexit.register(_leave_group)
    return dist.get_rank(), local_rank, dist.get_world_size()


def dist_finished(done: bool = True) -> None:
    """Say whether the work of this process finished (True: the process group is left cleanly at exit) or is under
    way (False: the run_pipeline that starts; an error from here on leaves the group to the process's end)."""
    _DIST["finished"] = done


def _leave_group() -> None:
    """At exit: destroy the process group when the run finished. Not after an error: destroy_process_group waits
    for the ranks' pending collectives (NCCL since torch 2.6), which the others may never join; exiting lets
    torchrun stop them instead."""
    if not _DIST["finished"] or getattr(sys, "last_value", None) is not None:
        return
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity without a process group)."""
    if is_distributed():
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def mean_and_failed(values: list[float], failed: bool, device: torch.device) -> tuple[list[float], bool]:
    """(each of `values` averaged over ranks, whether any rank `failed`): one all-reduce carries both, so that a
    collective a loop makes anyway also tells every rank of an error met on one of them (the caller then raises it
    on every rank, `raise_together`). Without a process group: (values, failed)."""
    x = all_reduce_mean(torch.tensor([*values, 1.0 if failed else 0.0], device=device))
    out = x.tolist()
    return out[:-1], out[-1] > 0


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype of a running sum that must stay exact (token counts, a validation pass's nats): float64, but
    float32 on MPS, which has no float64 (float32 counts integers exactly below 2^24)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _reduce_floats(values: list[float], op: str) -> list[float]:
    """Element-wise max or min of `values` over ranks (float64, exact for integers below 2^53)."""
    if not is_distributed():
        return list(values)
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return x.tolist()


def max_over_ranks(*values: float) -> list[float]:
    """Each value's maximum over ranks (a collective: every rank calls it; the values themselves without one)."""
    return _reduce_floats(list(values), "max")


def min_over_ranks(*values: float) -> list[float]:
    """Each value's minimum over ranks (a collective: every rank calls it)."""
    return _reduce_floats(list(values), "min")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (a collective: every rank calls it)."""
    return max_over_ranks(1.0 if flag else 0.0)[0] > 0


def raise_together(err: BaseException | None) -> None:
    """Raise on every rank when any rank met an error (a collective: every rank calls it, with its error or None).

    A rank raises its own error; a rank without one raises a NanorlError naming the first failing rank and its
    message. Without it, an error met on one rank (a shard without data, a model that does not fit) ends that rank
    while the others wait in their next collective until the process group's timeout."""
    if not is_distributed():
        if err is not None:
            raise err
        return
    mine = None
    if err is not None:
        mine = (type(err).__name__, getattr(err, "message", str(err)), getattr(err, "hint", None))
    errors = all_gather_objects(mine)
    if err is not None:
        raise err
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, (kind, message, hint) = failed[0]
        what = message if kind == "NanorlError" else f"{kind}: {message}"
        raise NanorlError(f"rank {rank}: {what}", hint=hint)


def together(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` with the ranks deciding together (a collective: every rank calls it): an exception on
    any rank raises on every rank (`raise_together`), so a rank that cannot read a file on its node (a checkpoint,
    the tokenizer) stops the others instead of leaving them waiting in their next collective."""
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - raised again, on every rank
        raise_together(e)
        raise
    raise_together(None)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
