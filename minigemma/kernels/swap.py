"""`use_triton(model)`: the Triton kernels swapped into any model of the course, module by module.

A kernel never needs a model change. Each swappable module class has a Triton subclass with the same
parameters and no state of its own, whose `forward` (or `attention`, or `recurrence`) calls the kernels;
swapping changes the class of the module object itself (`minigemma.swap.retype`, through
`swap_modules`, the package's one swap mechanism), so its parameters, state dict, caches, hooks and every
reference to it stay as they are, and swapping back restores the torch class. `TRITON_CLASSES` is the table:

    torch module                          Triton subclass                       what runs as a kernel
    attention.GroupedQueryAttention       kernels.attention.GroupedQueryAttention   RoPE, attention (all masks,
                                                                                  decode over the cache)
    layers.RMSNorm                        kernels.rms_norm.RMSNorm                  RMSNorm, QK-norm
    layers.GeGLU                          kernels.swap.GeGLU                        gelu_tanh(gate) · up
    griffin.RGLRU                         kernels.swap.RGLRU                        the linear scan (`recurrence`)

That covers every family: Gemma 2 and 3 (decoder layers), EmbeddingGemma (the same layers, bidirectional),
Griffin (its local attention is the same GroupedQueryAttention, plus the RG-LRU). Matching is by exact
class, so a subclass with its own forward is left alone and reported. The quantised modules of
`minigemma.quant` (Int8Linear, Int4Linear, Q8_0Embedding, RescoredHead) keep their own torch kernels, as
do every nn.Linear and the embedding: the matrix products are torch's (cuBLAS on a GPU).

Without a GPU the kernels run in Triton's interpreter, which computes only float32 correctly: a model
computing in bfloat16 (quant="bf16", "int8", "int4", or file_codes=True) is then left as it is, and the report says why.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from minigemma import attention as torch_attention
from minigemma import gemma, griffin, layers, quant
from minigemma.swap import Swap, retype

from . import attention as attention_kernels
from . import decode_layer
from . import rms_norm as rms_norm_kernels
from .geglu import geglu
from .interpret import INTERPRET
from .rglru_scan import rglru_scan
from .utils import retype_modules


class GeGLU(layers.GeGLU):
    """`minigemma.layers.GeGLU` with its activation, gelu_tanh(gate) · up, as one kernel on the fused
    gate_up projection. The projections are the module's own (nn.Linear, or a quantised linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(geglu(self.gate_up_proj(x)))


class RGLRU(griffin.RGLRU):
    """`minigemma.griffin.RGLRU` whose recurrence h_t = a_t ⊙ h_{t-1} + b_t is the chunked Triton scan
    (`kernels.rglru_scan`); the gates stay torch's. The instance's own `scan` setting is untouched,
    so the torch class swapped back runs the scan it had."""

    def recurrence(self, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
        """a, b (B, T, R), h0 (B, R) or None -> (h (B, T, R) float32, h_T (B, R))."""
        return rglru_scan(a, b, h0)


TRITON_CLASSES: dict[type, type] = {  # torch class -> its Triton subclass
    torch_attention.GroupedQueryAttention: attention_kernels.GroupedQueryAttention,
    layers.RMSNorm: rms_norm_kernels.RMSNorm,
    layers.GeGLU: GeGLU,
    griffin.RGLRU: RGLRU,
    gemma.DecoderLayer: decode_layer.DecoderLayer,
    gemma.Gemma: decode_layer.Gemma,
}
TORCH_CLASSES = {triton_cls: torch_cls for torch_cls, triton_cls in TRITON_CLASSES.items()}  # the way back
WHAT = {  # torch class name -> what its swap runs as a kernel, for the report
    "GroupedQueryAttention": "RoPE and attention kernels",
    "RMSNorm": "RMSNorm kernel",
    "GeGLU": "activation kernel",
    "RGLRU": "scan kernel",
    "DecoderLayer": "a decode step in five fused kernels",
    "Gemma": "its layers' fused decode steps chained",
}
QUANTISED = (quant.Int8Linear, quant.Int4Linear, quant.Q8_0Embedding, quant.RescoredHead)


@dataclass
class SwapReport:
    """What `use_triton` did: counts per class swapped (or swapped back), and what it left alone and why."""

    enable: bool
    swapped: Counter = field(default_factory=Counter)  # torch class name -> modules swapped
    left_alone: Counter = field(default_factory=Counter)  # "class name: why" -> modules
    refused: str | None = None  # why nothing was swapped at all

    @property
    def total(self) -> int:
        return sum(self.swapped.values())

    def __str__(self) -> str:
        if self.refused:
            return f"use_triton: nothing swapped: {self.refused}"
        if not self.enable:
            what = ", ".join(f"{n} {name}" for name, n in sorted(self.swapped.items())) or "nothing to swap back"
            return f"use_triton(False): back to torch: {what}"
        lines = [f"use_triton: {self.total} modules now run Triton kernels"]
        lines += [f"  {n:4d} x {name}" for name, n in sorted(self.swapped.items())]
        if self.left_alone:
            lines.append("  left alone:")
            lines += [f"  {n:4d} x {what}" for what, n in sorted(self.left_alone.items())]
        return "\n".join(lines)


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its embedding's output, or its parameters' floating dtype."""
    if hasattr(model, "embed_tokens"):
        return layers.activation_dtype(model)
    if any(isinstance(m, QUANTISED) for m in model.modules()):
        return torch.bfloat16  # weight-only quantised models run bf16 activations
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)


def _device(model: nn.Module) -> torch.device | None:
    return next((t.device for t in list(model.parameters()) + list(model.buffers())), None)


def _swap_in(torch_cls: type, triton_cls: type, report: SwapReport) -> Swap:
    """The swap of one torch class: retype to its Triton subclass, unless the subclass says it cannot run
    this module (`unsupported(module)`: why, or None), which stays torch and is reported."""
    unsupported = getattr(triton_cls, "unsupported", lambda module: None)

    def swap_in(module: nn.Module) -> nn.Module | None:
        why = unsupported(module)
        if why:
            report.left_alone[f"{torch_cls.__name__}: {why} (torch)"] += 1
            return None
        return retype(triton_cls)(module)

    return swap_in


def _left_alone(model: nn.Module) -> Counter:
    """The modules no table entry matches that a reader might expect swapped, and why: quantised modules,
    and subclasses of a swappable class (their own forward, which the kernels were not written for)."""
    why: Counter = Counter()
    for module in model.modules():
        cls = type(module)
        if isinstance(module, QUANTISED):
            why[f"{cls.__name__} (quantised: its own torch kernel)"] += 1
        elif cls not in TRITON_CLASSES and cls not in TORCH_CLASSES and isinstance(module, tuple(TRITON_CLASSES)):
            why[f"{cls.__name__} (a subclass the kernels were not written for)"] += 1
    return why


def swap(model: nn.Module, enable: bool = True) -> SwapReport:
    """Swap the Triton subclasses in (or back out, enable=False), in place; return what was done."""
    report = SwapReport(enable)
    if not enable:
        report.swapped.update(retype_modules(model, {triton_cls: retype(torch_cls)
                                                     for triton_cls, torch_cls in TORCH_CLASSES.items()}))
        return report
    device = _device(model)
    if device is not None and device.type == "cpu" and not INTERPRET:
        raise ValueError("the model is on the CPU but Triton's interpreter is off: move it to the GPU "
                         "(model.cuda()) first, or set TRITON_INTERPRET=1 before importing minigemma.kernels")
    dtype = _activation_dtype(model)
    if INTERPRET and dtype != torch.float32 and (device is None or device.type == "cpu"):
        report.refused = (f"the model computes in {dtype}, and Triton's interpreter (no GPU here) computes only "
                          "float32 correctly; load it with quant=None (float32), or run it on a GPU")
        return report
    table = {torch_cls: _swap_in(torch_cls, triton_cls, report) for torch_cls, triton_cls in TRITON_CLASSES.items()}
    swapped = retype_modules(model, table)  # the model itself too: use_triton(layer) swaps one layer
    report.swapped.update({f"{name}: {WHAT[name]}": n for name, n in swapped.items()})
    report.left_alone.update(_left_alone(model))
    return report


def use_triton(model: nn.Module, enable: bool = True, verbose: bool = True) -> nn.Module:
    """Run `model` on the Triton kernels (enable=False: on torch again); returns the model, changed in place.

    Works on any model of the course (Gemma 2/3, EmbeddingGemma, Griffin, quantised or not) and prints
    which modules were swapped and which were left alone, and why (verbose=False: silent). Outputs match
    the torch model's to rounding (tests/test_kernels_swap.py)."""
    report = swap(model, enable)
    if report.refused:
        warnings.warn(str(report), stacklevel=2)
    elif verbose:
        print(report)
    return model


def triton_modules(model: nn.Module) -> dict[str, str]:
    """Qualified name -> Triton class name, for every module of `model` that runs a Triton kernel now."""
    return {name: type(m).__name__ for name, m in model.named_modules() if type(m) in TORCH_CLASSES}
