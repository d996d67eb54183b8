"""`minigemma.kernels.gpu_report`: a kernel of the learner's, compiled for an H100 with no GPU, and its report.

The facts come from the real compiler (Triton for sm_90, then `ptxas -v`); the tests check that each one moves
the way the hardware says it must, on kernels written here: a contiguous copy gets 16-byte loads and a strided
one does not; a 256 × 256 float32 accumulator on 4 warps (512 values a thread) spills; three stages of
128 × 256 × 128 bf16 tiles (288 KiB) exceed the 227 KiB one program may have; each stage adds one buffer of
both tiles; a kernel that reads a notebook global does not compile, and says why.
"""

from __future__ import annotations

import pytest
import torch

import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET=1 first, without a GPU)
import triton
import triton.language as tl
from minigemma.kernels.gpu_report import gpu_report, gpu_reports

SCALE = 2.0  # a plain Python global: the interpreter reads it, the compiler refuses it
SCALE_C = tl.constexpr(2.0)  # the way a kernel may read a global


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask, other=0.0), mask=mask)


@triton.jit
def strided_copy_kernel(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets * stride, mask=mask, other=0.0), mask=mask)


@triton.jit
def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * SCALE, mask=offsets < n)


@triton.jit
def scale_c_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * SCALE_C, mask=offsets < n)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def test_coalesced_loads_are_16_bytes_and_strided_ones_are_not():
    x = torch.zeros(8)
    plain, strided = gpu_reports([(copy_kernel, (x, x, 4096), dict(BLOCK=1024)),
                                  (strided_copy_kernel, (x, x, 4096, 3), dict(BLOCK=1024))])
    assert plain.ok and strided.ok and plain.fits and plain.dot == "-"
    assert max(map(int, plain.loads)) == 16 and max(map(int, strided.loads)) == 4, (plain.loads, strided.loads)
    assert "coalesced" in str(plain) and "No 16-byte loads" in str(strided)


def test_a_tile_too_big_spills_and_one_too_wide_for_shared_memory_cannot_launch():
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    args = (bf16, bf16, bf16, 4096, 4096, 4096)
    ok, spills, too_wide, staged = gpu_reports([
        (matmul_kernel, args, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
        (matmul_kernel, args, dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=3)),
        (matmul_kernel, args, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3)),
        (matmul_kernel, args, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4))])
    assert ok.fits and ok.dot == "wgmma" and ok.programs_per_sm >= 1
    assert spills.spill_bytes > 0 and not spills.fits and "SPILLS" in str(spills)
    assert too_wide.shared > too_wide.props.smem_per_block and not too_wide.fits and "cannot launch" in str(too_wide)
    # one more stage: one more buffer of a 128 x 64 and a 64 x 128 bf16 tile
    assert staged.shared - ok.shared == (128 * 64 + 64 * 128) * 2
    assert staged.programs_per_sm <= ok.programs_per_sm


def test_a_global_read_in_the_kernel_is_a_compile_error_with_its_reason():
    x = torch.ones(16)
    scale_kernel[(1,)](x, 16, BLOCK=16)  # the interpreter accepts it
    assert torch.equal(x, torch.full((16,), 2.0))
    report, fixed = gpu_reports([(scale_kernel, (x, 16), dict(BLOCK=16)), (scale_c_kernel, (x, 16), dict(BLOCK=16))])
    assert not report.ok and not report.fits and "global" in report.error.lower(), report.error
    assert str(report).splitlines()[1].strip().startswith("does not compile")
    assert fixed.ok and fixed.fits, fixed.error  # the same value as a tl.constexpr compiles


def test_bad_calls_name_the_problem():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="3 runtime arguments"):
        gpu_report(copy_kernel, x, x, BLOCK=16)
    with pytest.raises(ValueError, match="BLOCK"):
        gpu_report(copy_kernel, x, x, 4)
    with pytest.raises(ValueError, match="target"):
        gpu_report(copy_kernel, x, x, 4, BLOCK=16, target="sm_75")
    with pytest.raises(TypeError, match="triton.jit"):
        gpu_report(len, x)
