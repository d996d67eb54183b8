"""Faster CPU decoding for Gemma: bf16 or weight-only int8/int4 weights, and a lean decode step (chapter 05).

Decoding one token reads every weight once, so its speed is bound by the bytes of weights
read per token (`weight_bytes_per_token`), not by arithmetic. Gemma 3 270M is mostly its
262,144 x 640 embedding, which is also the LM head: 168M of its 268M parameters.

    float32   4 bytes/weight                      the reference
    bfloat16  2 bytes/weight                      `model.to(torch.bfloat16)`
    int8      1 byte/weight + one bf16 scale/row  `quantize(model, layers="int8", head="int8")`
    int4      ½ byte/weight + bf16 scale and offset per group of 32 weights (4.5 bits/weight)

Weight-only quantisation keeps activations in bf16: each output row r of W is stored as int8 q
and a scale s_r = max|W_r| / 127, so W ≈ s[:, None] * q, and `torch.ops.aten._weight_int8pack_mm`
computes x @ (s * q)^T without materialising W (the CPU kernel behind torchao's int8
weight-only quantisation). Int4 cuts each row into groups of 32 and stores 4-bit codes with a
scale and offset per group (`_weight_int4pack_mm_for_cpu`). Both kernels want bf16 activations:
fed float32 they are several times slower. RMSNorm, softmax and RoPE still run in float32.

A 4-bit head moves logits enough to swap near-tied tokens; `RescoredHead` recomputes its top k
logits exactly, so greedy decoding picks what an exact head would (int4 speed, exact choices).

At batch 1 the matrix-vector products of the 18 layers take only a few milliseconds; eager
PyTorch spends about as long again dispatching the small ops around them. `FastDecoder` is the
same model with a one-token step made of far fewer ops, optionally compiled (see its docstring).

    model = quantize(load_gguf(path, torch.bfloat16), layers="int8", head="int4", rescore=64)
    fast = FastDecoder(model, compile=True)   # compile=False: eager, no compilation wait
    generate_ids(fast, [prompt_ids], 64)      # same interface as the model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import embedding_scale, gelu_tanh, rope_cos_sin, rope_frequencies, soft_cap


# ----------------------------------------------------------------------------------------------
# Weight-only int8: one scale per output row
# ----------------------------------------------------------------------------------------------
def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) -> (q int8 (N, K), scale float32 (N,)), w ≈ scale[:, None] * q."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (scale * q)^T: an int8 weight (N, K) with one bf16 scale per output row, no bias.

    x (..., K) in any float dtype -> (..., N) in bf16.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q.contiguous())  # (N, K) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))  # (N,)

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> "Int8Linear":
        return cls(*int8_rows(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.q.shape
        x2 = x.reshape(-1, K).to(torch.bfloat16)  # (M, K)
        if x2.shape[0] > 16:  # prefill: a bf16 GEMM on the dequantised weight is faster than the GEMV kernel
            y = x2 @ (self.q.to(torch.bfloat16) * self.scale[:, None]).T
        else:  # decode: read 1 byte per weight
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        return y.reshape(*x.shape[:-1], N)

    def extra_repr(self) -> str:
        return f"in_features={self.q.shape[1]}, out_features={self.q.shape[0]}"


# ----------------------------------------------------------------------------------------------
# Weight-only int4: a scale and an offset per group of `group_size` weights of a row
# ----------------------------------------------------------------------------------------------
def int4_groups(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4 bits: w (N, K) -> (q (N, K) int32 in [0, 15], scale (N, K/g), lo (N, K/g)).

    Each group of g consecutive weights of a row spans [lo, hi] with 16 levels:
    scale = (hi - lo) / 15, q = round((w - lo) / scale), so w ≈ lo + scale * q (llama.cpp's Q4_1 idea).
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, K/g)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scale, lo


class Int4Linear(nn.Module):
    """y = x @ W^T with W stored in 4 bits: w = lo + scale * q per group of `group_size` weights, no bias.

    x (..., K) in any float dtype -> (..., N) in bf16. The weight is packed for
    `torch.ops.aten._weight_int4pack_mm_for_cpu`, which computes w = (q - 8) * scale + zero per group,
    so we store zero = lo + 8 * scale (the same line, written around the middle code 8).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int):
        super().__init__()
        if q.shape[0] % 16:
            raise ValueError(f"out_features={q.shape[0]}: the int4 CPU kernel needs a multiple of 16")
        self.in_features, self.out_features, self.group_size = q.shape[1], q.shape[0], group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        zero = lo + 8 * scale
        # (K/g, N, 2) bf16: the layout the kernel reads
        self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous())

    @classmethod
    def from_weight(cls, w: torch.Tensor, group_size: int = 32) -> "Int4Linear":
        return cls(*int4_groups(w, group_size), group_size)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) the kernel multiplies by (for tests and error analysis)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)  # x = I gives W^T: one term per sum, exact
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero).float().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K); the kernel needs it dense
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class RescoredHead(nn.Module):
    """A quantised head whose k largest logits are recomputed exactly: greedy choices as a bf16 head's.

    A 4-bit head moves logits by up to ~2-3 (Gemma 3 270M), enough to swap near-tied tokens. But the
    token the exact head would pick stays among the quantised head's top few (measured: within the
    top 6 at every position of chapter 05's texts), so we take the top k (64 by default), recompute
    those k logits in float32 from the bf16 embedding rows (k · C multiply-adds, ~0.5 ms), and
    write them back. Greedy decoding then picks the exact head's arg-max; the other logits keep their
    quantised values, which matters only when sampling far down the tail.

    x (..., C) -> logits (..., V) float32.
    """

    def __init__(self, approx: nn.Module, weight: torch.Tensor, k: int = 64):
        super().__init__()
        self.approx, self.k = approx, k
        self.table = weight.detach()  # (V, C): the embedding itself (not a copy, not a parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approx(x).float()  # (..., V)
        idx = logits.topk(self.k, dim=-1).indices  # (..., k)
        rows = self.table[idx].float()  # (..., k, C)
        exact = (rows @ x.float()[..., None])[..., 0]  # (..., k)
        return logits.scatter_(-1, idx, exact)

    def extra_repr(self) -> str:
        return f"k={self.k}"


QUANTIZERS = {
    "int8": lambda w, group_size: Int8Linear.from_weight(w),
    "int4": lambda w, group_size: Int4Linear.from_weight(w, group_size),
}


@torch.no_grad()
def quantize(model: nn.Module, layers: str | None = "int8", head: str | None = "int8",
             group_size: int = 32, rescore: int = 0) -> nn.Module:
    """In place: the model to bf16, then weight-only quantisation. Returns the model.

    layers: "int8", "int4" or None (bf16): every bias-free nn.Linear of the blocks.
    head:   "int8", "int4" or None (bf16): Gemma's tied head becomes a quantised copy of the
            embedding in `model.lm_head`; the embedding lookup itself stays bf16 (it reads only
            B·T rows per step).
    group_size: weights per int4 group (32, 64, 128, ...: smaller is more accurate, larger smaller).
    rescore: if k > 0, the head's top-k logits are recomputed exactly (`RescoredHead`).
    """
    for what, kind in (("layers", layers), ("head", head)):
        if kind is not None and kind not in QUANTIZERS:
            raise ValueError(f"{what}={kind!r}: choose from {sorted(QUANTIZERS)} or None (bf16)")
    model.to(torch.bfloat16)
    if layers is not None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child.bias is None:
                    setattr(parent, name, QUANTIZERS[layers](child.weight, group_size))
    if head is not None and hasattr(model, "lm_head"):
        model.lm_head = QUANTIZERS[head](model.embed_tokens.weight, group_size)
        if rescore:
            model.lm_head = RescoredHead(model.lm_head, model.embed_tokens.weight, rescore)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """In place: bf16 model, every Linear and the tied head in int8 (`quantize(model, "int8", "int8")`)."""
    return quantize(model, layers="int8", head="int8")


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (memory shared by
    several tensors counted once), except the embedding table, of which a step gathers a single
    row (the head, tied or quantised, reads all of it). Accepts a Gemma or a FastDecoder."""
    inner = model.model if isinstance(model, FastDecoder) else model
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    embed = inner.embed_tokens.weight
    table = embed.numel() * embed.element_size()
    tied_head = table if getattr(inner, "lm_head", None) is None else 0
    return sum(storages.values()) - table + embed.shape[1] * embed.element_size() + tied_head


# ----------------------------------------------------------------------------------------------
# A lean one-token decode step
# ----------------------------------------------------------------------------------------------
def concat_rows(linears: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing the concatenated outputs of `linears` (same input), or None.

    Stacking weight rows is the same maths: [x W_q^T, x W_k^T, x W_v^T] = x [W_q; W_k; W_v]^T,
    and int8's per-row scales stack with their rows, so the results are the same numbers from
    one kernel call instead of three. The original layers are rebound to views of the stacked
    weight, so nothing is stored twice. Works for bias-free nn.Linear and Int8Linear; returns
    None for anything else (e.g. Int4Linear, whose packed layout is the kernel's own).
    """
    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        w = torch.cat([m.weight.detach() for m in linears])  # (sum N, K)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
            start += n
        return fused
    if all(type(m) is Int8Linear for m in linears):
        fused = Int8Linear(torch.cat([m.q for m in linears]), torch.cat([m.scale for m in linears]))
        start = 0
        for m in linears:
            n = m.q.shape[0]
            m.q, m.scale = fused.q[start:start + n], fused.scale[start:start + n]
            start += n
        return fused
    return None


class FastDecoder(nn.Module):
    """A Gemma whose one-token decode step runs the same maths with far fewer PyTorch ops.

    Same interface as `Gemma` (forward, new_cache, config), so `generate_ids(FastDecoder(model), ...)`
    works. A step with one new token per row, a cache and no padding mask runs `step`; everything
    else (the prompt, padded batches, calls without a cache) runs the wrapped model unchanged,
    with the same cache objects.

    What `step` does differently, and why (each removes Python/dispatch work, not arithmetic):
      * q, k, v come from one matrix product, gate and up from another (`concat_rows`);
      * RoPE cos/sin are rows of tables computed once with `rope_cos_sin` for every position up
        to max_len, instead of recomputing the frequencies and angles in every layer and step;
      * QK-norm and RoPE treat the H query heads and K key heads as one (B, H + K, D) tensor,
        in float32 with one cast to bf16 at the end (the model casts after each op);
        rotate_half is a roll by D/2 with the sign folded into the sin table;
      * one mask per step, `slot <= position`, serves every layer: a global cache's slot is the
        token's index, and a ring fills its slots in order, so before it wraps the same test
        holds and after it every slot is a live key of the last W tokens (their order inside
        the ring does not matter to softmax); attention is then one fused
        `F.scaled_dot_product_attention` call;
      * RMSNorm is one `F.rms_norm` call on the float32 input with (1 + w) precomputed.
    The step is a function of tensors whose shapes do not change from step to step (the position
    is a tensor, caches are whole static buffers), so with compile=True `torch.compile` builds it
    once (fusing the small element-wise ops; the int8/int4 kernels stay as they are). Compiled
    caches are rounded up to a multiple of 256 slots so that prompts of similar length share one
    compiled step. Numbers differ from the model's own step only by float rounding order
    (tests/test_quant.py). Built from the model in any dtype; the cache needs max_len.
    """

    def __init__(self, model: nn.Module, compile: bool = False):
        super().__init__()
        self.model, self.config = model, model.config
        self.qkv, self.gate_up = nn.ModuleList(), nn.ModuleList()
        self.norms = []  # per layer: the four (1 + w) in float32
        self.qk_norm = []  # per layer: (H + K, D) float32, q_norm's (1 + w) for H heads then k_norm's for K
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.qkv.append(concat_rows([a.q_proj, a.k_proj, a.v_proj]) or _Separate(a.q_proj, a.k_proj, a.v_proj))
            self.gate_up.append(concat_rows([mlp.gate_proj, mlp.up_proj]) or _Separate(mlp.gate_proj, mlp.up_proj))
            self.norms.append([1.0 + n.weight.detach().float() for n in (
                layer.input_layernorm, layer.post_attention_layernorm,
                layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)])
            if a.qk_norm:
                self.qk_norm.append(torch.cat([(1.0 + a.q_norm.weight.detach().float()).expand(a.n_heads, -1),
                                               (1.0 + a.k_norm.weight.detach().float()).expand(a.n_kv_heads, -1)]))
            else:
                self.qk_norm.append(None)
        self.final_norm = 1.0 + model.norm.weight.detach().float()
        self.rope = {}  # (base, scaling) -> (cos, sin with rotate_half's sign) tables (max_len, D)
        self.compiled = compile
        self._decode_fn = torch.compile(self._decode, dynamic=False) if compile else self._decode

    def new_cache(self, batch: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> list:
        """The model's cache, static (max_len is required), with RoPE tables for max_len positions."""
        if max_len is None:
            raise ValueError("FastDecoder needs a static cache: pass max_len (prompt + new tokens)")
        if self.compiled:
            max_len = -(-max_len // 256) * 256  # a few shapes, a few compilations
        self._rope_tables(max_len)
        return self.model.new_cache(batch, max_len, dtype, device)

    def _rope_tables(self, max_len: int) -> None:
        for layer in self.model.layers:
            a = layer.self_attn
            key = (a.rope_base, a.rope_scaling)
            if key in self.rope and self.rope[key][0].shape[0] == max_len:
                continue
            cos, sin = rope_cos_sin(torch.arange(max_len), rope_frequencies(a.head_dim, *key))  # (max_len, D)
            half = a.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)])  # rotate_half(x) = roll(x, D/2) * sign
            self.rope[key] = (cos, sin * sign)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: list | None = None,
                last_only: bool = False) -> torch.Tensor:
        """As `Gemma.forward`; one-token steps on a static cache without a mask go through `step`."""
        if (cache is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1 and attention_mask is None
                and positions is None and cache[0].max_len is not None):
            return self.step(input_ids, cache)
        return self.model(input_ids, attention_mask, positions, cache, last_only)

    def step(self, input_ids: torch.Tensor, cache: list) -> torch.Tensor:
        """input_ids (B, 1): the next token of each row -> logits (B, 1, V); appends to the cache."""
        pos = cache[0].length  # sequence index (= RoPE position: no padding) of the new token
        if pos >= cache[0].max_len:
            raise ValueError(f"KV cache is full: {pos + 1} tokens do not fit in max_len={cache[0].max_len}")
        self._rope_tables(cache[0].max_len)  # (already there unless the cache came from model.new_cache)
        logits = self._decode_fn(input_ids, torch.tensor(pos), [c.k for c in cache], [c.v for c in cache])
        for c in cache:
            c.length = pos + 1
        return logits

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gemma's RMSNorm in float32 (w is 1 + weight), back to x's dtype."""
        return F.rms_norm(x.float(), w.shape, w, self.config.rms_norm_eps).to(x.dtype)

    def _decode(self, input_ids: torch.Tensor, pos: torch.Tensor, ks: list, vs: list) -> torch.Tensor:
        """The step on tensors only: input_ids (B, 1), pos () long, each layer's k and v buffers (B, K, S, D)."""
        m, B = self.model, input_ids.shape[0]
        x = m.embed_tokens(input_ids) * embedding_scale(self.config.hidden_size, m.embed_tokens.weight.dtype)
        at = pos.reshape(1)
        masks, rope = {}, {}  # per buffer length S: (1, S) True = live key; per RoPE base: cos, sin (1, D)
        for i, layer in enumerate(m.layers):
            a, k_buf, v_buf = layer.self_attn, ks[i], vs[i]
            H, K, D, S = a.n_heads, a.n_kv_heads, a.head_dim, ks[i].shape[2]
            n_in, n_post, n_pre_ff, n_post_ff = self.norms[i]
            # attention
            qkv = self.qkv[i](self._norm(x, n_in))  # (B, 1, (H + 2K) D)
            qk = qkv[:, 0, :(H + K) * D].reshape(B, H + K, D).float()
            v = qkv[:, 0, (H + K) * D:].reshape(B, K, 1, D)
            if self.qk_norm[i] is not None:
                qk = F.rms_norm(qk, (D,), eps=self.config.rms_norm_eps) * self.qk_norm[i]
            key = (a.rope_base, a.rope_scaling)
            if key not in rope:
                rope[key] = [t.index_select(0, at) for t in self.rope[key]]
            cos, sin = rope[key]
            qk = (qk * cos + qk.roll(D // 2, -1) * sin).to(x.dtype)  # RoPE
            q = qk[:, :H].reshape(B, K, H // K, D)  # a kv head's H/K query heads are adjacent
            slot = at % S if a.window is not None else at  # the ring's slot / the static buffer's index
            k_buf.index_copy_(2, slot, qk[:, H:].reshape(B, K, 1, D))
            v_buf.index_copy_(2, slot, v)
            if S not in masks:
                masks[S] = (torch.arange(S, device=pos.device) <= pos)[None, :]  # (1, S)
            if a.softcap:  # Gemma 2: soft-capped logits, so no fused kernel
                scores = soft_cap((q @ k_buf.transpose(-2, -1)).float() * a.scale, a.softcap)
                o = scores.masked_fill(~masks[S], float("-inf")).softmax(-1).to(x.dtype) @ v_buf
            else:  # the H/K query heads of a group act as H/K queries against its keys
                o = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=masks[S], scale=a.scale)  # (B, K, H/K, D)
            x = x + self._norm(a.o_proj(o.reshape(B, 1, H * D)), n_post)
            # MLP
            gate, up = self.gate_up[i](self._norm(x, n_pre_ff)).chunk(2, dim=-1)
            x = x + self._norm(layer.mlp.down_proj(gelu_tanh(gate) * up), n_post_ff)
        x = self._norm(x, self.final_norm)
        logits = x @ m.embed_tokens.weight.T if m.lm_head is None else m.lm_head(x)  # (B, 1, V)
        return soft_cap(logits, self.config.final_logit_softcapping)


class _Separate(nn.Module):
    """Fallback for `concat_rows`: call each layer and concatenate the outputs."""

    def __init__(self, *linears: nn.Module):
        super().__init__()
        self.parts = list(linears)  # not registered: they belong to the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)
