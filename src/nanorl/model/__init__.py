"""The GPT (gpt.py), the attention dispatch (attention.py), the Triton kernels (kernels/) and the analytic
counts (counts.py).

Attributes load lazily so that `nanorl.model.counts` (used by `nanorl model info`) does not import torch.
"""

from __future__ import annotations

__all__ = ["GPT", "KVCache", "count_params", "flops_per_token"]


def __getattr__(name: str):
    if name in ("GPT", "KVCache"):
        from nanorl.model import gpt

        return getattr(gpt, name)
    if name in ("count_params", "flops_per_token"):
        from nanorl.model import counts

        return getattr(counts, name)
    raise AttributeError(f"module 'nanorl.model' has no attribute {name!r}")
