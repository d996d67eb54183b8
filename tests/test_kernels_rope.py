"""The RoPE kernel (minigemma.kernels.rope) against minigemma.layers' RoPE and its autograd.

Reference: apply_rope(x, *rope_cos_sin(positions, rope_frequencies(rotary_dim, base, scaling))).
Without a GPU the kernel runs in Triton's interpreter on CPU, every launch bounds-checked; with
one, the same tests run there in float32 and bfloat16.

Tolerances (|got − want| <= atol + rtol·|want|, atol scaled by the largest |want|):
- float32: rtol 1e-5, atol 1e-5·max|want|. The angle p·θ is the same float32 product on both
  sides; the kernel reduces it modulo 2π (three-part Cody-Waite, ~1 ulp) before cos and sin, and
  the two cos/sin implementations differ by an ulp or two: measured < 5e-7 absolute for |x| ~ 4,
  even at positions near 131,072.
- bfloat16 (GPU only): rtol 1.6e-2 (torch's bf16 default, ~4 ulp), atol 1e-2·max|want|; both
  sides compute in float32 and round once.
"""

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.kernels import bounds_checked
from minigemma.kernels.rope import reference, rope

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NO_BF16 = pytest.mark.skipif(not GPU, reason="Triton's interpreter has no bfloat16 arithmetic; bf16 runs on a GPU")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16", marks=NO_BF16)]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


def run_both(x, positions, **kw):
    out = []
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    for fn in (rope, reference):
        xi = x.detach().requires_grad_()
        with bounds_checked():
            y = fn(xi, positions, **kw)
            y.backward(dy)
        out.append((y, xi.grad))
    return out


CASES = {
    # name: (B, H, T, D, rotary_dim, base, scaling, positions)
    "full-rotary-odd-T": (2, 3, 37, 16, None, 10_000.0, 1.0, "arange"),
    "gemma-head-dim-256-T-past-a-block": (1, 2, 37, 256, None, 10_000.0, 1.0, "arange"),
    "griffin-half-rotary-odd-pairs": (2, 2, 11, 20, 10, 10_000.0, 1.0, "arange"),
    "global-1M-base-scaling-8-batched-positions": (2, 2, 13, 16, None, 1_000_000.0, 8.0, "batched"),
    "large-positions": (1, 1, 50, 16, None, 10_000.0, 1.0, "large"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_forward_and_backward(name, dtype):
    B, H, T, D, rotary_dim, base, scaling, kind = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    x = (2 * torch.randn(B, H, T, D, generator=g)).to(DEVICE, dtype)
    if kind == "arange":
        pos = torch.arange(T)
    elif kind == "batched":  # (B, T), not contiguous, not increasing
        pos = torch.randint(0, 5000, (B, 2 * T), generator=g)[:, ::2]
        assert not pos.is_contiguous()
    else:
        pos = torch.randint(100_000, 131_072, (T,), generator=g)
    pos = pos.to(DEVICE)
    (y, dx), (y_ref, dx_ref) = run_both(x, pos, rotary_dim=rotary_dim, base=base, scaling=scaling)
    assert y.shape == x.shape and y.dtype == dtype
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)
    if rotary_dim is not None:  # the dims past rotary_dim pass through untouched
        assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])


def test_transposed_view_of_the_projection():
    """q as (B, H, T, D) is a transposed view of (B, T, H, D): read in place."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 3, 16, generator=g).to(DEVICE).transpose(1, 2)
    (y, dx), (y_ref, dx_ref) = run_both(x, torch.arange(9, device=DEVICE))
    close(y, y_ref, torch.float32)
    close(dx, dx_ref, torch.float32)


def test_bad_positions_are_clear_errors():
    x = torch.randn(1, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="positions must be"):
        rope(x, torch.arange(6, device=DEVICE))
    with pytest.raises(ValueError, match="integers"):
        rope(x, torch.arange(5, device=DEVICE).float())
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        rope(x, torch.arange(5, device=DEVICE), rotary_dim=5)
