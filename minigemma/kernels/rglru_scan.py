"""The RG-LRU's linear recurrence h_t = a_t · h_{t-1} + b_t as a chunked Triton scan, forward and backward.

a, b (B, T, D); every channel of every sequence is an independent recurrence, so programs run in
parallel over (B, blocks of D). Time is cut into chunks of CHUNK steps, and three passes make the
chunks independent too (a reduce-then-scan; flash-linear-attention's chunked HGRN does the same):

  1. summary  (parallel over B, D, chunks)  each chunk folds its steps into one step h -> A·h + H:
              A = Π a_t over the chunk, H = the chunk's state when it starts from 0.
  2. carry    (parallel over B, D; T/CHUNK sequential steps)  the state entering each chunk:
              h_in[c+1] = A[c] · h_in[c] + H[c],  h_in[0] = h0.
  3. scan     (parallel over B, D, chunks)  each chunk replays its steps from h_in[c], writes h_t.

Sequential depth is CHUNK + T/CHUNK + CHUNK steps instead of T; a and b are read twice and h is
written once. The state is float32 whatever the inputs' dtype (h is returned in float32, like
`minigemma.griffin.scan_sequential`). `reset` (B, T) marks document starts, where a_t counts as 0:
the state forgets the previous document, as `minigemma.griffin.RGLRU` does by zeroing a there.

Backward. With g_t = ∂L/∂h_t and ∂L/∂h_T, the adjoint δ_t = ∂L/∂b_t obeys the same recurrence run
backwards in time, δ_t = a_{t+1} · δ_{t+1} + g_t, started from δ_T = ∂L/∂h_T (a_T taken as 1). Then
    ∂L/∂b_t = δ_t,   ∂L/∂a_t = δ_t · h_{t-1} (0 at a reset),   ∂L/∂h0 = a_0 · δ_0.
So the backward is the same three passes with time reversed; the third also writes ∂L/∂a.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigemma.griffin import scan_sequential

from .utils import check_device, num_warps


@triton.jit
def _chunk_kernel(A, X, R, CARRY, Y, A_SUM, H_SUM, H_LAST, H, H0, DA, T, D, NC, SUMMARY: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Chunk c of sequence b, channels d: CHUNK steps of h = a·h + x, one after the other.

    SUMMARY (pass 1): from h = 0, fold the chunk into (A = Π a, H = h at its end).
    otherwise (pass 3): from h = CARRY[c], write every h_t to Y; reversed, also ∂L/∂a_t to DA.
    Forward, step k is time t = c·CHUNK + k and the coefficient is a_t. Reversed, t = T-1-c·CHUNK-k
    and the coefficient is a_{t+1} (1 at t = T-1). Steps past the sequence are skipped (masked).
    """
    pid_d, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    n_steps = tl.where(d_ok, T - c * CHUNK, 0)  # (BLOCK_D,): steps of this chunk inside the sequence
    if REVERSE:
        row = b * T + T - 1 - c * CHUNK  # (b, t) of the chunk's first step, as a row of (B·T, D)
        dt = -1
        shift = 1  # the coefficient a_{t+1} sits one row later...
        first_coef = tl.where(c == 0, 1, 0) + 0 * d  # ...except at t = T-1, where it is 1
    else:
        row = b * T + c * CHUNK
        dt = 1
        shift = 0
    x_p, y_p = X + row * D + d, Y + row * D + d  # pointers, moved one row per step
    a_p, r_p = A + (row + shift) * D + d, R + (row + shift) + 0 * d
    if SUMMARY:
        acc_a = tl.full((BLOCK_D,), 1.0, tl.float32)
        h = tl.zeros((BLOCK_D,), tl.float32)
    else:
        h = tl.load(CARRY + (b * NC + c) * D + d, mask=d_ok, other=0.0)
        if REVERSE:
            hp_p, da_p, rt_p = H + (row - 1) * D + d, DA + row * D + d, R + row + 0 * d
            if HAS_H0:
                h0 = tl.load(H0 + b * D + d, mask=d_ok, other=0.0).to(tl.float32)
    for k in range(CHUNK):
        ok = k < n_steps
        if REVERSE:
            c_ok = ok & (k >= first_coef)
        else:
            c_ok = ok
        x = tl.load(x_p, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(a_p, mask=c_ok, other=1.0).to(tl.float32)
        if HAS_RESET:  # a document starts at the coefficient's time: forget the state
            a = tl.where(tl.load(r_p, mask=c_ok, other=0) != 0, 0.0, a)
        h = a * h + x
        if SUMMARY:
            acc_a = a * acc_a
        else:
            tl.store(y_p, h.to(Y.dtype.element_ty), mask=ok)
            if REVERSE:  # ∂L/∂a_t = δ_t · h_{t-1}, with h_{-1} = h0, and 0 at a reset
                at_start = k == n_steps - 1  # t = 0 is the last step of the last chunk
                h_prev = tl.load(hp_p, mask=ok & ~at_start, other=0.0)
                if HAS_H0:
                    h_prev = tl.where(at_start, h0, h_prev)
                if HAS_RESET:
                    h_prev = tl.where(tl.load(rt_p, mask=ok, other=0) != 0, 0.0, h_prev)
                tl.store(da_p, (h * h_prev).to(DA.dtype.element_ty), mask=ok)
                hp_p += dt * D
                da_p += dt * D
                rt_p += dt
        x_p += dt * D
        y_p += dt * D
        a_p += dt * D
        r_p += dt
    if SUMMARY:
        out = (b * NC + c) * D + d
        tl.store(A_SUM + out, acc_a, mask=d_ok)
        tl.store(H_SUM + out, h, mask=d_ok)
    else:
        tl.store(H_LAST + b * D + d, h, mask=d_ok & (c + 0 * d == NC - 1))


@triton.jit
def _carry_kernel(A_SUM, H_SUM, H0, CARRY, D, NC, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2: the state entering each chunk, one chunk after the other (NC steps)."""
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    if HAS_H0:
        h = tl.load(H0 + b * D + d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D,), tl.float32)
    for c in range(NC):
        off = (b * NC + c) * D + d
        tl.store(CARRY + off, h, mask=d_ok)
        h = tl.load(A_SUM + off, mask=d_ok, other=1.0) * h + tl.load(H_SUM + off, mask=d_ok, other=0.0)


def _scan(a, x, reset, h0, y, chunk, reverse, h=None, h0_for_da=None, da=None):
    """The three passes. Returns the final state (B, D) float32 (reversed: δ_0)."""
    B, T, D = a.shape
    if B * T * D == 0:  # nothing to scan: the final state is the initial one
        return torch.zeros(B, D, dtype=torch.float32, device=a.device) if h0 is None else h0.float().clone()
    NC = triton.cdiv(T, chunk)
    BLOCK_D = min(128, triton.next_power_of_2(D))
    nd = triton.cdiv(D, BLOCK_D)
    f32 = dict(dtype=torch.float32, device=a.device)
    carry = torch.empty(B, NC, D, **f32)
    h_last = torch.empty(B, D, **f32)
    r = reset if reset is not None else a  # unused pointers stand in where a flag is off
    flags = dict(REVERSE=reverse, HAS_RESET=reset is not None, CHUNK=chunk, BLOCK_D=BLOCK_D,
                 num_warps=num_warps(BLOCK_D * 8))
    if NC == 1:  # one chunk: its entering state is h0
        carry[:, 0] = 0.0 if h0 is None else h0
    else:
        a_sum, h_sum = torch.empty(B, NC, D, **f32), torch.empty(B, NC, D, **f32)
        _chunk_kernel[(nd, NC, B)](a, x, r, a, a, a_sum, h_sum, a, a, a, a, T, D, NC, SUMMARY=True, HAS_H0=False,
                                   **flags)
        _carry_kernel[(nd, B)](a_sum, h_sum, a if h0 is None else h0, carry, D, NC, HAS_H0=h0 is not None,
                               BLOCK_D=BLOCK_D, num_warps=flags["num_warps"])
    _chunk_kernel[(nd, NC, B)](a, x, r, carry, y, a, a, h_last, a if h is None else h,
                               a if h0_for_da is None else h0_for_da, a if da is None else da, T, D, NC,
                               SUMMARY=False, HAS_H0=h0_for_da is not None, **flags)
    return h_last


def _check(a, b, h0, reset, chunk):
    check_device(a=a, b=b, h0=h0, reset=reset)
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (B, T, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    B, T, D = a.shape
    if h0 is not None and h0.shape != (B, D):
        raise ValueError(f"h0 must be ({B}, {D}), got {tuple(h0.shape)}")
    if reset is not None and (reset.shape != (B, T) or reset.dtype != torch.bool):
        raise ValueError(f"reset must be a ({B}, {T}) bool tensor, got {reset.dtype} {tuple(reset.shape)}")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")


class RGLRUScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reset, chunk):
        a_, b_ = a.contiguous(), b.contiguous()
        r = None if reset is None else reset.contiguous().view(torch.uint8)
        h0_ = None if h0 is None else h0.contiguous()
        B, T, D = a.shape
        h = torch.empty(B, T, D, dtype=torch.float32, device=a.device)
        h_last = _scan(a_, b_, r, h0_, h, chunk, reverse=False)
        ctx.save_for_backward(a_, h, h0_, r)
        ctx.chunk, ctx.b_dtype = chunk, b.dtype
        return h, h_last

    @staticmethod
    def backward(ctx, dh, dh_last):
        a, h, h0, r = ctx.saved_tensors
        db = torch.empty(a.shape, dtype=ctx.b_dtype, device=a.device)
        da = torch.empty_like(a)
        delta0 = _scan(a, dh.contiguous(), r, dh_last.contiguous(), db, ctx.chunk, reverse=True,
                       h=h, h0_for_da=h0, da=da)
        dh0 = None
        if h0 is not None and a.shape[1] == 0:  # h_T is h0 itself
            dh0 = dh_last.to(h0.dtype)
        elif h0 is not None:
            a0 = a[:, 0].float() if r is None else torch.where(r[:, :1] != 0, 0.0, a[:, 0].float())
            dh0 = (a0 * delta0).to(h0.dtype)
        return da, db, dh0, None, None


def rglru_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reset: torch.Tensor | None = None,
               chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t · h_{t-1} + b_t for a, b (B, T, D), from h0 (B, D) (None = zeros); a_t = 0 where reset (B, T).

    Returns (h (B, T, D), h_T (B, D)), both float32, like `minigemma.griffin.scan_sequential`.
    `chunk` (a power of two) is the number of steps a program runs one after the other.
    """
    _check(a, b, h0, reset, chunk)
    return RGLRUScanFunction.apply(a, b, h0, reset, chunk)


def reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reset: torch.Tensor | None = None):
    """`minigemma.griffin.scan_sequential` with a zeroed at the resets, as RGLRU does."""
    if reset is not None:
        a = a * ~reset[..., None]
    return scan_sequential(a, b, h0)
