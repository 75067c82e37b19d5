"""Small models and configs that several test files build the same way (imported by them: pytest puts tests/ on
the path)."""

from __future__ import annotations

import subprocess
import sys

import torch

from nanorl.config import resolve

# a model small enough that a whole pipeline runs in seconds on one core
SMALL = [
    "model.depth=1",
    "model.n_embd=32",
    "model.n_head=1",
    "model.seq_len=128",
    "tokenizer.train_chars=100000",
    "base.steps=6",
    "base.device_batch_size=2",
    "base.checkpoint_every=2",
    "base.eval_every=3",
    "mid.steps=2",
    "mid.device_batch_size=2",
    "sft.steps=3",
    "sft.device_batch_size=2",
    "sft.checkpoint_every=1",
    "rl.steps=3",
    "rl.prompts_per_step=2",
    "rl.group_size=2",
    "rl.max_new_tokens=8",
    "rl.checkpoint_every=1",
    "rl.kl_every=1",
    "eval.max_examples=4",
    "eval.max_new_tokens=8",
    "eval.mode=both",
    "telemetry.console=false",
]


def tiny_model(depth: int = 2, width: int = 64, heads: int = 2, noise: float = 0.02, dtype=torch.float64):
    """A small GPT (vocabulary 300), float64 by default, its identity init broken by `noise` so that every layer
    matters."""
    from nanorl.model import GPT

    overrides = [f"model.depth={depth}", f"model.n_embd={width}", f"model.n_head={heads}", "model.vocab_size=300"]
    torch.manual_seed(0)
    m = GPT(resolve(overrides=overrides).model)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(noise * torch.randn_like(p))
    return m.to(dtype)


def trained_one_step(width: int = 32):
    """(cfg, model, optimizers, x): a 1-layer GPT after one optimizer step, so its optimizer has state to save."""
    from nanorl.model import GPT
    from nanorl.optim import Optimizers

    cfg = resolve(overrides=["model.depth=1", f"model.n_embd={width}", "model.n_head=1", "model.vocab_size=300"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights()
    opt = Optimizers(model, cfg.optim)
    x = torch.randint(0, 300, (2, 16))
    model(x, x).backward()
    opt.step()
    return cfg, model, opt, x


HEAVY = ("torch", "datasets", "wandb", "triton", "numpy", "boto3")


def heavy_imports(*argvs: list[str]) -> list[str]:
    """The heavy libraries (HEAVY) loaded by running these CLI command lines one after another in a fresh
    interpreter; each must exit 0. Commands that only read or print must load none: the CLI starts in ~0.2 s."""
    code = (
        "import sys\n"
        "from nanorl.cli import main\n"
        f"for argv in {[list(a) for a in argvs]!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        f"print('HEAVY=' + ','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def cli_here(capsys, *args: str) -> tuple[int, str, str]:
    """`nanorl ARGS` in this process (so that a test can patch what the command calls): exit code, stdout, and
    stderr with its whitespace joined (the error console wraps long lines)."""
    from nanorl.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())
