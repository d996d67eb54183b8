"""Attention, from scaled dot-product to the Gemma and Griffin variants.

Chapter 01 builds masks, scaled dot-product attention and multi-head attention with RoPE.
Later chapters extend this file: grouped-query attention and KV caches (02), soft-capping (03),
sliding windows, QK-norm and the ring-buffer cache (04), and the one attention layer that every
model of the course uses (Gemma 2, Gemma 3, Griffin's local attention).

Masks are boolean, True where a query may attend to a key. Shapes: B batch, H query heads,
K key/value heads, T query positions, S key positions, D head_dim, C hidden width, W window.

Words used throughout (docs/ARCHITECTURE.md has the whole glossary):
  index     a token's place in everything fed to the model so far: 0, 1, 2, ... (pads included)
  position  the RoPE position of a token: its place inside its own document
  document  the packed sequence a token belongs to; attention never crosses documents. A position
            of 0 starts a document, so in a causal model key j is in query i's document iff
            i - j <= position_i: positions alone say where documents begin. A left pad is a
            one-token document (position 0), so no real token ever sees it
  window    a local layer's span: a query sees the `window` most recent keys, itself included
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, RotaryEmbedding, apply_rope, rope_cos_sin, rope_frequencies, soft_cap


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


def index_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int | None = None, *,
               causal: bool = True, q_pos: torch.Tensor | None = None,
               q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask from token indices: query i sees key j iff

        j >= 0                  (k_idx = -1 marks an empty cache slot)
        j <= i                  if causal
        |i - j| < window        if a window is given: `window` keys back, the query included
        i - j <= position_i     if q_pos (B, T) is given: j is in i's (causal, contiguous) document
        same document id        if q_doc (B, T) and k_doc (B, S) are given (an encoder's padding)

    q_idx (T,), k_idx (S,). Returns (T, S), or (B, 1, T, S) with positions or documents. Keys may
    come in any order (a ring buffer's are rotated): only their indices matter. With
    q_idx = k_idx = arange(T) this is `causal_mask(T)` or `sliding_window_mask(T, window)`; with
    causal=False and a window it is the symmetric band of a bidirectional encoder's local layer.
    """
    q, k = q_idx[:, None], k_idx[None, :]
    mask = k >= 0
    if causal:
        mask = mask & (k <= q)
    if window is not None:
        mask = mask & ((q - k).abs() < window)
    if q_pos is not None:
        mask = mask & ((q - k)[None] <= q_pos[:, :, None])[:, None]  # (B, 1, T, S)
    if q_doc is not None and k_doc is not None:
        mask = mask & (q_doc[:, None, :, None] == k_doc[:, None, None, :])  # (B, 1, T, S)
    return mask


# --------------------------------------------------------------------------------------------
# Scaled dot-product attention: the readable reference
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
    """Attention with fewer key/value heads than query heads (the readable reference).

    q (B, H, T, D); k and v (B, K, S, D) with H a multiple of K; mask broadcastable to
    (B, H, T, S), True = attend. Returns (B, H, T, D). Same maths as
    `scaled_dot_product_attention` once every kv head is repeated for its H/K query heads.
    (The model's own path, `attend`, computes the same without copying K and V H/K times.)
    """
    H, K = q.shape[1], k.shape[1]
    if H % K:
        raise ValueError(f"{H} query heads cannot share {K} key/value heads evenly")
    return scaled_dot_product_attention(q, repeat_kv(k, H // K), repeat_kv(v, H // K), mask, scale, softcap)


# --------------------------------------------------------------------------------------------
# Where the new tokens sit: computed once per forward call, shared by every layer
# --------------------------------------------------------------------------------------------
@dataclass
class Positions:
    """Where the T new tokens of a forward call sit, and what every layer derives from that.

    start:     the first new token's index: how many tokens the cache held before this call
    index:     (T,) each new token's index: start, start + 1, ...
    positions: (B, T) RoPE positions: each token's place inside its document (0 starts one)
    packed:    True when some row holds more than one document (left padding or packing), so
               masks must keep documents apart; False: every mask is the plain causal or window one
    documents: (B, T) document ids, for an encoder's padding (no cache, not causal); else None
    captured:  a step compiled once for every token (`generation.CompiledStep`): `start` is not read,
               every number that changes from token to token is in `index` and `positions` (tensors),
               and each cache writes its token at `index` and attends its whole static buffer under
               a mask built from it (`write_at`), so the shapes never change and nothing recompiles

    A model builds one `Positions` per call (`make_positions`) and hands it to every temporal
    block with the block's cache: `block(x, pos, cache)`. Blocks of the same kind ask it for the
    same RoPE angles and the same mask, so `rope` and `blocks` compute each once per call and
    return the stored result to the next layer ("one mask per step").
    """

    start: int
    index: torch.Tensor
    positions: torch.Tensor
    packed: bool = False
    documents: torch.Tensor | None = None
    captured: bool = False
    _memo: dict = field(default_factory=dict, repr=False)

    def once(self, key: tuple, make: Callable[[], object]):
        """make(), computed by the first layer that asks for `key` in this call; later layers get it stored."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def rope(self, rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, d) for this RoPE setting, computed once per call."""
        return self.once(("rope", rotary.rotary_dim, rotary.base, rotary.scaling), lambda: rotary(self.positions))

    def blocks(self, keys: "Keys", window: int | None, causal: bool = True) -> list["Block"]:
        """How these queries attend `keys` (see `attention_blocks`), computed once per call and
        key layout: every layer with the same kind of cache and window gets the same list."""
        return self.once(("blocks", keys.layout, window, causal), lambda: attention_blocks(self, keys, window, causal))

    def key_index(self, keys: "Keys") -> torch.Tensor:
        """keys.index(), (S,), computed once per call and key layout (a ring's slot indices: every local
        layer's ring holds the same slots)."""
        return self.once(("key index", keys.layout), keys.index)


@dataclass
class Keys:
    """The keys an attention call reads: where they sit, not what they hold.

    first, count: their indices are first .. first + count - 1
    in_order:     True if k[..., s, :] holds index first + s (else a ring buffer's rotated slots)
    index:        a function giving (S,) each key's index as stored (called only when a mask needs it)
    layout:       a hashable summary, the same for every layer whose cache has this shape
    """

    first: int
    count: int
    in_order: bool = True
    index: "Callable[[], torch.Tensor] | None" = None
    layout: tuple = ()


@dataclass
class Block:
    """One piece of attention work: queries [q0, q1) attend keys [k0, k1) under `mask`
    ((B or 1, 1, q1 - q0, k1 - k0) bool), or causally (`causal`: key s <= query s, with the two
    ranges aligned), or with no mask at all (both None/False: every key is visible)."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: torch.Tensor | None = None
    causal: bool = False


QUERY_CHUNK = 512  # local layers attend in chunks of at most this many queries (W + 511 keys each)
MIN_QUERY_CHUNK = 64  # ... and of at least this many: smaller blocks cost more in calls than they skip


def attention_blocks(pos: Positions, keys: Keys, window: int | None, causal: bool = True) -> list[Block]:
    """Split an attention call into blocks that skip keys no query of the block can see.

    A causal layer over its own tokens is one causal block (a fused kernel never builds the T × T mask):
    a global layer's, and a local layer's whose prompt fits in its window. A decode step whose keys are
    all visible is one block with no mask at all. A local layer's long prompt is cut into chunks of
    min(W, QUERY_CHUNK) queries (at least MIN_QUERY_CHUNK; QUERY_CHUNK for an encoder),
    each reading only the keys inside its window, so its cost follows W, not T: a chunk of W queries
    reads at most 2W - 1 keys, where one block over all T would compute T × T scores. Everything else gets an explicit mask built by
    `index_mask`. Documents (padding, packing) always need a mask.
    """
    T, device = pos.index.numel(), pos.index.device
    separate = pos.packed or pos.documents is not None  # documents to keep apart

    def mask_for(q0, q1, k0, k1):
        k_idx = (torch.arange(keys.first + k0, keys.first + k1, device=device) if keys.in_order
                 else pos.key_index(keys)[k0:k1])
        docs = pos.documents
        m = index_mask(pos.index[q0:q1], k_idx, window, causal=causal,
                       q_pos=pos.positions[:, q0:q1] if pos.packed and causal else None,
                       q_doc=None if docs is None else docs[:, q0:q1],
                       k_doc=None if docs is None else docs[:, k0:k1])
        return m if m.dim() == 4 else m[None, None]

    if pos.captured:  # a compiled step: the whole static buffer, masked by indices that live in tensors
        return [Block(0, T, 0, keys.count, mask_for(0, T, 0, keys.count))]
    if not keys.in_order:  # a ring buffer's slots: one block, masked only if something is hidden
        k_last = keys.first + keys.count - 1
        everything_visible = (T == 1 and not separate and pos.start >= k_last
                              and (window is None or pos.start - keys.first < window))
        return [Block(0, T, 0, keys.count, None if everything_visible else mask_for(0, T, 0, keys.count))]

    # a causal chunk of c queries reads c + W - 1 keys; an encoder's (both sides) c + 2W - 2, so
    # only long texts gain from splitting and its chunks stay at QUERY_CHUNK
    chunk = T if window is None else min(QUERY_CHUNK, max(window, MIN_QUERY_CHUNK)) if causal else QUERY_CHUNK
    blocks = []
    for q0 in range(0, T, chunk):
        q1 = min(T, q0 + chunk)
        i0, i1 = pos.start + q0, pos.start + q1 - 1  # first and last query index of the chunk
        lo, hi = keys.first, keys.first + keys.count - 1  # the keys' index range
        if window is not None:
            lo = max(lo, i0 - window + 1)
            if not causal:
                hi = min(hi, i1 + window - 1)
        if causal:
            hi = min(hi, i1)
        k0, k1 = lo - keys.first, hi - keys.first + 1
        if k1 <= k0:
            raise ValueError(f"queries {i0}..{i1} see no key in {keys.first}..{keys.first + keys.count - 1}")
        if not separate and causal and lo == i0 and hi == i1 and (window is None or q1 - q0 <= window):
            # keys = these queries, and a window (if any) that reaches back past the first: plain causal,
            # the fused kernel (a local layer's whole prompt when it fits in the window)
            blocks.append(Block(q0, q1, k0, k1, causal=True))
        elif not separate and causal and q1 - q0 == 1 and (window is None or i0 - lo < window):
            blocks.append(Block(q0, q1, k0, k1))  # one query that sees every key given to it
        elif not separate and not causal and window is None:
            blocks.append(Block(q0, q1, k0, k1))  # an encoder's global layer: every key, no mask
        else:
            blocks.append(Block(q0, q1, k0, k1, mask_for(q0, q1, k0, k1)))
    return blocks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[Block], scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """The model's attention: q (B, H, T, D), k and v (B, K, S, D) -> (B, H, T, D).

    The same maths as `grouped_query_attention`, faster: H/K query heads share each K/V head
    without copies (`enable_gqa`), PyTorch's fused kernel (`F.scaled_dot_product_attention`, a
    flash-attention-style online softmax) never materialises the T × S scores, and the blocks skip
    keys outside each query chunk's window. Gemma 2's soft-cap is not something the fused kernel
    can do, so soft-capped layers compute their scores explicitly, one block at a time.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    out = q.new_empty(q.shape) if len(blocks) > 1 else None
    for b in blocks:
        whole = b.q0 == 0 and b.q1 == T and b.k0 == 0 and b.k1 == k.shape[2]
        qb, kb, vb = (q, k, v) if whole else (q[:, :, b.q0:b.q1], k[:, :, b.k0:b.k1], v[:, :, b.k0:b.k1])
        if softcap:
            mask = b.mask if not b.causal else causal_mask(b.q1 - b.q0, b.k1 - b.k0, device=q.device)
            o = grouped_query_attention(qb, kb, vb, mask, scale, softcap)
        elif b.q1 - b.q0 == 1 and not b.causal:
            # one new token (decoding): the H/K query heads that share a K/V head are H/K queries against
            # the same keys, so one fused call per K/V head reads each key once (~8x faster than enable_gqa)
            mask = None if b.mask is None else b.mask.transpose(1, 2)  # (B, 1, 1, S) -> the same, per query
            o = F.scaled_dot_product_attention(qb.reshape(B, K, H // K, D), kb, vb, attn_mask=mask, scale=scale)
            o = o.reshape(B, H, 1, D)
        else:
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, is_causal=b.causal, scale=scale,
                                               enable_gqa=True)
        if out is None:
            return o
        out[:, :, b.q0:b.q1] = o
    return out


# --------------------------------------------------------------------------------------------
# KV caches (chapters 02 and 04)
#
# One cache object per attention layer, with the same small interface:
#   cache.length            tokens seen so far (the index of the next token)
#   cache.update(k, v)      k, v (B, K, T, D): the T new tokens' keys and values (after RoPE)
#                           -> (k_all, v_all, keys): (B, K, S, D) every key the new queries may
#                              need, and where those keys sit (`Keys`)
#   cache.k, cache.v        the stored tensors (all the memory the cache holds)
# Caches hold no document ids: in a causal model the queries' positions say which keys share
# their document (see `index_mask`).
# --------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every past token, for a global (full-attention) layer.

    With `max_len` the buffers are allocated once (a static cache: memory is known up front);
    without, they grow by concatenation. Memory grows linearly with the context, but a decode step
    reads only the `length` slots written so far, so its cost follows the tokens held, not max_len.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.max_len, self.length = max_len, 0
        shape = (batch, n_kv_heads, max_len or 0, head_dim)  # (B, K, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def claim_one(self) -> tuple[int, torch.Tensor, torch.Tensor, "Keys"]:
        """A one-token step whose kernel writes the new key and value itself (`kernels.decode_layer`):
        (the slot to write, then the k, v and Keys the step attends, the new slot included), as `update`
        would return them. Only a static cache (max_len) has a slot to give."""
        if self.max_len is None:
            raise ValueError("only a static cache (max_len) has slots a kernel can write into")
        if self.length + 1 > self.max_len:
            raise ValueError(f"KV cache is full: {self.length + 1} tokens do not fit in max_len={self.max_len}")
        slot = self.length
        self.length = end = slot + 1
        return slot, self.k[:, :, :end], self.v[:, :, :end], Keys(0, end, layout=("kv", end))

    def write_at(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
        """A compiled step's write (`Positions.captured`, gpt-fast's static cache): the one new token's
        k, v (B, K, 1, D) go to slot `index` ((1,) tensor), and the step attends the whole buffer
        (B, K, max_len, D), slot s holding index s; the causal mask hides the slots after `index`. The
        shapes and the code are the same at every token; the host counts `length` (and checks the
        token fits) outside the compiled graph."""
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))
        S = self.k.shape[2]
        return self.k, self.v, Keys(0, S, layout=("static", S))

    def update(self, k: torch.Tensor, v: torch.Tensor):
        check_new_kv(self, k, v)
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
        return self.k[:, :, :end], self.v[:, :, :end], Keys(0, end, layout=("kv", end))


class RingKVCache:
    """A ring buffer of the last `size` keys and values, for a local (sliding-window) layer.

    The token at index i lives in slot i % size, so memory stays bounded however long the context
    grows (`size` = the window; at most max_len). A one-token step writes its slot first and then
    attends the whole ring: the ring then holds exactly the window, in rotated order, which softmax
    does not mind. A chunk of T > 1 new tokens attends the ring's contents in index order followed
    by the T new keys, so every query of the chunk still sees its window.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, window: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.window, self.max_len, self.length = window, max_len, 0
        self.size = window if max_len is None else min(window, max_len)
        shape = (batch, n_kv_heads, self.size, head_dim)  # (B, K, size, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def slot_index(self) -> torch.Tensor:
        """(size,) the index held in each slot: the latest i < length with i % size == slot, or -1."""
        s = torch.arange(self.size, device=self.k.device)
        latest = s + (self.length - 1 - s).div(self.size, rounding_mode="floor") * self.size
        return torch.where(s < self.length, latest, -1)

    def claim_one(self) -> tuple[int, torch.Tensor, torch.Tensor, "Keys"]:
        """A one-token step (see `KVCache.claim_one`): the slot i % size its token goes to, then the
        ring's live slots and their Keys, the new slot included."""
        start = self.length
        if self.max_len is not None and start + 1 > self.max_len:
            raise ValueError(f"KV cache is full: {start + 1} tokens do not fit in max_len={self.max_len}")
        self.length = n = start + 1
        live = min(n, self.size)
        keys = Keys(n - live, live, in_order=n <= self.size, index=self.slot_index,
                    layout=("ring", n <= self.size, live))
        return start % self.size, self.k[:, :, :live], self.v[:, :, :live], keys

    def write_at(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
        """A compiled step's write (see `KVCache.write_at`): slot `index` % size, then the whole ring,
        each slot's index computed from `index` (a tensor) as `slot_index` computes it from `length`
        (-1, masked, for a slot not written yet)."""
        slot = index % self.size
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))
        s = torch.arange(self.size, device=index.device)
        latest = s + (index - s).div(self.size, rounding_mode="floor") * self.size  # < 0 where not written yet
        return self.k, self.v, Keys(0, self.size, in_order=False, index=lambda: latest.clamp(min=-1),
                                    layout=("static ring", self.size))

    def update(self, k: torch.Tensor, v: torch.Tensor):
        check_new_kv(self, k, v)
        T, start = k.shape[2], self.length
        if self.max_len is not None and start + T > self.max_len:
            raise ValueError(f"KV cache is full: {start + T} tokens do not fit in max_len={self.max_len}")
        held = min(start, self.size)  # keys in the ring before this call
        if T == 1:  # decode: write, then attend the ring's live slots
            slot, k_live, v_live, keys = self.claim_one()
            self.k[:, :, slot:slot + 1] = k
            self.v[:, :, slot:slot + 1] = v
            return k_live, v_live, keys
        # a chunk: the ring's keys in index order (oldest first), then the new ones
        order = torch.arange(start - held, start, device=k.device) % self.size
        k_all = torch.cat([self.k[:, :, order], k.to(self.k.dtype)], dim=2)
        v_all = torch.cat([self.v[:, :, order], v.to(self.v.dtype)], dim=2)
        keep = min(T, self.size)  # only the last `size` new tokens can still be needed later
        slots = torch.arange(start + T - keep, start + T, device=k.device) % self.size
        self.k[:, :, slots] = k[:, :, T - keep:].to(self.k.dtype)
        self.v[:, :, slots] = v[:, :, T - keep:].to(self.v.dtype)
        self.length = start + T
        return k_all, v_all, Keys(start - held, held + T, layout=("ring-chunk", held, T))


def check_new_kv(cache, k, v):
    B, K, _, D = cache.k.shape
    if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (B, K, D):
        raise ValueError(f"cache holds (B={B}, K={K}, S, D={D}); got k {tuple(k.shape)}, v {tuple(v.shape)}")


# --------------------------------------------------------------------------------------------
# The attention layer of every model in the course (chapters 02-04, 07)
# --------------------------------------------------------------------------------------------
class GroupedQueryAttention(nn.Module):
    """Grouped-query self-attention with RoPE: Gemma 2, Gemma 3 and Griffin's local attention.

    x (B, T, C) -> (B, T, C). H query heads share K key/value heads (H = K: multi-head; K = 1:
    multi-query). q, k and v read the same x, so their weights are stacked in one `qkv_proj`
    ((H + 2K)·D, C): one matrix product, the same numbers; loaders fill it from the checkpoints'
    q_proj, k_proj and v_proj. Options, each off by default:
      window        local attention over the `window` most recent keys, the query's own included
                    (chapter 04); Griffin's official window of W sees W + 1 keys: window = W + 1
      causal        False for an encoder: a local layer's window is then a symmetric band
      softcap       Gemma 2's attention-logit soft-cap, before mask and softmax (chapter 03)
      qk_norm       Gemma 3's RMSNorm over head_dim on q and k, before RoPE (chapter 04)
      rope_base, rope_scaling, rotary_dim   this layer's RoPE (Griffin rotates half of head_dim)
      o_bias        a bias on the output projection (Griffin)
    scale is query_pre_attn_scalar^-0.5 in Gemma (default head_dim^-0.5).
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 scale: float | None = None, window: int | None = None, causal: bool = True,
                 softcap: float | None = None, qk_norm: bool = False, eps: float = 1e-6,
                 rope_base: float = 10_000.0, rope_scaling: float = 1.0, rotary_dim: int | None = None,
                 o_bias: bool = False):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (the query itself), got {window}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window, self.causal, self.softcap = window, causal, softcap
        self.qkv_proj = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        self.rotary = RotaryEmbedding(rotary_dim or head_dim, rope_base, rope_scaling)

    @property
    def rope_base(self) -> float:
        return self.rotary.base

    @property
    def rope_scaling(self) -> float:
        return self.rotary.scaling

    def fused_parts(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint tensors that fill the fused qkv_proj: name -> (fused name, first row, end row)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, q + kv), "v_proj": ("qkv_proj", q + kv, q + 2 * kv)}

    def new_cache(self, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        """This layer's cache: a ring buffer of the window for a local layer, else a full KVCache."""
        if not self.causal:
            raise ValueError("an encoder (causal=False) has no decoding cache")
        kv = (batch, self.n_kv_heads, self.head_dim)
        if self.window is not None:
            return RingKVCache(*kv, window=self.window, max_len=max_len, dtype=dtype, device=device)
        return KVCache(*kv, max_len=max_len, dtype=dtype, device=device)

    def project(self, x: torch.Tensor, pos: Positions):
        """x (B, T, C) -> q (B, H, T, D), k and v (B, K, T, D), with QK-norm and RoPE applied."""
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = split_heads(q, H), split_heads(k, K), split_heads(v, K)
        cos, sin = pos.rope(self.rotary)
        return *self.norm_and_rotate(q, k, cos, sin), v

    def norm_and_rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The element-wise part of `project`: QK-norm (if the layer has it), then RoPE.
        q (B, H, T, D), k (B, K, T, D); cos, sin (T, d) or (B, 1, T, d). A method of its own so that
        `encoder.compile_pointwise` can fuse its passes over q and k into one."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x: torch.Tensor, pos: Positions | None = None,
                cache: KVCache | RingKVCache | None = None) -> torch.Tensor:
        """x (B, T, C); pos: where the T tokens sit (`Positions`; default: right after what the cache
        holds, one document); cache: this layer's, updated in place."""
        pos = pos or positions_after(cache, x.shape[0], x.shape[1], x.device)
        if cache is not None and not pos.captured and cache.length != pos.start:
            raise ValueError(f"this layer's cache holds {cache.length} tokens but the new ones start at index "
                             f"{pos.start}: the model's Cache and its layers' caches disagree")
        q, k, v = self.project(x, pos)
        if cache is None:
            keys = Keys(pos.start, x.shape[1], layout=("self", x.shape[1]))
        elif pos.captured:
            k, v, keys = cache.write_at(k, v, pos.index)  # the whole static buffer, masked from the index
        else:
            k, v, keys = cache.update(k, v)  # (B, K, S, D): every key the new queries may need
        out = self.attention(q, k, v, pos, keys)  # (B, H, T, D)
        return self.o_proj(merge_heads(out))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions, keys: Keys) -> torch.Tensor:
        """softmax(q kᵀ · scale [soft-capped]) v over the keys this layer's mask lets each query see:
        q (B, H, T, D), k and v (B, K, S, D) -> (B, H, T, D). The one place a kernel swaps in.

        Under CPU autocast (mixed-precision training) it runs in float32: the products here are a
        small share of the work, and PyTorch's fused CPU kernel is ~4x slower backward in bfloat16
        than in float32 (measured on the chapter 08 model)."""
        blocks = pos.blocks(keys, self.window, self.causal)
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return attend(q.float(), k.float(), v.float(), blocks, self.scale, self.softcap)
        return attend(q, k, v, blocks, self.scale, self.softcap)


# --------------------------------------------------------------------------------------------
# A model's cache: one state per layer, plus what continues from call to call
# --------------------------------------------------------------------------------------------
def positions_after(cache, batch: int, T: int, device=None) -> Positions:
    """`Positions` for T tokens that follow what `cache` holds (0, 1, 2, ... without one), one
    document per row: what a layer called on its own (`layer(x)`, `layer(x, cache=c)`) assumes."""
    start = 0 if cache is None else cache.length
    index = torch.arange(start, start + T, device=device)
    return Positions(start, index, index.expand(batch, T))


class Cache(list):
    """Everything a model keeps between calls: a list with one state per layer (a KVCache, a
    RingKVCache or Griffin's RecurrentState), plus where the next token continues:

    length:         tokens fed so far (the index of the next token)
    next_position:  (B,) the next token's position inside its document
    packed:         True once a call brought left padding or several documents per row

    `Gemma.new_cache` and `Griffin.new_cache` build it; `generate` never looks inside.
    """

    def __init__(self, layers, batch: int, device=None):
        super().__init__(layers)
        self.length = 0
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.packed = False

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layers' states hold (keys, values, conv tails, RG-LRU states)."""
        return [t for state in self for t in vars(state).values() if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        """The memory the cache holds, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def step_positions(self, captured: bool = False) -> tuple[torch.Tensor, Positions]:
        """For a one-token step that is recorded once and run again for every token (a compiled graph, a
        CUDA graph): the next token's index and each row's position in one tensor, `state` (1 + B,) =
        [index, position of each row], and the `Positions` whose `index` and `positions` are views of it,
        so the step reads them where `stepped(state)` moves them on. (`captured`: see `Positions`.)"""
        B = self.next_position.shape[0]
        state = torch.empty(1 + B, dtype=torch.long, device=self.next_position.device)
        state[0] = self.length
        state[1:] = self.next_position
        return state, Positions(self.length, state[:1], state[1:, None], packed=self.packed, captured=captured)

    def stepped(self, state: torch.Tensor) -> None:
        """After such a step: one more token, counted on the host (`length`) and in `state` (one add_)."""
        self.length += 1
        state.add_(1)
        self.next_position = state[1:].clone()  # a copy: a view would move under whoever holds it at the next add_


def make_positions(input_ids: torch.Tensor, cache: Cache | None, attention_mask: torch.Tensor | None,
                   positions: torch.Tensor | None) -> Positions:
    """Where the T new tokens sit, for any model in the course (`Positions`); advances the cache's
    bookkeeping (`length`, `next_position`, `packed`).

    positions (B, T) or (T,): RoPE positions inside each document; a 0 starts a new document (the
    official RecurrentGemma convention for packed sequences, its `segment_pos`). attention_mask
    (B, S), S = tokens already in the cache + T, False for left padding: real tokens count from 0
    at the first one, and every pad sits at position 0, a one-token document no real token sees.
    With neither, positions continue from the cache (0, 1, 2, ... without one).
    """
    B, T = input_ids.shape
    device = input_ids.device
    start = 0 if cache is None else cache.length
    if cache is not None and cache.next_position.shape[0] != B:
        raise ValueError(f"the cache is for batch size {cache.next_position.shape[0]}, the input has {B} rows")
    packed = cache is not None and cache.packed
    if positions is None and attention_mask is not None:
        if attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask must be (B, tokens in cache + T) = {(B, start + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.bool()
        positions = torch.where(m, m.long().cumsum(-1) - 1, 0)[:, start:]
        if start == 0:  # padding is decided by the prompt; later steps only add real tokens
            packed = packed or not bool(m.all())
    elif positions is None:
        base = cache.next_position[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
        positions = base + torch.arange(T, device=device)
    else:
        positions = positions.to(device=device, dtype=torch.long)
        if positions.dim() == 1:
            positions = positions.expand(B, -1)
        if positions.shape != (B, T):
            raise ValueError(f"positions must have shape {(B, T)} or ({T},), got {tuple(positions.shape)}")
        later = positions[:, 1:] if start == 0 else positions  # a 0 after the very first token
        packed = packed or bool((later == 0).any())
    if cache is not None:
        cache.length = start + T
        cache.next_position = positions[:, -1] + 1
        cache.packed = packed
    return Positions(start, torch.arange(start, start + T, device=device), positions, packed)
