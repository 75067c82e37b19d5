"""Who runs a run now: `run.lock` in its folder, a system lock (flock) held by the process that trains it.

Torch-free, so that the file-only commands (`nanorl runs pull/push`) can ask too."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

from nanorl.api import NanorlError

LOCK_FILE = "run.lock"  # in the run folder: who runs it now (never mirrored to a store: `nanorl.store.runs`)


@contextlib.contextmanager
def run_lock(d: Path):
    """Hold the run folder `d` for this process: a second `nanorl pipeline` (or `nanorl train`) on the same run
    fails at once with a line naming the process that holds it, instead of both writing the same checkpoints.

    The lock is the system's (flock on `run.lock`), so the system releases it when its process ends, however it
    ends: a lock left by a killed process (its pid dead) never blocks a resume. The file's text (pid, host, start
    time, command) only names the holder. Under torchrun, rank 0 holds it for every rank."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    fh = open(d / LOCK_FILE, "a+")  # noqa: SIM115 - held open as long as the lock
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise NanorlError(
            f"run {d.name!r} is in use by {holder}",
            hint="wait for it to end, or stop it (two processes on one run overwrite each other's checkpoints);"
            " to train beside it, give this run another --name",
        ) from None
    except OSError as e:  # a file system without locks (some network mounts): run unguarded, as before
        fh.close()
        import warnings

        warnings.warn(
            f"cannot lock {d / LOCK_FILE} ({e.strerror}): nothing stops a second process on this run", stacklevel=3
        )
        yield
        return
    fh.truncate(0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({' '.join(sys.argv)})\n")
    fh.flush()
    try:
        yield
    finally:
        fh.truncate(0)
        fh.close()  # releases the lock


def holder(d: Path) -> str | None:
    """Who holds the run folder `d` now (its lock file's line: pid, host, start, command), or None when no process
    does (no lock file, a lock left by a process that ended, a file system without locks)."""
    import fcntl

    lock = d / LOCK_FILE
    if not lock.is_file():
        return None
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (released when the file closes)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        except OSError:
            return None
    return None
