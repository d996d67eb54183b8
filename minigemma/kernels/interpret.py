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

bfloat16 the interpreter keeps as raw bits (numpy uint16): it moves them right but multiplies them as
integers in `tl.dot` and truncates casts to bf16. `emulated_bf16()` makes it compute bf16 as a GPU
does within float32 (dots of the exact bf16 values accumulated in float32, casts rounded to nearest
even), so a kernel's bf16 path can be checked on CPU (tests/test_kernels_bf16_emulated.py).
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


# --------------------------------------------------------------------------------------------
# bfloat16 in the interpreter, computed as a GPU computes it
# --------------------------------------------------------------------------------------------
def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (numpy uint16, the interpreter's storage) -> their exact float32 values."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (a GPU's cvt.rn.bf16.f32, torch's .bfloat16())."""
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((b >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


@contextlib.contextmanager
def emulated_bf16():
    """Inside this block, Triton's interpreter computes bfloat16 as a GPU does, within float32.

    The interpreter keeps a bf16 value as its 16 bits in a numpy uint16 (numpy has no bfloat16), which
    loads, stores, `tl.where` and `tl.trans` move correctly; the rest it gets wrong. Here:

      tl.dot with bf16 operands             multiplies their exact float32 values and accumulates in
                                            float32: the tensor cores' bf16 × bf16 -> fp32 up to the
                                            order of the sums (the interpreter multiplied bit patterns
                                            as integers)
      a cast to bf16 (`.to(tl.bfloat16)`)   rounds to nearest even, as the GPU's conversion (the
                                            interpreter truncated), from float32, and from integers
                                            and float64 through float32 (it copied an integer's value
                                            into the bits)
      a cast from bf16                      exact, through float32 (bf16 -> int read the bits)
      arithmetic and comparisons on bf16    in float32, rounded back to bf16 (one IEEE operation's
                                            result: float32 holds 24 >= 2·8 + 2 bits, so rounding
                                            twice gives the correctly rounded bf16)

    What it cannot emulate: how the tensor cores round inside their own accumulation (taken here as
    float32 sums), and anything about memory (shared memory, async copies, register layouts).
    """
    from triton.runtime import interpreter as ti

    import triton.language as tl

    builder = ti.interpreter_builder
    names = ("cast_impl", "create_fp_to_fp", "create_dot", "binary_op", "unary_op")
    saved = {n: vars(builder)[n] for n in names if n in vars(builder)}  # instance attributes already set
    cast0, fp_to_fp0, dot0, binary0, unary0 = (getattr(builder, n) for n in names)
    bf16 = tl.bfloat16

    def is_bf16(h) -> bool:  # (a comparison's result may carry its operands' dtype: its data says bool)
        return h.dtype.scalar == bf16 and h.data.dtype == np.uint16

    def f32(h) -> np.ndarray:
        return _bf16_to_f32(h.data) if is_bf16(h) else h.data

    def cast_impl(src, dst_type):
        dst = dst_type.scalar
        if is_bf16(src) and dst == bf16:
            return src
        if is_bf16(src):
            src = ti.TensorHandle(_bf16_to_f32(src.data), tl.float32)
            return src if dst == tl.float32 else cast0(src, dst_type)
        if dst == bf16:
            return ti.TensorHandle(_f32_to_bf16(np.asarray(src.data).astype(np.float32)), bf16)
        return cast0(src, dst_type)

    def create_fp_to_fp(src, dst_type, rounding_mode):
        rtne = rounding_mode is None or rounding_mode == ti._ir.ROUNDING_MODE.RTNE
        if rtne and (is_bf16(src) or dst_type.scalar == bf16) and \
                {src.dtype.scalar, dst_type.scalar} <= {bf16, tl.float32, tl.float64}:
            return cast_impl(src, dst_type)
        return fp_to_fp0(src, dst_type, rounding_mode)

    def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
        if not (is_bf16(a) or is_bf16(b)):
            return dot0(a, b, d, input_precision, max_num_imprecise_acc)
        if is_bf16(d):
            raise NotImplementedError("emulated_bf16: tl.dot with a bfloat16 accumulator (out_dtype) is not emulated")
        a32, b32 = (np.asarray(f32(h), dtype=np.float32) for h in (a, b))  # exact: bf16 (and fp16) fit in float32
        return ti.TensorHandle(np.matmul(a32, b32, dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def binary_op(lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return binary0(lhs, rhs, op)
        out = op(f32(lhs), f32(rhs))
        if out.dtype == np.bool_:  # a comparison
            return ti.TensorHandle(out, tl.int1)
        return ti.TensorHandle(_f32_to_bf16(out), bf16)

    def unary_op(arg, op):
        if not is_bf16(arg):
            return unary0(arg, op)
        return ti.TensorHandle(_f32_to_bf16(op(_bf16_to_f32(arg.data))), bf16)

    patch = dict(cast_impl=cast_impl, create_fp_to_fp=create_fp_to_fp, create_dot=create_dot,
                 binary_op=binary_op, unary_op=unary_op)
    for n, f in patch.items():
        setattr(builder, n, f)  # on the instance only, as bounds_checked() does
    try:
        yield
    finally:
        for n in names:
            if n in saved:
                setattr(builder, n, saved[n])
            else:
                vars(builder).pop(n, None)
