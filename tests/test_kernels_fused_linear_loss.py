"""The fused, chunked LM head + loss (minigemma.kernels.fused_linear_loss) against minigemma.losses.

Two references, both from the package: `losses.chunked_loss` (same signature; gradients in closed
form) and the plain full-logit losses `cross_entropy`, `sampled_kd_loss`, `kd_loss` on
`layers.soft_cap(h @ W.T)` differentiated by autograd. Every target kind (Labels with ignored rows,
Sampled with masked rows, TeacherHead with its own soft-cap and mask), soft-cap on and off, sizes that
are not powers of two: V = 300 in vocabulary blocks of 128 (a tail of 44), rows in chunks of 4 (a
tail of 3). Without a GPU the kernel runs in Triton's interpreter, bounds-checked.

Tolerances (|got − want| <= atol + rtol·|want|, atol scaled by max|want|):
- float32: rtol 1e-5, atol 1e-5·max. The same float32 formula in another order: the online
  log-sum-exp rescales partial sums block by block, the loss is summed per row then over rows, the
  weight gradient per chunk. Measured errors are below 1e-6 relative to the largest value.
- bfloat16 (GPU only; the interpreter has no bf16 arithmetic): the loss to rtol 1e-4 (the logits are
  float32 products of the same bf16 values, as in the reference); gradients rtol 1.6e-2 and atol
  1e-2·max (dz is rounded to bf16 before the two backward products, and the result to bf16).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma import losses
from minigemma.kernels import bounds_checked
from minigemma.kernels.fused_linear_loss import fused_linear_cross_entropy, fused_linear_loss, per_token_nll
from minigemma.layers import soft_cap
from minigemma.losses import IGNORE, Labels, Sampled, TeacherHead

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
N, C, V, C_T, K = 11, 24, 300, 16, 13  # rows, width, vocabulary, teacher width, sampled ids per row
CHUNK, BLOCK_V = 4, 128


def close(got, want, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


def make(kind: str, softcap, seed: int, dtype=torch.float32):
    """(hidden, weight, target, full-logit reference loss as a function of (hidden, weight))."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).to(DEVICE, dtype)
    w = (0.7 * torch.randn(V, C, generator=g)).to(DEVICE, dtype)
    scored = torch.rand(N, generator=g) > 0.25
    scored[0] = True
    if kind == "labels":
        y = torch.randint(0, V, (N,), generator=g)
        y[~scored] = IGNORE
        y[1] = V - 1  # the last id, in the vocabulary's tail block
        y = y.to(DEVICE)
        return h, w, Labels(y), lambda hh, ww: losses.cross_entropy(soft_cap(hh @ ww.T, softcap), y)
    if kind == "sampled":
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]).to(DEVICE)
        wts = torch.softmax(torch.randn(N, K, generator=g), -1).to(DEVICE)
        mask = scored.to(DEVICE)
        return h, w, Sampled(ids, wts, mask), \
            lambda hh, ww: losses.sampled_kd_loss(soft_cap(hh @ ww.T, softcap), ids, wts, mask)
    ht = torch.randn(N, C_T, generator=g).to(DEVICE, dtype)
    wt = torch.randn(V, C_T, generator=g).to(DEVICE, dtype)
    cap_t = 4.0 if softcap else None  # the teacher's own cap, independent of the student's
    mask = scored.to(DEVICE)
    return h, w, TeacherHead(ht, wt, cap_t, mask), \
        lambda hh, ww: losses.kd_loss(soft_cap(hh @ ww.T, softcap), soft_cap(ht @ wt.T, cap_t), mask)


def run(fn, h, w, target, softcap, reduction="mean", **kw):
    """(loss, d hidden, d weight) of fn, for a random upstream gradient (not 1: the backward must scale)."""
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    with bounds_checked():
        loss = fn(hh, ww, target, softcap, CHUNK, reduction, **kw)
        (loss * 1.7).backward()
    return loss.detach(), hh.grad, ww.grad


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["no-cap", "soft-cap-5"])
@pytest.mark.parametrize("kind", ["labels", "sampled", "teacher"])
def test_matches_chunked_loss_and_autograd_of_the_full_logits(kind, softcap):
    h, w, target, full = make(kind, softcap, seed=hash((kind, softcap)) % 2**31)
    got = run(fused_linear_loss, h, w, target, softcap, block_v=BLOCK_V)
    want = run(losses.chunked_loss, h, w, target, softcap)
    for a, b in zip(got, want):
        close(a, b)
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = full(hh, ww)
    (loss * 1.7).backward()
    for a, b in zip(got, (loss.detach(), hh.grad, ww.grad)):
        close(a, b)


@pytest.mark.parametrize("kind", ["labels", "teacher"])
def test_sum_reduction_and_a_frozen_head(kind):
    """reduction="sum" (gradient accumulation) is the mean times the scored rows; a head that needs no
    gradient gets none, and the hidden states' gradient is unchanged."""
    h, w, target, _ = make(kind, 30.0, seed=7)
    total = fused_linear_loss(h, w, target, 30.0, CHUNK, "sum", block_v=BLOCK_V)
    mean = fused_linear_loss(h, w, target, 30.0, CHUNK, "mean", block_v=BLOCK_V)
    close(total, mean * target.count())
    hh = h.detach().requires_grad_()
    fused_linear_loss(hh, w, target, 30.0, CHUNK, block_v=BLOCK_V).backward()
    hr = h.detach().requires_grad_()
    losses.chunked_loss(hr, w, target, 30.0, CHUNK).backward()
    assert w.grad is None
    close(hh.grad, hr.grad)


def test_stable_for_huge_logits_and_every_row_ignored():
    """Logits of ±1000 (no cap): the online max keeps exp in range. A batch with nothing scored: 0, no NaN."""
    h, w, target, full = make("labels", None, seed=3)
    got = run(fused_linear_loss, 40 * h, 40 * w, target, None, block_v=BLOCK_V)
    assert all(torch.isfinite(t).all() for t in got)
    want = run(losses.chunked_loss, 40 * h, 40 * w, target, None)
    for a, b in zip(got, want):
        close(a, b)
    none = Labels(torch.full((N,), IGNORE, device=DEVICE))
    loss, dh, dw = run(fused_linear_loss, h, w, none, None, block_v=BLOCK_V)
    assert loss.item() == 0 and not dh.any() and not dw.any()


class LogitsRows(TorchDispatchMode):
    """The most rows of any logits-shaped tensor (..., V) that a torch op creates inside the block, and the
    largest tensor of any shape (elements). Views (W.T, slices) allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.rows = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.dim() >= 2 and t.shape[-1] == V:
                    self.rows = max(self.rows, t.numel() // V)
        return out


def test_never_allocates_the_logits_of_all_rows():
    """Forward and backward create no (rows, V) tensor with more rows than a chunk (student's or teacher's
    logits), and nothing larger than the (V, C) weight gradient itself, while the full-logit loss creates
    N × V ones (which shows the counter sees them). The kernel's own working set is one block of BLOCK_V
    values per row, in registers (numpy arrays in the interpreter)."""
    h, w, target, full = make("teacher", 30.0, seed=5)
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    with LogitsRows() as fused:
        fused_linear_loss(hh, ww, target, 30.0, CHUNK, block_v=BLOCK_V).backward()
    with LogitsRows() as eager:
        full(hh, ww).backward()
    assert eager.rows == N, eager.rows
    assert fused.rows == CHUNK, (fused.rows, CHUNK)
    assert fused.largest == V * C, (fused.largest, V * C)  # dW


def test_per_token_nll_matches_the_package():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(2, 5, C, generator=g).to(DEVICE)
    w = torch.randn(V, C, generator=g).to(DEVICE)
    y = torch.randint(0, V, (2, 5), generator=g).to(DEVICE)
    with bounds_checked():
        got = per_token_nll(h, w, y, softcap=30.0, chunk=3)
    assert got.shape == (2, 5)
    close(got, losses.per_token_nll(h, w, y, softcap=30.0))


def test_cross_entropy_wrapper_and_bad_input():
    h, w, target, full = make("labels", None, seed=2)
    close(fused_linear_cross_entropy(h, w, target.targets, None, CHUNK), full(h, w))
    with pytest.raises(TypeError, match="Labels, Sampled or TeacherHead"):
        fused_linear_loss(h, w, target.targets, None, CHUNK)
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 300\)"):
        fused_linear_cross_entropy(h, w, torch.full((N,), V, device=DEVICE))
    ids = torch.zeros(N, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="distinct"):
        fused_linear_loss(h, w, Sampled(ids, torch.full((N, 3), 1 / 3, device=DEVICE)))
    with pytest.raises(ValueError, match="rows"):
        fused_linear_loss(h[:5], w, target)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_loss(h, w, target, reduction="max")


@pytest.mark.skipif(not GPU, reason="Triton's interpreter has no bfloat16 arithmetic; bf16 runs on a GPU")
@pytest.mark.parametrize("kind", ["labels", "sampled", "teacher"])
def test_bf16_head_on_gpu(kind):
    h, w, target, _ = make(kind, 30.0, seed=9, dtype=torch.bfloat16)
    got = run(fused_linear_loss, h, w, target, 30.0)
    want = run(losses.chunked_loss, h, w, target, 30.0)
    close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == torch.bfloat16
        close(a, b, rtol=1.6e-2, atol=1e-2)
