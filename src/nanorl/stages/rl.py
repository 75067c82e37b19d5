"""Stage `rl`: GRPO (Shao et al. 2024, DeepSeekMath) on the task's train prompts, rewarded by its reward functions.

One step:
1. take a batch of `rl.prompts_per_step` train prompts (the next in a fixed shuffle per epoch; ranks take
   disjoint prompts);
2. sample G = `rl.group_size` completions of each with the engine (each prompt prefilled once, then G rows);
3. reward each completion: r = sum_k w_k * reward_k(example, completion, answer), with the weights of
   `rl.rewards` (or the task's `default_rewards`), each reward looked up by name in the plugin registry;
   with `rl.dynamic_sampling` (DAPO, Yu et al. 2025), keep only the groups whose rewards differ and repeat 1-3
   with the next batch until prompts_per_step such groups (per rank) are found or `rl.max_sample_batches`
   batches were sampled: near SFT's ceiling most groups are all right and carry no signal;
4. advantages per group: A_i = r_i - mean(r), divided by (std(r) + 1e-4) when `rl.std_normalize`;
   a group whose rewards are all equal (zero variance) has A = 0: counted, and dropped when `rl.drop_zero_variance`;
5. the loss over the completion tokens t of every kept row i (token-level normalisation, as DAPO):

       rho_it = exp(logp_theta(t) - logp_old(t))
       L = (1 / N) * sum_{i,t} m_it * [ -min(rho_it * A_i, clip(rho_it, 1 - eps, 1 + eps) * A_i) + beta * KL_it ]
       KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (the k3 estimator, Schulman 2020)

   m_it = 1 for sampled tokens of completions that finished (a truncated completion is masked whole unless
   `rl.mask_truncated` is off, a tool's output tokens are masked), N = sum m_it. logp_old is the policy that
   sampled (detached); with `rl.ppo_epochs` = 1 the ratio is 1 and the clip is inactive, with more epochs it
   bounds each pass's change.
6. one optimizer step per epoch (Muon + AdamW, at `rl.lr` times the optim rates, constant; Muon's also times
   `rl.matrix_lr_scale`); none when no token is left to learn from (every group dropped or truncated).

Prompts whose rows are all masked are left out of the update's forward and backward passes (`update_chunks`):
they add nothing to the loss or its gradient.

The training forward computes each prompt once, too: the prompt's keys and values (with gradient) go into a
small autograd-friendly cache (`PrefixCache`) whose rows are repeated for the G completions, so the backward
pass sums the G completions' gradients through the shared prompt instead of recomputing it G times.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Any, Literal

import numpy as np
import torch

from nanorl.api import Example, NanorlError, Reward, RolloutBatch
from nanorl.device import (
    all_reduce_mean,
    any_rank,
    autocast,
    check_training_dtype,
    is_distributed,
    max_over_ranks,
    mean_and_failed,
    min_over_ranks,
    raise_together,
    together,
)
from nanorl.optim import Optimizers
from nanorl.stages.common import (
    ENTROPY_ROWS,
    Context,
    HeldError,
    attention_entropy,
    broadcast_params,
    entropy_due,
    sync_grads,
    to_device,
    warn_past_context,
)

STD_EPS = 1e-4  # added to the group std before dividing (TRL uses the same), so a tiny spread can't blow up A


# ---- rewards and advantages ---------------------------------------------------------------------------------
def resolve_rewards(cfg, task) -> list[tuple[Reward, float]]:
    from nanorl.plugins import get_plugins

    weights = cfg.rl.rewards or dict(task.default_rewards)
    if not weights:
        raise NanorlError(
            f"task {task.name!r} names no default rewards and rl.rewards is empty",
            hint="set rl.rewards, e.g. rl.rewards=arith.correct:1",
            exit_code=2,
        )
    plugins = get_plugins()
    return [(plugins.reward(name), float(w)) for name, w in weights.items()]


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, G) -> (P,) bool: the groups whose rewards are all equal (no signal: every advantage is 0)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) == 0


def group_advantages(rewards: torch.Tensor, std_normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (P, G) -> (advantages (P, G), zero_variance (P,) bool)."""
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    zero_var = zero_variance(rewards)
    if std_normalize and rewards.numel():  # (no group at all: a dynamically sampled step that found none)
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + STD_EPS)
    return adv, zero_var


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of the module docstring over rows (R, C): logp/old_logp/ref_logp/mask (R, C), advantages (R,).

    `n_tokens` is N of the formula (default: mask.sum()); pass the whole batch's count when the batch is split
    into chunks, so the chunks' losses add up to the batch loss. Returns (loss, sums for logging).
    """
    mask = mask.to(logp.dtype)
    N = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=logp.dtype)
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]
    per_tok = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * A)
    stats = {"clipped": (((ratio - 1).abs() > epsilon).to(logp.dtype) * mask).sum().detach()}
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_tok = per_tok + beta * kl
        stats["kl"] = (kl * mask).sum().detach()
    loss = (per_tok * mask).sum() / N.clamp_min(1)
    return loss, stats


# ---- the shared-prompt forward --------------------------------------------------------------------------------
class PrefixCache:
    """A KV cache for training: the prompts' keys/values (with gradient), reused by the completions' rows.

    It speaks the model's cache protocol (`pos`, `insert(layer, k, v)`): the first forward (the prompts, P rows)
    stores its keys/values; the second (P*G completion rows) gets each prompt's repeated G times in front of its
    own. No in-place writes, so autograd flows through both passes.
    """

    def __init__(self, group_size: int):
        self.G = group_size
        self.pos = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.key_mask: torch.Tensor | None = None  # (rows, positions) True = a real token (ragged prompts)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.k:
            self.k[layer], self.v[layer] = k, v
            return k, v
        pk = self.k[layer].repeat_interleave(self.G, dim=0) if self.G > 1 else self.k[layer]
        pv = self.v[layer].repeat_interleave(self.G, dim=0) if self.G > 1 else self.v[layer]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], device, dtype, nll_weights=None
):  # fmt: skip
    """log p(completion token) under `model`, (P*G, C) padded with 0 past each completion's end.

    `prompts`: P prompts; `completions`: their P*G completions, grouped (rows i*G .. i*G+G-1 belong to prompt
    i). Each prompt is run once (prompts of different lengths left-padded, the padding masked out of attention);
    its last token starts each completion row's input.

    With `nll_weights` (P*G, C): returns (sum of nll_weights·(-log p), log p detached), the weighted sum through
    the model's fused loss, which never keeps the (tokens x vocab) logits for backward.
    """
    P = len(prompts)
    G = len(completions) // P
    C = max(1, max(len(c) for c in completions))
    Lp = max(len(p) for p in prompts) - 1
    pads = [Lp - (len(p) - 1) for p in prompts]
    cache = PrefixCache(G)
    prefix = to_device([[p[0]] * n + p[:-1] for n, p in zip(pads, prompts, strict=False)], torch.long, device)
    if any(pads):
        pad_t = torch.tensor(pads, device=device)[:, None]
        cache.key_mask = torch.arange(Lp, device=device)[None, :] >= pad_t
    # the rows are built on the host and copied once (not a copy per row): the input is the prompt's last token and
    # the completion but its last token, the target the completion, padded with 0 and -1 to C
    inp_rows, tgt_rows = [], []
    for r, comp in enumerate(completions):
        row = [prompts[r // G][-1], *comp[:-1]]
        inp_rows.append(row + [0] * (C - len(row)))
        tgt_rows.append(list(comp) + [-1] * (C - len(comp)))
    inp, tgt = to_device(inp_rows, torch.long, device), to_device(tgt_rows, torch.long, device)
    with autocast(device, dtype):
        model(prefix, kv_cache=cache, logits="none")  # fills the cache
        if cache.key_mask is not None:
            ones = torch.ones(P, C, dtype=torch.bool, device=device)
            cache.key_mask = torch.cat([cache.key_mask, ones], dim=1).repeat_interleave(G, dim=0)
        if nll_weights is not None:
            weighted, nll = model(inp, tgt, kv_cache=cache, loss_weights=nll_weights[:, :C])
            return weighted, -nll.float()
        nll = model(inp, tgt, kv_cache=cache, loss_reduction="none")
    return -nll.to(torch.promote_types(nll.dtype, torch.float32))


def token_masks(samples, keep_rows: list[bool], mask_truncated: bool) -> list[list[float]]:
    """m_it of the loss, per completion token: 0 for a tool's (forced) tokens, for rows of dropped groups, and,
    with `mask_truncated`, for every token of a completion cut at max_new_tokens."""
    out = []
    for s, keep in zip(samples, keep_rows, strict=True):
        use = keep and (s.finished or not mask_truncated)
        out.append([0.0 if (forced or not use) else 1.0 for forced in s.forced])
    return out


def policy_gradient(
    model, prompts, completions, advantages, mask, n_tokens, device, dtype, epsilon, beta=0.0, old_logp=None,
    reference=None,
):  # fmt: skip
    """One chunk of the GRPO update: the loss of the module docstring over these rows, and its backward
    (gradients accumulate in `model`). `old_logp` None means the first pass, whose policy is the one that sampled.
    `reference` (a function returning the frozen model) is needed when beta > 0 and gives the KL statistic.
    Returns (loss, stats, log p detached).
    """
    if old_logp is None and beta == 0:
        # The first pass starts at the sampling policy: rho = 1, inside the clip, so the loss's gradient is known
        # before the forward, dL/dlogp_it = -A_i·m_it / N: a weighted NLL through the fused loss (no tokens x vocab
        # tensors kept for backward). The loss and its statistics are the formula's, from the detached log-probs.
        weights = advantages[:, None] * mask / n_tokens
        surrogate, logp = completion_logprobs(model, prompts, completions, device, dtype, nll_weights=weights)
        surrogate.backward()
    else:
        logp = completion_logprobs(model, prompts, completions, device, dtype)
    ref_lp = None
    if reference is not None:
        with torch.no_grad():
            ref_lp = completion_logprobs(reference(), prompts, completions, device, dtype)
    old = logp.detach() if old_logp is None else old_logp
    loss, stats = grpo_loss(logp, old, advantages, mask, epsilon, beta, ref_lp, n_tokens=n_tokens)
    if logp.requires_grad:
        loss.backward()
    return loss.detach(), stats, logp.detach()


def rollout_entropy(ctx: Context, model, ro: Rollouts, G: int) -> dict[str, float]:
    """The attention-entropy telemetry on the policy's own samples: the first completion of each of the first
    ENTROPY_ROWS groups, after its prompt, measured at the completion's positions."""
    rows = [ro.prompt_ids[i] + list(ro.samples[i * G].tokens) for i in range(min(ENTROPY_ROWS, len(ro.prompt_ids)))]
    if not rows:
        return {}
    T = min(max(len(r) for r in rows), ctx.cfg.model.seq_len)
    idx = to_device([r[:T] + [0] * (T - len(r[:T])) for r in rows], torch.long, ctx.device)
    counted = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        counted[b, len(ro.prompt_ids[b]) : min(len(r), T)] = True
    return attention_entropy(ctx, model, idx, counted)


# Completion rows per forward + backward of the update at most (a GPU takes fewer where they do not fit:
# update_rows)
UPDATE_ROWS = 64


def update_rows(ctx: Context, longest: int) -> int:
    """The most completion rows one forward + backward of the update may take, `longest` the step's longest
    prompt plus rl.max_new_tokens: UPDATE_ROWS, and on a GPU also no more than fit its memory by the training
    estimate (nanorl.model.counts), the frozen reference model's float32 weights set aside when the run uses
    it (rl.beta or the KL telemetry). Any chunking gives the same gradient (the loss is a sum over tokens
    divided by the step's count), so this trades only speed for memory."""
    if ctx.device.type != "cuda":
        return UPDATE_ROWS
    from nanorl.model.counts import count_params, rows_that_fit

    rcfg, mcfg = ctx.cfg.rl, ctx.cfg.model
    # the ranks decide together (an error on one rank alone would leave the others waiting in their next
    # collective): the step's longest row over every rank, and the fewest rows that fit any rank's GPU
    longest = int(max_over_ranks(longest)[0])
    memory = torch.cuda.get_device_properties(ctx.device).total_memory
    reference = 4 * count_params(mcfg)["total"] if rcfg.beta > 0 or rcfg.kl_every else 0
    fit = rows_that_fit(mcfg, memory, seq_len=min(longest, mcfg.seq_len), reserved=reference)
    fit = int(min_over_ranks(fit)[0])
    if fit < rcfg.group_size:  # a prompt's G rows go through together (they share its keys and values)
        raise NanorlError(
            f"rl: a group of {rcfg.group_size} completions of {longest} tokens (prompt and rl.max_new_tokens) does"
            f" not fit a training step in this GPU's {memory / 2**30:.0f} GiB (estimated: {fit} rows fit)",
            hint="lower rl.group_size or rl.max_new_tokens, or set rl.kl_every=0 (and rl.beta=0) to free the"
            " reference model's memory",
        )
    return min(fit, UPDATE_ROWS)


def update_chunks(masks: list[list[float]], G: int, max_rows: int) -> list[list[int]]:
    """The prompts the update runs on, in chunks of at most max_rows completion rows (one forward + backward each).

    A prompt whose G rows are masked whole (a dropped zero-variance group, or every completion truncated) adds
    nothing to the loss or its gradient, so it is left out: near SFT's ceiling most groups are dropped, and their
    forward and backward passes were most of the update's time.
    """
    active = [i for i in range(len(masks) // G) if any(any(m) for m in masks[i * G : (i + 1) * G])]
    per = max(1, max_rows // G)
    return [active[s : s + per] for s in range(0, len(active), per)]


# ---- the Scorer handed to telemetry hooks -----------------------------------------------------------------------
class ModelScorer:
    """`nanorl.api.Scorer` over the policy and the frozen reference (no gradients)."""

    def __init__(self, tok, policy, reference_fn, device, dtype):
        self.tok, self.policy, self.reference_fn = tok, policy, reference_fn
        self.device, self.dtype = device, dtype

    def _model(self, which: Literal["policy", "reference"]):
        if which == "policy":
            return self.policy
        if which == "reference":
            return self.reference_fn()
        raise ValueError(f"which must be 'policy' or 'reference', not {which!r}")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    @torch.no_grad()
    def next_token_logits(self, which, contexts, candidates) -> list[list[float]]:
        from nanorl.model import KVCache

        model = self._model(which)
        model.eval()
        cand = torch.tensor(list(candidates), device=self.device)
        out: list[list[float]] = []
        for s in range(0, len(contexts), 64):  # 64 contexts per forward pass, left-padded and masked
            chunk = [list(c) for c in contexts[s : s + 64]]
            L = max(len(c) for c in chunk)
            pads = [L - len(c) for c in chunk]
            x = torch.tensor([[c[0]] * n + c for n, c in zip(pads, chunk, strict=True)], device=self.device)
            cache = KVCache(len(chunk), model.config, L, device=self.device, dtype=self.dtype)
            cache.key_mask = (
                torch.arange(L, device=self.device)[None, :] >= torch.tensor(pads, device=self.device)[:, None]
            )
            with autocast(self.device, self.dtype):
                logits = model(x, kv_cache=cache, logits="last")[:, -1].float()
            out += logits[:, cand].tolist()
        return out

    @torch.no_grad()
    def token_logprobs(self, which, prompt_ids, completions) -> list[list[float]]:
        model = self._model(which)
        model.eval()
        comps = [list(c) for c in completions]
        if not comps:
            return []
        lp = completion_logprobs(model, [list(prompt_ids)], comps, self.device, self.dtype)
        return [lp[r, : len(c)].tolist() for r, c in enumerate(comps)]


# ---- rollouts ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
    """Sampled and rewarded groups: the completions of prompt i are rows i·G .. i·G + G - 1 of `samples`."""

    examples: list[Example]
    prompt_ids: list[list[int]]
    samples: list  # nanorl.engine.Sample, P·G
    answers: list
    rewards: torch.Tensor  # (P, G) float32
    correct: list[bool]

    @property
    def zero_var(self) -> torch.Tensor:
        return zero_variance(self.rewards)

    def groups(self, keep: list[bool]) -> Rollouts:
        """The groups i with keep[i], whole."""
        G = self.rewards.size(1)
        rows = [i * G + j for i, k in enumerate(keep) if k for j in range(G)]
        idx = [i for i, k in enumerate(keep) if k]
        return Rollouts(
            [self.examples[i] for i in idx], [self.prompt_ids[i] for i in idx], [self.samples[r] for r in rows],
            [self.answers[r] for r in rows], self.rewards[idx], [self.correct[r] for r in rows],
        )  # fmt: skip

    @staticmethod
    def join(parts: list[Rollouts]) -> Rollouts:
        return Rollouts(
            [e for p in parts for e in p.examples], [x for p in parts for x in p.prompt_ids],
            [x for p in parts for x in p.samples], [x for p in parts for x in p.answers],
            torch.cat([p.rewards for p in parts]), [x for p in parts for x in p.correct],
        )  # fmt: skip


def sample_groups(engine, tok, task, rewards, examples: list[Example], rcfg, seed: int) -> Rollouts:
    """G = rl.group_size completions of each example's prompt (each prompt prefilled once), rewarded:
    r = sum_k w_k * reward_k(example, completion, answer)."""
    G = rcfg.group_size
    prompt_ids = [tok.render_for_completion(task.prompt(ex)) for ex in examples]
    groups = engine.sample(prompt_ids, G, rcfg.max_new_tokens, rcfg.temperature, rcfg.top_k, seed=seed)
    samples = [s for g in groups for s in g]
    answers = [task.extract(s.text) for s in samples]
    ex_rows = [ex for ex in examples for _ in range(G)]
    r = [sum(w * rw(ex, s.text, a) for rw, w in rewards) for ex, s, a in zip(ex_rows, samples, answers, strict=True)]
    correct = [bool(task.is_correct(ex, a)) for ex, a in zip(ex_rows, answers, strict=True)]
    return Rollouts(examples, prompt_ids, samples, answers, torch.tensor(r, dtype=torch.float32).view(-1, G), correct)


# A step's k-th further batch (rl.dynamic_sampling) samples with its first batch's seed + k·ROUND_SEED_STRIDE: far
# enough apart that no (step, batch) pair shares another's random stream
ROUND_SEED_STRIDE = 2**40


# ---- the stage ------------------------------------------------------------------------------------------------
def prompts_for_step(
    examples: list[Example], step: int, per_step: int, seed: int, rank: int, world: int
) -> list[Example]:
    """The prompts of one step on one rank: positions in a per-epoch shuffle, a pure function of the step."""
    n = len(examples)
    out = []
    for k in range(per_step):
        pos = (step * world + rank) * per_step + k
        epoch, i = divmod(pos, n)
        perm = np.random.default_rng([seed, 7, epoch]).permutation(n)  # 7: apart from the other stages' streams
        out.append(examples[int(perm[i])])
    return out


def run(ctx: Context) -> dict[str, Any]:
    from nanorl import checkpoint as ckpt

    cfg, rcfg, task = ctx.cfg, ctx.cfg.rl, ctx.task
    check_training_dtype(ctx.dtype, "rl")
    tok = ctx.tokenizer()
    rewards = resolve_rewards(cfg, task)
    train = ctx.examples("train")
    if not train:
        raise NanorlError(f"task {task.name} has no train examples for RL")
    G, P = rcfg.group_size, rcfg.prompts_per_step
    steps = rcfg.steps if rcfg.steps >= 0 else max(1, len(train) // (P * ctx.world_size))
    sdir = ctx.stage_dir("rl")

    model = together(ctx.previous_model, "rl")
    optim_cfg = dataclasses.replace(cfg.optim, matrix_lr=cfg.optim.matrix_lr * rcfg.matrix_lr_scale)
    opt = Optimizers(model, optim_cfg, lr_mult=rcfg.lr)
    start = batches = 0  # batches: prompt batches sampled so far, the position in the prompt stream
    if any_rank(ckpt.has_checkpoint(sdir)):  # decided together: a rank that lacks it fails in the load, with all
        state = together(ctx.load_checkpoint, sdir, model, opt, restore_rng=True)
        start = int(state["step"])
        batches = int(state.get("batches", start))
    ref_holder: dict[str, Any] = {}

    def reference():
        if "m" not in ref_holder:  # the model RL started from, frozen (loaded again: not the resumed policy)
            ref = ctx.previous_model("rl")
            ref.requires_grad_(False)
            ref.eval()
            ref_holder["m"] = ref
        return ref_holder["m"]

    broadcast_params(model)
    engine = ctx.engine(model)
    scorer = ModelScorer(tok, model, reference, ctx.device, ctx.dtype)
    info = ctx.info("rl", steps)
    info.answer_counts = dict(Counter(ex.answer for ex in train))  # hooks' baselines (StageInfo)
    ctx.bus.stage_start(info)
    if start and ctx.rank == 0:  # (after the stage's start line, as the supervised stages)
        ctx.bus.console.print(f"[dim]rl: resuming at step {start}/{steps}[/]", highlight=False)
    last: dict[str, Any] = {}
    t_stage = time.time()
    ctx.stop_signal.console = ctx.bus.console  # from here a SIGTERM lets the step end, saves and stops
    # An error on one rank is raised on every rank together, its flag carried by the all-reduces each step makes
    # anyway: dynamic sampling's count of kept groups, the count of kept tokens, the gradients' (`sync_grads`).
    # What rank 0 alone does at a step's end (hooks, metrics, the checkpoint) is told at the next step's first.
    held = HeldError()
    for step in range(start, steps):
        t0 = time.time()
        # ---- rollouts: a batch of P prompts; with rl.dynamic_sampling further batches until P groups a rank
        # carry signal (or rl.max_sample_batches were sampled)
        sampled: list[Rollouts] = []
        kept: list[Rollouts] = []
        n_kept = 0
        while True:
            examples = prompts_for_step(train, batches, P, cfg.seed, ctx.rank, ctx.world_size)
            seed = (cfg.seed * 1_000_003 + step) * 64 + ctx.rank + ROUND_SEED_STRIDE * len(sampled)
            ro = held.run(sample_groups, engine, tok, task, rewards, examples, rcfg, seed)
            batches += 1
            if ro is not None:
                warn_past_context(ctx, "rl", ro.prompt_ids, rcfg.max_new_tokens, "rl.max_new_tokens")
                sampled.append(ro)
            if not rcfg.dynamic_sampling:
                kept += [ro] if ro is not None else []
                break
            if ro is not None:
                informative = (~ro.zero_var).tolist()
                room = P - n_kept  # a rank's batch holds at most P groups
                keep = [ok and sum(informative[: i + 1]) <= room for i, ok in enumerate(informative)]
                kept.append(ro.groups(keep))
                n_kept += sum(keep)
            # the ranks stop together (the same number of batches each), on the step's total or an error
            (mean_kept,), failed = mean_and_failed([float(n_kept)], held.failed, ctx.device)
            total = mean_kept * ctx.world_size
            if failed or total > P * ctx.world_size - 0.5 or len(sampled) >= rcfg.max_sample_batches:
                break
        t_sample = time.time() - t0
        batch = Rollouts.join(kept) if kept else None  # what it learns from (None: this rank failed)
        masks: list[list[float]] = []
        if batch is not None:
            prompt_ids, samples = batch.prompt_ids, batch.samples
            adv, zero_var = group_advantages(batch.rewards, rcfg.std_normalize)
            keep_row = (
                ~zero_var.repeat_interleave(G)
                if rcfg.drop_zero_variance
                else torch.ones(len(samples), dtype=torch.bool)
            )
            completions = [s.tokens for s in samples]
            masks = token_masks(samples, keep_row.tolist(), rcfg.mask_truncated)
        (n_tokens,), failed = mean_and_failed([float(sum(sum(m) for m in masks))], held.failed, ctx.device)
        if failed:
            raise_together(held.err)
        every = Rollouts.join(sampled)  # what the policy did: the step's statistics

        # ---- the policy update ----
        t1 = time.time()
        model.train()
        sums = {"clipped": 0.0, "kl": 0.0, "loss": 0.0}
        need_ref = rcfg.beta > 0 or (rcfg.kl_every and (step + 1) % rcfg.kl_every == 0)
        old: dict[int, torch.Tensor] = {}
        gnorm = 0.0
        longest = max((len(p) for p in prompt_ids), default=0) + rcfg.max_new_tokens
        chunks = update_chunks(masks, G, max_rows=update_rows(ctx, longest))
        for epoch in range(rcfg.ppo_epochs):
            try:  # an error (out of memory) is raised by every rank at the gradients' all-reduce below
                for ci, chunk in enumerate(chunks):
                    rows = [i * G + j for i in chunk for j in range(G)]
                    comps = [completions[k] for k in rows]
                    C = max(1, max(len(c) for c in comps))
                    mask = to_device([masks[r] + [0.0] * (C - len(masks[r])) for r in rows], torch.float32, ctx.device)
                    loss, st, logp = policy_gradient(
                        model, [prompt_ids[i] for i in chunk], comps, adv.view(-1)[rows].to(ctx.device), mask,
                        max(n_tokens, 1.0), ctx.device, ctx.dtype, rcfg.epsilon, rcfg.beta, old.get(ci),
                        reference if (need_ref and epoch == 0) or rcfg.beta > 0 else None,
                    )  # fmt: skip
                    old.setdefault(ci, logp)
                    sums["loss"] += float(loss)
                    sums["clipped"] += float(st["clipped"])
                    if epoch == 0:  # the KL of the policy that sampled (with beta > 0 later passes score it too)
                        sums["kl"] += float(st.get("kl", 0.0))
            except Exception as e:  # noqa: BLE001 - raised again, on every rank, just below
                held.err = e
            if n_tokens == 0:
                # no token to learn from on any rank: no step (a zero gradient would still move the weights
                # through the optimizers' momentum); and no chunk, so no error either
                break
            if sync_grads(opt.params, failed=held.failed):
                raise_together(held.err)
            gnorm = opt.step()
        t_train = time.time() - t1

        done = step + 1
        lens = [len(s.tokens) for s in every.samples]
        # n_tokens is the mean over ranks of their kept tokens, so the mean over ranks of these ratios (below) is
        # the step's sum over every rank / its total count. The first pass clips nothing (rho = 1): the clip
        # fraction counts the passes after it.
        n = max(n_tokens, 1.0)
        last = {
            # over everything sampled this step
            "reward": float(every.rewards.mean()),
            "acc": sum(every.correct) / len(every.correct),
            "completion_len": sum(lens) / len(lens),
            "truncated_frac": sum(not s.finished for s in every.samples) / len(lens),
            "zero_var_frac": float(every.zero_var.float().mean()),
            "signal_groups": float((~zero_var).sum()),  # the groups the update learnt from (rewards that differ)
            "sample_batches": len(sampled),
            "loss": sums["loss"] / rcfg.ppo_epochs,
            "clip_frac": sums["clipped"] / (n * (rcfg.ppo_epochs - 1)) if rcfg.ppo_epochs > 1 else 0.0,
            "grad_norm": gnorm,
            "sample_s": t_sample,
            "train_s": t_train,
            "tok_per_s": sum(lens) / max(time.time() - t0, 1e-9),
        }
        means = ["reward", "acc", "completion_len", "truncated_frac", "zero_var_frac", "signal_groups", "clip_frac"]
        if need_ref or rcfg.beta > 0:
            last["kl"] = sums["kl"] / n
            means.append("kl")
        # every rank's: one all-reduce for the means over ranks, and the total of signal groups
        avg = all_reduce_mean(torch.tensor([float(last[k]) for k in means], device=ctx.device)).tolist()
        last.update(zip(means, avg, strict=True))
        last["signal_groups"] *= ctx.world_size
        if is_distributed():  # the loss logged (and checked at the end) is the mean over ranks, the same on each
            last["loss"] = float(all_reduce_mean(torch.tensor(last["loss"], dtype=torch.float64, device=ctx.device)))
        if rcfg.kl_every and done % rcfg.kl_every == 0:
            # the hooks see the step's first batch as sampled: the policy's rollouts, not a selection of them
            ro = sampled[0]
            hook_batch = RolloutBatch(
                step=done, examples=ro.examples, group_size=G, prompt_ids=ro.prompt_ids,
                completions=[s.text for s in ro.samples], completion_ids=[s.tokens for s in ro.samples],
                answers=ro.answers, rewards=ro.rewards.view(-1).tolist(), correct=ro.correct, scorer=scorer,
            )  # fmt: skip
            last.update(held.run(ctx.bus.rollouts, "rl", hook_batch) or {})
        if entropy_due(ctx, done, steps):  # (rank 0 alone, as the hooks, the log and the checkpoint's files)
            last.update(held.run(rollout_entropy, ctx, model, every, G) or {})
        if rcfg.eval_every and done % rcfg.eval_every == 0 and done != steps:
            from nanorl.stages.eval import evaluate

            res = evaluate(ctx, model, "dev", "generative", min(ctx.cfg.eval.max_examples or 100, 100), samples=0)
            last["dev_acc"] = res["accuracy"]
        if done % cfg.telemetry.log_every == 0 or done == steps:
            held.run(ctx.bus.log, "rl", done, last)
        if ctx.checkpoint_due(done, steps, rcfg.checkpoint_every):
            held.run(ctx.save, "rl", model, opt, {"step": done, "batches": batches})
        if ctx._stopping:  # a SIGTERM stops the run after this step: not with "saved" when the save failed
            raise_together(held.err)
        ctx.end_step("rl", done)
    raise_together(held.err)  # what the last step's end met (once a stage: no collective a step)
    ctx.stop_signal.console = None
    ctx.save("rl", model, None, {"step": steps, "batches": batches})
    summary = {**last, "steps": steps, "seconds": time.time() - t_stage}
    ctx.bus.stage_end(info, summary)
    if not math.isfinite(summary.get("loss", 0.0)):  # the mean over ranks: every rank raises, or none
        raise NanorlError("rl: the loss is not finite", hint="lower rl.lr")
    return summary
