"""Stage `mid`: midtraining on conversations in the chat format, packed, loss on every token.

It teaches the special tokens (<|user_start|> ... <|assistant_end|>) and the shape of a conversation, from the
task's train split (the prompt the task asks, then its target) plus any chat data the user gives
(`data.chat`: a .jsonl of {"messages": [...]} conversations). As in nanochat's midtraining every token of a
conversation is trained (the user's too: it is still language), and conversations are packed several to a
row; SFT then trains on the assistant's tokens alone.

steps = -1: one pass over the conversations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nanorl.api import NanorlError
from nanorl.device import together
from nanorl.stages.common import Context, ConversationLoader, micro_batch, render_examples, train_supervised
from nanorl.tokenizer import checked_messages


def chat_conversations(path: str) -> list[list[dict]]:
    """Conversations from a .jsonl file, one {"messages": [{"role", "content"}, ...]} object per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NanorlError(f"chat data {p} not found", hint='data.chat names a .jsonl of {"messages": [...]}')
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise NanorlError(f'{p}:{n}: not a {{"messages": [...]}} object ({e})') from None
        try:  # every message checked here, so the runner's preflight finds a bad one before any stage runs
            if not isinstance(msgs, list):
                raise NanorlError(f'"messages" is a {type(msgs).__name__}, not a list of messages')
            checked_messages(msgs)
        except NanorlError as e:
            raise NanorlError(f"{p}:{n}: {e.message}", hint="fix or remove that line") from None
        out.append(msgs)
    return out


def run(ctx: Context) -> dict[str, Any]:
    cfg, tcfg = ctx.cfg, ctx.cfg.mid
    T = cfg.model.seq_len
    rendered = render_examples(ctx, ctx.examples("train"), T, "mid")
    if cfg.data.chat:
        tok = ctx.tokenizer()
        rendered += [tok.render_conversation(c, max_len=T + 1) for c in chat_conversations(cfg.data.chat)]
    B, accum = micro_batch(ctx, "mid")
    loader = ConversationLoader(
        rendered, B, T, ctx.tokenizer().bos_id, packed=True, assistant_only=False,
        seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
    )  # fmt: skip
    steps = tcfg.steps
    if steps < 0:
        avg = sum(len(ids) for ids, _ in rendered) / len(rendered)
        per_row = max(1, int((T + 1) // avg))
        steps = max(1, math.ceil(len(rendered) / (per_row * B * accum * ctx.world_size)))
    model = together(ctx.previous_model, "mid")
    return train_supervised(ctx, "mid", model, loader, steps, tcfg, accum=accum)
