"""bfloat16 numerics without a GPU: each kernel's bf16 path run in Triton's interpreter at the launch
configuration an H100 (or A100) would choose, against the float32 truth on the same bf16 values.

Why an emulation. The interpreter keeps a bf16 value as its 16 bits in a numpy uint16 (numpy has no
bfloat16). Loads, stores, `tl.where` and `tl.trans` move those bits correctly; `tl.dot` multiplies
them as integers, and `.to(tl.bfloat16)` truncates where a GPU rounds to nearest even. So the
attention launchers refuse bf16 on CPU, `use_triton` leaves bf16 models alone there, and the bf16
cases of each kernel's own test file run on a GPU only (the element-wise kernels, which have no dot,
do run in bf16 in the plain interpreter, but store truncated results).
`minigemma.kernels.interpret.emulated_bf16()` corrects exactly those operations: a `tl.dot` of bf16
operands multiplies their exact float32 values and accumulates in float32 (what the tensor cores do,
bf16 × bf16 -> fp32, up to the order of the sums), and every cast to bf16 rounds to nearest even.
This is "the GPU's tiling with float32 dots on inputs rounded to bf16", done one level further in:
instead of running the float32 kernel on rounded inputs, the bf16 kernel itself runs (its bf16
constexprs, `PRECISION`, the bf16 tile tables, and every bf16 rounding its source writes), and only
each dot is computed in float32 on the bf16 operands it was given. That also covers the roundings a
float32 run would skip: P rounded to bf16 before P·V (forward and decode), P and dS rounded before the
dV, dK and dQ products (backward), the GEMV's codes cast to bf16, and every bf16 store.

The configuration is the GPU's, from the launchers' own functions and `utils.H100` / `utils.A100`:
attention tiles `attention.blocks(D, props=..., elem=2)` (forward today: 128 × 64 at head_dim 64,
128 × 32 at 128, 64 × 32 at 256, the same on both; the backward's, run for both, differ: 128 × 32 on
an H100 at head_dim 64, 32 × 32 on an A100), decode's BLOCK_N from `decode_blocks` and its split count
from `decode_splits(..., target_programs(H100))` (264 programs; 35 to 63 splits here, merged by the
combine kernel 16 at a time), the GEMV's `launch_config(..., props=H100)` (BLOCK_N 64, bf16 dots,
split-K from the SM count, the bf16 result stored by the kernel when there is one split), the fused
loss's BLOCK_V (4096). RMSNorm, GeGLU, RoPE and the RG-LRU scan tile the same way on every device.
Every launch is bounds-checked too (the GPU's 128-row tiles mask more than the interpreter's 16).

Tolerances: elementwise |got − want| <= (1 + u)·E + u·|want| + slack, want the float32 (or float64)
truth on the same bf16 inputs, u = 2^-8 the unit roundoff of bf16 (8 significant bits; round to
nearest even is within u·|x| of x), slack = 1e-5 (attention outputs) or 1e-5·max|want| (the rest):
the float32 tests' own tolerance for summation order and exp/tanh/rsqrt implementations (measured
errors there are 1e-7 to 2e-6). u·|want| is the final rounding of the stored bf16 result. E bounds
the bf16 roundings inside the kernel, derived per kernel from where its source rounds:
- forward and decode: P rounded before P·V, each p within u of itself while l sums the unrounded p,
  so the output moves by at most u·Σ p|v| / Σ p = u·attention(q, k, |v|), computed by the reference
  itself with |v|. The decode's partial outputs, log-sum-exps and their merge are float32 (E the same).
- backward: dV = Σ P̃ᵀ dO: E = u·Pᵀ|dO|. dK and dQ: dS is rounded before its products,
  E = scale·(u·|dS| + P·c·|Δδ|)ᵀ|q| (|k| for dQ; c = 1 − tanh² under a soft-cap, else 1), where
  Δδ = rowsum(dO ⊙ (O_bf16 − O)) is what the forward's bf16 output changes in δ = rowsum(dO ⊙ O).
  P, dS and Δδ from an explicit float64 attention.
- RMSNorm, GeGLU, RoPE, the RG-LRU's gradients, the GEMVs, the fused loss's gradients: E = 0 (float32
  arithmetic on exact bf16 inputs, one rounding at the store; a GEMV's products of bf16 activations
  and small integer codes are exact). The RG-LRU's state h is float32: the float32 tolerance.
Measured worst |got − want| / bound: forward 0.62-0.75, backward 0.64-0.98, decode 0.30-0.47 (the
worst case adds every p's rounding error with one sign; over thousands of keys they partly cancel),
element-wise kernels, GEMVs and loss 0.83-0.98 (one rounding of nearly half an ulp, as must occur).
The bounds are not loose: `test_the_checks_fail_on_real_bf16_mistakes`
shows the comparison failing for attention's forward and for RMSNorm run by the plain interpreter (its
integer dot: off by 10^3 bounds and more; its truncating cast: an ulp where half is allowed), for the
emulated forward against a reference that skips the rounding of q, k, v, and it shows the forward's
errors reaching more than a quarter of their bound.

What this still does not test (a GPU run of each kernel's own test file does):
- the tensor cores' accumulation: wgmma (sm_90) and mma.sync (sm_80) add bf16 products in float32 in
  their own order and internal precision; here numpy's float32 matmul adds them. The bounds leave
  only float32-level slack for that difference.
- the compiled program: register and shared-memory layouts (wgmma's), cp.async/TMA copies and the
  pipeline stages, warps, barriers, spills. The interpreter runs one program at a time on whole
  blocks (the AOT check compiles these configurations but runs nothing).
- the GPU's approximate exp2/log2/rsqrt and fast division: float32-level, as in the float32 tests.
- bf16 work done by torch only on CUDA: the fused loss's bf16 cuBLAS products and its dz rounded to
  bf16 before them (on a CPU the launcher multiplies the same bf16 values in float32 and keeps dz in
  float32); the torch references' own bf16 kernels (cuBLAS, SDPA).
- float16, and the model-level paths: `use_triton` still leaves bf16 models on CPU alone and the
  kernels' GroupedQueryAttention still falls back there; these tests call the launchers directly.
"""

import functools
import warnings

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma import losses, quant
from minigemma.attention import RingKVCache
from minigemma.kernels import attention as A
from minigemma.kernels import fused_linear_loss as FL
from minigemma.kernels import gemv as GV
from minigemma.kernels import geglu as GG
from minigemma.kernels import rglru_scan as RS
from minigemma.kernels import rms_norm as RN
from minigemma.kernels import rope as RP
from minigemma.kernels.interpret import INTERPRET, bounds_checked, emulated_bf16
from minigemma.kernels.utils import A100, H100
from minigemma.losses import TeacherHead

pytestmark = pytest.mark.skipif(not INTERPRET, reason="emulates bf16 in Triton's interpreter; with a GPU, the bf16 "
                                                      "cases of each kernel's own test file run on the hardware")

U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, round to nearest even
BF16 = torch.bfloat16


def worst(got, want, modelled=0.0, slack=0.0):
    """max over elements of |got − want| / ((1 + u)·modelled + u·|want| + slack); inf where got is NaN."""
    got, want = got.double(), want.double()
    bound = (1 + U) * modelled + U * want.abs() + slack
    ratio = (got - want).abs() / bound
    return torch.nan_to_num(ratio, nan=float("inf")).max().item()


def check(got, want, modelled=0.0, slack=0.0, what=""):
    """The elementwise bound of the module docstring; returns the worst ratio (<= 1)."""
    assert got.dtype == BF16, f"{what}: expected a bf16 result, got {got.dtype}"
    r = worst(got, want, modelled, slack)
    assert r <= 1.0, f"{what}: |got - want| reaches {r:.3g} x the bf16 bound"
    return r


def rel_slack(want):
    return 1e-5 * want.abs().max().item() + 1e-30


def rnd(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def gpu_bf16(monkeypatch):
    """bf16 computed right by the interpreter, every launch bounds-checked, and the attention launchers'
    CPU refusal of bf16 lifted (it is there because the plain interpreter computes bf16 wrongly)."""
    monkeypatch.setattr(A, "INTERPRET", False)
    with emulated_bf16(), bounds_checked():
        yield


# --------------------------------------------------------------------------------------------
# The emulation itself, on a probe kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _probe_kernel(A_, B_, C, X, Y, I8, Z, S, LT, N: tl.constexpr):
    r = tl.arange(0, N)
    tile = r[:, None] * N + r[None, :]
    a, b = tl.load(A_ + tile), tl.load(B_ + tile)  # bf16
    tl.store(C + tile, tl.dot(a, b))  # float32 accumulator
    tl.store(Y + r, tl.load(X + r).to(tl.bfloat16))  # float32 -> bf16
    tl.store(Z + r, tl.load(I8 + r).to(tl.bfloat16))  # int8 -> bf16
    x, y = tl.load(A_ + r), tl.load(B_ + r)  # bf16 arithmetic and comparison
    tl.store(S + r, x * y + x)
    tl.store(LT + r, (x < y).to(tl.int32))


def test_the_emulation_computes_bf16_as_torch_does_and_is_undone():
    from triton.runtime import interpreter as ti

    n = 16
    a, b = rnd(n, n, seed=1).to(BF16), rnd(n, n, seed=2).to(BF16)
    x = rnd(n, seed=3, scale=100.0)
    i8 = torch.arange(-8, 8, dtype=torch.int8) * 15
    out = dict(c=torch.empty(n, n), y=torch.empty(n, dtype=BF16), z=torch.empty(n, dtype=BF16),
               s=torch.empty(n, dtype=BF16), lt=torch.empty(n, dtype=torch.int32))
    with emulated_bf16(), bounds_checked():
        _probe_kernel[(1,)](a, b, out["c"], x, out["y"], i8, out["z"], out["s"], out["lt"], N=n)
    torch.testing.assert_close(out["c"], a.float() @ b.float(), rtol=1e-6, atol=1e-6)  # exact products, fp32 sums
    assert torch.equal(out["y"], x.to(BF16))  # round to nearest even, bit for bit
    assert torch.equal(out["z"], i8.to(BF16))
    assert torch.equal(out["s"], (a[0].float() * b[0].float()).to(BF16).float().add(a[0].float()).to(BF16))
    assert torch.equal(out["lt"], (a[0] < b[0]).int())
    assert not {"create_dot", "cast_impl", "binary_op"} & set(vars(ti.interpreter_builder))  # patch undone
    y = torch.empty(n, dtype=BF16)  # and without it, the interpreter truncates again
    _probe_kernel[(1,)](a, b, out["c"], x, y, i8, out["z"], out["s"], out["lt"], N=n)
    assert not torch.equal(y, x.to(BF16))


# --------------------------------------------------------------------------------------------
# Attention: flash forward, backward, split-K decode
# --------------------------------------------------------------------------------------------
def _qkv(B, H, K, T, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, L, D, generator=g).to(BF16) for n, L in ((H, T), (K, S), (K, S))]


def _left_padded(T, pads):
    return torch.tensor([[0] * p + list(range(T - p)) for p in pads])


# (name, (B, H, K, T, D), flash_attention kwargs): T larger than the GPU's 128-query tiles where D allows
FORWARD = [
    ("causal GQA 4:2, D 64", (1, 4, 2, 150, 64), {}),
    ("window 40, MQA, D 128", (1, 2, 1, 140, 128), dict(window=40)),
    ("soft-cap 5, window 24, D 256", (1, 2, 1, 80, 256), dict(softcap=5.0, window=24)),
    ("left padding (packed rule), soft-cap, D 128", (2, 2, 1, 70, 128), dict(softcap=3.0, positions=(0, 23))),
    ("bidirectional band 30 (encoder), D 64", (1, 2, 2, 100, 64), dict(causal=False, window=30)),
]


def _kwargs(spec, T):
    kw = dict(spec)
    if "positions" in kw:
        kw["positions"] = _left_padded(T, kw["positions"])
    return kw


def _forward(q, k, v, kw, props=H100, scale=0.3):
    bm, bn, _, _ = A.blocks(q.shape[-1], None, None, None, props=props, elem=2)
    return A.flash_attention(q, k, v, scale=scale, block_m=bm, block_n=bn, **kw)


def _forward_bound(q, k, v, kw, scale=0.3):
    """(want, u·Σp|v|/Σp): the float32 truth on the bf16 values, and the bound of P's rounding before P·V."""
    qf, kf, vf = q.float(), k.float(), v.float()
    want = A.reference(qf, kf, vf, scale=scale, **kw)
    return want, U * A.reference(qf, kf, vf.abs(), scale=scale, **kw)


@pytest.mark.parametrize("name,shape,spec", FORWARD, ids=[c[0] for c in FORWARD])
def test_flash_forward_at_the_h100_tiles(gpu_bf16, name, shape, spec):
    B, H, K, T, D = shape
    q, k, v = _qkv(B, H, K, T, T, D, seed=len(name))
    kw = _kwargs(spec, T)
    got = _forward(q, k, v, kw)
    want, e = _forward_bound(q, k, v, kw)
    check(got, want, e, slack=1e-5, what=name)


def _explicit(q, k, v, scale, softcap=None, causal=True, window=None):
    """float64 P, the soft-cap's 1 − tanh² and the inputs with K/V heads repeated: for the backward's bounds."""
    G = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    x = q @ k.transpose(-1, -2) * scale
    dcap = torch.ones_like(x)
    if softcap:
        t = torch.tanh(x / softcap)
        x, dcap = softcap * t, 1 - t * t
    i, j = torch.arange(x.shape[-2])[:, None], torch.arange(x.shape[-1])[None, :]
    ok = torch.ones(x.shape[-2:], dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window:
        ok &= (i - j).abs() < window
    return torch.softmax(x.masked_fill(~ok, float("-inf")), -1), dcap, q, k, v, G


def _group_sum(t, G):  # (B, H, S, D) -> (B, K, S, D): what the K/V heads receive from their query heads
    B, H, S, D = t.shape
    return t.view(B, H // G, G, S, D).sum(2)


# (name, (B, H, K, T, D), kwargs, props): backward tiles 128 × 32 (H100) and 32 × 32 (A100, and both at D 256)
BACKWARD = [
    ("causal GQA 4:2, D 64, H100", (1, 4, 2, 150, 64), {}, H100),
    ("causal GQA 4:2, D 64, A100", (1, 4, 2, 150, 64), {}, A100),
    ("soft-cap 5, window 20, MQA, D 128, H100", (1, 2, 1, 140, 128), dict(softcap=5.0, window=20), H100),
    ("soft-cap 5, window 20, D 256, H100", (1, 2, 1, 70, 256), dict(softcap=5.0, window=20), H100),
]


@pytest.mark.parametrize("name,shape,spec,props", BACKWARD, ids=[c[0] for c in BACKWARD])
def test_flash_backward_at_the_gpus_tiles(gpu_bf16, name, shape, spec, props):
    """The forward at the GPU's forward tiles, the backward at its (smaller) backward tiles, as a GPU runs them."""
    B, H, K, T, D = shape
    scale = 0.3
    q, k, v = _qkv(B, H, K, T, T, D, seed=len(name))
    do = rnd(B, H, T, D, seed=9).to(BF16)
    mask = A.Mask(causal=spec.get("causal", True), window=spec.get("window"))
    fm, fn, _, _ = A.blocks(D, None, None, None, props=props, elem=2)
    bm, bn, _, _ = A.blocks(D, None, None, None, props=props, backward=True, elem=2)
    out, lse = A.flash_attention_forward(q, k, v, mask, scale, spec.get("softcap"), fm, fn)
    dq, dk, dv = A.flash_attention_backward(do, q, k, v, out, lse, mask, scale, spec.get("softcap"), bm, bn)

    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    want_out = A.reference(qf, kf, vf, scale=scale, **spec)
    wq, wk, wv = torch.autograd.grad(want_out, (qf, kf, vf), do.float())
    P, dcap, q64, k64, v64, G = _explicit(q, k, v, scale, **spec)
    do64 = do.double()
    O = P @ v64
    torch.testing.assert_close(O.float(), want_out.detach(), rtol=1e-5, atol=1e-5)  # the explicit P is the reference's
    dS = P * (do64 @ v64.transpose(-1, -2) - (do64 * O).sum(-1, keepdim=True)) * dcap
    d_delta = (do64 * (out.double() - O)).sum(-1, keepdim=True).abs()  # δ from the forward's bf16 output
    ds_err = U * dS.abs() + (1 + U) * P * dcap * d_delta
    e_q = scale * ds_err @ k64.abs()
    e_k = _group_sum(scale * ds_err.transpose(-1, -2) @ q64.abs(), G)
    e_v = _group_sum(U * P.transpose(-1, -2) @ do64.abs(), G)
    for which, got, want, e in (("dq", dq, wq, e_q), ("dk", dk, wk, e_k), ("dv", dv, wv, e_v)):
        check(got, want, e, rel_slack(want), what=f"{name} {which}")


# (name, B, H, K, S, D, decode_attention kwargs)
DECODE = [
    ("GQA 4:2 over 4480 keys, D 64", 2, 8, 2, 4480, 64, {}),
    ("MQA 8:1, soft-cap 50 (Gemma 2's), 2000 keys, D 256", 1, 8, 1, 2000, 256, dict(softcap=50.0)),
    ("window 600 over in-order keys, D 128", 1, 4, 2, 2000, 128, dict(window=600)),
]


@pytest.mark.parametrize("name,B,H,K,S,D,spec", DECODE, ids=[c[0] for c in DECODE])
def test_split_k_decode_at_the_h100_split_count(gpu_bf16, name, B, H, K, S, D, spec):
    """The first case has more key tiles (70 per row and K/V head) than an H100's 264 programs take one each:
    `decode_splits` asks for 66 and whole tiles per split make it 35 splits of 2 tiles; the others get one
    tile per split (63). All more than the 16 the combine kernel reads at once. (An A100 differs in the
    count only: 216 programs.)"""
    q, k, v = _qkv(B, H, K, 1, S, D, seed=S + D)
    bn, _, _ = A.decode_blocks(D, None, None, props=H100, elem=2)
    splits = A.decode_splits(B, K, S, bn, A.target_programs(None, H100))
    n_splits = triton.cdiv(S, triton.cdiv(triton.cdiv(S, splits), bn) * bn)  # the launcher's: whole tiles per split
    assert n_splits > 16  # more than the combine kernel reads at once
    got = A.decode_attention(q, k, v, q_index=S - 1, scale=0.3, splits=splits, block_n=bn, **spec)
    want, e = _forward_bound(q, k, v, dict(spec, q_start=S - 1))
    check(got, want, e, slack=1e-5, what=f"{name}, {n_splits} splits of {bn}-key tiles")


def test_decode_through_a_wrapped_bf16_ring_buffer(gpu_bf16):
    """A bf16 RingKVCache fed past its window: rotated slots, their indices read by the kernel."""
    B, H, K, D, W = 2, 4, 2, 128, 300
    cache = RingKVCache(B, K, D, window=W, dtype=BF16)
    cache.update(*(rnd(B, K, 700, D, seed=s).to(BF16) for s in (1, 2)))
    q = rnd(B, H, 1, D, seed=3).to(BF16)
    k_all, v_all, keys = cache.update(*(rnd(B, K, 1, D, seed=s).to(BF16) for s in (4, 5)))
    assert not keys.in_order
    i = cache.length - 1
    bn, _, _ = A.decode_blocks(D, None, None, props=H100, elem=2)
    splits = A.decode_splits(B, K, W, bn, A.target_programs(None, H100))
    kw = dict(window=W, k_first=keys.first, k_index=keys.index())
    got = A.decode_attention(q, k_all, v_all, q_index=i, scale=0.3, splits=splits, block_n=bn, **kw)
    want, e = _forward_bound(q, k_all, v_all, dict(kw, q_start=i))
    check(got, want, e, slack=1e-5, what="ring")


# --------------------------------------------------------------------------------------------
# The element-wise kernels: float32 inside, one rounding to bf16 at the store
# --------------------------------------------------------------------------------------------
def _grads(fn, inputs, dy):
    """(y, grads of the floating inputs) of fn for an upstream gradient dy."""
    inputs = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    y = fn(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    return y.detach(), torch.autograd.grad(y, leaves, dy.to(y.dtype))


def _against_truth(name, kernel, reference, inputs, dy_shape):
    """The kernel on bf16 inputs against the reference on their float32 values: outputs and gradients."""
    dy = rnd(*dy_shape, seed=7).to(BF16)
    got = _grads(kernel, inputs, dy)
    want = _grads(reference, [t.float() if t.is_floating_point() else t for t in inputs], dy.float())
    for i, (g, w) in enumerate(zip((got[0], *got[1]), (want[0], *want[1]))):
        check(g, w, 0.0, rel_slack(w), what=f"{name} {'output' if i == 0 else f'grad {i}'}")
    return got[0]


def test_rms_norm_and_qk_norm(gpu_bf16):
    x = rnd(2, 7, 640, seed=1, scale=3.0).to(BF16)  # Gemma 3 270M's width
    w = rnd(640, seed=2, scale=0.1).to(BF16)  # a bf16 model's norm weight
    y = _against_truth("rms_norm", RN.rms_norm, RN.reference, [x, w], x.shape)
    same = (y == RN.reference(x, w)).float().mean().item()
    assert same > 0.99, f"the model's bf16 RMSNorm (float32, one rounding) agrees bit for bit on only {same:.1%}"
    qk = rnd(1, 9, 4, 256, seed=3, scale=2.0).to(BF16).transpose(1, 2)  # QK-norm: (B, H, T, D) view of (B, T, H, D)
    _against_truth("qk-norm", RN.rms_norm, RN.reference, [qk, rnd(256, seed=4, scale=0.1).to(BF16)], qk.shape)


def test_geglu(gpu_bf16):
    gate_up = rnd(2, 5, 2 * 1536, seed=5, scale=2.0).to(BF16)  # F = 1536: two 1024-wide blocks, the second partial
    _against_truth("geglu", GG.geglu, GG.reference, [gate_up], (2, 5, 1536))


@pytest.mark.parametrize("rotary_dim", [None, 128], ids=["full", "half (Griffin)"])
def test_rope(gpu_bf16, rotary_dim):
    x = rnd(2, 4, 9, 256, seed=6, scale=2.0).to(BF16)
    pos = torch.randint(100_000, 131_072, (2, 9), generator=torch.Generator().manual_seed(6))
    y = _against_truth("rope", lambda t: RP.rope(t, pos, rotary_dim), lambda t: RP.reference(t, pos, rotary_dim),
                       [x], x.shape)
    if rotary_dim:
        assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])  # passed through, bits untouched


def test_rglru_scan_gradients(gpu_bf16):
    """bf16 a and b: h is float32 (both sides keep a float32 state); da and db are stored in bf16."""
    g = torch.Generator().manual_seed(8)
    B, T, D = 2, 90, 48  # two chunks of 64 steps, the second partial
    a = torch.sigmoid(torch.randn(B, T, D, generator=g) + 2).to(BF16)
    b = torch.randn(B, T, D, generator=g).to(BF16)
    reset = torch.rand(B, T, generator=g) < 0.03
    dh = torch.randn(B, T, D, generator=g)
    got_h, got_g = _grads(lambda a_, b_: RS.rglru_scan(a_, b_, None, reset)[0], [a, b], dh)
    want_h, want_g = _grads(lambda a_, b_: RS.reference(a_, b_, None, reset)[0], [a.float(), b.float()], dh)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=rel_slack(want_h))  # float32: the float32 tolerance
    for which, gg, w in zip(("da", "db"), got_g, want_g):
        check(gg, w, 0.0, rel_slack(w), what=f"rglru {which}")


# --------------------------------------------------------------------------------------------
# GEMV (bf16 dots on the tensor cores) and the fused loss, at the GPU's configuration
# --------------------------------------------------------------------------------------------
@pytest.fixture
def gemv_as_on_h100(gpu_bf16, monkeypatch):
    """gemv_int8/gemv_int4 choose the H100's launch (bf16 dots, BLOCK_N 64, split-K from its SMs) and store
    bf16 themselves, as on a GPU (in the plain interpreter they write float32: its bf16 cast truncates)."""
    monkeypatch.setattr(GV, "_config", functools.partial(GV.launch_config, props=H100))
    monkeypatch.setattr(GV, "INTERPRET", False)


@pytest.mark.parametrize("N,K,M", [(128, 64, 2), (96, 1024, 3)], ids=["1 split, bias in the kernel", "16 splits"])
def test_gemv_at_the_h100_launch(gemv_as_on_h100, N, K, M):
    x = rnd(M, K, seed=M).to(BF16)
    for mod in (quant.Int8Linear.from_weight(rnd(N, K, seed=1), rnd(N, seed=2)),
                quant.Int4Linear.from_weight(rnd(N, K, seed=3), 32, rnd(N, seed=4))):
        block_k = 64 if isinstance(mod, quant.Int8Linear) else 32  # the launchers' K tiles (int4: the group's)
        cfg = GV.launch_config(M, N, K, BF16, None, block_k, None, None, props=H100)
        split = {(64, 64): 1, (64, 32): 2}.get((K, block_k), 16)  # K tiles, at most 16, at most 264 / tiles
        assert cfg[5] == tl.bfloat16 and cfg[3] == split  # the dot's dtype; 1 split: bias and bf16 store in-kernel
        y = GV.gemv(x, mod)
        want = GV.reference(x, mod)
        check(y, want, 0.0, rel_slack(want), what=type(mod).__name__)


def test_fused_loss_with_a_bf16_teacher_at_the_gpus_block(gpu_bf16):
    """The kernel's bf16 operand is a bf16 teacher's logits (read in the kernel), at BLOCK_V 4096: V = 5000 is
    a block and a tail. The student's bf16 head is multiplied in float32 on a CPU (on a GPU: cuBLAS, bf16)."""
    V, N, C, C_T = 5000, 6, 32, 16
    block_v = FL.launch_config(V, None, H100)[0]
    assert block_v == 4096
    h, w = rnd(N, C, seed=1).to(BF16), rnd(V, C, seed=2, scale=0.7).to(BF16)
    teacher = TeacherHead(rnd(N, C_T, seed=3).to(BF16), rnd(V, C_T, seed=4).to(BF16), 4.0)
    got = _grads(lambda h_, w_: FL.fused_linear_loss(h_, w_, teacher, 30.0, 4, block_v=block_v), [h, w],
                 torch.tensor(1.7))
    want = _grads(lambda h_, w_: losses.chunked_loss(h_, w_, teacher, 30.0, 4), [h.float(), w.float()],
                  torch.tensor(1.7))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for which, g, wt in zip(("d hidden", "d weight"), got[1], want[1]):
        check(g, wt, 0.0, rel_slack(wt), what=f"fused loss {which}")


# --------------------------------------------------------------------------------------------
# The checks can fail
# --------------------------------------------------------------------------------------------
def test_the_checks_fail_on_real_bf16_mistakes(monkeypatch):
    """The comparisons above reject real bf16 errors: the plain interpreter's (its integer dot in attention,
    its truncating cast in RMSNorm), and a reference that skips the rounding of the inputs; the errors they
    accept reach more than a quarter of the bound (no slack by orders of magnitude); and the bf16 kernel's
    own rounding of P is visible (a float32 run of the kernel on the same rounded inputs would not have it)."""
    monkeypatch.setattr(A, "INTERPRET", False)
    name, (B, H, K, T, D), spec = FORWARD[0]
    g = torch.Generator().manual_seed(0)
    x32 = [torch.randn(B, n, T, D, generator=g) for n in (H, K, K)]
    q, k, v = (t.to(BF16) for t in x32)
    want, e = _forward_bound(q, k, v, spec)
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # the integer dot overflows exp
        warnings.simplefilter("ignore")
        plain = _forward(q, k, v, spec)
    assert worst(plain, want, e, 1e-5) > 1e3  # the interpreter's own bf16 dot: garbage, caught
    x = rnd(2, 7, 640, seed=1, scale=3.0).to(BF16)
    w = rnd(640, seed=2, scale=0.1).to(BF16)
    truth = RN.reference(x.float(), w.float())
    assert worst(RN.rms_norm(x, w), truth, 0.0, rel_slack(truth)) > 1.5  # truncation: up to an ulp, not half

    with emulated_bf16():
        got = _forward(q, k, v, spec)
        assert worst(RN.rms_norm(x, w), truth, 0.0, rel_slack(truth)) <= 1.0
    r = worst(got, want, e, 1e-5)
    assert 0.25 < r <= 1.0  # what the test above asserts, and no loose bound: a quarter of it fails
    want_unrounded = A.reference(*x32, scale=0.3)  # the truth on the float32 inputs, before their rounding
    assert worst(got, want_unrounded, e, 1e-5) > 1.5  # the bound sees bf16's rounding of q, k, v
    # and the kernel's own bf16 rounding of P before P·V is there: the float32 kernel on the same rounded
    # inputs, its output rounded once, differs from the bf16 kernel in many elements
    f32 = _forward(q.float(), k.float(), v.float(), spec).to(BF16)
    assert (f32 != got).float().mean().item() > 0.05
