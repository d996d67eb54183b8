"""Weight-only quantisation by swapping modules: the same model, smaller weights (chapters 05-06).

Decoding one token reads every weight once, so its speed is bound by the bytes of weights read
per token (`weight_bytes_per_token`), not by arithmetic. Gemma 3 270M is mostly its
262,144 x 640 embedding, which is also the LM head: 168M of its 268M parameters.

    level   layers (every nn.Linear of the blocks)      head                          embedding lookup
    None    float32 (the reference)                      tied to the embedding         float32
    "bf16"  bfloat16                                      tied, bfloat16                bfloat16
    "int8"  int8, one bf16 scale per output row           int4, top-64 rescored exactly  Q8_0 (8.5 bits)
    "int4"  int4, a bf16 scale and offset per 32 weights  int4, top-64 rescored exactly  Q8_0 (8.5 bits)

`quantize(model, level)` only swaps modules: each `nn.Linear` becomes an `Int8Linear` or
`Int4Linear`, the tied head a `RescoredHead`, the embedding a `Q8_0Embedding`. The model's own
forward runs unchanged around them; there is no second model.

Weight-only quantisation keeps activations in bf16. An int8 row r of W is stored as q and a scale
s_r = max|W_r| / 127, so W ≈ s[:, None] · q, and `torch.ops.aten._weight_int8pack_mm` computes
x @ (s · q)ᵀ without materialising W (the CPU kernel behind torchao's int8 weight-only
quantisation). Int4 cuts each row into groups of 32 with a scale and an offset per group
(`_weight_int4pack_mm_for_cpu`). Both kernels want bf16 activations: fed float32 they are several
times slower. RMSNorm, softmax and RoPE still run in float32.

A 4-bit head moves logits by up to ~2-3, enough to swap near-tied tokens; `RescoredHead` recomputes
its top k logits exactly from the embedding's rows, so greedy decoding picks what the exact head
would (int4 speed, exact choices). The embedding keeps the GGUF file's own Q8_0 blocks
(`Q8_0Embedding`): a row lookup dequantises 640 weights, exactly the float32 model's row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = (None, "bf16", "int8", "int4")
ROWS_PER_PACK = 4096  # weights are quantised this many rows at a time: the 262k-row head is never float32 whole


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
    """y = x @ (scale · q)ᵀ + bias: an int8 weight (N, K) with one bf16 scale per output row.

    x (..., K) in any float dtype -> (..., N) in bf16. A drop-in for `nn.Linear` (same in/out).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("q", q.contiguous())  # (N, K) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))  # (N,)
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @classmethod
    def from_rows(cls, row_chunks, n_rows: int, in_features: int, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Quantise a weight (n_rows, in_features) given as consecutive chunks of rows, into outputs
        allocated once up front: a loader never holds a whole float32 matrix, and the heap does not
        fragment into the holes a long run of temporaries would leave."""
        q = torch.empty(n_rows, in_features, dtype=torch.int8)
        scale = torch.empty(n_rows, dtype=torch.float32)
        r = 0
        for w in row_chunks:
            q[r:r + w.shape[0]], scale[r:r + w.shape[0]] = int8_rows(w)
            r += w.shape[0]
        if r != n_rows:
            raise ValueError(f"the row chunks hold {r} rows, not {n_rows}")
        return cls(q, scale, bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        N, K = w.shape
        return cls.from_rows((w[r:r + ROWS_PER_PACK] for r in range(0, N, ROWS_PER_PACK)), N, K, bias)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, (N, K) float32."""
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if x2.shape[0] > 16:  # a prompt: a bf16 matrix product on the dequantised weight beats the GEMV kernel
            y = x2 @ (self.q.to(torch.bfloat16) * self.scale[:, None]).T
        else:  # decode: read 1 byte per weight
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------
# Weight-only int4: a scale and an offset per group of `group_size` weights of a row
# ----------------------------------------------------------------------------------------------
def int4_groups(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4 bits: w (N, K) -> (q (N, K) int32 in [0, 15], scale (N, K/g), lo (N, K/g)).

    Each group of g consecutive weights of a row spans [lo, hi] with 16 levels:
    scale = (hi - lo) / 15, q = round((w - lo) / scale), so w ≈ lo + scale · q (llama.cpp's Q4_1 idea).
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
    """y = x @ Wᵀ + bias with W in 4 bits: w = lo + scale · q per group of `group_size` weights.

    x (..., K) in any float dtype -> (..., N) in bf16. The weight is packed for
    `torch.ops.aten._weight_int4pack_mm_for_cpu`, which computes w = (q - 8) · scale + zero per group,
    so we store zero = lo + 8 · scale (the same line, written around the middle code 8). Scale and zero
    are kept in bf16, the kernel's format.
    """

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, packed.shape[0], group_size
        self.register_buffer("packed", packed)  # (N, K/2) uint8, the CPU kernel's layout
        self.register_buffer("scale_zero", scale_zero)  # (K/g, N, 2) bf16
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    @classmethod
    def from_rows(cls, row_chunks, n_rows: int, in_features: int, group_size: int = 32,
                  bias: torch.Tensor | None = None) -> "Int4Linear":
        """Quantise a weight (n_rows, in_features) given as consecutive chunks of rows, so a 262k-row
        head is never held whole in float32. Every chunk but the last must have a multiple of 64
        rows: the packed layout tiles rows by 64, so chunks packed one by one fill the whole. The
        outputs are allocated once, up front (a list of small pieces would fragment the heap)."""
        if n_rows % 16:
            raise ValueError(f"out_features={n_rows}: the int4 CPU kernel needs a multiple of 16")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        packed = torch.empty(n_rows, in_features // 2, dtype=torch.uint8)
        scale_zero = torch.empty(in_features // group_size, n_rows, 2, dtype=torch.bfloat16)
        r = 0
        for w in row_chunks:
            if r % 64:
                raise ValueError("only the last chunk of rows may have a number of rows not divisible by 64")
            n = w.shape[0]
            q, scale, lo = int4_groups(w, group_size)
            packed[r:r + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
            scale_zero[:, r:r + n, 0] = scale.T
            scale_zero[:, r:r + n, 1] = (lo + 8 * scale).T
            r += n
        if r != n_rows:
            raise ValueError(f"the row chunks hold {r} rows, not {n_rows}")
        return cls(packed, scale_zero, group_size, in_features, bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Quantise w (N, K), ROWS_PER_PACK rows at a time."""
        N, K = w.shape
        return cls.from_rows((w[r:r + ROWS_PER_PACK] for r in range(0, N, ROWS_PER_PACK)), N, K, group_size, bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) the kernel multiplies by (for tests and error analysis)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)  # x = I gives Wᵀ: one term per sum, exact
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero).float().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K); the kernel needs it dense
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------------------------
# The embedding in Q8_0 blocks, and the re-scored head
# ----------------------------------------------------------------------------------------------
def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """Quantise rows of w (V, C) to GGUF's Q8_0: blocks of 32 weights, an fp16 scale d = max|w|/127
    and 32 int8 q = round(w / d). Returns (V, C/32, 34) uint8, the file's own byte layout.

    For weights that were dequantised from Q8_0 (the 270M's embedding) this gives back the file's
    bytes exactly: the largest |q| of a block is 127, so d and then every q come out the same.
    """
    V, C = w.shape
    blocks = w.float().reshape(V, C // 32, 32)
    d = blocks.abs().amax(-1) / 127.0  # (V, C/32), as llama.cpp computes it, in float32
    q = torch.round(blocks / torch.where(d == 0, 1.0, d)[..., None]).clamp(-128, 127).to(torch.int8)
    d16 = d.half().view(torch.uint8).reshape(V, C // 32, 2)
    return torch.cat([d16, q.view(torch.uint8)], dim=-1)


class Q8_0Embedding(nn.Module):
    """A token embedding kept in Q8_0 blocks (8.5 bits/weight): (B, T) ids -> (B, T, C) in `dtype`.

    A lookup dequantises only the rows it gathers (w = d · q), so the 262,144 × 640 table costs
    178 MB instead of 671 MB (float32) or 335 MB (bf16). `rows` gives exact float32 rows, for
    `RescoredHead`.
    """

    def __init__(self, blocks: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.register_buffer("blocks", blocks.contiguous())  # (V, C/32, 34) uint8
        self.num_embeddings, self.embedding_dim = blocks.shape[0], blocks.shape[1] * 32
        self.dtype = dtype

    @classmethod
    def from_weight(cls, w: torch.Tensor, dtype: torch.dtype = torch.bfloat16, rows_per_chunk: int = 16384):
        return cls(torch.cat([q8_0_blocks(w[r:r + rows_per_chunk]) for r in range(0, w.shape[0], rows_per_chunk)]),
                   dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> the exact float32 rows (..., C)."""
        b = self.blocks[ids]  # (..., C/32, 34)
        d = b[..., :2].contiguous().view(torch.float16).float()  # (..., C/32, 1)
        q = b[..., 2:].contiguous().view(torch.int8).float()  # (..., C/32, 32)
        return (d * q).flatten(-2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0, out={self.dtype}"


def embedding_rows(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Exact float32 rows of an nn.Embedding or a Q8_0Embedding."""
    if isinstance(embedding, Q8_0Embedding):
        return embedding.rows(ids)
    return embedding.weight[ids].float()


class RescoredHead(nn.Module):
    """A quantised head whose k largest logits are recomputed exactly: greedy choices as the exact head's.

    A 4-bit head moves logits by up to ~2-3 (Gemma 3 270M), enough to swap near-tied tokens. But the
    token the exact head would pick stays among the quantised head's top few (measured: within the
    top 6 at every position of chapter 06's texts), so we take the top k (64 by default), recompute
    those k logits in float32 from the embedding's exact rows (k · C multiply-adds), and write them
    back. Greedy decoding then picks the exact head's arg-max; the other logits keep their quantised
    values, which matters only when sampling far down the tail.

    x (..., C) -> logits (..., V) float32.
    """

    def __init__(self, approx: nn.Module, embedding: nn.Module, k: int = 64):
        super().__init__()
        self.approx, self.k = approx, k
        self._embedding = [embedding]  # the model's own embedding (not registered twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approx(x).float()  # (..., V)
        idx = logits.topk(self.k, dim=-1).indices  # (..., k)
        rows = embedding_rows(self._embedding[0], idx)  # (..., k, C)
        exact = (rows @ x.float()[..., None])[..., 0]  # (..., k)
        return logits.scatter_(-1, idx, exact)

    def extra_repr(self) -> str:
        return f"k={self.k}"


# ----------------------------------------------------------------------------------------------
# quantize: swap the modules of a float model
# ----------------------------------------------------------------------------------------------
def quantized_linear(level: str, w: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
    """The module that replaces an nn.Linear of weight w (N, K) at `level` ("int8" or "int4").
    w may also be (row_chunks, N, K): consecutive chunks of rows, read as they are quantised."""
    chunks, N, K = w if isinstance(w, tuple) else ((w[r:r + ROWS_PER_PACK] for r in range(0, w.shape[0], ROWS_PER_PACK)),
                                                   *w.shape)
    if level == "int8":
        return Int8Linear.from_rows(chunks, N, K, bias)
    if level == "int4":
        return Int4Linear.from_rows(chunks, N, K, group_size, bias)
    raise ValueError(f"no quantised linear for level {level!r}")


def quantized_head(embedding: nn.Module, rescore: int = 64, group_size: int = 32) -> RescoredHead:
    """The LM head tied to `embedding` (V, C) as an int4 head whose top `rescore` logits are exact.
    Built ROWS_PER_PACK exact rows at a time."""
    V, C = embedding.num_embeddings, embedding.embedding_dim
    chunks = (embedding_rows(embedding, torch.arange(r, min(V, r + ROWS_PER_PACK))) for r in range(0, V, ROWS_PER_PACK))
    return RescoredHead(Int4Linear.from_rows(chunks, V, C, group_size), embedding, rescore)


def cast_activations(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """In place: every floating parameter and buffer to `dtype`, except RMSNorm weights, which stay
    float32: the norm computes in float32 anyway, so rounding its weight would only add error."""
    from .layers import RMSNorm

    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for m in model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and id(t) not in norms and t.dtype != dtype:
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    setattr(m, name, t.to(dtype))
    return model


@torch.no_grad()
def quantize(model: nn.Module, level: str | None = "int8", *, group_size: int = 32, rescore: int = 64) -> nn.Module:
    """In place: swap the modules of a float model for the quantised ones of `level`; returns the model.

    None leaves it alone; "bf16" casts it (norm weights stay float32); "int8" / "int4" replace every
    nn.Linear of the blocks (biases kept), the tied head `lm_head` by an int4 head re-scoring its top
    `rescore` logits, and the embedding by its Q8_0 blocks, each computed from the float weights;
    what is left runs in bf16. The model's forward is untouched.
    """
    if level not in LEVELS:
        raise ValueError(f"quant level {level!r}: choose from {', '.join(map(repr, LEVELS))}")
    if level is None:
        return model
    if level != "bf16":
        embedding, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child is not head:
                    setattr(parent, name, quantized_linear(level, child.weight, child.bias, group_size))
        if isinstance(embedding, nn.Embedding):
            tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
            model.embed_tokens = Q8_0Embedding.from_weight(embedding.weight)
            if tied:
                model.lm_head = quantized_head(model.embed_tokens, rescore, group_size)
    return cast_activations(model, torch.bfloat16)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (storage shared by
    several tensors counted once), except the embedding table, of which a step gathers a single row
    (a head tied to it reads all of it)."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    embed = model.embed_tokens
    table = embed.blocks if isinstance(embed, Q8_0Embedding) else embed.weight
    table_bytes = table.numel() * table.element_size()
    row = table_bytes // embed.num_embeddings
    tied = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is getattr(embed, "weight", None)
    return sum(storages.values()) - table_bytes + row + (table_bytes if tied else 0)
