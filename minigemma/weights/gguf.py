"""Reading a GGUF file, llama.cpp's checkpoint format (chapter 05).

A GGUF file is one header followed by one blob of tensor data:

    magic "GGUF" | version (u32) | n_tensors (u64) | n_metadata (u64)
    n_metadata x  (key: string, type: u32, value)          e.g. "gemma3.block_count" = 18
    n_tensors  x  (name: string, n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)
    padding to `general.alignment` (32) | tensor data, each tensor at data_start + offset

Strings are a u64 length then UTF-8 bytes; all integers are little-endian. `dims` lists the
fastest-varying dimension first (ggml's order), so a PyTorch (out, in) weight is stored as
dims (in, out). Each tensor has a ggml type: F32, or a block quantisation (Q8_0, Q5_0, Q4_K,
Q6_K, ...) in which every block of 32 or 256 consecutive weights of a row is stored as a few
scales plus small integers. `GGML_TYPES` lists their sizes; `dequantize_q8_0` and
`dequantize_q4_k` unpack two of them from scratch (the chapter's exercises); the rest use the
`gguf` package's reference dequantiser. `integer_codes` reads a block tensor as integer codes on a
grid (w = a · v + b), `quantization_step` the rounding step of every weight.

This file reads the format and knows nothing of any model: `read_gguf(path)` parses the header
and gives lazy access to each tensor (its bytes, all of it dequantised, or a block of its rows).
What a Gemma 3 file means (llama.cpp's names, its `1 + w` norms, the config facts the header
omits) lives beside the model, in `gemma.py`; `minigemma.pretrained` builds the model from it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .hf import CheckpointError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


# ----------------------------------------------------------------------------------------------
# Tensor types
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: `block_size` weights are stored in `type_size` bytes."""

    name: str
    id: int
    block_size: int
    type_size: int


GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in [
    GGMLType("F32", 0, 1, 4),
    GGMLType("F16", 1, 1, 2),
    GGMLType("Q4_0", 2, 32, 2 + 16),  # fp16 d, 32 x 4-bit
    GGMLType("Q4_1", 3, 32, 2 + 2 + 16),  # fp16 d, fp16 m, 32 x 4-bit
    GGMLType("Q5_0", 6, 32, 2 + 4 + 16),  # fp16 d, 32 high bits, 32 x 4 low bits
    GGMLType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
    GGMLType("Q8_0", 8, 32, 2 + 32),  # fp16 d, 32 x int8
    GGMLType("Q8_1", 9, 32, 4 + 4 + 32),
    GGMLType("Q2_K", 10, 256, 16 + 64 + 2 + 2),
    GGMLType("Q3_K", 11, 256, 32 + 64 + 12 + 2),
    GGMLType("Q4_K", 12, 256, 2 + 2 + 12 + 128),  # fp16 d, fp16 dmin, 8 x (6-bit scale, 6-bit min), 256 x 4-bit
    GGMLType("Q5_K", 13, 256, 2 + 2 + 12 + 32 + 128),
    GGMLType("Q6_K", 14, 256, 128 + 64 + 16 + 2),  # 256 x (4 low + 2 high bits), 16 x int8 scales, fp16 d
    GGMLType("Q8_K", 15, 256, 4 + 256 + 32),
    GGMLType("BF16", 30, 1, 2),
]}
GGML_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}


def ggml_type(t: int | str | GGMLType) -> GGMLType:
    """Look a type up by id (8), name ("Q8_0") or pass a GGMLType through."""
    if isinstance(t, GGMLType):
        return t
    table, key = (GGML_BY_NAME, str(t).upper()) if isinstance(t, str) else (GGML_TYPES, int(t))
    if key not in table:
        raise ValueError(f"unknown ggml type {t!r}; known: {', '.join(GGML_BY_NAME)}")
    return table[key]


def bits_per_weight(t: int | str | GGMLType) -> float:
    """What one weight really costs, scales included: 8 * type_size / block_size.

    F32 32, Q8_0 8.5 (34 bytes / 32), Q6_K 6.5625, Q5_0 5.5, Q4_K 4.5 (144 bytes / 256).
    """
    t = ggml_type(t)
    return 8 * t.type_size / t.block_size


# ----------------------------------------------------------------------------------------------
# Dequantisation (from scratch for Q8_0 and Q4_K; the exercises of chapter 05)
# ----------------------------------------------------------------------------------------------
def _blocks(raw, type_size: int, shape) -> tuple[torch.Tensor, int]:
    """raw bytes -> (n_blocks, type_size) uint8, checked against the number of weights in `shape`."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    elif isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw must be uint8 bytes, got {raw.dtype}")
    raw = raw.reshape(-1)
    n = int(np.prod(shape)) if len(shape) else 1
    if raw.numel() % type_size:
        raise ValueError(f"{raw.numel()} bytes is not a whole number of {type_size}-byte blocks")
    n_blocks = raw.numel() // type_size
    return raw.reshape(n_blocks, type_size), n


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) little-endian bytes -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).float()


def dequantize_q8_0(raw, shape) -> torch.Tensor:
    """Q8_0: blocks of 32 weights, each stored as 34 bytes = one fp16 scale d + 32 int8 q.

    w = d * q. raw: uint8 tensor/bytes of n_blocks * 34; returns float32 `shape` (n_blocks * 32
    weights, row-major). 8.5 bits per weight.
    """
    blocks, n = _blocks(raw, 34, shape)
    if blocks.shape[0] * 32 != n:
        raise ValueError(f"{blocks.shape[0]} Q8_0 blocks hold {blocks.shape[0] * 32} weights, shape {tuple(shape)} needs {n}")
    d = _fp16(blocks[:, :2])  # (N, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (N, 32)
    return (q * d).reshape(shape)


def q4_k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K's 12 scale bytes (N, 12) into 8 six-bit scales and 8 six-bit mins, each (N, 8).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; scales and mins
    4-7 keep their low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2
    bits in the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    s = scales.to(torch.int32)
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], dim=1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return sc, m


def dequantize_q4_k(raw, shape) -> torch.Tensor:
    """Q4_K: super-blocks of 256 weights = 8 sub-blocks of 32, each stored in 144 bytes:

        d (fp16) | dmin (fp16) | 12 bytes: 8 x (6-bit scale, 6-bit min) | 128 bytes: 256 x 4-bit q

    Sub-block j: w = (d * scale_j) * q - dmin * min_j. The 4-bit values come in 4 groups of 32
    bytes; group g holds sub-block 2g in its low nibbles and sub-block 2g+1 in its high nibbles.
    4.5 bits per weight. Returns float32 `shape`.
    """
    blocks, n = _blocks(raw, 144, shape)
    N = blocks.shape[0]
    if N * 256 != n:
        raise ValueError(f"{N} Q4_K blocks hold {N * 256} weights, shape {tuple(shape)} needs {n}")
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])  # (N, 1)
    sc, m = q4_k_scales(blocks[:, 4:16])  # (N, 8)
    qs = blocks[:, 16:].reshape(N, 4, 1, 32)  # 4 groups of 32 bytes
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(N, 8, 32).float()  # (N, sub-block, 32)
    scale = (d * sc.float())[:, :, None]  # (N, 8, 1)
    offset = (dmin * m.float())[:, :, None]
    return (scale * q - offset).reshape(shape)


def integer_codes(raw, t: int | str | GGMLType, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block-quantised 2-D tensor as integer codes on a grid of 32-weight groups: w = a · v + b.

    Returns v (N, K) int16 and a, b (N, K/32) float32, so that a · v + b is exactly `dequantize`'s
    output for Q4_K (v in [0, 15], a = d·scale_j, b = -dmin·min_j), Q5_0 (v = q - 16, a = d, b = 0)
    and Q8_0 (v = q, a = d, b = 0). Q6_K stores a scale per 16 weights; two of them share a group
    here, so the group takes the larger step, a = d·max|scale|, and the half with the smaller scale is
    rounded to that grid (v in [-32, 31]): the one tensor type that is not kept exactly (measured in
    tests/test_gguf.py). These are what `quant.Int4Linear.from_codes` runs on torch's int4 kernel.
    """
    t = ggml_type(t)
    N, K = shape
    blocks, n = _blocks(raw, t.type_size, shape)
    G = K // 32  # groups of 32 per row
    if t.name == "Q8_0":
        d = _fp16(blocks[:, :2]).reshape(N, G)
        v = blocks[:, 2:].contiguous().view(torch.int8).reshape(N, K).to(torch.int16)
        return v, d, torch.zeros_like(d)
    if t.name == "Q5_0":
        d = _fp16(blocks[:, :2]).reshape(N, G)
        qh = blocks[:, 2:6].contiguous().view(torch.int32)  # (n, 1): bit j is element j's fifth bit
        bits = (qh >> torch.arange(32, dtype=torch.int32)) & 1  # (n, 32)
        qs = blocks[:, 6:].to(torch.int32)  # 16 bytes: element j in the low nibble, j + 16 in the high one
        low = torch.cat([qs & 15, qs >> 4], dim=1)  # (n, 32)
        v = (low | (bits << 4)) - 16
        return v.reshape(N, K).to(torch.int16), d, torch.zeros_like(d)
    if t.name == "Q4_K":
        S = blocks.shape[0]  # super-blocks of 256 = 8 groups
        d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])  # (S, 1)
        sc, m = q4_k_scales(blocks[:, 4:16])  # (S, 8)
        qs = blocks[:, 16:].reshape(S, 4, 1, 32)
        v = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(S, 8, 32)  # group 2g: low nibbles, 2g + 1: high
        a = (d * sc.float()).reshape(N, G)
        b = -(dmin * m.float()).reshape(N, G)
        return v.reshape(N, K).to(torch.int16), a, b
    if t.name == "Q6_K":
        S = blocks.shape[0]
        ql, qh = blocks[:, :128].to(torch.int32), blocks[:, 128:192].to(torch.int32)
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (S, 16): one per 16 weights
        d = _fp16(blocks[:, 208:210])  # (S, 1)
        # ggml's layout: two halves of 128; in each, 32 lanes l give elements l, l+32, l+64, l+96
        ql = ql.reshape(S, 2, 1, 64) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)
        ql = (ql & 0xF).reshape(S, 2, 2, 2, 32)  # [half, nibble, byte-half, lane]
        qh = (qh.reshape(S, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3  # [half, shift, lane]
        lowbits = torch.stack([ql[:, :, 0, 0], ql[:, :, 0, 1], ql[:, :, 1, 0], ql[:, :, 1, 1]], dim=2)  # l, l+32, l+64, l+96
        q = (lowbits | (qh << 4)).reshape(S, 256) - 32  # in [-32, 31]
        step = (d * scales).repeat_interleave(16, dim=1)  # (S, 256): d · scale of each weight's 16
        w = step * q
        a = (d.abs() * scales.abs()).reshape(S, 8, 2).amax(-1).reshape(N, G)  # the larger step of each 32
        v = torch.round(w.reshape(N, G, 32) / torch.where(a == 0, 1.0, a)[..., None]).clamp(-32, 31)
        return v.reshape(N, K).to(torch.int16), a, torch.zeros_like(a)
    raise NotImplementedError(f"integer_codes: {t.name} (types in this course's file: Q4_K, Q5_0, Q6_K, Q8_0)")


def dequantize(raw, t: int | str | GGMLType, shape) -> torch.Tensor:
    """Any ggml type -> float32 tensor of `shape` (PyTorch order). Q8_0 and Q4_K use this
    module's code; other quantised types use the `gguf` package's reference implementation."""
    t = ggml_type(t)
    shape = tuple(int(s) for s in shape)
    if t.name == "Q8_0":
        return dequantize_q8_0(raw, shape)
    if t.name == "Q4_K":
        return dequantize_q4_k(raw, shape)
    arr = np.asarray(raw, dtype=np.uint8) if not isinstance(raw, torch.Tensor) else raw.numpy()
    if t.name in ("F32", "F16"):
        return torch.from_numpy(arr.view(np.float32 if t.name == "F32" else np.float16).copy()).float().reshape(shape)
    if t.name == "BF16":
        return torch.from_numpy(arr.copy()).view(torch.bfloat16).float().reshape(shape)
    from gguf.quants import dequantize as gguf_dequantize

    out = gguf_dequantize(arr.reshape(-1), t.id)  # float32, flat
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)


def quantization_step(raw, t: int | str | GGMLType, shape) -> torch.Tensor:
    """The rounding step Δ of every weight, float32 of `shape` (0 for float types).

    Q8_0, Q5_0: the block's d. Q4_K: d * scale_j of the weight's 32-weight sub-block. Q6_K:
    d * scale_j of its 16-weight sub-block. A weight rounded to a grid of step Δ is off by at
    most Δ/2 from the value before quantisation, and by Δ/√12 RMS if that error is uniform.
    """
    t = ggml_type(t)
    if t.block_size == 1:
        return torch.zeros(shape)
    blocks, n = _blocks(raw, t.type_size, shape)
    N = blocks.shape[0]
    if t.name in ("Q8_0", "Q5_0"):
        step = _fp16(blocks[:, :2]).expand(N, 32)
    elif t.name == "Q4_K":
        sc, _ = q4_k_scales(blocks[:, 4:16])
        step = (_fp16(blocks[:, 0:2]) * sc.float()).repeat_interleave(32, dim=1)
    elif t.name == "Q6_K":
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (N, 16)
        step = (_fp16(blocks[:, 208:210]) * scales).abs().repeat_interleave(16, dim=1)
    else:
        raise NotImplementedError(f"quantization_step: {t.name} is not in this course's file")
    return step.abs().reshape(shape)


# ----------------------------------------------------------------------------------------------
# The container
# ----------------------------------------------------------------------------------------------
# metadata value type -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    """One tensor's entry in the header. `shape` is in PyTorch order (ggml's dims reversed)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int  # absolute position of the first byte in the file
    n_bytes: int

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class GGUFFile:
    """A parsed GGUF header; tensor bytes are read lazily from a memory map."""

    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data_start: int
    _mm: np.ndarray = field(repr=False, default=None)

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of tensor `name` as a uint8 tensor (a copy, read from the file: the memory
        map is kept for the header only, so its pages do not count twice in the process's memory)."""
        info = self.tensors[name]
        out = torch.empty(info.n_bytes, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(info.offset)
            if fh.readinto(out.numpy()) != info.n_bytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short: truncated file")
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, dequantised to float32, in PyTorch order."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        info = self.tensors[name]
        return dequantize(self.raw(name), info.type, info.shape)

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows start..end-1 of a tensor (elements, for a 1-D one), dequantised to float32 (a row is
        whole blocks, so its bytes are contiguous and nothing else is read)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        info = self.tensors[name]
        n_rows, rest = info.shape[0], info.shape[1:]
        row_bytes = info.n_bytes // n_rows
        out = torch.empty((end - start) * row_bytes, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(info.offset + start * row_bytes)
            if fh.readinto(out.numpy()) != out.numel():
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short: truncated file")
        return dequantize(out, info.type, (end - start, *rest))


class _Cursor:
    """Sequential little-endian reads from a byte buffer, with a clear error past the end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: the header ends early at byte {len(self.buf)} "
                                  f"(wanted {n} bytes at {self.pos}): truncated or not a GGUF file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > len(self.buf):
            raise CheckpointError(f"{self.path}: a string of {n} bytes at byte {self.pos}: corrupt header")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY:  # numeric arrays in one go
                dt = np.dtype(_NUMPY[etype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).copy()
            if count > len(self.buf):
                raise CheckpointError(f"{self.path}: an array of {count} items at byte {self.pos}: corrupt header")
            return [self.value(etype) for _ in range(count)]
        raise CheckpointError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}: corrupt header")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and check that every tensor's bytes lie inside the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF header")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)
    magic = bytes(cur.take(4))
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > size or n_kv > size:
        raise CheckpointError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys: corrupt")

    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 4:
            raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dims: corrupt header")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        if type_id not in GGML_TYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {type_id}")
        infos.append((name, tuple(reversed(dims)), GGML_TYPES[type_id], offset))

    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // align) * align  # round up
    tensors = {}
    for name, shape, t, offset in infos:
        n = int(np.prod(shape))
        if n % t.block_size:
            raise CheckpointError(f"{path}: tensor {name!r} of {n} weights is not whole {t.name} blocks")
        info = TensorInfo(name, shape, t, data_start + offset, n // t.block_size * t.type_size)
        if info.offset + info.n_bytes > size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {info.offset + info.n_bytes} but the "
                                  f"file has {size} bytes: truncated (re-run `python -m minigemma fetch`)")
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice")
        tensors[name] = info
    return GGUFFile(path, version, metadata, tensors, data_start, mm)


# ----------------------------------------------------------------------------------------------
# The vocabulary
# ----------------------------------------------------------------------------------------------
def gguf_vocabulary(f: GGUFFile) -> list[str]:
    """The token strings stored in the GGUF (`tokenizer.ggml.tokens`)."""
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{f.path}: no tokenizer.ggml.tokens in the metadata")
    return list(tokens)
