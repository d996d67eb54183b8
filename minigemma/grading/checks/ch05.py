"""Chapter 05: GGUF block quantisation, dequantised from scratch."""

import torch

from ...weights.gguf import dequantize_q4_k, dequantize_q8_0
from ..core import Case, Exercise, register


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(N,) floats -> (N, 2) little-endian fp16 bytes."""
    return values.half().reshape(-1, 1).view(torch.uint8)


def _q8_0_blocks(g, n_blocks, scale=0.02):
    d = torch.randn(n_blocks, generator=g) * scale
    q = torch.randint(-128, 128, (n_blocks, 32), generator=g, dtype=torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=1).reshape(-1)  # (n_blocks * 34,)


def _q4_k_blocks(g, n_blocks):
    d = torch.rand(n_blocks, generator=g) * 0.01
    dmin = torch.rand(n_blocks, generator=g) * 0.01
    rest = torch.randint(0, 256, (n_blocks, 140), generator=g, dtype=torch.uint8)  # 12 scale bytes + 128 nibbles
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), rest], dim=1).reshape(-1)  # (n_blocks * 144,)


def _q8_0_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(f"shape {shape}", (_q8_0_blocks(g, n), shape))
             for n, shape in [(1, (32,)), (4, (2, 64)), (15, (3, 160)), (20, (1, 640))]]
    neg = _q8_0_blocks(g, 2)
    neg[:2] = _fp16_bytes(torch.tensor([-0.5]))  # a negative scale
    neg[2:34] = torch.tensor([-128] * 16 + [127] * 16, dtype=torch.int8).view(torch.uint8)  # extremes
    cases.append(Case("negative scale, q = -128 and 127", (neg, (64,))))
    zero = _q8_0_blocks(g, 1)
    zero[:2] = 0
    cases.append(Case("zero scale", (zero, (32,))))
    big = _q8_0_blocks(g, 1)
    big[:2] = _fp16_bytes(torch.tensor([30_000.0]))  # d·q reaches 3.8e6: past float16's 65504
    cases.append(Case("large scale (d·q overflows float16)", (big, (32,))))
    return cases


def _q4_k_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(f"shape {shape}", (_q4_k_blocks(g, n), shape))
             for n, shape in [(1, (256,)), (2, (2, 256)), (3, (3, 256)), (5, (1, 1280))]]
    top = _q4_k_blocks(g, 1)
    top[4:16] = 255  # every 6-bit scale and min at its maximum (63): the packed top bits matter
    cases.append(Case("all scales and mins 63", (top, (256,))))
    neg = _q4_k_blocks(g, 2)
    neg[0:2] = _fp16_bytes(torch.tensor([-0.004]))
    neg[146:148] = _fp16_bytes(torch.tensor([-0.003]))  # dmin of the second block
    cases.append(Case("negative d and dmin", (neg, (2, 256))))
    return cases


register(Exercise(
    "05.dequantize_q8_0", _q8_0_cases, dequantize_q8_0, exact_types=True,
    description="Q8_0 bytes (n_blocks*34,) uint8 -> float32 weights of `shape`: w = d * q.",
    hint="raw.reshape(-1, 34) gives one row per block. Bytes 0-1 are d: .contiguous().view(torch.float16) "
         "reinterprets them (no conversion of values), giving (n_blocks, 1). Bytes 2-33 viewed as torch.int8 "
         "are q (signed). Convert both to float32 before multiplying (float16 overflows past 65504), then "
         "reshape to `shape`."))
register(Exercise(
    "05.dequantize_q4_k", _q4_k_cases, dequantize_q4_k, exact_types=True,
    description="Q4_K bytes (n_blocks*144,) uint8 -> float32 weights of `shape`: "
                "w = d * scale_j * q - dmin * min_j.",
    hint="Work on blocks = raw.reshape(-1, 144). d and dmin are bytes 0-1 and 2-3 viewed as float16. Convert "
         "the 12 scale bytes to int32 before shifting, and unpack sc and m with the table's formulas (for "
         "j >= 4, the top two bits of sc[j] are those of byte j-4, and of m[j] those of byte j). For q, reshape bytes 16..143 to (n, 4, 32): "
         "group g's low nibbles (& 0xF) are sub-block 2g, its high nibbles (>> 4) sub-block 2g+1. Subtract "
         "dmin * m[j], and return float32."))
