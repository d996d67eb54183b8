"""Weight-only int8 and int4 matrix products for decoding (GEMV), reading the package's quantised layouts.

Decoding one token multiplies a few rows of activations x (M, K), M = the batch (1 to 32), by every
weight matrix once: y = x Wᵀ + bias (M, N). The arithmetic is tiny; the time is the time to read W.
These kernels read W in the bytes `minigemma.quant` stores it in and dequantise in registers, so a
step reads 1 byte per weight (int8) or half a byte per plane (int4) instead of 2 (bf16):

    Int8Linear   q (N, K) int8, scale (N,) bf16              w[n, k] = scale[n] · q[n, k]
    Int4Linear   packed (P, N, K/2) uint8, scale_zero (P, K/g, N, 2) bf16, per group of g weights of a row:
                 w[n, k] = Σ_p (c_p[n, k] − 8) · scale_p[k/g, n] + zero_p[k/g, n]
                 (P = 1: a 4-bit quantisation; P = 2: a GGUF file's 5- and 8-bit codes as two base-16 digits)

`packed` is torch's CPU int4 layout (`quant.pack_int4`): rows go in blocks of B (`quant.int4_block_rows()`:
64 where the CPU that packed them has AVX-512, 32 elsewhere) and, for each k, byte j of a block (j < B/2)
holds row j in its low nibble and row j + B/2 in its high nibble, so the block is (K, B/2) bytes, k-major;
rows past the last whole block form a (K, R/2) tail whose byte j holds rows 2j (low) and 2j + 1 (high).
`_code_offsets` turns a row index into (byte offset, stride per k, nibble shift): one formula covers both,
so any BLOCK_N works and the tail needs no second kernel.

One program computes a (BLOCK_M, BLOCK_N) tile of y: it walks K in tiles of BLOCK_K, loads x's tile
and W's codes for BLOCK_N rows, and accumulates x · codesᵀ with `tl.dot` in float32. The scale
multiplies afterwards, per row for int8 (Σ_k x q, then · scale[n]), per group for int4:

    Σ_{k in group} x_k w_k = scale · Σ_k x_k (c_k − 8) + zero · Σ_k x_k

so the weights are never dequantised one by one. With few rows of outputs (small N) there are too
few programs to fill a GPU, so the K tiles are also split over SPLIT_K programs; each writes a
float32 partial tile and torch sums them (deterministic: no atomics).

Precision. Codes are small integers and bf16 activations have 8 significant bits, so every product
x · code is exact in bf16 × bf16 → float32 (`tl.dot` on the tensor cores; in the interpreter, float32
with input_precision="ieee"): only the float32 summation order differs from the reference. A GPU
writes y in bf16 from the kernel (bias added in float32 first, one rounding). Triton's interpreter
casts float32 to bf16 by truncation, not round-to-nearest, so there the kernel writes float32 and
torch rounds. References: `Int8Linear.forward` / `Int4Linear.forward` (torch's CPU kernels) and
x @ module.dequantized().T.
"""

from __future__ import annotations

from collections import Counter

import torch
import triton
import triton.language as tl
from torch import nn

from minigemma.quant import Int4Linear, Int8Linear, bf16_rows, int4_block_rows
from minigemma.swap import retype

from .interpret import INTERPRET
from .utils import DeviceProps, check_device, device_props, retype_modules


@triton.jit
def _store_tile(Y, y, pid_k, m, n, M, N, stride_ys, stride_ym, B, HAS_BIAS: tl.constexpr):
    """Write the (BLOCK_M, BLOCK_N) tile y to Y[pid_k] in Y's dtype: with one split the result (bias
    added here), with several a float32 partial sum of their K tiles (torch adds them and the bias)."""
    ok = (m < M)[:, None] & (n < N)[None, :]
    if HAS_BIAS:
        y += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    ptrs = Y + pid_k.to(tl.int64) * stride_ys + m.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_int8_kernel(X, Q, S, B, Y, M, N, K, stride_xm, stride_qn, stride_ys, stride_ym,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = scale[n] · Σ_k x[m, k] q[n, k]: a tile of rows m and outputs n, K tiles pid_k + j · SPLIT_K."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = n < N, m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + m.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        q = tl.load(Q + n.to(tl.int64)[:, None] * stride_qn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0)  # (BLOCK_N, BLOCK_K) int8: one byte per weight
        acc += tl.dot(x.to(DOT), tl.trans(q.to(DOT)), input_precision=PRECISION)
    scale = tl.load(S + n, mask=n_ok, other=0.0).to(tl.float32)
    _store_tile(Y, acc * scale[None, :], pid_k, m, n, M, N, stride_ys, stride_ym, B, HAS_BIAS)


@triton.jit
def _code_offsets(n, N, n_full, K, HALF: tl.constexpr):
    """Where the 4-bit code of row n sits in one plane of `packed`: (offset of its byte at k = 0, bytes
    from one k to the next, shift of its nibble). Blocks of 2·HALF rows; n_full = rows in whole blocks."""
    n = n.to(tl.int64)
    j = n % (2 * HALF)
    in_block = n < n_full
    t = n - n_full  # a tail row: byte t // 2 of a (K, R/2) tail, R = N − n_full rows
    base = tl.where(in_block, (n // (2 * HALF)) * (HALF * K) + (j % HALF), n_full * (K // 2) + t // 2)
    step = tl.where(in_block, HALF, (N - n_full) // 2)
    shift = tl.where(in_block, (j // HALF) * 4, (t % 2) * 4)
    return base, step, shift.to(tl.int32)


@triton.jit
def _gemv_int4_kernel(X, PK, SZ, B, Y, M, N, K, n_full, group_size, n_planes, stride_xm, stride_pk, stride_szp,
                      stride_szg, stride_ys, stride_ym,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                      HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = Σ_p Σ_groups scale_p · Σ_k x (c_p − 8) + zero_p · Σ_k x, a K tile inside one group."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = n < N, m < M
    base, step, shift = _code_offsets(n, N, n_full, K, HALF)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # K is a multiple of the group size, which BLOCK_K divides: no tail
        x = tl.load(X + m.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
        x = x.to(tl.float32)
        x_sum = tl.sum(x, axis=1)  # (BLOCK_M,) Σ_k x over the tile, for the zeros
        code_ptrs = PK + base[:, None] + k.to(tl.int64)[None, :] * step[:, None]  # (BLOCK_N, BLOCK_K)
        sz = SZ + (k0 // group_size) * stride_szg + 2 * n.to(tl.int64)  # (BLOCK_N,) [scale, zero] of this group
        for p in range(n_planes):
            byte = tl.load(code_ptrs + p * stride_pk, mask=n_ok[:, None], other=0)  # uint8: two codes
            c = ((byte.to(tl.int32) >> shift[:, None]) & 15).to(tl.float32) - 8.0  # (BLOCK_N, BLOCK_K) in [-8, 7]
            scale = tl.load(sz + p * stride_szp, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(sz + p * stride_szp + 1, mask=n_ok, other=0.0).to(tl.float32)
            dot = tl.dot(x.to(DOT), tl.trans(c.to(DOT)), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            acc += dot * scale[None, :] + x_sum[:, None] * zero[None, :]
    _store_tile(Y, acc, pid_k, m, n, M, N, stride_ys, stride_ym, B, HAS_BIAS)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
MAX_DECODE_ROWS = 32  # the batch sizes these kernels are written for; more rows still work (a plain tiled matmul)


def _config(M: int, N: int, K: int, x_dtype: torch.dtype, device: torch.device | None, block_k: int,
            split_k: int | None, block_n: int | None, props: DeviceProps | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, grid, dot dtype, precision, warps); a GPU's from its props (given,
    or read from `device`), the interpreter's when there are none."""
    BLOCK_M = 16 if M <= 16 else 32 if M <= 32 else 64  # tl.dot needs 16 rows at least: the rest are masked
    if props is None and device is not None and device.type == "cuda" and not INTERPRET:
        props = device_props(device)
    if props is not None:
        if x_dtype in (torch.bfloat16, torch.float16):  # x and the codes exact in x's dtype: the tensor cores
            dot, precision = (tl.bfloat16 if x_dtype == torch.bfloat16 else tl.float16), "tf32"  # (unused by 16-bit)
            BLOCK_N = block_n or 64
        else:  # float32 activations stay float32 ("ieee": no rounding to TF32), products on the CUDA cores
            dot, precision = tl.float32, "ieee"
            # an FMA tl.dot holds both operands in registers, every value in its own: 64 rows of codes spilled
            # (72-352 B a thread on sm_90 and sm_80 at 4 warps), 32 take 128-167 registers and spill nothing
            BLOCK_N = block_n or 32
        sms = props.sm_count
        tiles = triton.cdiv(N, BLOCK_N) * triton.cdiv(M, BLOCK_M)
        k_tiles = triton.cdiv(K, block_k)
        split = split_k or max(1, min(k_tiles, 16, (2 * sms) // max(1, tiles)))
        warps = 4
    else:  # the interpreter: numpy on the CPU computes float32
        BLOCK_N = block_n or 32
        split = split_k or 1
        dot, precision, warps = tl.float32, "ieee", 1
    grid = (triton.cdiv(N, BLOCK_N), split, triton.cdiv(M, BLOCK_M))
    return BLOCK_M, BLOCK_N, block_k, split, grid, dot, precision, warps


def _out(M: int, N: int, split: int, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer the kernel writes: (split, M, N) float32 partials, or (1, M, N) y itself; float32 in the
    interpreter, whose bf16 cast truncates (torch rounds afterwards)."""
    if split > 1 or INTERPRET:
        return torch.empty(split, M, N, dtype=torch.float32, device=device)
    return torch.empty(1, M, N, dtype=out_dtype, device=device)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if y.shape[0] > 1:  # partial sums of the splits: add them, then the bias, in float32
        y = y.sum(0)
        if bias is not None:
            y = y + bias.float()
    else:
        y = y[0]
    return y.to(out_dtype)


def _check_x(x: torch.Tensor, K: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{what}: x must be (M, K = {K}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: x must be floating point, got {x.dtype}")


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, *, split_k: int | None = None, block_n: int | None = None,
              block_k: int | None = None) -> torch.Tensor:
    """x (M, K) @ (scale[:, None] · q)ᵀ + bias -> (M, N) in out_dtype (default x's dtype).

    q (N, K) int8, scale (N,) and bias (N,) in any float dtype (the modules keep bf16)."""
    N, K = q.shape
    check_device(x=x, q=q, scale=scale, bias=bias)
    _check_x(x, K, "gemv_int8")
    if q.dtype != torch.int8 or scale.shape != (N,) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"gemv_int8: q (N, K) int8 and scale/bias (N,) expected, got q {q.dtype} "
                         f"{tuple(q.shape)}, scale {tuple(scale.shape)}")
    out_dtype = out_dtype or x.dtype
    M = x.shape[0]
    x, q = x.contiguous(), q.contiguous()
    BM, BN, BK, split, grid, dot, precision, warps = _config(M, N, K, x.dtype, x.device, block_k or 64, split_k,
                                                             block_n)
    y = _out(M, N, split, out_dtype, x.device)
    if M and N:
        _gemv_int8_kernel[grid](x, q, scale.contiguous(), bias if bias is not None else scale, y, M, N, K,
                                x.stride(0), q.stride(0), y.stride(0), y.stride(1),
                                HAS_BIAS=bias is not None and split == 1,
                                SPLIT_K=split, DOT=dot, PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                num_warps=warps)
    elif M:
        y.zero_()
    return _finish(y, bias if split > 1 else None, out_dtype)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *, split_k: int | None = None,
              block_n: int | None = None, block_k: int | None = None, block_rows: int | None = None) -> torch.Tensor:
    """x (M, K) @ Wᵀ + bias -> (M, N), W in 4-bit planes: packed (P, N, K/2) uint8 (torch's CPU int4 layout,
    in blocks of block_rows rows: by default this CPU's, `quant.int4_block_rows()`), scale_zero (P, K/g, N, 2)
    (scale, zero), w = Σ_p (c_p − 8) · scale_p + zero_p per group of g."""
    if packed.dim() != 3 or packed.dtype != torch.uint8:
        raise ValueError(f"gemv_int4: packed must be (P, N, K/2) uint8, got {packed.dtype} {tuple(packed.shape)}")
    P, N, K = packed.shape[0], packed.shape[1], packed.shape[2] * 2
    check_device(x=x, packed=packed, scale_zero=scale_zero, bias=bias)
    _check_x(x, K, "gemv_int4")
    if K % group_size or scale_zero.shape != (P, K // group_size, N, 2):
        raise ValueError(f"gemv_int4: scale_zero must be (P, K/g, N, 2) = {(P, K // group_size, N, 2)} with K = {K} "
                         f"a multiple of group_size = {group_size}; got {tuple(scale_zero.shape)}")
    B = block_rows or int4_block_rows()
    if B not in (32, 64):
        raise ValueError(f"gemv_int4: torch's int4 layout has blocks of 32 or 64 rows, not {B}")
    n_full = N // B * B
    if (N - n_full) % 2:
        raise ValueError(f"gemv_int4: N = {N} rows: the packed tail pairs rows, so N must be even")
    out_dtype = out_dtype or x.dtype
    M = x.shape[0]
    BK = block_k or min(64, group_size & -group_size)  # the largest power of two <= 64 dividing g
    if group_size % BK or BK < 16:
        raise ValueError(f"gemv_int4: a K tile of {BK} must divide the group size {group_size} and be >= 16 "
                         "(block_k; groups must be multiples of 16)")
    x, packed, scale_zero = x.contiguous(), packed.contiguous(), scale_zero.contiguous()
    BM, BN, BK, split, grid, dot, precision, warps = _config(M, N, K, x.dtype, x.device, BK, split_k, block_n)
    y = _out(M, N, split, out_dtype, x.device)
    if M and N:
        _gemv_int4_kernel[grid](x, packed, scale_zero, bias if bias is not None else scale_zero, y, M, N, K, n_full,
                                group_size, P, x.stride(0), packed.stride(0), scale_zero.stride(0),
                                scale_zero.stride(1), y.stride(0), y.stride(1),
                                HAS_BIAS=bias is not None and split == 1,
                                SPLIT_K=split, DOT=dot, PRECISION=precision, HALF=B // 2, BLOCK_M=BM, BLOCK_N=BN,
                                BLOCK_K=BK, num_warps=warps)
    elif M:
        y.zero_()
    return _finish(y, bias if split > 1 else None, out_dtype)


def gemv(x: torch.Tensor, module: Int8Linear | Int4Linear) -> torch.Tensor:
    """module(x) on the kernels: x (..., K) -> (..., N) in bf16, as the module returns it."""
    x2 = bf16_rows(x)  # (M, K) bf16, the activations the modules take
    if isinstance(module, Int8Linear):
        y = gemv_int8(x2, module.q, module.scale, module.bias, torch.bfloat16)
    elif isinstance(module, Int4Linear):
        y = gemv_int4(x2, module.packed, module.scale_zero, module.group_size, module.bias, torch.bfloat16)
    else:
        raise TypeError(f"gemv takes an Int8Linear or an Int4Linear, got {type(module).__name__}")
    return y.reshape(*x.shape[:-1], y.shape[-1])


class TritonInt8Linear(Int8Linear):
    """`minigemma.quant.Int8Linear` whose forward is the Triton kernel: same buffers, same state dict.

    `use_gemv(model)` swaps every Int8Linear of a model for one (tests/test_kernels_gemv.py does, on a whole
    quantised Gemma). It runs right in Triton's interpreter with the module's bf16 activations too: the kernel only
    loads bf16 (widened exactly to float32) and writes float32 there, which torch rounds. `kernels.swap.use_triton`
    does not swap it in yet: quantised modules keep their torch kernels there."""

    @staticmethod
    def unsupported(module: Int8Linear) -> str | None:
        return None  # every Int8Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self)


class TritonInt4Linear(Int4Linear):
    """`minigemma.quant.Int4Linear` (one or two planes) whose forward is the Triton kernel: same buffers
    (as TritonInt8Linear)."""

    @staticmethod
    def unsupported(module: Int4Linear) -> str | None:
        """Why the kernel cannot run this module (None: it can); the same question `kernels.swap` asks its classes."""
        if module.group_size % 16:
            return f"group size {module.group_size} is not a multiple of 16"
        if module.out_features % 2:
            return f"{module.out_features} rows: the packed layout pairs rows"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self)


GEMV_CLASSES: dict[type, type] = {Int8Linear: TritonInt8Linear, Int4Linear: TritonInt4Linear}  # torch -> Triton


def use_gemv(model: nn.Module, enable: bool = True) -> Counter:
    """Every Int8Linear and Int4Linear of `model` (itself included) onto the GEMV kernels (enable=False: back to
    torch's), in place, by retyping (`minigemma.swap`): same objects, same buffers. An Int4Linear the kernel cannot
    run (`TritonInt4Linear.unsupported`) stays torch's. Returns how many modules of each class were swapped."""
    if not enable:
        return retype_modules(model, {triton_cls: retype(torch_cls) for torch_cls, triton_cls in GEMV_CLASSES.items()})

    def swap_in(triton_cls: type):
        return lambda module: None if triton_cls.unsupported(module) else retype(triton_cls)(module)

    return retype_modules(model, {torch_cls: swap_in(triton_cls) for torch_cls, triton_cls in GEMV_CLASSES.items()})


def reference(x: torch.Tensor, module: Int8Linear | Int4Linear) -> torch.Tensor:
    """What the kernels must match in float32: x @ module.dequantized().T + bias (float32 throughout)."""
    y = x.float() @ module.dequantized().T
    return y + module.bias.float() if module.bias is not None else y


# the launchers' choice, public for `kernels.aot`
launch_config = _config
