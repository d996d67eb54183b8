"""Quantisation by module swaps (minigemma.quant): each quantised module against the float weight it
encodes, the quantised models against their own float forward, and the quantised real 270M.

Tolerances: bf16 keeps 8 significant bits, so a bf16 product or sum is within ~2^-8 relative of
exact; the int kernels take bf16 activations and return bf16, so their outputs are checked at a few
bf16 steps of the output scale. Where a whole quantised model runs two different ways (a prompt in
one pass, or token by token from a cache: the int8 layer uses a bf16 matrix product for a prompt and
the int8 GEMV kernel for a step), the two differ by bf16 rounding that compounds over layers, so they
are compared at 3% of the logits' scale (a wrong cache or mask moves logits by their whole scale).
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

from minigemma import quant
from minigemma.gemma import Gemma, GemmaConfig
from minigemma.layers import RMSNorm
from minigemma.generation import generate_ids
from minigemma.quant import (Int4Linear, Int8Linear, Q8_0Embedding, RescoredHead, int4_groups, int8_rows,
                             q8_0_blocks, quantize, weight_bytes_per_token)
from minigemma.weights.gguf import dequantize_q8_0

LEVELS = [None, "bf16", "int8", "int4"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The quantised modules
# ----------------------------------------------------------------------------------------------
def test_int8_rows_round_to_half_a_step():
    w = torch.randn(48, 64, generator=gen())
    q, scale = int8_rows(w)
    assert q.dtype == torch.int8 and (q.abs().amax(1) == 127).all()  # each row's largest weight uses the full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int8_linear_decode_and_prompt_paths_agree_with_its_weight():
    w, b = torch.randn(96, 64, generator=gen(1)), torch.randn(96, generator=gen(2))
    lin = Int8Linear.from_weight(w, b)
    w_kernel = lin.dequantized()
    for M in (1, 5, 40):  # the GEMV kernel (M <= 16) and the prompt's bf16 matrix product
        x = torch.randn(2, M, 64, generator=gen(3))
        want = x.bfloat16().float() @ w_kernel.T + b.bfloat16().float()
        got = lin(x)
        assert got.shape == (2, M, 96) and got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() < 0.02 * want.abs().max()


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
def test_fitted_int4_groups_never_err_more_than_the_span(group_size):
    """fit_groups: in every group the squared error is at most the [min, max] span's, and in total below it
    (by 10% on these weights with rare outliers, which stretch a span); the codes stay in [0, 15]."""
    g = gen(5)
    w = torch.randn(48, 128, generator=g) * torch.where(torch.rand(48, 128, generator=g) < 0.03, 6.0, 1.0)

    def err(q, scale, lo):
        w_hat = lo[..., None] + scale[..., None] * q.float().view(48, -1, group_size)
        return (w_hat - w.view(48, -1, group_size)).square().sum(-1)  # (48, groups)

    span, fitted = int4_groups(w, group_size), int4_groups(w, group_size, fit=True)
    assert fitted[0].min() >= 0 and fitted[0].max() <= 15
    assert (err(*fitted) <= err(*span) * (1 + 1e-5)).all()
    assert err(*fitted).sum() < 0.95 * err(*span).sum()


@torch.no_grad()
def test_the_int4_level_fits_its_layers_and_its_ranking_head():
    """quantize(model, "int4"): every layer's codes and the ranking head's are `fit_groups`' (their error at most
    the span's, and below it in total)."""
    model = tiny()
    w = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not model.lm_head}
    quantize(model, "int4")
    emb = model.embed_tokens
    w["lm_head.approx"] = emb.rows(torch.arange(emb.num_embeddings))  # the head is tied to the quantised embedding
    for name, weight in w.items():
        lin = model.get_submodule(name)
        span = Int4Linear.from_weight(weight, lin.group_size).dequantized()
        assert torch.equal(lin.dequantized(), Int4Linear.from_weight(weight, lin.group_size, fit=True).dequantized()), name
        assert (lin.dequantized() - weight).square().sum() < (span - weight).square().sum(), name


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
    for M in (1, 5):
        x = torch.randn(2, M, 128, generator=gen(2))
        want = x.bfloat16().float() @ w_kernel.T
        got = lin(x)
        assert got.shape == (2, M, 96) and got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() < 0.02 * want.abs().max()


def test_int4_packing_in_row_chunks_equals_packing_at_once(monkeypatch):
    """The 262k-row head is packed 4,096 rows at a time; the packed layout must be the same as one pack."""
    import minigemma.quant as quant

    w = torch.randn(64 * 7, 64, generator=gen(4))
    q, _, _ = int4_groups(w, 32)
    at_once = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    monkeypatch.setattr(quant, "ROWS_PER_PACK", 128)  # chunks of 128 rows, the last of 64
    chunked = Int4Linear.from_weight(w, 32)
    assert torch.equal(chunked.packed[0], at_once)  # plane 0
    with pytest.raises(ValueError, match="divisible by 64"):
        Int4Linear.from_rows([w[:48], w[48:96]], 96, 64)


def test_int4_linear_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        Int4Linear.from_weight(torch.randn(32, 48), 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_weight(torch.randn(40, 64), 32)


def test_quantize_rejects_unknown_levels():
    with pytest.raises(ValueError, match="'int3'"):
        quantize(nn.Sequential(nn.Linear(4, 4)), "int3")


def _llama_cpp_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 bytes as ggml's quantize_row_q8_0_ref writes them: d = amax/127 (stored fp16), q = round(x/d)."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d == 0, 0.0, 1 / d)).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], 1).reshape(-1)


def test_q8_0_blocks_give_back_the_files_bytes():
    """Weights dequantised from Q8_0 re-quantise to the same bytes, so a quantised model built from
    the float32 one holds exactly the GGUF's embedding (checked on the real file below too)."""
    w = torch.randn(8, 96, generator=gen(5)) * 0.05
    w[3, :32] = 0  # an all-zero block
    raw = _llama_cpp_q8_0(w)
    floats = dequantize_q8_0(raw, (8, 96))
    assert torch.equal(q8_0_blocks(floats).reshape(-1), raw)
    emb = Q8_0Embedding.from_weight(floats, dtype=torch.float32)
    ids = torch.tensor([[7, 0, 3], [3, 3, 5]])
    assert torch.equal(emb(ids), floats[ids])  # a lookup is the dequantised row, exactly


def _q8_0_test_weights() -> torch.Tensor:
    w = torch.randn(16, 256, generator=gen(6)) * torch.exp(torch.randn(16, 1, generator=gen(7)))  # rows of many sizes
    w *= 0.05
    w[2, 64:96] = 0  # an all-zero block
    w[5, 40] = 30.0  # a block with one large outlier
    return w


def test_q8_0_blocks_round_trip_through_the_dequantiser():
    """q8_0_blocks then dequantize_q8_0: each weight comes back as fp16(d) · q, q = round(w / d) with the
    float32 d = max|block| / 127, so within half a step plus the fp16 rounding of d; zeros stay zero."""
    w = _q8_0_test_weights()
    raw = q8_0_blocks(w)  # (16, 8, 34)
    back = dequantize_q8_0(raw.reshape(-1), w.shape)
    d = w.reshape(16, 8, 32).abs().amax(-1) / 127
    d16 = raw[..., :2].contiguous().view(torch.float16).float()[..., 0]
    assert torch.equal(d16, d.half().float())
    q = raw[..., 2:].contiguous().view(torch.int8).float()
    assert torch.equal(q, torch.round(w.reshape(16, 8, 32) / torch.where(d == 0, 1.0, d)[..., None]))
    assert torch.equal(back.reshape(16, 8, 32), q * d16[..., None])
    err = (back - w).abs().reshape(16, 8, 32)
    assert (err <= (d / 2 + 127 * (d16 - d).abs())[..., None] * (1 + 1e-6)).all()
    assert (back[2, 64:96] == 0).all() and back[5, 40] == 127 * d16[5, 1]  # the outlier is code 127
    with pytest.raises(ValueError, match="blocks of 32"):
        q8_0_blocks(torch.randn(2, 40))


def test_q8_0_blocks_are_the_gguf_packages_bytes():
    """The bytes of q8_0_blocks against the `gguf` package's Q8_0 quantiser (bit-exact with ggml's
    quantize_row_q8_0_ref): the same on weights without ties. At an exact tie ggml rounds away from zero
    (roundf) and torch.round to even: the one difference, shown at the end."""
    gguf = pytest.importorskip("gguf")
    w = _q8_0_test_weights()
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)  # (16, 8 * 34) uint8
    assert torch.equal(q8_0_blocks(w).reshape(16, -1), torch.from_numpy(ref))
    tie = torch.zeros(1, 32)
    tie[0, :2] = torch.tensor([127.0, 2.5])  # d = 1: 2.5 / d is a tie
    ours = q8_0_blocks(tie).reshape(-1)[2:].view(torch.int8)
    theirs = torch.from_numpy(gguf.quants.quantize(tie.numpy(), gguf.GGMLQuantizationType.Q8_0)).reshape(-1)[2:]
    assert (int(ours[1]), int(theirs.view(torch.int8)[1])) == (2, 3)


def test_rescored_head_recomputes_the_top_k_exactly():
    table = torch.randn(320, 64, generator=gen(4))
    emb = nn.Embedding.from_pretrained(table)
    head = RescoredHead(Int4Linear.from_weight(table, 32), emb, k=8)
    x = torch.randn(3, 64, generator=gen(5)).bfloat16()
    exact = x.float() @ table.T  # (3, V)
    got = head(x)
    approx = head.approx(x).float()
    top = approx.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-4)  # float32 sums, same terms
    rest = torch.ones_like(got, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(got[rest], approx[rest])  # the tail keeps its 4-bit values
    assert (top == exact.argmax(-1, keepdim=True)).any(-1).all()  # (this seed's winners are in the top 8)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


# ----------------------------------------------------------------------------------------------
# Quantised models: the same forward, swapped modules
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


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_at_every_level(level, family):
    """Prefill, then single steps until the local rings (W = 4) have wrapped three times, against
    one forward over the whole sequence, for the model quantised at each level. The head re-scores every
    logit here (rescore = V): with a top k under V a logit's value depends on whether it ranks in the
    top k, which differs between two runs whose bf16 rounding differs."""
    model = quantize(tiny(family), level, rescore=320)
    ids = torch.randint(0, 320, (2, 17), generator=gen(6))
    full = model(ids).float()
    cache = model.new_cache(2, 17)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 17)]
    got = torch.cat(steps, 1).float()
    tol = 1e-4 if level is None else 0.03 * full.abs().max()  # float32: op order only; else bf16 rounding
    assert (got - full).abs().max() <= tol, (got - full).abs().max()
    assert cache.length == 17 and cache[0].k.shape[2] == 4  # the ring held only its window


@pytest.mark.parametrize("level", ["bf16", "int8", "int4"])
def test_quantize_swaps_modules_and_keeps_the_forward(level):
    model = tiny()
    float_params = sum(p.numel() for p in model.parameters())
    quantize(model, level)
    kinds = {type(m).__name__ for m in model.modules()}
    if level == "bf16":
        assert "BF16Linear" in kinds and model.lm_head.weight is model.embed_tokens.weight  # still tied
        assert not any(type(m) is nn.Linear for m in model.modules())  # every nn.Linear retyped
        assert model.embed_tokens.weight.dtype == torch.bfloat16
    else:
        assert {"Int8Linear" if level == "int8" else "Int4Linear", "RescoredHead", "Q8_0Embedding"} <= kinds
        assert not any(type(m) is nn.Linear for m in model.modules())  # every nn.Linear was swapped
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(w.dtype == torch.float32 for w in norms)  # norms stay exact
    assert float_params > 0
    # the model's own forward (and the shared decode loop) runs with the swapped modules
    out = generate_ids(model, [[2, 17, 45], [2, 5]], 5, eos_id=None)
    assert [len(o) for o in out] == [5, 5]


def test_weight_bytes_count_one_embedding_row_and_the_head():
    model = tiny()
    V, C = 320, 64
    f32 = weight_bytes_per_token(model)
    total = sum(p.numel() * 4 for p in model.parameters())  # the tied table counted once here
    assert f32 == total + C * 4  # every weight once + the one embedding row a step gathers
    quantize(model, "int8")
    q8 = weight_bytes_per_token(model)
    n_int8 = sum(m.q.numel() + 2 * m.q.shape[0] for m in model.modules() if isinstance(m, Int8Linear))
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    head = model.lm_head.approx
    head_bytes = head.packed.numel() + head.scale_zero.numel() * 2  # (one plane)
    assert q8 == n_int8 + norms + head_bytes + (C // 32) * 34  # + one Q8_0 row of the embedding


@torch.no_grad()
def test_griffin_quantises_with_biases():
    from minigemma.griffin import Griffin, small_config

    torch.manual_seed(0)
    model = Griffin(small_config(vocab_size=256)).eval()
    ids = torch.randint(0, 256, (2, 20), generator=gen(7))
    want = model(ids)
    quantize(model, "int8", rescore=256)  # every logit exact from the head's rows: only the layers' int8 remains
    assert any(isinstance(m, Int8Linear) and m.bias is not None for m in model.modules())
    full = model(ids).float()
    assert (full - want).abs().max() < 0.05 * want.abs().max()  # int8 weights, bf16 activations
    cache = model.new_cache(2)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(20)], 1).float()
    assert (steps - full).abs().max() < 0.03 * full.abs().max()


# ----------------------------------------------------------------------------------------------
# The real Gemma 3 270M
# ----------------------------------------------------------------------------------------------
def _fetched():
    from minigemma.weights import fetch

    try:
        return fetch.path("gemma3-270m")
    except fetch.FetchError as e:
        pytest.skip(str(e))


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("level", ["bf16", "int8", "int4"])
@torch.no_grad()
def test_quantising_a_skeleton_from_streamed_weights_equals_quantising_the_model(level):
    """quantize(skeleton on the meta device, level, weights) builds each module from its rows, a chunk at a
    time (chunks smaller than a matrix here, and cut across q/k/v); it must hold the very tensors that
    quantising the loaded float32 model computes. Norm weights stay float32 both ways."""
    from minigemma.pretrained import CheckpointRows, unfused_state_dict

    ref = tiny()
    tensors = unfused_state_dict(ref)
    with torch.device("meta"):
        skeleton = Gemma(ref.config)
    weights = CheckpointRows(skeleton, tensors, lambda n: None if n == "lm_head.weight" else n, rows=64)
    streamed = quantize(skeleton, level, weights)
    _same_tensors(streamed, quantize(ref, level))
    assert all(m.weight.dtype == torch.float32 for m in streamed.modules() if isinstance(m, RMSNorm))


def test_a_skeleton_without_weights_gets_empty_modules_of_the_level():
    """What the quantised-model cache assigns a saved state to: the level's modules, on the meta device."""
    with torch.device("meta"):
        skeleton = Gemma(tiny().config)
    quantize(skeleton, "int4")
    assert isinstance(skeleton.lm_head, RescoredHead) and isinstance(skeleton.embed_tokens, Q8_0Embedding)
    assert all(t.is_meta for t in skeleton.state_dict().values())
    assert set(skeleton.state_dict()) == set(quantize(tiny(), "int4").state_dict())


@pytest.mark.parametrize("level", ["int8", "int4"])
@torch.no_grad()
def test_quant_load_equals_quantising_the_float32_model(level):
    """gemma_from_gguf(quant=...) builds each module from the file one tensor at a time; it must hold the very
    tensors that quantize() computes from the float32 reference (the embedding: the file's own bytes)."""
    from minigemma.pretrained import gemma_from_gguf
    from minigemma.weights.gguf import read_gguf

    path = _fetched()
    direct = gemma_from_gguf(path, quant=level)
    _same_tensors(direct, quantize(gemma_from_gguf(path), level))
    f = read_gguf(path)
    assert torch.equal(direct.embed_tokens.blocks.reshape(-1), f.raw("token_embd.weight"))


@torch.no_grad()
def test_bfloat16_dtype_is_the_bf16_level():
    """`dtype=torch.bfloat16` and `quant="bf16"` are one model: every weight bf16 but the norms', float32."""
    import minigemma

    _fetched()
    a, _ = minigemma.load_pretrained("gemma3-270m", dtype=torch.bfloat16)
    b, _ = minigemma.load_pretrained("gemma3-270m", quant="bf16")
    _same_tensors(a, b)
    dtypes = {name: t.dtype for name, t in a.state_dict().items()}
    assert {dtypes[n] for n in dtypes if "norm" in n} == {torch.float32}
    assert {dtypes[n] for n in dtypes if "norm" not in n} == {torch.bfloat16}


@torch.no_grad()
def test_the_quantised_cache_reads_back_the_model_it_saved(tmp_path):
    """A quantised model is saved beside the GGUF once and read back (the level's modules swapped into a
    meta skeleton, the saved tensors assigned), not rebuilt: the same tensors, the same file; a file for
    another hash is rebuilt."""
    from minigemma.pretrained import QUANTIZED_FORMAT, gemma_from_gguf, read_quantized

    path = tmp_path / "model.gguf"
    path.symlink_to(_fetched())
    built = gemma_from_gguf(path, file_codes=True, cache_key="abc")
    saved = tmp_path / "quantized" / "model.file-codes.safetensors"
    assert saved.is_file()
    written = saved.stat().st_ino
    _same_tensors(gemma_from_gguf(path, file_codes=True, cache_key="abc"), built)
    assert saved.stat().st_ino == written, "the saved file was not read back: the model was built and written again"
    with torch.device("meta"):
        skeleton = Gemma(built.config)
    right = {"gguf_sha256": "abc", "level": "file-codes", "format": QUANTIZED_FORMAT}
    _same_tensors(read_quantized(skeleton, "int4", saved, right), built)  # two planes where the file's codes have 5-6 bits
    with torch.device("meta"):
        skeleton = Gemma(built.config)
    other = {"gguf_sha256": "another file", "level": "file-codes", "format": QUANTIZED_FORMAT}
    assert read_quantized(skeleton, "int4", saved, other) is None and not saved.exists()  # to be rebuilt


@torch.no_grad()
def test_each_level_ranks_with_its_own_head_groups_and_a_saved_head_of_other_groups_is_rebuilt(tmp_path):
    """int8's ranking head has finer groups than int4's (HEAD_GROUP_SIZE). A saved model whose tensors have
    the right names and dtypes but other shapes (a head saved with another group size) is not read back:
    its scales would be assigned to a module that reads them in other groups."""
    from minigemma.pretrained import read_quantized, write_quantized
    from minigemma.quant import HEAD_GROUP_SIZE, head_group_size, quantized_head

    q8, q4 = quantize(tiny(), "int8"), quantize(tiny(), "int4")
    C = q8.config.hidden_size
    assert q8.lm_head.approx.group_size == head_group_size(C, HEAD_GROUP_SIZE["int8"]) == 32
    assert q4.lm_head.approx.group_size == head_group_size(C, HEAD_GROUP_SIZE["int4"]) == 64  # 128 does not divide 64
    meta = {"level": "int8"}
    write_quantized(q8, tmp_path / "right.safetensors", meta)
    with torch.device("meta"):
        skeleton = Gemma(q8.config)
    _same_tensors(read_quantized(skeleton, "int8", tmp_path / "right.safetensors", meta), q8)
    q8.lm_head = quantized_head(q8.embed_tokens, group_size=64)
    write_quantized(q8, tmp_path / "other.safetensors", meta)
    with torch.device("meta"):
        skeleton = Gemma(q8.config)
    assert read_quantized(skeleton, "int8", tmp_path / "other.safetensors", meta) is None
    assert not (tmp_path / "other.safetensors").exists()  # to be rebuilt


def test_loading_int8_never_holds_a_float32_model():
    """Peak memory of a fresh process that loads the int8 270M, as the kernel counts it (VmHWM).

    The float32 model alone is 1,072 MB of weights, the int8 one 384 MB (int8 layers 100 MB, the int4
    head 105 MB, the Q8_0 embedding 178 MB, norms). Torch itself takes ~230 MB. A load that ever held the
    float32 model (or the 671 MB float32 embedding) would exceed 900 MB."""
    _fetched()
    # VmHWM: this process's own peak (ru_maxrss would also count the pytest process it was forked from)
    code = ("import minigemma, pathlib; m, t = minigemma.load_pretrained('gemma3-270m', quant='int8'); "
            "print(next(l.split()[1] for l in pathlib.Path('/proc/self/status').read_text().splitlines() "
            "if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.strip().splitlines()[-1]) / 1024  # VmHWM is in kB
    assert peak_mb < 900, f"loading the int8 model peaked at {peak_mb:.0f} MB"


# ----------------------------------------------------------------------------------------------
# The file's own codes on the int4 kernel (file_codes=True)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [64 * 3, 96, 48])
def test_int4_layout_unpacks_what_the_kernel_packs(N):
    """pack_int4 is torch's own packing; unpack_int4 reads its layout (blocks of 64 rows, then pairs)."""
    from minigemma.quant import pack_int4, unpack_int4

    codes = torch.randint(0, 16, (N, 96), generator=gen(8))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))


@pytest.mark.parametrize("lo,hi,planes", [(0, 15, 1), (-16, 15, 2), (-128, 127, 2), (-32, 31, 2), (0, 255, 2)])
def test_codes_run_exactly_on_the_int4_kernel(lo, hi, planes):
    """w = a·v + b with v on a 4- to 8-bit grid: one plane or two balanced base-16 digits. What is left is
    the kernel's bf16 scales and zeros (8 significant bits: a relative rounding of at most 2^-8), so each
    weight is within 2^-8 · Σ_planes (|c - 8|·|scale| + |zero|) of a·v + b."""
    v = torch.randint(lo, hi + 1, (64, 96), generator=gen(9))
    a = 0.005 + 0.01 * torch.rand(64, 3, generator=gen(10))
    b = 0.01 * torch.randn(64, 3, generator=gen(11)) if lo == 0 and hi == 15 else torch.zeros(64, 3)
    lin = Int4Linear.from_codes(v, a, b)
    assert lin.planes == planes
    from minigemma.quant import unpack_int4

    want = a.repeat_interleave(32, 1) * v + b.repeat_interleave(32, 1)
    bound = torch.full_like(want, 1e-7)
    for p in range(lin.planes):
        c = unpack_int4(lin.packed[p]).float()
        scale, zero = lin.scale_zero[p].float().abs().permute(1, 0, 2).unbind(-1)
        bound += 2 ** -8 * ((c - 8).abs() * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1))
    assert ((lin.dequantized() - want).abs() <= bound).all()
    x = torch.randn(3, 96, generator=gen(12))
    ref = x.bfloat16().float() @ lin.dequantized().T
    assert (lin(x).float() - ref).abs().max() < 0.02 * ref.abs().max()  # the kernel's bf16 output


@pytest.mark.parametrize("lo,hi,planes", [(0, 15, 1), (-128, 127, 2), (-16, 15, 2)])
@pytest.mark.parametrize("N,g", [(128, 32), (144, 64), (16, 32)])
def test_a_long_prompt_dequantises_to_the_same_bits(lo, hi, planes, N, g):
    """A prompt of more than PROMPT_ROWS rows multiplies by `dequantized_t()` (Wᵀ, built in a few passes from the
    packed bytes), which must hold the very bits of `dequantized(bf16)` (the readable path, itself checked
    against a·v + b above), for one plane and two, for rows in whole blocks and past them (N = 144 has a
    tail of 16 rows on an AVX-512 CPU, N = 16 nothing else); and the prompt's product must be x @ Wᵀ."""
    v = torch.randint(lo, hi + 1, (N, 128), generator=gen(13))
    a = 0.005 + 0.01 * torch.rand(N, 128 // g, generator=gen(14))
    b = 0.01 * torch.randn(N, 128 // g, generator=gen(15))
    lin = Int4Linear.from_codes(v, a, b, group_size=g)
    assert lin.planes == planes
    wt = lin.dequantized_t()
    assert wt.dtype == torch.bfloat16 and wt.is_contiguous() and wt.shape == (128, N)
    assert torch.equal(wt.view(torch.int16), lin.dequantized(torch.bfloat16).T.contiguous().view(torch.int16))
    x = torch.randn(200, 128, generator=gen(16)).bfloat16()
    ref = (x.float() @ lin.dequantized().T).bfloat16().float()
    assert (lin(x).float() - ref).abs().max() <= 0.01 * ref.abs().max()  # a bf16 product, summed in another order


def test_a_prompt_dequantises_past_prompt_rows_and_not_before(monkeypatch):
    """Up to PROMPT_ROWS rows run the kernel; one row more dequantises the weight (once per call)."""
    lin = Int4Linear.from_codes(torch.randint(-16, 16, (64, 128), generator=gen(17)), torch.full((64, 4), 0.01),
                                torch.zeros(64, 4), group_size=32)
    calls = []
    real = Int4Linear.dequantized_t
    monkeypatch.setattr(Int4Linear, "dequantized_t", lambda self: calls.append(1) or real(self))
    for rows, dequantised in ((1, 0), (quant.PROMPT_ROWS, 0), (quant.PROMPT_ROWS + 1, 1)):
        calls.clear()
        lin(torch.randn(rows, 128, generator=gen(18)))
        assert len(calls) == dequantised, rows


def test_a_source_is_not_a_level():
    """"gguf" names where weights come from, not a precision: the file's codes are `file_codes=True`."""
    import minigemma

    with pytest.raises(ValueError, match="'gguf': choose from None, 'bf16', 'int8', 'int4'"):
        quantize(tiny(), "gguf")
    with pytest.raises(ValueError, match="codes run on the int4 kernel"):
        quantize(tiny(), "int8", codes=lambda name: [])
    with pytest.raises(ValueError, match="does not go with quant='int8'"):
        minigemma.load_pretrained("gemma3-270m", quant="int8", file_codes=True)
    with pytest.raises(ValueError, match="no integer codes of its own"):
        minigemma.load_pretrained("embeddinggemma-300m", file_codes=True)


def test_the_file_codes_are_kept_exactly():
    """Q4_K, Q5_0 and Q8_0 tensors: a·v + b is the file's dequantised weight exactly, and the loaded module
    multiplies by it up to the kernel's bf16 scales. Q6_K (a scale per 16 weights, the kernel's smallest
    group is 32) is rounded to its groups' larger step: its extra error is measured against the file's own."""
    from minigemma.weights.gguf import dequantize, integer_codes, quantization_step, read_gguf

    f = read_gguf(_fetched())
    seen = set()
    for name, info in f.tensors.items():
        if info.type.name in seen or not name.startswith("blk.") or len(info.shape) != 2:
            continue
        seen.add(info.type.name)
        raw = f.raw(name)
        w = dequantize(raw, info.type, info.shape)
        v, a, b = integer_codes(raw, info.type, info.shape)
        got = a.repeat_interleave(32, 1) * v + b.repeat_interleave(32, 1)
        if info.type.name == "Q6_K":
            step = quantization_step(raw, info.type, info.shape)
            extra = (got - w).pow(2).mean().sqrt() / (step.pow(2).mean().sqrt() / 12 ** 0.5)
            assert extra < 1.0, f"{name}: Q6_K regrouping adds {extra:.2f}x the file's own rounding noise"
        else:
            assert torch.equal(got, w), name
        lin = Int4Linear.from_codes(v, a, b)
        rel = ((lin.dequantized() - got).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
        assert rel < 2e-3, f"{name}: bf16 scales move the weights by {rel:.2g} RMS (relative)"
    assert seen == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}


@torch.no_grad()
def test_the_int4_head_ranks_the_exact_winner_in_its_top_64():
    """RescoredHead recomputes the top RESCORE (1,024) exactly: greedy choices are exact as long as the exact
    arg-max is among them; held here to the top 64, with room to spare. Measured on 256 positions of a
    real text (it ranked at most 8th of those, and 11th of 2,048, when written)."""
    import minigemma
    from minigemma.bench.generate import prompt_ids
    from minigemma.quant import embedding_rows

    _fetched()
    model, tok = minigemma.load_pretrained("gemma3-270m", file_codes=True)
    h = model(torch.tensor([prompt_ids(tok, 256)]), return_hidden=True)[0]  # (T, C)
    emb, V = model.embed_tokens, model.embed_tokens.num_embeddings
    exact = torch.cat([h.float() @ embedding_rows(emb, torch.arange(r, min(V, r + 32768))).T
                       for r in range(0, V, 32768)], dim=1)
    approx = model.lm_head.approx(h).float()
    rank = (approx > approx.gather(1, exact.argmax(-1, keepdim=True))).sum(-1)
    assert int(rank.max()) < 64, f"{int(rank.max())} tokens outranked the exact winner in the int4 head"
    assert torch.equal(model.lm_head(h).argmax(-1), exact.argmax(-1))


@torch.no_grad()
def test_the_fast_default_keeps_float32s_greedy_tokens_but_at_near_ties():
    """The fast path (`file_codes=True`) must give the float32 reference's greedy tokens on the test prompts, or
    part from them only where float32's own top two logits are nearly tied (bf16 activations round the
    logits by a few hundredths; a real difference between the models would show at a clear margin)."""
    import minigemma
    from minigemma.generation import generate_ids

    _fetched()
    ref, tok = minigemma.load_pretrained("gemma3-270m")
    fast, _ = minigemma.load_pretrained("gemma3-270m", file_codes=True)
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
               "Once upon a time", "The three primary colours are", "Water boils at"]
    identical = 0
    for p in prompts:
        ids = tok.encode(p)
        want, got = generate_ids(ref, [ids], 24)[0], generate_ids(fast, [ids], 24)[0]
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if k is None:
            identical += 1
            continue
        top2 = ref(torch.tensor([ids + want[:k]]), last_only=True)[0, -1].topk(2).values
        assert top2[0] - top2[1] < 0.25, f"{p!r}: differs at step {k} where float32's margin is {top2[0] - top2[1]:.3f}"
    assert identical >= 3


@pytest.mark.parametrize("native", [False, True])
def test_bf16_linear_prompt_product_is_the_bf16_product(native, monkeypatch):
    """A bf16 model's prompt products go through `bf16_matmul`: in float32 on a CPU without fast bf16
    products, rounded to bf16 after. Against torch's own bf16 product (float32 sums, another order):
    each rounds the float32 sum (bias included) once, so they differ by at most one bf16 rounding each:
    |Δ| <= 2 · 2^-8 · |y| (plus the sums' float32 order, far below)."""
    monkeypatch.setattr(quant, "BF16_MATMUL_NATIVE", native)
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g))
        lin.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(3, 12, 96, generator=g).bfloat16()
    with torch.no_grad():
        want = lin.to(torch.bfloat16)(x).float()  # nn.Linear's own bf16 product
    model = nn.Sequential(lin)
    quant.cast_activations(model, torch.bfloat16)
    assert type(model[0]) is quant.BF16Linear
    with torch.no_grad():
        got = model[0](x)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 12, 40)
    assert ((got.float() - want).abs() <= 2 * 2 ** -8 * want.abs() + 1e-5).all()
    quant.cast_activations(model, torch.float32)
    assert type(model[0]) is nn.Linear  # back to float32: back to nn.Linear
