"""Small helpers shared by the kernels' launchers."""

from __future__ import annotations

import torch

from .interpret import INTERPRET


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
