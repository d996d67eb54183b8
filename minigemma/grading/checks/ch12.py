"""Chapter 12: Triton kernels, Triton-Puzzles style.

The learner writes a kernel *body*; the exercise fixes its signature, its grid and its block sizes.
A check is the usual data plus a reference, the reference a torch spec taking tensors. What is
checked is a *launcher*: a torch-in, torch-out function that runs the learner's kernel on the
case's tensors in Triton's interpreter (on CPU, whether or not a GPU is present) with every load
and store bounds-checked, so that a missing mask is reported as an out-of-bounds access (naming
the program and the argument) rather than passing by luck. Outputs start as NaN, so an element no
program writes shows up too.

    check_kernel("12.vector_add", add_kernel)  ==  check("12.vector_add", launch("12.vector_add", add_kernel))

(`check_kernel` is `minigemma.grading.check_kernel`: it finds the launcher on the exercise, `Exercise.launch`.)

12.tile_for_h100 is the one check that runs nothing: it hands the real compiler the learner's matmul kernel
of 12.tiled_matmul with the learner's tile, for an H100, and holds the compiler's report to five rules
(`minigemma.kernels.gpu_report`, as chapter 12's section 4 uses it). Its "kernel" is the pair
(kernel, tile), and its cases are the rules, so the first rule broken is the failure shown.

12.int4_gemv reads one plane of `quant.Int4Linear`'s packed int4 weight in this CPU's layout (blocks of
`quant.int4_block_rows()` rows, then a tail); each of its cases isolates one part (the scales, the − 8, the
zeros, the block layout, the tail and its mask, the group index), so the case a failure names is the part to fix.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ...griffin import scan_sequential
from ...layers import gelu_tanh
from ..exercise import Case, Exercise, register

PAD = 3  # extra columns around strided inputs: their row stride is never their width


def _run(kernel, grid, *args, **meta):
    import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET before Triton, when there is no GPU)
    from minigemma.kernels.interpret import launch_checked

    launch_checked(kernel, grid, *args, **meta)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x (M, N) as a view into a NaN-filled (M, N + PAD) buffer: same values, row stride N + PAD."""
    buf = torch.full((x.shape[0], x.shape[1] + PAD), float("nan"), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]]


def _nans(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# 1. vector add: programs, blocks, masking the tail
# --------------------------------------------------------------------------------------------
ADD_BLOCK = 32


def _add_cases(seed):
    g = torch.Generator().manual_seed(seed)
    n_random = int(torch.randint(33, 200, (1,), generator=g)) // ADD_BLOCK * ADD_BLOCK + 5  # never a multiple
    cases = []
    for label, n in [("n = 32: exactly one block", 32), ("n = 7: less than one block", 7),
                     ("n = 100: three blocks and a tail of 4", 100), (f"n = {n_random}", n_random)]:
        cases.append(Case(label, (torch.randn(n, generator=g), torch.randn(n, generator=g))))
    return cases


def vector_add_spec(x, y):
    return x + y


def _launch_vector_add(kernel):
    def vector_add(x, y):
        out = _nans(x.numel())
        n = x.numel()
        _run(kernel, (_cdiv(n, ADD_BLOCK),), x, y, out, n, BLOCK=ADD_BLOCK)
        return out
    return vector_add


# --------------------------------------------------------------------------------------------
# 2. scale the columns of a strided matrix: 2-D blocks, strides, masks on both axes
# --------------------------------------------------------------------------------------------
SCALE_BM, SCALE_BN = 8, 16


def _scale_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, M, N in [("8 x 16: one block", 8, 16), ("5 x 20: a column tail", 5, 20),
                        ("19 x 7: a row tail, more row blocks than column blocks", 19, 7),
                        ("1 x 40: one row, three column blocks", 1, 40)]:
        cases.append(Case(label, (torch.randn(M, N, generator=g), torch.randn(N, generator=g))))
    return cases


def scale_columns_spec(x, s):
    return x * s


def _launch_scale_columns(kernel):
    def scale_columns(x, s):
        M, N = x.shape
        xs = _strided(x)
        out = _nans(M, N)
        _run(kernel, (_cdiv(M, SCALE_BM), _cdiv(N, SCALE_BN)), xs, s, out, M, N, xs.stride(0),
             BLOCK_M=SCALE_BM, BLOCK_N=SCALE_BN)
        return out
    return scale_columns


# --------------------------------------------------------------------------------------------
# 3. RMSNorm of one row per program: a reduction
# --------------------------------------------------------------------------------------------
EPS = 1e-6


def _rms_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, M, N in [("4 x 37: a row shorter than its block", 4, 37), ("3 x 64: rows that fill the block", 3, 64),
                        ("2 x 640: Gemma 3 270M's hidden size", 2, 640),
                        ("a row of zeros and a row of tiny values: mean(x²) ≈ eps, so eps matters", 3, 20)]:
        x = 2 * torch.randn(M, N, generator=g)
        if label.startswith("a row of zeros"):
            x[1] = 0.0
            x[2] = 1e-3 * torch.randn(N, generator=g)  # mean(x²) ≈ 1e-6 = eps: a wrong or missing eps shows
        cases.append(Case(label, (x, torch.randn(N, generator=g))))
    return cases


def rms_norm_spec(x, w):
    """Gemma's RMSNorm (minigemma.layers.RMSNorm with weight w) of each row of x (M, N), w (N,):
    x / sqrt(mean(x²) + ε) · (1 + w), from its definition (x is float32; axis 1 is the row)."""
    ms = (x * x).mean(dim=1, keepdim=True)  # (M, 1): mean(x²) of each row
    return x * torch.rsqrt(ms + EPS) * (1.0 + w)


def _launch_rms_norm(kernel):
    def rms_norm_rows(x, w):
        M, N = x.shape
        xs = _strided(x)
        out = _nans(M, N)
        block = 1 << (N - 1).bit_length()  # the next power of two: one block holds a row
        _run(kernel, (M,), xs, w, out, N, xs.stride(0), EPS, BLOCK=block)
        return out
    return rms_norm_rows


# --------------------------------------------------------------------------------------------
# 4. GeGLU from the fused gate_up projection: fusing element-wise work
# --------------------------------------------------------------------------------------------
GEGLU_BLOCK = 32


def _geglu_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, M, F in [("3 rows, F = 37", 3, 37), ("2 rows, F = 32: exactly one block", 2, 32),
                        ("5 rows, F = 70: three blocks", 5, 70)]:
        cases.append(Case(label, (2 * torch.randn(M, 2 * F, generator=g),)))
    return cases


def geglu_spec(gate_up):
    """The MLP's activation: gelu_tanh(gate) · up, with gate_up = [gate, up] (M, 2F) -> (M, F)."""
    gate, up = gate_up.chunk(2, dim=1)  # (M, F) each
    return gelu_tanh(gate) * up


def _launch_geglu(kernel):
    def geglu_rows(gate_up):
        M, F = gate_up.shape[0], gate_up.shape[1] // 2
        gus = _strided(gate_up)
        out = _nans(M, F)
        _run(kernel, (M, _cdiv(F, GEGLU_BLOCK)), gus, out, F, gus.stride(0), BLOCK=GEGLU_BLOCK)
        return out
    return geglu_rows


# --------------------------------------------------------------------------------------------
# 5. the online log-sum-exp over vocabulary blocks: the chunked loss's normaliser
# --------------------------------------------------------------------------------------------
LSE_BLOCK = 32


def _lse_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, M, V, shift in [("4 x 100: four blocks, the last one 4 wide", 4, 100, 0.0),
                               ("3 x 32: exactly one block", 3, 32, 0.0), ("2 x 7: less than one block", 2, 7, 0.0),
                               ("3 x 96: the largest logit of each row in its last block", 3, 96, None),
                               ("3 x 150: logits near +100 (exp overflows float32 without the max)", 3, 150, 100.0),
                               ("2 x 70: logits near -1000 (exp underflows to 0 unless the max starts at -inf)",
                                2, 70, -1000.0)]:
        z = 5 * torch.randn(M, V, generator=g)
        z = z.sort(dim=-1).values if shift is None else z + shift  # sorted: the max grows block after block
        cases.append(Case(label, (z,)))
    return cases


def logsumexp_spec(z):
    """log Σ_v exp(z_v) of every row (M, V) -> (M,): the softmax's normaliser, as the losses use it."""
    return torch.logsumexp(z, dim=1)


def _launch_logsumexp(kernel):
    def online_logsumexp(z):
        M, V = z.shape
        zs = _strided(z)
        out = _nans(M)
        _run(kernel, (M,), zs, out, V, zs.stride(0), BLOCK=LSE_BLOCK)
        return out
    return online_logsumexp


# --------------------------------------------------------------------------------------------
# 6. the linear recurrence, a program per (sequence, block of channels)
# --------------------------------------------------------------------------------------------
SCAN_BLOCK = 16


def _scan_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, B, T, D in [("B=2, T=5, D=8", 2, 5, 8), ("D = 37: three blocks of channels", 1, 13, 37),
                           ("T = 1", 3, 1, 4), ("B=2, T=9, D=16", 2, 9, 16)]:
        a, b, h0 = torch.rand(B, T, D, generator=g), torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g)
        cases.append(Case(label, (a, b, h0)))
    return cases


def linear_scan_spec(a, b, h0):
    """h_t = a_t · h_{t-1} + b_t from h0: every h_t, (B, T, D) (minigemma.griffin.scan_sequential)."""
    return scan_sequential(a, b, h0)[0]


def _launch_linear_scan(kernel):
    def linear_scan(a, b, h0):
        B, T, D = a.shape
        h = _nans(B, T, D)
        _run(kernel, (B, _cdiv(D, SCAN_BLOCK)), a.contiguous(), b.contiguous(), h0.contiguous(), h, T, D,
             BLOCK_D=SCAN_BLOCK)
        return h
    return linear_scan


# --------------------------------------------------------------------------------------------
# 7. a tiled matrix multiply: tl.dot over K, masks on three dimensions, strides
# --------------------------------------------------------------------------------------------
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K = 16, 32, 32


def _matmul_cases(seed):
    g = torch.Generator().manual_seed(seed)

    def ragged(lo, hi, block):  # a size in [lo, hi) that is not a multiple of block
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return n + 1 if n % block == 0 else n

    M, N, K = ragged(49, 96, MM_BLOCK_M), ragged(71, 150, MM_BLOCK_N), ragged(101, 200, MM_BLOCK_K)
    f32, bf16 = torch.float32, torch.bfloat16
    cases = []
    for label, M, N, K, layout, dtype in [
        ("K = 8 < BLOCK_K = 32: the one K tile runs past K, so its loads need the K mask (and other=0.0)",
         16, 32, 8, "contiguous", f32),
        ("one tile exactly: M = 16, N = 32, K = 32", 16, 32, 32, "contiguous", f32),
        ("M = 36, not a multiple of BLOCK_M = 16: the last row of tiles must mask rows >= M (loads and store)",
         36, 32, 32, "contiguous", f32),
        ("K = 64 = 2 × BLOCK_K: walk K in steps of BLOCK_K and add every K tile's product", 16, 32, 64,
         "contiguous", f32),
        ("K = 100, not a multiple of BLOCK_K = 32: the last K tile (4 wide) needs its mask, at its offset",
         16, 32, 100, "contiguous", f32),
        ("a 3 × 2 grid of whole tiles, M = 48, N = 64: program (p, q) computes rows p·16 … and columns q·32 …",
         48, 64, 32, "contiguous", f32),
        ("N = 70, not a multiple of BLOCK_N = 32: the last column of tiles must mask columns >= N (loads and "
         "store)", 48, 70, 32, "contiguous", f32),
        ("A, B and C transposed (views of contiguous (K, M), (N, K) and (N, M) matrices): address every "
         "element through the strides", 32, 64, 64, "transposed", f32),
        ("A, B and C slices of wider matrices: their rows are K + 3, N + 3 and N + 3 apart, not K, N and N",
         32, 64, 64, "rows padded", f32),
        ("bf16 A and B, K = 256: accumulate in float32 (a bf16 accumulator rounds away digits at every K step)",
         16, 32, 256, "contiguous", bf16),
        (f"M, N, K = {M}, {N}, {K}, drawn at random: ragged on all three", M, N, K, "contiguous", f32),
    ]:
        a, b = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
        cases.append(Case(label, (a, b), {"layout": layout}))
    return cases


def tiled_matmul_spec(a, b, layout):
    """C = A @ B for A (M, K) and B (K, N), from its definition C[i, j] = Σ_k A[i, k] · B[k, j], in float32 (bf16
    inputs at their exact values: what the tensor cores multiply, summed in float32). `layout` says how the
    launcher lays A, B and C out in memory: it moves the elements, not C."""
    products = a.float()[:, :, None] * b.float()[None, :, :]  # (M, K, N): every A[i, k] · B[k, j]
    return products.sum(dim=1)


def _launch_matmul(kernel):
    def tiled_matmul(a, b, layout):
        import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET before Triton, when there is no GPU)
        from minigemma.kernels.interpret import emulated_bf16

        (M, K), N = a.shape, b.shape[1]
        c = _nans(M, N)
        if layout == "transposed":  # the same values, stored column by column
            a, b, c = a.t().contiguous().t(), b.t().contiguous().t(), _nans(N, M).t()
        elif layout == "rows padded":
            a, b, c = _strided(a), _strided(b), _strided(c)
        # bf16: the interpreter would multiply bf16 bit patterns as integers; emulated, tl.dot is the tensor cores'
        with emulated_bf16() if a.dtype == torch.bfloat16 else contextlib.nullcontext():
            _run(kernel, (_cdiv(M, MM_BLOCK_M), _cdiv(N, MM_BLOCK_N)), a, b, c, M, N, K, *a.stride(), *b.stride(),
                 *c.stride(), BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K)
        return c
    return tiled_matmul


# --------------------------------------------------------------------------------------------
# 8. a tile for an H100: the real compiler's report on the learner's kernel, held to five rules
# --------------------------------------------------------------------------------------------
H100_SIZE = 4096  # M = N = K, bf16
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
TILE_RULES = {  # rule -> the case's label; in this order, so the first broken rule is the one shown
    "compiles": "compiles for an H100 (sm_90): your kernel with your tile, bf16 A, B and C, M = N = K = 4096",
    "wgmma": "tl.dot becomes wgmma, Hopper's tensor-core instruction (not mma.sync, not float32 FMAs)",
    "no spills": "no spills: every value a thread keeps fits in its registers (at most 255)",
    "shared memory": "shared memory per program within the 232,448 B (227 KiB) an H100 allows one program",
    "2 programs per SM": "at least 2 programs resident per SM, so that one computes while another waits for memory",
}


def _tile_cases(seed):
    return [Case(label, (rule,)) for rule, label in TILE_RULES.items()]


def tile_rules_spec(rule):
    """Every rule holds: the answer the check expects of each case."""
    return True


_TILE_REPORTS: dict = {}  # (source, globals read, tile) -> Report: one compile per tile in a process


def _plain_globals(fn) -> tuple:
    """The numbers (and constexprs) the kernel reads as globals: they are part of what is compiled."""
    out = []
    for n in fn.__code__.co_names:
        v = fn.__globals__.get(n)
        if isinstance(v, (bool, int, float)) or type(v).__name__ == "constexpr":
            out.append((n, repr(getattr(v, "value", v))))
    return tuple(out)


def h100_report(kernel, tile: dict):
    """The compiler's report on `kernel` (12.tiled_matmul's signature) launched with `tile` on contiguous bf16
    A, B and C at M = N = K = 4096, for an H100 (sm_90); no GPU needed. Cached per process."""
    from minigemma.kernels.gpu_report import gpu_report

    fn = getattr(kernel, "fn", kernel)
    key = (inspect.getsource(fn), _plain_globals(fn), tuple(sorted(tile.items())))
    if key in _TILE_REPORTS:
        return _TILE_REPORTS[key]
    bf16, n = torch.empty(0, dtype=torch.bfloat16), H100_SIZE
    blocks = {k: tile[k] for k in TILE_KEYS[:3]}
    options = dict(target="sm_90", num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    # contiguous A, B and C: strides (K, 1), (N, 1), (N, 1); gpu_report compiles the unit strides as constants,
    # as Triton's JIT does, so the compiler sees that A's rows and B's columns are contiguous
    report = _TILE_REPORTS[key] = gpu_report(kernel, bf16, bf16, bf16, n, n, n, n, 1, n, 1, n, 1, **options,
                                             **blocks)
    return report


def _tile_problem(rule: str, r, tile: dict) -> str | None:
    """Why the report `r` on `tile` breaks `rule` (None: it holds)."""
    if not r.ok:
        return f"it does not compile for an H100: {r.error}" if rule == "compiles" else \
            "it does not compile (the first rule says why)"
    bm, bn, bk, warps = (tile[k] for k in TILE_KEYS[:4])
    p = r.props
    if rule == "wgmma" and r.dot != "wgmma":
        return {"mma": "tl.dot became mma.sync, Ampere's tensor-core instruction: wgmma works on warpgroups of 4 "
                       "warps and 64-row slices of the A tile (num_warps a multiple of 4, BLOCK_M at least 64)",
                "fma": "tl.dot became FMAs on the CUDA cores (float32 'ieee' products), not tensor-core "
                       "instructions: give tl.dot the bf16 tiles as loaded (it accumulates in float32 itself)",
                "-": "the compiled kernel has no tl.dot"}[r.dot]
    if rule == "no spills" and r.spill_bytes:
        return (f"it spills {r.spill_bytes:,} B per thread to local memory. The float32 accumulator alone is "
                f"{bm} · {bn} / (32 · {warps}) = {bm * bn // (32 * warps)} registers per thread, of at most 255: a "
                "smaller tile, or more warps")
    if rule == "shared memory" and r.shared > p.smem_per_block:
        return (f"one program needs {r.shared:,} B of shared memory, more than the {p.smem_per_block:,} B an H100 "
                f"allows one program: it cannot launch. Each stage holds an A tile and a B tile, ({bm} + {bn}) · "
                f"{bk} · 2 B = {(bm + bn) * bk * 2:,} B: fewer stages, or smaller tiles")
    if rule == "2 programs per SM" and (r.programs_per_sm or 0) < 2:
        n = r.programs_per_sm or 0
        return (f"{n} program{'' if n == 1 else 's'} per SM, limited by {r.limited_by}. Two programs need at most "
                f"{p.regs_per_sm // 2:,} registers each (registers per thread · 32 · num_warps) and "
                f"{p.smem_per_sm // 2 - 1024:,} B of shared memory each (the SM's {p.smem_per_sm:,} B, less 1 KiB "
                "per program)")
    return None


def _launch_tile(pair):
    """(kernel, tile) -> the function the cases call: rule -> True, or an AssertionError saying why not."""
    state = {}

    def tile_for_h100(rule):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError("12.tile_for_h100 checks the pair (your kernel, your tile): "
                            "check_kernel(\"12.tile_for_h100\", (matmul_kernel, H100_TILE))")
        kernel, tile = pair
        if not isinstance(tile, dict) or set(tile) != set(TILE_KEYS) or \
                not all(type(v) is int and v > 0 for v in tile.values()):
            raise AssertionError(f"the tile must be a dict of exactly {', '.join(TILE_KEYS)}, each a positive "
                                 f"int; got {tile!r}")
        if "report" not in state:
            state["report"] = h100_report(kernel, tile)
        report = state["report"]
        why = _tile_problem(rule, report, tile)
        if why and report.ok:  # the report, in sentences, so that the learner sees why
            indent = "\n" + " " * 13  # under the message, as format_result prints it
            why += (f".{indent}The compiler's report (your kernel launched with your tile on contiguous bf16 A, B "
                    f"and C, M = N = K = {H100_SIZE}):{indent}" + indent.join(str(report).splitlines()))
        if why:
            raise AssertionError(why)
        return True
    return tile_for_h100


# --------------------------------------------------------------------------------------------
# 9. a weight-only int4 GEMV on the package's own packed layout (quant.Int4Linear, one plane)
# --------------------------------------------------------------------------------------------
INT4_GROUP = 32  # weights per (scale, zero) group, Int4Linear's default
INT4_BLOCK_N, INT4_BLOCK_K = 32, 32  # BLOCK_K = GROUP: one K tile is one group, with one scale and zero per row


def _int4_cases(seed):
    """Each case isolates one part of the layout, so the smallest failing case names the mistake: cases whose rows
    all hold the same codes (a row read from the wrong nibble or byte still gets the right code) check the scales,
    the − 8 and the zeros; cases whose x sums to 0 over every group hide the − 8 and the zeros (Σ x · 8 · scale and
    Σ x · zero vanish) and check the layout."""
    from ...quant import int4_block_rows, pack_int4

    g = torch.Generator().manual_seed(seed)
    B = int4_block_rows()  # 64 on a CPU with AVX-512, 32 without: the layout of the CPU that packs

    def case(label, N, K, codes="random", x="random", zero="random"):
        G = K // INT4_GROUP
        if codes == "rows alike":  # code c[k] for every row: the layout cannot show
            c = torch.randint(0, 16, (1, K), generator=g, dtype=torch.int32).expand(N, K)
        else:
            c = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        scale = 0.02 + 0.1 * torch.rand(N, G, generator=g)  # per row and group
        zr = torch.zeros(N, G) if zero == "none" else 0.5 * torch.randn(N, G, generator=g)
        if x == "positive":  # Σ x over a group far from 0: the − 8 and the zeros count
            xs = 0.5 + torch.rand(K, generator=g)
        else:
            xs = torch.randn(K, generator=g)
            if x == "zero-sum":  # Σ x = 0 over every group: the − 8 and the zeros add nothing
                xs = (xs.view(G, INT4_GROUP) - xs.view(G, INT4_GROUP).mean(1, keepdim=True)).reshape(K)
        packed = pack_int4(c)[None]  # (1, N, K/2) uint8, as Int4Linear stores one plane
        scale_zero = torch.stack([scale.T, zr.T], dim=-1)[None].to(torch.bfloat16)  # (1, K/g, N, 2)
        return Case(label, (xs, packed, scale_zero))

    tail = B + 16
    r = int(torch.randint(1, B // 16, (1,), generator=g))  # a tail of 16 · r rows, 0 < 16 r < B
    N_rand, K_rand = 2 * B + 16 * r, INT4_GROUP * int(torch.randint(2, 5, (1,), generator=g))
    return [
        case(f"N = {B}, K = 32, every row the same codes, Σ x = 0: row n's scale is scale_zero[g, n, 0] "
             "((scale, zero) pairs, 2 apart), and it multiplies the whole group's Σ x (c − 8)", B, 32,
             codes="rows alike", x="zero-sum"),
        case(f"N = {B}, K = 32, x > 0 (Σ x ≠ 0), zeros 0: a code c stands for c − 8 (codes 0…15 are −8…7)", B, 32,
             codes="rows alike", x="positive", zero="none"),
        case(f"N = {B}, K = 32, x > 0, zeros ≠ 0: each weight adds its row's zero, scale_zero[g, n, 1] "
             "(the group adds zero · Σ x)", B, 32, codes="rows alike", x="positive"),
        case(f"N = {B} = one whole block of B = {B} rows: byte j (at each k) holds row j in its low nibble and row "
             f"j + {B // 2} in its high nibble, not rows 2j and 2j + 1", B, 32, x="zero-sum"),
        case(f"N = {tail} = one block of {B} + 16 tail rows: tail rows pair as (2j low nibble, 2j + 1 high), byte "
             f"j of the (K, 8) tail after the block; and the last program's rows {tail}…{tail + 15} are past N: "
             "mask them", tail, 32),
        case(f"N = {B}, K = 128, four groups: the K tile k0 … k0 + 31 is group k0 // 32, and scale_zero is "
             "(K/32, N, 2): group g of row n at g · stride_szg + 2n", B, 128),
        case(f"N = {N_rand}, K = {K_rand}, drawn at random: {N_rand // B} blocks, {N_rand % B} tail rows, "
             f"{K_rand // INT4_GROUP} groups", N_rand, K_rand),
    ]


def int4_gemv_spec(x, packed, scale_zero):
    """y = W x (N,) float32 for one plane of `Int4Linear`'s buffers, from the definition: codes c (N, K) from
    `quant.unpack_int4` (the inverse of the packing), w[n, k] = (c[n, k] − 8) · scale[k // g, n] + zero[k // g, n],
    then y[n] = Σ_k w[n, k] · x[k] in float32."""
    from ...quant import unpack_int4

    c = unpack_int4(packed[0]).float() - 8.0  # (N, K), codes −8 … 7
    scale, zero = scale_zero[0].float().unbind(-1)  # (K/g, N) each
    g = c.shape[1] // scale.shape[0]
    w = c * scale.T.repeat_interleave(g, dim=1) + zero.T.repeat_interleave(g, dim=1)  # (N, K)
    return (w * x[None, :]).sum(dim=1)


def _launch_int4_gemv(kernel):
    def int4_gemv(x, packed, scale_zero):
        from ...quant import int4_block_rows

        B = int4_block_rows()
        N, K = packed.shape[1], packed.shape[2] * 2
        pk, sz = packed[0].contiguous(), scale_zero[0].contiguous()  # (N, K/2) uint8, (K/g, N, 2) bf16
        y = _nans(N)
        _run(kernel, (_cdiv(N, INT4_BLOCK_N),), x, pk, sz, y, N, K, N // B * B, sz.stride(0),
             HALF=B // 2, GROUP=INT4_GROUP, BLOCK_N=INT4_BLOCK_N, BLOCK_K=INT4_BLOCK_K)
        return y
    return int4_gemv


# --------------------------------------------------------------------------------------------
LAUNCHERS = {
    "12.vector_add": _launch_vector_add,
    "12.scale_columns": _launch_scale_columns,
    "12.rms_norm_rows": _launch_rms_norm,
    "12.geglu_rows": _launch_geglu,
    "12.online_logsumexp": _launch_logsumexp,
    "12.linear_scan": _launch_linear_scan,
    "12.tiled_matmul": _launch_matmul,
    "12.tile_for_h100": _launch_tile,
    "12.int4_gemv": _launch_int4_gemv,
}


def launch(name: str, kernel):
    """The torch function that exercise `name` checks: it runs `kernel` with the exercise's grid and blocks."""
    if name not in LAUNCHERS:
        raise KeyError(f"no kernel exercise {name!r}; known: {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name](kernel)


register(Exercise("12.vector_add", _add_cases, vector_add_spec,
                  description="out = x + y, BLOCK = 32 elements per program, grid = cdiv(n, 32).",
                  hint="The grid has one program per block of 32 elements, rounded up. What happens in the last "
                       "program when n is not a multiple of 32, and what must its loads and stores know?",
                  recipe="1. Read this program's id along axis 0. 2. Its offsets are the program id times BLOCK "
                         "plus a block of offsets 0 … BLOCK − 1. 3. Build a mask for the tail: offset < n (the last "
                         "block runs past n: n = 7, n = 100). 4. Load x and y at those offsets with the mask, add "
                         "them, and store the sum into out at the same offsets with the same mask.",
                  launch=LAUNCHERS["12.vector_add"]))
register(Exercise("12.scale_columns", _scale_cases, scale_columns_spec,
                  description="out[i, j] = x[i, j] · s[j] with 8 x 16 blocks; x's rows are stride_x apart.",
                  hint="Two program ids: one picks a block of rows, the other a block of columns. x's rows are "
                       "stride_x apart, not N: where is element (i, j) in x, where in out, and which tails can a "
                       "block run into?",
                  recipe="1. Program id 0 picks the block of rows: its row id times BLOCK_M plus 0 … BLOCK_M − 1; "
                         "program id 1 picks the columns the same way with BLOCK_N. 2. Make a 2-D block by "
                         "broadcasting the rows as a column against the columns as a row. 3. Element (i, j) of x "
                         "sits at i · stride_x + j; of out, which is contiguous, at i · N + j. 4. The mask needs both "
                         "conditions, row < M and column < N: there are row tails and column tails. 5. Load the "
                         "block of x with that mask and the scales s at the block's columns (masked on the "
                         "columns), multiply, with s broadcast down the rows, and store into out with the 2-D "
                         "mask.",
                  launch=LAUNCHERS["12.scale_columns"]))
register(Exercise("12.rms_norm_rows", _rms_cases, rms_norm_spec,
                  description="Gemma's RMSNorm (1 + w) of one row per program, statistics in float32.",
                  hint="One program holds a whole row in a block that may be longer than the row. What must the "
                       "lanes past N contribute to Σx², and what do you divide that sum by?",
                  recipe="1. The program id is the row. 2. Take a block of column offsets 0 … BLOCK − 1 and a mask "
                         "for the tail, column < N. 3. Load the row at row · stride_x + column with that mask, "
                         "filling the masked lanes with 0.0 so they add nothing to Σx²; load w at the columns the "
                         "same way. 4. In float32, the mean of squares is Σx² divided by N, not by BLOCK. "
                         "5. Multiply x by rsqrt(mean + eps), eps inside the square root (a row of zeros and a row "
                         "of tiny values show a missing one), then by (1 + w). 6. Store into out, which is "
                         "contiguous, at row · N + column, with the mask.",
                       launch=LAUNCHERS["12.rms_norm_rows"]))
register(Exercise("12.geglu_rows", _geglu_cases, geglu_spec,
                  description="gelu_tanh(gate) · up from gate_up = [gate, up], blocks of 32 columns.",
                  hint="gate and up sit side by side in one row of gate_up: how far into the row does up's column "
                       "j lie? And Triton has no tanh of its own: how do you get it from a sigmoid?",
                  recipe="1. Program id 0 is the row r, program id 1 the block of 32 columns j; mask the tail, "
                         "j < F (F = 37 has a tail). 2. Row r starts at r · stride_gu; its gate column j is at that start plus j, and "
                         "its up column j at that start plus F plus j. Load both with the mask. 3. In float32, "
                         "apply the tanh form of GELU to the gate, 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))), "
                         "writing tanh(u) as 2·σ(2u) − 1. 4. Multiply by up and store at r · F + j (out is a "
                         "contiguous (M, F)), with the mask.",
                       launch=LAUNCHERS["12.geglu_rows"]))
register(Exercise("12.online_logsumexp", _lse_cases, logsumexp_spec,
                  description="log Σ exp(z) of each row, walking it in blocks of 32 with a running max and sum.",
                  hint="Walking the row block by block, the maximum can grow as you go. What must happen to the sum "
                       "collected so far when it does, where must the running maximum start, and what should the "
                       "lanes past V add?",
                  recipe="1. The program id is the row. Start a running maximum m at −inf (not 0: logits near "
                         "−1000 would underflow) and a running sum l of exp(z − m) at 0. 2. For each block of 32 "
                         "columns from 0 up to V: load the block at row · stride_z + column with the mask "
                         "column < V, filling the masked lanes with −inf so they add exp(−inf) = 0. 3. The new "
                         "maximum m′ is max(m, the block's maximum). 4. Rescale what was summed so far and add the "
                         "block: l becomes l · exp(m − m′) + Σ exp(z − m′) over the block; then m becomes m′. "
                         "5. After the last block, store m + log(l) at the row. Logits near +100 overflow without "
                         "the maximum subtracted.",
                       launch=LAUNCHERS["12.online_logsumexp"]))
register(Exercise("12.linear_scan", _scan_cases, linear_scan_spec,
                  description="h_t = a_t · h_{t-1} + b_t from h0, a program per (sequence, 16 channels).",
                  hint="Time is sequential, channels are not. Which axis does one program walk in a loop, which "
                       "does it hold as a block, and where is element (sequence, t, channel) in memory?",
                  recipe="1. Program id 0 is the sequence, program id 1 the block of 16 channels; mask the tail, "
                         "channel < D (D = 37 has a tail). 2. Load h0 for this sequence's channels, at "
                         "sequence · D + channel: that is the running state h. 3. Loop over t from 0 to T − 1 "
                         "(an ordinary loop in the kernel). Element (sequence, t, channel) of a, b and the output is "
                         "at (sequence · T + t) · D + channel. Load a_t and b_t with the mask, replace h by "
                         "a_t · h + b_t, and store h there, with the mask, every step.",
                  launch=LAUNCHERS["12.linear_scan"]))
register(Exercise("12.tiled_matmul", _matmul_cases, tiled_matmul_spec, atol=1e-4,
                  description="C = A @ B, one 16 x 32 tile of C per program, walking K in steps of 32 with tl.dot; "
                              "every matrix addressed through its strides.",
                  hint="Program (p, q) owns one BLOCK_M x BLOCK_N tile of C. Keep a float32 accumulator of that "
                       "shape, walk K one BLOCK_K at a time, and load a tile of A and a tile of B through their strides, "
                       "each masked on both of its dimensions. Which lanes of the store need a mask?",
                  recipe="1. Program ids p and q (axes 0 and 1) give the tile's rows, p · BLOCK_M plus "
                         "0 … BLOCK_M − 1, and columns, q · BLOCK_N plus 0 … BLOCK_N − 1. 2. Start a float32 "
                         "accumulator of zeros, BLOCK_M × BLOCK_N. 3. Walk k0 from 0 up to K in steps of BLOCK_K; "
                         "the tile's K offsets are k0 plus 0 … BLOCK_K − 1. Load the A tile, element (i, k) at "
                         "i · stride_am + k · stride_ak, masked by row < M and k < K with 0.0 in the masked lanes; "
                         "load the B tile, element (k, j) at k · stride_bk + j · stride_bn, masked by k < K and "
                         "column < N, also 0.0. 4. Add the dot product of the two tiles to the accumulator: give "
                         "the dot the tiles as loaded, bf16 included, and keep the sum in float32 (a bf16 "
                         "accumulator loses digits at every step). 5. After the loop, store the accumulator at "
                         "i · stride_cm + j · stride_cn, masked by row < M and column < N. Every matrix is addressed "
                         "through its own strides (transposed and row-padded layouts are tested).",
                  launch=LAUNCHERS["12.tiled_matmul"]))
register(Exercise("12.tile_for_h100", _tile_cases, tile_rules_spec, timeout_s=300.0,
                  description="A tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for your matmul kernel on an "
                              "H100 in bf16 at M = N = K = 4096: it compiles, tl.dot becomes wgmma, nothing spills, "
                              "shared memory fits, and at least 2 programs are resident per SM.",
                  hint="Count before you compile: what does each stage put in shared memory, how many registers does "
                       "the accumulator alone take per thread, and what must two programs share on one SM? wgmma "
                       "has its own demands on num_warps and BLOCK_M.",
                  recipe="1. wgmma: num_warps a multiple of 4 and BLOCK_M at least 64; and the dot must get the "
                         "bf16 tiles as loaded (it accumulates in float32 itself; tiles converted to float32 first "
                         "become FMAs). 2. Registers: the float32 accumulator alone takes BLOCK_M · BLOCK_N / "
                         "(32 · num_warps) registers per thread, and a thread has at most 255 before it spills, with "
                         "room needed for addresses and loaded fragments besides. Two programs share the SM's 65,536 "
                         "registers, so each may use at most half: registers per thread · 32 · num_warps at most "
                         "32,768. 3. Shared memory: each stage holds a BLOCK_M × BLOCK_K tile of A and a BLOCK_K × "
                         "BLOCK_N tile of B in bf16, 2 B each, so a program needs num_stages · (BLOCK_M + BLOCK_N) · "
                         "BLOCK_K · 2 B. One program may have at most 232,448 B; two programs per SM must fit in the "
                         "SM's 233,472 B, less 1 KiB per program. 4. Choose powers of two that pass all of these "
                         "counts, then check: if a rule still breaks, the report gives the compiler's numbers, and "
                         "the message says which count to lower (fewer stages, a smaller tile, or more warps).",
                  launch=LAUNCHERS["12.tile_for_h100"]))
register(Exercise("12.int4_gemv", _int4_cases, int4_gemv_spec, atol=1e-4,
                  description="y = W x for one plane of Int4Linear's packed int4 weight (N, K) and one float32 row x "
                              "(K,): BLOCK_N = 32 rows per program, K walked in tiles of BLOCK_K = GROUP = 32 (one "
                              "scale and one zero per row and tile), the codes read where pack_int4 put them.",
                  hint="Take the drawing in the statement and answer three questions for one row of a whole block: "
                       "which byte holds its code at k = 0, how many bytes apart are its codes for k and k + 1, and "
                       "which nibble is its own? Then the same for a row of the tail, which shares its bytes with a "
                       "neighbour. A BLOCK_N vector of rows may hold both kinds: work out both, pick per row. Within "
                       "one K tile each row has a single scale and zero, so the tile's sum factors.",
                  recipe="1. The program id picks BLOCK_N rows n; mask them with n < N (the last program runs past "
                         "N). Keep a float32 sum per row. 2. Walk the K tiles k0 = 0, 32, 64, …; tile k0 is group "
                         "g = k0 / GROUP. Load x at k0 plus 0 … 31. 3. Where each row's code at k sits, with "
                         "B = 2 · HALF rows per block and n_full the rows in whole blocks: a row n < n_full is rank "
                         "r = n mod B of block n / B (rounded down); its byte is block · K · HALF + k · HALF + "
                         "(r mod HALF), so its codes for k and k + 1 are HALF bytes apart, and its nibble is the "
                         "low one when r < HALF, the high one otherwise (byte j holds rows j and j + HALF, not 2j "
                         "and 2j + 1). A tail row, t = n − n_full, sits after the blocks' n_full · K / 2 bytes, at "
                         "n_full · K / 2 + k · (N − n_full) / 2 + t / 2 (rounded down): low nibble for even t, high "
                         "for odd. Compute both addresses for the (rows × 32) block and pick per row. 4. Load the "
                         "bytes with the row mask, shift right by 4 for a high nibble and keep the low four bits: a "
                         "code c from 0 to 15 stands for c − 8. 5. The row's scale is at g · stride_szg + 2n and its "
                         "zero right after it (bf16 pairs; use them in float32). 6. The tile adds "
                         "scale · Σ_k (c − 8) · x_k + zero · Σ_k x_k to each row's sum. 7. Store the sums into y "
                         "with the row mask.",
                  launch=LAUNCHERS["12.int4_gemv"]))
