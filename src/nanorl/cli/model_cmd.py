"""`nanorl model info`: the model's shape, parameter counts, FLOPs and training memory, counted analytically (instant
at any depth)."""

from __future__ import annotations

from pathlib import Path

import typer

from nanorl.cli.config_cmd import ConfigOpt, DepthOpt, NameOpt, OverridesArg, PresetOpt, TaskOpt, build_config
from nanorl.cli.ui import Table, console, print_json


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


# GPU sizes `model info` reports the rows that fit for (GiB): the common 24, 40 and 80 GB cards
GPU_GIB = (24, 40, 80)


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Inspect the model a config describes.", no_args_is_help=True)
    app.add_typer(model_app, name="model")

    @model_app.command("info")
    def info(
        overrides: list[str] = OverridesArg,
        preset: str = PresetOpt,
        depth: int = DepthOpt,
        config: Path = ConfigOpt,
        task: str = TaskOpt,
        name: str = NameOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Print the model's shape, parameter counts (embedding, matrices, unembedding, total), FLOPs/token, and
        the estimated GPU memory of a training step with the rows that fit common GPUs."""
        # counted from the config, no tensors: `--depth 26` is as instant as `--preset tiny`
        from nanorl.model.counts import count_params, flops_per_token, rows_that_fit, train_memory

        cfg = build_config(preset, depth, config, task, name, overrides)
        m = cfg.model
        counts = count_params(m)
        fpt = flops_per_token(m)
        shape = {
            "depth": m.depth,
            "n_embd": m.n_embd,
            "n_head": m.n_head,
            "n_kv_head": m.n_kv_head,
            "head_dim": m.n_embd // m.n_head,
            "mlp_hidden": 4 * m.n_embd,
            "vocab_size": m.vocab_size,
            "seq_len": m.seq_len,
            "softcap": m.softcap,
            "attention": m.attention,
        }
        # a training step on a GPU (bf16 autocast): what stays, what a row of seq_len tokens adds, and the rows a
        # forward pass takes (device_batch_size 0) on GPUs of 24, 40 and 80 GiB
        one = train_memory(m, 1)
        memory = {
            "weights_and_optimizer_bytes": one["weights"],
            "loss_chunk_bytes_max": train_memory(m, 1 << 20)["loss"],
            "per_row_bytes": one["activations"],
            "rows_that_fit": {f"{g}GiB": rows_that_fit(m, g * 2**30) for g in GPU_GIB},
        }
        if as_json:
            print_json({"shape": shape, "params": counts, "flops_per_token": fpt, "train_memory": memory})
            return
        table = Table(title=f"model: depth {m.depth}", title_justify="left")
        table.add_column("shape", style="cyan")
        table.add_column("value", justify="right")
        for k, v in shape.items():
            table.add_row(k, str(v))
        table.add_section()
        for k in ("embedding", "matrices", "unembedding", "total"):
            style = "bold" if k == "total" else None
            table.add_row(f"params: {k}", f"{counts[k]:,} ({human_count(counts[k])})", style=style)
        table.add_section()
        table.add_row(f"FLOPs/token (fwd+bwd, T={m.seq_len})", f"{fpt:,} ({human_count(fpt)})")
        table.add_section()
        gib = 2**30
        table.add_row("GPU training: weights + optimizer", f"{memory['weights_and_optimizer_bytes'] / gib:.2f} GiB")
        table.add_row("GPU training: loss chunk (at most)", f"{memory['loss_chunk_bytes_max'] / gib:.2f} GiB")
        table.add_row(f"GPU training: per row of {m.seq_len} tokens", f"{memory['per_row_bytes'] / gib:.2f} GiB")
        for g in GPU_GIB:
            table.add_row(f"GPU training: rows per pass on {g} GiB", str(memory["rows_that_fit"][f"{g}GiB"]))
        console.print(table)
        console.print(
            "[dim]FLOPs/token = 6 x (matrix + unembedding params) + 12 x layers x width x seq; the embedding "
            "is a lookup, not a matmul. GPU memory: an estimate under bf16 autocast (docs/training.md); a stage "
            "with device_batch_size=0 takes the rows that fit its GPU.[/]"
        )
