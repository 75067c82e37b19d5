"""Parameter, FLOP and training-memory counts of the GPT, from the config alone: no torch, no tensors, so
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


# Logits per chunk of the fused loss (gpt.FusedLinearSoftcapCE; rows = this / vocab). Matmul efficiency wins
# over cache residency on the CPU: on the benchmark shape (2,048 rows, V = 8,192) one 16M chunk ran the loss
# fwd+bwd 1.3-1.9x faster than 2M chunks and 2.6-4.8x faster than 512K ones (`bench/model_speed.py
# --loss-chunks`, two runs under load). 16M float32 is 64 MB (CPU) and 256M is 1 GB (GPU): bounded, whatever
# the batch.
LOSS_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**28}

# Bytes that autograd keeps from a training forward for its backward, per token, in units of the width C:
# (inside each block, outside the blocks: the embedding's output, the final norm, the loss's dx). Measured by
# summing the distinct tensors autograd saves (torch.autograd.graph.saved_tensors_hooks) on the CPU at widths
# 256 and 512: 40.3-40.6 and 10.0-10.1 under bf16 autocast ("mixed"), 64.1 and 13.0-14.1 in float32, rounded up;
# tests/test_model.py measures them again against these.
ACTIVATION_BYTES = {"mixed": (41, 11), "float32": (65, 15)}


def saved_bytes(model, idx, mixed: bool = True) -> int:
    """What ACTIVATION_BYTES were measured from: the bytes of the distinct tensors autograd saves for the
    backward of one training forward of `model` on idx (the targets = idx), parameters left out, under bf16
    autocast on idx's device (`mixed`: the CPU's, where the constants were measured, or CUDA's) or in float32.
    Imports torch here: the module stays free of it."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=mixed),
    ):
        model(idx, idx)
    return sum(kept.values())


def train_memory(cfg, rows: int, seq_len: int | None = None, mixed: bool = True, device: str = "cuda") -> dict:
    """Estimated peak bytes of one device's training step with `rows` rows of `seq_len` tokens per forward pass:
    {"weights": parameters, gradients and optimizer state, "activations": what the backward needs, "loss": the
    fused loss's working chunk, "total"}. `mixed`: bf16 autocast, as on CUDA (weights stay float32).

    Weights: float32 parameters and gradients (8 bytes a parameter); Muon's momentum for the matrices (4),
    AdamW's two moments for the embedding and the head (8); under autocast a bf16 copy of every matrix and of
    the head, kept for the backward (2); the fused loss's float32 head gradient (4). The loss chunk: its float32
    logits and their gradient, the gradient again in the matmul dtype. The allocator's fragmentation and the
    backward's transient gradients are not in it: rows_that_fit leaves headroom (GPU_MEMORY_SHARE)."""
    n = count_params(cfg)
    T = seq_len or cfg.seq_len
    cast = 2 if mixed else 0
    weights = n["matrices"] * (8 + 4 + cast) + n["embedding"] * (8 + 8) + n["unembedding"] * (8 + 8 + cast + 4)
    inside, outside = ACTIVATION_BYTES["mixed" if mixed else "float32"]
    activations = rows * T * cfg.n_embd * (cfg.depth * inside + outside)
    chunk = min(rows * T * cfg.vocab_size, LOSS_CHUNK_ELEMENTS.get(device, LOSS_CHUNK_ELEMENTS["cuda"]))
    loss = chunk * (4 + 4 + cast)
    return {"weights": weights, "activations": activations, "loss": loss, "total": weights + activations + loss}


# The share of a GPU's memory a training step's estimate may fill: the estimate leaves out the allocator's
# fragmentation and the backward's transient gradients.
GPU_MEMORY_SHARE = 0.85


def rows_that_fit(
    cfg, gpu_bytes: float, seq_len: int | None = None, mixed: bool = True, device: str = "cuda", reserved: float = 0
) -> int:
    """The most rows per forward pass whose estimated training step (train_memory) fills at most
    GPU_MEMORY_SHARE of a GPU's `gpu_bytes`, less `reserved` bytes that something else holds (RL's frozen
    reference model); 0 when not even one row does."""
    memory_bytes = GPU_MEMORY_SHARE * gpu_bytes - reserved
    rows = 1
    while train_memory(cfg, rows * 2, seq_len, mixed, device)["total"] <= memory_bytes:
        rows *= 2
    if train_memory(cfg, rows, seq_len, mixed, device)["total"] > memory_bytes:
        return 0
    # between rows and 2·rows, by bisection: the total grows with the rows (linearly, once the chunk is at its bound)
    lo, hi = rows, rows * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if train_memory(cfg, mid, seq_len, mixed, device)["total"] <= memory_bytes else (lo, mid)
    return lo
