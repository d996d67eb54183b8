"""Building blocks shared by every model in the course.

Chapter 01 builds RoPE; chapter 03 adds RMSNorm (1 + w), GeGLU and the embedding scale.

Shapes use B (batch), T (time), H (query heads), K (key/value heads), D (head_dim), C (hidden width).
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def _frequencies_on(rotary_dim: int, base: float, scaling: float, device: torch.device) -> torch.Tensor:
    """rope_frequencies on `device`, built on the host and copied once per setting and device."""
    return rope_frequencies(rotary_dim, base, scaling).to(device)


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
    """Rotate each pair (x_i, x_{i+d/2}) by its angle.  x (B, H, T, D); cos, sin (T, d) or (B, 1, T, d).

    Only the first d = `cos.shape[-1]` dimensions are rotated; the rest pass through. Griffin rotates
    half of head_dim this way. The product runs in float32 and is cast back to x's dtype once.
    """
    d = cos.shape[-1]
    if d < x.shape[-1]:  # partial rotary: rotate the first d dimensions, pass the rest through
        return torch.cat([apply_rope(x[..., :d], cos, sin), x[..., d:]], dim=-1)
    # x·cos + rotate_half(x)·sin, written half by half: the same numbers without rotate_half's
    # copy (3x faster on a CPU, where each element-wise pass is a trip through memory)
    x1, x2 = x.float().chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE's angles for one (rotary_dim, base, scaling): positions -> (cos, sin), float32.

    A model holds one per layer and computes cos/sin once per forward call for each distinct
    setting (Gemma 3: a 10k base on local layers, a 1M one on global layers); layers of the same
    kind reuse them (`attention.Positions.rope`). The frequencies are derived from the config when
    needed, so there is no buffer to save, load or re-initialise; `frequencies(device)` keeps them on
    each device they were asked for, built once per setting: a decode step on a GPU copies nothing
    from the host.
    """

    def __init__(self, rotary_dim: int, base: float = 10_000.0, scaling: float = 1.0):
        super().__init__()
        self.rotary_dim, self.base, self.scaling = rotary_dim, base, scaling

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """θ (rotary_dim / 2,) float32 on `device`, shared by every layer of this setting (do not write to it)."""
        return _frequencies_on(self.rotary_dim, self.base, self.scaling, torch.device(device or "cpu"))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (T, d) or (B, 1, T, d) (one set for every head)."""
        cos, sin = rope_cos_sin(positions, self.frequencies(positions.device))
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base:g}, scaling={self.scaling:g}"


# --------------------------------------------------------------------------------------------
# Norm, MLP and embedding scale (chapter 03)
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm with Gemma's (1 + w) weight, computed in float32.

    y = x / sqrt(mean(x²) + ε) · (1 + w).  w starts at 0, so a fresh norm is the identity scale.
    x (..., C) -> (..., C), in x's dtype. (Gemma 3's QK-norm is this over head_dim, one w for all heads.)
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x²) + ε) · (1 + w), in float32 (one fused call), back to x's dtype
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps:g}"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as all Gemma models use:

        gelu(x) = ½ x (1 + tanh u),   u = √(2/π) (x + 0.044715 x³)

    Eager PyTorch computes it in one fused kernel. Under `torch.compile` it is written x · σ(2u),
    the same function (1 + tanh u = 2 σ(2u)): the compiler builds σ from exp, and on CPU its tanh
    costs ~3x as much (~0.95 against ~0.37 ms per million values, measured on the chapter 08
    machine), which made GELU the costliest element-wise part of a compiled training step.
    """
    if torch.compiler.is_compiling():
        return _gelu_tanh_as_sigmoid(x)
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) written x · σ(2u), u = √(2/π) (x + 0.044715 x³): what `torch.compile` runs."""
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
    return x * torch.sigmoid(2 * u)


class GeGLU(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) · up(x)).  (B, T, C) -> (B, T, C).

    gate and up read the same x, so their weights are stored stacked as one (2F, C) matrix,
    `gate_up_proj`: [x W_gateᵀ, x W_upᵀ] = x [W_gate; W_up]ᵀ is one matrix product instead of two,
    with the same numbers. Loaders fill it from the checkpoints' separate gate and up weights.
    Gemma has no biases; Griffin's MLP has them (bias=True).
    """

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)  # rows: [gate (F); up (F)]
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    # checkpoint tensors that fill the fused one: part -> rows of gate_up_proj
    def fused_parts(self) -> dict[str, tuple[str, int, int]]:
        F_ = self.intermediate
        return {"gate_proj": ("gate_up_proj", 0, F_), "up_proj": ("gate_up_proj", F_, 2 * F_)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(gelu_tanh(gate) * up)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error for ids that are not a (B, T) integer tensor inside the vocabulary.

    The range check reads the ids' values, so it runs only on CPU tensors (free there) and not while
    torch.compile traces; on an accelerator it would wait for the device at every step, and the
    embedding's own bounds check catches a bad id there anyway.
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be a (B, T) integer tensor, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if input_ids.device.type != "cpu" or torch.compiler.is_compiling() or not input_ids.numel():
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{lo}, {hi}]")


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's activations: what its embedding returns (a quantised embedding says so
    with a `dtype` attribute; bf16 for the int8/int4 models)."""
    e = model.embed_tokens
    return getattr(e, "dtype", None) or e.weight.dtype


def embedding_scale(hidden: int, dtype: torch.dtype, rounded_in: torch.dtype | None = None) -> torch.Tensor:
    """sqrt(hidden), rounded first as the reference does, as a 0-d tensor of `dtype`.

    Gemma rounds in the activation dtype (bf16: sqrt(640) -> 25.25); RecurrentGemma's references
    round in bfloat16 whatever the activation dtype ("to match training"): rounded_in=torch.bfloat16.
    """
    return torch.tensor(math.sqrt(hidden), dtype=rounded_in or dtype).to(dtype)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(x / cap): a smooth clamp to (-cap, cap).  None or 0 means no cap."""
    if not cap:
        return x
    return cap * torch.tanh(x / cap)
