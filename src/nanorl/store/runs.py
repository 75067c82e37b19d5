"""A whole run in a store: what lets a run outlive the machine that trained it.

A run lives in a store under `<store>/<run name>/<path in the run folder>`: the same keys under which every
checkpoint is mirrored (`checkpoint.store`), so a mirrored run and a pushed one look alike, and
`nanorl runs pull` (or `nanorl eval --checkpoint s3://...`) gets back a folder every command can use.

- `push_run` uploads a run folder's files (`nanorl runs push`).
- `Mirror` keeps a pipeline's run folder mirrored (`checkpoint.store`): all of it at the start (a store that
  fails there stops the run before anything is trained), a stage's checkpoint as it is saved, the rest after
  each stage. Later, a failed upload does not stop training: the console says the mirror is behind, every later
  checkpoint and stage end tries again, and a run that ends with its mirror still behind fails with the command
  that completes it (`nanorl runs push`).
- `pull_run` downloads a run (or the parts of it one stage needs) into a folder, and checks every checkpoint it
  brings against the sha256 its state.json records; one caught mid-upload is fetched again.
- `list_runs` says which runs a store holds, and how far each got.

Within a folder, tensor files go before `state.json` and `DONE` (which name them), both ways, and a pass stops at
its first failure: a reader never finds a marker or a state whose files are not there yet. A stage run afresh
loses its `DONE` in the store first, and a final checkpoint's save removes the stale optimizer state after the
`state.json` that no longer names it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nanorl.api import NanorlError
from nanorl.store import sha256_file

CHECKPOINT_FILES = ("model.safetensors", "optim.safetensors", "state.json")
TENSOR_FILES = CHECKPOINT_FILES[:2]
SKIPPED = (".tmp", ".lock")  # file suffixes that never go to a store
LAST = ("state.json", "DONE")  # written last in a folder: they vouch for the files beside them
RETRY_WAITS = (2.0, 5.0, 10.0)  # seconds between pulls of a checkpoint caught mid-upload


def _order(rel: str) -> tuple:
    folder, _, name = rel.rpartition("/")
    return (folder, name in LAST, LAST.index(name) if name in LAST else 0, name)


def run_files(run_dir: Path, folder: str | None = None) -> list[str]:
    """The files of a run folder (or of its sub-folder `folder`), relative, in upload order (no `*.tmp`, no
    `run.lock`)."""
    base = run_dir / folder if folder else run_dir
    if not base.is_dir():
        return []
    # not the temp files of writes under way, nor the lock of the process running it (`nanorl.runlock`)
    rels = [p.relative_to(run_dir).as_posix() for p in base.rglob("*") if p.is_file() and p.suffix not in SKIPPED]
    return sorted(rels, key=_order)


def push_run(
    run_dir: Path,
    store,
    name: str,
    *,
    skip_checkpoints: bool = False,
    seen: dict[str, tuple] | None = None,
    folder: str | None = None,
) -> list[str]:
    """Upload the run folder to `<store>/<name>/`; returns the files sent. The first failure stops it (a
    NanorlError), so no `state.json` or `DONE` goes up without the files before it.

    `skip_checkpoints`: leave out the stage folders' checkpoint files. `folder`: only that sub-folder's files.
    `seen`: {file: (size, mtime)} of what was sent already; unchanged files are skipped, and it is updated."""
    sent = []
    for rel in run_files(run_dir, folder):
        if skip_checkpoints and "/" in rel and rel.rpartition("/")[2] in CHECKPOINT_FILES:
            continue
        st = (run_dir / rel).stat()
        stamp = (st.st_size, st.st_mtime_ns)
        if seen is not None and seen.get(rel) == stamp:
            continue
        store.put(run_dir / rel, f"{name}/{rel}")
        if seen is not None:
            seen[rel] = stamp
        sent.append(rel)
    return sent


def checkpoint_mismatch(folder: Path) -> str | None:
    """Why the checkpoint in `folder` is not whole (a file its state.json names is missing, or its sha256 is not
    the recorded one), or None when it is whole, or when there is no readable state.json to judge by (loading
    reports that)."""
    try:
        files = json.loads((folder / "state.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    for fname, sha in (files or {}).items() if isinstance(files, dict) else ():
        if not (folder / fname).is_file():
            return f"{fname} is missing"
        if sha and sha256_file(folder / fname) != sha:
            return f"{fname} is not the file its state.json names (sha256)"
    return None


def _fetch(store, name: str, dest: Path, rels: list[str]) -> None:
    for rel in sorted(rels, key=_order):
        store.get(f"{name}/{rel}", dest / rel)


def no_run(store, name: str, where: str) -> NanorlError:
    """The error for a run `name` that the store does not hold, naming the runs it does hold."""
    runs = sorted({k.split("/", 1)[0] for k in store.list("") if k.endswith("/run.toml") and k.count("/") == 1})
    return NanorlError(
        f"no run {name!r} in {where} (no {name}/run.toml)",
        hint=f"runs there: {', '.join(runs)}" if runs else "nothing there has a run.toml: check the URL",
    )


def pull_run(
    store,
    name: str,
    dest: Path,
    stage: str | None = None,
    where: str = "the store",
    left_out: Callable[[str, str], None] | None = None,
) -> list[str]:
    """Download `<store>/<name>/` into `dest`; with `stage`, only what that stage's model needs (run.toml, the
    tokenizer and the stage's folder). Returns the files fetched. `where` names the store in errors.

    Every checkpoint fetched is checked against its state.json; one whose files disagree (caught while the run
    uploads it) is fetched again after a pause (`RETRY_WAITS`), and still disagreeing, a NanorlError; or, with
    `left_out`, its folder is removed from `dest` and `left_out(folder, why)` called: a run whose machine died
    while uploading a checkpoint still comes back whole up to that stage, which then resumes from its start."""
    keys = [k[len(name) + 1 :] for k in store.list(f"{name}/")]
    if "run.toml" not in keys:
        raise no_run(store, name, where)
    if stage is not None:
        if not any(k.startswith(f"{stage}/") for k in keys):
            have = sorted({k.split("/")[0] for k in keys if "/" in k})
            raise NanorlError(f"run {name!r} in {where} has no {stage} folder", hint=f"it has: {', '.join(have)}")
        if f"{stage}/state.json" not in keys:
            raise NanorlError(
                f"run {name!r} in {where} has no {stage} checkpoint yet (no {stage}/state.json)",
                hint="its first checkpoint is still to come, or its upload failed: pick a finished stage",
            )
        keys = [k for k in keys if k == "run.toml" or k.startswith(("tokenizer/", f"{stage}/"))]
    keys = sorted(keys, key=_order)
    _fetch(store, name, dest, keys)
    for folder in sorted({k.rpartition("/")[0] for k in keys if k.endswith("/state.json")}):
        for wait in (*RETRY_WAITS, None):
            why = checkpoint_mismatch(dest / folder)
            if why is None:
                break
            if wait is None and left_out is not None:
                shutil.rmtree(dest / folder)
                keys = [k for k in keys if not k.startswith(f"{folder}/")]
                left_out(folder, why)
                break
            if wait is None:
                raise NanorlError(
                    f"the {folder} checkpoint of run {name!r} in {where} is not whole: {why}",
                    hint="a run is uploading it: pull again in a minute (or push the run again from its machine)",
                )
            time.sleep(wait)
            again = [k[len(name) + 1 :] for k in store.list(f"{name}/{folder}/")]
            _fetch(store, name, dest, again)
            keys = sorted(set(keys) | set(again), key=_order)
    return keys


def list_runs(store) -> list[dict]:
    """The runs in a store: [{name, done: [stages with DONE], partial: [stages with a checkpoint, no DONE],
    files}], by name. A run is a top-level folder holding run.toml."""
    from nanorl.config import STAGES

    by_run: dict[str, set[str]] = {}
    for key in store.list(""):
        run, sep, rel = key.partition("/")
        if sep:
            by_run.setdefault(run, set()).add(rel)
    rows = []
    for run, rels in sorted(by_run.items()):
        if "run.toml" not in rels:
            continue
        done = [s for s in STAGES if f"{s}/DONE" in rels]
        partial = [s for s in STAGES if f"{s}/state.json" in rels and s not in done]
        rows.append({"name": run, "done": done, "partial": partial, "files": len(rels)})
    return rows


class Mirror:
    """A pipeline's run folder kept mirrored in a store (`checkpoint.store`); used on rank 0 only.

    `start()` sends the whole folder and raises on any failure (nothing is trained yet). `sync(folder)` sends
    what changed (in `folder` only, when given) and never raises: a failure is reported through `warn` and
    leaves the mirror `behind`. While behind, a sync sends everything that changed, in order, and is tried again
    only `retry_delay` seconds after the failure (doubling after each failure, at most 15 minutes): a store that
    is down costs a run a few timeouts an hour, not one per checkpoint. `forget(folder)` removes a folder's copy
    from the store (a stage run afresh: `DONE` first), before anything else is sent. `finish()` tries once more
    when behind and raises if the store still lacks files."""

    retry_delay = 60.0  # seconds after a first failure before the next try (doubled after each, to MAX_DELAY)
    MAX_DELAY = 900.0

    def __init__(self, store, run_dir: Path, name: str, url: str, warn: Callable[[str], None] = print):
        self.store, self.run_dir, self.name, self.url, self.warn = store, Path(run_dir), name, url, warn
        self.seen: dict[str, tuple] = {}  # sent: {file: (size, mtime)}
        self.known: set[str] = set()  # the files the store holds of this run (listed at the start, and sent)
        self.pending: list[str] = []  # removals not made yet
        self.behind: str | None = None  # why the last sync failed
        self._failures = 0
        self._next_try = 0.0

    def start(self) -> None:
        """Send the whole run folder (a failure raises), less the checkpoints the store holds already: those whose
        state.json there is this one (which names the tensor files by sha256: they are the same)."""
        self.known = {k[len(self.name) + 1 :] for k in self.store.list(f"{self.name}/")}
        for state in [r for r in run_files(self.run_dir) if r.endswith("/state.json") and r in self.known]:
            folder = state.rpartition("/")[0]
            local = self.run_dir / state
            try:
                names = list(json.loads(local.read_text()).get("files") or {})
            except (OSError, ValueError, AttributeError):
                continue
            if not all(f"{folder}/{n}" in self.known and (self.run_dir / folder / n).is_file() for n in names):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                self.store.get(f"{self.name}/{state}", Path(tmp) / "state.json")
                same = (Path(tmp) / "state.json").read_bytes() == local.read_bytes()
            if same:
                for rel in [state, *(f"{folder}/{n}" for n in names)]:
                    st = (self.run_dir / rel).stat()
                    self.seen[rel] = (st.st_size, st.st_mtime_ns)
        self._sync(None)

    def _sync(self, folder: str | None) -> None:
        for rel in list(self.pending):  # before anything is sent: a stale DONE must not vouch for new files
            if not (self.run_dir / rel).is_file():
                self.store.delete(f"{self.name}/{rel}")
                self.known.discard(rel)
            self.pending.remove(rel)
        sent = push_run(self.run_dir, self.store, self.name, seen=self.seen, folder=folder)
        self.known |= set(sent)
        # a state.json just sent vouches for its folder: tensor files it no longer names (a final checkpoint's
        # optimizer state) go now, not before, so a reader never finds a state naming a file that is gone
        for state in [r for r in sent if r.endswith("/state.json")]:
            d = state.rpartition("/")[0]
            for rel in (f"{d}/{f}" for f in TENSOR_FILES):
                if rel in self.known and not (self.run_dir / rel).is_file():
                    self.store.delete(f"{self.name}/{rel}")
                    self.known.discard(rel)

    def sync(self, folder: str | None = None, force: bool = False) -> bool:
        """Send what changed; False (and a warning) when the store failed, or when behind and not yet due for
        another try (`force`: try now)."""
        if self.behind is not None and not force and time.monotonic() < self._next_try:
            return False
        try:
            self._sync(None if self.behind else folder)  # behind: all of it, in order
        except NanorlError as e:
            first = self.behind is None
            self.behind = e.message
            delay = min(self.retry_delay * 2**self._failures, self.MAX_DELAY)
            self._failures += 1
            self._next_try = time.monotonic() + delay
            wait = f"next try in {delay / 60:.0f} min, at a checkpoint or a stage's end"
            if first:
                self.warn(f"warning: the mirror in {self.url} is behind: {e}. Training goes on; {wait}.")
            else:
                self.warn(f"warning: the mirror in {self.url} is still behind ({wait}): {e.message}")
            return False
        self._failures = 0
        if self.behind is not None:
            self.behind = None
            self.warn(f"the mirror in {self.url} caught up")
        return True

    def forget(self, folder: str, names: tuple[str, ...] | None = None) -> None:
        """Remove the store's copy of `folder` (only its files `names`, when given): DONE first, state.json next.
        What fails now is removed before the next sync sends anything."""
        prefix = f"{folder}/"
        rels = {r for r in self.known | set(self.seen) if r.startswith(prefix)}
        rels = {r for r in rels if names is None or r[len(prefix) :] in names}
        for rel in sorted(rels, key=_order, reverse=True):
            self.seen.pop(rel, None)
            if rel not in self.pending:
                self.pending.append(rel)
        self.sync(folder)

    def finish(self) -> None:
        """The end of the run: one more try when behind, then a NanorlError if the store still lacks files."""
        if self.behind is None or self.sync(force=True):
            return
        raise NanorlError(
            f"run {self.name} finished, but its mirror in {self.url} is behind ({self.behind})",
            hint=f"the run is whole here: send it with `nanorl runs push {self.name} {self.url}`",
        )


def split_url(url: str) -> tuple[str, str, str | None]:
    """s3://bucket/prefix/RUN[/STAGE] -> (store URL, run name, stage or None). A last part that is not a stage
    name is the run."""
    from nanorl.config import STAGES

    parts = url.rstrip("/").split("/")
    stage = parts.pop() if parts[-1] in STAGES else None
    if len(parts) < 4 or not parts[-1]:  # s3: '' bucket RUN
        raise NanorlError(
            f"{url!r} names no run", hint="s3://bucket/prefix/RUN or s3://bucket/prefix/RUN/STAGE", exit_code=2
        )
    return "/".join(parts[:-1]), parts[-1], stage
