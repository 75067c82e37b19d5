"""Checkpoints: one folder per stage, three files, written atomically, loaded without unpickling anything.

    runs/<name>/<stage>/
        model.safetensors    the weights (safetensors metadata: step, config hash)
        optim.safetensors    the optimizer state, flat (`Optimizers.state_tensors()`); absent in a final export
        state.json           step, data-loader position, RNG states, config hash, sha256 of the two files
        DONE                 the stage finished (written by the runner after the final checkpoint)

A save is a small journal, so that a checkpoint is replaced whole or not at all whenever the process stops (Ctrl-C,
a kill, a full disk, a lost machine):

1. every tensor file is written to `<file>.tmp` and flushed to disk (a full disk fails here, before anything
   of the previous checkpoint is touched; the temp files are removed);
2. the new state.json is written to `state.next.tmp` and flushed: from here on the new checkpoint is complete;
3. the tensor files are renamed into place, then `state.next.tmp` to state.json (the commit record).

A process stopped inside step 3 leaves `state.next.tmp` beside a mix of old and new files; `recover` (the runner
calls it before a stage runs) finishes the renames, so the resume starts from the new checkpoint. Before step 2
the previous checkpoint is untouched. state.json carries the sha256 of the tensor files it belongs to, so a torn
copy or a flipped bit is still found at load time and reported as a `NanorlError`, never loaded silently.
A checkpoint from another architecture (the config hash, or a tensor's shape) is refused the same way, and so
is one trained with another tokenizer: state.json records the tokenizer's fingerprint (`Tokenizer.fingerprint`)
and a run loading a model compares it with its own tokenizer's (a model's token ids mean nothing under another
vocabulary; without the check it would just train or answer as if from scratch). A checkpoint written before
fingerprints were recorded loads as before.

Only rank 0 writes (`save(..., rank=...)`); every rank loads. `checkpoint.store` mirrors the files to a store
(`nanorl.store`: a folder or s3://bucket/prefix) after each local save; the rest of the run folder follows
after each stage (`nanorl.store.runs`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from nanorl.api import NanorlError
from nanorl.store import sha256_file

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"
DONE_FILE = "DONE"
NEXT_FILE = "state.next.tmp"  # the next state.json, complete: its tensor files may still wait to be renamed
FORMAT = "nanorl-ckpt-1"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _flush(path: Path) -> None:
    """Force a written file's data to disk: a rename must never publish a file whose data a crash can lose."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write `tensors` to `<path>.tmp` (not to `path`: the caller renames it once every file is written); return
    its sha256. A failure removes the temp file and raises an OSError naming it (a full disk: ENOSPC)."""
    from safetensors.torch import save_file

    tmp = _tmp(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _flush(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a half-written temp file only takes the space a retry needs
        # safetensors reports an I/O failure as its own error type whose text ends in "(os error N)"
        found = re.search(r"os error (\d+)", str(e)) if not isinstance(e, OSError) else None
        if found:
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from e
        raise
    return sha256_file(tmp)


def _read_tensors(path: Path, expect_sha: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise NanorlError(f"checkpoint file missing: {path}", hint="the checkpoint is incomplete; delete the folder")
    if expect_sha is not None and sha256_file(path) != expect_sha:
        raise NanorlError(
            f"checkpoint file {path} is corrupt (its sha256 does not match state.json)",
            hint=f"delete {path.parent} to retrain that stage, or restore it from the store",
        )
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on a malformed header
        raise NanorlError(
            f"checkpoint file {path} is unreadable: {e}", hint=f"delete {path.parent} to retrain that stage"
        ) from None


# ---- RNG states, as JSON (no pickle) ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    if "python" in st:
        v, internal, gauss = st["python"]
        random.setstate((v, tuple(internal), gauss))
    if "torch" in st:
        raw = base64.b64decode(st["torch"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        raw = base64.b64decode(st["cuda"])
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# ---- save / load ----------------------------------------------------------------------------------------------
def save(
    directory: str | Path,
    model: torch.nn.Module,
    optimizers=None,
    state: dict[str, Any] | None = None,
    config_hash: str = "",
    rank: int = 0,
    store=None,
    store_prefix: str = "",
    tokenizer_fingerprint: str = "",
) -> Path | None:
    """Write a checkpoint of `model` (+ `optimizers`, an `nanorl.optim.Optimizers`) and `state` into `directory`.

    `state` must be JSON-serialisable (step, loader position, ...); RNG states are added here, and
    `tokenizer_fingerprint` (the fingerprint of the tokenizer the model was trained with) when given. Returns the
    folder (None on ranks other than 0, which write nothing).
    """
    if rank != 0:
        return None
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = dict(state or {})
    step = int(state.get("step", 0))
    meta = {"format": FORMAT, "step": str(step), "config_hash": config_hash}
    files = {MODEL_FILE: _write_tensors(d / MODEL_FILE, _unwrap(model).state_dict(), meta)}
    try:
        if optimizers is not None:
            files[OPTIM_FILE] = _write_tensors(d / OPTIM_FILE, optimizers.state_tensors(), meta)
        record = {"format": FORMAT, "config_hash": config_hash, "files": files, "rng": rng_state(), **state}
        if tokenizer_fingerprint:
            record["tokenizer"] = tokenizer_fingerprint
        record["step"] = step
        tmp = d / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        _flush(tmp)
    except BaseException:
        for name in files:  # nothing of the previous checkpoint was touched: leave it as it was
            _tmp(d / name).unlink(missing_ok=True)
        (d / (STATE_FILE + ".tmp")).unlink(missing_ok=True)
        raise
    os.replace(tmp, d / NEXT_FILE)  # the new checkpoint is complete: from here on it replaces the old one
    _commit(d)
    if optimizers is None:  # after the commit: the state.json before it still named the old optimizer state
        (d / OPTIM_FILE).unlink(missing_ok=True)
        if store is not None:
            store.delete(f"{store_prefix}/{OPTIM_FILE}" if store_prefix else OPTIM_FILE)
    if store is not None:
        for name in (*files, STATE_FILE):
            store.put(d / name, f"{store_prefix}/{name}" if store_prefix else name)
    return d


def _commit(d: Path) -> None:
    """Rename the temp files that `state.next.tmp` names into place, then it to state.json: step 3 of a save, or
    its completion by `recover`. A file already renamed has no temp file left (renames are atomic)."""
    pending = json.loads((d / NEXT_FILE).read_text())
    for name in pending["files"]:
        if _tmp(d / name).is_file():
            os.replace(_tmp(d / name), d / name)
    os.replace(d / NEXT_FILE, d / STATE_FILE)


def recover(directory: str | Path) -> bool:
    """Finish a checkpoint save that was stopped while it renamed its files (a `state.next.tmp` is there): the
    folder then holds the new checkpoint whole. Returns whether there was one to finish. The temp files of a save
    stopped earlier are removed (the previous checkpoint is whole), and so is a `state.next.tmp` whose files do
    not match it (which a save never leaves; the folder is then left for `load` to judge). Call it on one process
    (rank 0) before any process reads the folder."""
    d = Path(directory)
    finished = False
    if (d / NEXT_FILE).is_file():
        try:
            pending = json.loads((d / NEXT_FILE).read_text())
            finished = all(
                sha256_file(_tmp(d / name) if _tmp(d / name).is_file() else d / name) == sha
                for name, sha in pending["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            finished = False
        if finished:
            _commit(d)
            if OPTIM_FILE not in pending["files"]:
                (d / OPTIM_FILE).unlink(missing_ok=True)
        else:
            (d / NEXT_FILE).unlink()
    for name in (MODEL_FILE, OPTIM_FILE, STATE_FILE):  # what a stopped save wrote and did not use
        _tmp(d / name).unlink(missing_ok=True)
    return finished


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """state.json of a checkpoint folder, or None when there is none (no checkpoint yet)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanorlError(f"checkpoint state {path} is corrupt: {e}", hint=f"delete {path.parent} to retrain") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "files" not in state:
        raise NanorlError(f"{path} is not a nanorl checkpoint state ({FORMAT})", hint=f"delete {path.parent}")
    return state


def has_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def load(
    directory: str | Path,
    model: torch.nn.Module,
    optimizers=None,
    config_hash: str | None = None,
    restore_rng: bool = False,
    tokenizer_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizers` when given and saved); return its state.json.

    Raises NanorlError when the folder holds no checkpoint, a file is corrupt, the config hash differs from
    `config_hash` (when given), the checkpoint was trained with a tokenizer other than the one whose fingerprint
    is `tokenizer_fingerprint` (when given, and the checkpoint records one), or a tensor's name or shape does not
    fit the model.
    """
    d = Path(directory)
    state = read_state(d)
    if state is None:
        raise NanorlError(f"no checkpoint in {d} (no {STATE_FILE})", hint="run the stage that writes it first")
    check_tokenizer(d, state, tokenizer_fingerprint)
    if config_hash is not None and state.get("config_hash") and state["config_hash"] != config_hash:
        raise NanorlError(
            f"checkpoint {d} was written for another model configuration "
            f"(config hash {state['config_hash']}, this run's is {config_hash})",
            hint="use the run's own config (its run.toml), or start a new run with --name",
        )
    tensors = _read_tensors(d / MODEL_FILE, state["files"].get(MODEL_FILE))
    raw = _unwrap(model)
    expected = raw.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or bad:
        what = "; ".join(
            filter(None, [
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shape mismatch {', '.join(bad[:3])}" if bad else "",
            ])
        )  # fmt: skip
        raise NanorlError(
            f"checkpoint {d} does not fit this model ({what})",
            hint="the model configuration differs from the one that wrote it",
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    if optimizers is not None and OPTIM_FILE in state["files"]:
        opt_tensors = _read_tensors(d / OPTIM_FILE, state["files"][OPTIM_FILE])
        try:
            optimizers.load_state_tensors(opt_tensors)
        except ValueError as e:
            raise NanorlError(f"optimizer state in {d} does not fit: {e}", hint=f"delete {d} to retrain") from None
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def check_tokenizer(directory: str | Path, state: dict[str, Any], fingerprint: str | None, run: str = "RUN") -> None:
    """Refuse a checkpoint whose state records a tokenizer fingerprint other than `fingerprint` (None, or a
    checkpoint from before fingerprints were recorded: nothing to compare). `run` names the run in the hint."""
    saved = state.get("tokenizer")
    if not fingerprint or not saved or saved == fingerprint:
        return
    raise NanorlError(
        f"checkpoint {directory} was trained with another tokenizer (fingerprint {saved}; this run's tokenizer is"
        f" {fingerprint}): its token ids would mean other text",
        hint="use a checkpoint trained with this run's tokenizer, or retrain the run's models on it"
        f" (`nanorl pipeline --name {run} --from base`; `--from tokenizer` retrains the tokenizer too)",
    )


def mark_done(directory: str | Path, rank: int = 0, info: dict[str, Any] | None = None) -> None:
    if rank != 0:
        return
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(info or {}) + "\n")
    os.replace(tmp, d / DONE_FILE)


def is_done(directory: str | Path) -> bool:
    return (Path(directory) / DONE_FILE).is_file()
