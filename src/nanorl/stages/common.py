"""What every stage shares: the run context, model loading, the conversation loader, and the supervised loop.

`Context` holds the resolved config, the run folder, the device and the ranks, the metrics bus and the task.
`train_supervised` is the one training loop of base, mid and sft: gradient accumulation to the stage's
`total_batch_tokens`, the lr schedule, clipping, periodic validation and checkpoints, exact resume.

Data parallelism: every rank runs the same loop on its own shard of the data; after the backward passes of a
step the gradients are averaged across ranks with one all-reduce of a flat buffer (`sync_grads`), so every
rank takes the identical optimizer step. (Not the DistributedDataParallel wrapper: RL runs several forward
passes per backward with a shared-prompt cache, which DDP's reducer does not expect; one mechanism for all
stages.)
"""

from __future__ import annotations

import math
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanorl import checkpoint as ckpt
from nanorl.api import Example, NanorlError, StageInfo, Task
from nanorl.config import MODEL_STAGES, RunConfig, config_hash
from nanorl.device import (
    all_reduce_mean,
    any_rank,
    autocast,
    check_training_dtype,
    exact_dtype,
    is_distributed,
    raise_together,
    together,
)
from nanorl.optim import Optimizers, lr_schedule
from nanorl.telemetry import Telemetry


class Interrupted(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised by `stop_after` (tests): the process "dies" right after a step, as a kill would leave it."""


class Stopped(KeyboardInterrupt):
    """A signal stopped the run. The CLI prints the message and exits with `exit_code`: 128 + the signal's number,
    as a shell reports a process that a signal ended (SIGTERM: 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignal:
    """The SIGTERM and SIGHUP handler of a pipeline run. SIGTERM is what a cloud preemption, `timeout`, `docker
    stop` and a torchrun stopping its workers send, with a grace period before SIGKILL (torchrun: 30 s,
    --shutdown-timeout); SIGHUP, a closed terminal or a dropped ssh session (outside tmux).

    While a training stage's steps run (`console` set), the first such signal lets the current step finish: the
    stage then saves a checkpoint and the run stops (`Context.end_step`), so a resume loses nothing. Anywhere else
    (the tokenizer, eval, a model loading), or at a second signal, the run stops at once, from its last checkpoint.
    Ctrl-C (SIGINT) stays Python's KeyboardInterrupt: at once, anywhere. A stop in the middle of a checkpoint
    write leaves the previous checkpoint or the new one whole (checkpoint.py)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.console = None  # set while a training stage's steps run: a stop can wait for the step's end

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name  # (SIGTERM: another rank's signal)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def __call__(self, signum: int, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            detach_from_terminal()
        if self.requested or self.console is None:
            raise Stopped(f"terminated ({signal.Signals(signum).name})", 128 + signum)
        self.signum = signum
        self.console.print(
            f"[yellow]{self.name}: saving a checkpoint at the end of this step, then stopping ({self.name} again or"
            " Ctrl-C: stop now)[/]",
            highlight=False,
        )


def detach_from_terminal() -> None:
    """After a hangup, writing to the terminal fails (EIO): the progress bar, a log line or the final message would
    raise in the middle of the step or its checkpoint save. Standard output and error that are a terminal are
    pointed at /dev/null instead (what nohup does; output sent to a file or a pipe is kept). metrics.jsonl keeps
    what the console would have shown."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:  # (not os.isatty: a terminal that hung up answers False)
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
            except OSError:  # a closed descriptor: nothing to write to anyway
                pass
    finally:
        os.close(null)


@dataclass
class Context:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    bus: Telemetry
    task: Task
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    stop_after: dict[str, int] = field(default_factory=dict)  # stage -> step (tests: simulate a crash)
    init_from: dict[str, Path] = field(default_factory=dict)  # stage -> checkpoint to start from (nanorl train)
    _tokenizer: Any = None
    _data_cache: dict[str, list[Example]] = field(default_factory=dict)
    _mirror: Any = None  # the run's Mirror in checkpoint.store (rank 0), made on first use
    _warned: set[str] = field(default_factory=set)  # the keys of warn_past_context's warnings given
    stop_signal: StopSignal = field(default_factory=StopSignal)  # the runner installs it as the SIGTERM handler
    _stopping: bool = False  # a SIGTERM stops the run at the end of this step (`checkpoint_due`, `end_step`)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    @property
    def model_hash(self) -> str:
        return config_hash(self.cfg, ("model",))

    def tokenizer(self):
        if self._tokenizer is None:
            from nanorl.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.stage_dir("tokenizer"))
        return self._tokenizer

    def engine(self, model):
        """The sampling engine of RL and eval: the task's tools, the run's dtype, and on the CPU the compiled decode
        step when engine.compile is set (a GPU decodes through fused kernels already)."""
        from nanorl.engine import Engine

        compile_ = self.cfg.engine.compile and self.device.type == "cpu"
        return Engine(model, self.tokenizer(), tools=self.task.tools(), dtype=self.dtype, compile=compile_)

    def examples(self, split: str) -> list[Example]:
        if split not in self._data_cache:
            self._data_cache[split] = self.task.load(split, self.cfg.data.data_dir or None)
        return self._data_cache[split]

    def new_model(self):
        from nanorl.model import GPT

        tok = self.tokenizer()
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise NanorlError(
                f"the tokenizer has {tok.vocab_size} tokens, more than model.vocab_size={self.cfg.model.vocab_size}",
                hint=f"set model.vocab_size to at least {tok.vocab_size}",
                exit_code=2,
            )
        with torch.device(self.device):
            model = GPT(self.cfg.model)
        model.init_weights()
        return model

    @property
    def tokenizer_fingerprint(self) -> str:
        """The run tokenizer's fingerprint: recorded in every checkpoint the run saves, and compared with the one a
        checkpoint recorded whenever the run loads it (a model trained with another tokenizer is refused)."""
        return self.tokenizer().fingerprint

    def load_checkpoint(self, directory: Path, model, optimizers=None, restore_rng: bool = False) -> dict[str, Any]:
        """`checkpoint.load` with this run's checks: the model's architecture (config hash) and its tokenizer."""
        state = ckpt.read_state(directory)
        if state is not None:  # checked here first for a hint that names the run
            ckpt.check_tokenizer(directory, state, self.tokenizer_fingerprint, run=self.cfg.name)
        return ckpt.load(
            directory,
            model,
            optimizers,
            config_hash=self.model_hash,
            restore_rng=restore_rng,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )

    def stale_model_stages(self) -> list[str]:
        """The model stages whose checkpoint was trained with a tokenizer other than the run's (after the tokenizer
        was retrained): loading them is refused, so they must be trained again (the runner can clear them)."""
        fingerprint = self.tokenizer_fingerprint
        stale = []
        for stage in MODEL_STAGES:
            state = ckpt.read_state(self.stage_dir(stage))
            if state is not None and state.get("tokenizer") not in (None, "", fingerprint):
                stale.append(stage)
        return stale

    def load_model(self, stage: str):
        """A model with the weights of `stage`'s checkpoint (or the `--checkpoint` given for it)."""
        model = self.new_model()
        self.load_checkpoint(self.init_from.get(stage, self.stage_dir(stage)), model)
        return model

    def previous_model(self, stage: str):
        """The model a stage starts from: `--checkpoint`, else the nearest earlier model stage that finished."""
        if stage in self.init_from:
            model = self.new_model()
            self.load_checkpoint(self.init_from[stage], model)
            return model
        earlier = MODEL_STAGES[: MODEL_STAGES.index(stage)] if stage in MODEL_STAGES else MODEL_STAGES
        for prev in reversed(earlier):
            if ckpt.is_done(self.stage_dir(prev)):
                return self.load_model(prev)
        if stage == "base":
            return self.new_model()
        raise NanorlError(
            f"stage {stage} needs a trained model, and no earlier stage of run {self.cfg.name} has finished",
            hint="run the pipeline from the start (nanorl pipeline ...) or give --checkpoint",
        )

    def info(self, stage: str, total_steps: int, description: str = "") -> StageInfo:
        """The StageInfo of `stage`; `description`: what a stage without training steps works on."""
        return StageInfo(
            self.cfg.name, str(self.run_dir), stage, self.cfg.task, self.cfg.to_dict(), total_steps, description
        )

    @property
    def mirror(self):
        """The run's `nanorl.store.runs.Mirror` in `checkpoint.store` on rank 0; None without a store, or on
        other ranks (only rank 0 writes)."""
        if self._mirror is None and self.cfg.checkpoint.store and self.rank == 0:
            from nanorl.store import open_store
            from nanorl.store.runs import Mirror

            def warn(msg: str) -> None:
                from rich.text import Text

                self.bus.console.print(Text(msg, style="yellow"), highlight=False, soft_wrap=True)

            url = self.cfg.checkpoint.store
            self._mirror = Mirror(open_store(url), self.run_dir, self.cfg.name, url.rstrip("/"), warn)
        return self._mirror

    def mirror_run(self, start: bool = False) -> None:
        """With `checkpoint.store`, send the run folder's new and changed files (run.toml, the tokenizer, the
        checkpoints, DONE markers, metrics, eval results, the report) to the store, so the run outlives its
        machine (`nanorl runs pull`). `start`: a failure is an error (nothing is trained yet); later it is a
        warning and the mirror catches up at the next checkpoint or stage end. Rank 0 only."""
        if self.mirror is None:
            return
        if start:
            self.mirror.start()
        else:
            self.mirror.sync()

    def stop_requested(self) -> bool:
        """Whether a SIGTERM asked the run to stop, on any rank (a collective under torchrun: every rank calls it at
        the same point and stops at the same step)."""
        asked = self.stop_signal.requested
        return any_rank(asked) if is_distributed() else asked

    def checkpoint_due(self, done: int, total: int, every: int) -> bool:
        """Whether the end of training step `done` of `total` saves a checkpoint: every `every` steps (0: never), and
        at the step during which a SIGTERM asked the run to stop (`end_step` then stops it); never after the last
        step (the stage's final checkpoint follows)."""
        self._stopping = done < total and self.stop_requested()
        return self._stopping or (done < total and every > 0 and done % every == 0)

    def end_step(self, stage: str, done: int) -> None:
        """After step `done` and its checkpoint: the two ways a run stops between steps, `stop_after` (tests: as a
        kill would leave it) and a SIGTERM (`checkpoint_due` saved the step's checkpoint; the run stops with
        `Stopped`). A SIGTERM during a stage's last step stops the run after the stage (the runner)."""
        if self.stop_after.get(stage) == done:
            raise Interrupted(f"{stage} stopped after step {done}")
        if self._stopping:
            sig = self.stop_signal
            raise Stopped(f"stopped by {sig.name}: {stage} saved its checkpoint at step {done}", sig.exit_code)

    def save(self, stage: str, model, optimizers, state: dict[str, Any]) -> None:
        ckpt.save(
            self.stage_dir(stage),
            model,
            optimizers,
            state,
            config_hash=self.model_hash,
            rank=self.rank,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )
        if self.mirror is not None:  # the checkpoint's files, then its state.json (a failure: a warning)
            self.mirror.sync(stage)


def to_device(rows: list[list], dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of equal-length rows on `device`, built on the host and copied in one transfer (pinned memory and
    an asynchronous copy on CUDA, so the host goes on while it travels)."""
    t = torch.tensor(rows, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def broadcast_params(model) -> None:
    """Every rank starts a stage from rank 0's weights (they agree already; this makes sure)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def sync_grads(params: list[torch.nn.Parameter], failed: bool = False) -> bool:
    """Average the gradients over ranks (one all-reduce of a flat buffer); a no-op in a single process.

    `failed`: this rank met an error while making its gradients. The flag travels in the same buffer, and the
    return value says whether any rank failed, the same on every rank: they all stop together (the caller
    raises with `raise_together`) instead of the healthy ones waiting for the failed one in their next
    collective until the process group's timeout."""
    if not is_distributed():
        return failed
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flag = torch.full((1,), float(failed), dtype=grads[0].dtype, device=grads[0].device)
    flat = all_reduce_mean(torch.cat([*(g.reshape(-1) for g in grads), flag]))
    offset = 0
    for p, g in zip(params, grads, strict=False):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return bool(flat[-1] > 0)


# ---- conversations as training rows (mid and sft) ----------------------------------------------------------
class ConversationLoader:
    """Rendered conversations -> (x, y) batches, deterministic for a seed, resumable by (epoch, position).

    Each row starts with a conversation's <|bos|> and holds whole conversations only (`packed`: as many as fit,
    mid; else one per row, sft); the rest of a row is padding whose targets are -1. `assistant_only`: the
    targets of every token but the assistant's (the tokenizer's loss mask) are -1 too. A conversation longer
    than a row is cut. Ranks take every world_size-th conversation of the shuffled order.
    """

    def __init__(
        self,
        rendered: list[tuple[list[int], list[int]]],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        *,
        packed: bool,
        assistant_only: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
    ):
        if not rendered:
            raise NanorlError("no conversations to train on", hint="check the task's train split")
        # every rank decides alike (the count is the same everywhere): a rank without a conversation would fail
        # alone while the others wait for it in their first collective
        if len(rendered) < world_size:
            raise NanorlError(
                f"{len(rendered)} conversations cannot be shared by {world_size} ranks (each needs one at least)",
                hint="run on fewer processes, or give the task more train examples",
            )
        self.rendered = rendered
        self.B, self.T = batch_size, seq_len
        self.pad_id = pad_id
        self.packed, self.assistant_only = packed, assistant_only
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = device
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rendered))
        return perm[self.rank :: self.world_size].tolist()

    def _next_conv(self) -> tuple[list[int], list[int]]:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._make_order()
        ids, mask = self.rendered[self._order[self.pos]]
        self.pos += 1
        return ids, mask

    def _peek_len(self) -> int:
        if self.pos >= len(self._order):
            return -1  # an epoch boundary closes the row (keeps resume simple)
        return len(self.rendered[self._order[self.pos]][0])

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.T + 1
        rows_x, rows_y = [], []
        for _ in range(self.B):
            ids: list[int] = []
            trained: list[int] = []
            while True:
                cid, cmask = self._next_conv()
                cid, cmask = cid[:L], cmask[:L]
                ids += cid
                trained += cmask if self.assistant_only else [1] * len(cid)
                n = self._peek_len()
                if not self.packed or n < 0 or len(ids) + n > L:
                    break
            rows_x.append(ids)
            rows_y.append([t if m else -1 for t, m in zip(ids, trained, strict=False)])
        # one conversation per row (sft): rows only as long as the batch's longest (less padding to compute)
        width = L if self.packed else max(len(r) for r in rows_x)
        for r in range(self.B):
            pad = width - len(rows_x[r])
            rows_x[r] = (rows_x[r] + [self.pad_id] * pad)[:-1]
            rows_y[r] = (rows_y[r] + [-1] * pad)[1:]
        return to_device(rows_x, torch.long, self.device), to_device(rows_y, torch.long, self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()


def render_examples(
    ctx: Context, examples: list[Example], seq_len: int, stage: str = ""
) -> list[tuple[list[int], list[int]]]:
    """Each example as the chat the task asks plus its SFT target: (ids, loss mask), cut to seq_len + 1 tokens.
    With `stage`, says how many were cut: a cut target loses its end, the answer line the task is scored on
    (AQuA at the tiny preset's 256 tokens: more than half of them), which nothing else would show."""
    tok, task = ctx.tokenizer(), ctx.task
    out, lengths = [], []
    for ex in examples:
        conv = [*task.prompt(ex), {"role": "assistant", "content": task.target(ex)}]
        ids, mask = tok.render_conversation(conv)
        lengths.append(len(ids))
        out.append((ids[: seq_len + 1], mask[: seq_len + 1]))
    cut = sum(n > seq_len + 1 for n in lengths)
    if stage and cut and ctx.rank == 0:
        ctx.bus.console.print(
            f"[yellow]{stage}: {cut} of {len(lengths)} examples are longer than model.seq_len={seq_len} tokens"
            f" (the longest {max(lengths)}) and are cut, their answer lines lost; raise model.seq_len[/]",
            highlight=False,
        )
    return out


def warn_past_context(ctx: Context, stage: str, prompts: list[list[int]], max_new_tokens: int, key: str) -> None:
    """Warn (once a stage, rank 0) when prompts plus `max_new_tokens` (the config key `key`) run past
    model.seq_len: the model never trained on rotary positions beyond it, so what it writes there is out of its
    training distribution and nothing else would say so (AQuA's prompts at the tiny preset's 256 tokens)."""
    seq_len = ctx.cfg.model.seq_len
    over = [len(p) for p in prompts if len(p) + max_new_tokens > seq_len]
    if not over or ctx.rank != 0 or stage in ctx._warned:
        return
    ctx._warned.add(stage)
    ctx.bus.console.print(
        f"[yellow]{stage}: {len(over)} of {len(prompts)} prompts (the longest {max(over)} tokens) plus {key}="
        f"{max_new_tokens} run past model.seq_len={seq_len}, the positions the model was trained on; raise"
        f" model.seq_len or lower {key}[/]",
        highlight=False,
    )


class HeldError:
    """The first exception this rank met in a step, held until a collective that carries its flag tells every
    rank, which then raise it together (`raise_together`): raised at once (a reward plugin that fails on one
    example, the engine, an out-of-memory error in the update), it would leave the other ranks waiting for this
    one in their next all-reduce until the process group's timeout."""

    def __init__(self) -> None:
        self.err: Exception | None = None

    @property
    def failed(self) -> bool:
        return self.err is not None

    def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, or None when it raises (the error is held) or an error is held already (then the
        rank does nothing more until the flag is raised: only the collectives)."""
        if self.err is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - raised again, on every rank, at the next flag
            self.err = e
            return None


# ---- the supervised loop -----------------------------------------------------------------------------------
# Rows per forward pass when device_batch_size is 0: on the CPU and MPS a size that keeps steps short (speed,
# not memory, is the limit there); on a CUDA GPU the most that fit (nanorl.model.counts.rows_that_fit), at most
# GPU_MAX_ROWS without a token target.
CPU_ROWS = 8
GPU_MAX_ROWS = 32


def rows_per_pass(ctx: Context, tcfg) -> int:
    """The most rows one forward pass may take: device_batch_size, or (0) what suits the device."""
    if tcfg.device_batch_size:
        return tcfg.device_batch_size
    if ctx.device.type != "cuda":
        return CPU_ROWS
    from nanorl.model.counts import rows_that_fit

    memory = torch.cuda.get_device_properties(ctx.device).total_memory
    mixed = ctx.dtype != torch.float32
    fit = rows_that_fit(ctx.cfg.model, memory, mixed=mixed)
    if fit < 1:
        raise NanorlError(
            f"a depth-{ctx.cfg.model.depth} model with rows of {ctx.cfg.model.seq_len} tokens does not fit a"
            f" training step in this GPU's {memory / 2**30:.0f} GiB (estimated; `nanorl model info` shows it)",
            hint="lower model.seq_len or model.depth, or use a GPU with more memory",
        )
    return fit if tcfg.total_batch_tokens else min(fit, GPU_MAX_ROWS)


def split_rows(rows: int, limit: int) -> tuple[int, int]:
    """(rows per pass, passes) for `rows` rows a step on one rank, at most `limit` a pass: the fewest passes,
    with all passes the same size when a few more passes allow it (256 rows, at most 28 a pass: 16 x 16, not
    10 x 26 = 260 rows), else the rows rounded up to a multiple of the passes."""
    fewest = math.ceil(rows / limit)
    exact = next((n for n in range(fewest, 2 * fewest + 1) if rows % n == 0), None)
    passes = exact or fewest
    return math.ceil(rows / passes), passes


def micro_batch(ctx: Context, stage: str) -> tuple[int, int]:
    """(rows per forward pass, micro-steps per optimizer step) for the supervised stage `stage`, announced on
    the console.

    With total_batch_tokens, every optimizer step sees that many tokens (rounded up to whole rows) whatever the
    number of ranks and the rows a device takes: one GPU accumulates what eight take in one pass, so a recipe
    trains the same model on either. Without it, a step is one pass of rows_per_pass rows per rank."""
    tcfg = getattr(ctx.cfg, stage)
    limit = rows_per_pass(ctx, tcfg)
    T = ctx.cfg.model.seq_len
    if tcfg.total_batch_tokens:
        B, accum = split_rows(math.ceil(tcfg.total_batch_tokens / (T * ctx.world_size)), limit)
    else:
        B, accum = limit, 1
    if ctx.rank == 0:
        ranks = f" x {ctx.world_size} ranks" if ctx.world_size > 1 else ""
        passes = f" x {accum} passes" if accum > 1 else ""
        ctx.bus.console.print(
            f"[dim]{stage}: {B} rows x {T} tokens{passes}{ranks} = {B * T * accum * ctx.world_size:,} tokens a step[/]",
            highlight=False,
        )
    return B, accum


# Rows of the current batch that the attention-entropy telemetry runs its extra forward on: a few rows give a
# stable per-layer mean (thousands of query positions) for a negligible cost next to a step.
ENTROPY_ROWS = 4


def attention_entropy(ctx: Context, model, idx: torch.Tensor, counted: torch.Tensor) -> dict[str, float]:
    """The attention-entropy telemetry: one no-gradient forward of `idx` (B, T) asking every layer for the
    Shannon entropy of each query's attention distribution (from the Triton kernel's softmax statistics on a
    GPU, never a T x T matrix there), averaged over heads and the `counted` (B, T) bool positions.

    - `attn_entropy/L{i}`: layer i's mean entropy, nats;
    - `attn_entropy`: the mean over layers, nats;
    - `attn_entropy_norm`: the mean of H / log(t + 1) at positions t >= 1, where log(t + 1) is the entropy of
      attending uniformly to the t + 1 visible keys: 1 = spread evenly, 0 = all on one key;
    - `attn_entropy_min_head`: the lowest head's mean normalised entropy (near 0: a head that attends to one
      key, such as the first token, whatever the input).
    Metrics for the bus; the model is left in the mode it was in.
    """
    raw = model.module if hasattr(model, "module") else model
    idx, counted = idx[:ENTROPY_ROWS], counted[:ENTROPY_ROWS]
    was_training = raw.training
    raw.eval()
    try:
        with torch.no_grad(), autocast(ctx.device, ctx.dtype):
            _, ent = raw(idx, logits="none", return_entropy=True)  # (L, B, H, T), float32
    finally:
        raw.train(was_training)
    ent = ent.to("cpu", torch.float64)  # a few numbers: summed on the CPU, exactly (MPS has no float64)
    mask = counted.to("cpu", torch.float64)[None, :, None, :]  # (1, B, 1, T)
    n = mask.sum() * ent.size(2)
    if n == 0:
        return {}
    t = torch.arange(ent.size(-1), device=ent.device, dtype=torch.float64)
    normed = ent[..., 1:] / torch.log1p(t[1:])  # position 0 sees one key: its entropy is 0 and says nothing
    m1 = mask[..., 1:]
    per_layer = (ent * mask).sum(dim=(1, 2, 3)) / n
    out = {f"attn_entropy/L{i}": float(v) for i, v in enumerate(per_layer)}
    out["attn_entropy"] = float(per_layer.mean())
    if m1.sum() > 0:
        out["attn_entropy_norm"] = float((normed * m1).sum() / (m1.sum() * ent.size(2) * ent.size(0)))
        per_head = (normed * m1).sum(dim=(1, 3)) / m1.sum()  # (L, H)
        out["attn_entropy_min_head"] = float(per_head.min())
    return out


def entropy_due(ctx: Context, done: int, total: int) -> bool:
    """Whether step `done` (1-based) of `total` measures attention entropy: every telemetry.attn_entropy_every
    steps and at a stage's last step (0: never); on rank 0, the one that logs."""
    every = ctx.cfg.telemetry.attn_entropy_every
    return ctx.rank == 0 and every > 0 and (done % every == 0 or done == total)


def train_supervised(
    ctx: Context,
    stage: str,
    model,
    loader,
    total_steps: int,
    tcfg,
    val_fn: Callable[[Any], dict[str, float]] | None = None,
    accum: int = 1,
) -> dict[str, Any]:
    """Train `model` for `total_steps` optimizer steps on `loader`; checkpoint, resume, log. Returns a summary."""
    sdir = ctx.stage_dir(stage)
    check_training_dtype(ctx.dtype, stage)
    opt = Optimizers(model, ctx.cfg.optim, lr_mult=tcfg.lr)
    start = 0
    # an interrupted run: continue exactly where the last checkpoint left off. Decided together: a rank that does
    # not see the checkpoint (a node whose disk the run folder is not on) fails in the load, and every rank with it
    if any_rank(ckpt.has_checkpoint(sdir)):
        state = together(ctx.load_checkpoint, sdir, model, opt, restore_rng=True)
        start = int(state["step"])
        if state.get("loader") is not None:
            ls = state["loader"]
            loader.load_state_dict(ls[ctx.rank] if isinstance(ls, list) else ls)
    prepare_loader(loader)
    broadcast_params(model)
    info = ctx.info(stage, total_steps)
    ctx.bus.stage_start(info)
    if start and ctx.rank == 0:  # (after the stage's start line: "base: 20 steps", then where it resumes)
        ctx.bus.console.print(f"[dim]{stage}: resuming at step {start}/{total_steps}[/]", highlight=False)
    model.train()
    tokens_per_step = 0
    last: dict[str, Any] = {}
    t_stage = time.time()
    epoch = getattr(loader, "epoch", 0)
    held = HeldError()
    ctx.stop_signal.console = ctx.bus.console  # from here a SIGTERM lets the step end, saves and stops
    for step in range(start, total_steps):
        t0 = time.time()
        lrf = lr_schedule(step, total_steps, tcfg.warmup_ratio, tcfg.warmdown_ratio, tcfg.final_lr_frac)
        opt.set_lr(lrf)
        # an error on one rank (its data, a pass's out-of-memory, rank 0's log or checkpoint at the last step's
        # end) is held (`HeldError`) and raised on every rank together at the gradients' all-reduce: raised at once,
        # it would leave the other ranks waiting in a collective
        batches = held.run(lambda: [next(loader) for _ in range(accum)]) or []  # token ids: small next to a pass
        try:
            loss_t, n_tok_t = supervised_step(ctx, model, batches)  # its one collective comes first: always reached
        except Exception as e:  # noqa: BLE001 - held, as above
            held.err = held.err or e
        if getattr(loader, "epoch", 0) > epoch:
            epoch = loader.epoch
            if ctx.rank == 0 and step + 1 < total_steps:  # the data ran out: say so (the last step's wrap is noise)
                ctx.bus.console.print(
                    f"[yellow]{stage}: the data ran out; pass {epoch + 1} over it began at step {step + 1} of"
                    f" {total_steps}[/]",
                    highlight=False,
                )
        if sync_grads(opt.params, failed=held.failed):
            raise_together(held.err)
        x, y = batches[-1]  # the step's last rows: the attention entropy's
        gnorm = opt.step()
        loss_val = float(all_reduce_mean(loss_t))
        n_tok = int(n_tok_t)  # read once a step: no sync per pass
        if not math.isfinite(loss_val):
            raise NanorlError(
                f"{stage}: the loss became {loss_val} at step {step + 1}",
                hint=f"lower the learning rate ({stage}.lr) or raise optim.grad_clip",
            )
        dt = max(time.time() - t0, 1e-9)
        tokens_per_step = n_tok * ctx.world_size
        last = {
            "loss": loss_val,
            "lr": lrf,
            "grad_norm": gnorm,
            "tok_per_s": tokens_per_step / dt,
            "step_s": dt,
        }
        done = step + 1
        is_last = done == total_steps
        if val_fn is not None and ((tcfg.eval_every and done % tcfg.eval_every == 0) or is_last):
            last.update(val_fn(model))
            model.train()
        if entropy_due(ctx, done, total_steps):  # on the step's last rows, at the positions the loss counted
            last.update(held.run(attention_entropy, ctx, model, x, y >= 0) or {})
        if done % ctx.cfg.telemetry.log_every == 0 or is_last:
            held.run(ctx.bus.log, stage, done, last)
        if ctx.checkpoint_due(done, total_steps, tcfg.checkpoint_every):
            loader_state = _loader_state(ctx, loader)  # (a collective: every rank, held error or not)
            held.run(ctx.save, stage, model, opt, {"step": done, "loader": loader_state})
        if ctx._stopping:  # a SIGTERM stops the run after this step: not with "saved" when the save failed
            raise_together(held.err)
        ctx.end_step(stage, done)
    raise_together(held.err)  # what the last step's end met (once a stage: no collective a step)
    ctx.stop_signal.console = None
    ctx.save(stage, model, None, {"step": total_steps, "loader": None})
    summary = {
        **last,
        "steps": total_steps,
        "seconds": time.time() - t_stage,
        "tokens_per_step": tokens_per_step,
    }
    ctx.bus.stage_end(info, summary)
    return summary


def supervised_step(ctx: Context, model, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Forward and backward of one optimizer step's passes (x, y), the gradients accumulated in `model`. Returns
    (this rank's share of the step's loss: `all_reduce_mean` of it is the step's; this rank's counted targets),
    device tensors: nothing waits for the GPU. Its one collective (the count) comes before any pass, so a rank
    whose data failed (no batches) still reaches it, and a pass that fails leaves the ranks at the same point:
    the caller raises the error on every rank at the gradients' all-reduce.

    The loss is the mean over every counted target (y >= 0) of the step, its passes and ranks together: each
    pass's summed loss is divided by the step's count before its backward. The mean of each pass's own mean
    would weight a token of a pass with few counted targets (SFT's short answers) more than one of a pass with
    many, and the gradient would depend on how the rows were split into passes and ranks. (Base counts every
    target, so there the two agree.) The ranks then average their gradients (`sync_grads`), so the count each
    divides by is the mean over ranks: the average of the ranks' sums / mean count = the sum / total count."""
    counted = sum(((y >= 0).sum() for _, y in batches), torch.zeros((), dtype=torch.long, device=ctx.device))
    per_rank = all_reduce_mean(counted.to(exact_dtype(ctx.device))).clamp_min(1)
    loss = torch.zeros((), dtype=exact_dtype(ctx.device), device=ctx.device)
    for x, y in batches:
        with autocast(ctx.device, ctx.dtype):
            summed, _ = model(x, y, loss_weights=(y >= 0).float())  # the fused loss: no logits kept
        part = summed / per_rank.to(summed.dtype)
        part.backward()
        loss += part.detach()
    return loss, counted


def prepare_loader(loader) -> None:
    """Have the loader build its first batch's data now (`prepare`, when it has one), every rank together: a rank
    whose shard holds no data (PackedLoader: a corpus too small for a row on this rank) raises, and every other
    rank raises with it (nanorl.device.together) instead of waiting for it in the first collective."""
    together(getattr(loader, "prepare", lambda: None))


def _loader_state(ctx: Context, loader) -> Any:
    """Every rank's loader position (rank 0 writes the checkpoint, so it gathers them)."""
    state = loader.state_dict()
    if not is_distributed():
        return state
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states
