"""The GeGLU kernel (minigemma.kernels.geglu) against gelu_tanh(gate) · up and its autograd.

The input is the MLP's fused projection gate_up (..., 2F), gate the first half. Without a GPU the
kernel runs in Triton's interpreter on CPU, every launch bounds-checked; with one, the same tests
run there in float32 and bfloat16.

Tolerances (|got − want| <= atol + rtol·|want|, atol scaled by the largest |want|):
- float32: rtol 1e-5, atol 1e-5·max|want|. The kernel computes tanh from exp(−2|u|) and the
  derivative by its closed form, torch uses its own tanh and autograd: float32 rounding
  differences of a few ulp (measured < 1e-6 relative).
- bfloat16 (GPU only): rtol 1.6e-2 (torch's bf16 default, ~4 ulp), atol 1e-2·max|want|. The
  reference rounds gelu(gate) to bf16 before multiplying by up (two roundings, and more in its
  backward); the kernel rounds once.
"""

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.kernels import bounds_checked
from minigemma.kernels.geglu import geglu, reference

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NO_BF16 = pytest.mark.skipif(not GPU, reason="Triton's interpreter has no bfloat16 arithmetic; bf16 runs on a GPU")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16", marks=NO_BF16)]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


def run_both(gate_up):
    out = []
    dy = None
    for fn in (geglu, reference):
        gu = gate_up.detach().requires_grad_()
        with bounds_checked():
            y = fn(gu)
            if dy is None:
                dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
            y.backward(dy)
        out.append((y, gu.grad))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2 * 37), (2, 5, 2 * 100), (3, 2 * 1100)],
                         ids=["odd-F", "rows-past-a-block", "F-past-a-column-block"])
def test_matches_reference_forward_and_backward(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    gate_up = (2 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    (y, dgu), (y_ref, dgu_ref) = run_both(gate_up)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype and dgu.shape == gate_up.shape
    close(y, y_ref, dtype)
    close(dgu, dgu_ref, dtype)


def test_rows_with_a_stride_and_saturated_tanh():
    """gate_up as a slice of a wider buffer (row stride != 2F), and |gate| up to 40 where tanh is ±1."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 2 * 21 + 5, generator=g).to(DEVICE)
    wide[:, :21] *= 20
    gate_up = wide[:, : 2 * 21]
    assert gate_up.stride(0) != 2 * 21
    (y, dgu), (y_ref, dgu_ref) = run_both(gate_up)
    assert torch.isfinite(y).all() and torch.isfinite(dgu).all()
    close(y, y_ref, torch.float32)
    close(dgu, dgu_ref, torch.float32)


def test_odd_last_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="even last dim"):
        geglu(torch.randn(2, 7, device=DEVICE))
