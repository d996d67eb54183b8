"""Running the kernels without a GPU: Triton's interpreter, and a bounds checker for it.

With `TRITON_INTERPRET=1` in the environment when a kernel is decorated, `@triton.jit` returns an
interpreted function: every program of the grid runs one after the other on the CPU, each `tl.*`
operation on a whole block at once with numpy. The results are the kernel's (same blocks, same
masks, same float32 arithmetic; no bfloat16, which numpy lacks), the speed is not: never time it.
`minigemma.kernels` turns the interpreter on by itself when torch sees no GPU.

A GPU faults (or silently reads garbage) on an out-of-bounds address; the interpreter just reads
the host memory there. `bounds_checked()` makes such an access an error instead: inside it, every
load and store of an interpreted launch must fall inside one of the tensors passed to that launch.

    with bounds_checked():
        kernel[grid](x, y, n, BLOCK=128)   # OutOfBoundsError names the program, the argument, the element
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as it was when this module was imported


class OutOfBoundsError(IndexError):
    """A load or store of an interpreted kernel touched memory outside every tensor argument."""


def interpreted(kernel):
    """`kernel` run by Triton's interpreter, whatever TRITON_INTERPRET said when it was decorated.

    Takes a `@triton.jit` kernel (its Python body is `kernel.fn`), an interpreted one, or a plain
    Python function written against `triton.language`.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    fn = getattr(kernel, "fn", kernel)
    if not callable(fn):
        raise TypeError(f"expected a @triton.jit kernel or a function, got {type(kernel).__name__}")
    return InterpretedFunction(fn)


_INTERPRETED = {}  # @triton.jit body -> its InterpretedFunction


def _call_interpreted(self, *args, **kwargs):
    """JITFunction.__call__ inside an interpreted launch: run the helper's body interpreted too."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = _INTERPRETED.get(self.fn)
    if fn is None:
        fn = _INTERPRETED[self.fn] = InterpretedFunction(self.fn)
    return fn(*args, **kwargs)


def _let_interpreted_launches_call_jit_helpers() -> None:
    """`tl.sum`, `tl.sigmoid`, ... are @triton.jit functions, decorated when Triton was imported. If that
    was before TRITON_INTERPRET=1 was set (or on a GPU machine, where a check still interprets), they
    are compiled-kernel helpers that refuse to run in the interpreter. During an interpreted launch,
    and only then, this makes such a call interpret the helper's body instead."""
    from triton.runtime import interpreter as ti
    from triton.runtime.jit import JITFunction

    if getattr(ti.GridExecutor, "_minigemma_jit_helpers", False):
        return
    launch0 = ti.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        call0 = JITFunction.__call__
        JITFunction.__call__ = _call_interpreted
        try:
            return launch0(self, *args, **kwargs)
        finally:
            JITFunction.__call__ = call0

    ti.GridExecutor.__call__ = launch
    ti.GridExecutor._minigemma_jit_helpers = True


_let_interpreted_launches_call_jit_helpers()


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) from a view's first element to the end of its last one."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


_state = threading.local()  # the tensors of the launch now running: [(name, tensor, lo, hi), ...]


def _check(kind: str, ptrs, mask) -> None:
    args = getattr(_state, "args", None)
    if args is None:  # not inside a checked launch
        return
    from triton.runtime.interpreter import _get_np_dtype, interpreter_builder

    addr = np.asarray(ptrs.data, dtype=np.uint64)
    on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
    size = np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize
    addr = addr[on].astype(np.int64)
    if addr.size == 0:
        return
    inside = np.zeros(addr.shape, dtype=bool)
    for _, _, lo, hi in args:
        inside |= (addr >= lo) & (addr + size <= hi)
    if inside.all():
        return
    bad = addr[~inside]
    first = int(bad[0])
    pid = tuple(int(i) for i in interpreter_builder.grid_idx)
    if not args:
        raise OutOfBoundsError(f"{kind} by program {pid}: the launch has no tensor arguments")
    # describe the first bad lane relative to the nearest tensor argument
    name, t, lo, hi = min(args, key=lambda a: min(abs(first - a[2]), abs(first - a[3])))
    elem = (first - t.data_ptr()) / t.element_size()
    elem = int(elem) if elem == int(elem) else round(elem, 2)
    raise OutOfBoundsError(
        f"out-of-bounds {kind} by program {pid}: {bad.size} of {on.sum()} active lanes fall outside every "
        f"tensor argument; the first is element {elem} of `{name}` (shape {tuple(t.shape)}, "
        f"{t.numel()} elements). A missing or wrong mask?")


@contextlib.contextmanager
def bounds_checked():
    """Inside this block, interpreted launches raise OutOfBoundsError on an out-of-bounds load or store.

    Covers `tl.load` and `tl.store` on pointer blocks (masked lanes are skipped, as on a GPU);
    block pointers, tensor descriptors and atomics are not checked. Needs Triton's interpreter
    internals (`GridExecutor._init_args_hst`, `interpreter_builder.create_masked_load/store`),
    and says so if a Triton version lacks them.
    """
    if getattr(_state, "active", False):  # nested: the outer block already checks everything
        yield
        return
    from triton.runtime import interpreter as ti

    builder = getattr(ti, "interpreter_builder", None)
    needed = [(ti, "GridExecutor"), (builder, "create_masked_load"), (builder, "create_masked_store")]
    missing = [n for obj, n in needed if not hasattr(obj, n)]
    if missing or not hasattr(ti.GridExecutor, "_init_args_hst"):
        import triton

        raise RuntimeError(f"bounds_checked() needs Triton's interpreter internals {missing or '_init_args_hst'}, "
                           f"which triton {triton.__version__} does not have")
    init0, load0, store0 = ti.GridExecutor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init0(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _state.args = [(n, t, *_extent(t)) for n, t in named if isinstance(t, torch.Tensor)]
        return args_hst, kwargs_hst

    def load(ptrs, mask, other, *rest):
        _check("load", ptrs, mask)
        return load0(ptrs, mask, other, *rest)

    def store(ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return store0(ptrs, value, mask, *rest)

    ti.GridExecutor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store = load, store  # on the instance only
    _state.active = True
    try:
        yield
    finally:
        ti.GridExecutor._init_args_hst = init0
        builder.create_masked_load, builder.create_masked_store = load0, store0
        _state.active, _state.args = False, None


def unwrap(e: BaseException) -> BaseException:
    """The interpreter wraps a kernel's exception in InterpreterError; return the original one."""
    while type(e).__name__ == "InterpreterError" and e.__cause__ is not None:
        e = e.__cause__
    return e


def launch_checked(kernel, grid, *args, **kwargs):
    """Run `kernel[grid](*args, **kwargs)` in the interpreter with every access bounds-checked.

    Raises the kernel's own error (OutOfBoundsError, NotImplementedError, ...) rather than the
    interpreter's wrapper around it.
    """
    fn = interpreted(kernel)
    with bounds_checked():
        try:
            fn[grid](*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            inner = unwrap(e)
            if inner is e:
                raise
            raise inner from None
