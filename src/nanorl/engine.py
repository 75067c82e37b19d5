"""The engine: sample completions from a GPT with a KV cache.

    engine = Engine(model, tokenizer, tools=task.tools())
    groups = engine.sample(prompts, num_samples=G, max_new_tokens=128, temperature=1.0, top_k=0, seed=0)
    groups[i][j]   # the j-th Sample of prompts[i]: .tokens, .finished, .forced, .text

How:
- The prompts of a batch are prefilled together, each ONCE; each cache row then serves G sample rows
  (`KVCache.share`): a group's completions share their prompt's keys and values, never recomputed per sample;
  on the CPU not copied either, a decode step reads them once per group (on a GPU each row gets a copy and
  decodes through the fused sdpa kernels). Prompts of different lengths are
  left-padded and the padding is masked out of attention (the cache's `key_mask`); rotary embeddings are
  relative, so the shift changes no attention score.
- Every step feeds one token per row: the row's sampled token, or the next forced token (a tool's output).
  A row stops at <|assistant_end|> (or <|bos|>); finished rows ride along until every row is done.
- Sampling: temperature (0: greedy; any T > 0, however small, is safe), top-k (0 or >= the vocabulary: all);
  inverse-CDF draws from a seeded `torch.Generator`, one uniform per row and step, so a seed fixes the samples
  of a call, cached or not. Not across calls that batch differently: the draws go to rows in order (prompts
  longest first, then `max_rows` per batch), so the same prompt with the same seed in another batch gets other
  samples (greedy ones excepted). Evaluation under torchrun therefore gives each rank whole batches at the
  seed one process gives them (`nanorl.stages.eval.sharded_records`).
- Precision: the forward runs under the run's autocast on CUDA (bf16 by default) and the KV cache holds that
  dtype; elsewhere autocast is off, so the forward and the cache use the weights' dtype whatever the run's
  `dtype` (a CPU run with dtype=bfloat16 samples in float32).
- `compile=True` (CPU): decode steps run as one compiled graph (`nanorl.compiled_decode`), ~1.35x the eager
  tokens/s after a 20-40 s compile; same draws, same samples up to rounding.
- Tool calls: when a row writes <|python_end|>, the text since its <|python_start|> goes to `tools["python"]`;
  a returned string is force-fed as <|output_start|> result <|output_end|>, then the row samples again.
  Forced tokens are marked (`Sample.forced`): RL must not train on them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanorl.device import autocast


@dataclass
class Sample:
    tokens: list[int]  # generated ids, including the stop token when it stopped
    finished: bool  # True: ended with a stop token; False: cut at max_new_tokens
    forced: list[bool] = field(default_factory=list)  # per token: written by a tool, not sampled
    text: str = ""  # the decoded completion, without the stop token


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of logits (R, V): greedy at temperature 0, else softmax(logits / T) over the top k.

    Sampling is by inverse CDF: one uniform draw per row, located in the running sum of the probabilities with
    a binary search. `torch.multinomial` draws an exponential per vocabulary entry instead; at 16 rows x 8,192
    it cost 5 ms a step, a fifth of a decode step on the CPU, against 0.3 ms here (bench/generate.py). The
    probabilities come from the fused softmax, one op where max, subtract and exp were three (300 vs 372 us
    a step with the caches cold, as they are after the lm_head's matmul)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        # each row's max subtracted first: a tiny T (1e-40) overflowed logits / T to inf, and the softmax of
        # infs is NaN, which drew an arbitrary token where the greedy one was meant
        logits = (logits - logits.amax(-1, keepdim=True)).div_(temperature)
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits, -1).cumsum_(-1)
    # the draw is scaled to each row's total (1 up to rounding), so it always lands inside the running sum
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device).mul_(cdf[:, -1:])
    # right=True: the first index whose cumulative weight exceeds u, so a zero-weight entry is never chosen
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(cdf.size(-1) - 1)


class Engine:
    def __init__(
        self, model, tokenizer, tools: dict[str, Callable[[str], str | None]] | None = None, dtype=None,
        compile: bool = False,
    ):  # fmt: skip
        self.model = model.module if hasattr(model, "module") else model
        self.tok = tokenizer
        self.tools = tools or {}
        param = next(self.model.parameters())
        self.device = param.device
        # compile: decode steps through one compiled graph (nanorl.compiled_decode), on the CPU, where per-op
        # cost is ~40% of an eager step; a GPU decodes through the fused sdpa kernels
        self.decoder = None
        if compile:
            if self.device.type != "cpu":
                raise ValueError(f"compiled decoding runs on the CPU; this model is on {self.device.type}")
            from nanorl.compiled_decode import CompiledDecoder

            self.decoder = CompiledDecoder(self.model)
        # the run's compute dtype: bf16 autocast on CUDA by default, else the weights' own
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else param.dtype)
        # the KV cache holds what the forward computes: autocast's dtype where autocast is on, else the weights'
        # own whatever the run's dtype says (autocast is CUDA's only: with dtype=bfloat16 on a CPU, a bfloat16
        # cache beside float32 queries failed in attention)
        amp_on = not isinstance(autocast(self.device, self.dtype), contextlib.nullcontext)
        self.cache_dtype = self.dtype if amp_on else param.dtype
        # the embedding may have more rows than the tokenizer has tokens (model.vocab_size is a ceiling): never
        # sample an id the tokenizer cannot decode
        self.n_vocab = tokenizer.vocab_size
        sp = tokenizer.special_id
        self.stop_ids = (sp("<|assistant_end|>"), sp("<|bos|>"))
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        num_samples: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        use_cache: bool = True,
        max_rows: int = 256,
    ) -> list[list[Sample]]:
        """`num_samples` completions of each prompt: a list (per prompt) of lists of Sample.

        Every forward pass of the call runs inside ONE autocast context (on CUDA; none elsewhere), so autocast's
        cache of the bf16 copies of the fp32 weights lives for the whole call: each weight is cast once, not at
        every decode step (the cache empties when the outermost autocast context exits). The cache only keeps
        casts made with gradients tracked, which inference mode turns off, so under autocast the call runs under
        no_grad. Without autocast it runs in inference mode: its tensors skip version counting and autograd
        bookkeeping, 6% more tokens/s on the CPU benchmark shape (2,228 -> 2,371, 8 alternating runs in one process,
        every pair faster); what it creates there (KV caches, the cached inference weights of InferenceLinear) is
        only read by no-gradient passes afterwards, which inference tensors allow."""
        if num_samples < 1 or max_new_tokens < 0:
            raise ValueError(f"num_samples must be >= 1 and max_new_tokens >= 0, not {num_samples}, {max_new_tokens}")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:  # nothing to condition on; in a ragged batch it would silently read a padding token's logits
            raise ValueError(f"prompt {empty[0]} is empty: a completion needs at least one prompt token (<|bos|>)")
        amp = autocast(self.device, self.dtype)
        grad_mode = torch.inference_mode() if isinstance(amp, contextlib.nullcontext) else torch.no_grad()
        with grad_mode, amp:
            return self._sample(prompts, num_samples, max_new_tokens, temperature, top_k, seed, use_cache, max_rows)

    def _sample(self, prompts, num_samples, max_new_tokens, temperature, top_k, seed, use_cache, max_rows):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        out: list[list[Sample] | None] = [None] * len(prompts)
        # longest first, so each batch holds prompts of similar length (less padding)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        per_batch = max(1, max_rows // num_samples)
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), per_batch):
                chunk = order[s : s + per_batch]
                rows = self._generate(
                    [list(prompts[i]) for i in chunk],
                    num_samples,
                    max_new_tokens,
                    temperature,
                    top_k,
                    gen,
                    use_cache,
                )
                for k, i in enumerate(chunk):
                    out[i] = rows[k * num_samples : (k + 1) * num_samples]
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _forward_full(self, seq: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of the last position, recomputing the whole sequence (the no-cache reference path)."""
        from nanorl.model import KVCache

        if key_mask is None:
            return self.model(seq, logits="last")[:, -1, : self.n_vocab]
        cache = KVCache(seq.size(0), self.model.config, seq.size(1), device=self.device, dtype=self.cache_dtype)
        cache.key_mask = key_mask
        return self.model(seq, kv_cache=cache, logits="last")[:, -1, : self.n_vocab]

    def _generate(self, prompts, G, max_new, temperature, top_k, gen, use_cache) -> list[Sample]:
        from nanorl.model import KVCache

        dev, model = self.device, self.model
        P, L = len(prompts), max(len(p) for p in prompts)
        R = P * G
        # prompts of different lengths are left-padded; the padding is masked out of attention (key_mask)
        pads = [L - len(p) for p in prompts]
        ids = torch.tensor(
            [[self.stop_ids[1]] * n + p for n, p in zip(pads, prompts, strict=False)], dtype=torch.long, device=dev
        )
        key_mask = None
        if any(pads):
            key_mask = torch.arange(L + max_new, device=dev)[None, :] >= torch.tensor(pads, device=dev)[:, None]
        # (the forward passes run under sample()'s one autocast context)
        if use_cache:
            cache = KVCache(P, model.config, L + max_new, device=dev, dtype=self.cache_dtype)
            cache.key_mask = key_mask
            logits = model(ids, kv_cache=cache, logits="last")[:, -1, : self.n_vocab]
            if G > 1 or self.decoder is not None:  # the compiled step reads the shared layout only
                cache.share(G)
        else:
            logits = self._forward_full(ids, key_mask)
            seq = ids.repeat_interleave(G, dim=0)
            row_mask = key_mask.repeat_interleave(G, dim=0) if key_mask is not None else None
        logits = logits.repeat_interleave(G, dim=0)

        tokens = torch.empty(R, max_new, dtype=torch.long, device=dev)
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        stop = torch.tensor(self.stop_ids, device=dev)
        forced_mask = torch.zeros(R, max_new, dtype=torch.bool)
        queues: list[list[int]] = [[] for _ in range(R)]
        tool_rows: dict[int, int] = {}  # row -> position of its open <|python_start|>
        n = 0
        for t in range(max_new):
            nxt = sample_next(logits, temperature, top_k, gen)
            if self.tools:
                nxt = self._tools_step(t, nxt, queues, tool_rows, tokens, forced_mask, done)
            nxt = torch.where(done, stop[0], nxt)
            tokens[:, t] = nxt
            n = t + 1
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or t == max_new - 1:
                break
            if use_cache:
                logits = None
                if self.decoder is not None and self.decoder.usable(cache):
                    logits = self.decoder(nxt, cache)  # None: compiling failed, decode eagerly
                if logits is None:
                    logits = model(nxt[:, None], kv_cache=cache)[:, -1]
                logits = logits[:, : self.n_vocab]
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits = self._forward_full(seq, row_mask[:, : seq.size(1)] if row_mask is not None else None)

        tokens_l = tokens[:, :n].tolist()
        forced_l = forced_mask[:, :n].tolist()
        samples = []
        for r in range(R):
            row = tokens_l[r]
            end = next((k for k, x in enumerate(row) if x in self.stop_ids), None)
            finished = end is not None
            cut = row[: end + 1] if finished else row
            text_ids = cut[:-1] if finished else cut
            samples.append(Sample(cut, finished, forced_l[r][: len(cut)], self.tok.decode(text_ids)))
        return samples

    def _tools_step(self, t, nxt, queues, tool_rows, tokens, forced_mask, done) -> torch.Tensor:
        """Override sampled tokens with queued tool output; run a tool when a row closes a python block."""
        nxt_l = nxt.tolist()
        done_l = done.tolist()
        for r, tok in enumerate(nxt_l):
            if done_l[r]:
                continue
            if queues[r]:
                nxt_l[r] = queues[r].pop(0)
                forced_mask[r, t] = True
                continue
            if tok == self.python_start:
                tool_rows[r] = t
            elif tok == self.python_end and r in tool_rows:
                start = tool_rows.pop(r)
                code = self.tok.decode(tokens[r, start + 1 : t].tolist())
                result = self._call_tool(code)
                if result is not None:
                    queues[r] = [self.output_start, *self.tok.encode(result), self.output_end]
        return torch.tensor(nxt_l, dtype=torch.long, device=nxt.device)

    def _call_tool(self, code: str) -> str | None:
        tool = self.tools.get("python")
        if tool is None:
            return None
        try:
            out = tool(code)
        except Exception as e:  # a tool's failure is the model's problem (it reads the error), not the run's
            return f"error: {type(e).__name__}"
        return None if out is None else str(out)
