"""The Triton kernels of chapters 12 and 13, each beside its torch reference, its test and its benchmark:

    rms_norm.py    Gemma's RMSNorm (1 + w), float32 statistics; also the QK-norm over head_dim   (chapter 12)
    geglu.py       gelu_tanh(gate) · up from the fused (..., 2F) gate_up projection              (chapter 12)
    rope.py        split-half RoPE from positions, per-layer base and scaling, partial rotary    (chapter 12)
    rglru_scan.py  h_t = a_t · h_{t-1} + b_t, chunked over time, with resets (Griffin's RG-LRU)   (chapter 12)
    fused_linear_loss.py   the LM head + cross-entropy or distillation, chunked: no (N, V) logits (chapter 12)
    gemv.py        weight-only int8/int4 decode products in the quantised modules' own bytes (chapter 12)
    attention.py   flash attention for every Gemma mask (fwd + bwd), split-K decode over the cache (chapter 13)
    swap.py        `use_triton(model)`: the kernels swapped into any model, module by module      (chapter 13)
    interpret.py   running them on CPU in Triton's interpreter, with out-of-bounds accesses reported
                   and bf16 computed as a GPU does (emulated_bf16)
    bench.py       `python -m minigemma.kernels.bench`: the device's ceilings, then every op
                   (bench_loss_gemv.py: its entries for the fused loss and the GEMVs); `--plan`
                   prints cost.py's prediction (bytes, FLOPs, launches, tok/s on H100/A100)
    aot.py         `python -m minigemma.kernels.aot`: every kernel compiled for sm_90/sm_80, no GPU

Without a GPU, importing this package sets TRITON_INTERPRET=1 for the process (unless it is set
already) before any kernel below is decorated, so the same kernels run on CPU tensors in Triton's
interpreter: right answers, meaningless speed. Tests, chapter 12 and its exercises rely on that.
(Triton's own @triton.jit helpers, tl.sum and tl.sigmoid among them, are decorated when Triton is
imported; `interpret.py` lets them run interpreted too if Triton was imported first.)

Each module is named after its op and holds the function of that name, the autograd.Function, the
launchers of forward and backward, and `reference` (the package's torch code it must match):

    from minigemma.kernels.rms_norm import rms_norm     # y = rms_norm(x, weight, eps)
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede every @triton.jit below

# modules; each op is `<module>.<module>`
from . import attention, fused_linear_loss, geglu, gemv, rglru_scan, rms_norm, rope, swap  # noqa: E402
from .interpret import INTERPRET, OutOfBoundsError, bounds_checked  # noqa: E402
from .swap import use_triton  # noqa: E402

__all__ = ["INTERPRET", "OutOfBoundsError", "bounds_checked", "attention", "fused_linear_loss", "geglu", "gemv",
           "rglru_scan", "rms_norm", "rope", "swap", "use_triton"]
