"""Stage `sft`: supervised fine-tuning on the task's targets (the rationale, then the final answer line).

One conversation per row (the task's prompt, then `task.target(example)`), loss on the assistant's tokens only
(the tokenizer's loss mask: the rationale, the answer line and <|assistant_end|>). steps = -1: one pass over the
train split. At the end, a quick dev check: the loss on the dev split's targets (`val_loss`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nanorl.device import all_reduce_mean, autocast, together
from nanorl.stages.common import Context, ConversationLoader, micro_batch, render_examples, train_supervised


def run(ctx: Context) -> dict[str, Any]:
    cfg, tcfg = ctx.cfg, ctx.cfg.sft
    T = cfg.model.seq_len
    rendered = render_examples(ctx, ctx.examples("train"), T, "sft")
    B, accum = micro_batch(ctx, "sft")
    bos = ctx.tokenizer().bos_id
    loader = ConversationLoader(
        rendered, B, T, bos, packed=False, assistant_only=True,
        seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
    )  # fmt: skip
    steps = tcfg.steps if tcfg.steps >= 0 else max(1, math.ceil(len(rendered) / (B * accum * ctx.world_size)))
    dev = render_examples(ctx, ctx.examples("dev")[:256], T)

    @torch.no_grad()
    def val(model) -> dict[str, float]:
        model.eval()
        dl = ConversationLoader(dev, B, T, bos, packed=False, assistant_only=True, seed=0, device=ctx.device)
        total = torch.zeros((), device=ctx.device)
        count = torch.zeros((), device=ctx.device)
        for _ in range(max(1, len(dev) // B)):
            x, y = next(dl)
            with autocast(ctx.device, ctx.dtype):
                loss = model(x, y, loss_reduction="none").float()
            total += loss.sum()
            count += (y >= 0).sum()
        return {"val_loss": float(all_reduce_mean(total / count.clamp_min(1)))}

    model = together(ctx.previous_model, "sft")
    return train_supervised(ctx, "sft", model, loader, steps, tcfg, val_fn=val if dev else None, accum=accum)
