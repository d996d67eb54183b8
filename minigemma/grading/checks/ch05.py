"""Chapter 05: the GGUF header, block quantisation dequantised from scratch, and quantising: int8 rows and Q8_0."""

import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...quant import int8_rows, q8_0_blocks
from ...weights.gguf import GGML_TYPES, dequantize_q4_k, dequantize_q8_0, read_gguf
from ..exercise import Case, Exercise, register


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(N,) floats -> (N, 2) little-endian fp16 bytes."""
    return values.half().reshape(-1, 1).view(torch.uint8)


def _q8_0_blocks(g, n_blocks, scale=0.02):
    d = torch.randn(n_blocks, generator=g) * scale
    q = torch.randint(-128, 128, (n_blocks, 32), generator=g, dtype=torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=1).reshape(-1)  # (n_blocks * 34,)


def _q4_k_blocks(g, n_blocks):
    d = torch.rand(n_blocks, generator=g) * 0.01
    dmin = torch.rand(n_blocks, generator=g) * 0.01
    rest = torch.randint(0, 256, (n_blocks, 140), generator=g, dtype=torch.uint8)  # 12 scale bytes + 128 nibbles
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), rest], dim=1).reshape(-1)  # (n_blocks * 144,)


def _q8_0_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(f"shape {shape}", (_q8_0_blocks(g, n), shape))
             for n, shape in [(1, (32,)), (4, (2, 64)), (15, (3, 160)), (20, (1, 640))]]
    neg = _q8_0_blocks(g, 2)
    neg[:2] = _fp16_bytes(torch.tensor([-0.5]))  # a negative scale
    neg[2:34] = torch.tensor([-128] * 16 + [127] * 16, dtype=torch.int8).view(torch.uint8)  # extremes
    cases.append(Case("negative scale, q = -128 and 127", (neg, (64,))))
    zero = _q8_0_blocks(g, 1)
    zero[:2] = 0
    cases.append(Case("zero scale", (zero, (32,))))
    big = _q8_0_blocks(g, 1)
    big[:2] = _fp16_bytes(torch.tensor([30_000.0]))  # d·q reaches 3.8e6: past float16's 65504
    cases.append(Case("large scale (d·q overflows float16)", (big, (32,))))
    return cases


def _q4_k_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(f"shape {shape}", (_q4_k_blocks(g, n), shape))
             for n, shape in [(1, (256,)), (2, (2, 256)), (3, (3, 256)), (5, (1, 1280))]]
    top = _q4_k_blocks(g, 1)
    top[4:16] = 255  # every 6-bit scale and min at its maximum (63): the packed top bits matter
    cases.append(Case("all scales and mins 63", (top, (256,))))
    neg = _q4_k_blocks(g, 2)
    neg[0:2] = _fp16_bytes(torch.tensor([-0.004]))
    neg[146:148] = _fp16_bytes(torch.tensor([-0.003]))  # dmin of the second block
    cases.append(Case("negative d and dmin", (neg, (2, 256))))
    return cases


register(Exercise(
    "05.dequantize_q8_0", _q8_0_cases, dequantize_q8_0, exact_types=True,
    description="Q8_0 bytes (n_blocks*34,) uint8 -> float32 weights of `shape`: w = d * q.",
    hint="Each block is 34 bytes: a scale and 32 codes. How do you read two bytes as the float16 they are "
         "(not as two numbers to convert), the codes as signed, and in which dtype must the product be taken?",
    recipe="1. Reshape the bytes to one row per block: (n_blocks, 34). 2. Bytes 0 and 1 of a row are d: "
           "reinterpret those two bytes as one float16 (a view of the same bits, made contiguous first, not a "
           "conversion of the byte values), giving (n_blocks, 1). 3. Bytes 2 to 33 are the 32 codes q: "
           "reinterpret them as int8, so they are signed (−128 … 127), not 0 … 255. 4. Convert d and q to "
           "float32 before multiplying: d·q can pass float16's 65504. 5. Multiply, each block's codes by its "
           "own d (negative and zero scales included), and reshape to the requested shape; return float32."))
register(Exercise(
    "05.dequantize_q4_k", _q4_k_cases, dequantize_q4_k, exact_types=True,
    description="Q4_K bytes (n_blocks*144,) uint8 -> float32 weights of `shape`: "
                "w = d * scale_j * q - dmin * min_j.",
    hint="A super-block of 256 weights is 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed "
         "into 12 bytes. Where do the top two bits of scales and mins 4 to 7 live, and which sub-block does a "
         "low or a high nibble belong to?",
    recipe="1. Reshape the bytes to one row per super-block: (n, 144). 2. d is bytes 0–1 and dmin bytes 2–3, "
           "each reinterpreted as a float16 (not converted), then used in float32. 3. The 12 scale bytes "
           "(4–15): convert them to int32 before any shifting. Call them b0 … b11. For j = 0 … 3, the scale "
           "sc_j is the low 6 bits of byte j and the min m_j the low 6 bits of byte j + 4. For j = 4 … 7, sc_j "
           "is the low nibble of byte j + 4 plus, as bits 4 and 5, the top two bits of byte j − 4; m_j is the "
           "high nibble of byte j + 4 plus, as bits 4 and 5, the top two bits of byte j. (All scales 63 tests "
           "those top bits.) 4. The codes: bytes 16–143 are 4 groups of 32 bytes; group g holds sub-block 2g "
           "in its low nibbles (the low 4 bits) and sub-block 2g + 1 in its high nibbles (shifted down by 4), "
           "giving (n, 8, 32) codes q from 0 to 15. 5. Sub-block j's weights are d · sc_j · q − dmin · m_j, in "
           "float32 (d and dmin may be negative). 6. Reshape to the requested shape and return float32."))


# --------------------------------------------------------------------------------------------
# The GGUF header and tensor table
# --------------------------------------------------------------------------------------------
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GGUFBytes(bytes):
    """A case's file contents; shown by its length and first bytes, not all of them."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes of GGUF: {bytes(self[:12])!r}...>"


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(_FORMATS[vtype], value)


def gguf_bytes(metadata, tensors, version=3, g=None) -> GGUFBytes:
    """A small GGUF file, written here from the format's description (tests/test_grading.py reads it
    back with the `gguf` package too). metadata: [(key, type id, value)], an array's value being
    (element type id, [items]); tensors: [(name, PyTorch shape, ggml type id)], stored in order, each
    at an offset rounded up to the alignment, their bytes random."""
    align = next((v for k, _, v in metadata if k == "general.alignment"), 32)
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    out += [_string(k) + struct.pack("<I", t) + _value(t, v) for k, t, v in metadata]
    offset, sizes = 0, []
    for name, shape, type_id in tensors:
        t = GGML_TYPES[type_id]
        n_bytes = int(np.prod(shape)) // t.block_size * t.type_size
        dims = list(reversed(shape))  # ggml lists the fastest-varying dimension first
        out.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                   + struct.pack("<IQ", type_id, offset))
        sizes.append((offset, n_bytes))
        offset = -(-(offset + n_bytes) // align) * align
    file = bytearray(b"".join(out))
    header_length, data_start = len(file), -(-len(file) // align) * align
    for start, n_bytes in sizes:
        file += bytes(data_start + start - len(file))  # zero padding up to the tensor's offset
        file += bytes(torch.randint(0, 256, (n_bytes,), generator=g, dtype=torch.uint8).tolist())
    out = GGUFBytes(file)
    out.header_length = header_length
    return out


def _aligned_64(g) -> GGUFBytes:
    """general.alignment = 64, with a header whose end rounds up differently to 32 and to 64 (a name of
    the right length), so that only the file's own alignment gives the right data start."""
    for n in range(64):
        meta = [("general.alignment", 4, 64), ("general.name", STRING, "x" * n)]
        data = gguf_bytes(meta, [("a", (3,), 0), ("b", (7,), 0)], 3, g)
        if 0 < data.header_length % 64 <= 32:
            return data
    raise AssertionError("unreachable: some name length puts the header end in the first half of 64")


def _gguf_cases(seed):
    g = torch.Generator().manual_seed(seed)
    F32, F16, Q8_0, Q4_K = 0, 1, 8, 12
    every_scalar = [(f"test.{name}", t, v) for name, t, v in [
        ("u8", 0, 200), ("i8", 1, -100), ("u16", 2, 60_000), ("i16", 3, -30_000), ("u32", 4, 4_000_000_000),
        ("i32", 5, -2_000_000_000), ("f32", 6, 0.1), ("bool", 7, True), ("u64", 10, 2 ** 40 + 1),
        ("i64", 11, -(2 ** 40)), ("f64", 12, 1 / 3)]]
    n_keys = int(torch.randint(1, 5, (1,), generator=g))
    rand_meta = [(f"random.key{i}", 4, int(torch.randint(0, 2 ** 31, (1,), generator=g))) for i in range(n_keys)]
    rand_shapes = [(int(torch.randint(1, 4, (1,), generator=g)), 32 * int(torch.randint(1, 4, (1,), generator=g)))
                   for _ in range(3)]
    specs = [
        # valid, and all header: the last read ends exactly at the file's end (24 bytes)
        ("an empty file: no metadata, no tensors (24 bytes)", [], [], 3),
        ("no metadata, one F32 tensor of 3", [], [("w", (3,), F32)], 3),
        ("one uint32 key", [("gemma3.block_count", 4, 18)], [("w", (2,), F32)], 3),
        ("a string key and a float32 key",
         [("general.architecture", STRING, "gemma3"), ("gemma3.attention.layer_norm_rms_epsilon", 6, 1e-6)],
         [("w", (4,), F32)], 3),
        ("version 2", [("general.name", STRING, "tiny")], [("w", (2,), F32)], 2),
        ("two tensors: the second starts at the next multiple of 32",
         [("general.name", STRING, "two")], [("a", (5,), F32), ("b", (2, 3), F16)], 3),
        ("tensors of 1, 2, 3 and 4 dims (ggml's most): every shape reversed whole",
         [], [("v", (3,), F32), ("m", (2, 3), F16), ("t3", (2, 3, 4), F32), ("t4", (2, 1, 3, 5), F16)], 3),
        ("arrays: int32, float32 and strings (as the tokenizer's)",
         [("tokenizer.ggml.token_type", ARRAY, (5, [1, 3, 1])), ("tokenizer.ggml.scores", ARRAY, (6, [0.5, -1.25])),
          ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<pad>", "▁the", "é"]))], [("w", (2,), F32)], 3),
        ("every scalar type", every_scalar, [("w", (1,), F32)], 3),
        ("quantised 2-D tensors: shapes in PyTorch order, blocks of 32 and 256",
         [("general.architecture", STRING, "gemma3")],
         [("blk.0.attn_q.weight", (4, 64), Q8_0), ("token_embd.weight", (3, 256), Q4_K), ("output_norm.weight", (64,), F32)], 3),
        ("random keys and tensors", rand_meta, [(f"t{i}", s, Q8_0) for i, s in enumerate(rand_shapes)], 3),
    ]
    cases = [Case(label, (gguf_bytes(meta, tensors, version, g),)) for label, meta, tensors, version in specs]
    cases.insert(6, Case("general.alignment = 64: the data starts at a multiple of 64", (_aligned_64(g),)))
    return cases


def gguf_header_reference(data: bytes):
    """`read_gguf` on a file holding `data`: (version, [(key, value)] in file order with arrays as lists,
    [(name, shape, ggml type id, absolute offset of its first byte)])."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.gguf"
        path.write_bytes(data)
        f = read_gguf(path)
        header = (f.version, [(k, v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.metadata.items()],
                  [(t.name, t.shape, t.type.id, t.offset) for t in f.tensors.values()])
        del f  # its memory map, before the folder goes
    return header


register(Exercise(
    "05.gguf_header", _gguf_cases, gguf_header_reference, atol=0.0, rtol=0.0, exact_types=True,
    description="Parse a GGUF file's header (bytes): (version, [(key, value)] in file order, "
                "[(name, shape in PyTorch order, ggml type id, absolute offset)]); version, dims, type ids and offsets "
                "are ints.",
    hint="Everything is little-endian and read in order, so keep a cursor that every read moves on. How is a "
         "string stored, how an array, in which order does a tensor list its dims, and where does the data "
         "that the offsets count from begin?",
    recipe="1. Keep a byte position; each read unpacks a little-endian number of a fixed size at it and moves "
           "it on. 2. The fixed start: 4 magic bytes, a u32 version, a u64 tensor count and a u64 key count. "
           "3. Each key: a string (a u64 length, then that many UTF-8 bytes), a u32 value type, then the value "
           "in that type: u8, i8, u16, i16, u32, i32, f32, bool (one byte), string, array, u64, i64, f64 (type "
           "ids 0 to 12 in that order, 8 a string and 9 an array). An array is a u32 element type, a u64 count, "
           "then the elements, strings included; return it as a list. Keep the keys in file order. 4. Each "
           "tensor: its name (a string), a u32 number of dims, that many u64 dims, fastest first (reverse them "
           "for PyTorch's order), a u32 ggml type id and a u64 offset. 5. The data starts where the header "
           "ends, rounded up to a multiple of general.alignment (32 if the key is absent); each tensor's "
           "absolute offset is that start plus its own offset; round up with whole-number arithmetic, so that "
           "every offset stays an int. 6. Return the version, the (key, value) pairs and the (name, shape, type "
           "id, absolute offset) tuples."))


# --------------------------------------------------------------------------------------------
# Quantising: symmetric int8 per row (Int8Linear), and Q8_0 there and back
# --------------------------------------------------------------------------------------------
def _int8_cases(seed):
    """w (N, K) float32 (one case bfloat16). Each small case isolates one mistake; codes that come out
    whole numbers (a scale of a power of two) leave the rounding out of the cases that are not about it."""
    g = torch.Generator().manual_seed(seed)
    sign = 1.0 if torch.rand(1, generator=g) < 0.5 else -1.0
    one = torch.full((1, 1), sign * 127.0 * 2.0 ** -float(torch.randint(5, 10, (1,), generator=g)))  # scale 2^-k
    cases = [Case("a row of one weight: its code is ±127 and its scale |w| / 127 (not / 128)", (one,))]
    # one row, scale 1: round(2.7) = 3 and round(-3.6) = -4, where truncation gives 2 and -3
    cases.append(Case("round to the nearest code: 2.7 -> 3 and -3.6 -> -4 (truncating toward zero gives 2 and -3)",
                      (torch.tensor([[127.0, 2.7, -3.6]]),)))
    # two rows, scales 2^-7 and 2^-1: every code whole, so only the scale's extent matters
    rows = torch.tensor([[127.0, -64.0, 5.0], [127.0, 32.0, -100.0]]) * torch.tensor([[2.0 ** -7], [0.5]])
    cases.append(Case("rows of very different sizes: one scale per row, not one for the whole matrix", (rows,)))
    cases.append(Case("halves round to even, as torch.round does: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2",
                      (torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5]]),)))
    zero = torch.tensor([[0.0, 0.0, 0.0], [64.0, -127.0, 32.0]]) * 2.0 ** -4
    cases.append(Case("an all-zero row: its maximum raised to 1e-12, codes 0 (no division by zero)", (zero,)))
    cases.append(Case("a bfloat16 weight: the scales still float32 (and computed in float32)",
                      (torch.randn(3, 8, generator=g).bfloat16(),)))
    for N, K in [(6, 40), (16, 64), (9, 100)]:
        w = torch.randn(N, K, generator=g) * torch.exp(2 * torch.randn(N, 1, generator=g))  # rows of many sizes
        cases.append(Case(f"random ({N}, {K})", (w,)))
    return cases


def _q8_0_call(fn, args, kwargs):
    """fn(x), or for a row length that is not a multiple of 32 (which the statement says to refuse) a sentence
    saying which error it raised, or that it raised none: that sentence is what the check compares."""
    x = args[0]
    if x.shape[-1] % 32 == 0:
        return fn(*args, **kwargs)
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the kind of error is the answer
        return f"raised {type(e).__name__}"
    return "returned without raising"


def q8_0_round_trip_reference(x):
    """x (N, K) float32 -> Q8_0 bytes (`quant.q8_0_blocks`, the quantised embedding's) -> float32 (N, K)
    (`weights.gguf.dequantize_q8_0`). A K that is not a multiple of 32 raises ValueError."""
    return dequantize_q8_0(q8_0_blocks(x), x.shape)


def _q8_0_round_trip_cases(seed):
    """x (N, K) float32. The small cases are built so that each isolates one mistake."""
    g = torch.Generator().manual_seed(seed)
    # a d = max|x| / 127 that float16 rounds by ~1/4000 of itself (a quarter of its step off)
    d = torch.tensor(1.0 + 0.75 / 1024) * 2.0 ** float(torch.randint(-10, -4, (1,), generator=g))
    # whole codes plus a little noise: the codes agree whichever d divides, the stored float16 d shows
    codes = torch.randint(-126, 127, (1, 32), generator=g).float()
    codes[0, int(torch.randint(0, 32, (1,), generator=g))] = 127.0
    noisy = codes + 0.2 * (torch.rand(1, 32, generator=g) - 0.5) * (codes.abs() < 127)
    cases = [Case("the scale is stored as float16: the weights come back as float16(d) · q, not with the "
                  "float32 d", (noisy * d,))]
    # x / d at k + 0.51: the float32 d rounds away from k, the float16 d (larger, here) rounds to k
    near = torch.tensor([127.0] + [s * (k + 0.51) for k in (3, 20, 45, 70, 90, 100, 110, 120) for s in (1, -1)]
                        + [0.0] * 15)[None]
    cases.append(Case("the codes divide by the float32 d: the float16 d only stores the scale", (near * d,)))
    cases.append(Case("a row of 40 weights, not a multiple of 32: raise a ValueError", (torch.randn(1, 40, generator=g),)))
    # the block edge, one either side: 31 weights are less than one block, and 32 rows of 33 weights hold
    # 1056 = 33 · 32 numbers, whole blocks of the flattened tensor but not of each row
    cases.append(Case("a row of 31 weights, one less than a block: raise a ValueError", (torch.randn(1, 31, generator=g),)))
    cases.append(Case("32 rows of 33 weights, one more than a block (N·K = 33 · 32): raise a ValueError",
                      (torch.randn(32, 33, generator=g),)))
    zero = torch.cat([torch.zeros(1, 32), 0.05 * torch.randn(1, 32, generator=g)], dim=1)
    cases.append(Case("an all-zero block: d = 0 and every code 0 (no division by zero)", (zero,)))
    spike = 0.05 * torch.randn(1, 64, generator=g)
    spike[0, int(torch.randint(0, 32, (1,), generator=g))] = 40.0
    cases.append(Case("one large outlier: its block's 31 other weights share its scale, the next block keeps its own",
                      (spike,)))
    for N, K in [(3, 64), (4, 96), (8, 256)]:
        cases.append(Case(f"random ({N}, {K}): a block is 32 consecutive weights of a row",
                          (0.05 * torch.randn(N, K, generator=g),)))
    return cases


register(Exercise(
    "05.quantize_int8_rows", _int8_cases, int8_rows, atol=0.0, rtol=1e-6, exact_types=True,
    outputs=("the codes q", "the scales s"),
    description="w (N, K) -> (q int8 (N, K), scale float32 (N,)): scale = max(max|w_row|, 1e-12) / 127, "
                "q = round(w / scale) clamped to [-127, 127].",
    hint="Every row gets its own scale, chosen so that the row's largest weight lands exactly on code ±127: "
         "the maximum of the absolute values along each row, divided by 127. Do the arithmetic in float32 "
         "whatever the weight's dtype, and keep a row of zeros from dividing by zero with the statement's floor.",
    recipe="1. Convert the weight to float32. 2. For each row, take the largest absolute value, raise it to at "
           "least 1e-12, and divide by 127: that is the row's scale, one number per row. 3. Divide each weight "
           "by its row's scale (broadcast the scales along the row). 4. Round to the nearest whole number with "
           "torch's rounding (halves go to the even neighbour). 5. Clamp to the range from -127 to 127 and "
           "convert to int8. 6. Return the codes and the float32 scales, in that order."))
register(Exercise(
    "05.q8_0_round_trip", _q8_0_round_trip_cases, q8_0_round_trip_reference, atol=0.0, rtol=1e-6,
    exact_types=True, call=_q8_0_call,
    description="x (N, K) float32 -> Q8_0 (per block of 32: d = max|x| / 127, q = round(x / d), d stored as "
                "float16) -> float32 (N, K) = float16(d) · q; ValueError if K % 32.",
    hint="Cut each row into blocks of 32 consecutive weights (a reshape), and treat each block as its own "
         "little int8 row: its scale puts the block's largest weight on ±127. Two details make it GGUF's Q8_0: "
         "the codes are computed with the exact float32 scale, but the file keeps only a float16 copy of it, "
         "and that copy is what multiplies the codes on the way back.",
    recipe="1. Refuse a row length that is not a multiple of 32 with a ValueError. 2. Reshape to blocks of 32 "
           "weights. 3. Per block, d is the largest absolute value divided by 127, in float32. 4. The codes are "
           "the weights divided by d, rounded to the nearest whole number; where d is 0 (a block of zeros) the "
           "codes are 0. 5. Round d to float16, as the file stores it. 6. Multiply the codes by that float16 d, "
           "both in float32, and reshape back to (N, K)."))
