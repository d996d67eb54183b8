"""Small helpers shared by the kernels and their launchers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch
import triton
import triton.language as tl
from torch import nn

from minigemma.swap import Swap, swap_modules

from .interpret import INTERPRET


@dataclass(frozen=True)
class DeviceProps:
    """What the launch configurations depend on: a GPU's limits, as CUDA reports them. The launchers
    choose tiles, warps, stages and splits from these, so a machine without the GPU (`kernels.aot`)
    computes the configuration the GPU would run."""

    name: str
    capability: tuple[int, int]  # (major, minor): 9.0 H100, 8.0 A100
    sm_count: int  # streaming multiprocessors
    smem_per_block: int  # bytes of shared memory one program may use (the opt-in maximum)
    smem_per_sm: int  # bytes of shared memory per SM (all resident programs together)
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


# published values (CUDA programming guide, compute capabilities 9.0 and 8.0; H100 SXM5, A100 SXM4)
H100 = DeviceProps("H100", (9, 0), 132, 232448, 233472)  # 227 KiB per block (opt-in), 228 KiB per SM
A100 = DeviceProps("A100", (8, 0), 108, 166912, 167936)  # 163 KiB per block (opt-in), 164 KiB per SM


def device_props(device: torch.device) -> DeviceProps | None:
    """The props of a CUDA device (None for the CPU: the interpreter has no limits to fit)."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    per_block = getattr(p, "shared_memory_per_block_optin", 0) or (232448 if p.major >= 9 else 166912)
    per_sm = getattr(p, "shared_memory_per_multiprocessor", 0) or per_block + 1024
    return DeviceProps(p.name, (p.major, p.minor), p.multi_processor_count, per_block, per_sm,
                       getattr(p, "regs_per_multiprocessor", 65536) or 65536,
                       getattr(p, "max_threads_per_multi_processor", 2048) or 2048)


@triton.jit
def tanh(u):
    """tanh in float32 for GeGLU's gelu and the soft-caps (attention, the fused loss's logits)."""
    # tanh(u) = sign(u) · (1 − e) / (1 + e), e = exp(−2|u|) in (0, 1]: never overflows, saturates to ±1
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


def retype_modules(model: nn.Module, table: Mapping[type, Swap]) -> Counter:
    """`minigemma.swap.swap_modules` over `model`'s submodules and `model` itself, for tables of swaps that
    keep the object (`retype`): swap_modules never swaps its root (it has no parent to hold a new module),
    but a retyped root is still the caller's object, so one layer alone can be swapped too."""
    return swap_modules(nn.ModuleList([model]), table)  # a holder: `model` is its child


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """Every tensor on one device, and one the kernels can run on: a GPU, or the CPU in the interpreter."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) != 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{n} on {t.device}" for n, t in given.items()))
    (device,) = devices
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("Triton kernels need a GPU tensor here; to run them on CPU, set TRITON_INTERPRET=1 before "
                         "importing minigemma.kernels (done by itself on a machine without a GPU)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"no Triton kernels for device {device}")
    return device


def num_warps(block_elements: int) -> int:
    """Warps for a program working on `block_elements` values at once: about 8-16 values per thread."""
    return max(1, min(16, block_elements // 256))


def lead_rows(x: torch.Tensor):
    """View x (..., C) as rows: (x, (N0, N1, N2), (s0, s1, s2)) with row r = (i0, i1, i2) in row-major order.

    Up to three leading dims keep their own strides, so a (B, H, T, D) view of a (B, T, H, D)
    projection is read in place; more leading dims are flattened (a copy only if they must be).
    The last dim must be contiguous, and is made so if it is not.
    """
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() > 4:
        x = x.reshape(-1, x.shape[-1])
    lead, strides = tuple(x.shape[:-1]), tuple(x.stride()[:-1])
    pad = 3 - len(lead)
    return x, (1,) * pad + lead, (0,) * pad + strides
