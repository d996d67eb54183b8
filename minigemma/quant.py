"""Faster CPU decoding for Gemma: bf16 weights, or weight-only int8 (chapter 05).

Decoding one token reads every weight once, so its speed is bound by the bytes of weights
read per token (`weight_bytes_per_token`), not by arithmetic. Gemma 3 270M is mostly its
262,144 x 640 embedding, which is also the LM head: 168M of its 268M parameters.

    float32   4 bytes/weight                      the reference
    bfloat16  2 bytes/weight                      `model.to(torch.bfloat16)`
    int8      1 byte/weight + one bf16 scale/row  `quantize_int8(model)`: every Linear and the head

Weight-only int8 keeps activations in bf16: each output row r of W is stored as int8 q and a
scale s_r = max|W_r| / 127, so W ≈ s[:, None] * q, and `torch.ops.aten._weight_int8pack_mm`
computes x @ (s * q)^T without materialising W (the CPU kernel behind torchao's int8
weight-only quantisation). RMSNorm, softmax and RoPE still run in float32 inside the model.
"""

from __future__ import annotations

import torch
from torch import nn


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


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """In place: bf16 model, every bias-free nn.Linear -> Int8Linear, and (for Gemma) the tied
    head -> an Int8Linear of the embedding. The embedding lookup itself stays bf16 (it reads
    only B·T rows per step). Returns the model."""
    model.to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, Int8Linear.from_weight(child.weight))
    if hasattr(model, "lm_head"):
        model.lm_head = Int8Linear.from_weight(model.embed_tokens.weight)
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except the
    embedding table, of which a step gathers a single row (the head, tied or int8, reads all of it)."""
    embed = model.embed_tokens.weight
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size() + (
        0 if getattr(model, "lm_head", None) is not None else embed.numel() * embed.element_size())
