import torch


def _q8(raw, shape, scale_dtype=torch.float16, signed=True, scale_last=False, out=torch.float32):
    b = raw.reshape(-1, 34)
    d_bytes, q_bytes = (b[:, 32:], b[:, :32]) if scale_last else (b[:, :2], b[:, 2:])
    d = d_bytes.contiguous().view(scale_dtype).to(out)
    q = q_bytes.contiguous().view(torch.int8 if signed else torch.uint8).to(out)
    return (q * d).reshape(shape)


def _q4k(raw, shape, min_sign=-1.0, nibbles="grouped", top_bits=True, min_scale="dmin", abs_scales=False):
    b = raw.reshape(-1, 144)
    N = b.shape[0]
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    if abs_scales:
        d, dmin = d.abs(), dmin.abs()
    s = b[:, 4:16].to(torch.int32)
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    if top_bits:
        sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], 1)
        m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], 1)
    else:
        sc = torch.cat([lo_sc & 63, hi & 0xF], 1)
        m = torch.cat([lo_m & 63, hi >> 4], 1)
    qs = b[:, 16:]
    if nibbles == "grouped":
        q = torch.cat([qs.reshape(N, 4, 1, 32) & 0xF, qs.reshape(N, 4, 1, 32) >> 4], 2).reshape(N, 8, 32)
    else:  # low, high nibble of each byte as consecutive weights
        q = torch.stack([qs & 0xF, qs >> 4], -1).reshape(N, 8, 32)
    off = (dmin if min_scale == "dmin" else d) * m.float()
    return ((d * sc.float())[:, :, None] * q.float() + min_sign * off[:, :, None]).reshape(shape)


MUTANTS = {
    "05.dequantize_q8_0": [
        ("scale read as bfloat16, not float16", lambda r, s: _q8(r, s, scale_dtype=torch.bfloat16)),
        ("quants read as unsigned bytes", lambda r, s: _q8(r, s, signed=False)),
        ("scale taken from the end of the block", lambda r, s: _q8(r, s, scale_last=True)),
        ("multiplied in float16 (forgot .float())", lambda r, s: _q8(r, s, out=torch.float16)),
        ("returned in float64", lambda r, s: _q8(r, s, out=torch.float64)),
    ],
    "05.dequantize_q4_k": [
        ("min added instead of subtracted", lambda r, s: _q4k(r, s, min_sign=1.0)),
        ("nibbles interleaved byte by byte", lambda r, s: _q4k(r, s, nibbles="interleaved")),
        ("top 2 bits of scales/mins 4-7 dropped", lambda r, s: _q4k(r, s, top_bits=False)),
        ("min scaled by d instead of dmin", lambda r, s: _q4k(r, s, min_scale="d")),
        ("returned in float64", lambda r, s: _q4k(r, s).double()),
        ("d and dmin read as magnitudes (abs)", lambda r, s: _q4k(r, s, abs_scales=True)),
    ],
}

CORRECT = {
    "05.dequantize_q8_0": [
        ("numpy frombuffer", lambda r, s: _q8_numpy(r, s)),
    ],
    "05.dequantize_q4_k": [
        ("scales unpacked from the low and high byte groups", lambda r, s: _q4k(r, s)),
    ],
}


def _q8_numpy(raw, shape):
    import numpy as np

    b = raw.numpy().reshape(-1, 34)
    d = np.ascontiguousarray(b[:, :2]).view(np.float16).astype(np.float32)
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return torch.from_numpy(d * q).reshape(shape)


# --------------------------------------------------------------------------------------------
# 05.gguf_header
# --------------------------------------------------------------------------------------------
import struct  # noqa: E402

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _parse(data, reverse=True, absolute=True, aligned=True, read_alignment=True, str_len="<Q", counts="tensors first",
           f32="<f"):
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take(str_len)
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            return [value(et) for _ in range(n)]
        return take(f32 if t == 6 else _FMT[t])

    assert data[:4] == b"GGUF"
    pos = 4
    version = take("<I")
    n_tensors, n_kv = take("<Q"), take("<Q")
    if counts == "metadata first":
        n_tensors, n_kv = n_kv, n_tensors
    meta = []
    for _ in range(n_kv):
        key = string()
        meta.append((key, value(take("<I"))))
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        dims = [take("<Q") for _ in range(n_dims)]
        if reverse == "2-D only":  # (dims[1], dims[0]) written for matrices, other shapes left as stored
            shape = (dims[1], dims[0]) if n_dims == 2 else tuple(dims)
        else:
            shape = tuple(reversed(dims)) if reverse else tuple(dims)
        infos.append((name, shape, take("<I"), take("<Q")))
    align = dict(meta).get("general.alignment", 32) if read_alignment else 32
    start = -(-pos // align) * align if aligned else pos
    return version, meta, [(n, s, t, (start + o) if absolute else o) for n, s, t, o in infos]


MUTANTS.update({
    "05.gguf_header": [
        ("dims kept in ggml order (fastest first)", lambda d: _parse(d, reverse=False)),
        ("only 2-D shapes reversed (3-D and 4-D kept in ggml order)", lambda d: _parse(d, reverse="2-D only")),
        ("offsets relative to the data start", lambda d: _parse(d, absolute=False)),
        ("the data starts right after the header (not aligned)", lambda d: _parse(d, aligned=False)),
        ("alignment always 32 (general.alignment ignored)", lambda d: _parse(d, read_alignment=False)),
        ("string lengths read as u32", lambda d: _parse(d, str_len="<I")),
        ("the two counts read in the other order", lambda d: _parse(d, counts="metadata first")),
        ("float32 values read as float64", lambda d: _parse(d, f32="<d")),
    ],
})

CORRECT.update({
    "05.gguf_header": [("shapes as lists, offsets as ints", lambda d: (lambda v, m, t: (
        v, m, [(n, list(s), ty, int(o)) for n, s, ty, o in t]))(*_parse(d)))],
})
