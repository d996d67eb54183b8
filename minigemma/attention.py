"""Attention, from scaled dot-product to the Gemma variants.

Chapter 01 builds masks, scaled dot-product attention and multi-head attention with RoPE.
Later chapters extend this file: grouped-query attention and KV caches (02), soft-capping (03),
sliding windows and QK-norm (04).

Masks are boolean, True where a query may attend to a key. Shapes: B batch, H query heads,
K key/value heads, T query positions, S key positions, D head_dim, C hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import RMSNorm, apply_rope, rope_cos_sin, rope_frequencies


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def causal_mask(T: int, S: int | None = None, device=None) -> torch.Tensor:
    """(T, S) boolean: query i (the last T of S positions) sees keys j <= its own position.

    With S > T (a cache holds S - T earlier keys), query i sits at absolute position S - T + i.
    """
    S = T if S is None else S
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    return k_pos <= q_pos


def sliding_window_mask(T: int, window: int, S: int | None = None, device=None) -> torch.Tensor:
    """(T, S) boolean causal band: query i sees key j iff i - window < j <= i.

    That is `window` keys, the query's own included, which is HF Gemma's convention.
    """
    S = T if S is None else S
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


# --------------------------------------------------------------------------------------------
# Scaled dot-product attention
# --------------------------------------------------------------------------------------------
def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    return_weights: bool = False,
):
    """softmax(q kᵀ · scale [soft-capped] [masked]) v.

    q (B, H, T, D), k and v (B, H, S, D), mask broadcastable to (B, H, T, S), True = attend.
    scale defaults to 1/sqrt(D). Soft-capping (Gemma 2) happens after the scale and before the mask.
    The softmax runs in float32. Returns (B, H, T, D), and the weights (B, H, T, S) if asked.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, T, S)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = weights.to(v.dtype) @ v  # (B, H, T, D)
    return (out, weights) if return_weights else out


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, n_heads·D) -> (B, n_heads, T, D).  Head h owns features [h·D, (h+1)·D)."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H·D), the inverse of split_heads."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with RoPE (chapter 01): every head has its own K and V.

    x (B, T, C) -> (B, T, C). Chapter 02 generalises it to fewer key/value heads.
    """

    def __init__(self, hidden: int, n_heads: int, head_dim: int, rope_base: float = 10_000.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(head_dim, rope_base), persistent=False)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        B, T, _ = x.shape
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
        k = split_heads(self.k_proj(x), self.n_heads)
        v = split_heads(self.v_proj(x), self.n_heads)
        cos, sin = rope_cos_sin(torch.arange(T, device=x.device), self.inv_freq)  # (T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, w = scaled_dot_product_attention(q, k, v, causal_mask(T, device=x.device), return_weights=True)
        out = self.o_proj(merge_heads(out))
        return (out, w) if return_weights else out


# --------------------------------------------------------------------------------------------
# Grouped-query attention (chapter 02)
# --------------------------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K·n_rep, S, D): each key/value head serves n_rep query heads.

    Query head h reads kv head h // n_rep, so the n_rep query heads of a group are adjacent
    (HF's and the reference layout). MHA is n_rep = 1, MQA is K = 1.
    """
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    return x[:, :, None].expand(B, K, n_rep, S, D).reshape(B, K * n_rep, S, D)


def grouped_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention with fewer key/value heads than query heads.

    q (B, H, T, D); k and v (B, K, S, D) with H a multiple of K; mask broadcastable to
    (B, H, T, S), True = attend. Returns (B, H, T, D). Same maths as
    `scaled_dot_product_attention` once every kv head is repeated for its H/K query heads.
    """
    H, K = q.shape[1], k.shape[1]
    if H % K:
        raise ValueError(f"{H} query heads cannot share {K} key/value heads evenly")
    return scaled_dot_product_attention(q, repeat_kv(k, H // K), repeat_kv(v, H // K), mask, scale, softcap)


def index_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(T, S) boolean mask from sequence indices: query i sees key j iff j <= i (and i - window < j).

    q_idx (T,) and k_idx (S,) are each token's index in the sequence; k_idx = -1 marks an empty
    cache slot. Keys may come in any order (a ring buffer's are rotated): only indices matter.
    With q_idx = k_idx = arange(T) this is `causal_mask(T)` or `sliding_window_mask(T, window)`.
    """
    q, k = q_idx[:, None], k_idx[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask


# --------------------------------------------------------------------------------------------
# KV caches (chapters 02 and 04)
#
# One cache object per layer, all with the same small interface:
#   cache.length           tokens seen so far (the sequence index of the next token)
#   cache.update(k, v)     k, v (B, K, T, D): the T new tokens' keys/values (after RoPE)
#                          -> (k_all, v_all, k_idx): (B, K, S, D) every key the new queries may
#                             need, and (S,) the sequence index of each (-1 = empty slot)
#   cache.k, cache.v       the stored tensors (all the memory the cache holds)
# `Gemma.new_cache` builds the list of per-layer caches.
# --------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every past token, for a global (full-attention) layer.

    With `max_len` the buffers are allocated once (a static cache: memory is known up front);
    without, they grow by concatenation. Memory grows linearly with the context.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.max_len, self.length = max_len, 0
        shape = (batch, n_kv_heads, max_len or 0, head_dim)  # (B, K, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        _check_new_kv(self, k, v)
        start, end = self.length, self.length + k.shape[2]
        if self.max_len is None:
            self.k = torch.cat([self.k, k.to(self.k.dtype)], dim=2)
            self.v = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        else:
            if end > self.max_len:
                raise ValueError(f"KV cache is full: {end} tokens do not fit in max_len={self.max_len}")
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], torch.arange(end, device=k.device)


class SlidingKVCache:
    """A ring buffer of the last `window` keys and values, for a local (sliding-window) layer.

    The token at sequence index i lives in slot i % size, so memory stays bounded however long
    the context grows. `update` returns the ring's contents followed by the T new tokens, so a
    chunk of T > window queries still sees the window before each of them; the mask is then
    built from the indices (their order does not matter).
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, window: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.window, self.max_len, self.length = window, max_len, 0
        self.size = window if max_len is None else min(window, max_len)
        shape = (batch, n_kv_heads, self.size, head_dim)  # (B, K, size, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def slot_index(self) -> torch.Tensor:
        """(size,) the sequence index held in each slot: the latest i < length with i % size == slot, or -1."""
        s = torch.arange(self.size, device=self.k.device)
        latest = s + (self.length - 1 - s).div(self.size, rounding_mode="floor") * self.size
        return torch.where(s < self.length, latest, -1)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        _check_new_kv(self, k, v)
        T, start = k.shape[2], self.length
        if self.max_len is not None and start + T > self.max_len:
            raise ValueError(f"KV cache is full: {start + T} tokens do not fit in max_len={self.max_len}")
        new_idx = torch.arange(start, start + T, device=k.device)
        k_all = torch.cat([self.k, k.to(self.k.dtype)], dim=2)  # (B, K, size + T, D)
        v_all = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        k_idx = torch.cat([self.slot_index(), new_idx])
        keep = min(T, self.size)  # only the last `size` new tokens can still be needed later
        slots = new_idx[T - keep:] % self.size
        self.k[:, :, slots] = k[:, :, T - keep:].to(self.k.dtype)
        self.v[:, :, slots] = v[:, :, T - keep:].to(self.v.dtype)
        self.length = start + T
        return k_all, v_all, k_idx


def _check_new_kv(cache, k, v):
    B, K, _, D = cache.k.shape
    if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (B, K, D):
        raise ValueError(f"cache holds (B={B}, K={K}, S, D={D}); got k {tuple(k.shape)}, v {tuple(v.shape)}")


# --------------------------------------------------------------------------------------------
# The Gemma attention layer (chapters 02-04)
# --------------------------------------------------------------------------------------------
class GroupedQueryAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE, as in Gemma 2 and Gemma 3.

    x (B, T, C) -> (B, T, C). H query heads share K key/value heads (H = K: multi-head; K = 1:
    multi-query). Options, each off by default:
      window        sliding-window (local) attention over the last `window` keys (chapter 04)
      softcap       Gemma 2's attention-logit soft-cap, before mask and softmax (chapter 03)
      qk_norm       Gemma 3's per-head RMSNorm on q and k, before RoPE (chapter 04)
      rope_base, rope_scaling   RoPE θ base and linear position scaling for this layer
    scale is query_pre_attn_scalar^-0.5 in Gemma (default head_dim^-0.5).
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 scale: float | None = None, window: int | None = None, softcap: float | None = None,
                 qk_norm: bool = False, eps: float = 1e-6,
                 rope_base: float = 10_000.0, rope_scaling: float = 1.0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window, self.softcap = window, softcap
        self.rope_base, self.rope_scaling = rope_base, rope_scaling
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C).

        positions:      RoPE positions, (T,) or (B, T); default: the tokens' sequence indices.
        cache:          this layer's KVCache / SlidingKVCache, updated in place; the new tokens
                        sit at sequence indices cache.length .. cache.length + T - 1.
        attention_mask: (B, S) bool over every sequence index so far (past and new), False for
                        padding keys. A padding query is let see itself, so no softmax row is empty.
        """
        B, T, _ = x.shape
        start = 0 if cache is None else cache.length
        q_idx = torch.arange(start, start + T, device=x.device)  # sequence index of each query
        positions = q_idx if positions is None else positions
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
        k = split_heads(self.k_proj(x), self.n_kv_heads)  # (B, K, T, D)
        v = split_heads(self.v_proj(x), self.n_kv_heads)  # (B, K, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_frequencies(self.head_dim, self.rope_base, self.rope_scaling).to(x.device)
        cos, sin = rope_cos_sin(positions, inv_freq)  # (T, D) or (B, T, D)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angles for every head
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            k_idx = q_idx
        else:
            k, v, k_idx = cache.update(k, v)  # (B, K, S, D), (S,)
        mask = index_mask(q_idx, k_idx, self.window)  # (T, S)
        if attention_mask is not None:
            if attention_mask.shape != (B, start + T):
                raise ValueError(f"attention_mask must be (B, past + new) = {(B, start + T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_ok = attention_mask.bool()[:, k_idx.clamp(min=0)]  # (B, S)
            mask = (mask & key_ok[:, None, None, :]) | (k_idx[None, :] == q_idx[:, None])  # (B, 1, T, S)
        out = grouped_query_attention(q, k, v, mask, self.scale, self.softcap)  # (B, H, T, D)
        return self.o_proj(merge_heads(out))
