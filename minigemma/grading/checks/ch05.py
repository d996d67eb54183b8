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
    return cases


def _q4_k_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(f"shape {shape}", (_q4_k_blocks(g, n), shape))
             for n, shape in [(1, (256,)), (2, (2, 256)), (3, (3, 256)), (5, (1, 1280))]]
    top = _q4_k_blocks(g, 1)
    top[4:16] = 255  # every 6-bit scale and min at its maximum (63): the packed top bits matter
    cases.append(Case("all scales and mins 63", (top, (256,))))
    return cases


register(Exercise("05.dequantize_q8_0", _q8_0_cases, dequantize_q8_0,
                  description="Q8_0 bytes (n_blocks*34,) uint8 -> float32 weights of `shape`: w = d * q."))
register(Exercise("05.dequantize_q4_k", _q4_k_cases, dequantize_q4_k,
                  description="Q4_K bytes (n_blocks*144,) uint8 -> float32 weights of `shape`: "
                              "w = d * scale_j * q - dmin * min_j."))
