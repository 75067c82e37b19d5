"""A whole run in a store: what lets a run outlive the machine that trained it.

A run lives in a store under `<store>/<run name>/<path in the run folder>`: the same keys under which every
checkpoint is mirrored (`checkpoint.store`), so a mirrored run and a pushed one look alike, and
`nanorl runs pull` (or `nanorl eval --checkpoint s3://...`) gets back a folder every command can use.

- `push_run` uploads a run folder's files. The pipeline calls it after each stage when `checkpoint.store` is set
  (`seen` then skips what is unchanged, and the checkpoints, which `checkpoint.save` mirrors as it writes them),
  so the tokenizer, run.toml, DONE markers, metrics.jsonl, eval/*.json and report.md reach the store too.
- `pull_run` downloads a run (or the parts of it one stage needs) into a folder.

Within a folder, tensor files go before `state.json` and `DONE` (which name them), both ways: a reader never
finds a marker or a state whose files are not there yet.
"""

from __future__ import annotations

from pathlib import Path

from nanorl.api import NanorlError

CHECKPOINT_FILES = ("model.safetensors", "optim.safetensors", "state.json")
LAST = ("state.json", "DONE")  # written last in a folder: they vouch for the files beside them


def _order(rel: str) -> tuple:
    folder, _, name = rel.rpartition("/")
    return (folder, name in LAST, LAST.index(name) if name in LAST else 0, name)


def run_files(run_dir: Path) -> list[str]:
    """The files of a run folder, relative, in upload order (no half-written `*.tmp`)."""
    rels = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".tmp"]
    return sorted(rels, key=_order)


def push_run(
    run_dir: Path, store, name: str, *, skip_checkpoints: bool = False, seen: dict[str, tuple] | None = None
) -> list[str]:
    """Upload the run folder to `<store>/<name>/`; returns the files sent.

    `skip_checkpoints`: leave out the stage folders' checkpoint files (the pipeline mirrors those as it saves).
    `seen`: {file: (size, mtime)} of what was sent already; unchanged files are skipped, and it is updated."""
    sent = []
    for rel in run_files(run_dir):
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


def pull_run(store, name: str, dest: Path, stage: str | None = None, where: str = "the store") -> list[str]:
    """Download `<store>/<name>/` into `dest`; with `stage`, only what that stage's model needs (run.toml, the
    tokenizer and the stage's folder). Returns the files fetched. `where` names the store in errors."""
    keys = [k[len(name) + 1 :] for k in store.list(f"{name}/")]
    if "run.toml" not in keys:
        runs = sorted({k.split("/", 1)[0] for k in store.list("") if k.endswith("/run.toml") and k.count("/") == 1})
        raise NanorlError(
            f"no run {name!r} in {where} (no {name}/run.toml)",
            hint=f"runs there: {', '.join(runs)}" if runs else "nothing there has a run.toml: check the URL",
        )
    if stage is not None:
        if not any(k.startswith(f"{stage}/") for k in keys):
            have = sorted({k.split("/")[0] for k in keys if "/" in k})
            raise NanorlError(f"run {name!r} in {where} has no {stage} folder", hint=f"it has: {', '.join(have)}")
        keys = [k for k in keys if k == "run.toml" or k.startswith(("tokenizer/", f"{stage}/"))]
    keys = sorted(keys, key=_order)
    for rel in keys:
        store.get(f"{name}/{rel}", dest / rel)
    return keys


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
