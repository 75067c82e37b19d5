"""Cost of the letter telemetry (`LetterTelemetry.on_rollouts`, docs/aqua.md) next to a GRPO policy update.

One RL step's rollouts: P prompts x G completions, on the BENCHMARKS.md CPU model shape (4 layers, d_model 256,
vocab 8192), fp32, 2 threads, random weights (cost does not depend on them). Times, as medians over --reps:
- update: the policy's log-probabilities of the completions (stages/rl.completion_logprobs), forward + backward;
- telemetry: the hook on the same batch through the RL stage's Scorer (policy and reference = two models):
  letter logits at "Final Answer:" for every row + per-token log-probs of every completion, both models.
Sampling is not timed (it is usually the largest part of a step), so `overhead_per_step` (telemetry / update /
kl_every) is an upper bound on the share it adds to a step.

    .venv/bin/python bench/letter_telemetry.py [--prompts 8] [--group 8] [--prompt-len 96] [--completion-len 128]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count  # noqa: E402


class ByteTokens:
    """A stand-in tokenizer (bytes mod vocab): the telemetry only needs `encode`; the letters are then single
    tokens only bare, so the hook takes its fallback path (context ending in ": "), same cost."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab for b in text.encode()]


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--prompts", type=count, default=8)
    ap.add_argument("--group", type=count, default=8, help="completions a prompt (default 8)")
    ap.add_argument("--prompt-len", type=count, default=96)
    ap.add_argument("--completion-len", type=count, default=128, help="tokens a completion, its answer line included")
    ap.add_argument("--reps", type=count, default=3, help="timed runs of each, after one warm-up (default 3)")
    ap.add_argument("--kl-every", type=count, default=10, help="rl.kl_every: RL steps a telemetry step")
    ap.add_argument("--threads", type=count, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # random weights put every row on one letter: the collapse alarm would fire on every repetition
    logging.getLogger("nanorl.multichoice").setLevel(logging.ERROR)

    from nanorl.api import Example, RolloutBatch, StageInfo
    from nanorl.config import resolve
    from nanorl.model import GPT
    from nanorl.multichoice import LetterTelemetry
    from nanorl.stages.rl import ModelScorer, completion_logprobs

    cfg = resolve(
        overrides=["model.depth=4", "model.n_embd=256", "model.n_head=2", "model.vocab_size=8192", "model.seq_len=512"]
    ).model
    torch.manual_seed(0)
    policy, reference = GPT(cfg), GPT(cfg)
    policy.init_weights()
    reference.init_weights()
    device, dtype = torch.device("cpu"), torch.float32
    tok = ByteTokens(cfg.vocab_size)
    P, G, C = args.prompts, args.group, args.completion_len
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist() for _ in range(P)]
    body = "x" * (C - len("\nFinal Answer: C"))
    texts = [f"{body}\nFinal Answer: {'ABCDE'[r % 5]}" for r in range(P * G)]
    comp_ids = [tok.encode(t) for t in texts]
    batch = RolloutBatch(
        step=args.kl_every,
        examples=[Example(id=str(i), question="q", answer="A", options=list("ABCDE")) for i in range(P)],
        group_size=G,
        prompt_ids=prompts,
        completions=texts,
        completion_ids=comp_ids,
        answers=["A"] * (P * G),
        rewards=[0.0] * (P * G),
        correct=[False] * (P * G),
        scorer=ModelScorer(tok, policy, lambda: reference, device, dtype),
    )
    hook = LetterTelemetry("bench.letters", task="bench")

    def update() -> None:
        policy.train()
        lp = completion_logprobs(policy, prompts, comp_ids, device, dtype)
        lp.sum().backward()
        policy.zero_grad(set_to_none=True)

    def telemetry() -> None:
        hook.on_stage_start(StageInfo("b", "/tmp", "rl", "bench", {"rl": {"kl_every": args.kl_every}}, 1))
        out = hook.on_rollouts(batch)
        assert "rl/kl_letter_mean" in out

    def median_s(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_update, t_tel = median_s(update), median_s(telemetry)
    ratio = t_tel / t_update
    result = {
        "bench": "letter_telemetry",
        "prompts": P,
        "group": G,
        "prompt_len": args.prompt_len,
        "completion_len": C,
        "update_s": round(t_update, 3),
        "telemetry_s": round(t_tel, 3),
        "telemetry_over_update": round(ratio, 2),
        "kl_every": args.kl_every,
        "overhead_per_step": round(ratio / args.kl_every, 3),
    }
    print(f"{'what':<34} {'seconds':>8}")
    print(f"{'policy update (fwd + bwd)':<34} {t_update:>8.3f}")
    print(f"{'letter telemetry (KL step)':<34} {t_tel:>8.3f}")
    print(f"telemetry / update = {ratio:.2f}; per step at kl_every={args.kl_every}: {ratio / args.kl_every:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
