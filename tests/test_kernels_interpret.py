"""The bounds checker for Triton's interpreter (minigemma.kernels.interpret), which the kernel tests
and chapter 12's exercise checks rely on: it must flag an out-of-bounds load or store, name the
argument, and stay quiet about masked lanes and correct kernels."""

import pytest
import torch
import triton
import triton.language as tl

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.kernels.interpret import OutOfBoundsError, bounds_checked, launch_checked


def copy_body(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m if MASK_LOAD else None)
    tl.store(y_ptr + offs, x, mask=m if MASK_STORE else None)


copy_kernel = triton.jit(copy_body)


def run(n, mask_load, mask_store, kernel=copy_kernel):
    x, y = torch.randn(n), torch.zeros(n)
    launch_checked(kernel, (triton.cdiv(n, 16),), x, y, n, BLOCK=16, MASK_LOAD=mask_load, MASK_STORE=mask_store)
    return x, y


def test_masked_kernel_passes_and_copies():
    x, y = run(37, True, True)
    assert torch.equal(x, y)


def test_missing_load_mask_is_reported_with_the_argument():
    with pytest.raises(OutOfBoundsError, match=r"out-of-bounds load by program \(2, 0, 0\).*element 37 of `x_ptr`"):
        run(37, False, True)


def test_missing_store_mask_is_reported():
    with pytest.raises(OutOfBoundsError, match="out-of-bounds store.*`y_ptr`"):
        run(37, True, False)


def test_exact_multiple_needs_no_mask_and_plain_functions_work():
    x, y = run(32, False, False, kernel=copy_body)  # an undecorated body runs in the interpreter too
    assert torch.equal(x, y)


def test_a_slice_is_its_own_bound():
    """Reading past the end of a view is out of bounds even when the storage goes on."""
    base = torch.randn(40)
    x, y = base[:30], torch.zeros(30)
    with pytest.raises(OutOfBoundsError, match="element 30 of `x_ptr`"):
        launch_checked(copy_kernel, (2,), x, y, 30, BLOCK=16, MASK_LOAD=False, MASK_STORE=True)


def test_outside_the_block_nothing_is_checked_and_the_patch_is_undone():
    from triton.runtime import interpreter as ti

    with bounds_checked():
        with bounds_checked():  # nesting is harmless
            pass
    assert "create_masked_load" not in vars(ti.interpreter_builder) or \
        vars(ti.interpreter_builder)["create_masked_load"].__func__ is type(ti.interpreter_builder).create_masked_load
