"""Building blocks shared by every model in the course.

Chapter 01 builds RoPE; chapter 03 adds RMSNorm (1 + w), GeGLU and the embedding scale.

Shapes use B (batch), T (time), H (query heads), K (key/value heads), D (head_dim), C (hidden width).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# RoPE (chapter 01)
# --------------------------------------------------------------------------------------------
def rope_frequencies(rotary_dim: int, base: float = 10_000.0, scaling: float = 1.0) -> torch.Tensor:
    """Inverse frequencies θ_i = base^(-2i/d) / scaling, for i in [0, d/2).  Shape (rotary_dim // 2,).

    `scaling` is linear position interpolation (Gemma 3 4B+ global layers use 8): dividing the
    frequencies by s is the same as feeding positions p / s.
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    i = torch.arange(0, rotary_dim, 2, dtype=torch.float32)
    return 1.0 / (base ** (i / rotary_dim)) / scaling


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles p·θ for the split-half convention.  positions (..., T) -> (..., T, d).

    The d/2 angles are repeated twice, [θ_0..θ_{d/2-1}, θ_0..θ_{d/2-1}], so dimension i is paired
    with dimension i + d/2 (Gemma's own code, GPT-NeoX and HF's `rotate_half`), not with i + 1
    (the "interleaved" layout of RoFormer, GPT-J and Meta's original Llama code).
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, d)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension, split in two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) by its angle.  x (B, H, T, d); cos, sin (T, d) or (B, 1, T, d).

    Only the first `cos.shape[-1]` dimensions are rotated; the rest pass through. Griffin rotates
    half of head_dim this way.
    """
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    out = x_rot * cos.to(x.dtype) + rotate_half(x_rot) * sin.to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


# --------------------------------------------------------------------------------------------
# Norm, MLP and embedding scale (chapter 03)
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm with Gemma's (1 + w) weight, computed in float32.

    y = x / sqrt(mean(x²) + ε) · (1 + w).  w starts at 0, so a fresh norm is the identity scale.
    x (..., C) -> (..., C), in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as all Gemma models use."""
    return F.gelu(x, approximate="tanh")


class GeGLU(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) · up(x)).  (B, T, C) -> (B, T, C); no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error for ids that are not a (B, T) integer tensor inside the vocabulary."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be a (B, T) integer tensor, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")


def embedding_scale(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(hidden) rounded to the activation dtype first, as the reference does (bf16: 640 -> 25.25)."""
    return torch.tensor(math.sqrt(hidden), dtype=dtype)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(x / cap): a smooth clamp to (-cap, cap).  None or 0 means no cap."""
    if not cap:
        return x
    return cap * torch.tanh(x / cap)
