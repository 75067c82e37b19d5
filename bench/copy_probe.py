"""Does a checkpoint copy the options? Teacher-forced accuracy on the `arith` task's rationales, by token role.

The level-1 rationale ends with a walk over the options (`B) 151: 1 vs 1 yes`). Writing an option there means
copying it from the prompt; its last digit is the one copy that cannot be guessed from the answer (the leading
digits of close options are the answer's). A model that has not learned the copy writes a digit near the
answer's instead, and its accuracy stays far below the goal whatever SFT and RL do (docs/benchmarks.md,
seventh session). This probe feeds the gold rationale of dev questions and reports the share of tokens the
model predicts (argmax) right, per role:

- copy_last:  the last digit of an option written in the walk (the copy that matters)
- copy_other: the option's other digits
- operand:    the digits of the column lines (`ones: 4 + 6 =`), taken from the question's numbers (the carry
              or borrow digit too)
- verdict:    the walk's `yes` / `no`
- other:      every other rationale token

A base checkpoint is fed the pretraining text (the prompt, a blank line, the rationale), a later stage the chat
rendering. Cheap (seconds), so it can watch a base run's checkpoints while it trains.

    .venv/bin/python bench/copy_probe.py RUN_DIR [--stages base,sft] [--examples 200]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _shape import arg_parser, count, print_table  # noqa: E402

ROLES = ("copy_last", "copy_other", "operand", "verdict", "other")
WALK = re.compile(r"^[A-E]\) (\d+): \d vs \d (yes|no)$", re.M)
COLUMN = re.compile(r"^(?:ones|tens): ([^=]+)=", re.M)  # the digits left of "=" come from the question


def char_roles(text: str, start: int) -> list[str]:
    """The role of every character of `text` from `start` on (the rationale); before it: None (not scored)."""
    roles: list[str | None] = [None] * start + ["other"] * (len(text) - start)
    for m in WALK.finditer(text, start):
        s, e = m.span(1)
        roles[s : e - 1] = ["copy_other"] * (e - 1 - s)
        roles[e - 1] = "copy_last"
        roles[m.start(2) : m.end(2)] = ["verdict"] * (m.end(2) - m.start(2))
    for m in COLUMN.finditer(text, start):
        for i in range(*m.span(1)):
            if text[i].isdigit():
                roles[i] = "operand"
    return roles


def probe(run_dir: Path, stage: str, n: int) -> dict[str, float]:
    from nanorl import checkpoint as ckpt
    from nanorl.config import from_toml_file
    from nanorl.model import GPT
    from nanorl.plugins import get_plugins
    from nanorl.tokenizer import Tokenizer

    cfg = from_toml_file(run_dir / "run.toml")
    tok = Tokenizer.load(run_dir / "tokenizer")
    task = get_plugins().task(cfg.task)
    model = GPT(cfg.model)
    ckpt.load(run_dir / stage, model)
    model.eval()
    hits = dict.fromkeys(ROLES, 0)
    counts = dict.fromkeys(ROLES, 0)
    for ex in task.load("dev")[:n]:
        target = task.target(ex)
        if stage == "base":  # the pretraining document: one text, so encode it whole (after <|bos|>)
            prompt = task.prompt(ex)[0]["content"] + "\n\n"
            ids = tok.encode(prompt + target, bos=True)
            text, start, first = prompt + target, len(prompt), 1
        else:  # the chat rendering: the rationale's tokens follow <|assistant_start|>
            head = tok.render_for_completion(task.prompt(ex))
            ids = head + tok.encode(target)
            text, start, first = target, 0, len(head)
        roles = char_roles(text, start)
        # a token's role is its last character's (a digit token may carry the space before it); `text` starts
        # where the token ids from `first` on start
        ends, pos = [], 0
        for t in ids[first:]:
            pos += len(tok.decode([t]))
            ends.append(pos - 1)
        with torch.no_grad():
            pred = model(torch.tensor([ids]))[0, first - 1 : -1].argmax(-1).tolist()
        for t, p, end in zip(ids[first:], pred, ends, strict=True):
            role = roles[end] if end < len(roles) else None
            if role is not None:
                hits[role] += int(t == p)
                counts[role] += 1
    return {r: hits[r] / counts[r] for r in ROLES if counts[r]}


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("run_dir", type=Path, help="a run directory (runs/<name>) of the arith task")
    ap.add_argument("--stages", default="base,sft", help="comma-separated stages with a checkpoint")
    ap.add_argument("--examples", type=count, default=200, help="dev questions to feed")
    ap.add_argument("--threads", type=count, default=1)
    args = ap.parse_args()
    # a wrong folder or a stage not run yet: one line saying which, not a traceback from deep in the loader
    if not (args.run_dir / "run.toml").is_file():
        ap.error(f"{args.run_dir} holds no run.toml: give a run folder, e.g. $NANORL_HOME/runs/<name>")
    from nanorl.checkpoint import has_checkpoint  # a stage still training has one (this probe can watch it)

    missing = [s for s in args.stages.split(",") if not has_checkpoint(args.run_dir / s)]
    if missing:
        ap.error(f"no checkpoint for {', '.join(missing)} in {args.run_dir}: pick stages that have one with --stages")
    torch.set_num_threads(args.threads)
    results = {s: probe(args.run_dir, s, args.examples) for s in args.stages.split(",")}
    rows = [(f"{stage}: {role}", f"{acc:.3f}") for stage, res in results.items() for role, acc in res.items()]
    print_table(f"teacher-forced accuracy, {args.examples} dev rationales", ("stage: role", "accuracy"), rows)
    print(json.dumps({"bench": "copy_probe", "run": str(args.run_dir), "examples": args.examples, **results}))


if __name__ == "__main__":
    main()
