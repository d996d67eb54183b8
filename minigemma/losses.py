"""Losses for pre-training and distillation (chapters 08 and 09), and the teacher cache format.

Three objectives, each the cross-entropy  -Σ_v q_v log p_S(v)  against a different target q:

    next-token prediction     q = one-hot of the next token
    full distillation         q = p_T, the teacher's whole next-token distribution (Gemma 2)
    sampled distillation      q = p_T restricted to k ids sampled from p_T, renormalised, zero
                              elsewhere (Gemma 3 samples k = 256 per position)

The plain functions (`cross_entropy`, `next_token_loss`, `kd_loss`, `sampled_kd_loss`) take logits
(B, T, V): they are the references. With V = 262,144 a batch of 8 × 512 tokens has 1.1 G logits,
4 GiB in float32 before any gradient, so training never builds them: `chunked_loss` takes the final
hidden states (N, C) and the head (V, C), and walks over N in chunks of rows. For each chunk it
computes the logits, the loss and the gradient of the loss with respect to those logits,

    ∂loss/∂z = softmax(z) · Σ_v q_v − q          (the gradient of −Σ q log softmax(z))

and turns that into the chunk's share of ∂loss/∂hidden and ∂loss/∂head, then drops the logits.
Peak memory holds one chunk of logits instead of all of them (Liger-Kernel's fused linear
cross-entropy does the same in one GPU kernel; chapter 12 shows the idea with Triton).

Shapes: B batch, T positions, V vocabulary, C hidden width, N = B·T rows, k sampled ids per row.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import write_atomic
from .quant import BF16_MATMUL_NATIVE

IGNORE = -100  # a target that is not scored (padding, the last position of a row)


# --------------------------------------------------------------------------------------------
# The plain references: full logits
# --------------------------------------------------------------------------------------------
def shift_targets(ids: torch.Tensor, mask: torch.Tensor | None = None, ignore_index: int = IGNORE) -> torch.Tensor:
    """Targets for next-token prediction: (B, T) -> (B, T), target[:, t] = ids[:, t + 1].

    The last position has no next token; with a padding mask (B, T), True for real tokens, a
    position is scored only if both it and its next token are real (a pad neither predicts nor is
    predicted). Unscored positions get `ignore_index`.
    """
    targets = torch.full_like(ids, ignore_index)
    targets[:, :-1] = ids[:, 1:]
    if mask is not None:
        mask = mask.bool()
        valid = torch.zeros_like(mask)
        valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
        targets = torch.where(valid, targets, torch.full_like(targets, ignore_index))
    return targets


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean of −log softmax(logits)[target] over scored positions. logits (..., V), targets (...).

    Computed in float32 whatever the logits' dtype. 0 when nothing is scored.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    return (nll * valid).sum() / valid.sum().clamp(min=1)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The language-modelling loss of a batch: logits (B, T, V) from ids (B, T), padding mask (B, T).

    Position t predicts ids[:, t + 1]; scored where both tokens are real (`shift_targets`).
    """
    return cross_entropy(logits, shift_targets(ids, mask))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation on the teacher's full distribution (Gemma 2): mean over scored positions of

        −Σ_v p_T(v) log p_S(v),      p = softmax(logits), in float32.

    logits (..., V) of the same positions; mask (...) True where scored (default: everywhere). It
    differs from KL(p_T ‖ p_S) by the teacher's entropy, a constant for the student.
    """
    log_ps = torch.log_softmax(student_logits.float(), dim=-1)
    pt = torch.softmax(teacher_logits.float(), dim=-1)
    per_pos = -(pt * log_ps).sum(-1)
    if mask is None:
        return per_pos.mean()
    mask = mask.bool()
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


def sample_ids(teacher_logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct ids per position, drawn from softmax(teacher_logits) without replacement. (..., V) -> (..., k).

    The Gumbel top-k trick: the k largest of logits + Gumbel noise are a sample without replacement
    in proportion to the probabilities, in one vectorised top-k instead of k sequential draws.
    """
    u = torch.rand(teacher_logits.shape, generator=generator, device=teacher_logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
    return (teacher_logits.float() + gumbel).topk(k, dim=-1).indices


def sampled_weights(teacher_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's probabilities of `ids`, renormalised to sum to 1: (..., V), (..., k) -> (..., k).

    p_T(id) / Σ_j p_T(id_j) is the softmax of the sampled logits alone (the normaliser cancels).
    """
    return torch.softmax(teacher_logits.float().gather(-1, ids), dim=-1)


def sampled_target(teacher_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gemma 3's sampled distillation target as a dense distribution (..., V): the teacher's
    probabilities on the sampled ids (distinct), renormalised over them, 0 on every other id."""
    target = torch.zeros(teacher_logits.shape, dtype=torch.float32, device=teacher_logits.device)
    return target.scatter_(-1, ids, sampled_weights(teacher_logits, ids))


def sampled_kd_loss(student_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ_j w_j log p_S(id_j), averaged over scored positions. logits (..., V); ids, weights (..., k)."""
    log_ps = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, ids)
    per_pos = -(weights.float() * log_ps).sum(-1)
    if mask is None:
        return per_pos.mean()
    mask = mask.bool()
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# Targets for the chunked loss: each gives, for a chunk of rows, the loss and ∂loss/∂logits
# --------------------------------------------------------------------------------------------
def cross_entropy_grad(logp: torch.Tensor, q: torch.Tensor | None = None,
                       mass: torch.Tensor | None = None) -> torch.Tensor:
    """∂/∂z of each row's −Σ_v q_v log softmax(z)_v, in closed form: softmax(z) · Σ_v q_v − q.

    logp (n, V): log_softmax(z), overwritten with the gradient (softmax is its exp: no exp of a large
    logit, so a very peaked row stays finite). q (n, V): a dense target, or None where the caller
    subtracts a sparse one itself (`scatter_add_` of a label or of sampled ids). mass (n,): Σ_v q_v of
    each row, 0 on a row not scored, where it need not be 1 (a sampled target's probabilities not
    renormalised); None when every row's target sums to 1 (then no multiplication). Each target below
    calls it; chapter 09's exercise `09.chunked_loss_grad` asks for it with the mask and the mean.
    """
    dz = logp.exp_()  # softmax, in place of log-softmax
    if mass is not None:
        dz.mul_(mass[:, None])
    return dz if q is None else dz.sub_(q)


class Labels:
    """Next-token targets (N,) (`IGNORE` where unscored): q is one-hot."""

    def __init__(self, targets: torch.Tensor, ignore_index: int = IGNORE):
        self.targets = targets.reshape(-1)
        self.valid = self.targets != ignore_index
        self.all_valid = bool(self.valid.all())  # then no row of the gradient needs zeroing

    def count(self) -> torch.Tensor:
        return self.valid.sum()

    def loss_and_grad(self, logp: torch.Tensor, r0: int, r1: int):
        y, valid = self.targets[r0:r1], self.valid[r0:r1]
        yc = y.clamp(min=0)[:, None]
        loss = -(logp.gather(-1, yc)[:, 0] * valid).sum()
        dz = cross_entropy_grad(logp, mass=None if self.all_valid else valid)  # p · Σq, q subtracted below
        dz.scatter_add_(-1, yc, -valid[:, None].to(dz.dtype))
        return loss, dz


class Sampled:
    """Sampled-distillation targets: ids (N, k) and weights (N, k) summing to 1 on scored rows.
    `mask` (N,) False drops a row."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None):
        k = ids.shape[-1]
        self.ids, self.weights = ids.reshape(-1, k).long(), weights.reshape(-1, k).float()
        self.valid = torch.ones(self.ids.shape[0], dtype=torch.bool, device=ids.device) if mask is None \
            else mask.reshape(-1).bool()
        self.weights = self.weights * self.valid[:, None]

    def count(self) -> torch.Tensor:
        return self.valid.sum()

    def loss_and_grad(self, logp, r0, r1):
        ids, w = self.ids[r0:r1], self.weights[r0:r1]
        mass = w.sum(-1)  # 1 on scored rows, 0 elsewhere
        loss = -(w * logp.gather(-1, ids)).sum()
        dz = cross_entropy_grad(logp, mass=mass)  # p · Σq; the sparse q subtracted below
        dz.scatter_add_(-1, ids, -w)
        return loss, dz


class TeacherHead:
    """Full-distribution targets rebuilt chunk by chunk from the teacher's final hidden states
    (N, C_T) and its head (V, C_T) (soft-capped like the teacher's logits): p_T = softmax(head(h_T)).
    The full rows never exist at once, for the teacher either."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None,
                 mask: torch.Tensor | None = None):
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight, self.softcap = weight.detach(), softcap
        self.weight32 = float_copy_for_products(self.weight)  # converted once for every chunk (or None)
        self.valid = torch.ones(self.hidden.shape[0], dtype=torch.bool, device=hidden.device) if mask is None \
            else mask.reshape(-1).bool()

    def count(self) -> torch.Tensor:
        return self.valid.sum()

    def loss_and_grad(self, logp, r0, r1):
        zt = capped_logits(self.hidden[r0:r1], self.weight, self.softcap, weight32=self.weight32)
        q = torch.softmax(zt, dim=-1).mul_(self.valid[r0:r1, None])
        mass = q.sum(-1)
        loss = -(q * logp).sum()
        dz = cross_entropy_grad(logp, q, mass)
        return loss, dz


def float_copy_for_products(weight: torch.Tensor) -> torch.Tensor | None:
    """A float32 copy of a bf16 head for `capped_logits(..., weight32=)`, made once by a caller that runs
    many chunks, where the CPU has no fast bf16 product (`quant.BF16_MATMUL_NATIVE`); else None."""
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not BF16_MATMUL_NATIVE:
        return weight.detach().float()
    return None


def capped_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None,
                  out: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
                  weight32: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits of rows h (n, C) under the head (V, C), soft-capped in place.

    The product runs in the weight's dtype: float32 for a float32 head; for a bfloat16 head (a bf16
    teacher, or the student's head under autocast) the logits come out rounded to bfloat16 (3x
    faster on CPUs with bf16 instructions; a KL of ~1e-3 nats from the float32 product, which
    chapter 09 measures); on a CPU without them, the same values from a float32 product
    (as `quant.bf16_matmul`; `weight32`: the head's float32 copy, from `float_copy_for_products`, so that
    chunk after chunk does not convert the head again). Buffers reused chunk after chunk: `out` (n, V) float32 receives the
    logits; `scratch` (n, V) in the weight's dtype receives a low-precision product first."""
    if weight.dtype == torch.float32:
        z = torch.mm(h.float(), weight.T, out=out) if out is not None else h.float() @ weight.T
    elif weight32 is not None or (h.shape[0] > 8 and (weight32 := float_copy_for_products(weight)) is not None):
        # a slow-bf16 CPU: the bf16 values multiplied in float32, the sums rounded to bf16 as the bf16 product's
        product = (h.to(weight.dtype).float() @ weight32.T).to(weight.dtype)
        z = out.copy_(product) if out is not None else product.float()
    else:
        product = torch.mm(h.to(weight.dtype), weight.T, out=scratch) if scratch is not None \
            else h.to(weight.dtype) @ weight.T
        z = out.copy_(product) if out is not None else product.float()
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast gives matrix products on `device` now, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: about 4 M logits (16 MiB in float32) at a time, at least 16 rows."""
    return max(16, (1 << 22) // vocab_size)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ over rows of −Σ_v q_v log softmax(cap(h W^T))_v, with its gradients computed in the forward.

    Forward, per chunk of rows: z = cap(h_c W^T) (n, V); log p = log_softmax(z); the loss
    −Σ_v q_v log p_v; dz = p·Σq − q; through the cap, ∂z/∂a = 1 − (z / cap)²; then ∂/∂h_c = da W
    and ∂/∂W += da^T h_c. Only the gradients (N, C) and (V, C) are kept for the backward, which
    scales them by the incoming gradient. The (chunk, V) buffers serve every chunk: fresh arrays
    per chunk cost more in page faults than the arithmetic on them.

    Under autocast (mixed-precision training) the three products take bfloat16 inputs, as an
    autocast `nn.Linear` head would: h_c W^T, da W and da^T h_c. The softmax, the loss, dz and the
    running sums of the gradients stay float32; each chunk's (V, C) share is rounded to bfloat16
    once before it is added (autocast's head rounds its whole gradient once). On the chapter 08
    model's batch (2,048 rows, V = 4,096) the head + loss, forward and backward, takes ~36 ms this
    way against ~47 ms in float32 on this course's 2-core CPU.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, chunk, scale=1.0):
        N, C = hidden.shape
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device
        low = _autocast_dtype(device)  # bfloat16 products under autocast, else None
        w = weight.to(low) if low else weight.float()  # what the products read
        grad_h = torch.empty(N, C, dtype=torch.float32, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=device)
        V, n_max = w.shape[0], min(chunk, N)
        z_buf = torch.empty(n_max, V, dtype=torch.float32, device=device)
        logp_buf = torch.empty(n_max, V, dtype=torch.float32, device=device)
        if low:  # the low-precision copies of z and dz, and of one chunk's (V, C) gradient
            zl_buf, dzl_buf = (torch.empty(n_max, V, dtype=low, device=device) for _ in range(2))
            gw_buf = torch.empty(V, C, dtype=low, device=device) if need_w else None
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            n = r1 - r0
            h = hidden[r0:r1].to(w.dtype)
            z = capped_logits(h, w, softcap, out=z_buf[:n], scratch=zl_buf[:n] if low else None)  # (n, V)
            slope = None
            if softcap and (need_h or need_w):
                slope = 1.0 - (z / softcap) ** 2  # ∂ cap(a) / ∂a, from the capped value
            logp = torch.log_softmax(z, dim=-1, out=logp_buf[:n])
            loss, dz = target.loss_and_grad(logp, r0, r1)  # dz overwrites logp
            total += loss
            if slope is not None:
                dz.mul_(slope)
            if scale != 1.0:
                dz.mul_(scale)  # a mean's 1/N folded in here, so the backward has nothing left to scale
            if low:
                dz = dzl_buf[:n].copy_(dz)
            if need_h:
                grad_h[r0:r1] = torch.mm(dz, w)  # (n, C), float32 whatever the product's dtype
            if need_w:
                if low:
                    grad_w += torch.mm(dz.T, h, out=gw_buf)
                else:
                    grad_w.addmm_(dz.T, h)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        one = bool(grad_out == 1)  # the usual case: hand the (V, C) gradient over without a copy

        def scaled(g, dtype):
            return None if g is None else (g if one else g * grad_out).to(dtype)

        return scaled(grad_h, ctx.dtypes[0]), scaled(grad_w, ctx.dtypes[1]), None, None, None, None


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, target, softcap: float | None = None,
                 chunk: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """The head and the loss together, chunk by chunk: the (N, V) logits are never materialised.

    hidden (..., C): final-normed hidden states; weight (V, C): the LM head (tied: the embedding);
    target: `Labels`, `Sampled` or `TeacherHead`, one row per hidden row; softcap: the model's
    final logit soft-cap. reduction "mean" divides by the number of scored rows, "sum" does not
    (gradient accumulation divides by the total over all micro-batches itself).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or default_chunk(weight.shape[0])
    scale = 1.0 if reduction == "sum" else 1.0 / max(1, int(target.count()))
    return _ChunkedHeadLoss.apply(h, weight, target, softcap, chunk, scale)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          softcap: float | None = None, chunk: int | None = None,
                          reduction: str = "mean") -> torch.Tensor:
    """`cross_entropy(soft_cap(hidden @ weight.T), targets)` without the logits. hidden (..., C), targets (...)."""
    return chunked_loss(hidden, weight, Labels(targets), softcap, chunk, reduction)


# --------------------------------------------------------------------------------------------
# The teacher cache: the sampled targets of every training position, stored once
# --------------------------------------------------------------------------------------------
@dataclass
class TeacherCache:
    """What a teacher says about a fixed set of training windows, on disk as one safetensors file.

    tokens (S, T + 1) int32   the windows (inputs are tokens[:, :-1], next tokens tokens[:, 1:])
    ids    (S, T, k) int32    k ids per position, sampled from the teacher without replacement
    logp   (S, T, k) float16  the teacher's log-probabilities of those ids (normalised over the
                              whole vocabulary, so Σ exp(logp) says how much mass the sample holds)
    hidden (S, T, C) bfloat16 optional: the teacher's final hidden states, from which its head
                              rebuilds the full distribution chunk by chunk (`TeacherHead`)
    meta   dict               teacher name, quantisation level, k, seed, vocabulary size

    A full row of 262,144 probabilities is 512 KiB in bfloat16; k = 256 sampled ids with their
    log-probabilities are 1.5 KiB: `bytes_per_position` and `full_bytes_per_position` compare them.
    """

    tokens: torch.Tensor
    ids: torch.Tensor
    logp: torch.Tensor
    hidden: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def weights(self) -> torch.Tensor:
        """(S, T, k) the sampled target: the teacher's probabilities renormalised over the sample."""
        return torch.softmax(self.logp.float(), dim=-1)

    def bytes_per_position(self, with_hidden: bool = False) -> int:
        """Bytes on disk per position: k × (int32 id + float16 log-prob) [+ C bfloat16 hidden values]."""
        k = self.ids.shape[-1]
        extra = self.hidden.shape[-1] * 2 if with_hidden and self.hidden is not None else 0
        return k * (4 + 2) + extra

    def full_bytes_per_position(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return int(self.meta["vocab_size"]) * dtype.itemsize

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temporary file, flushed to disk, then renamed over `path`."""
        from safetensors.torch import save_file

        tensors = {"tokens": self.tokens.to(torch.int32).contiguous(), "ids": self.ids.to(torch.int32).contiguous(),
                   "logp": self.logp.to(torch.float16).contiguous()}
        if self.hidden is not None:
            tensors["hidden"] = self.hidden.to(torch.bfloat16).contiguous()

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={"teacher_cache": json.dumps(self.meta)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # on disk before the name says the file is complete

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "teacher_cache" not in meta:
                raise ValueError(f"{path} is not a teacher cache (no 'teacher_cache' metadata)")
            t = {name: f.get_tensor(name) for name in f.keys()}
        return cls(t["tokens"].long(), t["ids"].long(), t["logp"], t.get("hidden"), json.loads(meta["teacher_cache"]))


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """A tokenizer-independent loss: total nats / (bytes · ln 2). Lets models with different
    vocabularies be compared on the same text."""
    return loss_nats * n_tokens / (n_bytes * math.log(2))


@torch.no_grad()
def per_token_nll(hidden: torch.Tensor, head, targets: torch.Tensor, softcap: float | None = None,
                  chunk: int | None = None) -> torch.Tensor:
    """−log p(target) at every row, without the (N, V) logits: hidden (..., C), targets (...) -> (...) float32.

    `head` is a weight (V, C) or a module mapping (n, C) to logits (n, V), such as a quantised
    model's `lm_head` (its int4 head is then the one scored).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    V = head.shape[0] if isinstance(head, torch.Tensor) else None
    # 8 × the training chunk (no gradients here): at V = 262k, 128 rows, 128 MiB of logits; each chunk reads the
    # whole head once, so fewer, larger chunks read it fewer times
    chunk = chunk or 8 * default_chunk(V or 262_144)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    head32 = float_copy_for_products(head) if isinstance(head, torch.Tensor) else None
    for r0 in range(0, h.shape[0], chunk):
        hc = h[r0:r0 + chunk]
        if isinstance(head, torch.Tensor):
            z = capped_logits(hc, head, softcap, weight32=head32)
        else:
            z = head(hc).float()
            if softcap:
                z = softcap * torch.tanh(z / softcap)
        out[r0:r0 + chunk] = torch.logsumexp(z, -1) - z.gather(-1, y[r0:r0 + chunk, None])[:, 0]
    return out.view(targets.shape)
