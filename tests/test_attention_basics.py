"""Chapter 01's building blocks against independent references.

- scaled_dot_product_attention vs torch's fused F.scaled_dot_product_attention (float32; atol 1e-5
  covers summation-order differences between the two kernels);
- RoPE vs HF transformers' Gemma 3 rotary embedding and apply_rotary_pos_emb (same float32 math,
  so atol 1e-5 at positions up to 40k, where float32 angles still agree between implementations);
- MultiHeadAttention's causality: changing a future token never changes an earlier output.
"""

import torch
import torch.nn.functional as F

from minigemma.attention import (MultiHeadAttention, causal_mask, merge_heads, scaled_dot_product_attention,
                                 sliding_window_mask, split_heads)
from minigemma.layers import apply_rope, rope_cos_sin, rope_frequencies


def test_sdpa_matches_torch_fused():
    g = torch.Generator().manual_seed(0)
    for B, H, T, S, D in [(2, 3, 5, 7, 8), (1, 1, 1, 1, 4), (3, 2, 16, 16, 64)]:
        q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, S, S))
        mask = torch.rand(T, S, generator=g) < 0.6
        mask[:, -1] = True
        ours = scaled_dot_product_attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        ref_causal = F.scaled_dot_product_attention(q[..., :S, :], k, v, is_causal=True) if T == S else None
        if ref_causal is not None:
            torch.testing.assert_close(scaled_dot_product_attention(q, k, v, causal_mask(T)), ref_causal,
                                       atol=1e-5, rtol=1e-5)


def test_masks_edges():
    assert torch.equal(causal_mask(4), torch.ones(4, 4).tril().bool())
    m = sliding_window_mask(6, window=3)
    # query 5 sees keys 3, 4, 5: exactly `window` keys including itself
    assert m[5].nonzero().flatten().tolist() == [3, 4, 5]
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    # with a cache: the 2 queries are the last 2 of 5 positions
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True] * 5]


def test_split_merge_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 12, dtype=torch.float32).view(2, 3, 12)
    h = split_heads(x, 4)
    assert h.shape == (2, 4, 3, 3)
    assert torch.equal(h[1, 2, 0], x[1, 0, 6:9])
    assert torch.equal(merge_heads(h), x)


def test_rope_matches_hf_gemma3():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, apply_rotary_pos_emb

    D = 32
    cfg = Gemma3TextConfig(head_dim=D, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                           rope_theta=10_000.0)
    rot = Gemma3RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(1)
    pos = torch.tensor([[0, 1, 2, 7, 513, 40_000]])
    x = torch.randn(1, 2, pos.shape[1], D, generator=g)
    layer_type = getattr(cfg, "layer_types", ["full_attention"])[-1]
    try:
        cos_ref, sin_ref = rot(x, pos, layer_type=layer_type)
    except TypeError:
        cos_ref, sin_ref = rot(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos_ref, sin_ref)
    base = rot.config.rope_parameters[layer_type]["rope_theta"] if hasattr(rot.config, "rope_parameters") else 10_000.0
    cos, sin = rope_cos_sin(pos[0], rope_frequencies(D, base))
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, atol=1e-5, rtol=1e-5)


def test_partial_rope_leaves_the_rest_untouched():
    x = torch.randn(1, 1, 4, 8)
    cos, sin = rope_cos_sin(torch.arange(4), rope_frequencies(4))
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_multihead_attention_is_causal():
    torch.manual_seed(0)
    mha = MultiHeadAttention(hidden=16, n_heads=2, head_dim=8)
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)
    with torch.no_grad():
        a, b = mha(x), mha(y)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
