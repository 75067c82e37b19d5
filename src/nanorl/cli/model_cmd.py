"""`nanorl model info`: the model's shape, parameter counts and FLOPs, counted analytically (instant at any depth)."""

from __future__ import annotations

from pathlib import Path

import typer

from nanorl.cli.config_cmd import ConfigOpt, DepthOpt, NameOpt, OverridesArg, PresetOpt, TaskOpt, build_config
from nanorl.cli.ui import console, print_json


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


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
        """Print the model's shape, parameter counts (embedding, matrices, unembedding, total) and FLOPs/token."""
        # counted from the config, no tensors: `--depth 26` is as instant as `--preset tiny`
        from nanorl.model.counts import count_params, flops_per_token

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
        if as_json:
            print_json({"shape": shape, "params": counts, "flops_per_token": fpt})
            return
        from rich.table import Table

        table = Table(title=f"model: depth {m.depth}", title_justify="left")
        table.add_column("shape", style="cyan")
        table.add_column("value", justify="right")
        for k, v in shape.items():
            table.add_row(k, str(v))
        table.add_section()
        for k in ("embedding", "matrices", "unembedding", "total"):
            style = "bold" if k == "total" else None
            table.add_row(f"params: {k}", f"{counts[k]:,} ({_human(counts[k])})", style=style)
        table.add_section()
        table.add_row(f"FLOPs/token (fwd+bwd, T={m.seq_len})", f"{fpt:,} ({_human(fpt)})")
        console.print(table)
        console.print(
            "[dim]FLOPs/token = 6 x (matrix + unembedding params) + 12 x layers x width x seq; the embedding "
            "is a lookup, not a matmul.[/]"
        )
