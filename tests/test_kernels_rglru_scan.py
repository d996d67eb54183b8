"""The chunked scan kernel (minigemma.kernels.rglru_scan) against minigemma.griffin.scan_sequential.

h_t = a_t · h_{t-1} + b_t with a zeroed at the resets (as minigemma.griffin.RGLRU does), and the
gradients wrt a, b and h0 against autograd through the sequential loop. Without a GPU the kernel
runs in Triton's interpreter on CPU, every launch bounds-checked; with one, the same tests run
there with float32 and bfloat16 inputs (the state is float32 either way).

Tolerances (|got − want| <= atol + rtol·|want|, atol scaled by the largest |want|):
- float32: rtol 1e-5, atol 1e-5·max|want|. The chunked scan composes chunks (A·h + H) where the
  loop steps one at a time: the same products and sums in another order, so float32 rounding
  differs by a few ulp per chunk boundary (measured ~1e-7 relative at T = 300).
- bfloat16 inputs (GPU only): both sides upcast the same bf16 values and keep a float32 state, so
  h and h_T keep the float32 tolerance; da and db are rounded to bf16 by the kernel and by
  autograd alike: rtol 1.6e-2 (torch's bf16 default), atol 1e-2·max|want|.
"""

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.kernels import bounds_checked
from minigemma.kernels.rglru_scan import reference, rglru_scan

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NO_BF16 = pytest.mark.skipif(not GPU, reason="Triton's interpreter has no bfloat16 arithmetic; bf16 runs on a GPU")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16", marks=NO_BF16)]
F32, BF16 = (1e-5, 1e-5), (1.6e-2, 1e-2)


def close(got, want, tol):
    rtol, atol = tol
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


CASES = {
    # name: (B, T, D, chunk, with_h0, resets)
    "T-past-chunk-boundaries-odd-D": (2, 37, 5, 8, True, []),
    "resets-mid-sequence-first-and-last-step": (1, 70, 37, 16, True, [0, 16, 17, 40, 69]),
    "one-chunk-two-D-blocks-no-h0": (2, 16, 130, 16, False, [5]),
    "T=1": (1, 1, 3, 8, True, []),
    "default-chunk-64": (1, 130, 8, 64, True, [64, 100]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_sequential_scan_forward_and_backward(name, dtype):
    B, T, D, chunk, with_h0, resets = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    a = torch.rand(B, T, D, generator=g) ** 0.1  # mostly near 1: long memories, large states
    b = torch.randn(B, T, D, generator=g)
    h0 = 3 * torch.randn(B, D, generator=g) if with_h0 else None
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, resets] = True
    a, b, reset = a.to(DEVICE, dtype), b.to(DEVICE, dtype), reset.to(DEVICE)
    h0 = None if h0 is None else h0.to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(7)
    dh, dh_last = torch.randn(B, T, D, generator=gen).to(DEVICE), torch.randn(B, D, generator=gen).to(DEVICE)

    results = []
    for fn, kw in ((rglru_scan, dict(chunk=chunk)), (reference, {})):
        ins = [t.detach().requires_grad_() if t is not None else None for t in (a, b, h0)]
        with bounds_checked():
            h, h_last = fn(*ins, reset=reset if resets else None, **kw)
            ((h * dh).sum() + (h_last * dh_last).sum()).backward()
        results.append((h, h_last, *[t.grad if t is not None else None for t in ins]))
    (h, h_last, da, db, dh0), (h_r, h_last_r, da_r, db_r, dh0_r) = results

    assert h.dtype == h_last.dtype == torch.float32 and h.shape == (B, T, D)
    assert torch.equal(h_last, h[:, -1])
    close(h, h_r, F32)
    close(h_last, h_last_r, F32)
    grad_tol = F32 if dtype == torch.float32 else BF16
    assert da.dtype == a.dtype and db.dtype == b.dtype
    close(da, da_r, grad_tol)
    close(db, db_r, grad_tol)
    if with_h0:
        close(dh0, dh0_r, grad_tol)
    if resets:  # a_t does not matter at a reset: no gradient reaches it
        assert (da[:, resets] == 0).all()


def test_gradient_through_the_final_state_only():
    """h_T alone in the loss: ∂L/∂h arrives as zeros; the reverse scan starts from ∂L/∂h_T."""
    g = torch.Generator().manual_seed(11)
    a, b, h0 = torch.rand(2, 20, 6, generator=g), torch.randn(2, 20, 6, generator=g), torch.randn(2, 6, generator=g)
    grads = []
    for fn, kw in ((rglru_scan, dict(chunk=8)), (reference, {})):
        ins = [t.clone().to(DEVICE).requires_grad_() for t in (a, b, h0)]
        with bounds_checked():
            fn(*ins, **kw)[1].pow(2).sum().backward()
        grads.append([t.grad for t in ins])
    for got, want in zip(*grads):
        close(got, want, F32)


def test_bad_inputs_are_clear_errors():
    a = torch.rand(1, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="bool"):
        rglru_scan(a, a, reset=torch.zeros(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        rglru_scan(a, a, chunk=12)
    with pytest.raises(ValueError, match=r"h0 must be \(1, 3\)"):
        rglru_scan(a, a, h0=torch.zeros(3, device=DEVICE))


def test_empty_sequence_keeps_the_initial_state():
    a = torch.rand(2, 0, 3, device=DEVICE, requires_grad=True)
    h0 = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    h, h_last = rglru_scan(a, a, h0)
    assert h.shape == (2, 0, 3) and torch.equal(h_last, h0)
    (2 * h_last).sum().backward()
    assert torch.equal(h0.grad, torch.full_like(h0, 2.0))
