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
"""

from __future__ import annotations

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
LAUNCHERS = {
    "12.vector_add": _launch_vector_add,
    "12.scale_columns": _launch_scale_columns,
    "12.rms_norm_rows": _launch_rms_norm,
    "12.geglu_rows": _launch_geglu,
    "12.online_logsumexp": _launch_logsumexp,
    "12.linear_scan": _launch_linear_scan,
}


def launch(name: str, kernel):
    """The torch function that exercise `name` checks: it runs `kernel` with the exercise's grid and blocks."""
    if name not in LAUNCHERS:
        raise KeyError(f"no kernel exercise {name!r}; known: {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name](kernel)


register(Exercise("12.vector_add", _add_cases, vector_add_spec,
                  description="out = x + y, BLOCK = 32 elements per program, grid = cdiv(n, 32).",
                  hint="offsets = pid * BLOCK + tl.arange(0, BLOCK); the last program's block runs past n, so "
                       "every tl.load and tl.store needs mask=offsets < n.", launch=LAUNCHERS["12.vector_add"]))
register(Exercise("12.scale_columns", _scale_cases, scale_columns_spec,
                  description="out[i, j] = x[i, j] · s[j] with 8 x 16 blocks; x's rows are stride_x apart.",
                  hint="Program (0) picks the block of rows and program (1) the block of columns. Element (i, j) "
                       "of x is at i * stride_x + j, of out at i * N + j: build both with rows[:, None] and "
                       "cols[None, :], and mask with both conditions.", launch=LAUNCHERS["12.scale_columns"]))
register(Exercise("12.rms_norm_rows", _rms_cases, rms_norm_spec,
                  description="Gemma's RMSNorm (1 + w) of one row per program, statistics in float32.",
                  hint="Load the row with mask=cols < N and other=0.0, so the padding adds nothing to Σx²; then "
                       "divide by N (not BLOCK), add eps inside the square root, and scale by (1 + w).",
                       launch=LAUNCHERS["12.rms_norm_rows"]))
register(Exercise("12.geglu_rows", _geglu_cases, geglu_spec,
                  description="gelu_tanh(gate) · up from gate_up = [gate, up], blocks of 32 columns.",
                  hint="Row r's gate column j is at r * stride_gu + j and its up column j at r * stride_gu + F + j. "
                       "Triton has no tanh: tanh(u) = 2 * tl.sigmoid(2 * u) - 1.",
                       launch=LAUNCHERS["12.geglu_rows"]))
register(Exercise("12.online_logsumexp", _lse_cases, logsumexp_spec,
                  description="log Σ exp(z) of each row, walking it in blocks of 32 with a running max and sum.",
                  hint="Keep a running max m (start at float('-inf')) and a running sum l of exp(z - m) (start at 0). "
                       "For each block: m_new = max(m, max of the block); l = l * exp(m - m_new) + Σ exp(z - m_new). "
                       "Load with other=float('-inf') so lanes past V add exp(-inf) = 0. The answer is m + log(l).",
                       launch=LAUNCHERS["12.online_logsumexp"]))
register(Exercise("12.linear_scan", _scan_cases, linear_scan_spec,
                  description="h_t = a_t · h_{t-1} + b_t from h0, a program per (sequence, 16 channels).",
                  hint="Start from h = h0 for this sequence's channels, then `for t in range(T)`: element (seq, t, d) "
                       "is at (seq * T + t) * D + d; update h, then store it.", launch=LAUNCHERS["12.linear_scan"]))
