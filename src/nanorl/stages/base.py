"""Stage `base`: pretraining, next-token loss on the packed corpus (`data.corpus`), validation in bits per byte.

The budget rule (steps = -1): train on `base.tokens_per_param` tokens per parameter (Chinchilla's 20, as
nanochat), counting the parameters of the matrices and the unembedding (the embedding lookup does no
compute). `total_batch_tokens` (0: one pass of device_batch_size x seq_len per rank) sets the tokens per step.

Bits per byte: the summed next-token loss (nats) over the validation tokens, divided by ln 2 and by the UTF-8
bytes those tokens stand for (special tokens count 0 bytes and are left out), so the figure does not depend on
the tokenizer (nanochat's metric).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nanorl.device import all_reduce_mean, autocast, exact_dtype, raise_together, together
from nanorl.stages.common import Context, HeldError, micro_batch, prepare_loader, train_supervised

# batches of validation (per rank) behind each val_bpb figure: ~40k tokens at the tiny shape, enough for a
# stable figure at a small fraction of the stage's time
VAL_BATCHES = 20


def budget_steps(ctx: Context, tokens_per_step: int) -> int:
    tcfg = ctx.cfg.base
    if tcfg.steps >= 0:
        return tcfg.steps
    from nanorl.model import count_params

    n = count_params(ctx.cfg.model)
    tokens = tcfg.tokens_per_param * (n["matrices"] + n["unembedding"])
    return max(1, round(tokens / tokens_per_step))


# Text the tokenizer's bytes-per-token rate is measured on before a run (the corpus's first documents)
SAMPLE_BYTES = 2_000_000


def announce_passes(ctx: Context, corpus, tok, run_tokens: int) -> float | None:
    """Say how many passes over the corpus the stage's tokens make, when the corpus's size is known from its
    files (Corpus.text_bytes) and warn above one pass: a budget larger than the text trains on the same text
    again, which a user following the depth rule should know before hours of GPU time, not after. Tokens in
    the corpus = its bytes / the tokenizer's bytes per token on the first SAMPLE_BYTES of it. Returns the passes
    (None: unknown)."""
    size = corpus.text_bytes()
    if not size:
        return None
    sample, nbytes = [], 0
    for doc in corpus.docs():
        sample.append(doc)
        nbytes += len(doc.encode("utf-8"))
        if nbytes >= SAMPLE_BYTES:
            break
    per_token = nbytes / max(1, sum(len(ids) + 1 for ids in tok.encode_batch(sample)))  # +1: each doc's BOS
    corpus_tokens = size / per_token
    passes = run_tokens / corpus_tokens
    con = ctx.bus.console
    con.print(
        f"[dim]base: {run_tokens:,} tokens; the corpus holds ~{corpus_tokens:,.0f} ({size:,} bytes of text at"
        f" {per_token:.2f} bytes a token): ~{passes:.2f} passes[/]",
        highlight=False,
    )
    if passes > 1.05:
        more = f"~{passes:.1f}x the text"
        if corpus.name == "fineweb":
            more += f" (`nanorl data download fineweb --shards {math.ceil(round(len(corpus.sources) * passes, 1))}`)"
        con.print(f"[yellow]base: the run will see the same text ~{passes:.1f} times; for one pass give it {more}[/]")
    return passes


def token_bytes(tok, vocab_size: int, device) -> torch.Tensor:
    """UTF-8 length of every token id (0 for special tokens and unused ids)."""
    lens = [0 if tok.is_special(i) else len(tok.token_bytes(i)) for i in range(tok.vocab_size)]
    lens += [0] * (vocab_size - len(lens))
    return torch.tensor(lens, dtype=torch.float32, device=device)


def run(ctx: Context) -> dict[str, Any]:
    from nanorl.data import PackedLoader, open_corpus
    from nanorl.data.prepare import open_run_corpus
    from nanorl.device import barrier

    cfg, tcfg = ctx.cfg, ctx.cfg.base
    tok = ctx.tokenizer()
    B, accum = micro_batch(ctx, "base")
    T = cfg.model.seq_len
    if ctx.rank == 0:  # FineWeb shards the run needs (data.fineweb_shards) are fetched once, by one process
        open_run_corpus(cfg, ctx.task, console=ctx.bus.console)
    barrier()
    corpus = open_corpus(cfg.data.corpus, task=ctx.task, skip_bad=cfg.data.skip_bad, data_dir=cfg.data.data_dir or None)
    loader = PackedLoader(corpus, tok, B, T, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    steps = budget_steps(ctx, B * T * accum * ctx.world_size)
    if ctx.rank == 0:
        announce_passes(ctx, corpus, tok, steps * B * T * accum * ctx.world_size)
    val_fn = _val_fn(ctx, B, T)
    model = together(ctx.previous_model, "base")
    return train_supervised(ctx, "base", model, loader, steps, tcfg, val_fn=val_fn, accum=accum)


def _val_fn(ctx: Context, B: int, T: int):
    """Bits per byte on held-out text: the task's dev corpus (when it has one), else a slice of the corpus."""
    from nanorl.data import PackedLoader, open_corpus

    cfg = ctx.cfg
    spec = {"task": ctx.task, "skip_bad": cfg.data.skip_bad, "data_dir": cfg.data.data_dir or None}
    try:
        corpus = open_corpus(cfg.data.corpus, split="dev", **spec)
    except Exception:  # a corpus with no dev split (local files): validate on the training text's first batches
        corpus = open_corpus(cfg.data.corpus, **spec)
    tbytes = token_bytes(ctx.tokenizer(), cfg.model.vocab_size, ctx.device)

    @torch.no_grad()
    def val(model) -> dict[str, float]:
        model.eval()
        # a fresh loader each time: the same validation batches every evaluation (seed fixed, no shuffle)
        loader = PackedLoader(
            corpus, ctx.tokenizer(), B, T, seed=0, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
            shuffle=False,
        )  # fmt: skip
        prepare_loader(loader)  # a rank whose share of a small dev corpus has no row raises with every other rank
        # nats, bytes, and whether this rank failed (an out-of-memory error, its data): one all-reduce tells every
        # rank, which then raise together instead of leaving the others waiting in it
        sums = torch.zeros(3, device=ctx.device, dtype=exact_dtype(ctx.device))

        def passes() -> None:
            for _ in range(VAL_BATCHES):
                x, y = next(loader)
                with autocast(ctx.device, ctx.dtype):
                    loss = model(x, y, loss_reduction="none").float()
                b = tbytes[y]
                sums[0] += (loss * (b > 0)).sum().to(sums.dtype)
                sums[1] += b.sum().to(sums.dtype)
                if loader.epoch > 0:  # a small dev corpus: one pass is all there is
                    break

        held = HeldError()
        held.run(passes)
        sums[2] = float(held.failed)
        nats, nbytes, failed = all_reduce_mean(sums).unbind()
        if failed > 0:
            raise_together(held.err)
        return {"val_bpb": float(nats / (math.log(2) * nbytes.clamp_min(1)))}

    return val
