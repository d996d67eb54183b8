"""Training an embedding model the EmbeddingGemma way, at small scale (chapter 11).

The EmbeddingGemma report (section 2) trains with three losses, summed, at every Matryoshka prefix:

    NCE        -log e^{s(q_i, p_i)} / (Σ_j m_ij e^{s(q_i, p_j)} + w_i e^{s(q_i, p_i⁻)})
               s(a, b) = cos(a, b) / τ; in-batch negatives p_j plus one hard negative p_i⁻;
               m_ij = 0 masks an in-batch "negative" that is really the query's own positive
               (the same document twice in a batch), m_ii = 1;
               w_i = exp(α · stopgrad(cos(q_i, p_i⁻))), α = 5: harder negatives weigh more
    spread-out the global orthogonal regulariser: mean over pairs i ≠ j of (e_i · e_j)², for the
               queries and for the passages: pushes unrelated embeddings towards orthogonal, so
               they use the whole sphere (and survive quantisation and truncation)
    distill    geometric embedding distillation: the student's embeddings of q, p⁺, p⁻ matched to
               the teacher's (the exact form is unpublished; embedding matching, 1 - cos, is the
               usual reading)
    MRL        each loss on the first d numbers of every embedding, renormalised, d in `dims`

and averages checkpoints trained on different data mixtures ("souping", `soup`).

Shapes: B queries in a batch, E embedding width, d an MRL prefix. Every embedding is unit length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import pad_right, truncate


# --------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------
def _check_pairs(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None) -> None:
    if q.ndim != 2 or q.shape != p.shape:
        raise ValueError(f"q and p must both be (B, E), got {tuple(q.shape)} and {tuple(p.shape)}")
    if n is not None and n.shape != q.shape:
        raise ValueError(f"the hard negatives must be (B, E) like q {tuple(q.shape)}, got {tuple(n.shape)}")


def nce_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
             tau: float = 0.05, alpha: float = 5.0) -> torch.Tensor:
    """Contrastive NCE with in-batch negatives and one hard negative per query -> 0-d float32.

    q, p, n: (B, E) unit-length queries, their positives and their hard negatives (n may be None).
    doc_ids: (B,) an id per positive; an in-batch p_j with doc_ids[j] == doc_ids[i], j ≠ i, is the
             query's own positive again, a false negative, and is left out of row i's denominator.
    tau:     temperature of s(a, b) = cos(a, b) / τ.
    alpha:   hardness: the hard negative's term is weighted by w_i = exp(α · stopgrad(cos(q_i, n_i)));
             α = 0 gives the plain (unweighted) hard negative.
    """
    _check_pairs(q, p, n)
    q, p = q.float(), p.float()
    logits = q @ p.T / tau  # (B, B): s(q_i, p_j); the diagonal holds the positives
    if doc_ids is not None:
        same = doc_ids[:, None] == doc_ids[None, :]  # (B, B)
        false_neg = same & ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        logits = logits.masked_fill(false_neg, float("-inf"))
    if n is not None:
        cos_n = (q * n.float()).sum(-1)  # (B,) cos(q_i, n_i)
        log_w = alpha * cos_n.detach()  # log w_i: a weight in the denominator is a shift of the logit
        logits = torch.cat([logits, (cos_n / tau + log_w)[:, None]], dim=1)  # (B, B + 1)
    target = torch.arange(len(q), device=q.device)
    return F.cross_entropy(logits, target)


def spread_out(e: torch.Tensor) -> torch.Tensor:
    """The global orthogonal regulariser: mean over ordered pairs i ≠ j of (e_i · e_j)², e (N, E) -> 0-d.

    For random unit vectors in E dimensions E[(e_i · e_j)²] = 1 / E; the regulariser pushes the
    embeddings of unrelated texts towards that spread instead of one crowded cone.
    """
    if e.ndim != 2 or len(e) < 2:
        raise ValueError(f"spread_out needs (N, E) with N >= 2, got {tuple(e.shape)}")
    e = e.float()
    g = e @ e.T  # (N, N)
    N = len(e)
    off = g.pow(2).sum() - g.diagonal().pow(2).sum()
    return off / (N * (N - 1))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Embedding matching: mean over rows of 1 - cos(student_i, teacher_i), both (N, E) -> 0-d.

    The teacher's vectors are targets (no gradient). For unit vectors 1 - cos = |s - t|² / 2.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings must match")
    return (1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()


@dataclass
class LossWeights:
    """Which components are on, and how strong. An ablation switches one off (`replace(w, spread=0)`)."""

    nce: float = 1.0
    hard_negative: bool = True   # the one mined hard negative in the denominator
    hardness_alpha: float = 5.0  # α of w_i = exp(α · stopgrad(s(q, p⁻))); 0: unweighted
    mask_false_negatives: bool = True
    spread: float = 1.0
    distill: float = 1.0
    mrl_dims: tuple[int, ...] = (768, 512, 256, 128)  # only the first: no MRL
    tau: float = 0.05


def embedding_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, doc_ids: torch.Tensor,
                   teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, w: LossWeights
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of a batch, summed over the MRL prefixes; returns (loss, {component: value}).

    q, p, n: (B, E) the student's unit embeddings; teacher: the teacher's (tq, tp, tn), each (B, E),
    or None. At each prefix d every embedding is cut to its first d numbers and renormalised
    (`encoder.truncate`), and the three losses are computed on those.
    """
    total = q.new_zeros(())
    parts = {"nce": 0.0, "spread": 0.0, "distill": 0.0}
    for d in w.mrl_dims:
        qd, pd, nd = (truncate(x, d) for x in (q, p, n))
        nce = nce_loss(qd, pd, nd if w.hard_negative else None, doc_ids if w.mask_false_negatives else None,
                       tau=w.tau, alpha=w.hardness_alpha)
        total = total + w.nce * nce
        parts["nce"] += nce.item()
        if w.spread:
            so = spread_out(qd) + spread_out(pd)
            total = total + w.spread * so
            parts["spread"] += so.item()
        if w.distill and teacher is not None:
            dl = sum(distill_loss(s, truncate(t, d)) for s, t in zip((qd, pd, nd), teacher)) / 3
            total = total + w.distill * dl
            parts["distill"] += dl.item()
    return total, parts


# --------------------------------------------------------------------------------------------
# Souping
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def soup(state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The weighted average of checkpoints of one architecture ("model soup"), parameter by parameter.

    weights default to uniform; they must be positive and are normalised to sum to 1.
    """
    if not state_dicts:
        raise ValueError("soup needs at least one checkpoint")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            raise ValueError(f"checkpoint {i} has different parameter names from checkpoint 0")
        for k in keys:
            if sd[k].shape != state_dicts[0][k].shape:
                raise ValueError(f"checkpoint {i}: {k} has shape {tuple(sd[k].shape)}, "
                                 f"checkpoint 0 {tuple(state_dicts[0][k].shape)}")
    w = torch.tensor([1.0] * len(state_dicts) if weights is None else list(weights), dtype=torch.float64)
    if len(w) != len(state_dicts) or bool((w <= 0).any()):
        raise ValueError("soup weights must be positive, one per checkpoint")
    w = w / w.sum()
    out = {}
    for k in keys:
        ref = state_dicts[0][k]
        if not ref.is_floating_point():  # integer buffers are not averaged
            out[k] = ref.clone()
            continue
        acc = sum(wi.item() * sd[k].double() for wi, sd in zip(w, state_dicts))
        out[k] = acc.to(ref.dtype)
    return out


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
@dataclass
class EmbedTrainConfig:
    steps: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)


def batch_rows(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """The rows of step `step`: a permutation of range(n) per epoch, fixed by (seed, epoch)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[k * batch:(k + 1) * batch]


def train_encoder(model: nn.Module, encode_rows: Callable[[str, torch.Tensor], torch.Tensor], n_pairs: int,
                  hard_negatives: torch.Tensor, doc_ids: torch.Tensor, cfg: EmbedTrainConfig,
                  teacher: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False) -> list[dict]:
    """Train `model` in place for cfg.steps AdamW steps; returns the history (one dict per step).

    encode_rows(kind, rows) -> (len(rows), E): the student's unit embeddings of the queries
    (kind "query") or documents ("document") with those indices, with gradients.
    hard_negatives (n_pairs,): the index of each query's mined hard-negative document.
    doc_ids (n_pairs,): an id per document (equal ids = the same text, a false negative).
    teacher: (tq, td), the teacher's embeddings of every query and document, or None.
    """
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    history = []
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="train", unit="step")
    model.train()
    for step in steps:
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0  # warmup 0: none
        lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = batch_rows(n_pairs, cfg.batch_size, cfg.seed, step)
        negs = hard_negatives[rows]
        q = encode_rows("query", rows)
        docs = encode_rows("document", torch.cat([rows, negs]))  # positives and hard negatives in one pass
        p, n = docs[:len(rows)], docs[len(rows):]
        t = None if teacher is None else (teacher[0][rows], teacher[1][rows], teacher[1][negs])
        loss, parts = embedding_loss(q, p, n, doc_ids[rows], t, cfg.weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        history.append({"step": step, "loss": loss.item(), "lr": lr, **parts})
    model.eval()
    if hasattr(model, "mrl_dims"):  # the widths it has now been trained to embed at
        model.mrl_dims = tuple(d for d in cfg.weights.mrl_dims if d <= model.dim)
    return history


def ablations(w: LossWeights) -> dict[str, LossWeights]:
    """The full recipe and each component removed in turn."""
    return {
        "full recipe": w,
        "- hard negative": replace(w, hard_negative=False),
        "- hardness weight (α=0)": replace(w, hardness_alpha=0.0),
        "- false-negative mask": replace(w, mask_false_negatives=False),
        "- spread-out": replace(w, spread=0.0),
        "- distillation": replace(w, distill=0.0),
        "- MRL (full width only)": replace(w, mrl_dims=w.mrl_dims[:1]),
    }


# --------------------------------------------------------------------------------------------
# The chapter's experiment: a tiny student, the teacher's vectors, one run per recipe
# --------------------------------------------------------------------------------------------
@dataclass
class Task:
    """Tokenised pairs ready to train on: queries[i] matches documents[i].

    hard_negatives (N,): each query's mined negative (an index into documents); doc_ids (N,): equal
    for equal documents; teacher: the teacher's (queries (N, E), documents (N, E)) or None.
    """

    queries: list[list[int]]
    documents: list[list[int]]
    hard_negatives: torch.Tensor
    doc_ids: torch.Tensor
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    @staticmethod
    def concat(tasks: Sequence["Task"]) -> "Task":
        """One task from several (a data mixture): indices shifted, documents of different tasks distinct."""
        qs, ds, hn, ids, tq, td, off = [], [], [], [], [], [], 0
        for t in tasks:
            qs += t.queries
            ds += t.documents
            hn.append(t.hard_negatives + off)
            ids.append(t.doc_ids + off)
            if t.teacher is not None:
                tq.append(t.teacher[0])
                td.append(t.teacher[1])
            off += len(t)
        teacher = (torch.cat(tq), torch.cat(td)) if len(tq) == len(tasks) else None
        return Task(qs, ds, torch.cat(hn), torch.cat(ids), teacher)


def tiny_encoder_config(vocab_size: int = 2048, layers: int = 2, hidden: int = 64, max_positions: int = 512):
    """The student's config: `train.RECIPES["tiny-gemma3"]`'s design (head_dim 32, 1 kv head, MLP 4x
    wide, window 64, QK-norm, RoPE 1M) at `hidden` width (hidden // 32 heads) and depth `layers`, with
    `bidirectional=True`: the one config value that makes the stack an encoder. The defaults are half
    of tiny-gemma3's width and a third of its depth, so a training step fits a 2-core CPU. Local and
    global layers alternate (1:1): a stack this shallow with Gemma 3's 5:1 would have no global layer."""
    from .gemma import GemmaConfig, layer_pattern
    from .train import RECIPES

    if hidden % 32:
        raise ValueError(f"hidden must be a multiple of the head_dim 32, got {hidden}")
    cfg = dict(RECIPES["tiny-gemma3"]["config"])
    cfg.update(vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden,
               num_attention_heads=hidden // 32, max_position_embeddings=max_positions, bidirectional=True,
               layer_types=layer_pattern(layers, 2))
    return GemmaConfig(**cfg)


def pretrain_decoder(stream: torch.Tensor, vocab_size: int, cfg, layers: int = 2, hidden: int = 64,
                     progress: bool = False) -> tuple[nn.Module, dict]:
    """The student's stack as a causal decoder (`Gemma`), trained on next-token prediction over
    `stream` (1-D token ids, documents separated by BOS) with chapter 08's loop (`train.train`, cfg a
    `train.TrainConfig`); returns (decoder, history).

    EmbeddingGemma starts from a trained Gemma 3 decoder, not from random weights: the stack has
    already learnt the language before contrastive training teaches it to pool meaning. This is that
    step at the student's scale. The same config with `bidirectional=False` is the decoder, so its
    weights load into `new_student(init=...)` name for name."""
    from .gemma import Gemma
    from .train import train

    torch.manual_seed(cfg.seed)
    decoder = Gemma(replace(tiny_encoder_config(vocab_size=vocab_size, layers=layers, hidden=hidden),
                            bidirectional=False))
    history = train(decoder, stream, None, cfg, progress=progress, desc="pre-train")
    return decoder, history


def new_student(vocab_size: int, layers: int = 2, hidden: int = 64, dim: int = 768, seed: int = 0,
                init: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A tiny EmbeddingGemma: `tiny_encoder_config`, dense C -> 4C -> dim (dim = the teacher's
    768, so embeddings can be matched at every MRL prefix). Randomly initialised from `seed`; with
    `init` (a `pretrain_decoder` state dict) the stack starts from the decoder's weights and only the
    dense layers stay random, as in EmbeddingGemma."""
    from .encoder import EmbeddingGemma

    torch.manual_seed(seed)
    cfg = tiny_encoder_config(vocab_size=vocab_size, layers=layers, hidden=hidden)
    model = EmbeddingGemma(cfg, dense_dims=(4 * hidden, dim))
    model.reset_parameters(torch.Generator().manual_seed(seed))
    if init is not None:
        # the decoder's head is tied to its embedding: an encoder has no head, the embedding comes along
        init = {k: v for k, v in init.items() if not k.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(init, strict=False)
        stack = [k for k in missing if not k.startswith("dense.")]
        if stack or unexpected:
            raise ValueError(f"init is not this student's decoder: missing {stack[:3]}, unexpected {unexpected[:3]}")
    return model


def rows_encoder(model: nn.Module, task: Task) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`train_encoder`'s encode_rows for a task: pad the rows, run the model (with gradients)."""

    def encode_rows(kind: str, rows: torch.Tensor) -> torch.Tensor:
        src = task.queries if kind == "query" else task.documents
        ids, mask = pad_right([src[i] for i in rows.tolist()])
        return model(ids, mask)

    return encode_rows


def train_tiny_encoder(task: Task, vocab_size: int, cfg: EmbedTrainConfig, progress: bool = False,
                       **student_kw) -> tuple[nn.Module, list[dict]]:
    """A fresh student (`new_student(vocab_size, seed=cfg.seed, **student_kw)`, so `init=` starts it
    from a pre-trained decoder) trained on `task` with `cfg`; returns (model, history)."""
    model = new_student(vocab_size, seed=cfg.seed, **student_kw)
    hist = train_encoder(model, rows_encoder(model, task), len(task), task.hard_negatives, task.doc_ids, cfg,
                         teacher=task.teacher, progress=progress)
    return model, hist
