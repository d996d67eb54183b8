"""Distillation from the real Gemma 3 270M into a tiny student with the same vocabulary (chapter 09).

    cache   = teacher_pass(teacher, windows, k=256)      # once: sampled ids + log-probs (+ hidden states)
    history = train_student("sampled_kd", cache, val)    # or "next_token", "full_kd"

Three objectives on the same windows, steps and initialisation (`losses` has the maths):

    next_token   the one-hot next token                                  (what chapter 08 did)
    full_kd      the teacher's whole distribution p_T (Gemma 2)          rebuilt from the cached hidden
                                                                         states through the teacher's head
    sampled_kd   p_T on k = 256 ids sampled from it, renormalised (Gemma 3)   read from the cache

The teacher runs in bfloat16 (`load_pretrained(..., quant="bf16")`): its body is the fast path and
its head product runs in bf16 too (3x faster than float32 on a CPU with bf16 instructions); the
logits of the k sampled ids are recomputed exactly in float32, so the sampled targets are exact and
only the normaliser and the full-distribution targets carry bf16 rounding (the chapter measures the
KL to the float32 teacher). The int8/int4 levels use an int4 head whose logits are exact only for
the top 1024 (`quant.RESCORE`): faithful for greedy decoding, but a full distribution or 256 sampled ids reach into the
approximated tail.

`on_policy_step` is the on-policy variant: the student writes, the teacher grades what it wrote.
`peak_memory` measures a training step's peak memory in a fresh process (eager cross-entropy on
full logits against the chunked head + loss).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .losses import IGNORE, Labels, Sampled, TeacherCache, TeacherHead, chunked_loss, default_chunk
from .train import TrainConfig, lr_at, make_optimizer

OBJECTIVES = ("next_token", "full_kd", "sampled_kd")


def student_config(vocab_size: int = 262_144, hidden: int = 64, layers: int = 2, window: int = 32):
    """A tiny Gemma 3 student: Gemma 3 270M's vocabulary and block, at width 64 and 2 layers
    (1 local + 1 global). Its 262,144 × 64 embedding (16.8 M) dwarfs its blocks (0.1 M)."""
    from .gemma import GemmaConfig

    return GemmaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=hidden // 4, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                       sliding_window=window, query_pre_attn_scalar=hidden // 4, rope_theta=1_000_000.0,
                       use_qk_norm=True)


@torch.no_grad()
def teacher_pass(teacher: nn.Module, windows: torch.Tensor, k: int = 256, seed: int = 0, batch: int = 4,
                 keep_hidden: bool = True, progress: bool = True, name: str = "gemma3-270m") -> TeacherCache:
    """Run the teacher once over windows (S, T + 1); sample k ids per position; return the cache.

    For each position: the final hidden state h_T, the float32 logits h_T Wᵀ (chunk by chunk), k
    distinct ids drawn from softmax(logits) (Gumbel top-k) and their log-probabilities. The head
    product runs in the teacher's dtype: in bf16 for a bf16 teacher (see `losses.capped_logits`).
    """
    from tqdm.auto import tqdm

    from .losses import capped_logits, float_copy_for_products, sample_ids

    weight, cap = teacher.head()  # (V, C) in the teacher's dtype; a quantised head is refused
    gen = torch.Generator().manual_seed(seed)
    S, T = windows.shape[0], windows.shape[1] - 1
    ids = torch.empty(S, T, k, dtype=torch.int32)
    logp = torch.empty(S, T, k, dtype=torch.float16)
    hidden = None
    rows = default_chunk(weight.shape[0]) * 4
    weight32 = float_copy_for_products(weight)  # converted once, not per chunk (or None)
    for s0 in tqdm(range(0, S, batch), desc="teacher", disable=not progress, leave=False):
        x = windows[s0:s0 + batch, :-1]
        h = teacher(x, return_hidden=True)  # (b, T, C)
        if keep_hidden and hidden is None:
            hidden = torch.empty(S, T, h.shape[-1], dtype=torch.bfloat16)
        if keep_hidden:
            hidden[s0:s0 + batch] = h.to(torch.bfloat16)
        flat = h.reshape(-1, h.shape[-1])
        out_i, out_l = [], []
        for r0 in range(0, flat.shape[0], rows):
            hc = flat[r0:r0 + rows]
            z = capped_logits(hc, weight, cap, weight32=weight32)  # (n, V) float32 (a bf16 product's values)
            sel = sample_ids(z, k, gen)
            exact = torch.einsum("nc,nkc->nk", hc.float(), weight[sel].float())  # the k sampled logits in float32
            if cap:
                exact = cap * torch.tanh(exact / cap)
            lp = exact - torch.logsumexp(z, -1, keepdim=True)
            out_i.append(sel)
            out_l.append(lp)
        ids[s0:s0 + batch] = torch.cat(out_i).view(-1, T, k).to(torch.int32)
        logp[s0:s0 + batch] = torch.cat(out_l).view(-1, T, k).to(torch.float16)
    meta = {"teacher": name, "k": k, "seed": seed, "vocab_size": int(weight.shape[0]),
            "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", "")}
    return TeacherCache(windows.clone(), ids, logp, hidden, meta)


class StudentLoss(nn.Module):
    """A student and one objective: a batch of cache rows -> (Σ loss, scored positions).

    teacher_head: `teacher.head()`, (W (V, C), final soft-cap), needed by full_kd only; W is read as a
    constant (`losses.TeacherHead` detaches it)."""

    def __init__(self, student: nn.Module, objective: str, teacher_head: tuple | None = None,
                 chunk: int | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "full_kd" and teacher_head is None:
            raise ValueError("full_kd needs the teacher's head (teacher.head())")
        self.student, self.objective, self.teacher_head, self.chunk = student, objective, teacher_head, chunk

    def forward(self, tokens, ids=None, logp=None, hidden=None):
        hs = self.student(tokens[:, :-1], return_hidden=True)  # (B, T, C)
        weight, cap = self.student.head()
        if self.objective == "next_token":
            target = Labels(tokens[:, 1:])
        elif self.objective == "sampled_kd":
            target = Sampled(ids, torch.softmax(logp.float(), dim=-1))
        else:
            target = TeacherHead(hidden, *self.teacher_head)
        return chunked_loss(hs, weight, target, cap, self.chunk, reduction="sum"), target.count()


@torch.no_grad()
def evaluate_next_token(student: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss (nats) of the student on windows (N, T + 1): the common yardstick."""
    was = student.training
    student.eval()
    weight, cap = student.head()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        h = student(w[:, :-1], return_hidden=True)
        total += float(chunked_loss(h, weight, Labels(w[:, 1:]), cap, reduction="sum"))
        count += w[:, 1:].numel()
    student.train(was)
    return total / count


def train_student(objective: str, cache: TeacherCache, val_windows: torch.Tensor, cfg: TrainConfig,
                  teacher_head: tuple | None = None, student: nn.Module | None = None, seed: int = 0,
                  progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a fresh student (same seed, same init for every objective) on the cache's windows in
    order, cfg.batch_size rows per step; evaluate next-token loss on val_windows. Returns (student, history)."""
    from tqdm.auto import tqdm

    from .gemma import Gemma

    if student is None:
        torch.manual_seed(seed)
        student = Gemma(student_config(vocab_size=int(cache.meta["vocab_size"])))
    module = StudentLoss(student, objective, teacher_head, cfg.loss_chunk)
    opt = make_optimizer(student, cfg)
    hist = {"step": [], "loss": [], "val_step": [0], "val_loss": [evaluate_next_token(student, val_windows)]}
    S, B = cache.tokens.shape[0], cfg.batch_size
    bar = tqdm(range(cfg.steps), desc=objective, disable=not progress, leave=True)
    for step in bar:
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        r = torch.arange(step * B, (step + 1) * B) % S  # the cache's rows, in order
        loss_sum, n = module(cache.tokens[r], cache.ids[r], cache.logp[r],
                             None if cache.hidden is None else cache.hidden[r])
        (loss_sum / n).backward()
        if cfg.clip:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist["step"].append(step + 1)
        hist["loss"].append(float(loss_sum.detach()) / float(n))
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(evaluate_next_token(student, val_windows))
            bar.set_postfix(val=f"{hist['val_loss'][-1]:.3f}", refresh=False)
    return student, hist


# --------------------------------------------------------------------------------------------
# On-policy distillation: the student writes, the teacher grades
# --------------------------------------------------------------------------------------------
@dataclass
class OnPolicyResult:
    loss: float  # the student's sampled-KD loss on its own samples, before the step
    teacher_nll: float  # the teacher's mean −log p of the tokens the student wrote
    samples: list = field(default_factory=list)


def on_policy_step(student: nn.Module, teacher: nn.Module, prompts: torch.Tensor, opt, new_tokens: int = 32,
                   k: int = 256, temperature: float = 1.0, seed: int = 0) -> OnPolicyResult:
    """One step of on-policy distillation (GKD-style): the student samples continuations of prompts
    (B, P); the teacher scores every position of prompt + continuation; the student is trained on the
    teacher's sampled targets at the positions of its own tokens only (what it actually wrote)."""
    from .generation import generate_ids
    from .losses import capped_logits, sample_ids

    B, P = prompts.shape
    student.eval()
    new = generate_ids(student, prompts.tolist(), new_tokens, temperature=temperature, seed=seed, eos_id=None)
    student.train()
    seq = torch.cat([prompts, torch.tensor(new, dtype=torch.long)], dim=1)  # (B, P + new)
    with torch.no_grad():
        weight, cap = teacher.head()
        h = teacher(seq[:, :-1], return_hidden=True).reshape(-1, weight.shape[1])
        z = capped_logits(h, weight, cap)  # (B·(L-1), V): a few hundred rows
        lp_all = torch.log_softmax(z, -1)
        nxt = seq[:, 1:].reshape(-1, 1)
        scored = torch.zeros(B, seq.shape[1] - 1, dtype=torch.bool)
        scored[:, P - 1:] = True  # positions that predict the student's own tokens
        teacher_nll = float(-(lp_all.gather(-1, nxt)[:, 0] * scored.reshape(-1)).sum() / scored.sum())
        ids = sample_ids(z, k, torch.Generator().manual_seed(seed))
        w = torch.softmax(z.gather(-1, ids), -1)
    hs = student(seq[:, :-1], return_hidden=True)
    sw, scap = student.head()
    loss = chunked_loss(hs, sw, Sampled(ids, w, scored), scap)
    loss.backward()
    nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return OnPolicyResult(float(loss.detach()), teacher_nll, new)


# --------------------------------------------------------------------------------------------
# Peak memory of one training step, measured in a fresh process
# --------------------------------------------------------------------------------------------
_MEASURE = r"""
import json, sys, torch
torch.set_num_threads(1)
from minigemma import losses
args = json.loads(sys.argv[1])
N, C, V = args["N"], args["C"], args["V"]
g = torch.Generator().manual_seed(0)
hidden = (torch.randn(N, C, generator=g) * 0.1).requires_grad_()
weight = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
targets = torch.randint(0, V, (N,), generator=g)
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM): count only what follows
base = status_kib("VmRSS")
if args["kind"] == "eager":
    loss = losses.cross_entropy(hidden @ weight.T, targets)
else:
    loss = losses.chunked_cross_entropy(hidden, weight, targets, chunk=args.get("chunk"))
loss.backward()
peak = status_kib("VmHWM")
print(json.dumps({"extra_mib": (peak - base) / 1024, "loss": float(loss)}))
"""


def peak_memory(kind: str, N: int, C: int, V: int, chunk: int | None = None) -> dict:
    """Peak extra memory (MiB) of the head + loss forward and backward for N rows, width C and
    vocabulary V: kind "eager" (full logits, then cross-entropy) or "chunked". Runs in a fresh
    process (Linux: the peak resident set VmHWM, reset once the inputs and parameters exist), so
    nothing else is counted. (ru_maxrss would not do: Linux carries it over from the parent.)"""
    r = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps({"kind": kind, "N": N, "C": C, "V": V,
                                                                     "chunk": chunk})],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def perplexity(loss_nats: float) -> float:
    return math.exp(loss_nats)
