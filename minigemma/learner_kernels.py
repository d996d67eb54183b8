"""Your kernels inside the real Gemma 3 270M: the hook behind chapter 13's capstone (exercise 13.capstone).

Chapters 12 and 13 ask for Triton kernels, each checked on its own through its exercise's launcher. The
capstone runs three of them inside the real model, on the package's Triton kernels (`use_triton`), and
asks for the model's own logits:

    from minigemma.learner_kernels import YourKernels
    yours = YourKernels(rms_norm_rows=rms_norm_kernel, geglu_rows=geglu_kernel,
                        flash_forward_window=flash_window_kernel)
    tokens, logits = yours("Once upon a time there was a", window=4)   # at every position of the prompt

How it works (`with_kernels`), as `minigemma.learner` does it with functions: the model is copied module
by module (`learner.structural_copy`: new module objects sharing every parameter, so no weight is copied
and the model itself is left as it is); the copy is put on the package's Triton kernels
(`kernels.swap.use_triton`); then each module that one of your kernels fits becomes a small subclass of
its Triton class that launches your kernel instead of the package's (the package's one swap mechanism,
`swap.swap_modules`):

    Triton module                          subclass here   your kernel, launched as its exercise launches it
    kernels.rms_norm.RMSNorm (every norm,   YourRMSNorm     rms_norm_rows: one row per program (rows of C = 640,
      QK-norm and the final norm too)                       QK-norm's of head_dim = 256)
    kernels.swap.GeGLU                      YourGeGLU       geglu_rows: gelu_tanh(gate) · up of the fused
                                                            gate_up projection, blocks of 512 columns (F = 2048)
    kernels.attention.GroupedQueryAttention YourAttention   flash_forward_window: a prompt's attention, one
                                                            program per (32 queries, head), blocks of 16 keys

Your kernel is launched by its exercise's own launcher (`Exercise.launch` of 12.rms_norm_rows and
13.flash_forward_window, from the exercises' registry `grading.exercise.EXERCISES`): the same grid, blocks
and argument list as in its exercise, in Triton's interpreter, every load and store bounds-checked, the
output starting as NaN, and for the attention every key block a program loads watched (a block outside
what its queries can see is a `BlockSkippingError`). The GeGLU kernel gets the same arguments as in
12.geglu_rows, in blocks of 512 columns instead of 32 (`launch_geglu`: the interpreter's cost is per
program). So the signatures are the exercises' and a kernel that passed its exercise runs here unchanged.
The model brings shapes the exercises did not: head_dim 256, 4 query heads sharing 1 key/value head (the
key/value head is repeated for each query head, so your kernel sees (heads, T, 256)), rows of 640 and 256,
a global layer (its window is the prompt's length: plain causal attention).

Only the prompt runs your attention kernel: a decode step (one new token against a cache) is the
package's fused decode step, which does not go through these modules at all
(`kernels.decode_layer`). So the capstone compares a prompt's logits, at every position, and the greedy
next token after every prefix, not generated text.

A kernel you do not give keeps the package's. Your kernels see float32, as the exercises do.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from . import attention, gemma, layers
from .grading.exercise import EXERCISES
from .kernels import attention as attention_kernels
from .kernels import rms_norm as rms_norm_kernels
from .kernels import swap as kernel_swap
from .kernels.interpret import INTERPRET
from .learner import structural_copy, swapped_alone, windowed
from .swap import retype, swap_modules

# name -> (the exercise that checks it on its own, its signature, where it runs in the model)
KERNELS: dict[str, tuple[str, str, str]] = {
    "rms_norm_rows": ("12.rms_norm_rows", "(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK)",
                      "every RMSNorm: the four of each layer, QK-norm, the final norm"),
    "geglu_rows": ("12.geglu_rows", "(gu_ptr, out_ptr, F, stride_gu, BLOCK)",
                   "each layer's MLP activation, between gate_up_proj and down_proj"),
    "flash_forward_window": ("13.flash_forward_window",
                             "(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N)",
                             "each layer's attention over the prompt (local: the window; global: all keys)"),
}
EPS = 1e-6  # 12.rms_norm_rows's launcher passes this eps (Gemma's rms_norm_eps)
GEGLU_BLOCK = 512  # columns per program of your geglu kernel here (its exercise: 32); see `launch_geglu`
PAD = 3  # extra columns after each row of gate_up, as in 12.geglu_rows: the row stride is never 2F


def launch_geglu(kernel) -> Callable:
    """Your geglu kernel launched as 12.geglu_rows launches it (the same arguments, gate_up's rows PAD columns
    apart, the output starting as NaN, every load and store bounds-checked, in Triton's interpreter), with
    one difference: blocks of GEGLU_BLOCK = 512 columns, not 32. The interpreter's cost is per program, about
    5 ms here whatever the block: blocks of 32 would be 64 programs per row of F = 2048, 9,216 in one prompt
    of 8 tokens (some 45 s), where 512 makes it 4 per row. Several blocks per row still, so program (r, c)
    must still find its columns from c and BLOCK."""
    from .kernels.interpret import launch_checked

    def geglu_rows(gate_up: torch.Tensor) -> torch.Tensor:
        M, F_ = gate_up.shape[0], gate_up.shape[1] // 2
        buf = torch.full((M, 2 * F_ + PAD), float("nan"), dtype=gate_up.dtype)
        buf[:, : 2 * F_] = gate_up
        gus = buf[:, : 2 * F_]
        out = torch.full((M, F_), float("nan"))
        launch_checked(kernel, (M, -(-F_ // GEGLU_BLOCK)), gus, out, F_, gus.stride(0), BLOCK=GEGLU_BLOCK)
        return out

    return geglu_rows


def launcher(name: str, kernel) -> Callable:
    """Your `kernel` for `name` as its exercise runs it: a torch function (the exercise's `launch`; for
    geglu_rows, `launch_geglu`)."""
    if name == "geglu_rows":
        return launch_geglu(kernel)
    exercise = KERNELS[name][0]
    ex = EXERCISES.get(exercise)
    if ex is None or ex.launch is None:
        raise RuntimeError(f"exercise {exercise}'s launcher is not registered yet: run a check first "
                           "(minigemma.grading's check registers every exercise)")
    return ex.launch(kernel)


class YourRMSNorm(rms_norm_kernels.RMSNorm):
    """`kernels.rms_norm.RMSNorm` whose kernel is your rms_norm_rows: x (..., C) as rows of C, one per program."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        out = self._yours["rms_norm_rows"](x.reshape(-1, C), self.weight)
        return out.reshape(x.shape).to(x.dtype)


class YourGeGLU(kernel_swap.GeGLU):
    """`kernels.swap.GeGLU` whose activation kernel is your geglu_rows, on the fused gate_up rows (..., 2F)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        F_ = gate_up.shape[-1] // 2
        act = self._yours["geglu_rows"](gate_up.reshape(-1, 2 * F_)).reshape(*gate_up.shape[:-1], F_)
        return self.down_proj(act.to(gate_up.dtype))


def _prompt(pos: attention.Positions, keys: attention.Keys, T: int) -> bool:
    """Whether an attention call is a prompt your kernel covers: T queries at indices 0..T-1 attending
    exactly themselves, in order, one document per row."""
    return (pos.start == 0 and keys.first == 0 and keys.count == T and keys.in_order and not pos.packed
            and pos.documents is None)


class YourAttention(attention_kernels.GroupedQueryAttention):
    """`kernels.attention.GroupedQueryAttention` whose prompt attention is your flash_forward_window
    (RoPE stays the package's kernel). Any other call (a decode step, a chunk after a cache) runs the
    package's kernels."""

    def project(self, x: torch.Tensor, pos: attention.Positions):
        if self._on_triton:
            return super().project(x, pos)
        return attention.GroupedQueryAttention.project(self, x, pos)  # no interpreter here: torch's RoPE

    def attention(self, q, k, v, pos: attention.Positions, keys: attention.Keys) -> torch.Tensor:
        B, H, T, D = q.shape
        if not _prompt(pos, keys, T) or (torch.is_grad_enabled() and q.requires_grad):
            if self._on_triton:
                return super().attention(q, k, v, pos, keys)
            return attention.GroupedQueryAttention.attention(self, q, k, v, pos, keys)
        rep = H // k.shape[1]  # query heads per key/value head: the kv head is repeated for each of them
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        window = T if self.window is None else self.window  # a window of T or more: plain causal attention
        out = self._yours["flash_forward_window"](q.reshape(B * H, T, D), k.reshape(B * H, T, D),
                                                   v.reshape(B * H, T, D), self.scale, window)
        return out.reshape(B, H, T, D).to(q.dtype)


# Triton class (or torch class, where the package's kernels cannot run) -> (subclass here, your kernel's name)
YOUR_CLASSES: dict[type, tuple[type, str]] = {
    rms_norm_kernels.RMSNorm: (YourRMSNorm, "rms_norm_rows"),
    kernel_swap.GeGLU: (YourGeGLU, "geglu_rows"),
    attention_kernels.GroupedQueryAttention: (YourAttention, "flash_forward_window"),
    layers.RMSNorm: (YourRMSNorm, "rms_norm_rows"),
    layers.GeGLU: (YourGeGLU, "geglu_rows"),
    attention.GroupedQueryAttention: (YourAttention, "flash_forward_window"),
}


def _check_supported(module: nn.Module) -> None:
    """Say so clearly where the model does something the exercises' launchers cannot express."""
    if isinstance(module, YourRMSNorm) and not math.isclose(module.eps, EPS, rel_tol=1e-6):  # a float32 1e-6 too
        raise ValueError(f"12.rms_norm_rows's launcher passes eps = {EPS:g}; this norm's eps is {module.eps:g}")
    if isinstance(module, YourGeGLU) and module.gate_up_proj.bias is not None:
        raise ValueError("12.geglu_rows takes the gate_up rows of a projection without biases; this MLP has them")
    if isinstance(module, YourAttention):
        D = module.head_dim
        if module.softcap:
            raise ValueError("13.flash_forward_window has no soft-cap; this layer caps its logits (Gemma 2)")
        if not module.causal:
            raise ValueError("13.flash_forward_window is causal attention; this layer is an encoder's band")
        if D < 16 or D & (D - 1):
            raise ValueError(f"13.flash_forward_window spans a row with one block of D columns, a power of two "
                             f"of at least 16; this layer's head_dim is {D}")


def with_kernels(model: gemma.Gemma, **kernels) -> gemma.Gemma:
    """A copy of a Gemma (2 or 3, decoder) on the package's Triton kernels, with yours in the modules they
    fit (see the module docstring); it shares every parameter with `model`, which is left as it is.
    Unknown names are an error. On a machine where the package's kernels cannot run on this model (a GPU
    machine, the model on the CPU: no interpreter), the modules yours do not replace stay torch's."""
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise TypeError(f"unknown kernels {unknown}; the hook takes {', '.join(KERNELS)}")
    if not isinstance(model, gemma.Gemma) or getattr(model.config, "bidirectional", False):
        raise TypeError(f"the hook takes a decoder Gemma, got {type(model).__name__}")
    launched = {name: launcher(name, kernel) for name, kernel in kernels.items()}
    yours = structural_copy(model)
    device = next(model.parameters()).device
    on_triton = INTERPRET or device.type != "cpu"
    if on_triton:
        kernel_swap.use_triton(yours, verbose=False)  # the copy only: its modules are new objects

    def swap_in(cls: type, name: str):
        def swap(module: nn.Module) -> nn.Module | None:
            if name not in launched:
                return None  # none of your kernels computes this module: the package's class stays
            module._yours = {name: launched[name]}
            module._on_triton = on_triton
            module = retype(cls)(module)  # a module of the copy: the model's own keeps its class
            _check_supported(module)
            return module

        return swap

    swap_modules(yours, {base: swap_in(cls, name) for base, (cls, name) in YOUR_CLASSES.items()})
    return yours


def prompt_outputs(model: nn.Module, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the greedy next token after each prefix (T,) long, the logits at every position (T, V) float32) of
    one prompt, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)]))[0].float()
    return logits.argmax(-1), logits


# --------------------------------------------------------------------------------------------
# The capstone: a prompt's logits of the real model, with your kernels
# --------------------------------------------------------------------------------------------
def reference_model():
    """Gemma 3 270M in float32 and its tokenizer, loaded once per process (shared with chapter 06's capstone)."""
    from .learner import reference_model as load

    return load()


@functools.lru_cache(maxsize=4)
def _reference(prompt: str, window: int):
    model, tokenizer = reference_model()
    return prompt_outputs(windowed(model, window), tokenizer.encode(prompt))


def reference_outputs(prompt: str, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What Gemma 3 270M itself gives, the package's torch code everywhere, its local layers' window set to
    `window`: the greedy next tokens (T,) and the logits (T, V) of the prompt (computed once per process)."""
    tokens, logits = _reference(prompt, window)
    return tokens.clone(), logits.clone()


_OUTPUTS: OrderedDict = OrderedDict()  # ((name, id(kernel)) ..., prompt, window) -> (kernels, outputs)
_REMEMBERED = 16  # outputs kept (a prompt of 8 tokens: 8 MB of logits)


class YourKernels:
    """Gemma 3 270M (float32) on the package's Triton kernels, with yours swapped in:
    `yours(prompt, window)` returns the greedy next token after each prefix of the prompt (T,) and the
    logits at every position (T, V), its local layers' window set to `window`. Any subset of the kernels of
    `KERNELS` may be given (the package's kernels run the rest).

    Outputs are remembered per kernel objects, prompt and window, so a check that runs on several seeds,
    and the diagnosis that swaps each kernel in alone, run the model once for each. Redefining a kernel
    makes a new object, so it is run again.
    """

    def __init__(self, **kernels):
        unknown = sorted(set(kernels) - set(KERNELS))
        if unknown:
            raise TypeError(f"unknown kernels {unknown}; give any of: "
                            + ", ".join(f"{name}={KERNELS[name][0]}'s kernel" for name in KERNELS))
        bad = [name for name, k in kernels.items() if not callable(getattr(k, "fn", k))]
        if bad:
            raise TypeError(f"not kernels: {bad}")
        self.kernels = {name: kernels[name] for name in KERNELS if name in kernels}

    def only(self, name: str) -> "YourKernels":
        """The same, with only your `name` swapped in (the package's kernels everywhere else)."""
        return YourKernels(**{name: self.kernels[name]})

    def __call__(self, prompt: str, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple((name, id(k)) for name, k in self.kernels.items()), prompt, window)
        if key not in _OUTPUTS:
            model, tokenizer = reference_model()
            outputs = prompt_outputs(with_kernels(windowed(model, window), **self.kernels), tokenizer.encode(prompt))
            _OUTPUTS[key] = (dict(self.kernels), outputs)  # the kernels kept alive: their ids stay theirs
            while len(_OUTPUTS) > _REMEMBERED:
                _OUTPUTS.popitem(last=False)
        _OUTPUTS.move_to_end(key)
        tokens, logits = _OUTPUTS[key][1]
        return tokens.clone(), logits.clone()

    def __repr__(self) -> str:
        return f"YourKernels({', '.join(self.kernels) or 'nothing swapped'})"


def same_outputs(expected, got, atol: float, rtol: float) -> bool:
    """The check's comparison, for the diagnosis: the same greedy tokens, logits within the tolerance."""
    try:
        (t, z), (gt, gz) = expected, got
        return torch.equal(gt, t) and gz.shape == z.shape and torch.allclose(gz, z, atol=atol, rtol=rtol)
    except (TypeError, ValueError, RuntimeError):
        return False


def diagnose(fn, case, expected) -> str | None:
    """Which of your kernels breaks the logits: each is swapped in alone, and its outputs compared."""
    if not isinstance(fn, YourKernels) or not fn.kernels:
        return None
    return swapped_alone({name: KERNELS[name][0] for name in fn.kernels},
                         lambda name: fn.only(name)(*case.args, **case.kwargs),
                         lambda alone: None if same_outputs(expected, alone, case.atol, case.rtol) else "",
                         "the logits", kind="kernel")
