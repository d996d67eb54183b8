"""The LM head and its loss, fused and chunked: the (N, V) logits never exist, forward and backward.

Every objective of chapters 08 and 09 is a cross-entropy against some target distribution q,

    loss_row = −Σ_v q_v log softmax(z)_v = lse(z) · Σ_v q_v − Σ_v q_v z_v,     z = cap(h Wᵀ)   (V,)
    ∂loss_row/∂z = softmax(z) · Σ_v q_v − q,        then · (1 − (z / c)²) through the soft-cap c·tanh(·/c)

with q one of (the targets `minigemma.losses` defines):

    Labels       next-token prediction: q = one-hot of the target (0 on an ignored row)
    Sampled      Gemma 3's sampled distillation: k ids per row with weights (the teacher's
                 probabilities renormalised over them), 0 elsewhere. Labels are the case k = 1.
    TeacherHead  Gemma 2's full distillation: q = p_T = softmax(cap_T(h_T W_Tᵀ)), the teacher's whole
                 distribution, itself rebuilt chunk by chunk from its final hidden states.

The rows (N = B·T tokens) are cut into chunks of n. For each chunk, torch computes the logits
z = h_c Wᵀ (n, V) with one matrix product (cuBLAS on a GPU), then ONE Triton kernel does everything
else, a program per row: pass 1 walks the vocabulary in blocks of BLOCK_V with the online
log-sum-exp (a running maximum m and sum l, l rescaled by exp(m_old − m_new) whenever m grows: the
softmax normaliser of flash attention), applying the soft-cap block by block; it gathers the k target
logits (or, for the teacher, keeps its own running m_T, l_T and Σ p_T z). Pass 2 walks the blocks
again and writes ∂loss/∂z over z, in place. The chunk's gradients then come from two more products,

    ∂loss/∂h_c = dz W        ∂loss/∂W += dzᵀ h_c

and the chunk is dropped. Eager PyTorch runs the same softmax as a dozen passes over (n, V) tensors
and, unchunked, holds all N × V of them: at Gemma 3's V = 262,144 that is 1 MiB per token in float32,
16 GiB for a batch of 8 × 2048, before its gradient. Here the largest tensor is one chunk of logits.

Like `minigemma.losses.chunked_loss` (the reference, same signature), the gradients are computed in
the forward and kept for the backward, which only scales them by the incoming gradient.

Precision. The kernel works in float32 whatever the logits' dtype. The logits of a float32 head are
float32 products; a bfloat16 head (GPU) multiplies bf16 inputs with float32 accumulation and a
float32 result (cuBLAS's `out_dtype`; exact products, as the reference's float32 product of the
same bf16 values), and rounds dz to bf16 for the two backward products (float32 accumulation, the
weight gradient summed over chunks in float32). The teacher's logits are computed in the teacher
weight's dtype, as the reference does. No `tl.dot` here: the products are torch's, which follow
`torch.backends.cuda.matmul.allow_tf32` (False by default: full float32 for a float32 head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minigemma import losses
from minigemma.losses import Labels, Sampled, TeacherHead

from .interpret import INTERPRET
from .utils import DeviceProps, check_device, tanh


@triton.jit
def _cap(z, softcap, SOFTCAP: tl.constexpr):
    """Gemma 2's final-logit soft-cap c · tanh(z / c) (or z itself)."""
    if SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def _loss_kernel(Z, ZT, IDS, WTS, VALID, LOSS, n_vocab, n_ids, stride_z, stride_zt, stride_ids,
                 softcap, softcap_t, scale,
                 SOFTCAP: tl.constexpr, SOFTCAP_T: tl.constexpr, TEACHER: tl.constexpr, GRAD: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of a chunk: its loss into LOSS[row]; with GRAD, ∂loss/∂z · scale written over its logits Z.

    The target is k ids with weights (IDS, WTS: Labels and Sampled), or with TEACHER the teacher's
    logits ZT and a 0/1 row weight VALID.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    zt_row = ZT + row * stride_zt
    offs = tl.arange(0, BLOCK_V)

    # the target's term: Σ_j w_j z[id_j] and the mass Σ_j w_j, gathered before pass 2 overwrites z
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < n_ids
    ids = tl.load(IDS + row * stride_ids + kk, mask=k_ok, other=0)
    w = tl.load(WTS + row * stride_ids + kk, mask=k_ok, other=0.0)
    z_ids = _cap(tl.load(z_row + ids, mask=k_ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
    mass = tl.sum(w, axis=0)
    picked = tl.sum(w * z_ids, axis=0)
    valid = tl.load(VALID + row).to(tl.float32)

    # pass 1: online log-sum-exp over the vocabulary, block by block
    m = float("-inf")  # running max of the student's logits
    l = 0.0  # running Σ exp(z − m)
    m_t = float("-inf")  # the teacher's running max, sum, and Σ exp(z_T − m_T) · z
    l_t = 0.0
    a_t = 0.0
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + offs
        ok = cols < n_vocab
        z = _cap(tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
        z = tl.where(ok, z, float("-inf"))  # lanes past V add exp(−inf) = 0
        m_new = tl.maximum(m, tl.max(z, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if TEACHER:
            zt = _cap(tl.load(zt_row + cols, mask=ok, other=0.0).to(tl.float32), softcap_t, SOFTCAP_T)
            zt = tl.where(ok, zt, float("-inf"))
            mt_new = tl.maximum(m_t, tl.max(zt, axis=0))
            alpha = tl.exp(m_t - mt_new)
            e = tl.exp(zt - mt_new)
            l_t = l_t * alpha + tl.sum(e, axis=0)
            a_t = a_t * alpha + tl.sum(e * tl.where(ok, z, 0.0), axis=0)
            m_t = mt_new
    lse = m + tl.log(l)
    lse_t = lse  # (unused without a teacher)
    if TEACHER:
        lse_t = m_t + tl.log(l_t)
        mass = valid  # Σ_v p_T(v) = 1 on a scored row
        loss = valid * (lse - a_t / l_t)
    else:
        loss = lse * mass - picked
    tl.store(LOSS + row, loss)

    if GRAD:
        tl.debug_barrier()  # every thread's loads of z above come before any store over z below
        # pass 2: dz = softmax(z) · mass − q, through the cap, scaled; written over z
        for v0 in range(0, n_vocab, BLOCK_V):
            cols = v0 + offs
            ok = cols < n_vocab
            z = _cap(tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
            dz = tl.exp(z - lse) * mass
            if TEACHER:
                zt = _cap(tl.load(zt_row + cols, mask=ok, other=0.0).to(tl.float32), softcap_t, SOFTCAP_T)
                dz -= tl.exp(zt - lse_t) * valid
            if SOFTCAP:
                dz *= 1.0 - (z / softcap) * (z / softcap)
            tl.store(z_row + cols, (dz * scale).to(Z.dtype.element_ty), mask=ok)
        if not TEACHER:
            tl.debug_barrier()  # pass 2's stores land before the target ids' values replace theirs
            dz_ids = tl.exp(z_ids - lse) * mass - w  # the ids are distinct in a row: one value each
            if SOFTCAP:
                dz_ids *= 1.0 - (z_ids / softcap) * (z_ids / softcap)
            tl.store(z_row + ids, (dz_ids * scale).to(Z.dtype.element_ty), mask=k_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
@dataclass
class _Target:
    """A target as the kernel reads it: k ids and weights per row, or the teacher's head."""

    valid: torch.Tensor  # (N,) bool: rows that count
    ids: torch.Tensor | None = None  # (N, k) int64
    weights: torch.Tensor | None = None  # (N, k) float32, 0 on rows that do not count
    teacher: TeacherHead | None = None


_TARGETS = "a minigemma.losses Labels, Sampled or TeacherHead"


def _as_target(target, n_rows: int, vocab: int) -> _Target:
    if isinstance(target, Labels):
        y = target.targets.reshape(-1)
        valid = target.valid.reshape(-1)
        ids = torch.where(valid, y, torch.zeros_like(y)).long()[:, None]
        t = _Target(valid, ids, valid.float()[:, None])
    elif isinstance(target, Sampled):
        t = _Target(target.valid, target.ids, target.weights)
        if t.ids.shape[1] > 1:
            ids_sorted = t.ids.sort(dim=-1).values
            if (ids_sorted[:, 1:] == ids_sorted[:, :-1]).any():
                raise ValueError("Sampled ids must be distinct within a row (sample_ids draws without replacement)")
    elif isinstance(target, TeacherHead):
        t = _Target(target.valid, teacher=target)
        if target.weight.shape[0] != vocab:
            raise ValueError(f"the teacher's head has {target.weight.shape[0]} rows, the student's {vocab}")
        if target.hidden.shape[0] != n_rows:
            raise ValueError(f"the teacher has {target.hidden.shape[0]} rows of hidden states, the student {n_rows}")
    else:
        raise TypeError(f"target must be {_TARGETS}, got {type(target).__name__}")
    if t.valid.shape[0] != n_rows:
        raise ValueError(f"the target has {t.valid.shape[0]} rows, hidden has {n_rows}")
    if t.ids is not None and t.ids.numel() and (int(t.ids.min()) < 0 or int(t.ids.max()) >= vocab):
        raise ValueError(f"target ids must be in [0, {vocab}) on scored rows; got ids in "
                         f"[{int(t.ids.min())}, {int(t.ids.max())}]")
    return t


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: plain float32 for float32 inputs; bf16/fp16 inputs keep the tensor cores
    with float32 accumulation and output (torch.mm's out_dtype, CUDA only), never a product rounded to bf16."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):  # no such overload here: round, then widen
        return (a @ b).float()


def _addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b in place, for float32 or 16-bit a, b (the weight gradient summed over chunks)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):  # no such overload: a (V, C) float32 temporary
        acc += _mm32(a, b)


def _launch(vocab: int, device: torch.device | None, props: DeviceProps | None = None) -> tuple[int, int]:
    """(BLOCK_V, warps) of the loss kernel. On a GPU (props given, or a CUDA device) 4096 logits a step
    over 8 warps: 16 float32 values a thread (8192, 32 a thread, spilled 28 B on sm_90 under a soft-cap;
    16 warps spilled too). The interpreter: 1024 over 1 warp, fewer and wider numpy steps."""
    gpu = props is not None or (device is not None and device.type == "cuda")
    return min(4096 if gpu else 1024, triton.next_power_of_2(vocab)), 8 if gpu else 1


def default_chunk(vocab: int, device: torch.device) -> int:
    """Rows per chunk. On a GPU about 64 M logits (256 MiB in float32) at once, enough rows for the
    products to run at full speed; on a CPU the package's own choice (`losses.default_chunk`, 16 MiB)."""
    if device.type == "cuda":
        return max(16, (1 << 26) // vocab)
    return losses.default_chunk(vocab)


def fused_linear_loss_forward(hidden: torch.Tensor, weight: torch.Tensor, target, softcap: float | None = None,
                              chunk: int | None = None, scale: float = 1.0, grad_hidden: bool = True,
                              grad_weight: bool = True, block_v: int | None = None, per_row: bool = False):
    """Σ_rows loss · scale, and (when asked) ∂/∂hidden (N, C) and ∂/∂weight (V, C) in float32.

    hidden (N, C), weight (V, C); target: Labels, Sampled or TeacherHead with N rows. With per_row,
    the first result is the (N,) float32 loss of every row (unscaled) instead of their sum.
    """
    check_device(hidden=hidden, weight=weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, C) and weight (V, C) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    N, C = hidden.shape
    V = weight.shape[0]
    t = _as_target(target, N, V)
    device = hidden.device
    chunk = chunk or default_chunk(V, device)
    auto_v, warps = _launch(V, device)
    block_v = block_v or auto_v
    grad = grad_hidden or grad_weight
    dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) and device.type == "cuda" \
        else torch.float32  # the products' input dtype; float32 on a CPU (the interpreter computes float32)
    w = weight.to(dtype)
    loss = torch.empty(N, dtype=torch.float32, device=device)
    g_h = torch.empty(N, C, dtype=torch.float32, device=device) if grad_hidden else None
    g_w = torch.zeros(V, C, dtype=torch.float32, device=device) if grad_weight else None
    valid = t.valid.to(device).float()  # (N,) 1.0 on scored rows
    if t.teacher is None:
        ids, wts = t.ids.to(device).contiguous(), t.weights.to(device).float().contiguous()
    else:  # unused by the kernel: one id 0 of weight 0 per row
        ids, wts = torch.zeros(N, 1, dtype=torch.long, device=device), torch.zeros(N, 1, device=device)
    k = ids.shape[1]
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h = hidden[r0:r1].to(dtype)
        z = _mm32(h, w.T)  # (n, V) float32: this chunk's logits, the only (·, V) tensor alive
        zt = None
        if t.teacher is not None:
            th = t.teacher
            zt = (th.hidden[r0:r1].to(th.weight.dtype) @ th.weight.T).contiguous()  # as the reference computes it
        _loss_kernel[(r1 - r0,)](
            z, zt if zt is not None else z, ids[r0:r1], wts[r0:r1], valid[r0:r1], loss[r0:r1], V, k,
            z.stride(0), (zt if zt is not None else z).stride(0), ids.stride(0),
            float(softcap or 0.0), float((t.teacher.softcap if t.teacher is not None else None) or 0.0), scale,
            SOFTCAP=bool(softcap), SOFTCAP_T=bool(t.teacher is not None and t.teacher.softcap),
            TEACHER=t.teacher is not None, GRAD=grad, BLOCK_V=block_v,
            BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=warps)
        del zt
        if grad:
            dz = z.to(dtype)  # ∂(loss · scale)/∂z, written over the logits by the kernel
            if grad_hidden and dtype == torch.float32:
                torch.mm(dz, w, out=g_h[r0:r1])
            elif grad_hidden:
                g_h[r0:r1] = _mm32(dz, w)
            if grad_weight:
                _addmm32_(g_w, dz.T, h)
        del z
    if per_row:
        return loss, g_h, g_w
    return loss.sum() * scale, g_h, g_w


class FusedLinearLossFunction(torch.autograd.Function):
    """The loss with its gradients computed in the forward; the backward scales them by grad_out."""

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, chunk, scale, block_v):
        total, g_h, g_w = fused_linear_loss_forward(hidden, weight, target, softcap, chunk, scale,
                                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1], block_v)
        ctx.save_for_backward(g_h, g_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_h, g_w = ctx.saved_tensors
        one = bool(grad_out == 1)

        def scaled(g, dtype):
            return None if g is None else (g if one else g * grad_out).to(dtype)

        return scaled(g_h, ctx.dtypes[0]), scaled(g_w, ctx.dtypes[1]), None, None, None, None, None


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, target, softcap: float | None = None,
                      chunk: int | None = None, reduction: str = "mean", *, block_v: int | None = None) -> torch.Tensor:
    """`minigemma.losses.chunked_loss` on the Triton kernel: same arguments, same value and gradients.

    hidden (..., C): final-normed hidden states; weight (V, C): the LM head; target: `Labels`, `Sampled`
    (ids distinct within a row) or `TeacherHead`, one row per hidden row; softcap: the final-logit
    soft-cap (Gemma 2: 30); reduction "mean" (over scored rows) or "sum". block_v: vocabulary block.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(target, (Labels, Sampled, TeacherHead)):
        raise TypeError(f"target must be {_TARGETS}, got {type(target).__name__}")
    h = hidden.reshape(-1, hidden.shape[-1])
    scale = 1.0 if reduction == "sum" else 1.0 / max(1, int(target.count()))
    return FusedLinearLossFunction.apply(h, weight, target, softcap, chunk, scale, block_v)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               softcap: float | None = None, chunk: int | None = None,
                               reduction: str = "mean") -> torch.Tensor:
    """`cross_entropy(soft_cap(hidden @ weight.T), targets)` without the logits (`losses.chunked_cross_entropy`)."""
    return fused_linear_loss(hidden, weight, Labels(targets), softcap, chunk, reduction)


@torch.no_grad()
def per_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                  chunk: int | None = None) -> torch.Tensor:
    """−log p(target) at every row, forward only: hidden (..., C), targets (...) -> (...) float32
    (`losses.per_token_nll` for a weight (V, C); every target must be a real id)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be ids in [0, {weight.shape[0]})")
    nll, _, _ = fused_linear_loss_forward(h, weight, Labels(y), softcap, chunk, grad_hidden=False,
                                          grad_weight=False, per_row=True)
    return nll.view(targets.shape)


def reference(hidden: torch.Tensor, weight: torch.Tensor, target, softcap: float | None = None,
              chunk: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """The package's torch code: `minigemma.losses.chunked_loss` (tested there against full-logit losses)."""
    return losses.chunked_loss(hidden, weight, target, softcap, chunk, reduction)


__all__ = ["FusedLinearLossFunction", "default_chunk", "fused_linear_cross_entropy", "fused_linear_loss",
           "fused_linear_loss_forward", "per_token_nll", "reference", "INTERPRET"]


# the launcher's choice, public for `kernels.aot`
launch_config = _launch
