"""The run report: runs/<name>/report.md from metrics.jsonl and eval/*.json (plots when matplotlib is there).

matplotlib is an extra (`pip install "nanorl[plots]"`; `make setup` installs it): without it the report is the same
markdown, with tables and no figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanorl.telemetry import read_metrics

SHOWN = ("loss", "val_bpb", "val_loss", "reward", "acc", "completion_len", "zero_var_frac", "kl", "tok_per_s")


def fmt_value(v: Any) -> str:
    """A metric for a table cell: 4 significant digits, thousands without decimals (12,345), the rest as str."""
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
        if kind == "clear":  # its output removed before a re-run: nothing of it is left until it starts again
            out.pop(stage, None)
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
        if rec.get("stage") == stage and rec.get("kind") == "clear":  # a stage re-run from scratch: a new curve
            pts = {}
        if rec.get("stage") == stage and rec.get("kind") is None:
            v = rec.get("metrics", {}).get(key)
            if isinstance(v, (int, float)):
                pts[int(rec["step"])] = float(v)  # a resumed step logs twice: the later value wins
    xs = sorted(pts)
    return xs, [pts[x] for x in xs]


# The figure's panels, in order: (stage, metrics drawn together, title, log scale). A panel is drawn when its
# stage logged one of its metrics; a metric logged every step is drawn raw (faint) and smoothed (`_ema`), one
# logged now and then (validation, KL) as points.
PANELS = (
    ("base", ("loss",), "base: train loss", True),
    ("base", ("val_bpb",), "base: validation bits per byte", False),
    ("mid", ("loss",), "mid: train loss", False),
    ("sft", ("loss", "val_loss"), "sft: loss (train, dev)", False),
    ("rl", ("reward",), "rl: mean reward", False),
    ("rl", ("acc",), "rl: rollout accuracy", False),
    ("rl", ("kl",), "rl: KL to the SFT model", False),
)
LABELS = {"loss": "train", "val_loss": "dev"}  # a panel's legend, where it draws two series
PANELS_PER_ROW = 4
SPARSE = 30  # a series with fewer points is drawn as points, not smoothed


def _ema(ys: list[float], span: int) -> list[float]:
    """The exponential moving average over `span` points, debiased at the start (as TensorBoard and wandb smooth):
    its first value is the first point, not a pull toward zero."""
    beta = 1 - 1 / max(1, span)
    out, avg = [], 0.0
    for i, y in enumerate(ys, start=1):
        avg = beta * avg + (1 - beta) * y
        out.append(avg / (1 - beta**i) if beta > 0 else y)
    return out


def curves_figure(records: list[dict[str, Any]]):
    """The training curves as a matplotlib Figure (None: nothing logged to draw). matplotlib must be importable."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    panels = []
    for stage, keys, title, log in PANELS:
        series = [(k, *_series(records, stage, k)) for k in keys]
        series = [(k, xs, ys) for k, xs, ys in series if xs]
        if series:
            panels.append((title, log, series))
    if not panels:
        return None
    cols = min(PANELS_PER_ROW, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, log, series) in zip(flat, panels, strict=False):
        for n, (key, xs, ys) in enumerate(series):
            colour = f"C{n}"
            if len(xs) < SPARSE:
                ax.plot(xs, ys, color=colour, lw=1, marker="o", ms=3, label=LABELS.get(key, key))
            else:
                ax.plot(xs, ys, color=colour, lw=0.6, alpha=0.3)
                ax.plot(xs, _ema(ys, max(2, len(xs) // 50)), color=colour, lw=1.4, label=LABELS.get(key, key))
        if log and all(y > 0 for _, _, ys in series for y in ys):
            ax.set_yscale("log")  # ticks at 1, 2, 5 x a power of ten, written plainly (0.2, not 2 x 10^-1)
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if len(series) > 1:
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25, lw=0.5)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _plots(run: Path, records: list[dict[str, Any]]) -> list[str]:
    """report_curves.png beside report.md, when matplotlib is installed (`pip install "nanorl[plots]"`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig = curves_figure(records)
    if fig is None:
        return []
    path = run / "report_curves.png"
    tmp = path.with_name(path.name + ".tmp")  # a crash mid-write leaves the previous figure, never half of one
    try:
        fig.savefig(tmp, dpi=110, format="png")  # (the format by name: ".tmp" says none)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return [path.name]


def _entropy_table(entropy: dict[str, Any]) -> list[str]:
    """Attention entropy by layer (rows) and stage (columns), each stage's last measurement (telemetry's
    `attn_entropy*` metrics); nothing when no stage measured it."""
    by_stage, layers = entropy["stages"], entropy["layers"]
    cols = list(by_stage)
    if not cols:
        return []
    lines = [
        "## Attention entropy",
        "",
        "Nats, averaged over heads and positions, at each stage's last measurement; normalised: H / log(visible keys),"
        " 1 = attention spread evenly, 0 = on one key.",
        "",
        "| layer | " + " | ".join(cols) + " |",
        "|---" * (1 + len(cols)) + "|",
    ]
    rows = [(f"L{i}", f"attn_entropy/L{i}") for i in layers] + list(ENTROPY_SUMMARY)
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(fmt_value(by_stage[s].get(key, "")) for s in cols) + " |")
    return [*lines, ""]


# ---- the run as data: what report.md and `nanorl runs show` both render ------------------------------------------
# The rows of the entropy table after the layers: (label, metric)
ENTROPY_SUMMARY = (
    ("mean", "attn_entropy"),
    ("normalised", "attn_entropy_norm"),
    ("lowest head, normalised", "attn_entropy_min_head"),
)


def _read_json(path: Path) -> Any:
    """A small JSON file's content, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _config(run: Path) -> dict[str, Any]:
    """The run's task, seed, device, model shape and parameter count, from run.toml (no torch: `model.counts`)."""
    from nanorl.api import NanorlError
    from nanorl.config import from_toml_file
    from nanorl.model.counts import count_params

    toml = run / "run.toml"
    if not toml.is_file():
        return {"error": f"no run.toml in {run}"}
    try:
        cfg = from_toml_file(toml)
    except NanorlError as e:
        return {"error": e.message}
    m = cfg.model
    steps = {s: getattr(cfg, s).steps for s in ("base", "mid", "sft", "rl")}
    return {
        "task": cfg.task,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "store": cfg.checkpoint.store or None,
        "model": {
            "depth": m.depth,
            "width": m.n_embd,
            "n_head": m.n_head,
            "n_kv_head": m.n_kv_head,
            "vocab_size": m.vocab_size,
            "seq_len": m.seq_len,
            "params": count_params(m),
        },
        "steps": {s: n for s, n in steps.items() if n > 0},  # -1: the stage's budget rule decides at its start
    }


def _stage(run: Path, stage: str, row: dict[str, Any] | None, starts: dict, ends: dict, steps: dict) -> dict:
    """One stage's status: done (DONE), partial (a checkpoint or logged steps, no DONE) or not started; its step
    (done: the last; partial: the last checkpoint's, where a resume starts), of how many, wall seconds, and the
    last logged metrics of SHOWN."""
    d = run / stage
    done = (run / "report.md").is_file() if stage == "report" else (d / "DONE").is_file()
    state = _read_json(d / "state.json")
    checkpoint_step = state.get("step") if isinstance(state, dict) else None
    logged = row is not None
    logged_step = row.get("steps") if logged else None
    total = starts.get(stage, steps.get(stage, 1 if stage == "tokenizer" else None))
    info = _read_json(d / "DONE") if done else None
    wall = info.get("wall_s") if isinstance(info, dict) else None
    if done:
        status, step = "done", ends.get(stage, logged_step)
    elif checkpoint_step is not None or stage in starts:
        status, step = "partial", checkpoint_step if checkpoint_step is not None else 0
    else:
        status, step = "not started", None
    return {
        "stage": stage,
        "status": status,
        "step": step,
        "total_steps": total,
        "checkpoint_step": checkpoint_step,
        "logged_step": logged_step,
        "wall_s": wall,
        "logged": logged,
        "metrics": {k: row[k] for k in SHOWN if k in row} if logged else {},
    }


def _evals(run: Path) -> list[dict[str, Any]]:
    """Every eval/*.json (sorted by name): its model stage and, per mode, the summary's scalars and interval
    (no per-question records); the paired comparisons. A file that is not JSON: {"file", "error"}."""
    out = []
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        res = _read_json(path)
        if not isinstance(res, dict) or not isinstance(res.get("modes"), dict):
            out.append({"file": path.name, "error": "not an eval result (unreadable, or half-written)"})
            continue
        modes = {
            mode: {k: v for k, v in s.items() if not isinstance(v, (dict, list)) or k.endswith("_ci95")}
            for mode, s in res["modes"].items()
            if isinstance(s, dict)
        }
        out.append(
            {
                "file": path.name,
                "task": res.get("task"),
                "split": res.get("split"),
                "stage": res.get("stage"),
                "checkpoint": res.get("checkpoint"),
                "modes": modes,
                "compare": res.get("compare") or {},
            }
        )
    return out


def run_overview(run: str | Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A run's summary as data, from its files only (run.toml, metrics.jsonl, the stages' DONE and state.json,
    eval/*.json): what report.md and `nanorl runs show` (a table, or --json) render. Imports no torch.

    {"name", "path", "config": {task, seed, device, dtype, model: {depth, width, ..., params}} or {"error"},
     "stages": [{stage, status, step, total_steps, checkpoint_step, logged_step, wall_s, logged, metrics}],
     "shown": the SHOWN metrics some stage logged, "attention_entropy": {"layers", "stages": {stage: metrics}},
     "evals": [{file, task, split, stage, checkpoint, modes: {mode: summary}, compare: {mode: paired test}}]}
    `records`: metrics.jsonl's, when the caller read them already."""
    from nanorl.config import STAGES

    run = Path(run)
    records = read_metrics(run) if records is None else records
    rows = _stage_rows(records)
    starts: dict[str, Any] = {}
    ends: dict[str, Any] = {}
    for rec in records:
        stage, kind = rec.get("stage"), rec.get("kind")
        if kind == "start":
            starts[stage] = rec.get("metrics", {}).get("total_steps")
            ends.pop(stage, None)
        elif kind == "clear":
            starts.pop(stage, None)
            ends.pop(stage, None)
        elif kind == "end":
            ends[stage] = rec.get("step")
    config = _config(run)
    names = [*STAGES, *(s for s in rows if s not in STAGES)]  # a plugin's stage after the pipeline's
    stages = [_stage(run, s, rows.get(s), starts, ends, config.get("steps", {})) for s in names]
    cols = [s for s in names if "attn_entropy" in rows.get(s, {})]
    layers = sorted({int(k.rsplit("L", 1)[1]) for s in cols for k in rows[s] if k.startswith("attn_entropy/L")})
    entropy = {
        "layers": layers,
        "stages": {s: {k: v for k, v in rows[s].items() if k.startswith("attn_entropy")} for s in cols},
    }
    return {
        "name": run.name,
        "path": str(run),
        "config": config,
        "stages": stages,
        "shown": [k for k in SHOWN if any(k in row for row in rows.values())],
        "attention_entropy": entropy,
        "evals": _evals(run),
    }


# ---- report.md -------------------------------------------------------------------------------------------------
def write_report(run: str | Path) -> Path:
    run = Path(run)
    records = read_metrics(run)
    data = run_overview(run, records)
    lines = [f"# nanorl run `{run.name}`", ""]
    toml = run / "run.toml"
    if toml.is_file():
        head = [ln for ln in toml.read_text().splitlines() if ln and not ln.startswith("[")][:6]
        lines += ["Run config (excerpt of run.toml):", "", "```toml", *head, "```", ""]

    logged = [e for e in data["stages"] if e["logged"]]
    if logged:
        keys = data["shown"]
        lines += ["## Stages", "", "| stage | steps | wall s | " + " | ".join(keys) + " |"]
        lines += ["|---" * (3 + len(keys)) + "|"]
        for e in logged:
            wall = fmt_value(e["wall_s"]) if e["wall_s"] is not None else ""
            step = fmt_value(e["logged_step"]) if e["logged_step"] is not None else ""
            cells = [fmt_value(e["metrics"].get(k, "")) for k in keys]
            lines.append(f"| {e['stage']} | {step} | {wall} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += _entropy_table(data["attention_entropy"])

    evals = [e for e in data["evals"] if "error" not in e]
    if data["evals"]:
        lines += [
            "## Evaluation",
            "",
            "| file | model | mode | n | accuracy | 95% CI | chance | majority | format rate |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        compares, sampled = [], []
        for ev in evals:
            name = ev["file"]
            for mode, s in ev["modes"].items():
                ci = s.get("accuracy_ci95") or ["", ""]
                if mode == "sampled":
                    k = s.get("samples")
                    sampled.append(
                        f"- {name}: {k} completions per question at temperature {fmt_value(s.get('temperature'))}:"
                        f" pass@1 {fmt_value(s.get('accuracy'))}, pass@{k} {fmt_value(s.get('pass_at_k'))},"
                        f" maj@{k} {fmt_value(s.get('maj_at_k'))}"
                    )
                # a free-form task (GSM8K) has no chance level and no format rate: "-", as `nanorl eval` prints
                chance, major, fmt = (fmt_value(s[k]) if k in s else "-" for k in _BASELINES)
                lines.append(
                    f"| {name} | {ev['stage'] or ''} | {mode} | {s.get('n')} | {fmt_value(s.get('accuracy'))} | "
                    f"{fmt_value(ci[0])}–{fmt_value(ci[1])} | {chance} | {major} | {fmt} |"
                )
            for mode, c in ev["compare"].items():
                compares.append(
                    f"- {name} [{mode}]: {c['a']} {c['accuracy_a']:.3f} vs {c['b']} {c['accuracy_b']:.3f} "
                    f"(diff {c['diff']:+.3f}, 95% CI {_ci(c.get('diff_ci95'))}, {paired_test_name(c)}"
                    f" p = {c['p_value']:.3g}, n = {c['n']})"
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


_BASELINES = ("chance_baseline", "majority_baseline", "format_rate")


def _ci(ci: Any) -> str:
    """A paired difference's interval, "-0.012 to +0.034" (Tango's: not symmetric about the difference)."""
    return f"{ci[0]:+.3f} to {ci[1]:+.3f}" if isinstance(ci, list) and len(ci) == 2 else "-"


def paired_test_name(c: dict[str, Any]) -> str:
    """A paired comparison's test, short: McNemar (greedy modes) or the sign test (sampled)."""
    return "McNemar" if c.get("test", "McNemar").startswith("McNemar") else "sign test"
