"""Weight-only quantisation by swapping modules: the same model, smaller weights (chapters 05-06).

Decoding one token reads every weight once, so its speed is bound by the bytes of weights read
per token (`weight_bytes_per_token`), not by arithmetic. Gemma 3 270M is mostly its
262,144 x 640 embedding, which is also the LM head: 168M of its 268M parameters.

    level   layers (every nn.Linear of the blocks)      head                                   embedding lookup
    None    float32 (the reference)                      tied to the embedding                  float32
    "bf16"  bfloat16                                      tied, bfloat16                         bfloat16
    "int8"  int8, one bf16 scale per output row           int4 (groups of 32), top 1024 exact    Q8_0 (8.5 bits)
    "int4"  int4, a bf16 scale and offset per 32 weights  int4 (groups of 128), top 1024 exact   Q8_0 (8.5 bits)

Norm weights stay float32 at every level (`cast_activations`, the one place that says so).

"int4" on the course's Gemma 3 270M is a second quantisation. Its weights come from a Q4_K_M file:
they already sit on GGUF's grids (4-bit codes with 6-bit scales per 32 weights, some tensors in 6
bits), and int4 puts another grid, a bf16 scale and offset per 32, over them. On `bench generate`'s
quality text that costs +22% perplexity and a KL from float32 of 0.18 nats/token with each group's
levels fitted by least squares (`fit_groups`; +31% and 0.24 with the [min, max] span), and no group
size helps further: 32 is the smallest the CPU kernel takes. The faithful 4-bit path for this
checkpoint runs the file's own codes (`file_codes=True`, the command line's default for it): +0.1%,
KL 0.004.

`quantize(model, level)` only swaps modules (`swap.swap_modules`): each `nn.Linear` becomes an
`Int8Linear` or `Int4Linear`, the tied head a `RescoredHead`, the embedding a `Q8_0Embedding`. The
model's own forward runs unchanged around them; there is no second model. It is also how every
loader builds a model (gpt-fast's way): the float model as a skeleton on the meta device, its
modules swapped for the level, then the weights streamed in, one tensor a block of rows at a time
(`quantize(skeleton, level, weights)`). At int4 the codes may also be given instead of computed: a
GGUF file's own 4-, 5-, 6- and 8-bit codes run on the int4 kernel that way (`codes=`, and
`load_pretrained("gemma3-270m", file_codes=True)`).

Weight-only quantisation keeps activations in bf16. An int8 row r of W is stored as q and a scale
s_r = max|W_r| / 127, so W ≈ s[:, None] · q, and `torch.ops.aten._weight_int8pack_mm` computes
x @ (s · q)ᵀ without materialising W (the CPU kernel behind torchao's int8 weight-only
quantisation). Int4 cuts each row into groups of 32 with a scale and an offset per group
(`_weight_int4pack_mm_for_cpu`). Both kernels want bf16 activations: fed float32 they are several
times slower. RMSNorm, softmax and RoPE still run in float32.

A 4-bit head moves logits by up to ~2-3, enough to swap near-tied tokens; `RescoredHead` recomputes
its top k logits exactly from the embedding's rows, so greedy decoding picks what the exact head
would (int4 speed, exact choices). The embedding is kept in GGUF's Q8_0 blocks (`Q8_0Embedding`;
for the 270M, whose embedding is Q8_0 in the file, the very bytes of the file): a row lookup
dequantises 640 weights, exactly the float32 model's row.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm
from .swap import retype, swap_modules

LEVELS = (None, "bf16", "int8", "int4")
ROWS_PER_PACK = 4096  # weights are quantised this many rows at a time: the 262k-row head is never float32 whole


def bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> a dense bf16 (M, K) matrix, the kernels' input (no op where it already is one:
    at one token per step, each skipped no-op call is a few microseconds saved)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    return x2 if x2.is_contiguous() else x2.contiguous()


# oneDNN multiplies bf16 matrices on the CPU's own bf16 units from AVX-512 on; below that (AVX2) PyTorch
# falls back to a plain loop, about 8x slower than its float32 product (measured: a (256, 768) x (768,
# 1152) product took 45 ms in bf16, 6 ms in float32, on a 2-core AVX2 machine). There a prompt's product
# runs in float32 on the same bf16 values and is rounded to bf16 after: the same sums in float32, in
# another order.
BF16_MATMUL_NATIVE = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def bf16_matmul(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 (M, K) bf16 @ w (N, K)ᵀ bf16 [+ bias (N,)] -> (M, N) bf16: float32 sums, rounded once; in
    float32 where the CPU has no fast bf16 product (`BF16_MATMUL_NATIVE`)."""
    if BF16_MATMUL_NATIVE or x2.device.type != "cpu":
        return F.linear(x2, w, bias)
    return F.linear(x2.float(), w.float(), None if bias is None else bias.float()).to(torch.bfloat16)


class BF16Linear(nn.Linear):
    """`nn.Linear` of a bf16 model: the same module (`cast_activations` retypes it), whose product of a
    prompt (more than 8 rows) goes through `bf16_matmul`, so it runs in float32 on a CPU without fast bf16
    products. Decode's single rows keep torch's bf16 product, faster there than converting the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (BF16_MATMUL_NATIVE or x.device.type != "cpu" or x.dtype != torch.bfloat16
                or self.weight.dtype != torch.bfloat16 or x.numel() <= 8 * x.shape[-1]):
            return super().forward(x)
        y = bf16_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.bias)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)


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
    def empty(cls, n_rows: int, in_features: int, bias: torch.Tensor | None = None) -> "Int8Linear":
        """The module with its buffers on the meta device: shapes only, for a saved state to be assigned."""
        return cls(torch.empty(n_rows, in_features, dtype=torch.int8, device="meta"),
                   torch.empty(n_rows, device="meta"), bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        N, K = w.shape
        return cls.from_rows((w[r:r + ROWS_PER_PACK] for r in range(0, N, ROWS_PER_PACK)), N, K, bias)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, (N, K) float32."""
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = bf16_rows(x)  # (M, K)
        if x2.shape[0] > 16:  # a prompt: a bf16 matrix product on the dequantised weight beats the GEMV kernel
            y = bf16_matmul(x2, self.q * self.scale[:, None])  # int8 · bf16 -> bf16, one pass over the weight
        else:  # decode: read 1 byte per weight
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------
# Weight-only int4: 4-bit codes with a scale and a zero per group of 32 weights of a row
# ----------------------------------------------------------------------------------------------
def int4_groups(w: torch.Tensor, group_size: int = 32, fit: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4 bits: w (N, K) -> (q (N, K) int32 in [0, 15], scale (N, K/g), lo (N, K/g)).

    Each group of g consecutive weights of a row spans [lo, hi] with 16 levels:
    scale = (hi - lo) / 15, q = round((w - lo) / scale), so w ≈ lo + scale · q (llama.cpp's Q4_1 idea).
    fit: then choose each group's scale and lo for the least squared error instead (`fit_groups`).
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, K/g)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = nearest_codes(g, scale, lo)
    if fit:
        q, scale, lo = fit_groups(g, q, scale, lo)
    return q.to(torch.int32).reshape(N, K), scale, lo


def nearest_codes(g: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """g (N, G, group) -> each weight's nearest of its group's 16 levels lo + scale · q: q (N, G, group), float."""
    return torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)


def fit_groups(g: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, refits: int = 2):
    """Per group, 16 levels lo + scale · q refitted by least squares from a start (the [min, max] span's):
    g (N, G, group), q (N, G, group), scale (N, G), lo (N, G) -> (q, scale, lo), the same shapes.

    Alternate two exact minimisations of the squared error: the levels' scale and lo for the codes (a
    least-squares line of w on q), then the codes nearest to the new levels. Neither step can raise the
    error, so it ends at most the start's. On Gemma 3 270M's layers, `bench generate`'s quality text goes
    from +31% to +22% perplexity over float32 (KL 0.24 -> 0.18 nats/token).

    Starting from spans shrunk about their centre as well (clipping a group's extremes: llama.cpp's
    make_qkx2_quants searches so) lowers the squared error further and the quality text's perplexity to
    +19%, but the KL on 512 tokens of Macbeth rose from 0.38 to 0.47 nats/token (0.44 with the span): a
    group's extreme weights matter more to the outputs than their share of its squared error.
    """
    for _ in range(refits):
        qc = q - q.mean(-1, keepdim=True)
        var = (qc * qc).sum(-1)
        slope = (qc * g).sum(-1) / var.clamp(min=1e-30)  # var 0 (one code in the group): keep the scale
        scale = torch.where(var > 0, slope, scale).clamp(min=1e-12)
        lo = g.mean(-1) - scale * q.mean(-1)
        q = nearest_codes(g, scale, lo)
    return q, scale, lo


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) in [0, 15] -> (N, K/2) uint8, the layout of torch's CPU int4 kernel.

    `torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)` does the packing. Its layout, which
    `unpack_int4` reverses (tests/test_quant.py checks both ways): rows go in blocks of B
    (`int4_block_rows()`: 64 on a CPU with AVX-512, 32 without), and for each k the byte n of a block
    holds row n in its low nibble and row n + B/2 in its high nibble; rows past the last whole block
    are paired with their neighbour (2j low, 2j + 1 high).
    """
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.cache
def int4_block_rows() -> int:
    """B, the rows of one block of `pack_int4`'s layout on this CPU: torch's kernel packs 64 rows at a
    time where it has AVX-512 and 32 elsewhere. Found by packing one code: row 32 is the high nibble of
    the first byte in a block of 64, and the first row of the second block in blocks of 32."""
    probe = torch.zeros(64, 2, dtype=torch.int32)
    probe[32, 0] = 1
    return 64 if int(pack_int4(probe).reshape(-1)[0]) == 0x10 else 32


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 from `pack_int4` -> the codes (N, K) uint8."""
    N, K, B = packed.shape[0], packed.shape[1] * 2, int4_block_rows()
    full = N // B * B
    blocks = packed[:full].reshape(N // B, K, B // 2)  # [block, k, n]: rows n and n + B/2 of the block
    head = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(full, K)
    tail = packed[full:].reshape(K, (N - full) // 2)  # [k, j]: rows 2j and 2j + 1
    tail = torch.stack([tail & 15, tail >> 4], dim=2).reshape(K, N - full).T
    return torch.cat([head, tail])


# Rows of x past which Int4Linear dequantises its weight for one bf16 product instead of running the kernel:
# the kernel's time grows about in proportion to the rows (one layer of Gemma 3 270M: 1.1 ms at 8 rows, 8.5
# at 64, 17 at 128), the dequantisation's stays the same for any number. Its four products, 2-core AVX-512
# EPYC, median of 15 calls, two passes: 48 rows 5.6 / 6.7 ms kernel against 6.8 / 7.2 dequantised, 64 rows
# 7.3 / 10.7 against 7.3 / 8.9, 96 rows 11.0 / 14.6 against 8.4 / 10.7, 128 rows 14.8 / 14.9 against 9.7 / 10.2.
PROMPT_ROWS = 64


class Int4Linear(nn.Module):
    """y = x @ Wᵀ + bias with W in 4-bit planes: w = Σ_p (c_p - 8) · scale_p + zero_p, per group of 32.

    One plane holds a 4-bit quantisation (`from_weight`: w = lo + scale · q). Two planes hold codes of
    up to 8 bits exactly, c = lo + 16 · hi, at twice the bytes: that is how a GGUF file's own 5-, 6-
    and 8-bit blocks run on the 4-bit kernel unchanged (`from_codes`). x (..., K) in any float dtype
    -> (..., N) in bf16. A one-token step calls `_weight_int4pack_mm_for_cpu` once per plane (it reads
    half a byte per weight), and so does a short prompt; a prompt of more than PROMPT_ROWS tokens dequantises
    the weight to bf16 once (`dequantized_t`: a few passes over the packed bytes, both planes merged
    first) and runs one bf16 matrix product (faster than the kernel there).
    """

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if packed.shape[2] * 2 != scale_zero.shape[1] * group_size:
            raise ValueError(f"packed {tuple(packed.shape)} and scale_zero {tuple(scale_zero.shape)} do not "
                             f"describe groups of {group_size}")
        self.register_buffer("packed", packed)  # (P, N, K/2) uint8, the CPU kernel's layout
        self.register_buffer("scale_zero", scale_zero)  # (P, K/g, N, 2) bf16: [..., 0] scale, [..., 1] zero
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    # Read from the buffers, so that a module is its buffers (a saved one may hold 1 or 2 planes).
    @property
    def planes(self) -> int:
        return self.packed.shape[0]

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    @property
    def in_features(self) -> int:
        return self.packed.shape[2] * 2

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale_zero.shape[1]

    @classmethod
    def from_rows(cls, row_chunks, n_rows: int, in_features: int, group_size: int = 32,
                  bias: torch.Tensor | None = None, fit: bool = False) -> "Int4Linear":
        """Quantise a weight (n_rows, in_features) to one plane (`int4_groups`, `fit` passed on), given as consecutive
        chunks of rows, so a 262k-row head is never held whole in float32. Every chunk but the last
        must have a multiple of 64 rows (the packed layout's blocks). The outputs are allocated once,
        up front (a list of small pieces would fragment the heap)."""
        if n_rows % 16:
            raise ValueError(f"out_features={n_rows}: the int4 CPU kernel needs a multiple of 16")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        packed = torch.empty(1, n_rows, in_features // 2, dtype=torch.uint8)
        scale_zero = torch.empty(1, in_features // group_size, n_rows, 2, dtype=torch.bfloat16)
        r = 0
        for w in row_chunks:
            if r % 64:
                raise ValueError("only the last chunk of rows may have a number of rows not divisible by 64")
            n = w.shape[0]
            q, scale, lo = int4_groups(w, group_size, fit)
            packed[0, r:r + n] = pack_int4(q)
            scale_zero[0, :, r:r + n, 0] = scale.T
            scale_zero[0, :, r:r + n, 1] = (lo + 8 * scale).T  # (q - 8) · scale + zero = lo + scale · q
            r += n
        if r != n_rows:
            raise ValueError(f"the row chunks hold {r} rows, not {n_rows}")
        return cls(packed, scale_zero, group_size, bias)

    @classmethod
    def empty(cls, n_rows: int, in_features: int, group_size: int = 32, bias: torch.Tensor | None = None,
              planes: int = 1) -> "Int4Linear":
        """The module with its buffers on the meta device: shapes only, for a saved state to be assigned."""
        return cls(torch.empty(planes, n_rows, in_features // 2, dtype=torch.uint8, device="meta"),
                   torch.empty(planes, in_features // group_size, n_rows, 2, dtype=torch.bfloat16, device="meta"),
                   group_size, bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None,
                    fit: bool = False) -> "Int4Linear":
        """Quantise w (N, K) to one 4-bit plane, ROWS_PER_PACK rows at a time."""
        N, K = w.shape
        return cls.from_rows((w[r:r + ROWS_PER_PACK] for r in range(0, N, ROWS_PER_PACK)), N, K, group_size, bias, fit)

    @classmethod
    def from_codes(cls, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, group_size: int = 32,
                   bias: torch.Tensor | None = None) -> "Int4Linear":
        """Weights given as integer codes on a grid: w = a · v + b, with v (N, K) integers and a, b
        (N, K/g) one step and one offset per group (`weights.gguf.integer_codes`).

        Codes in [0, 15] take one plane: c = v, scale a, zero 8a + b. Wider codes are written in
        balanced base 16, v = d0 + 16 · d1 with digits d in [-8, 7], one plane per digit: c = d + 8,
        scale a · 16^p, zero 0 (plane 0 also carries b). Two planes hold v in [-136, 119] (codes outside
        it are shifted, moving the shift into b), so 5-bit (Q5_0) and 8-bit (Q8_0) codes run exactly
        on the 4-bit kernel, up to the bf16 rounding of the scales (the kernel's format), at twice the
        bytes of one plane.
        """
        N, K = v.shape
        if N % 16 or K % group_size:
            raise ValueError(f"({N}, {K}): the int4 CPU kernel needs rows in multiples of 16 and "
                             f"columns in multiples of the group size {group_size}")
        v = v.to(torch.int32)
        if v.min() >= 0 and v.max() <= 15:
            planes = [(v, a, 8 * a + b)]
        else:
            lo, hi = int(v.min()), int(v.max())
            if hi - lo > 255:
                raise ValueError(f"codes in [{lo}, {hi}] need more than two 4-bit planes")
            shift = max(0, hi - 119) or min(0, lo + 136)  # two balanced digits hold [-136, 119]
            v, b = v - shift, b + shift * a
            planes, rest, step = [], v, a
            while True:
                digit = torch.remainder(rest + 8, 16) - 8  # in [-8, 7]
                rest = torch.div(rest - digit, 16, rounding_mode="floor")
                planes.append((digit + 8, step, b if not planes else torch.zeros_like(a)))
                step = 16 * step
                if len(planes) == 2:
                    break
        packed = torch.stack([pack_int4(c) for c, _, _ in planes])
        scale_zero = torch.stack([torch.stack([s.T, z.T], dim=-1) for _, s, z in planes]).to(torch.bfloat16)
        return cls(packed, scale_zero.contiguous(), group_size, bias)

    @staticmethod
    def cat(modules: list["Int4Linear"]) -> "Int4Linear":
        """One module computing the concatenated outputs of `modules` (same input): their rows
        stacked, with an all-zero plane (code 8, scale 0, zero 0) added where one has fewer planes."""
        P = max(m.planes for m in modules)
        packed, scale_zero = [], []
        for m in modules:
            pad = P - m.planes
            packed.append(torch.cat([m.packed, torch.full((pad, *m.packed.shape[1:]), 0x88, dtype=torch.uint8)]))
            scale_zero.append(torch.cat([m.scale_zero, torch.zeros(pad, *m.scale_zero.shape[1:], dtype=torch.bfloat16)]))
        if len({m.group_size for m in modules}) > 1 or any(m.bias is not None for m in modules):
            raise ValueError("Int4Linear.cat: the modules must share a group size and have no bias")
        return Int4Linear(torch.cat(packed, dim=1), torch.cat(scale_zero, dim=2), modules[0].group_size)

    def codes(self) -> torch.Tensor:
        """The integer code of every weight, v = Σ_p (c_p - 8) · 16^p, (N, K) int16. The planes of
        `from_codes` are the base-16 digits of one code (scale_p = 16^p · scale_0, zero_p = 0 for p > 0),
        so w = v · scale_0 + zero_0; for one plane it is just (c - 8) · scale + zero."""
        v = unpack_int4(self.packed[0]).to(torch.int16) - 8
        for p in range(1, self.planes):
            v += (unpack_int4(self.packed[p]).to(torch.int16) - 8) * 16 ** p
        return v

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (N, K) the kernel multiplies by, in `dtype` (computed in float32).

        Rows in whole blocks (`int4_block_rows`) are worked on in the packed layout itself, [block, k,
        row in block], with one transpose at the end: a prompt dequantises every weight, so the passes
        over it count."""
        N, K, g, B = self.out_features, self.in_features, self.group_size, int4_block_rows()
        if self.planes > 1 and not self._digits():
            raise ValueError("dequantized() reads planes that are base-16 digits of one code (from_codes)")
        out = torch.empty(N, K, dtype=dtype)
        full = N // B * B
        if full:
            v = None
            for p in range(self.planes):
                b = self.packed[p, :full].view(N // B, K, B // 2)  # byte n: rows n (low) and n + B/2 (high)
                c = torch.cat([b & 15, b >> 4], dim=2).to(torch.int16) - 8  # (N/B, K, B)
                v = c if v is None else v.add_(c, alpha=16 ** p)
            sz = self.scale_zero[0, :, :full].float().view(K // g, N // B, B, 2).permute(1, 0, 3, 2)
            w = torch.addcmul(sz[:, :, None, 1], v.view(N // B, K // g, g, B), sz[:, :, None, 0])  # zero + v·scale
            out[:full] = w.reshape(N // B, K, B).transpose(1, 2).reshape(full, K)
        if full < N:
            scale, zero = self.scale_zero[0, :, full:].float().permute(1, 0, 2).unbind(-1)  # (N - full, K/g)
            v = self.codes()[full:].view(N - full, K // g, g).float()
            out[full:] = (v * scale[..., None] + zero[..., None]).view(N - full, K)
        return out

    def dequantized_t(self) -> torch.Tensor:
        """The weight transposed, Wᵀ (K, N) bf16 contiguous, the bits of `dequantized(torch.bfloat16).T`,
        built for a long prompt's product x @ Wᵀ (no transpose to pay there) in few passes over the weight.

        The planes' 4-bit codes are merged per byte first, u = c_0 + 16 c_1 (the two base-16 digits of
        `from_codes`), the bytes moved from the packed layout [block, k, row in block] to [k, row] once
        (as float32), v = u - 8 - 8·16 (two planes) or u - 8 (one), and w = zero + v·scale in float32,
        then rounded to bf16: `dequantized`'s arithmetic (v·scale is exact, one rounding), so
        the same bits (tests/test_quant.py)."""
        N, K, g, B = self.out_features, self.in_features, self.group_size, int4_block_rows()
        if self.planes > 2 or (self.planes > 1 and not self._digits()):
            return self.dequantized(torch.bfloat16).T.contiguous()
        full = N // B * B
        v = torch.empty(K, N, dtype=torch.float32)  # float: addcmul with an int16 operand is ~10x slower
        if full:
            b0 = self.packed[0, :full].view(N // B, K, B // 2)  # byte n: rows n (low nibble) and n + B/2 (high)
            lo, hi = b0 & 15, b0 >> 4
            if self.planes == 2:  # the second digit in the high nibble: u = c_0 + 16 c_1, one byte
                b1 = self.packed[1, :full].view(N // B, K, B // 2)
                lo |= b1 << 4  # uint8: the shift drops b1's high nibble
                hi |= b1 & 0xF0
            u = torch.cat([lo, hi], dim=2)  # (N/B, K, B) bytes: [block, k, row in block]
            # to [k, row] in one copy that writes v in order (two half-row writes fault pages ~8x slower),
            # and to float on the way (exact: codes < 256)
            v[:, :full].view(K, N // B, B).copy_(u.permute(1, 0, 2))
            v[:, :full] -= 8 if self.planes == 1 else 8 + 8 * 16
        if full < N:  # rows past the last whole block: their codes, the slow way
            v[:, full:] = self.codes()[full:].T
        scale, zero = self.scale_zero[0].float().unbind(-1)  # (K/g, N) each
        v = v.view(K // g, g, N)
        torch.addcmul(zero[:, None], v, scale[:, None], out=v)  # zero + v·scale, in place (float out: faster)
        return v.view(K, N).to(torch.bfloat16)

    def _digits(self) -> bool:
        s = self.scale_zero.float()
        return all(torch.equal(s[p, ..., 0], s[0, ..., 0] * 16 ** p) and not s[p, ..., 1].any()
                   for p in range(1, self.planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = bf16_rows(x)  # (M, K)
        if x2.shape[0] > PROMPT_ROWS:  # a long prompt: dequantise once, then one bf16 product
            y = bf16_matmul(x2, self.dequantized_t().T)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed[0], self.group_size, self.scale_zero[0])
            for p in range(1, self.planes):
                y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed[p], self.group_size,
                                                                    self.scale_zero[p])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, planes={self.planes}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------------------------
# The embedding in Q8_0 blocks, and the re-scored head
# ----------------------------------------------------------------------------------------------
def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """Quantise rows of w (V, C) to GGUF's Q8_0: blocks of 32 weights, an fp16 scale d = max|w|/127
    and 32 int8 q = round(w / d). Returns (V, C/32, 34) uint8, the file's own byte layout; C must be
    a multiple of 32 (ValueError). The codes divide by the float32 d, the file keeps d rounded to fp16
    (ggml's quantize_row_q8_0 does the same: tests/test_quant.py compares the bytes with the `gguf`
    package's; ties round to even here, away from zero there). A block of zeros gets d = 0, codes 0.

    For weights that were dequantised from Q8_0 (the 270M's embedding) this gives back the file's
    bytes exactly: the largest |q| of a block is 127, so d and then every q come out the same.
    """
    V, C = w.shape
    if C % 32:
        raise ValueError(f"rows of {C} weights are not whole Q8_0 blocks of 32")
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
        self.dtype = dtype

    @property
    def num_embeddings(self) -> int:
        return self.blocks.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.blocks.shape[1] * 32

    @classmethod
    def from_rows(cls, row_chunks: Iterable[torch.Tensor], n_rows: int, dim: int,
                  dtype: torch.dtype = torch.bfloat16) -> "Q8_0Embedding":
        """Quantise a table (n_rows, dim) given as consecutive chunks of rows, into blocks allocated once."""
        blocks = torch.empty(n_rows, dim // 32, 34, dtype=torch.uint8)
        r = 0
        for w in row_chunks:
            blocks[r:r + w.shape[0]] = q8_0_blocks(w)
            r += w.shape[0]
        if r != n_rows:
            raise ValueError(f"the row chunks hold {r} rows, not {n_rows}")
        return cls(blocks, dtype)

    @classmethod
    def from_weight(cls, w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> "Q8_0Embedding":
        V, C = w.shape
        return cls.from_rows((w[r:r + ROWS_PER_PACK] for r in range(0, V, ROWS_PER_PACK)), V, C, dtype)

    @classmethod
    def empty(cls, n_rows: int, dim: int, dtype: torch.dtype = torch.bfloat16) -> "Q8_0Embedding":
        """The module with its blocks on the meta device: shapes only, for a saved state to be assigned."""
        return cls(torch.empty(n_rows, dim // 32, 34, dtype=torch.uint8, device="meta"), dtype)

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


RESCORE = 1024  # logits a RescoredHead recomputes exactly (its docstring: KL and cost against k)


def embedding_rows(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Exact float32 rows of an nn.Embedding or a Q8_0Embedding."""
    if isinstance(embedding, Q8_0Embedding):
        return embedding.rows(ids)
    return embedding.weight[ids].float()


class RescoredHead(nn.Module):
    """A quantised head whose k largest logits are recomputed exactly: greedy choices as the exact head's,
    and the distribution's head (where its probability mass is) as the exact one's.

    A 4-bit head moves logits by up to ~2-3 (Gemma 3 270M), enough to swap near-tied tokens. But the
    token the exact head would pick stays among the quantised head's top few (measured: within the
    top 6 at every position of chapter 06's texts), so we take the top k (RESCORE), recompute those k
    logits in float32 from the embedding's exact rows (k · C multiply-adds), and write them back.
    Greedy decoding then picks the exact head's arg-max; the other logits keep their quantised values.
    Those still carry probability: the KL from the exact distribution falls as k grows (Gemma 3 270M
    on the file's own codes, 512 tokens of the speed prompt: 0.0104 nats/token at k = 64, 0.0056 at
    256, 0.0043 at 512, 0.0035 at 1,024; llama.cpp on the same file 0.0059), while a decode step's
    head costs 5.3, 5.5, 5.7 and 6.4 ms on a 2-core AVX-512 EPYC. k = 512 met llama.cpp's KL on that
    prompt but not on `bench generate`'s quality text (0.0055 against 0.0054), so the default is 1,024.

    x (..., C) -> logits (..., V) float32.
    """

    def __init__(self, approx: nn.Module, embedding: nn.Module, k: int = RESCORE):
        super().__init__()
        self.approx, self.k = approx, k
        self._embedding = [embedding]  # the model's own embedding (not registered twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approx(x).float()  # (..., V)
        idx = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices  # (..., k); a small vocabulary: all
        rows = embedding_rows(self._embedding[0], idx)  # (..., k, C)
        exact = (rows @ x.float()[..., None])[..., 0]  # (..., k)
        return logits.scatter_(-1, idx, exact)

    def extra_repr(self) -> str:
        return f"k={self.k}"


# ----------------------------------------------------------------------------------------------
# quantize: swap the modules of a float model
# ----------------------------------------------------------------------------------------------
def quantized_linear(level: str, w, bias: torch.Tensor | None = None, group_size: int = 32):
    """The module that replaces an nn.Linear of weight w (N, K) at `level` ("int8" or "int4").
    w may also be (row_chunks, N, K): consecutive chunks of rows, read as they are quantised."""
    chunks, N, K = w if isinstance(w, tuple) else ((w[r:r + ROWS_PER_PACK] for r in range(0, w.shape[0], ROWS_PER_PACK)),
                                                   *w.shape)
    if level == "int8":
        return Int8Linear.from_rows(chunks, N, K, bias)
    if level == "int4":  # levels fitted by least squares (`fit_groups`)
        return Int4Linear.from_rows(chunks, N, K, group_size, bias, fit=True)
    raise ValueError(f"no quantised linear for level {level!r}")


# Weights per scale and zero in each level's ranking head. The head only ranks (its top RESCORE are
# recomputed exactly), but the logits left outside the top k keep its error, and they still carry
# probability. On `bench generate`'s quality text (Gemma 3 270M, 1,024 tokens), the KL from float32
# for the file's codes with groups of 128 / 64 / 32 is 0.0039 / 0.0034 / 0.0029 (0.0018 with an exact
# head), and a decode step's head (eager, one token) costs 6.8 / 7.0 / 7.8 ms. int4's levels keep the
# fewest bytes. int8 spends ~1 ms of a step and 16 MB for groups of 32: its layers' error leaves
# less room (KL 0.0057 with 128 groups, 0.0048 with 32; llama.cpp on the same file: 0.0054).
HEAD_GROUP_SIZE = {"int4": 128, "int8": 32}


def head_group_size(dim: int, group_size: int = HEAD_GROUP_SIZE["int4"]) -> int:
    """The head's group size for an embedding of width `dim`: `group_size`, or 64 or 32 where it does
    not divide `dim` (small test models)."""
    return next((g for g in (group_size, 64, 32) if dim % g == 0), group_size)


def quantized_head(embedding: nn.Module, rescore: int = RESCORE,
                   group_size: int = HEAD_GROUP_SIZE["int4"]) -> RescoredHead:
    """The LM head tied to `embedding` (V, C) as an int4 head whose top `rescore` logits are exact.
    Built ROWS_PER_PACK exact rows at a time.

    The 4-bit head only has to rank: the exact head's arg-max must be among its top `rescore`. On
    Gemma 3 270M with groups of 128 weights (89 MB instead of 105 MB with 32) the exact arg-max ranked
    at most 11th over 2,048 positions of real text (tests/test_quant.py checks it stays within 64, far
    inside RESCORE). Its levels are fitted (`fit_groups`), as the int4 level's layers are."""
    V, C = embedding.num_embeddings, embedding.embedding_dim
    chunks = (embedding_rows(embedding, torch.arange(r, min(V, r + ROWS_PER_PACK))) for r in range(0, V, ROWS_PER_PACK))
    return RescoredHead(Int4Linear.from_rows(chunks, V, C, head_group_size(C, group_size), fit=True), embedding, rescore)


def cast_activations(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """In place: every floating parameter and buffer to `dtype`, except RMSNorm weights, which stay
    float32: the norm computes in float32 anyway, so rounding its weight would only add error.

    This is the one place that decides a tensor's precision: `quantize` calls it, and every loader
    through it (on a skeleton on the meta device it costs nothing and sets the dtypes the weights are
    then read into), so `load_pretrained(dtype=torch.bfloat16)` and `quant="bf16"` are the same model.
    In bf16 every nn.Linear becomes a `BF16Linear` (the same module object, retyped)."""
    # every nn.Linear of a bf16 model is a BF16Linear (its prompts' products fast on any CPU); back to
    # nn.Linear in any other dtype
    swap_modules(model, {nn.Linear: retype(BF16Linear)} if dtype == torch.bfloat16 else {BF16Linear: retype(nn.Linear)})
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for m in model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and id(t) not in norms and t.dtype != dtype:
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    setattr(m, name, t.to(dtype))
    return model


Weights = Callable[[str], Iterable[torch.Tensor]]  # name -> its float32 rows, chunk by chunk
Codes = Callable[[str], list]  # a linear's weight name -> [(v, a, b), ...], one per stacked part


@torch.no_grad()
def quantize(model: nn.Module, level: str | None = "int8", weights: Weights | None = None, *,
             codes: Codes | None = None, group_size: int = 32, rescore: int = RESCORE) -> nn.Module:
    """The model at `level`, in place, by swapping modules; returns it. The one place that decides
    what each module becomes:

        None     nothing swapped (float32, or whatever the model holds)
        "bf16"   nothing swapped; every weight bf16 but the norms'
        "int8"   every nn.Linear but the head -> Int8Linear (biases kept); the embedding ->
                 Q8_0Embedding; a head tied to it -> RescoredHead (int4, its top `rescore` logits
                 exact; HEAD_GROUP_SIZE["int8"] weights per scale); what is left runs in bf16 (the
                 norms' weights float32)
        "int4"   the same with Int4Linear (a scale and a zero per `group_size` weights), and
                 HEAD_GROUP_SIZE["int4"] weights per scale in the head

    Where the float weights come from:

        a float model, weights None   each module's own weights (quantising a loaded model)
        a skeleton on the meta device, weights(name) -> the float32 rows of tensor `name`
                 ("layers.0.mlp.gate_up_proj.weight"), chunk by chunk (`pretrained.CheckpointRows`):
                 each quantised module is built from its chunks, then every other tensor is read
                 into memory of its final dtype, one at a time; so the float32 model, or its
                 262,144-row embedding, never exists whole
        a skeleton, weights None      the quantised modules swapped in empty (on the meta device), for
                 a saved quantised state to be assigned to (`minigemma.pretrained`'s cache)

    codes (level "int4" only): codes(name) -> [(v, a, b), ...], a linear weight's integer codes
    (w = a · v + b, one triple per stacked part, `weights.gguf.integer_codes`), kept exactly on the
    int4 kernel (`Int4Linear.from_codes`) instead of codes computed from the float weights.
    """
    if level not in LEVELS:
        raise ValueError(f"quant level {level!r}: choose from {', '.join(map(repr, LEVELS))}")
    if codes is not None and level != "int4":
        raise ValueError(f"given codes run on the int4 kernel: level must be 'int4', not {level!r}")
    names = {id(m): name for name, m in model.named_modules()}
    skeleton = weights is None and any(t.is_meta for t in model.state_dict().values())

    def rows(m: nn.Module) -> Iterable[torch.Tensor]:  # a weight's float32 rows, a block at a time
        if weights is not None:
            return weights(f"{names[id(m)]}.weight")
        return (m.weight[r:r + ROWS_PER_PACK] for r in range(0, m.weight.shape[0], ROWS_PER_PACK))

    def bias(m: nn.Linear) -> torch.Tensor | None:
        if m.bias is None or weights is None:
            return m.bias
        return torch.cat(list(weights(f"{names[id(m)]}.bias")))

    embedding, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    tied = isinstance(embedding, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embedding.weight

    def linear(m: nn.Linear) -> nn.Module | None:
        N, K = m.out_features, m.in_features
        if m is head:
            return None  # a tied head is built from the quantised embedding, below
        if skeleton:
            return Int8Linear.empty(N, K, m.bias) if level == "int8" else Int4Linear.empty(N, K, group_size, m.bias)
        if codes is not None:
            parts = [Int4Linear.from_codes(v, a, b, group_size) for v, a, b in codes(f"{names[id(m)]}.weight")]
            lin = parts[0] if len(parts) == 1 else Int4Linear.cat(parts)
            return Int4Linear(lin.packed, lin.scale_zero, group_size, bias(m))
        return quantized_linear(level, (rows(m), N, K), bias(m), group_size)

    def q8_0(m: nn.Embedding) -> Q8_0Embedding:
        V, C = m.num_embeddings, m.embedding_dim
        return Q8_0Embedding.empty(V, C) if skeleton else Q8_0Embedding.from_rows(rows(m), V, C)

    if level in ("int8", "int4"):
        swap_modules(model, {nn.Linear: linear, nn.Embedding: q8_0})
        if tied:
            emb = model.embed_tokens
            groups = HEAD_GROUP_SIZE[level]
            model.lm_head = (RescoredHead(Int4Linear.empty(emb.num_embeddings, emb.embedding_dim,
                                                           head_group_size(emb.embedding_dim, groups)), emb, rescore)
                             if skeleton else quantized_head(emb, rescore, groups))
    if level is not None:
        cast_activations(model, torch.bfloat16)
    if weights is not None:
        _read_the_rest(model, weights)
    return model


def _read_the_rest(model: nn.Module, weights: Weights) -> None:
    """Every tensor of `model` still on the meta device, read from `weights` into memory of the dtype it
    already has (`cast_activations` set it), a chunk of rows at a time; tied names share the result."""
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is not None and t.is_meta:
            first.setdefault(id(t), name)
    for name in first.values():
        module_name, _, attr = name.rpartition(".")
        old = getattr(model.get_submodule(module_name), attr)
        new, r = torch.empty(old.shape, dtype=old.dtype), 0
        for chunk in weights(name):
            new[r:r + chunk.shape[0]] = chunk
            r += chunk.shape[0]
        if r != old.shape[0]:
            raise ValueError(f"the weights of {name} hold {r} rows, not {old.shape[0]}")
        new = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        for m in model.modules():  # every module holding it (a tied head shares the embedding's)
            for slot in (m._parameters, m._buffers):
                for key, t in slot.items():
                    if t is old:
                        slot[key] = new
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded: {left}")


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
