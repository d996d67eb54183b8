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
        # bfloat16 keeps 8 significant bits (2^-8 = 0.4% relative a rounding): x / cap, tanh and the product
        # each round, at most ~1.2% relative together (tanh's slope is at most 1); atol 1e-2, rtol 1.6e-2. The
        # expected values are computed in float32 from the same inputs.
        Case("bfloat16 logits, cap 30 (returned in bfloat16)", (_randn(g, 3, 7, scale=40.0).to(torch.bfloat16), 30.0),
             atol=1e-2, rtol=1.6e-2),
    ]


def soft_cap_reference(x, cap):
    """The package's soft-cap computed in float32 (from the same, possibly bfloat16, values), in x's dtype."""
    return soft_cap(x.float(), cap).to(x.dtype)


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
    # bfloat16 keeps 8 significant bits (2^-8 = 0.4% relative a rounding): the two projections, the GELU and
    # the product round (~1.2% relative), and the down projection sums F of those terms, some cancelling:
    # ~0.017 of absolute error at most over 300 seeds; atol 3e-2, rtol 2e-2. The expected values are computed
    # in float32 from the same bfloat16 inputs.
    x, w_gate, w_up = _randn(g, 2, 3, 8), _randn(g, 12, 8, scale=8 ** -0.5), _randn(g, 12, 8, scale=8 ** -0.5)
    w_down = _randn(g, 8, 12, scale=12 ** -0.5)
    cases.append(Case("bfloat16 x and weights (returned in bfloat16)",
                      tuple(t.to(torch.bfloat16) for t in (x, w_gate, w_up, w_down)), atol=3e-2, rtol=2e-2))
    return cases


def geglu_reference(x, w_gate, w_up, w_down):
    """The package's GeGLU module holding these weights, run in float32 (from the same, possibly bfloat16,
    values); the output in x's dtype."""
    mlp = GeGLU(w_gate.shape[1], w_gate.shape[0])
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(torch.cat([w_gate, w_up]))  # the model stores the two stacked
        mlp.down_proj.weight.copy_(w_down)
        return mlp(x.float()).to(x.dtype)


register(Exercise(
    "03.soft_cap", _softcap_cases, soft_cap_reference, exact_types=True,
    description="cap · tanh(x / cap), in x's dtype; cap=None leaves x unchanged.",
    hint="tanh squashes everything into (−1, 1). What must you do to x before it and to the result after it "
         "so that the steep middle covers (−cap, cap) and the output saturates at ±cap? And what if there is "
         "no cap?",
    recipe="1. If cap is None, return x unchanged; check this before anything else. 2. Otherwise divide x by "
           "cap, so the steep middle of tanh covers (−cap, cap). 3. Take tanh of that. 4. Multiply by cap to "
           "bring the range back: cap · tanh(x / cap). Small logits come out nearly unchanged, and huge ones "
           "(±1e4) saturate at ±cap, not at ±1. The result keeps x's dtype (bfloat16 in, bfloat16 out)."))
# float16 outputs differ by one rounding step (~1e-3 relative) between equally correct orders of operations
register(Exercise(
    "03.rms_norm", _rmsnorm_cases, rms_norm_reference, atol=1e-4, rtol=2e-3, exact_types=True,
    description="x / sqrt(mean(x²) + eps) · (1 + w), in float32, returned in x's dtype.",
    hint="300² already overflows float16. In which dtype do you square and average, where does eps go, "
         "and in which dtype does the result come back?",
    recipe="1. Convert x to float32 (a float16 input of size ~300 overflows if squared in float16). 2. Square "
           "it and take the mean over the last dimension, keeping that dimension with size 1 so it "
           "broadcasts. 3. Multiply x by rsqrt(mean + eps): eps goes inside the square root, and it is the eps "
           "argument you are given, not a constant of your own (tiny activations and a zero row show the "
           "difference). 4. Multiply by (1 + w), with the weight in float32 too (Gemma's weight is stored as "
           "an offset from 1, so a fresh w of zeros means scale 1). 5. Convert back to x's dtype at the very "
           "end: float16 in, float16 out; bfloat16 in, bfloat16 out."))
register(Exercise(
    "03.geglu", _geglu_cases, geglu_reference, exact_types=True,
    description="down(gelu_tanh(gate(x)) · up(x)) with nn.Linear-shaped weights (out, in), in x's dtype.",
    hint="A linear layer's weight is stored (out, in): how do you apply it to x of shape (B, T, C)? And of "
         "the two projections, gate and up, which one goes through the GELU, and which GELU?",
    recipe="1. Project x with each weight by multiplying by the weight's transpose, since a weight is stored "
           "(out, in): gate and up are both (B, T, F). 2. Pass only gate through the tanh form of GELU, "
           "0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))), not the exact erf form (the large-activation case "
           "sees the difference in the tails). 3. Multiply the activated gate by up, element by element. "
           "4. Project the product back down with w_down, again times its transpose: (B, T, C), in x's dtype "
           "(bfloat16 x and weights in, bfloat16 out)."))


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
    # a bfloat16 model: x and the embedding in bfloat16, the norm's weight float32 (as the package keeps it).
    # bfloat16 keeps 8 significant bits: the normed x rounds (2^-9 relative a value), and each logit (up to
    # ~18 here) sums C = 16 such products before it rounds again: ~0.04 of absolute error at most over 300
    # seeds; atol 8e-2, rtol 2e-2. The expected values are computed in float32 from the same inputs.
    x, embedding = _randn(g, 2, 4, 16, scale=3.0), _randn(g, 40, 16)
    cases.append(Case("bfloat16 x and embedding, cap 30 (logits in bfloat16)",
                      (x.to(torch.bfloat16), embedding.to(torch.bfloat16), _randn(g, 16, scale=0.5), 1e-6, 30.0),
                      atol=8e-2, rtol=2e-2))
    return cases


def lm_head_reference(x, embedding, norm_weight, eps, cap):
    """`Gemma.forward` after the last layer: the final RMSNorm, the head whose weight is the embedding
    (V, C), then the final soft-cap (tests/test_learner_hook.py checks this against a Gemma with no layers).
    Computed in float32 (from the same, possibly bfloat16, values), the logits in x's dtype."""
    return soft_cap(F.linear(rms_norm_reference(x.float(), norm_weight, eps), embedding.float()), cap).to(x.dtype)


register(Exercise(
    "03.decoder_layer", _block_cases, decoder_layer_reference,
    description="The sandwich-normed block from its sub-layers: h = x + post_attention_norm(attention(input_norm(x))); "
                "out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h))).",
    hint="Two residual steps of the same shape, each a norm, a sub-layer and a norm. What is normed, and what "
         "goes into the sum untouched? And which stream does the MLP read?",
    recipe="1. Attention step: apply input_norm to x, then attention, then post_attention_norm to its output; "
           "add that to x itself, not to a normed x: this is h. 2. MLP step: apply pre_feedforward_norm to h "
           "(the stream after the attention step, not x), then mlp, then post_feedforward_norm to its output; "
           "add that to h. 3. Return the sum. The residual stream itself is never normed: only each "
           "sub-layer's input (pre-norm) and output (post-norm) are, and each of the four norms is used "
           "exactly once, in its own place."))
register(Exercise(
    "03.lm_head", _head_cases, lm_head_reference, exact_types=True,
    description="logits = soft_cap(final_norm(x) @ embeddingᵀ, cap): the final RMSNorm (1 + w), the tied head "
                "(the embedding matrix (V, C) is the head's weight), then the final soft-cap (None: no cap); in "
                "x's dtype.",
    hint="The head has no weight of its own: it is tied to the embedding matrix. In which order do the final "
         "norm, the head and the cap come, and does the √C scale of the embedding belong here?",
    recipe="1. Apply your RMSNorm to x with (1 + norm_weight) and the eps you are given (tiny activations "
           "with eps = 1e-3 show a wrong eps). 2. The head: multiply the normed x (B, T, C) by the transpose "
           "of the embedding matrix (V, C), giving logits (B, T, V). Do not multiply by √C: that scale belongs "
           "to the embedding's input side only. 3. If cap is None, return the logits as they are; otherwise "
           "return cap · tanh(logits / cap). The logits keep x's dtype (a bfloat16 x and embedding give "
           "bfloat16 logits; the norm's weight may stay float32)."))
