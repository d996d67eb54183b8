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
           f32="<f", float_start=False):
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
    if float_start:  # rounded up with a float division, as numpy.ceil(pos / align) * align does
        start = float(-(-pos // align) * align)
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
        ("offsets as floats (the data start rounded up with a float division)", lambda d: _parse(d, float_start=True)),
    ],
})

CORRECT.update({
    "05.gguf_header": [("shapes as lists, offsets as ints", lambda d: (lambda v, m, t: (
        v, m, [(n, list(s), ty, int(o)) for n, s, ty, o in t]))(*_parse(d)))],
})


# --------------------------------------------------------------------------------------------
# 05.quantize_int8_rows
# --------------------------------------------------------------------------------------------
def _int8(w, per="row", levels=127.0, rounding="even", floor=1e-12, to_float=True):
    w = w.float() if to_float else w
    amax = w.abs().amax(dim=1) if per == "row" else w.abs().amax().expand(w.shape[0])
    scale = (amax.clamp(min=floor) if floor else amax) / levels
    x = w / scale[:, None]
    if rounding == "even":
        x = torch.round(x)
    elif rounding == "away":  # half away from zero (C's roundf)
        x = torch.sign(x) * torch.floor(x.abs() + 0.5)
    else:  # truncation toward zero
        x = torch.trunc(x)
    return x.clamp(-127, 127).to(torch.int8), scale


MUTANTS.update({
    "05.quantize_int8_rows": [
        ("one scale for the whole matrix, not per row", lambda w: _int8(w, per="tensor")),
        ("scale = max / 128", lambda w: _int8(w, levels=128.0)),
        ("codes truncated toward zero, not rounded", lambda w: _int8(w, rounding="trunc")),
        ("halves rounded away from zero (roundf), not to even", lambda w: _int8(w, rounding="away")),
        ("no floor for an all-zero row (0 / 0)", lambda w: _int8(w, floor=None)),
        ("an all-zero row's scale set to 1 / 127 instead", lambda w: (lambda q, s: (q, torch.where(
            s == 1e-12 / 127, torch.tensor(1 / 127), s)))(*_int8(w))),
        ("a bfloat16 weight kept in bfloat16 (scales in bfloat16)", lambda w: _int8(w, to_float=False)),
        ("codes returned as float32, not int8", lambda w: (lambda q, s: (q.float(), s))(*_int8(w))),
    ],
    "05.q8_0_round_trip": [],  # filled below
})

CORRECT.update({
    "05.quantize_int8_rows": [
        ("scale from torch.max of |w| per row, float64 division", lambda w: (lambda wf: (lambda s: (
            torch.round(wf.double() / s.double()[:, None]).clamp(-127, 127).to(torch.int8), s))(
            torch.max(wf.abs(), dim=1).values.clamp(min=1e-12) / 127))(w.float())),
    ],
})


# --------------------------------------------------------------------------------------------
# 05.q8_0_round_trip
# --------------------------------------------------------------------------------------------
def _q8_rt(x, stored="fp16", codes_by="fp32", raise_on_bad=True, zero_rule=True, per="block", rounding="even",
           reciprocal=False):
    N, K = x.shape
    if K % 32:
        if raise_on_bad:
            raise ValueError("not whole blocks")
        x = torch.cat([x, torch.zeros(N, 32 - K % 32)], 1)  # padded with zeros, cut back after
    b = x.float().reshape(N, -1, 32)
    if per == "block":
        d = b.abs().amax(-1, keepdim=True) / 127
    else:  # one d per row
        d = b.abs().amax((-1, -2), keepdim=True).expand(N, b.shape[1], 1) / 127
    d16 = d.half().float()
    div = d if codes_by == "fp32" else d16
    if zero_rule:
        div = torch.where(div == 0, 1.0, div)
    y = b * (1 / div) if reciprocal else b / div
    q = torch.round(y) if rounding == "even" else torch.sign(y) * torch.floor(y.abs() + 0.5)
    out = q * (d16 if stored == "fp16" else d)
    return out.reshape(N, -1)[:, :K]


MUTANTS["05.q8_0_round_trip"] += [
    ("dequantised with the float32 d, not the stored float16 one", lambda x: _q8_rt(x, stored="fp32")),
    ("codes divided by the float16 d", lambda x: _q8_rt(x, codes_by="fp16")),
    ("a row of 40 padded with zeros instead of refused", lambda x: _q8_rt(x, raise_on_bad=False)),
    ("a block of zeros divides 0 by 0", lambda x: _q8_rt(x, zero_rule=False)),
    ("one d per row, not per block", lambda x: _q8_rt(x, per="row")),
    ("blocks of 32 down the columns", lambda x: _q8_rt(x.T.contiguous().reshape(-1, 32)).reshape(
        x.shape[1], x.shape[0]).T if x.shape[1] % 32 == 0 and x.numel() % 32 == 0 else _q8_rt(x)),
    ("returned in float16", lambda x: _q8_rt(x).half()),
    ("refuses only rows longer than a block: a row of 31 crashes instead of raising a ValueError",
     lambda x: _q8_rt(x) if x.shape[1] > 32 or x.shape[1] % 32 == 0 else x.reshape(x.shape[0], -1, 32)),
    ("checks the whole tensor (N·K a multiple of 32), not each row: blocks cut across rows",
     lambda x: _q8_rt(x.reshape(-1, 32)).reshape(x.shape) if x.numel() % 32 == 0 else _q8_rt(x)),
]

CORRECT.update({
    "05.q8_0_round_trip": [
        ("llama.cpp's way: multiply by 1/d, round halves away from zero",
         lambda x: _q8_rt(x, rounding="away", reciprocal=True)),
        ("through the package's Q8_0 dequantiser on bytes written by hand", lambda x: _q8_bytes_round_trip(x)),
    ],
})


def _q8_bytes_round_trip(x):
    from minigemma.weights.gguf import dequantize_q8_0

    N, K = x.shape
    if K % 32:
        raise ValueError(f"{K} is not a multiple of 32")
    b = x.reshape(-1, 32)
    d = b.abs().amax(1, keepdim=True) / 127
    q = torch.round(b / torch.where(d == 0, 1.0, d)).to(torch.int8)
    raw = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], 1).reshape(-1)
    return dequantize_q8_0(raw, (N, K))
