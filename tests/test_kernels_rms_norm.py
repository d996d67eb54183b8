"""The RMSNorm kernel (minigemma.kernels.rms_norm) against minigemma.layers.RMSNorm and its autograd.

Without a GPU the kernel runs in Triton's interpreter on CPU (importing minigemma.kernels sets
TRITON_INTERPRET=1 before Triton is imported), every launch bounds-checked; with a GPU the same
tests run there in float32 and bfloat16.

Tolerances (|got − want| <= atol + rtol·|want|, atol scaled by the largest |want|):
- float32: rtol 1e-5, atol 1e-5·max|want|. Both sides compute the same float32 formula; they differ
  only in summation order (pairwise vs blocked reductions, dw summed per program then across
  programs) and in rsqrt (a GPU's is approximate to about 2 ulp): measured errors are about 1e-7
  relative, so 1e-5 (~100 ulp) leaves room and still catches any wrong term.
- bfloat16 (GPU only): rtol 1.6e-2 (torch's default for bf16, about 4 ulp of its 8-bit mantissa),
  atol 1e-2·max|want|. Both sides work in float32 and round once, so they differ by at most one
  rounding step of the output.
"""

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.kernels import bounds_checked
from minigemma.kernels.rms_norm import RMSNorm, rms_norm, reference
from minigemma.layers import RMSNorm as TorchRMSNorm

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NO_BF16 = pytest.mark.skipif(not GPU, reason="Triton's interpreter has no bfloat16 arithmetic; bf16 runs on a GPU")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16", marks=NO_BF16)]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}  # (rtol, atol as a fraction of max|want|)


def close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


def run_both(x, w, eps=1e-6):
    """(y, dx, dw) from the kernel and from the reference, for one random upstream gradient."""
    out = []
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    for fn in (rms_norm, reference):
        xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
        with bounds_checked():
            y = fn(xi, wi, eps)
            y.backward(dy)
        out.append((y, xi.grad, wi.grad))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (3, 50, 100), (2, 5, 640), (5, 3)],
                         ids=["odd-C", "rows-past-a-block", "gemma3-270m-hidden", "C=3"])
def test_matches_reference_forward_and_backward(shape, dtype):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    w = torch.randn(shape[-1], generator=g).to(DEVICE, dtype)  # not zeros: (1 + w) must matter
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_both(x, w)
    assert y.dtype == dtype and y.shape == x.shape and dw.dtype == w.dtype
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_over_heads_of_a_transposed_view(dtype):
    """Gemma 3's QK-norm: q (B, H, T, D) is a transposed view of the (B, T, H·D) projection; one w."""
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 9, 3, 48
    q = torch.randn(B, T, H * D, generator=g).to(DEVICE, dtype).view(B, T, H, D).transpose(1, 2)
    assert not q.is_contiguous()
    w = torch.randn(D, generator=g).to(DEVICE, dtype)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_both(q, w, eps=1e-5)
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)


def test_zero_rows_stay_finite():
    x = torch.zeros(4, 33, device=DEVICE)
    x[1] = 1e-3  # tiny rows: eps dominates the mean
    w = torch.randn(33, device=DEVICE)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_both(x, w)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    close(y, y_ref, torch.float32)
    close(dx, dx_ref, torch.float32)


def test_module_is_a_drop_in_for_the_package_norm():
    ref = TorchRMSNorm(40, eps=1e-6).to(DEVICE)
    torch.nn.init.normal_(ref.weight)
    ours = RMSNorm(40, eps=1e-6).to(DEVICE)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 3, 40, device=DEVICE)
    with bounds_checked():
        close(ours(x), ref(x), torch.float32)


def test_bad_weight_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight shape \(8,\) != \(9,\)"):
        rms_norm(torch.randn(2, 9, device=DEVICE), torch.randn(8, device=DEVICE))
