"""One GRPO step on the BENCHMARKS.md shape: 8 prompts x 8 completions, 64-token prompts and completions, beta=0,
one optimizer step per rollout (the shape of ../shared/anchors/trl_grpo_bench.sh).

rollout: the engine samples 64 completions (each prompt prefilled once, then 8 rows);
train: the stage's `policy_gradient` (each prompt computed once, the fused loss) + the Muon/AdamW step.
Rewards are a fixed function of the sampled tokens (the benchmark measures compute, not learning).

    .venv/bin/python bench/grpo_step.py [--steps 3] [--threads 2] [--trl-step-s S] [--compile]

--compile samples with the compiled decode step (config engine.compile); its compile falls in the warm-up step.

Compare side by side: run `bash ../shared/anchors/trl_grpo_bench.sh` first and pass its grpo.step_s.median as
--trl-step-s (the default, 12.8, is BENCHMARKS.md's figure from a machine ~2x slower than the one we ran on).

Prints a table, then one JSON object as the last line. Goal (issue 5): >= 2.5x TRL's GRPOTrainer, side by side.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import StubTokenizer, arg_parser, count, load_note, model_and_cfg, print_table  # noqa: E402


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--steps", type=count, default=3, help="timed steps, after one warm-up step (default 3)")
    ap.add_argument("--threads", type=count, default=2)
    # BENCHMARKS.md's figure came from a slower machine: pass the anchor's step_s.median measured right before
    ap.add_argument("--trl-step-s", type=float, default=12.8, help="TRL's seconds per step to compare against")
    ap.add_argument("--compile", action="store_true", help="sample with the compiled decode step")
    args = ap.parse_args()
    import torch

    from nanorl.engine import Engine
    from nanorl.optim import Optimizers
    from nanorl.stages.rl import group_advantages, policy_gradient

    model, cfg = model_and_cfg(args.threads)
    opt = Optimizers(model, cfg.optim, lr_mult=0.05)
    engine = Engine(model, StubTokenizer(), compile=args.compile)
    P, G, L, C = 8, 8, 64, 64
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cpu")
    roll, train = [], []
    for step in range(args.steps + 1):  # the first step warms up
        prompts = [torch.randint(0, 8192, (L,), generator=gen).tolist() for _ in range(P)]
        t0 = time.perf_counter()
        groups = engine.sample(prompts, num_samples=G, max_new_tokens=C, temperature=1.0, seed=step)
        t1 = time.perf_counter()
        comps = [s.tokens for g in groups for s in g]
        rewards = torch.tensor([float(c[0] % 2) for c in comps]).view(P, G)
        adv, _ = group_advantages(rewards, std_normalize=True)
        model.train()
        mask = torch.ones(P * G, C)
        policy_gradient(model, prompts, comps, adv.view(-1), mask, float(mask.sum()), dev, torch.float32, 0.2)
        opt.step()
        t2 = time.perf_counter()
        if step:
            roll.append(t1 - t0)
            train.append(t2 - t1)
    r, t = statistics.median(roll), statistics.median(train)
    total = r + t
    rows = [("rollout (64 x 64 new)", f"{r:.2f} s"), ("train (fwd+bwd+step)", f"{t:.2f} s"),
            ("step", f"{total:.2f} s"), ("completions/s", f"{P * G / total:.1f}"),
            (f"vs TRL {args.trl_step_s} s/step", f"{args.trl_step_s / total:.2f}x")]  # fmt: skip
    decode = "compiled decode" if args.compile else "eager decode"
    title = f"GRPO step, BENCHMARKS shape, {decode}, {args.threads} threads ({load_note()})"
    print_table(title, ("part", "time"), rows)
    print(json.dumps({"bench": "grpo_step", "rollout_s": round(r, 3), "train_s": round(t, 3),
                      "step_s": round(total, 3), "trl_step_s": args.trl_step_s,
                      "vs_trl": round(args.trl_step_s / total, 2), "compile": args.compile, "threads": args.threads,
                      "load": load_note()}))  # fmt: skip


if __name__ == "__main__":
    main()
