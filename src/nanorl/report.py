"""The run report: runs/<name>/report.md from metrics.jsonl and eval/*.json (plots when matplotlib is there).

matplotlib is not a dependency: without it the report is the same markdown, with tables and no figures.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from nanorl.telemetry import read_metrics

SHOWN = ("loss", "val_bpb", "val_loss", "reward", "acc", "completion_len", "zero_var_frac", "kl", "tok_per_s")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def _stage_rows(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage: the last step record's metrics and its end summary (latest run of the stage wins)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        stage, kind, m = rec.get("stage"), rec.get("kind"), rec.get("metrics", {})
        if stage is None or kind in ("eval", "rollouts"):
            continue
        if kind == "start":  # a stage run again (--from, nanorl train): its earlier figures are stale
            out[stage] = {}
            continue
        row = out.setdefault(stage, {})
        if kind == "end":
            row.update({k: v for k, v in m.items() if v is not None})
        else:
            row.update({k: v for k, v in m.items() if v is not None})
            row["steps"] = rec.get("step")
    return out


def _series(records: list[dict[str, Any]], stage: str, key: str) -> tuple[list[int], list[float]]:
    pts: dict[int, float] = {}
    for rec in records:
        if rec.get("stage") == stage and rec.get("kind") is None:
            v = rec.get("metrics", {}).get(key)
            if isinstance(v, (int, float)):
                pts[int(rec["step"])] = float(v)  # a resumed step logs twice: the later value wins
    xs = sorted(pts)
    return xs, [pts[x] for x in xs]


def _plots(run: Path, records: list[dict[str, Any]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figs = []
    panels = [("base", "loss"), ("mid", "loss"), ("sft", "loss"), ("rl", "reward"), ("rl", "acc")]
    panels = [(s, k) for s, k in panels if _series(records, s, k)[0]]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6))
    for ax, (s, k) in zip(axes if len(panels) > 1 else [axes], panels, strict=False):
        xs, ys = _series(records, s, k)
        ax.plot(xs, ys, lw=1)
        ax.set_title(f"{s} {k}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = run / "report_curves.png"
    tmp = path.with_name(path.name + ".tmp")  # a crash mid-write leaves the previous figure, never half of one
    try:
        fig.savefig(tmp, dpi=110, format="png")  # (the format by name: ".tmp" says none)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    figs.append(path.name)
    return figs


def _entropy_table(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Attention entropy by layer (rows) and stage (columns), each stage's last measurement (telemetry's
    `attn_entropy*` metrics); nothing when no stage measured it."""
    cols = [s for s, row in stages.items() if "attn_entropy" in row]
    if not cols:
        return []
    layers = sorted({int(k.rsplit("L", 1)[1]) for s in cols for k in stages[s] if k.startswith("attn_entropy/L")})
    lines = [
        "## Attention entropy",
        "",
        "Nats, averaged over heads and positions, at each stage's last measurement; normalised: H / log(visible keys),"
        " 1 = attention spread evenly, 0 = on one key.",
        "",
        "| layer | " + " | ".join(cols) + " |",
        "|---" * (1 + len(cols)) + "|",
    ]
    rows = [(f"L{i}", f"attn_entropy/L{i}") for i in layers]
    rows += [
        ("mean", "attn_entropy"),
        ("normalised", "attn_entropy_norm"),
        ("lowest head, normalised", "attn_entropy_min_head"),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(stages[s].get(key, "")) for s in cols) + " |")
    return [*lines, ""]


def write_report(run: str | Path) -> Path:
    run = Path(run)
    records = read_metrics(run)
    lines = [f"# nanorl run `{run.name}`", ""]
    toml = run / "run.toml"
    if toml.is_file():
        head = [ln for ln in toml.read_text().splitlines() if ln and not ln.startswith("[")][:6]
        lines += ["Run config (excerpt of run.toml):", "", "```toml", *head, "```", ""]

    stages = _stage_rows(records)
    if stages:
        keys = [k for k in SHOWN if any(k in row for row in stages.values())]
        lines += ["## Stages", "", "| stage | steps | wall s | " + " | ".join(keys) + " |"]
        lines += ["|---" * (3 + len(keys)) + "|"]
        for stage, row in stages.items():
            done = run / stage / "DONE"
            wall = ""
            if done.is_file():
                with contextlib.suppress(json.JSONDecodeError):
                    wall = _fmt(json.loads(done.read_text()).get("wall_s", ""))
            cells = [_fmt(row.get(k, "")) for k in keys]
            lines.append(f"| {stage} | {_fmt(row.get('steps', ''))} | {wall} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += _entropy_table(stages)

    evals = sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
    if evals:
        lines += [
            "## Evaluation",
            "",
            "| file | model | mode | n | accuracy | 95% CI | chance | majority | format rate |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        compares, sampled = [], []
        for path in evals:
            try:
                res = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            for mode, s in res.get("modes", {}).items():
                ci = s.get("accuracy_ci95") or ["", ""]
                if mode == "sampled":
                    k = s.get("samples")
                    sampled.append(
                        f"- {path.name}: {k} completions per question at temperature {_fmt(s.get('temperature'))}:"
                        f" pass@1 {_fmt(s.get('accuracy'))}, pass@{k} {_fmt(s.get('pass_at_k'))},"
                        f" maj@{k} {_fmt(s.get('maj_at_k'))}"
                    )
                lines.append(
                    f"| {path.name} | {res.get('stage', '')} | {mode} | {s.get('n')} | {_fmt(s.get('accuracy'))} | "
                    f"{_fmt(ci[0])}–{_fmt(ci[1])} | {_fmt(s.get('chance_baseline', ''))} | "
                    f"{_fmt(s.get('majority_baseline', ''))} | {_fmt(s.get('format_rate', ''))} |"
                )
            for mode, c in (res.get("compare") or {}).items():
                test = "McNemar" if c.get("test", "McNemar").startswith("McNemar") else "sign test"
                compares.append(
                    f"- {path.name} [{mode}]: {c['a']} {c['accuracy_a']:.3f} vs {c['b']} {c['accuracy_b']:.3f} "
                    f"(diff {c['diff']:+.3f}, {test} p = {c['p_value']:.3g}, n = {c['n']})"
                )
        lines.append("")
        if sampled:
            lines += ["Sampled mode (accuracy = pass@1, the mean over the completions):", "", *sampled, ""]
        if compares:
            lines += ["Paired comparison on the same questions:", "", *compares, ""]

    for fig in _plots(run, records):
        lines += [f"![training curves]({fig})", ""]
    path = run / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
