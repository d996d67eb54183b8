"""Attention kernels (minigemma.kernels.attention) against the model's own attention, on fresh random inputs.

References, both package code: `kernels.attention.reference` is `minigemma.attention.attend` over
`attention_blocks` (what the model runs: fused SDPA, explicit soft-capped scores, query chunks); one
test also uses the readable `grouped_query_attention` with an `index_mask`, which shares nothing with
the blocks' planning. Gradients are checked against autograd through the reference.

Every mask the models use: causal, sliding windows (Gemma's W; Griffin's W + 1 is the same rule with
window = W + 1), Gemma 2's soft-cap, an encoder's bidirectional band and its padding as documents,
left padding (the packed-positions rule), a chunk after a cache (queries and keys at offsets), and
the decode kernel over a static cache and through a ring buffer that has wrapped, split over programs.
Shapes are tiny, with 16 × 16 tiles, so that several query and key blocks (and partial ones) occur.

Tolerances, |got − want| ≤ atol + rtol·|want|:
- float32 (the interpreter on CPU; a GPU too, where tl.dot runs with input_precision="ieee"): outputs
  rtol 1e-5, atol 1e-5; gradients rtol 1e-5, atol 1e-5·max|want|. The kernel computes the same
  float32 formula in another order (an online softmax over tiles, exp of shifted scores, the
  soft-cap's tanh from one exp); measured errors are 2e-7 to 1e-6. Any wrong mask entry or term moves
  the result by 1e-2 or more.
- bfloat16 (GPU only; the interpreter computes bfloat16 wrongly, so those cases are skipped on CPU):
  against the float32 reference on the same bf16 inputs, atol 2e-2, rtol 2e-2: P is rounded to bf16
  before P·V (as SDPA does) and the output once more, 2 to 3 ulp of bf16 at |out| ~ 1.
"""

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.attention import KVCache, RingKVCache, grouped_query_attention, index_mask
from minigemma.encoder import document_ids
from minigemma.kernels import attention as A
from minigemma.kernels import bounds_checked

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEV != "cuda", reason="bfloat16 needs a GPU: Triton's interpreter has no bfloat16")
B = 16  # tile size used on CPU (the kernels' interpreter default) and forced on a GPU, so blocks match


def _qkv(B_, H, K, T, S, D, seed, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B_, n, L, D, generator=g).to(DEV, dtype) for n, L in ((H, T), (K, S), (K, S)))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _left_padded_positions(T, pads):
    """(len(pads), T) positions of left-padded rows: pads at 0 (one-token documents), then 0, 1, 2, ..."""
    rows = [[0] * p + list(range(T - p)) for p in pads]
    return torch.tensor(rows, device=DEV)


def _encoder_documents(T):
    m = torch.ones(2, T, dtype=torch.bool)
    m[0, T - 9:] = False  # right padding
    m[1, :5] = False  # left padding
    return document_ids(m).to(DEV)


# (name, (B, H, K, T, S, D), kwargs of flash_attention); S = None: the keys are the queries
CASES = [
    ("causal, GQA 4:2", (2, 4, 2, 37, None, 16), {}),
    ("causal, MQA, D = 24", (1, 4, 1, 33, None, 24), {}),
    ("causal, MHA", (1, 2, 2, 20, None, 16), {}),
    ("window 7 (Gemma)", (2, 4, 2, 45, None, 16), dict(window=7)),
    ("window 5 = W + 1 (Griffin's edge), MQA", (1, 2, 1, 40, None, 32), dict(window=5)),
    ("soft-cap 2, window 9", (1, 4, 2, 35, None, 16), dict(window=9, softcap=2.0)),
    ("soft-cap 2, causal", (1, 2, 1, 30, None, 16), dict(softcap=2.0)),
    ("bidirectional", (1, 4, 2, 29, None, 16), dict(causal=False)),
    ("bidirectional band 6", (2, 4, 2, 50, None, 16), dict(causal=False, window=6)),
    ("band 4 with padding as documents", (2, 2, 1, 30, None, 16), dict(causal=False, window=4, documents="enc")),
    ("global encoder layer with padding", (2, 2, 1, 30, None, 16), dict(causal=False, documents="enc")),
    ("left padding (packed rule), window 9", (2, 4, 2, 40, None, 16), dict(window=9, positions=(0, 19))),
    ("left padding, causal, soft-cap", (2, 2, 1, 36, None, 16), dict(softcap=3.0, positions=(17, 2))),
    ("a chunk after a ring's 7 keys, window 8", (2, 4, 2, 20, 27, 16), dict(window=8, q_start=10, k_first=3)),
    ("a chunk after 12 cached keys, global", (1, 2, 1, 18, 30, 16), dict(q_start=12, k_first=0)),
]


def _kwargs(spec, shape):
    B_, H, K, T, S, D = shape
    kw = dict(spec)
    if kw.get("documents") == "enc":
        kw["documents"] = _encoder_documents(T)
    if "positions" in kw:
        kw["positions"] = _left_padded_positions(T, kw["positions"])
    return kw


@pytest.mark.parametrize("name,shape,spec", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_the_models_attention(name, shape, spec):
    B_, H, K, T, S, D = shape
    q, k, v = _qkv(B_, H, K, T, S or T, D, seed=sum(map(ord, name)))
    kw = _kwargs(spec, shape)
    with bounds_checked():
        got = A.flash_attention(q, k, v, scale=0.3, block_m=B, block_n=B, **kw)
    want = A.reference(q, k, v, scale=0.3, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_matches_the_readable_reference():
    """grouped_query_attention (repeat_kv, masked softmax) with index_mask: no block planning involved."""
    q, k, v = _qkv(2, 4, 2, 26, 31, 16, seed=7)
    positions = _left_padded_positions(26, (0, 6)) + torch.tensor([[5], [0]], device=DEV)  # row 0 continues a doc
    with bounds_checked():
        got = A.flash_attention(q, k, v, scale=0.25, softcap=4.0, window=6, q_start=5, k_first=0,
                                positions=positions)
    mask = index_mask(torch.arange(5, 31, device=DEV), torch.arange(31, device=DEV), 6, q_pos=positions)
    want = grouped_query_attention(q, k, v, mask, scale=0.25, softcap=4.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _tiles(T, block, **mask):
    q, k, v = _qkv(1, 1, 1, T, T, 16, seed=T)
    tiles = torch.zeros(1, T // block, dtype=torch.int32, device=DEV)
    A.flash_attention_forward(q, k, v, A.Mask(**mask), 0.25, block_m=block, block_n=block, tiles=tiles)
    return tiles[0].tolist()


def test_blocks_outside_the_window_are_skipped_so_cost_follows_w_not_t():
    for kw in (dict(window=16), dict(causal=False, window=16)):
        short, long = _tiles(64, 16, **kw), _tiles(128, 16, **kw)
        assert max(short) == max(long) <= 3, (kw, short, long)  # (W - 1 + BLOCK_M) / BLOCK_N rounded up, + 1
        assert sum(long) <= 3 * len(long)  # total work grows with T · W, not T²
    causal = _tiles(128, 16)
    assert causal == list(range(1, 9))  # a global causal block reads every tile up to its diagonal


def test_left_padding_skips_the_tiles_of_the_pads():
    positions = _left_padded_positions(64, (32,))
    full = _tiles(64, 16)
    q, k, v = _qkv(1, 1, 1, 64, 64, 16, seed=3)
    tiles = torch.zeros(1, 4, dtype=torch.int32, device=DEV)
    A.flash_attention_forward(q, k, v, A.Mask(positions=positions), 0.25, block_m=16, block_n=16, tiles=tiles)
    assert tiles[0].tolist() == [1, 1, 1, 2] and full == [1, 2, 3, 4]  # real tokens never read the pads' tiles


DECODE = [
    ("global cache of 50, GQA 4:2", dict(H=4, K=2, S=50), {}),
    ("global cache, MQA 8:1, soft-cap", dict(H=8, K=1, S=70), dict(softcap=3.0)),
    ("window 20 over in-order keys", dict(H=4, K=2, S=50), dict(window=20)),
    ("left-padded rows (packed rule)", dict(H=2, K=1, S=40), dict(positions=((10,), (39,)))),
]


@pytest.mark.parametrize("name,dims,spec", DECODE, ids=[c[0] for c in DECODE])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_matches_the_models_attention(name, dims, spec, splits):
    H, K, S = dims["H"], dims["K"], dims["S"]
    q, k, v = _qkv(2, H, K, 1, S, 16, seed=S + H)
    kw = dict(spec)
    if "positions" in kw:
        kw["positions"] = torch.tensor(kw["positions"], device=DEV)
    with bounds_checked():
        got = A.decode_attention(q, k, v, q_index=S - 1, scale=0.3, splits=splits, block_n=B, **kw)
    want = A.reference(q, k, v, scale=0.3, q_start=S - 1, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_decode_through_a_wrapped_ring_buffer(packed):
    """A RingKVCache fed past its size holds its window in rotated slots; the kernel reads their indices."""
    Bq, H, K, D, W = 2, 4, 2, 16, 12
    g = torch.Generator().manual_seed(11)
    cache = RingKVCache(Bq, K, D, window=W, device=DEV)
    cache.update(*(torch.randn(Bq, K, 17, D, generator=g).to(DEV) for _ in range(2)))  # 17 > 12: wrapped
    for _ in range(3):
        q = torch.randn(Bq, H, 1, D, generator=g).to(DEV)
        k_all, v_all, keys = cache.update(*(torch.randn(Bq, K, 1, D, generator=g).to(DEV) for _ in range(2)))
        assert not keys.in_order
        i = cache.length - 1
        positions = torch.tensor([[5], [i]], device=DEV) if packed else None  # row 0's document began at i - 5
        kw = dict(scale=0.3, window=W, k_first=keys.first, k_index=keys.index(), positions=positions)
        with bounds_checked():
            got = A.decode_attention(q, k_all, v_all, q_index=i, splits=2, block_n=8, **kw)
        torch.testing.assert_close(got, A.reference(q, k_all, v_all, q_start=i, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_decode_with_the_index_on_the_device(packed):
    """A graph-shaped step (q_index a (1,) tensor): the kernel sees the whole static buffer, hides the slots
    not yet written by the causal rule, and derives a ring's slot indices from the index, before the ring
    fills and after it wraps. The same launch arguments at every step; the reference is given the live
    keys and their indices as the cache itself reports them."""
    Bq, H, K, D, W, L = 2, 4, 2, 16, 12, 40
    g = torch.Generator().manual_seed(12)
    ring, static = RingKVCache(Bq, K, D, window=W, device=DEV), KVCache(Bq, K, D, max_len=L, device=DEV)
    index = torch.zeros(1, dtype=torch.long, device=DEV)
    for i in range(L):
        q = torch.randn(Bq, H, 1, D, generator=g).to(DEV)
        kv = [torch.randn(Bq, K, 1, D, generator=g).to(DEV) for _ in range(2)]
        k_ring, v_ring, keys = ring.update(*kv)
        k_all, v_all, _ = static.update(*kv)
        if i not in (0, 5, 11, 12, 13, 30, 39):
            continue
        index.fill_(i)
        positions = torch.tensor([[min(i, 5)], [i]], device=DEV) if packed else None
        for cache, window, want_k, want_v, k_index in ((static, None, k_all, v_all, None),
                                                       (ring, W, k_ring, v_ring, keys.index())):
            with bounds_checked():
                got = A.decode_attention(q, cache.k, cache.v, q_index=index, ring=cache is ring, window=window,
                                         scale=0.3, positions=positions, splits=3, block_n=8)
            in_order = cache is static or keys.in_order
            want = A.reference(q, want_k, want_v, scale=0.3, window=window, q_start=i,
                               k_index=None if in_order else k_index, positions=positions)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}, {type(cache).__name__}: {m}")


def test_a_device_index_is_checked():
    q, k, v = _qkv(1, 2, 1, 1, 8, 16, seed=0)
    with pytest.raises(ValueError, match="q_index tensor must be"):
        A.decode_attention(q, k, v, q_index=torch.zeros(2, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="k_index"):
        A.decode_attention(q, k, v, q_index=7, ring=True)


GRADS = [
    ("causal, GQA", (2, 4, 2, 29, None, 16), {}),
    ("window 5, soft-cap 2", (1, 4, 2, 35, None, 16), dict(window=5, softcap=2.0)),
    ("band 4 with documents", (2, 2, 1, 30, None, 16), dict(causal=False, window=4, documents="enc")),
    ("left padding, window 9", (2, 2, 1, 33, None, 16), dict(window=9, positions=(0, 12))),
    ("a chunk after cached keys, D = 24", (1, 2, 1, 20, 27, 24), dict(window=8, q_start=10, k_first=3)),
]


@pytest.mark.parametrize("name,shape,spec", GRADS, ids=[c[0] for c in GRADS])
def test_gradients_match_autograd(name, shape, spec):
    B_, H, K, T, S, D = shape
    q, k, v = _qkv(B_, H, K, T, S or T, D, seed=len(name), grad=True)
    kw = _kwargs(spec, shape)
    dout = torch.randn(B_, H, T, D, generator=torch.Generator().manual_seed(1)).to(DEV)
    with bounds_checked():
        got = torch.autograd.grad(A.flash_attention(q, k, v, scale=0.3, block_m=B, block_n=B, **kw), (q, k, v), dout)
    want = torch.autograd.grad(A.reference(q, k, v, scale=0.3, **kw), (q, k, v), dout)
    for which, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=lambda m: f"d{which}: {m}")


@GPU_ONLY
@pytest.mark.parametrize("name,shape,spec", CASES[:12:3], ids=[c[0] for c in CASES[:12:3]])
def test_bfloat16_on_a_gpu(name, shape, spec):
    B_, H, K, T, S, D = shape
    q, k, v = _qkv(B_, H, K, T, S or T, D, seed=5, dtype=torch.bfloat16, grad=True)
    kw = _kwargs(spec, shape)
    got = A.flash_attention(q, k, v, scale=0.3, **kw)
    want = A.reference(q.float(), k.float(), v.float(), scale=0.3, **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    dout = torch.randn_like(got)
    g = torch.autograd.grad(got, (q, k, v), dout)
    w = torch.autograd.grad(want, (q, k, v), dout.float())
    for a, b in zip(g, w):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    if kw.get("causal", True) and "documents" not in kw:  # the last query alone, through the decode kernel
        q1, k1, v1 = q[:, :, -1:].detach(), k.detach(), v.detach()
        same = {n: kw[n] for n in ("softcap", "window", "k_first") if n in kw}
        if "positions" in kw:
            same["positions"] = kw["positions"][:, -1:]
        i = T - 1 + kw.get("q_start", 0)
        got1 = A.decode_attention(q1, k1, v1, q_index=i, scale=0.3, **same)
        want1 = A.reference(q1.float(), k1.float(), v1.float(), scale=0.3, q_start=i, **same)
        torch.testing.assert_close(got1.float(), want1, rtol=2e-2, atol=2e-2)


def test_bad_inputs_get_clear_errors():
    q, k, v = _qkv(1, 3, 2, 5, 5, 16, seed=0)
    with pytest.raises(ValueError, match="multiple of the 2 key/value heads"):
        A.flash_attention(q, k, v)
    q, k, v = _qkv(1, 2, 1, 5, 5, 16, seed=0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        A.flash_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"positions must be a \(1, 5\) integer tensor"):
        A.flash_attention(q, k, v, positions=torch.zeros(1, 4, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="one query per row"):
        A.decode_attention(q, k, v, q_index=4)
    with pytest.raises(ValueError, match="head_dim 512"):
        A.flash_attention(*_qkv(1, 1, 1, 2, 2, 512, seed=0))
    with pytest.raises(ValueError, match="keys in index order"):
        A.flash_attention_forward(q, k, v, A.Mask(k_index=torch.arange(5, device=DEV)), 0.25)


@pytest.mark.skipif(DEV == "cuda", reason="checks the interpreter's refusal of bfloat16")
def test_the_interpreter_refuses_bfloat16_rather_than_computing_it_wrongly():
    q, k, v = _qkv(1, 2, 1, 5, 5, 16, seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter computes torch.bfloat16 wrongly"):
        A.flash_attention(q, k, v)


@pytest.mark.parametrize("splits", [3, 5])
def test_decode_combines_more_splits_than_it_reads_at_once(monkeypatch, splits):
    """The combine kernel reads COMBINE_SPLITS partial results at a time (an online softmax over the
    splits): with 2 at a time, 3 and 5 splits take several trips, the last one partly masked."""
    monkeypatch.setattr(A, "COMBINE_SPLITS", 2)
    q, k, v = _qkv(2, 4, 2, 1, 90, 16, seed=7)
    with bounds_checked():
        got = A.decode_attention(q, k, v, q_index=89, scale=0.3, splits=splits, block_n=B, window=70)
    want = A.reference(q, k, v, scale=0.3, q_start=89, window=70)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
