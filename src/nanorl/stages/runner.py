"""The stage runner: tokenizer -> base -> mid -> sft -> rl -> eval -> report, into runs/<name>/.

- A stage whose folder has a `DONE` marker is skipped on a re-run; one without it resumes from its last
  checkpoint (the stages themselves look for it).
- `from_stage`: run that stage and every later one afresh (their DONE markers and checkpoints are removed).
- `only`: run just that stage (afresh); the stages it needs must have finished.
- `steps`: {stage: N} sets that stage's step count (a shorter run, same schedule shape).
- Before anything is written or deleted, the config (with `steps`) is validated.
- The resolved config is written to run.toml. A re-run whose model section differs from the run.toml on disk is
  refused (its checkpoints would not fit); anything else may change between runs (more steps, other eval).

With `checkpoint.store` the run folder is mirrored to the store at the start and after every stage
(`Context.mirror_run`; checkpoints go as they are saved), so a run survives the loss of its machine.

Distributed: under torchrun every rank runs the same stages (the data is sharded per rank); rank 0 writes files.
The tokenizer stage runs on rank 0 while the other ranks wait at a barrier. The process group is destroyed at
exit once the pipeline finished (nanorl.device.dist_finished); after an error the process just exits, and
torchrun stops the other ranks.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from nanorl import checkpoint as ckpt
from nanorl.api import NanorlError
from nanorl.config import RunConfig, config_hash, from_toml_file, run_dir, validate, write_run_config
from nanorl.stages.common import STAGES, Context


def run_tokenizer(ctx: Context) -> dict[str, Any]:
    from nanorl.data import open_corpus
    from nanorl.tokenizer import train_tokenizer

    cfg = ctx.cfg
    info = ctx.info("tokenizer", 1)
    ctx.bus.stage_start(info)
    t0 = time.time()
    corpus = open_corpus(cfg.data.corpus, task=ctx.task, skip_bad=cfg.data.skip_bad)
    tok = train_tokenizer(
        corpus.docs(),
        cfg.model.vocab_size,
        max_digits=cfg.tokenizer.max_digits,
        max_chars=cfg.tokenizer.train_chars,
    )
    tok.save(ctx.stage_dir("tokenizer"))
    ctx._tokenizer = None
    metrics = {
        "vocab_size": tok.vocab_size,
        "seconds": time.time() - t0,
        **(getattr(tok, "trained_on", None) or {}),
    }
    ctx.bus.log("tokenizer", 1, metrics)
    ctx.bus.stage_end(info, metrics)
    return metrics


def run_report(ctx: Context) -> dict[str, Any]:
    from nanorl.report import write_report

    path = write_report(ctx.run_dir)
    return {"report": str(path)}


def _stage_fn(stage: str):
    if stage == "tokenizer":
        return run_tokenizer
    if stage == "report":
        return run_report
    import importlib

    return importlib.import_module(f"nanorl.stages.{stage}").run


def make_context(cfg: RunConfig, stop_after=None, init_from=None, console=None, folder: Path | None = None) -> Context:
    """The context of run `cfg.name`, in $NANORL_HOME/runs/<name> or `folder` (a run folder elsewhere: eval)."""
    import torch

    from nanorl.device import compute_dtype, dist_setup, keep_freed_memory, resolve_device, use_device
    from nanorl.plugins import get_plugins
    from nanorl.telemetry import Telemetry

    device = resolve_device(cfg.device)
    use_device(device)  # the current CUDA device: Triton launches its kernels there, not on their tensors' device
    rank, local_rank, world = dist_setup(device)  # the backend follows the device (nccl for CUDA, gloo for the CPU)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same on every rank: the model's init must agree across ranks
    d = folder or run_dir(cfg.name)
    bus = Telemetry(d, cfg, rank=rank, console=console)
    return Context(
        cfg=cfg, run_dir=d, device=device, dtype=compute_dtype(device, cfg.dtype), bus=bus,
        task=get_plugins().task(cfg.task), rank=rank, local_rank=local_rank, world_size=world,
        stop_after=dict(stop_after or {}), init_from=dict(init_from or {}),
    )  # fmt: skip


def read_run_config(path: Path) -> RunConfig:
    """A run folder's run.toml (`nanorl.config.from_toml_file`); an error in it names the file."""
    try:
        return from_toml_file(path)
    except NanorlError as e:
        if str(path) in e.message:
            raise
        hint = f"correct the value in {path}" + (f" ({e.hint})" if e.hint else "")
        raise NanorlError(f"{path}: {e.message}", hint=hint, exit_code=e.exit_code) from None


def check_run_config(cfg: RunConfig) -> None:
    """Refuse to reuse a run folder whose checkpoints were made for another model or task."""
    path = run_dir(cfg.name) / "run.toml"
    if not path.is_file():
        return
    try:
        old = from_toml_file(path)
    except NanorlError:
        return  # an unreadable run.toml is replaced; the checkpoints' own hashes still guard them
    if config_hash(old, ("model",)) != config_hash(cfg, ("model",)) or old.task != cfg.task:
        raise NanorlError(
            f"run {cfg.name!r} exists with another model or task (see {path})",
            hint="choose another --name, or delete the run folder to start over",
            exit_code=2,
        )


def clear_stage(ctx: Context, stage: str) -> None:
    if ctx.rank == 0:
        d = ctx.stage_dir(stage)
        if d.is_dir():
            shutil.rmtree(d)


def run_pipeline(
    cfg: RunConfig,
    from_stage: str | None = None,
    only: str | None = None,
    steps: dict[str, int] | None = None,
    stop_after: dict[str, int] | None = None,
    init_from: dict[str, Path] | None = None,
    console=None,
) -> dict[str, Any]:
    """Run the pipeline (or part of it); returns {stage: summary or "skipped"}."""
    from nanorl.device import barrier, dist_finished

    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise NanorlError(f"{name} {value!r} is not a stage ({', '.join(STAGES)})", exit_code=2)
    for stage, n in (steps or {}).items():
        section = getattr(cfg, stage, None) if stage in ("base", "mid", "sft", "rl") else None
        if section is None:
            raise NanorlError(f"--steps {stage}={n}: only base, mid, sft and rl have steps", exit_code=2)
        section.steps = int(n)
    validate(cfg)  # the steps above included: nothing invalid reaches run.toml
    check_run_config(cfg)
    if only:
        todo = [only]
    elif from_stage:
        todo = list(STAGES[STAGES.index(from_stage) :])
    else:
        todo = list(STAGES)
    fresh = set(todo) if (only or from_stage) else set()
    dist_finished(False)  # until the stages below finish, an exit (an error) does not wait on the other ranks
    ctx = make_context(cfg, stop_after, init_from, console)
    if ctx.rank == 0:
        write_run_config(cfg)
        ctx.mirror_run()
    barrier()
    results: dict[str, Any] = {}
    try:
        for stage in todo:
            sdir = ctx.stage_dir(stage)
            if stage in fresh:
                clear_stage(ctx, stage)
                barrier()
            elif stage != "report" and ckpt.is_done(sdir):
                results[stage] = "skipped"
                if ctx.rank == 0:
                    ctx.bus.console.print(f"[dim]{stage}: done already, skipped[/]", highlight=False)
                continue
            t0 = time.time()
            if stage == "tokenizer" and ctx.rank != 0:
                summary = {}  # rank 0 trains and writes it; the others read it after the barrier below
            else:
                summary = _stage_fn(stage)(ctx)
            summary = dict(summary or {})
            summary["wall_s"] = time.time() - t0
            results[stage] = summary
            if stage != "report":
                ckpt.mark_done(sdir, ctx.rank, {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            ctx.mirror_run()
            barrier()
    finally:
        ctx.bus.close()
    dist_finished()  # every stage finished on every rank: the process group is left cleanly at exit
    return results
