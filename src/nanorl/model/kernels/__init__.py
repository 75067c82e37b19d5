"""Triton kernels. Importing this package does not import triton; `flash_attention` does, on first use."""

from __future__ import annotations


def flash_attention(q, k, v, causal: bool = True, return_entropy: bool = False):
    """Fused attention: q (B, H, T, D), k/v (B, H_kv, T, D) -> out (B, H, T, D) [, entropy (B, H, T)].

    See `nanorl.model.kernels.flash` for the design and the entropy derivation.
    """
    from nanorl.model.kernels.flash import flash_attention as _flash

    return _flash(q, k, v, causal=causal, return_entropy=return_entropy)


__all__ = ["flash_attention"]
