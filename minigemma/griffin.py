"""Griffin / RecurrentGemma: linear recurrences mixed with local attention (chapter 07).

Griffin (De et al., 2024, arXiv:2402.19427) replaces most attention layers of a transformer with a
*recurrent block* built around the RG-LRU, a gated diagonal linear recurrence. RecurrentGemma
(arXiv:2404.07839) is Griffin at 2B and 9B: residual blocks cycle (recurrent, recurrent, attention),
and the attention blocks are multi-query attention over a local window of 2048 tokens.

Because every layer's memory is bounded (the conv's last 3 inputs, the RG-LRU state, a KV window),
decoding runs with a fixed-size state: the cost per token does not grow with the context.

Map of this file (shapes: B batch, T time, C width, R RG-LRU width (`lru_width`), P conv taps (4),
H heads, K kv heads, D head_dim, W attention window):

    GriffinConfig, PRESETS            recurrentgemma-2b, recurrentgemma-9b
    scan_sequential, scan_associative h_t = a_t ⊙ h_{t-1} + b_t, two ways; associative_combine
    causal_conv1d, Conv1D             depthwise causal conv of 4 taps, never across a document start
    RGLRU                             r, i gates; a = sigmoid(Λ)^(c·r), c = 8; sqrt(1 - a²) input norm
    RecurrentBlock                    linear_out( gelu(linear_y x) ⊙ RG-LRU(Conv1D(linear_x x)) )
    local_attention                   the course's one attention layer (attention.GroupedQueryAttention)
                                      as MQA with RoPE on half of head_dim and a window of W + 1 keys
    ResidualBlock, Griffin            the model (its MLP is layers.GeGLU with biases); logits
                                      soft-capped at 30; tied embeddings
    RecurrentState, state_bytes       the fixed-size decoding state and its size
    hf_name_table, hf_transforms      HF `recurrent_gemma` checkpoints: the explicit name table (the
                                      loader is minigemma.pretrained.griffin_from_hf_dir)

Every temporal block has one call, recurrentgemma's: `block(x, pos, cache) -> (B, T, C)`, where
`pos` (attention.Positions) says where the tokens sit and `cache` is the block's own state
(a RecurrentState or a RingKVCache). Calling the model is the same as calling minigemma's Gemma, so
`generate` drives both:

    cache = model.new_cache(batch=B)                         # fixed size
    logits = model(prompt_ids, cache=cache, last_only=True)  # (B, 1, V); fills the cache in place
    logits = model(next_ids, cache=cache, last_only=True)    # (B, 1, V); one step, cache updated

Documents packed in one row are marked, as in the official code (its `segment_pos`), by
`positions`: each token's position inside its own document, 0 at a document start. At a 0 the
RG-LRU state resets, the conv does not look back across the boundary, and attention stays inside
the document. Without positions, they continue from the cache (0, 1, 2, ... for a fresh one). A
left-padded batch passes `attention_mask` (B, S) instead, True for real tokens: real tokens count
from 0 at the first one, and every pad becomes a one-token document that no real token ever sees.

Two references disagree on the attention window's left edge (see `GriffinConfig.window_edge`):
the official recurrentgemma code lets query q see keys q - W ... q (W + 1 keys), HF transformers
q - W + 1 ... q (W keys). The default follows the official code, which trained the checkpoints.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import GroupedQueryAttention, Positions
from .layers import GeGLU, RMSNorm, gelu_tanh
from .trunk import CausalLM

RECURRENT, ATTENTION = "recurrent", "attention"


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """(recurrent, recurrent, attention, recurrent, ...): two recurrent blocks per attention block."""
    return tuple(itertools.islice(itertools.cycle((RECURRENT, RECURRENT, ATTENTION)), num_layers))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass
class GriffinConfig:
    """Everything that decides Griffin's shapes and behaviour.

    width:               model width C (HF hidden_size).
    lru_width:           width D of the recurrent branch (None = width).
    mlp_expanded_width:  width of *each* of the two MLP branches (HF stores twice this as intermediate_size).
    num_heads:           attention heads, and the number of blocks of the RG-LRU's block-diagonal gates.
    num_kv_heads:        1 in RecurrentGemma (multi-query attention).
    block_types:         one of "recurrent" / "attention" per residual block.
    attention_window_size: W, the local attention window.
    window_edge:         "inclusive": query q sees keys q - W <= k <= q, W + 1 keys (official
                         recurrentgemma, JAX and torch); "exclusive": q - W < k <= q, W keys (HF).
    rnn_c:               the constant c in a = sigmoid(Λ)^(c·r); 8 in the paper.
    partial_rotary_factor: RoPE rotates this fraction of head_dim (the first half).
    scan:                "sequential" (a loop over time) or "associative" (log-depth parallel scan).
    """

    vocab_size: int = 256_000
    width: int = 2560
    num_layers: int = 26
    num_heads: int = 10
    num_kv_heads: int = 1
    lru_width: int | None = None
    mlp_expanded_width: int = 3 * 2560
    conv1d_width: int = 4
    attention_window_size: int = 2048
    window_edge: str = "inclusive"
    block_types: tuple[str, ...] | None = None
    rnn_c: float = 8.0
    rope_base: float = 10_000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    logits_soft_cap: float | None = 30.0
    embeddings_scale_by_sqrt_dim: bool = True
    scan: str = "sequential"

    def __post_init__(self):
        if self.lru_width is None:
            self.lru_width = self.width
        if self.block_types is None:
            self.block_types = griffin_pattern(self.num_layers)
        self.block_types = tuple(self.block_types)
        problems = []
        if len(self.block_types) != self.num_layers:
            problems.append(f"{len(self.block_types)} block_types for num_layers={self.num_layers}")
        bad = sorted(set(self.block_types) - {RECURRENT, ATTENTION})
        if bad:
            problems.append(f"unknown block types {bad}; use {RECURRENT!r} or {ATTENTION!r}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.lru_width % self.num_heads:
            problems.append(f"lru_width {self.lru_width} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.window_edge not in ("inclusive", "exclusive"):
            problems.append(f"window_edge must be 'inclusive' or 'exclusive', got {self.window_edge!r}")
        if self.scan not in ("sequential", "associative"):
            problems.append(f"scan must be 'sequential' or 'associative', got {self.scan!r}")
        if (self.width // self.num_heads * self.partial_rotary_factor) % 2:
            problems.append(f"RoPE needs an even number of rotated dims, got head_dim "
                            f"{self.width // self.num_heads} x {self.partial_rotary_factor}")
        if self.attention_window_size < 1 or self.conv1d_width < 1:
            problems.append("attention_window_size and conv1d_width must be >= 1")
        if problems:
            raise ValueError("GriffinConfig: " + "; ".join(problems))

    # The protocol every model config speaks (see trunk.py): the same question, one name.
    @property
    def family(self) -> str:
        return "griffin"

    @property
    def logit_cap(self) -> float | None:
        return self.logits_soft_cap

    @property
    def scales_embeddings(self) -> bool:
        return self.embeddings_scale_by_sqrt_dim

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GriffinConfig":
        """Read an HF `recurrent_gemma` config.json dict. `overrides` set fields HF does not store
        (e.g. window_edge="exclusive" to match HF's own forward, or scan="associative")."""
        if hf.get("model_type", "recurrent_gemma") != "recurrent_gemma":
            raise ValueError(f"not a recurrent_gemma config: model_type={hf.get('model_type')!r}")
        if hf.get("attention_bias"):
            raise ValueError("attention_bias=True is not part of RecurrentGemma; minigemma does not support it")
        if hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation {hf['hidden_activation']!r}: RecurrentGemma uses gelu_pytorch_tanh")
        if not hf.get("tie_word_embeddings", True):
            raise ValueError("tie_word_embeddings=False: RecurrentGemma ties the LM head to the embedding")
        if hf.get("intermediate_size", 2) % 2:
            raise ValueError(f"intermediate_size {hf['intermediate_size']} must be even (two MLP branches)")
        n = hf.get("num_hidden_layers", 26)
        pattern = list(hf.get("block_types", [RECURRENT, RECURRENT, ATTENTION]))
        rope = hf.get("rope_parameters") or {}
        width = hf.get("hidden_size", 2560)
        heads = hf.get("num_attention_heads", 10)
        if hf.get("head_dim") not in (None, width // heads):
            raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {width // heads}")
        kw = dict(
            vocab_size=hf.get("vocab_size", 256_000),
            width=width,
            num_layers=n,
            num_heads=heads,
            # HF defaults a missing value to num_attention_heads; the real configs say 1.
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            lru_width=hf.get("lru_width") or width,
            mlp_expanded_width=hf.get("intermediate_size", 2 * 3 * 2560) // 2,
            conv1d_width=hf.get("conv1d_width", 4),
            attention_window_size=hf.get("attention_window_size", 2048),
            block_types=tuple((pattern * n)[:n]),
            rope_base=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)),
            partial_rotary_factor=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            logits_soft_cap=hf.get("logits_soft_cap", 30.0),
            embeddings_scale_by_sqrt_dim=hf.get("embeddings_scale_by_sqrt_dim", True),
        )
        kw.update(overrides)
        return cls(**kw)


# The published models (the official `Preset`s, and HF's converted configs).
PRESETS: dict[str, GriffinConfig] = {
    "recurrentgemma-2b": GriffinConfig(width=2560, num_layers=26, num_heads=10, lru_width=2560,
                                       mlp_expanded_width=3 * 2560),
    "recurrentgemma-9b": GriffinConfig(width=4096, num_layers=38, num_heads=16, lru_width=4096,
                                       mlp_expanded_width=3 * 4096),
}


# --------------------------------------------------------------------------------------------
# Linear recurrence: h_t = a_t ⊙ h_{t-1} + b_t, two ways
# --------------------------------------------------------------------------------------------
def scan_sequential(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """The recurrence as a loop over time, accumulated in float32.

    a, b (B, T, D); h0 (B, D) or None (zeros). Returns (h (B, T, D), h_T (B, D)), both float32.
    T small matrix-free steps: cheap per step, but T Python iterations one after the other.
    """
    a, b = a.float(), b.float()
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.float()
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1), h


def associative_combine(first, second):
    """Compose two steps of h -> a·h + b: apply `first` = (a1, b1), then `second` = (a2, b2).

    a2·(a1·h + b1) + b2 = (a2·a1)·h + (a2·b1 + b2), so (a1, b1) ∘ (a2, b2) = (a2·a1, a2·b1 + b2).
    The operator is associative (not commutative), which is all a parallel scan needs.
    """
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2


def scan_associative(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """The same recurrence as a parallel prefix scan (Hillis–Steele), in float32.

    After the round with offset d, element t holds the composition of steps t-2d+1 .. t; after
    ceil(log2 T) rounds it holds steps 0 .. t, whose b part is h_t (h0 is folded into step 0).
    O(T log T) work, but only log T vectorised rounds instead of T sequential steps.
    a, b (B, T, D); h0 (B, D) or None. Returns (h (B, T, D), h_T (B, D)).
    """
    a, b = a.float(), b.float()
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0.float()[:, None], b[:, 1:]], dim=1)
    T, d = a.shape[1], 1
    while d < T:
        a_new, b_new = associative_combine((a[:, :-d], b[:, :-d]), (a[:, d:], b[:, d:]))
        a = torch.cat([a[:, :d], a_new], dim=1)
        b = torch.cat([b[:, :d], b_new], dim=1)
        d *= 2
    return b, b[:, -1]


SCANS = {"sequential": scan_sequential, "associative": scan_associative}


# --------------------------------------------------------------------------------------------
# Conv1D
# --------------------------------------------------------------------------------------------
def causal_conv1d(x, w, bias, x_prev=None, positions=None):
    """Depthwise causal convolution, with a decode cache, that never mixes two documents.

    y_t = bias + Σ_{s=0}^{P-1} w[P-1-s] ⊙ x_{t-s}: w (P, R) is time-major (P = conv1d_width taps)
    and w[P-1] multiplies the current token. x (B, T, R); bias (R,). x_prev (B, P-1, R): the P-1
    inputs before x (the decode cache; None = zeros, as at the start of a sequence). With
    positions (B, T) (each token's position inside its document), the term x_{t-s} is kept only if
    token t-s is in token t's document, i.e. if positions_t >= s (documents are contiguous).
    Returns y (B, T, R) and the new cache x_tail (B, P-1, R) = the last P-1 inputs.
    """
    B, T, R = x.shape
    P = w.shape[0]
    if x_prev is None:
        x_prev = x.new_zeros(B, P - 1, R)
    xs = torch.cat([x_prev.to(x.dtype), x], dim=1)  # (B, P-1+T, R): x_{t-s} is xs[:, P-1+t-s]
    y = bias.to(x.dtype).expand(B, T, R)
    for s in range(P):  # shift back by s
        x_s = xs[:, P - 1 - s: P - 1 - s + T]  # x_{t-s} for every t
        if positions is not None and s > 0:
            x_s = x_s * (positions >= s)[..., None]  # same document only
        y = y + w[P - 1 - s].to(x.dtype) * x_s
    return y, xs[:, T:]


class Conv1D(nn.Module):
    """Depthwise temporal convolution of `taps` (4) steps with a bias.  (B, T, R) -> (B, T, R)."""

    def __init__(self, width: int, taps: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(taps, width))  # (P, R), time-major
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x, positions, state=None):
        """positions (B, T) or None (one document); state: a RecurrentState, its conv tail updated."""
        y, x_tail = causal_conv1d(x, self.weight, self.bias, None if state is None else state.conv_x, positions)
        if state is not None:
            state.conv_x = x_tail.to(state.conv_x.dtype)
        return y


# --------------------------------------------------------------------------------------------
# RG-LRU
# --------------------------------------------------------------------------------------------
class BlockDiagonalLinear(nn.Module):
    """H independent (D/H × D/H) linear maps with biases, one per block of features.  (..., D) -> (..., D)."""

    def __init__(self, width: int, num_blocks: int):
        super().__init__()
        self.num_blocks = num_blocks
        bw = width // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, bw, bw))  # (H, in, out)
        self.bias = nn.Parameter(torch.zeros(num_blocks, bw))

    def forward(self, x):
        xh = x.unflatten(-1, (self.num_blocks, -1))  # (..., H, D/H)
        y = torch.einsum("...hi,hij->...hj", xh, self.weight) + self.bias
        return y.flatten(-2)


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose gradient 1/(2 sqrt x) is capped at 1000: sqrt(1 - a²) has an infinite slope at
    a = 1, which turned into NaNs in bfloat16 training (both references do this)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1e-6))


def rglru_a_and_multiplier(log_sigmoid_lambda: torch.Tensor, r: torch.Tensor, c: float = 8.0):
    """a_t = sigmoid(Λ)^(c·r_t) and the input normaliser sqrt(1 - a_t²).

    log_sigmoid_lambda (D,) = log sigmoid(Λ) <= 0; r (B, T, D) the recurrence gate in (0, 1).
    Computed in log space: log a = c·r·log sigmoid(Λ), a² = exp(2 log a).
    """
    log_a = c * r * log_sigmoid_lambda
    a = torch.exp(log_a)
    multiplier = _SqrtBoundedGrad.apply(1 - torch.exp(2 * log_a))
    return a, multiplier


def rglru_step(x, r, i, lam, h_prev, reset=None, c: float = 8.0):
    """One step of the RG-LRU for every sequence of a batch.

    x, r, i (B, D): input, recurrence gate, input gate (both in (0, 1)); lam (D,) is Λ;
    h_prev (B, D); reset (B,) bool or None.
    h = a ⊙ h_prev + sqrt(1 - a²) ⊙ (i ⊙ x), with a = sigmoid(Λ)^(c·r); at a reset a = 0 and the
    multiplier is 1, so h = i ⊙ x. Returns h (B, D) in float32.
    """
    a, mult = rglru_a_and_multiplier(F.logsigmoid(lam), r, c)
    if reset is not None:
        a = torch.where(reset[:, None], torch.zeros_like(a), a)
        mult = torch.where(reset[:, None], torch.ones_like(mult), mult)
    return a.float() * h_prev.float() + (mult * i * x).float()


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit.  x (B, T, R) -> (B, T, R).

    r_t = σ(W_a x_t + b_a)                 recurrence gate (block-diagonal linear, H blocks)
    i_t = σ(W_x x_t + b_x)                 input gate
    a_t = σ(Λ)^(c·r_t),  c = 8             per-channel decay in (0, 1), set by Λ and modulated by r
    h_t = a_t ⊙ h_{t-1} + sqrt(1 - a_t²) ⊙ (i_t ⊙ x_t)

    Both references store `a_param` = -Λ, so σ(Λ) = exp(-softplus(a_param)). The state h is
    accumulated in float32. At a document start (position 0) a_t = 0 and the multiplier is 1.
    """

    def __init__(self, width: int, num_heads: int, c: float = 8.0, scan: str = "sequential"):
        super().__init__()
        self.c, self.scan = c, scan
        self.a_param = nn.Parameter(torch.empty(width))  # -Λ
        self.input_gate = BlockDiagonalLinear(width, num_heads)
        self.a_gate = BlockDiagonalLinear(width, num_heads)

    def forward(self, x, positions, state=None):
        reset = (positions == 0)[..., None]  # (B, T, 1)
        r = torch.sigmoid(self.a_gate(x))
        i = torch.sigmoid(self.input_gate(x))
        a, mult = rglru_a_and_multiplier(-F.softplus(self.a_param), r, self.c)
        a = a * ~reset  # forget everything at a document start...
        mult = torch.where(reset, torch.ones_like(mult), mult)  # ...and take the input unscaled
        b = x * i * mult
        h, h_last = self.recurrence(a, b, None if state is None else state.h)
        if state is not None:
            state.h = h_last
        return h.to(x.dtype)

    def recurrence(self, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
        """h_t = a_t ⊙ h_{t-1} + b_t over (B, T, R), from h0 (B, R) or zeros -> (h (B, T, R) float32,
        h_T (B, R)), by the config's scan (`SCANS`). A kernel overrides this method, nothing else."""
        return SCANS[self.scan](a, b, h0)


# --------------------------------------------------------------------------------------------
# Blocks: every temporal block has the same call, block(x, pos, cache) -> (B, T, C)
# --------------------------------------------------------------------------------------------
class RecurrentBlock(nn.Module):
    """linear_out( gelu(linear_y x) ⊙ RG-LRU(Conv1D(linear_x x)) ).  (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: GriffinConfig):
        super().__init__()
        self.linear_y = nn.Linear(cfg.width, cfg.lru_width)
        self.linear_x = nn.Linear(cfg.width, cfg.lru_width)
        self.linear_out = nn.Linear(cfg.lru_width, cfg.width)
        self.conv_1d = Conv1D(cfg.lru_width, cfg.conv1d_width)
        self.rg_lru = RGLRU(cfg.lru_width, cfg.num_heads, cfg.rnn_c, cfg.scan)
        self.lru_width, self.taps = cfg.lru_width, cfg.conv1d_width

    def new_cache(self, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        """A fixed-size state whatever the length: the conv's last P-1 inputs and h (float32)."""
        return RecurrentState(conv_x=torch.zeros(batch, self.taps - 1, self.lru_width, dtype=dtype, device=device),
                              h=torch.zeros(batch, self.lru_width, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor, pos: Positions, cache: "RecurrentState | None" = None) -> torch.Tensor:
        y = gelu_tanh(self.linear_y(x))  # the gate branch
        doc_positions = pos.positions if pos.packed else None  # None: one document, nothing to mask
        u = self.conv_1d(self.linear_x(x), doc_positions, cache)  # (B, T, R)
        u = self.rg_lru(u, pos.positions, cache)
        return self.linear_out(u * y)


def local_attention(cfg: GriffinConfig) -> GroupedQueryAttention:
    """Griffin's local attention: multi-query, RoPE on the first half of head_dim (base 10k), scale
    head_dim^-0.5, no soft-cap, a bias on the output projection only. The official window of W
    lets query q see keys q - W .. q, W + 1 keys (`window_edge`="inclusive"); HF's sees W."""
    keys = cfg.attention_window_size + (1 if cfg.window_edge == "inclusive" else 0)
    return GroupedQueryAttention(cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                 window=keys, rope_base=cfg.rope_base, rotary_dim=cfg.rotary_dim,
                                 eps=cfg.rms_norm_eps, o_bias=True)


class ResidualBlock(nn.Module):
    """r = x + temporal(norm(x)); out = r + mlp(norm(r)). Pre-norms only, RMSNorm with (1 + w).
    The MLP is a GeGLU with biases."""

    def __init__(self, cfg: GriffinConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.temporal_pre_norm = RMSNorm(cfg.width, cfg.rms_norm_eps)
        self.temporal_block = RecurrentBlock(cfg) if kind == RECURRENT else local_attention(cfg)
        self.channel_pre_norm = RMSNorm(cfg.width, cfg.rms_norm_eps)
        self.mlp_block = GeGLU(cfg.width, cfg.mlp_expanded_width, bias=True)

    def new_cache(self, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        """The temporal block's state: a RecurrentState, or a RingKVCache of the window."""
        return self.temporal_block.new_cache(batch, max_len, dtype, device)

    def forward(self, x: torch.Tensor, pos: Positions, cache=None) -> torch.Tensor:
        r = x + self.temporal_block(self.temporal_pre_norm(x), pos, cache)
        return r + self.mlp_block(self.channel_pre_norm(r))


# --------------------------------------------------------------------------------------------
# The decoding state
# --------------------------------------------------------------------------------------------
@dataclass
class RecurrentState:
    """A recurrent block's state: the conv's last P-1 inputs and the RG-LRU's h (float32).
    (An attention block's state is a RingKVCache of its window.)"""

    conv_x: torch.Tensor  # (B, P - 1, R)
    h: torch.Tensor  # (B, R) float32


def state_bytes(cfg: GriffinConfig, T: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of decoding state after T tokens: conv tails and KV in `dtype`, the RG-LRU h in float32.

    Recurrent block: (P - 1)·R activations + R float32. Attention block: keys and values of the
    min(T, window) tokens it can still see (window = W + 1 with the official inclusive edge). This
    stops growing once T reaches the window; a transformer's KV cache does not. (`new_cache`
    allocates the full window up front, which is this at T >= window.)
    """
    size = torch.tensor([], dtype=dtype).element_size()
    n_rec = sum(k == RECURRENT for k in cfg.block_types)
    n_att = cfg.num_layers - n_rec
    window = cfg.attention_window_size + (1 if cfg.window_edge == "inclusive" else 0)
    rec = (cfg.conv1d_width - 1) * cfg.lru_width * size + cfg.lru_width * 4
    att = 2 * cfg.num_kv_heads * cfg.head_dim * min(T, window) * size
    return batch * (n_rec * rec + n_att * att)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class Griffin(CausalLM):
    """The RecurrentGemma language model.  input_ids (B, T) -> logits (B, T, V).

    The shared trunk (`trunk.CausalLM`): embed · sqrt(C) (rounded in bf16) -> residual blocks ->
    final RMSNorm -> tied LM head -> soft-cap 30. Its call is Gemma's, so one decode loop drives both:

        positions (B, T) or (T,): each token's position inside its document, 0 at a document start
                        (the official code's `segment_pos`): at a 0 the RG-LRU state resets, the
                        conv does not look back across the boundary, and attention stays inside
                        the document. Default: continue from the cache (0, 1, 2, ... without one).
        attention_mask: (B, S) with S = tokens already in the cache + T, True for real tokens, for
                        left-padded batches; each pad becomes a one-token document.
        cache:          from `new_cache` (fixed size); continued from and updated in place.
    """

    scale_rounded_in = torch.bfloat16  # both references round sqrt(width) in bfloat16, whatever the dtype

    def __init__(self, cfg: GriffinConfig):
        super().__init__(cfg, (ResidualBlock(cfg, kind) for kind in cfg.block_types))
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> "Griffin":
        """The reference initialisation (recurrentgemma torch). Biases and norm weights start at 0.

        Input-side linears N(0, 1/C); output linears N(0, s/fan_in) with s = 2 / num_layers (the
        variance is scaled, as the reference's final_w_init_variance_scale), so the residual stream
        grows less with depth; conv N(0, 0.01/P); gates N(0, 1/block_width);
        and Λ such that a = sigmoid(Λ) has a² ~ U(0.9², 0.999²), i.e. memories of ~10 to ~1000 steps.
        """
        cfg = self.config
        s = 2.0 / cfg.num_layers

        def normal(t, var):
            t.normal_(0.0, math.sqrt(var), generator=generator)

        normal(self.embed_tokens.weight, 1.0 / cfg.width)
        for block in self.layers:
            block.temporal_pre_norm.weight.zero_()
            block.channel_pre_norm.weight.zero_()
            tb = block.temporal_block
            if block.kind == RECURRENT:
                for lin in (tb.linear_x, tb.linear_y):
                    normal(lin.weight, 1.0 / cfg.width)
                    lin.bias.zero_()
                normal(tb.linear_out.weight, s / cfg.lru_width)
                tb.linear_out.bias.zero_()
                normal(tb.conv_1d.weight, 0.01 / cfg.conv1d_width)
                tb.conv_1d.bias.zero_()
                for gate in (tb.rg_lru.input_gate, tb.rg_lru.a_gate):
                    normal(gate.weight, 1.0 / gate.weight.shape[-1])
                    gate.bias.zero_()
                a2 = torch.empty_like(tb.rg_lru.a_param).uniform_(0.9 ** 2, 0.999 ** 2, generator=generator)
                a = a2.sqrt()  # a = sigmoid(Λ) = exp(-softplus(a_param))  =>  a_param = log(1/a - 1)
                tb.rg_lru.a_param.copy_(torch.log(1.0 / a - 1.0))
            else:
                normal(tb.qkv_proj.weight, 1.0 / cfg.width)  # q, k and v alike
                normal(tb.o_proj.weight, s / cfg.width)
                tb.o_proj.bias.zero_()
            mlp = block.mlp_block
            normal(mlp.gate_up_proj.weight, 1.0 / cfg.width)  # gate and up alike
            mlp.gate_up_proj.bias.zero_()
            normal(mlp.down_proj.weight, s / cfg.mlp_expanded_width)
            mlp.down_proj.bias.zero_()
        self.norm.weight.zero_()
        return self


# --------------------------------------------------------------------------------------------
# HF `recurrent_gemma` checkpoints: the name table
# --------------------------------------------------------------------------------------------
def hf_name_table(cfg: GriffinConfig) -> dict[str, str | None]:
    """Every tensor name of an HF RecurrentGemma checkpoint -> our parameter name (None: skipped on
    purpose). The layout depends on each block's type, so the table is built from the config."""
    table: dict[str, str | None] = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.final_norm.weight": "norm.weight",  # the trunk's final norm
        "lm_head.weight": None,  # tied to the embedding; some exports store it twice
    }
    for i, kind in enumerate(cfg.block_types):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names = ["temporal_pre_norm.weight", "channel_pre_norm.weight"]
        names += [f"mlp_block.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")]
        if kind == RECURRENT:
            names += [f"temporal_block.{p}.{t}" for p in ("linear_x", "linear_y", "linear_out")
                      for t in ("weight", "bias")]
            names += ["temporal_block.conv_1d.weight", "temporal_block.conv_1d.bias"]
            table[hf + "temporal_block.rg_lru.recurrent_param"] = ours + "temporal_block.rg_lru.a_param"
            for hf_gate, our_gate in (("input_gate", "input_gate"), ("recurrent_gate", "a_gate")):
                for t in ("weight", "bias"):
                    table[f"{hf}temporal_block.rg_lru.{hf_gate}_{t}"] = f"{ours}temporal_block.rg_lru.{our_gate}.{t}"
        else:  # q, k and v fill the fused qkv_proj (see pretrained.fused_parts)
            names += [f"temporal_block.{p}_proj.weight" for p in "qkvo"] + ["temporal_block.o_proj.bias"]
        for n in names:
            table[hf + n] = ours + n
    return table


def conv_from_hf(w: torch.Tensor) -> torch.Tensor:
    """HF stores the depthwise conv as nn.Conv1d weights (D, 1, W); ours is time-major (W, D)."""
    return w[:, 0, :].T.contiguous() if w.dim() == 3 else w


def hf_transforms(cfg: GriffinConfig) -> dict:
    """Our tensor name -> how to turn HF's tensor into ours, where the layouts differ (the convs)."""
    return {f"layers.{i}.temporal_block.conv_1d.weight": conv_from_hf
            for i, kind in enumerate(cfg.block_types) if kind == RECURRENT}


def param_count(cfg: GriffinConfig) -> int:
    """Number of parameters, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Griffin(cfg).parameters())


def small_config(**overrides) -> GriffinConfig:
    """A tiny Griffin for CPU experiments (and the chapter): 2 recurrent + 1 attention block."""
    base = dict(vocab_size=256, width=64, num_layers=3, num_heads=4, mlp_expanded_width=128,
                attention_window_size=16)
    base.update(overrides)
    return GriffinConfig(**base)


__all__ = [
    "GriffinConfig", "PRESETS", "Griffin", "RecurrentState", "hf_name_table", "hf_transforms", "state_bytes",
    "scan_sequential", "scan_associative", "associative_combine", "causal_conv1d", "rglru_step",
    "param_count", "small_config", "griffin_pattern",
]
