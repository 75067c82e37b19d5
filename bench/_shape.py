"""The BENCHMARKS.md model shape, shared by the stages engineer's benchmarks (not a benchmark itself)."""

from __future__ import annotations

import argparse

# GPT with 4 layers, d_model 256, 2 heads x 128, vocab 8192 (../shared/BENCHMARKS.md)
SHAPE = ["model.depth=4", "model.n_embd=256", "model.n_head=2", "model.vocab_size=8192", "model.seq_len=256"]


class StubTokenizer:
    """Just what the engine needs; the special tokens sit above the model's vocabulary, so they are never
    sampled and every completion runs to its full length (what a throughput benchmark wants)."""

    def __init__(self, vocab_size: int = 8192):
        self.vocab_size = vocab_size
        self.names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                      "<|output_end|>"]  # fmt: skip

    def special_id(self, name: str) -> int:
        return self.vocab_size + self.names.index(name)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return ""


def model_and_cfg(threads: int = 2):
    import torch

    from nanorl.config import resolve
    from nanorl.device import keep_freed_memory
    from nanorl.model import GPT

    keep_freed_memory()  # as a CPU run of the CLI does
    torch.set_num_threads(threads)
    cfg = resolve(overrides=SHAPE)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights()
    return model, cfg


def load_note() -> str:
    import os

    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def print_table(title: str, columns: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    """The human half of a bench script's output: a two-column rich table (the JSON line follows it)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column(columns[0])
    table.add_column(columns[1], justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's parser: --help prints the script's docstring (what it times, its usage) as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def count(text: str) -> int:
    """An argparse type for a count of steps, repetitions or rows: zero would leave nothing to take a median of."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is below 1: give at least 1")
    return n
