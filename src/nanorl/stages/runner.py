"""The stage runner: tokenizer -> base -> mid -> sft -> rl -> eval -> report, into runs/<name>/.

- A stage whose folder has a `DONE` marker is skipped on a re-run; one without it resumes from its last
  checkpoint (the stages themselves look for it).
- `from_stage`: run that stage and every later one afresh (their DONE markers and checkpoints are removed, all
  before the first of them runs; of eval only its DONE marker: the stage rewrites its own files, and those
  `nanorl eval` wrote there stay).
- `only`: run just that stage (afresh); the stages it needs must have finished. `only="eval"` rebuilds the
  report after it.
- `steps`: {stage: N} sets that stage's step count (a shorter run, same schedule shape).
- Before anything is written or deleted, the config (with `steps`) is validated and the inputs of the stages
  about to run are checked (`preflight`): the task, the rewards (rl), the task's data, the stages they
  need, and `checkpoint.store`; a typo fails there, not after a finished stage has been removed.
- The resolved config is written to run.toml. A re-run whose model section differs from the run.toml on disk is
  refused (its checkpoints would not fit); anything else may change between runs (more steps, other eval), and
  the console says which values changed.

With `checkpoint.store` the run folder is mirrored to the store at the start and after every stage
(`Context.mirror_run`; checkpoints go as they are saved), so a run survives the loss of its machine. The store is
checked in the preflight; a failed upload later does not stop training (the console says the mirror is behind,
later syncs catch up), but a run that ends with its mirror behind fails (`nanorl.store.runs.Mirror`).

Distributed: under torchrun every rank runs the same stages (the data is sharded per rank); rank 0 writes files.
The tokenizer stage runs on rank 0 while the other ranks wait at a barrier. The process group is destroyed at
exit once the pipeline finished (nanorl.device.dist_finished); after an error the process just exits, and
torchrun stops the other ranks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from nanorl import checkpoint as ckpt
from nanorl.api import Example, NanorlError, Task
from nanorl.config import (
    MODEL_STAGES,
    SECTIONS,
    STAGES,
    RunConfig,
    config_hash,
    from_toml_file,
    run_dir,
    validate,
    write_run_config,
)
from nanorl.runlock import run_lock
from nanorl.stages.common import Context, Stopped, StopSignal


def run_tokenizer(ctx: Context) -> dict[str, Any]:
    """Train the run's tokenizer (FineWeb shards the run needs are downloaded first: `data.fineweb_shards`). Model
    stages trained with a previous tokenizer of this run are cleared: their checkpoints could not be loaded."""
    from nanorl.data.prepare import train_run_tokenizer

    cfg = ctx.cfg
    corpus = f"the {cfg.task} task's text" if cfg.data.corpus == "task" else cfg.data.corpus
    what = f"a {cfg.model.vocab_size:,}-token BPE on {corpus} (at most {cfg.tokenizer.train_chars:,} characters)"
    info = ctx.info("tokenizer", 1, what)
    ctx.bus.stage_start(info)
    t0 = time.time()
    tok = train_run_tokenizer(ctx.cfg, ctx.task, ctx.stage_dir("tokenizer"), console=ctx.bus.console)
    ctx._tokenizer = None
    stale = ctx.stale_model_stages()
    for stage in stale:
        clear_stage(ctx, stage)
    if stale:
        clear_stage(ctx, "eval")
        ctx.bus.console.print(
            f"[yellow]tokenizer changed: cleared {', '.join(stale)} (trained with the previous one)[/]",
            highlight=False,
        )
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

    if ctx.rank != 0:  # one writer: the other ranks would race it for the same file
        return {"report": str(ctx.run_dir / "report.md")}
    path = write_report(ctx.run_dir)
    return {"report": str(path)}


def _stage_fn(stage: str):
    if stage == "tokenizer":
        return run_tokenizer
    if stage == "report":
        return run_report
    import importlib

    return importlib.import_module(f"nanorl.stages.{stage}").run


def make_context(
    cfg: RunConfig, stop_after=None, init_from=None, console=None, folder: Path | None = None, task: Task | None = None
) -> Context:
    """The context of run `cfg.name`, in $NANORL_HOME/runs/<name> or `folder` (a run folder elsewhere: eval);
    `task`: the run's task when the caller looked it up already."""
    import torch

    from nanorl.device import compute_dtype, dist_setup, keep_freed_memory, resolve_device, use_device
    from nanorl.plugins import get_plugins
    from nanorl.telemetry import Telemetry

    # the task first: an unknown one is an error before the telemetry creates the run folder (metrics.jsonl)
    task = task or get_plugins().task(cfg.task)
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
        task=task, rank=rank, local_rank=local_rank, world_size=world,
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


def check_run_config(cfg: RunConfig) -> RunConfig | None:
    """Refuse to reuse a run folder whose checkpoints were made for another model or task; returns the config on
    disk (None: no run.toml, or one that cannot be read)."""
    path = run_dir(cfg.name) / "run.toml"
    if not path.is_file():
        return None
    try:
        old = from_toml_file(path)
    except NanorlError:
        return None  # an unreadable run.toml is replaced; the checkpoints' own hashes still guard them
    if config_hash(old, ("model",)) != config_hash(cfg, ("model",)) or old.task != cfg.task:
        raise NanorlError(
            f"run {cfg.name!r} exists with another model or task (see {path})",
            hint="choose another --name, or delete the run folder to start over",
            exit_code=2,
        )
    return old


def _shown(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, (str, list, dict)) else str(v)


def changed_values(old: RunConfig, new: RunConfig) -> list[str]:
    """The values of run.toml that `new` changes, as "key old -> new" (in the model section only the attention
    backend can change: check_run_config refuses the rest, which config_hash covers)."""
    a, b = old.to_dict(), new.to_dict()
    pairs = [(k, a.get(k), v) for k, v in b.items() if k not in SECTIONS]
    for s in SECTIONS:
        pairs += [(f"{s}.{k}", a[s].get(k), v) for k, v in b[s].items()]
    return [f"{key} {_shown(x)} -> {_shown(y)}" for key, x, y in pairs if x != y]


def stages_to_run(d: Path, todo: list[str], fresh: set[str]) -> list[str]:
    """The stages of `todo` that will run: the fresh ones, those without DONE, and the report (always)."""
    return [s for s in todo if s in fresh or s == "report" or not ckpt.is_done(d / s)]


def preflight(
    cfg: RunConfig, stages: list[str], init_from: dict[str, Path] | None = None
) -> tuple[Task, dict[str, list[Example]]]:
    """Check what `stages` (the stages about to run) need, before anything is written or deleted: the task; the
    corpus (tokenizer, base: that it exists, unless the run downloads it: FineWeb with data.fineweb_shards > 0);
    the rewards (rl); the task's data (the train split for mid, sft and rl, dev for sft's validation, the eval
    splits for eval) and `data.chat` (mid); and the stages they start from (the tokenizer, an earlier model
    stage), finished or about to run; and `checkpoint.store` (`check_store`). Returns the task and the examples
    loaded (for the Context's cache)."""
    from nanorl.plugins import get_plugins

    task = get_plugins().task(cfg.task)
    # FineWeb shards the run downloads itself (data.fineweb_shards > 0) need not be on disk yet
    fetched = cfg.data.corpus == "fineweb" and cfg.data.fineweb_shards > 0
    if ("tokenizer" in stages or "base" in stages) and not fetched:
        from nanorl.data import open_corpus

        # the files are read later, lazily
        open_corpus(cfg.data.corpus, task=task, skip_bad=cfg.data.skip_bad, data_dir=cfg.data.data_dir or None)
    if "rl" in stages:
        from nanorl.stages import rl

        rl.resolve_rewards(cfg, task)
    splits = []
    if set(stages) & {"mid", "sft", "rl"}:
        splits.append("train")
    if "sft" in stages:
        splits.append("dev")
    if "eval" in stages:
        splits += cfg.eval.splits
    data = {split: task.load(split, cfg.data.data_dir or None) for split in dict.fromkeys(splits)}
    if "mid" in stages and cfg.data.chat:
        from nanorl.stages.mid import chat_conversations

        chat_conversations(cfg.data.chat)  # there, and every line a conversation (else a NanorlError naming it)

    d = run_dir(cfg.name)
    ready = {s for s in STAGES if s in stages or ckpt.is_done(d / s)}
    needs_tokenizer = [s for s in stages if s not in ("tokenizer", "report")]
    if needs_tokenizer and "tokenizer" not in ready:
        raise NanorlError(
            f"stage {needs_tokenizer[0]} needs the tokenizer, and run {cfg.name} has none finished",
            hint="run the pipeline from the start (without --only or --from)",
            exit_code=2,
        )
    for stage in stages:
        if stage not in ("mid", "sft", "rl", "eval") or stage in (init_from or {}):
            continue
        earlier = MODEL_STAGES[: MODEL_STAGES.index(stage)] if stage in MODEL_STAGES else MODEL_STAGES
        if not ready & set(earlier):
            raise NanorlError(
                f"stage {stage} needs a trained model, and no earlier stage of run {cfg.name} has finished",
                hint="run the pipeline from the start (nanorl pipeline ...) or give --checkpoint",
                exit_code=2,
            )
    for stage, source in (init_from or {}).items():
        if stage in stages:
            check_start_checkpoint(cfg, source, tokenizer_ready="tokenizer" not in stages and "tokenizer" in ready)
    check_store(cfg)
    return task, data


def check_start_checkpoint(cfg: RunConfig, source: Path, tokenizer_ready: bool = True) -> None:
    """A checkpoint a stage starts from (`nanorl train STAGE --checkpoint`), checked as the stage will load it:
    this run's architecture (config hash) and tokenizer (fingerprint; when the run's tokenizer is finished). Done
    in `preflight`, before the stage's old output is cleared: found when loading, the mismatch would leave the run
    without the stage it had."""
    state = ckpt.read_state(source)
    if state is None:
        raise NanorlError(
            f"no checkpoint in {source} (no {ckpt.STATE_FILE})", hint="give a finished stage", exit_code=2
        )
    saved = state.get("config_hash")
    if saved and saved != config_hash(cfg, ("model",)):
        theirs = source.parent / "run.toml"
        diff = ""
        if theirs.is_file():
            a, b = from_toml_file(theirs).model, cfg.model
            diff = ", ".join(
                f"model.{k} {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in vars(b) if getattr(a, k) != getattr(b, k)
            )
        raise NanorlError(
            f"checkpoint {source} is of another model than run {cfg.name}'s" + (f" ({diff})" if diff else ""),
            hint=f"start from a checkpoint of a run with the same model settings (`nanorl runs show {cfg.name}`"
            " shows them), or train it in a new run: nanorl pipeline --name NEW ...",
            exit_code=2,
        )
    if tokenizer_ready:
        from nanorl.tokenizer import Tokenizer

        fingerprint = Tokenizer.load(run_dir(cfg.name) / "tokenizer").fingerprint
        try:
            ckpt.check_tokenizer(source, state, fingerprint, run=cfg.name)
        except NanorlError as e:
            e.exit_code = 2  # the checkpoint given is the problem: bad input
            raise


def check_store(cfg: RunConfig) -> None:
    """`checkpoint.store`, before anything is trained: the URL, then one quick request (credentials, bucket,
    endpoint), each failure one line saying what to fix. A store holding a run of this name that this machine
    lacks is refused too: mirroring into it would mix two runs' files (pull it first to resume it)."""
    if not cfg.checkpoint.store:
        return
    from nanorl.store import open_store

    url = cfg.checkpoint.store.rstrip("/")
    store = open_store(url)
    store.check()
    if not (run_dir(cfg.name) / "run.toml").is_file() and store.exists(f"{cfg.name}/run.toml"):
        raise NanorlError(
            f"{url} holds a run {cfg.name!r} already, and this machine has none: this run would mix its files"
            " with that one's",
            hint=f"to resume it, pull it first (nanorl runs pull {url}/{cfg.name}); else name this run otherwise"
            " (--name)",
            exit_code=2,
        )


def check_shared_runs(cfg: RunConfig) -> None:
    """Under torchrun, that every rank sees the runs folder rank 0 writes (`$NANORL_HOME/runs`): rank 0 alone
    writes the tokenizer, checkpoints and DONE markers, and every rank reads them. On one machine it always
    does; a run on several needs that folder on a disk they share, and a node that does not see it would fail
    (or skip, or resume) alone. Rank 0 writes a probe file with a fresh token there, the others look for it: a
    rank that does not find it stops every rank with one error naming its machine. A no-op in one process."""
    from nanorl.device import all_gather_objects, is_distributed

    if not is_distributed():
        return
    import secrets

    import torch.distributed as dist

    runs = run_dir(cfg.name).parent
    token = all_gather_objects(secrets.token_hex(8))[0]  # rank 0's, on every rank
    probe = runs / f".shared-{token}"
    failed = None
    if dist.get_rank() == 0:
        try:
            runs.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
        except OSError as e:
            failed = f"{runs} cannot be written ({e.strerror or e})"
    failed = all_gather_objects(failed)[0]  # a barrier too: the probe is written before any rank looks
    if failed is not None:
        raise NanorlError(f"rank 0: {failed}", hint="set NANORL_HOME to a folder this user can write")
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    seen_by = all_gather_objects((seen, socket.gethostname(), str(runs)))  # a barrier too: every rank looked
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host, _) in enumerate(seen_by) if not ok]
    if blind:
        rank, host = blind[0]
        _, host0, runs0 = seen_by[0]
        raise NanorlError(
            f"rank {rank} (on {host}) does not see the runs folder that rank 0 (on {host0}) writes, {runs0}:"
            " a run on several machines needs it on a disk they all share",
            hint="set NANORL_HOME on every machine to a folder on a shared filesystem (NFS, a cluster disk);"
            " docs/training.md, 'Several machines'",
            exit_code=2,
        )


def warn_if_sized_for_a_gpu(ctx: Context) -> None:
    """A depth >= 8 model with the default (GPU-sized) steps on the CPU: say so (a user may mean it)."""
    cfg = ctx.cfg
    tokens = cfg.base.total_batch_tokens
    if ctx.device.type != "cpu" or cfg.model.depth < 8 or tokens != RunConfig().base.total_batch_tokens:
        return
    ctx.bus.console.print(
        f"[yellow]warning:[/] a depth-{cfg.model.depth} model with {tokens:,}-token steps is sized for a GPU, and"
        " this run is on the CPU: a step takes minutes and the run days (a CPU run: --preset tiny)",
        highlight=False,
    )


def clear_stage(ctx: Context, stage: str) -> None:
    """Remove a stage's output before it runs afresh: a model stage's folder, the report, and every evaluation of
    a model stage being replaced (`eval/*.json` whose "stage" it is, the eval stage's or `nanorl eval`'s: its
    model is gone); of the eval stage only its DONE (its files are its models'). metrics.jsonl gets a "clear"
    record, so that `runs show` and the report stop showing the stage's old figures."""
    if ctx.rank != 0:
        return
    d = ctx.stage_dir(stage)
    if stage == "eval":
        (d / ckpt.DONE_FILE).unlink(missing_ok=True)
    elif stage == "report":
        for name in ("report.md", "report_curves.png"):
            (ctx.run_dir / name).unlink(missing_ok=True)
    elif d.is_dir():
        shutil.rmtree(d)
    stale = []
    if stage in MODEL_STAGES:
        for path in sorted((ctx.run_dir / "eval").glob("*.json")):
            try:
                of = json.loads(path.read_text()).get("stage")
            except (OSError, ValueError, AttributeError):
                continue  # not an evaluation of ours: left alone
            if of == stage:
                path.unlink()
                stale.append(path.name)
    # an evaluation removed: the eval stage is not done any more (`nanorl train rl` re-ran RL alone, as --only
    # does), so that the next `nanorl pipeline` evaluates the new model instead of skipping the stage
    unmark_eval = bool(stale) and ckpt.is_done(ctx.stage_dir("eval"))
    if unmark_eval:
        (ctx.stage_dir("eval") / ckpt.DONE_FILE).unlink()
    ctx.bus.cleared(stage)
    if ctx.mirror is not None:  # the store's copy goes too (DONE first): a pull must not find it finished
        if stage != "report":  # (report.md is replaced when the report stage runs)
            ctx.mirror.forget(stage, (ckpt.DONE_FILE,) if stage == "eval" else None)
        if stale:
            ctx.mirror.forget("eval", ((ckpt.DONE_FILE,) if unmark_eval else ()) + tuple(stale))


@contextlib.contextmanager
def stop_signals_handled(handler: StopSignal):
    """`handler` as the SIGTERM and SIGHUP handler while the block runs (in the main thread; elsewhere signals
    cannot be handled and keep their default: the process ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])  # (no SIGHUP on Windows)
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def run_pipeline(
    cfg: RunConfig,
    from_stage: str | None = None,
    only: str | None = None,
    steps: dict[str, int] | None = None,
    stop_after: dict[str, int] | None = None,
    init_from: dict[str, Path] | None = None,
    console=None,
) -> dict[str, Any]:
    """Run the pipeline (or part of it); returns {stage: summary or "skipped"}. One process at a time runs a given
    run (`run_lock`); a SIGTERM stops it with a checkpoint saved (`nanorl.stages.common.StopSignal`)."""
    from nanorl.device import dist_setup, resolve_device, together

    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise NanorlError(f"{name} {value!r} is not a stage ({', '.join(STAGES)})", exit_code=2)
    if from_stage and only:
        raise NanorlError(
            f"--only {only} and --from {from_stage} together: give one",
            hint="--only STAGE runs that stage alone; --from STAGE runs it and every later one",
            exit_code=2,
        )
    for stage, n in (steps or {}).items():
        section = getattr(cfg, stage, None) if stage in ("base", "mid", "sft", "rl") else None
        if section is None:
            raise NanorlError(f"--steps {stage}={n}: only base, mid, sft and rl have steps", exit_code=2)
        section.steps = int(n)
    validate(cfg)  # the steps above included: nothing invalid reaches run.toml
    if only:
        todo = [only] + (["report"] if only == "eval" else [])  # the report shows the new evaluation
    elif from_stage:
        todo = list(STAGES[STAGES.index(from_stage) :])
    else:
        todo = list(STAGES)
    fresh = {only} if only else set(todo) if from_stage else set()
    # Under torchrun the ranks join their process group first, so that what they read from disk before the
    # stages (run.toml, DONE markers, the task's data, the store) is checked together: a rank that fails alone
    # would leave the others waiting for it (in a run on several machines, until the group's timeout).
    dist_setup(resolve_device(cfg.device))
    check_shared_runs(cfg)

    def check() -> tuple[RunConfig | None, list[str], Task, dict[str, list[Example]]]:
        old = check_run_config(cfg)
        to_run = stages_to_run(run_dir(cfg.name), todo, fresh)
        return (old, to_run, *preflight(cfg, to_run, init_from))

    stop_signal = StopSignal()
    old, to_run, task, data = together(check)  # (before the lock: a bad input leaves no run folder behind)
    with contextlib.ExitStack() as held:
        together(held.enter_context, run_lock(run_dir(cfg.name)))  # rank 0's; a run in use stops every rank
        held.enter_context(stop_signals_handled(stop_signal))
        return _run_stages(cfg, old, todo, fresh, to_run, task, data, stop_after, init_from, console, stop_signal)


def _run_stages(cfg, old, todo, fresh, to_run, task, data, stop_after, init_from, console, stop_signal):
    """`run_pipeline` once the stages to run are known and checked, under the run's lock."""
    from nanorl.device import barrier, dist_finished

    dist_finished(False)  # until the stages below finish, an exit (an error) does not wait on the other ranks
    ctx = make_context(cfg, stop_after, init_from, console, task=task)
    ctx._data_cache.update(data)
    ctx.stop_signal = stop_signal
    if ctx.rank == 0:
        if set(to_run) & set(MODEL_STAGES):
            warn_if_sized_for_a_gpu(ctx)
        changed = changed_values(old, cfg) if old is not None else []
        if changed:
            ctx.bus.console.print(f"[dim]run.toml: {', '.join(changed)}[/]", highlight=False)
        write_run_config(cfg)
        # a checkpoint save the last run was stopped in is completed first (before the mirror sees its files)
        for stage in MODEL_STAGES:
            if ckpt.recover(ctx.stage_dir(stage)):
                step = (ckpt.read_state(ctx.stage_dir(stage)) or {}).get("step")
                ctx.bus.console.print(
                    f"[dim]{stage}: completed the checkpoint save (step {step}) that the last run was stopped in[/]",
                    highlight=False,
                )
        ctx.mirror_run(start=True)  # a store that fails now stops the run; later, a failure is a warning
    # The stages to run afresh are stale from now on, all of them at once: cleared only when its turn came, a
    # later stage kept its old DONE through an interruption on the way, and the resume (without --from) skipped
    # it, here and in the store, and kept results computed from the model being replaced.
    for stage in todo:
        if stage in fresh:
            clear_stage(ctx, stage)
    barrier()
    results: dict[str, Any] = {}
    try:
        for stage in todo:
            sdir = ctx.stage_dir(stage)
            if stage not in fresh and stage != "report" and ckpt.is_done(sdir):
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
            if stage != todo[-1] and ctx.stop_requested():  # a SIGTERM or SIGHUP during the stage's last step
                sig = ctx.stop_signal
                raise Stopped(f"stopped by {sig.name} after the {stage} stage finished", sig.exit_code)
    finally:
        ctx.bus.close()
    dist_finished()  # every stage finished on every rank: the process group is left cleanly at exit
    if ctx.mirror is not None:
        ctx.mirror.finish()  # still behind after one more try: an error naming the command that completes it
    return results
