"""Chapter 03: the Gemma 2 block's pieces."""

import torch

from ...layers import GeGLU, RMSNorm, soft_cap
from ..core import Case, Exercise, register


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _softcap_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        Case("attention logits, cap 50", (_randn(g, 2, 3, 4, 5, scale=60.0), 50.0)),
        Case("final logits, cap 30", (_randn(g, 2, 7, 11, scale=40.0), 30.0)),
        Case("small logits (nearly unchanged)", (_randn(g, 9, scale=0.5), 30.0)),
        Case("huge logits saturate at ±cap", (torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4]), 20.0)),
        Case("cap=None means no cap", (_randn(g, 3, 4, scale=80.0), None)),
    ]


def _rmsnorm_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        Case("batch 2, T 3, C 8", (_randn(g, 2, 3, 8), _randn(g, 8, scale=0.5), 1e-6)),
        Case("fresh weight w = 0 (scale 1)", (_randn(g, 4, 6), torch.zeros(6), 1e-6)),
        Case("tiny activations: eps matters", (_randn(g, 3, 5, scale=1e-4), _randn(g, 5, scale=0.5), 1e-6)),
        Case("odd width, T=1", (_randn(g, 1, 1, 7), _randn(g, 7, scale=0.5), 1e-5)),
        # 300² overflows float16 (max 65504): the mean of squares must be taken in float32
        Case("float16 input of size ~300 (compute in float32, return float16)",
             (_randn(g, 2, 16, scale=300.0).half(), _randn(g, 16, scale=0.5).half(), 1e-6)),
    ]


def rms_norm_reference(x, weight, eps):
    norm = RMSNorm(weight.shape[0], eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _geglu_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, T, C, F), scale in [("batch 2, T 3, C 8, F 12", (2, 3, 8, 12), 1.0),
                                       ("T=1, odd sizes", (1, 1, 5, 7), 1.0),
                                       ("large activations (GELU tails)", (3, 4, 6, 10), 3.0)]:
        x = _randn(g, B, T, C, scale=scale)
        w_gate, w_up = _randn(g, F, C, scale=C ** -0.5), _randn(g, F, C, scale=C ** -0.5)
        w_down = _randn(g, C, F, scale=F ** -0.5)
        cases.append(Case(label, (x, w_gate, w_up, w_down)))
    return cases


def geglu_reference(x, w_gate, w_up, w_down):
    mlp = GeGLU(w_gate.shape[1], w_gate.shape[0])
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(w_gate)
        mlp.up_proj.weight.copy_(w_up)
        mlp.down_proj.weight.copy_(w_down)
        return mlp(x)


register(Exercise("03.soft_cap", _softcap_cases, soft_cap,
                  description="cap · tanh(x / cap); cap=None leaves x unchanged."))
# float16 outputs differ by one rounding step (~1e-3 relative) between equally correct orders of operations
register(Exercise("03.rms_norm", _rmsnorm_cases, rms_norm_reference, atol=1e-4, rtol=2e-3,
                  description="x / sqrt(mean(x²) + eps) · (1 + w), in float32, returned in x's dtype."))
register(Exercise("03.geglu", _geglu_cases, geglu_reference,
                  description="down(gelu_tanh(gate(x)) · up(x)) with nn.Linear-shaped weights (out, in)."))
