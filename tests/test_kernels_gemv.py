"""The weight-only int8/int4 decode kernels (minigemma.kernels.gemv) against the quantised modules.

References, from the package: x @ module.dequantized().T + bias in float32 (the weights each module
encodes), and the modules' own forward (torch's CPU int8/int4 kernels, bf16 output). Layouts as
`minigemma.quant` builds them: `Int8Linear.from_weight`; `Int4Linear.from_weight` (one plane) and
`from_codes` (two balanced base-16 planes, as a GGUF file's 5- and 8-bit codes), and `Int4Linear.cat`
(planes that are not digits of one code). Odd sizes, the packed layout's tail (N not a multiple of
the block, and N < the block: all tail), both of torch's blocks (64 rows with AVX-512, 32 without: packed
here by a loop written in the test), groups of 32, 64 and 128, biases, M = 1 (decode) up to 32 rows, K
split over several programs. Without a GPU the kernels run in Triton's interpreter, bounds-checked.

Tolerances (|got − want| <= atol + rtol·|want|, atol scaled by max|want|):
- float32 output against the float32 reference: rtol 1e-5, atol 1e-5·max. bf16 activations times
  8-bit or 4-bit codes are exact products in float32 (tl.dot: bf16 on a GPU's tensor cores, float32
  "ieee" in the interpreter); the sums run in another order (K tiles, splits, the scale applied
  after the sum per row or per group). Measured: below 2e-7 relative to the largest output.
- bf16 output (the modules') against the modules' own forward: rtol 1.6e-2, atol 1e-2·max (torch's
  bf16 defaults: each side rounds a float32 result to bf16, the reference a second time after its
  bias). Measured: at most one bf16 step.
"""

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma import quant
from minigemma.kernels import bounds_checked
from minigemma.kernels.gemv import (TritonInt4Linear, TritonInt8Linear, gemv, gemv_int4, gemv_int8, reference,
                                    use_gemv)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
CPU_KERNELS = pytest.mark.skipif(GPU, reason="the modules' own forward runs torch's CPU kernels")


def close(got, want, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def int4_module(N, K, g, planes, bias, seed):
    if planes == 1:
        return quant.Int4Linear.from_weight(rnd(N, K, seed=seed), g, rnd(N, seed=seed + 1) if bias else None)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(-128, 128, (N, K), generator=gen)  # 8-bit codes (Q8_0's): two base-16 digits
    a, b = 0.01 * torch.rand(N, K // g, generator=gen), 0.1 * torch.randn(N, K // g, generator=gen)
    return quant.Int4Linear.from_codes(v, a, b, g, rnd(N, seed=seed + 1) if bias else None)


@pytest.mark.parametrize("N,K,M,bias,split", [(37, 50, 1, False, None), (37, 50, 3, True, 3), (70, 96, 32, True, None),
                                              (64, 640, 1, False, 4)],
                         ids=["odd-decode", "odd-batch3-split3", "batch32-bias", "270m-width-split4"])
def test_int8_matches_the_dequantised_weight(N, K, M, bias, split):
    mod = quant.Int8Linear.from_weight(rnd(N, K, seed=N + K), rnd(N, seed=1) if bias else None).to(DEVICE)
    x = rnd(M, K, seed=M).to(DEVICE, torch.bfloat16)
    with bounds_checked():
        y = gemv_int8(x, mod.q, mod.scale, mod.bias, torch.float32, split_k=split, block_n=16, block_k=32)
    assert y.shape == (M, N) and y.dtype == torch.float32
    close(y, reference(x, mod))


@pytest.mark.parametrize("N,K,g,planes,M,bias,split", [
    (80, 64, 32, 1, 1, False, None),     # one block of 64 rows and a tail of 16
    (144, 96, 32, 2, 3, True, 3),        # two planes (8-bit codes), two blocks and a tail, K split 3 ways
    (48, 128, 64, 1, 17, True, None),    # fewer than 64 rows: all tail; 17 rows of x (BLOCK_M 32)
    (128, 256, 128, 1, 1, False, 2),     # no tail; the head's groups of 128
    (96, 64, 32, 2, 32, False, None),    # batch 32, two planes
], ids=["tail16", "2planes-split3", "all-tail-M17", "g128-split2", "batch32-2planes"])
def test_int4_matches_the_dequantised_weight(N, K, g, planes, M, bias, split):
    mod = int4_module(N, K, g, planes, bias, seed=N + K).to(DEVICE)
    x = rnd(M, K, seed=M).to(DEVICE, torch.bfloat16)
    with bounds_checked():
        y = gemv_int4(x, mod.packed, mod.scale_zero, g, mod.bias, torch.float32, split_k=split, block_n=16)
    assert y.shape == (M, N)
    close(y, reference(x, mod))


def pack_by_hand(codes, B):
    """codes (N, K) in [0, 15] -> (N, K/2) uint8 in torch's CPU int4 layout with blocks of B rows, one byte at a
    time: byte j < B/2 of a block at k holds rows j (low) and j + B/2 (high); the tail pairs rows 2j, 2j + 1."""
    N, K = codes.shape
    full = N // B * B
    out = []
    for b in range(0, full, B):
        for k in range(K):
            out += [int(codes[b + j, k]) | int(codes[b + j + B // 2, k]) << 4 for j in range(B // 2)]
    for k in range(K):
        out += [int(codes[full + 2 * j, k]) | int(codes[full + 2 * j + 1, k]) << 4 for j in range((N - full) // 2)]
    return torch.tensor(out, dtype=torch.uint8).view(N, K // 2)


def test_int4_reads_either_block_size_of_the_layout():
    """torch packs 64 rows a block on a CPU with AVX-512 and 32 elsewhere; packed by hand both ways (2 blocks and
    a tail of 16), the kernel reads each with its block_rows, and this CPU's with the default."""
    N, K, g = 144, 64, 32
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    assert torch.equal(pack_by_hand(codes, quant.int4_block_rows()), quant.pack_int4(codes))
    scale_zero = torch.randn(1, K // g, N, 2, generator=gen).to(torch.bfloat16)
    s, z = (scale_zero[0, ..., i].float().T.repeat_interleave(g, 1) for i in (0, 1))  # (N, K)
    x = rnd(3, K, seed=12).to(torch.bfloat16)
    want = x.float() @ ((codes - 8) * s + z).T
    for B in (32, 64):
        packed = pack_by_hand(codes, B)[None].to(DEVICE)
        with bounds_checked():
            y = gemv_int4(x.to(DEVICE), packed, scale_zero.to(DEVICE), g, None, torch.float32, block_n=16, block_rows=B)
        close(y.cpu(), want)
    with bounds_checked():
        y = gemv_int4(x.to(DEVICE), quant.pack_int4(codes)[None].to(DEVICE), scale_zero.to(DEVICE), g, None,
                      torch.float32)
    close(y.cpu(), want)


@CPU_KERNELS
def test_int4_planes_that_are_not_digits_match_the_cpu_kernel():
    """`Int4Linear.cat` pads a one-plane module with an all-zero plane: w = Σ_p (c_p − 8)·s_p + z_p holds
    (dequantized() refuses it); the reference is the module's forward, one CPU kernel call per plane."""
    mod = quant.Int4Linear.cat([int4_module(64, 64, 32, 1, False, seed=1), int4_module(16, 64, 32, 2, False, seed=2)])
    x = rnd(2, 64, seed=3).to(torch.bfloat16)
    with bounds_checked():
        y = gemv_int4(x, mod.packed, mod.scale_zero, 32, None, torch.float32)
    close(y, mod(x).float(), rtol=1.6e-2, atol=1e-2)


@CPU_KERNELS
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-2planes"])
def test_modules_are_drop_ins(kind):
    """TritonInt8Linear / TritonInt4Linear share the module's buffers and give its bf16 output. K is a
    multiple of 16: torch's CPU int8 kernel returns garbage for other K (torch 2.13)."""
    N, K = 80, 64
    if kind == "int8":
        mod, cls = quant.Int8Linear.from_weight(rnd(N, K, seed=4), rnd(N, seed=5)), TritonInt8Linear
    else:
        mod, cls = int4_module(N, K, 32, 2 if kind.endswith("2planes") else 1, True, seed=6), TritonInt4Linear
    x = rnd(2, 3, K, seed=7)  # (B, T, K) float32: the module takes any float, computes bf16
    want = mod(x)
    state = {k: v.data_ptr() for k, v in mod.state_dict().items()}
    torch_name = type(mod).__name__
    assert use_gemv(mod) == {torch_name: 1} and type(mod) is cls  # the swap: same object, same buffers
    assert {k: v.data_ptr() for k, v in mod.state_dict().items()} == state
    with bounds_checked():
        got = mod(x)
    assert got.shape == (2, 3, N) and got.dtype == torch.bfloat16
    close(got, want, rtol=1.6e-2, atol=1e-2)


@CPU_KERNELS
def test_a_quantised_gemma_with_the_kernels_swapped_in():
    """A tiny Gemma 3 quantised to int8 (its head int4 and rescored): every Int8Linear and Int4Linear
    swapped for the Triton class gives the torch model's logits, prompt and one decode step."""
    from minigemma.gemma import Gemma, GemmaConfig, layer_pattern

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=128, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, layer_types=layer_pattern(2, 2),
                      sliding_window=8, query_pre_attn_scalar=32, use_qk_norm=True)
    model = quant.quantize(Gemma(cfg).eval(), "int8")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        want = model(ids)
        swapped = use_gemv(model)
        assert swapped == {"Int8Linear": 2 * 4, "Int4Linear": 1}  # qkv, o, gate_up, down per layer; the head's int4
        assert {type(m) for m in model.modules() if isinstance(m, (quant.Int8Linear, quant.Int4Linear))} == {
            TritonInt8Linear, TritonInt4Linear}
        with bounds_checked():
            got = model(ids)
        assert use_gemv(model, enable=False) == {"TritonInt8Linear": 8, "TritonInt4Linear": 1}
        assert torch.equal(model(ids), want)  # torch's kernels again
    close(got, want, rtol=1.6e-2, atol=1e-2)
    assert (got[0].argmax(-1) == want[0].argmax(-1)).float().mean() >= 5 / 6


def test_bad_input_is_named():
    mod = quant.Int8Linear.from_weight(rnd(16, 32, seed=0))
    with pytest.raises(ValueError, match=r"x must be \(M, K = 32\)"):
        gemv_int8(torch.randn(2, 31), mod.q, mod.scale)
    with pytest.raises(ValueError, match="int8"):
        gemv_int8(torch.randn(2, 32), mod.q.float(), mod.scale)
    m4 = int4_module(16, 64, 32, 1, False, seed=0)
    with pytest.raises(ValueError, match="scale_zero"):
        gemv_int4(torch.randn(1, 64), m4.packed, m4.scale_zero, 64)
    with pytest.raises(ValueError, match="block_k"):
        gemv_int4(torch.randn(1, 64), m4.packed, m4.scale_zero, 32, block_k=64)
    with pytest.raises(TypeError, match="Int8Linear or an Int4Linear"):
        gemv(torch.randn(1, 32), torch.nn.Linear(32, 16))
    assert TritonInt4Linear.unsupported(m4) is None
    m8 = quant.Int4Linear.from_weight(rnd(16, 32, seed=0), 8)
    assert "group size 8" in TritonInt4Linear.unsupported(m8)
    assert use_gemv(m8) == {} and type(m8) is quant.Int4Linear  # the kernel cannot run it: it stays torch's
