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
    tiny = _randn(g, 3, 6, scale=1e-3)
    tiny[1] = 0.0  # an all-zero row: only eps keeps 0 / sqrt(0) from being nan
    return [
        Case("batch 2, T 3, C 8", (_randn(g, 2, 3, 8), _randn(g, 8, scale=0.5), 1e-6)),
        Case("fresh weight w = 0 (scale 1)", (_randn(g, 4, 6), torch.zeros(6), 1e-6)),
        Case("tiny activations: eps matters", (_randn(g, 3, 5, scale=1e-4), _randn(g, 5, scale=0.5), 1e-6)),
        # mean(x²) ~ 1e-6 next to eps = 1e-5: the eps you are given, not a default
        Case("tiny activations and a zero row, eps = 1e-5", (tiny, _randn(g, 6, scale=0.5), 1e-5)),
        Case("odd width, T=1", (_randn(g, 1, 1, 7), _randn(g, 7, scale=0.5), 1e-5)),
        # 300² overflows float16 (max 65504): the mean of squares must be taken in float32
        Case("float16 input of size ~300 (compute in float32, return float16)",
             (_randn(g, 2, 16, scale=300.0).half(), _randn(g, 16, scale=0.5).half(), 1e-6)),
        # one bfloat16 rounding step is 2^-8 relative; the tolerance allows two (equally right orders
        # of the last multiply and the cast)
        Case("bfloat16 input, float32 weight (return bfloat16)",
             (_randn(g, 2, 3, 10).to(torch.bfloat16), _randn(g, 10, scale=0.5), 1e-6), atol=1e-2, rtol=1e-2),
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
        mlp.gate_up_proj.weight.copy_(torch.cat([w_gate, w_up]))  # the model stores the two stacked
        mlp.down_proj.weight.copy_(w_down)
        return mlp(x)


register(Exercise(
    "03.soft_cap", _softcap_cases, soft_cap,
    description="cap · tanh(x / cap); cap=None leaves x unchanged.",
    hint="Divide by cap first, so tanh's steep middle covers (-cap, cap), then multiply by cap to bring the "
         "range back: cap * torch.tanh(x / cap). Test `if cap is None` before anything else."))
# float16 outputs differ by one rounding step (~1e-3 relative) between equally correct orders of operations
register(Exercise(
    "03.rms_norm", _rmsnorm_cases, rms_norm_reference, atol=1e-4, rtol=2e-3, exact_types=True,
    description="x / sqrt(mean(x²) + eps) · (1 + w), in float32, returned in x's dtype.",
    hint="x32 = x.float(); mean of x32.pow(2) over the last dimension with keepdim=True; multiply by "
         "torch.rsqrt(mean + eps): eps goes inside the square root, and use the eps argument. Then "
         "* (1 + weight.float()) and .to(x.dtype) at the very end: the check wants float16 back for float16 "
         "input."))
register(Exercise(
    "03.geglu", _geglu_cases, geglu_reference,
    description="down(gelu_tanh(gate(x)) · up(x)) with nn.Linear-shaped weights (out, in).",
    hint="An nn.Linear weight is (out, in), so a projection is x @ w.T. gate = x @ w_gate.T and "
         "up = x @ w_up.T are (B, T, F); only the gate goes through GELU, the tanh form "
         "0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) (or F.gelu(g, approximate='tanh')); then "
         "(gelu(gate) * up) @ w_down.T."))
