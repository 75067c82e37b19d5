"""Parameter and FLOP counts of the GPT, from the config alone: no torch, no tensors, so
`nanorl model info --depth 26` answers instantly and allocates nothing."""

from __future__ import annotations


def count_params(cfg) -> dict[str, int]:
    """Parameter counts of GPT(cfg), by optimizer group."""
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.depth
    kv = cfg.n_kv_head * (C // cfg.n_head)
    per_layer = C * C + 2 * C * kv + C * C + 2 * 4 * C * C  # c_q, c_k + c_v, c_proj, mlp c_fc + c_proj
    out = {"embedding": V * C, "matrices": L * per_layer, "unembedding": C * V}
    out["total"] = sum(out.values())
    return out


def flops_per_token(cfg, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 per matmul parameter (the embedding lookup is not a
    matmul) plus attention's 12·layers·width·seq (q·kᵀ and p·v, ×3 for fwd+bwd, counting the full T×T as
    nanochat and the PaLM paper do)."""
    n = count_params(cfg)
    T = seq_len or cfg.seq_len
    return 6 * (n["matrices"] + n["unembedding"]) + 12 * cfg.depth * cfg.n_embd * T
