"""`use_triton(model)`: the Triton kernels swapped into any model of the course, module by module.

A kernel never needs a model change. Each swappable module class has a Triton subclass with the same
parameters and no state of its own, whose `forward` (or `attention`) calls the kernels; swapping
changes the class of the module object itself (`module.__class__`), so its parameters, state dict,
caches, hooks and every reference to it stay as they are, and swapping back restores the torch class.

    torch module                          Triton subclass                       what runs as a kernel
    attention.GroupedQueryAttention       kernels.attention.GroupedQueryAttention   RoPE, attention (all masks,
                                                                                  decode over the cache)
    layers.RMSNorm                        kernels.rms_norm.RMSNorm                  RMSNorm, QK-norm
    layers.GeGLU                          kernels.swap.GeGLU                        gelu_tanh(gate) · up
    griffin.RGLRU                         kernels.swap.RGLRU                        the linear scan

That covers every family: Gemma 2 and 3 (decoder layers), EmbeddingGemma (the same layers, bidirectional),
Griffin (its local attention is the same GroupedQueryAttention, plus the RG-LRU). Matching is by exact
class, so a subclass with its own forward is left alone and reported. The quantised modules of
`minigemma.quant` (Int8Linear, Int4Linear, Q8_0Embedding, RescoredHead) keep their own torch kernels, as
do every nn.Linear and the embedding: the matrix products are torch's (cuBLAS on a GPU).

Without a GPU the kernels run in Triton's interpreter, which computes only float32 correctly: a model
computing in bfloat16 (quant="bf16", "int8", "int4", "gguf") is then left as it is, and the report says why.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from minigemma import attention as torch_attention
from minigemma import griffin, layers, quant

from . import attention as attention_kernels
from . import rms_norm as rms_norm_kernels
from .geglu import geglu
from .interpret import INTERPRET
from .rglru_scan import rglru_scan


class GeGLU(layers.GeGLU):
    """`minigemma.layers.GeGLU` with its activation, gelu_tanh(gate) · up, as one kernel on the fused
    gate_up projection. The projections are the module's own (nn.Linear, or a quantised linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(geglu(self.gate_up_proj(x)))


def _triton_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """`griffin.SCANS`' signature (a, b, h0) -> (h float32, h_T), on the chunked Triton scan."""
    return rglru_scan(a, b, h0)


griffin.SCANS.setdefault("triton", _triton_scan)  # the registry RGLRU looks its scan up in


class RGLRU(griffin.RGLRU):
    """`minigemma.griffin.RGLRU` whose scan is the Triton kernel (`kernels.rglru_scan`).

    RGLRU.forward computes its gates and calls `SCANS[self.scan](a, b, h0)`. Here `scan` is a
    read-only property saying "triton", which hides the instance's own setting while this class is
    swapped in; swapped back, the instance's setting ("sequential" or "associative") is seen again."""

    @property
    def scan(self) -> str:
        return "triton"

    @scan.setter
    def scan(self, value: str) -> None:  # RGLRU.__init__ assigns it; the torch class keeps that value
        self.__dict__["scan"] = value


SWAPS: dict[type, type] = {
    torch_attention.GroupedQueryAttention: attention_kernels.GroupedQueryAttention,
    layers.RMSNorm: rms_norm_kernels.RMSNorm,
    layers.GeGLU: GeGLU,
    griffin.RGLRU: RGLRU,
}
BACK = {triton_cls: torch_cls for torch_cls, triton_cls in SWAPS.items()}
WHAT = {  # what each swap runs as a kernel, for the report
    torch_attention.GroupedQueryAttention: "RoPE and attention kernels",
    layers.RMSNorm: "RMSNorm kernel",
    layers.GeGLU: "activation kernel",
    griffin.RGLRU: "scan kernel",
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


def swap(model: nn.Module, enable: bool = True) -> SwapReport:
    """Swap the Triton subclasses in (or back out, enable=False), in place; return what was done."""
    report = SwapReport(enable)
    if enable:
        device = _device(model)
        if device is not None and device.type == "cpu" and not INTERPRET:
            raise ValueError("the model is on the CPU but Triton's interpreter is off: move it to the GPU "
                             "(model.cuda()) first, or set TRITON_INTERPRET=1 before importing minigemma.kernels")
        dtype = _activation_dtype(model)
        if INTERPRET and dtype != torch.float32 and (device is None or device.type == "cpu"):
            report.refused = (f"the model computes in {dtype}, and Triton's interpreter (no GPU here) computes only "
                              "float32 correctly; load it with quant=None (float32), or run it on a GPU")
            return report
    for name, module in model.named_modules():
        cls = type(module)
        if enable and cls in SWAPS:
            why = getattr(SWAPS[cls], "unsupported", lambda m: None)(module)
            if why:
                report.left_alone[f"{cls.__name__}: {why} (torch)"] += 1
                continue
            module.__class__ = SWAPS[cls]
            report.swapped[f"{cls.__name__}: {WHAT[cls]}"] += 1
        elif not enable and cls in BACK:
            module.__class__ = BACK[cls]
            report.swapped[BACK[cls].__name__] += 1
        elif enable and isinstance(module, QUANTISED):
            report.left_alone[f"{cls.__name__} (quantised: its own torch kernel)"] += 1
        elif enable and cls not in BACK and isinstance(module, tuple(SWAPS)):
            report.left_alone[f"{cls.__name__} (a subclass the kernels were not written for)"] += 1
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
    return {name: type(m).__name__ for name, m in model.named_modules() if type(m) in BACK}
