"""Chapter 03: the Gemma 2 block's pieces, the block, and the tied head."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ...attention import Positions
from ...gemma import DecoderLayer
from ...layers import GeGLU, RMSNorm, soft_cap
from ..exercise import Case, Exercise, register


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


# --------------------------------------------------------------------------------------------
# Assembling the block: where the four norms and the two residuals go
# --------------------------------------------------------------------------------------------
class Sublayer:
    """One of a block's sub-layers, handed to the learner as a callable x -> y; a failing case shows it
    by name. `module`: the package module it calls, if any (the reference calls it as the block does)."""

    def __init__(self, name: str, fn, module=None):
        self.name, self.fn, self.module = name, fn, module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def __repr__(self) -> str:
        return self.name


def _norm(g, name, C):
    """A stand-in norm, RMSNorm's maths written here: the exercise places the norms, 03.rms_norm grades them."""
    w = _randn(g, C, scale=0.5)  # four different weights: a norm in the wrong place shows
    return Sublayer(name, lambda x: F.rms_norm(x, (C,), 1.0 + w, 1e-6))


def _block_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, T, C), scale, post in [
        ("B=1, T=1, C=4", (1, 1, 4), 1.0, True),
        ("B=1, T=3, C=6", (1, 3, 6), 1.0, True),
        ("pre-norms only: both post-norms are the identity", (1, 4, 6), 1.0, False),
        ("batch 2, T=5, C=8", (2, 5, 8), 1.0, True),
        ("large activations (x ~ 50): the norms bound what is added", (2, 4, 8), 50.0, True),
    ]:
        w_att, w_up, w_down = _randn(g, C, C, scale=C ** -0.5), _randn(g, C, 2 * C), _randn(g, 2 * C, C, scale=0.3)

        def attention(x, w=w_att):  # a stand-in that mixes tokens causally: a running mean of tanh(x W)
            h = torch.tanh(x @ w)
            return h.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]

        identity = Sublayer("post_norm = identity", lambda x: x)
        cases.append(Case(label, (
            _randn(g, B, T, C, scale=scale),
            Sublayer("attention (a stand-in: running mean of tanh(x W))", attention),
            Sublayer("mlp (a stand-in: gelu(x W1) W2)", lambda x, w1=w_up, w2=w_down: F.gelu(x @ w1) @ w2),
            _norm(g, "input_norm", C),
            _norm(g, "post_attention_norm", C) if post else identity,
            _norm(g, "pre_feedforward_norm", C),
            _norm(g, "post_feedforward_norm", C) if post else identity,
        )))
    return cases


# the stand-in attention reads no positions (and no cache): forward gets one fixed `Positions`, so that it
# does not derive its own
_UNREAD_POS = Positions(0, torch.arange(1), torch.zeros(1, 1, dtype=torch.long))


def decoder_layer_reference(x, attention, mlp, input_norm, post_attention_norm, pre_feedforward_norm,
                            post_feedforward_norm):
    """`DecoderLayer.forward` itself, run on the sub-layers given (a layer's own are its modules)."""
    layer = SimpleNamespace(self_attn=lambda h, pos, cache: attention(h), mlp=mlp, input_layernorm=input_norm,
                            post_attention_layernorm=post_attention_norm, pre_feedforward_layernorm=pre_feedforward_norm,
                            post_feedforward_layernorm=post_feedforward_norm)
    return DecoderLayer.forward(layer, x, _UNREAD_POS)


# --------------------------------------------------------------------------------------------
# The tied head with its final soft-cap
# --------------------------------------------------------------------------------------------
def _head_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, T, C, V), e_scale, cap, x_scale, eps in [
        ("Gemma 3: no final cap, C=4, V=6", (1, 1, 4, 6), 1.0, None, 3.0, 1e-6),
        ("Gemma 2: final cap 30, C=4, V=6", (1, 2, 4, 6), 1.0, 30.0, 3.0, 1e-6),
        # activations of ~3e-3 (mean square ~1e-5) against eps 1e-3: the eps given must be the one used
        ("tiny activations: eps = 1e-3 matters", (1, 2, 4, 6), 1.0, None, 3e-3, 1e-3),
        ("logits ~ 50: the cap bites", (2, 3, 8, 11), 10.0, 30.0, 3.0, 1e-6),
        ("large logits, no cap: they stay large", (1, 3, 8, 9), 10.0, None, 3.0, 1e-6),
        ("batch 2, T=4, C=16, V=40, cap 30", (2, 4, 16, 40), 3.0, 30.0, 3.0, 1e-6),
    ]:
        x = _randn(g, B, T, C, scale=x_scale)
        cases.append(Case(label, (x, _randn(g, V, C, scale=e_scale), _randn(g, C, scale=0.5), eps, cap)))
    return cases


def lm_head_reference(x, embedding, norm_weight, eps, cap):
    """`Gemma.forward` after the last layer: the final RMSNorm, the head whose weight is the embedding
    (V, C), then the final soft-cap (tests/test_learner_hook.py checks this against a Gemma with no layers)."""
    return soft_cap(F.linear(rms_norm_reference(x, norm_weight, eps), embedding), cap)


register(Exercise(
    "03.decoder_layer", _block_cases, decoder_layer_reference,
    description="The sandwich-normed block from its sub-layers: h = x + post_attention_norm(attention(input_norm(x))); "
                "out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h))).",
    hint="Two residual steps, each the same shape: x plus a normed-sub-layer-normed update. The residual stream "
         "itself is never normed: x goes into the sum as it is, and only the sub-layer's input (pre-norm) and "
         "its output (post-norm) are. The MLP reads h, the stream after the attention step, not x."))
register(Exercise(
    "03.lm_head", _head_cases, lm_head_reference,
    description="logits = soft_cap(final_norm(x) @ embeddingᵀ, cap): the final RMSNorm (1 + w), the tied head "
                "(the embedding matrix (V, C) is the head's weight), then the final soft-cap (None: no cap).",
    hint="Three steps, in this order: your RMSNorm with (1 + norm_weight) and eps; the head, which is the "
         "embedding matrix itself: x @ embedding.T gives (B, T, V); then cap · tanh(logits / cap) unless cap "
         "is None. The √C scale belongs to the embedding's input side only, not to the head."))
