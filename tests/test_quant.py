"""The fast CPU decode path (minigemma.quant): int4/int8 layers against their float references,
fused projections, the re-scored head, and FastDecoder's lean step against the model's own forward.

Tolerances: bf16 keeps 8 significant bits, so a bf16 product or sum is within ~2^-8 relative of
exact; the int kernels take bf16 activations and return bf16, so their outputs are checked at a few
bf16 steps of the output scale. float32 paths that only reorder the same operations are checked at 1e-4.
"""

import pytest
import torch
from torch import nn

from minigemma.gemma import Gemma, GemmaConfig
from minigemma.generation import generate_ids
from minigemma.quant import (FastDecoder, Int4Linear, Int8Linear, RescoredHead, concat_rows, int4_groups,
                             quantize, weight_bytes_per_token)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# int4 weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_groups_round_to_the_nearest_level(group_size):
    w = torch.randn(48, 128, generator=gen())
    q, scale, lo = int4_groups(w, group_size)
    assert q.min() >= 0 and q.max() <= 15 and scale.shape == (48, 128 // group_size)
    w_hat = (lo[..., None] + scale[..., None] * q.float().view(48, -1, group_size)).view(48, 128)
    step = scale.repeat_interleave(group_size, dim=1)
    assert ((w_hat - w).abs() <= step / 2 + 1e-6).all()  # half a level at most
    # the extremes of each group are represented exactly (up to float rounding): min -> 0, max -> 15
    assert (q.view(48, -1, group_size).amin(-1) == 0).all() and (q.view(48, -1, group_size).amax(-1) == 15).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_matches_the_weight_it_encodes(group_size):
    w = torch.randn(96, 128, generator=gen(1))
    lin = Int4Linear.from_weight(w, group_size)
    q, scale, lo = int4_groups(w, group_size)
    # the kernel's documented formula (q - 8) * scale + zero, with scale and zero rounded to bf16 as stored
    s16 = scale.bfloat16().float().repeat_interleave(group_size, 1)
    z16 = (lo + 8 * scale).bfloat16().float().repeat_interleave(group_size, 1)
    w_kernel = (q.float() - 8) * s16 + z16
    assert torch.allclose(lin.dequantized(), w_kernel, atol=2e-2 * w.abs().max())  # bf16 output of the kernel
    assert (lin.dequantized() - w).abs().max() < 0.5 * scale.max() + 0.02 * w.abs().max()
    for M in (1, 5):  # decode and a short prompt
        x = torch.randn(2, M, 128, generator=gen(2))
        want = x.bfloat16().float() @ w_kernel.T
        got = lin(x)
        assert got.shape == (2, M, 96) and got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() < 0.02 * want.abs().max()


def test_int4_linear_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        Int4Linear.from_weight(torch.randn(32, 48), 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_weight(torch.randn(40, 64), 32)


def test_quantize_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="layers='int3'"):
        quantize(nn.Sequential(nn.Linear(4, 4)), layers="int3")


# ----------------------------------------------------------------------------------------------
# Fused projections and the re-scored head
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_concat_rows_is_the_same_maths_and_shares_memory(kind):
    torch.manual_seed(0)
    linears = [nn.Linear(64, n, bias=False).to(torch.bfloat16) for n in (48, 16, 16)]
    if kind == "int8":
        linears = [Int8Linear.from_weight(m.weight) for m in linears]
    x = torch.randn(1, 1, 64, generator=gen(3)).bfloat16()
    want = torch.cat([m(x) for m in linears], dim=-1)
    fused = concat_rows(linears)
    assert torch.equal(fused(x), want)  # each output row is computed from the same row and scale
    assert torch.equal(torch.cat([m(x) for m in linears], dim=-1), want)  # the originals still work...
    first = linears[0].weight if kind == "bf16" else linears[0].q
    whole = fused.weight if kind == "bf16" else fused.q
    assert first.data_ptr() == whole.data_ptr()  # ...as views of the fused weight
    assert concat_rows([Int4Linear.from_weight(torch.randn(16, 64), 32)] * 2) is None  # not fusable: fallback


def test_rescored_head_recomputes_the_top_k_exactly():
    table = torch.randn(320, 64, generator=gen(4)).bfloat16()
    head = RescoredHead(Int4Linear.from_weight(table, 32), table, k=8)
    x = torch.randn(3, 64, generator=gen(5)).bfloat16()
    exact = x.float() @ table.float().T  # (3, V)
    got = head(x)
    approx = head.approx(x).float()
    top = approx.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-4)  # float32 sums, same terms
    rest = torch.ones_like(got, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(got[rest], approx[rest])  # the tail keeps its 4-bit values
    in_top = (top == exact.argmax(-1, keepdim=True)).any(-1)
    assert in_top.all()  # (this seed's winners are within the top 8 of the 4-bit logits)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


# ----------------------------------------------------------------------------------------------
# FastDecoder: its one-token step against the model's own forward
# ----------------------------------------------------------------------------------------------
def tiny(family="gemma3"):
    torch.manual_seed(0)
    g3 = family == "gemma3"
    cfg = GemmaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      sliding_window=4, query_pre_attn_scalar=32, family=family, use_qk_norm=g3,
                      rope_theta=1_000_000.0 if g3 else 10_000.0, attn_logit_softcapping=None if g3 else 50.0,
                      final_logit_softcapping=None if g3 else 30.0, max_position_embeddings=64)
    model = Gemma(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_fast_step_matches_the_model_float32(family, batch):
    model = tiny(family)
    fast = FastDecoder(model)  # fuses the model's projections in place (views): the model must still agree
    prompt = torch.randint(0, 320, (batch, 3), generator=gen(6))
    ref_cache, cache = model.new_cache(batch, 20), fast.new_cache(batch, 20)
    want, got = model(prompt, cache=ref_cache, last_only=True), fast(prompt, cache=cache, last_only=True)
    assert torch.equal(want, got)  # the prompt goes through the model itself
    for _ in range(9):  # the local rings of 4 wrap twice
        nxt = want[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        want, got = model(nxt, cache=ref_cache, last_only=True), fast(nxt, cache=cache, last_only=True)
        assert got.shape == want.shape == (batch, 1, 320)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)  # same maths, other op order
        assert cache[0].length == ref_cache[0].length
    for c, r in zip(cache, ref_cache):
        assert torch.allclose(c.k, r.k, atol=1e-5) and torch.allclose(c.v, r.v, atol=1e-5)


@torch.no_grad()
def test_fast_decoder_generates_like_the_model_quantised():
    model = quantize(tiny(), layers="int8", head="int4", rescore=16)
    prompts = [[2, 17, 45, 99, 3, 250, 7], [2, 5, 9, 11, 13, 8, 1]]
    want = generate_ids(model, prompts, 12, eos_id=None)
    fast = FastDecoder(model)
    assert generate_ids(fast, prompts, 12, eos_id=None) == want
    assert generate_ids(fast, [[2, 5], [2, 17, 45, 99]], 6, eos_id=None) == \
        generate_ids(model, [[2, 5], [2, 17, 45, 99]], 6, eos_id=None)  # padded: the model's own path
    # bf16 step logits against the model's (bf16 rounding of activations in a different order)
    cache, ref = fast.new_cache(1, 16), model.new_cache(1, 16)
    x = torch.tensor([prompts[0]])
    fast(x, cache=cache, last_only=True), model(x, cache=ref, last_only=True)
    for t in (5, 77, 140, 9, 300):
        got, want = fast(torch.tensor([[t]]), cache=cache), model(torch.tensor([[t]]), cache=ref).float()
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_weight_bytes_count_shared_memory_once():
    model = quantize(tiny(), layers="int8", head="int8")
    before = weight_bytes_per_token(model)
    fast = FastDecoder(model)
    assert weight_bytes_per_token(fast) == weight_bytes_per_token(model) == before
    emb = model.embed_tokens.weight
    n_linear = sum(m.q.numel() + 2 * m.q.shape[0] for m in model.modules() if isinstance(m, Int8Linear))
    norms = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    assert before == n_linear + norms + emb.shape[1] * 2  # int8 + bf16 scales, bf16 norms, one embedding row


def test_fast_decoder_needs_a_static_cache():
    with pytest.raises(ValueError, match="max_len"):
        FastDecoder(tiny()).new_cache(1)


@torch.no_grad()
def test_compiled_step_matches_the_eager_one():
    model = tiny()
    eager, compiled = FastDecoder(model), FastDecoder(model, compile=True)
    prompt = torch.tensor([[2, 17, 45]])
    c1, c2 = eager.new_cache(1, 300), compiled.new_cache(1, 20)  # compiled: rounded up to 256 slots
    assert c2[1].k.shape[2] == 256
    eager(prompt, cache=c1, last_only=True), compiled(prompt, cache=c2, last_only=True)
    for t in [5, 77, 140, 9, 300, 12]:  # the rings of 4 wrap; one compilation serves every position
        a, b = eager(torch.tensor([[t]]), cache=c1), compiled(torch.tensor([[t]]), cache=c2)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)  # float32: fusion only reorders float ops
