"""A cost model of a Gemma running on the Triton kernels: a PREDICTION, never a measurement.

For one decode step (one new token per row after `context` cached tokens) or one prefill of T tokens
(an empty cache, `last_only=True`, as `generate` calls it), it lists every kernel launch the model makes
under `kernels.swap.use_triton` (with `kernels.gemv.use_gemv` on top for the int8 level), and for each:

    bytes    HBM traffic of one launch: every input read once and every output written once
    FLOPs    its arithmetic (a multiply-add is 2)
    count    how many times a step launches it

and predicts its time on a GPU from the datasheet's two ceilings and a fixed cost per launch:

    time of a launch = max(bytes / bandwidth, FLOPs / peak) + launch cost    (default 4 µs)

summed over the launches, one after another. Beside it, the bandwidth bound of decoding: the bytes a
token must read (every weight once, the embedding row, the KV cache) over the bandwidth. The gap between
the two is what launches and small kernels cost; nothing here has run on a GPU.

Where the launches come from (read from the code; tests/test_kernels_cost.py counts them for real, in
Triton's interpreter, on a small model's decode step and prefill and on the 270M's 18 real layers):

    Triton (use_triton)   a bf16 decode step: each layer's fused step (`kernels.decode_layer`: QKV with its
                          norms, QK-norm, RoPE and KV write; decode attention; o_proj with the combine;
                          gate_up with its norms and GeGLU; down), then the final residual add and norm.
                          A prefill, and the int8 level's decode (its projections are quantised): RMSNorm
                          (each norm, and the QK-norm of q and of k), RoPE (q, k), decode attention and its
                          combine (a decode step) or flash attention (a prefill), GeGLU's activation; int8
                          level: every Int8Linear and the head's Int4Linear on the GEMV kernels
    cuBLAS                every nn.Linear outside the fused step (qkv, o, gate_up, down of a prefill; the
                          head): counted as one launch each (cuBLAS may add a split-K reduction: not counted)
    other torch launches  the embedding and its · √C, the positions (`make_positions`), a ring's slot
                          indices (`RingKVCache.slot_index`, once per step for all local layers); outside the
                          fused step the KV-cache writes, a ring's chunk update in a prefill, the residual
                          adds, the GEMV's split-K sum and cast, the quantised embedding and the rescored
                          head's torch ops
    host -> device copy   none: the RoPE frequencies are built on the device once (`RotaryEmbedding.
                          frequencies`), and so is the placeholder for an absent mask tensor; the column
                          stays in the report to show it (tests/test_kernels_decode_step.py checks a step)
    not launches          views, torch.empty, the host-side checks and scalars (`check_token_ids` runs on
                          CPU tensors only; `embedding_scale` is a host scalar)

    from minigemma.kernels import cost
    plan = cost.decode(PRESETS["gemma3-270m"], context=512, gpu=cost.H100)
    print(cost.report([plan]))        # python -m minigemma.kernels.bench --plan
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import triton

from minigemma import quant
from minigemma.gemma import SLIDING, Gemma, GemmaConfig

from . import attention as attention_kernels
from . import gemv as gemv_kernels
from .utils import A100 as A100_PROPS
from .utils import H100 as H100_PROPS
from .utils import DeviceProps

LAUNCH_US = 4.0  # µs per launch from eager PyTorch ("a few µs each"): an assumption, a parameter everywhere
ACT = 2  # bytes of an activation and of a KV-cache entry: bf16
LEVELS = ("bf16", "int8")  # weights: bf16, or the int8 level (quant.quantize) on the GEMV kernels


@dataclass(frozen=True)
class GPU:
    """A GPU's two ceilings (datasheet figures, not measured here) and the props its launch choices follow."""

    name: str
    bandwidth: float  # bytes/s of HBM
    peak: float  # FLOP/s, dense bf16 on the tensor cores
    props: DeviceProps  # SM count etc.: the kernels' split and tile choices for this GPU
    source: str


H100 = GPU("H100 SXM", 3.35e12, 989e12, H100_PROPS,
           "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16")
A100 = GPU("A100 SXM 80GB", 2.039e12, 312e12, A100_PROPS,
           "NVIDIA A100 SXM4 80GB datasheet: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16")
GPUS = {"h100": H100, "a100": A100}


@dataclass(frozen=True)
class Op:
    """Launches of one kernel at one shape: `count` of them per step, each moving `nbytes` and doing `flops`."""

    name: str  # what runs, e.g. "rms_norm (hidden)", "cuBLAS mm qkv_proj"
    kind: str  # "triton", "cublas", "torch" or "h2d" (a host -> device copy)
    group: str  # its class in the plot: matmul, attention, norm, rope, geglu, kv cache, glue
    count: int
    nbytes: float  # per launch
    flops: float = 0.0  # per launch
    kernel: str = ""  # the @triton.jit function it launches (kind "triton")

    def kernel_s(self, gpu: GPU) -> float:
        """Seconds of GPU work of all `count` launches: each at the slower of its two ceilings."""
        return self.count * max(self.nbytes / gpu.bandwidth, self.flops / gpu.peak)

    def launch_s(self, launch_us: float) -> float:
        return self.count * launch_us * 1e-6


@dataclass
class Plan:
    """One step's launches on one GPU, and what they predict. Every time here is a prediction."""

    phase: str  # "decode" or "prefill"
    config: GemmaConfig
    weights: str  # "bf16" or "int8"
    tokens: int  # decode: tokens in the cache before the step; prefill: T
    gpu: GPU
    ops: list[Op]
    bound_bytes: float  # decode: weights + KV cache read per token (the bandwidth bound's bytes)
    launch_us: float = LAUNCH_US
    batch: int = 1

    @property
    def launches(self) -> int:
        return sum(op.count for op in self.ops)

    def launches_by_kind(self) -> Counter:
        c = Counter()
        for op in self.ops:
            c[op.kind] += op.count
        return c

    def triton_launches(self) -> Counter:
        """@triton.jit function name -> launches per step."""
        c = Counter()
        for op in self.ops:
            if op.kind == "triton":
                c[op.kernel] += op.count
        return c

    @property
    def nbytes(self) -> float:
        return sum(op.count * op.nbytes for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.count * op.flops for op in self.ops)

    @property
    def kernel_s(self) -> float:
        return sum(op.kernel_s(self.gpu) for op in self.ops)

    @property
    def launch_s(self) -> float:
        return sum(op.launch_s(self.launch_us) for op in self.ops)

    @property
    def time_s(self) -> float:
        """Predicted seconds of the step: kernels and launches, one after another (no overlap, no CUDA graph)."""
        return self.kernel_s + self.launch_s

    @property
    def new_tokens(self) -> int:
        return self.batch * (1 if self.phase == "decode" else self.tokens)

    @property
    def tok_s(self) -> float:
        """Predicted tokens per second."""
        return self.new_tokens / self.time_s

    @property
    def bound_tok_s(self) -> float:
        """Decode: the bandwidth bound (weights + KV bytes per step over the bandwidth). Prefill: the
        roofline of the same ops with no launch cost."""
        if self.phase == "decode":
            return self.new_tokens / (self.bound_bytes / self.gpu.bandwidth)
        return self.new_tokens / self.kernel_s

    def by_group(self) -> dict[str, float]:
        """Predicted seconds per kernel class (kernel and launch time together), for the plot."""
        out: dict[str, float] = {}
        for op in self.ops:
            out[op.group] = out.get(op.group, 0.0) + op.kernel_s(self.gpu) + op.launch_s(self.launch_us)
        return out

    def summary(self) -> dict:
        return {"phase": self.phase, "weights": self.weights, "tokens": self.tokens, "batch": self.batch,
                "gpu": self.gpu.name, "launches": self.launches, "launches_by_kind": dict(self.launches_by_kind()),
                "bytes": self.nbytes, "flops": self.flops, "kernel_us": self.kernel_s * 1e6,
                "launch_us": self.launch_s * 1e6, "predicted_us": self.time_s * 1e6,
                "predicted_tok_s": self.tok_s, "bound_tok_s": self.bound_tok_s, "launch_cost_us": self.launch_us,
                "prediction": True}


# --------------------------------------------------------------------------------------------
# The quantised modules' bytes, from the modules `quant.quantize` builds (on the meta device: no memory)
# --------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def skeleton(config: GemmaConfig, weights: str = "bf16") -> Gemma:
    """The model at this level on the meta device: its modules' shapes and dtypes, no weights."""
    if weights not in LEVELS:
        raise ValueError(f"weights {weights!r}: choose from {LEVELS}")
    with torch.device("meta"):
        model = Gemma(config)
    return quant.quantize(model, weights)


def weight_bytes_per_token(config: GemmaConfig, weights: str = "bf16") -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (a tensor held under two
    names counted once), of the embedding table one row only, all of it again for a head tied to it."""
    model = skeleton(config, weights)
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = _nbytes(t)
    embed = model.embed_tokens
    table = embed.blocks if isinstance(embed, quant.Q8_0Embedding) else embed.weight
    row = _nbytes(table) // embed.num_embeddings
    tied = isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is getattr(embed, "weight", None)
    return sum(seen.values()) - _nbytes(table) + row + (_nbytes(table) if tied else 0)


# --------------------------------------------------------------------------------------------
# The launches, kernel by kernel
# --------------------------------------------------------------------------------------------
def _rms(name: str, rows: int, C: int, count: int) -> Op:
    """kernels.rms_norm: read rows x C, the float32 weight; write y and rstd (float32 per row)."""
    return Op(name, "triton", "norm", count, rows * C * ACT * 2 + C * 4 + rows * 4, 4 * rows * C,
              "_rms_norm_fwd_kernel")


def _rope(name: str, rows: int, T: int, D: int, count: int) -> Op:
    """kernels.rope: read and write rows x D, read the positions (int64) and the D/2 frequencies."""
    return Op(name, "triton", "rope", count, rows * D * ACT * 2 + T * 8 + D // 2 * 4, 6 * rows * D, "_rope_kernel")


def _add(name: str, n: int, count: int, group: str = "glue") -> Op:
    """An element-wise torch op with two inputs of n activations and one output."""
    return Op(name, "torch", group, count, 3 * n * ACT, n)


def _linears(config: GemmaConfig) -> list[tuple[str, int, int]]:
    """(name, N out, K in) of a decoder layer's four linear layers."""
    c = config
    H, K, D, C, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    return [("qkv_proj", (H + 2 * K) * D, C), ("o_proj", C, H * D), ("gate_up_proj", 2 * F, C), ("down_proj", C, F)]


def gemv_split(M: int, N: int, K: int, gpu: GPU, block_k: int = 64) -> int:
    """SPLIT_K the GEMV launcher picks on this GPU (`kernels.gemv.launch_config` with its props)."""
    return gemv_kernels.launch_config(M, N, K, torch.bfloat16, None, block_k, None, None, props=gpu.props)[3]


def _int8_linear(name: str, M: int, N: int, K: int, count: int, gpu: GPU) -> list[Op]:
    """An Int8Linear on `kernels.gemv.gemv_int8`: one launch; with SPLIT_K > 1 it writes float32 partials,
    which torch sums (`_finish`: one launch) and casts to bf16 (one more)."""
    split = gemv_split(M, N, K, gpu)
    out = 4 if split > 1 else ACT
    ops = [Op(f"gemv_int8 {name} (split {split})", "triton", "matmul", count,
              N * K + N * 2 + M * K * ACT + split * M * N * out, 2 * M * N * K, "_gemv_int8_kernel")]
    if split > 1:
        ops += [Op(f"split-K sum {name}", "torch", "matmul", count, split * M * N * 4 + M * N * 4, split * M * N),
                Op(f"cast to bf16 {name}", "torch", "matmul", count, M * N * 4 + M * N * ACT)]
    return ops


def _layer_linear(name: str, M: int, N: int, K: int, count: int, weights: str, gpu: GPU) -> list[Op]:
    if weights == "int8":
        return _int8_linear(name, M, N, K, count, gpu)
    return [Op(f"cuBLAS mm {name}", "cublas", "matmul", count, N * K * ACT + M * K * ACT + M * N * ACT, 2 * M * N * K)]


def _embedding(config: GemmaConfig, rows: int, weights: str, model: Gemma) -> list[Op]:
    C = config.hidden_size
    if weights == "bf16":
        ops = [Op("embedding (gather rows)", "torch", "glue", 1, rows * (C * ACT * 2 + 8))]
    else:  # Q8_0Embedding.rows + forward: blocks[ids], 2 contiguous (copies unless there is one block in
        # all: a slice of a single block is contiguous already), 2 float, d · q, to(bf16)
        n = 7 if rows * (C // 32) > 1 else 5
        row = _nbytes(model.embed_tokens.blocks) // config.vocab_size
        per_row = 2 * row + 4 * (C // 32) + 6 * (C // 32) + 2 * C + 5 * C + (4 * C // 32 + 8 * C) + 6 * C
        ops = [Op(f"Q8_0 embedding rows ({n} torch ops)", "torch", "glue", n, rows * per_row / n)]
    return ops + [_add("embedding · sqrt(C)", rows * C, 1)]


def _head(config: GemmaConfig, weights: str, model: Gemma, gpu: GPU) -> list[Op]:
    """The head on the last row only (decode: the one new token; prefill: last_only)."""
    C, V = config.hidden_size, config.vocab_size
    if weights == "bf16":
        ops = [Op("cuBLAS mm lm_head (tied embedding)", "cublas", "matmul", 1, V * C * ACT + C * ACT + V * ACT,
                  2 * V * C)]
        logits = ACT
    else:  # RescoredHead: int4 GEMV over V, float(), topk, the k exact rows (Q8_0), their products, scatter
        head = model.lm_head
        approx, k = head.approx, head.k
        split = gemv_split(1, V, C, gpu, block_k=min(64, approx.group_size & -approx.group_size))
        out = 4 if split > 1 else ACT
        ops = [Op(f"gemv_int4 lm_head (split {split})", "triton", "matmul", 1,
                  _nbytes(approx.packed) + _nbytes(approx.scale_zero) + C * ACT + split * V * out, 2 * V * C,
                  "_gemv_int4_kernel")]
        if split > 1:
            ops += [Op("split-K sum lm_head", "torch", "matmul", 1, split * V * 4 + V * 4),
                    Op("cast to bf16 lm_head", "torch", "matmul", 1, V * 4 + V * ACT)]
        row = _nbytes(model.embed_tokens.blocks) // V
        ops += [Op("logits to float32", "torch", "glue", 1, V * (ACT + 4)),
                Op(f"topk {k}", "torch", "glue", 1, V * 4 + k * 12),
                Op(f"Q8_0 rows of the top {k} (6 torch ops)", "torch", "glue", 6, k * (2 * row + 21 * C) / 6),
                Op("x to float32", "torch", "glue", 1, C * (ACT + 4)),
                Op(f"exact logits of the top {k} (bmm)", "cublas", "matmul", 1, k * C * 4 + C * 4 + k * 4, 2 * k * C),
                Op("scatter the exact logits", "torch", "glue", 1, 2 * k * 12)]
        logits = 4
    if config.logit_cap:  # soft_cap: cap · tanh(x / cap), three element-wise launches over V
        ops.append(Op("soft-cap of the logits (div, tanh, mul)", "torch", "glue", 3, 2 * V * logits, V))
    return ops


def _positions() -> Op:
    """make_positions: base + arange(T), the Positions' index arange, next_position = last + 1."""
    return Op("positions (2 arange, 2 add)", "torch", "glue", 4, 16)


def _layer_counts(config: GemmaConfig) -> tuple[int, int]:
    n_local = sum(t == SLIDING for t in config.layer_types)
    return n_local, config.num_hidden_layers - n_local


def _per_layer(config: GemmaConfig, T: int, weights: str, gpu: GPU) -> list[Op]:
    """What every layer launches whatever its attention: norms, QK-norm, RoPE, the linears, the adds, GeGLU."""
    c, L = config, config.num_hidden_layers
    H, K, D, C, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    norms = 4 if c.sandwich_norm else 2  # post-norms are nn.Identity without sandwich norms: no launch
    ops = [_rms("rms_norm (hidden)", T, C, norms * L)]
    if c.use_qk_norm:
        ops += [_rms("rms_norm (QK-norm of q)", T * H, D, L), _rms("rms_norm (QK-norm of k)", T * K, D, L)]
    ops += [_rope("rope q", T * H, T, D, L), _rope("rope k", T * K, T, D, L)]
    linears = {name: (N, Kin) for name, N, Kin in _linears(c)}
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        ops += _layer_linear(name, T, *linears[name], L, weights, gpu)
    ops += [_add("residual add", T * C, 2 * L),
            Op("geglu", "triton", "geglu", L, T * (2 * F + F) * ACT, 10 * T * F, "_geglu_fwd_kernel")]
    return ops


def _splits(S: int, config: GemmaConfig, gpu: GPU, batch: int) -> tuple[int, int]:
    """(programs per row and K/V head, BLOCK_N) of `decode_attention` over S keys on this GPU."""
    D, K = config.head_dim, config.num_key_value_heads
    decode_blocks = getattr(attention_kernels, "decode_blocks", None)  # the decode kernel's own tile choice
    if decode_blocks is not None:
        block_n = decode_blocks(D, None, None, props=gpu.props, elem=ACT)[0]
    else:  # launchers that take the forward's BLOCK_N
        block_n = attention_kernels.blocks(D, None, None, None, props=gpu.props, elem=ACT)[1]
    n = attention_kernels.decode_splits(batch, K, S, block_n, attention_kernels.target_programs(None, gpu.props))
    per_split = triton.cdiv(triton.cdiv(S, n), block_n) * block_n  # as decode_attention rounds it
    return triton.cdiv(S, per_split), block_n


def _decode_attention(kind: str, S: int, count: int, ring: bool, config: GemmaConfig, gpu: GPU,
                      batch: int, combine: bool = True) -> list[Op]:
    """The split-K decode kernel, and the combine of its splits: a kernel of its own (`combine`), or the
    prologue of the fused o_proj, whose op then reads the partial results (counted here, once)."""
    c = config
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    n, _ = _splits(S, c, gpu, batch)
    part = batch * H * n * (D * 4 + 4)  # o_part and lse_part, float32
    read = batch * (H * D * ACT + 2 * K * S * D * ACT) + (S * 8 if ring and combine else 0)  # slot indices
    if not combine:
        return [Op(f"decode attention, {kind} ({S} keys, {n} splits; partials read back by o_proj)", "triton",
                   "attention", count, read + 2 * part, 4 * batch * H * S * D, "_decode_kernel")]
    return [Op(f"decode attention, {kind} ({S} keys, {n} splits)", "triton", "attention", count, read + part,
               4 * batch * H * S * D, "_decode_kernel"),
            Op(f"combine the splits, {kind}", "triton", "attention", count, part + batch * H * D * ACT,
               3 * batch * H * n * D, "_combine_kernel")]


def _fused_layers(config: GemmaConfig, B: int) -> list[Op]:
    """Every layer's fused decode step (`kernels.decode_layer`, bf16 weights) but its attention: the QKV
    kernel (norms, QK-norm, RoPE, KV write), o_proj with the combine, gate_up with GeGLU, down; and the
    trunk's last kernel, the final residual add and norm. Norm weights are float32 (4 bytes)."""
    c, L = config, config.num_hidden_layers
    H, K, D, C, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    heads = H + 2 * K
    qkv = (heads * D * C * ACT + 4 * (2 * C + 2 * D + D // 2)  # weights; norm weights and frequencies
           + B * (2 * C * ACT + C * ACT + heads * D * ACT + 8))  # residual and δ in, x out, q/k/v out, position
    return [
        Op(f"qkv + norms + QK-norm + RoPE + KV write ({heads * B} programs)", "triton", "matmul", L, qkv,
           2 * B * heads * D * C, "_qkv_kernel"),
        Op(f"o_proj with the combine ({triton.cdiv(C, 64) * B} programs)", "triton", "matmul", L,
           C * H * D * ACT + B * C * ACT, 2 * B * C * H * D, "_o_proj_kernel"),  # + the partials: in the attention's op
        Op(f"gate_up + norms + GeGLU ({triton.cdiv(F, 32) * B} programs)", "triton", "matmul", L,
           2 * F * C * ACT + 4 * 2 * C + B * (3 * C * ACT + F * ACT), 2 * B * 2 * F * C, "_gate_up_kernel"),
        Op(f"down_proj ({triton.cdiv(C, 64) * B} programs)", "triton", "matmul", L,
           C * F * ACT + B * (F + C) * ACT, 2 * B * C * F, "_down_kernel"),
    ]


def decode(config: GemmaConfig, context: int = 512, gpu: GPU = H100, weights: str = "bf16",
           launch_us: float = LAUNCH_US, batch: int = 1) -> Plan:
    """One decode step (one new token per row) after `context` cached tokens, under use_triton.

    bf16 weights: the fused step of `kernels.decode_layer` (five launches a layer). int8: module by module
    (the quantised projections on the GEMV kernels, the norms, RoPE, GeGLU and the combine each a launch).
    Ring buffers are assumed to hold the whole window (max_len >= window); module by module, a local
    layer's decode kernel reads its ring's slot indices at every step, wrapped or not (the fused step's
    kernel derives them from the token's index)."""
    model = skeleton(config, weights)
    c, B = config, batch
    K, D = c.num_key_value_heads, c.head_dim
    n_local, n_global = _layer_counts(c)
    W = c.sliding_window
    fused = weights == "bf16"
    ops = [_positions()] + _embedding(c, B, weights, model)
    if fused:
        ops += _fused_layers(c, B)
    else:
        ops += _per_layer(c, B, weights, gpu)
        kv_write = B * K * D * ACT * 2  # read the new key (or value), write it into the cache
        ops.append(Op("KV-cache write (k, v: 2 copies)", "torch", "kv cache", 2 * c.num_hidden_layers, kv_write))
    S_global, S_local = context + 1, min(context + 1, W)
    if n_global:
        ops += _decode_attention("global", S_global, n_global, False, c, gpu, B, combine=not fused)
    if n_local:
        ops += _decode_attention("local", S_local, n_local, True, c, gpu, B, combine=not fused)
    if n_local and not fused:  # module by module, a ring's decode kernel reads its slots' indices, full or not
        # slot_index(): arange, rsub, div, mul, add, lt, the -1 as a tensor, where: 8 launches, once per step
        # (`Positions.key_index`: every local layer's ring holds the same slots). The fused step's kernel
        # derives them from the token's index instead
        ops.append(Op("ring slot indices (8 torch ops, once)", "torch", "kv cache", 8, 16 * W))
    if fused:  # the last layer's residual add and the final norm, one kernel
        C = c.hidden_size
        ops.append(Op("final residual add + norm", "triton", "norm", 1, B * 3 * C * ACT + 2 * C * 4, 8 * B * C,
                      "_residual_kernel"))
    else:
        ops.append(_rms("rms_norm (final)", B, c.hidden_size, 1))
    ops += _head(c, weights, model, gpu)
    bound = weight_bytes_per_token(c, weights) + kv_bytes_read(c, context, B)
    return Plan("decode", c, weights, context, gpu, ops, bound, launch_us, B)


def kv_bytes_read(config: GemmaConfig, context: int, batch: int = 1) -> int:
    """KV-cache bytes a decode step reads: every key and value it attends, the new token's included."""
    n_local, n_global = _layer_counts(config)
    per_key = 2 * batch * config.num_key_value_heads * config.head_dim * ACT
    return per_key * (n_global * (context + 1) + n_local * min(context + 1, config.sliding_window))


def visible_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs a causal prompt of T tokens computes: Σ_i min(i + 1, window)."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def prefill(config: GemmaConfig, T: int = 8192, gpu: GPU = H100, weights: str = "bf16",
            launch_us: float = LAUNCH_US) -> Plan:
    """One prefill of T tokens into an empty cache (batch 1, the head on the last token only)."""
    model = skeleton(config, weights)
    c = config
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    n_local, n_global = _layer_counts(c)
    W = c.sliding_window
    ops = [_positions()] + _embedding(c, T, weights, model) + _per_layer(c, T, weights, gpu)
    kv = T * K * D * ACT
    flash_bytes = T * H * D * ACT * 2 + 2 * kv + T * H * 4  # q, out, k, v, lse: each once (re-reads hit L2)
    if n_global:  # KVCache.update: two copies into the static buffer
        ops += [Op("KV-cache write (k, v: 2 copies)", "torch", "kv cache", 2 * n_global, 2 * kv),
                Op(f"flash attention, global ({T} × {T} causal)", "triton", "attention", n_global, flash_bytes,
                   4 * H * D * visible_pairs(T, None), "_fwd_kernel")]
    if n_local:  # RingKVCache.update of a chunk: arange % size, ring[order] (k, v), cat (k, v), arange % size,
        keep = min(T, W)  # ring[slots] = last keys (k, v): 10 launches
        ops += [Op("ring chunk update (10 torch ops)", "torch", "kv cache", 10 * n_local,
                   (2 * 2 * kv + 2 * 2 * keep * K * D * ACT + 4 * 16 * keep) / 10),
                Op(f"flash attention, local ({T} tokens, window {W})", "triton", "attention", n_local, flash_bytes,
                   4 * H * D * visible_pairs(T, W), "_fwd_kernel")]
    ops.append(_rms("rms_norm (final)", T, c.hidden_size, 1))  # the trunk's norm runs on all T rows
    ops += _head(c, weights, model, gpu)
    return Plan("prefill", c, weights, T, gpu, ops, 0.0, launch_us, 1)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
ASSUMPTIONS = [
    "a prediction from a model of the code, not a measurement: no kernel ran to make this table",
    "time of a launch = max(bytes / bandwidth, FLOPs / peak) + a fixed launch cost ({launch} µs, eager PyTorch), "
    "launches one after another: no overlap of the CPU's launching with the GPU's work, no CUDA graph",
    "bytes = HBM reads + writes a launch must make (each input once, each output once); re-reads that the L2 "
    "cache serves (a prefill's K/V tiles) are not counted",
    "ceilings: datasheet figures ({gpus}); every kernel is assumed to reach them, so kernel times are lower bounds "
    "(the fused decode GEMVs run fewer programs than the GPU has SMs for the small products, and would fall short)",
    "batch 1, bf16 activations and KV cache, norm weights float32; rings hold the whole window; "
    "int8 = quant level 'int8' (Int8Linear layers, Q8_0 embedding, rescored int4 head) on the GEMV kernels",
    "cuBLAS counted as one launch per matmul; a host -> device copy (none today: the RoPE frequencies are built on the device once) would count as a launch",
    "decode bound = (weights read per token + KV cache read) / bandwidth: what decoding would reach with "
    "no launch cost and every kernel at full bandwidth",
]


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def report(plans: list[Plan], detail: Plan | None = None) -> str:
    """The plans as text: a title saying PREDICTION, the assumptions, a summary row per plan, and the
    kernel-by-kernel table of `detail` (default: the first plan)."""
    if not plans:
        raise ValueError("no plans to report")
    launch = ", ".join(sorted({f"{p.launch_us:g}" for p in plans}))
    gpus = "; ".join(sorted({p.gpu.source for p in plans}))
    cfg = plans[0].config
    lines = [f"Cost model of a Gemma ({cfg.num_hidden_layers} layers, C = {cfg.hidden_size}, V = {cfg.vocab_size}) "
             "under use_triton: prediction (not measured)", "", "Assumptions:"]
    lines += [f"  - {a.format(launch=launch, gpus=gpus)}" for a in ASSUMPTIONS]
    lines += ["", "Summary (every time and tok/s is predicted):",
              f"  {'phase':<8}{'weights':<8}{'tokens':>7}  {'GPU':<14}{'launches':>9}  {'triton/cuBLAS/torch/h2d':<24}"
              f"{'MB':>10}{'GFLOP':>10}{'kernel µs':>11}{'launch µs':>11}{'pred. tok/s':>13}{'bound tok/s':>13}"]
    for p in plans:
        k = p.launches_by_kind()
        kinds = f"{k['triton']}/{k['cublas']}/{k['torch']}/{k['h2d']}"
        bound = "decode" if p.phase == "decode" else "no launch"
        lines.append(f"  {p.phase:<8}{p.weights:<8}{p.tokens:>7}  {p.gpu.name:<14}{p.launches:>9}  {kinds:<24}"
                     f"{_mb(p.nbytes):>10}{p.flops / 1e9:>10,.2f}{p.kernel_s * 1e6:>11.1f}{p.launch_s * 1e6:>11.1f}"
                     f"{p.tok_s:>13,.0f}{p.bound_tok_s:>13,.0f}")
    lines.append("  (tokens: cached tokens before a decode step, or the prompt's length; bound tok/s: decode's "
                 "bandwidth bound, or a prefill's kernels with no launch cost)")
    d = detail or plans[0]
    lines += ["", f"Per kernel, predicted: {d.phase}, {d.weights} weights, {d.tokens} tokens, {d.gpu.name}, "
                  f"{d.launch_us:g} µs per launch:",
              f"  {'op':<52}{'kind':<8}{'launches':>9}{'KB/launch':>11}{'MFLOP/launch':>14}{'kernel µs':>11}"
              f"{'launch µs':>11}"]
    for op in sorted(d.ops, key=lambda o: -(o.kernel_s(d.gpu) + o.launch_s(d.launch_us))):
        lines.append(f"  {op.name[:51]:<52}{op.kind:<8}{op.count:>9}{op.nbytes / 1e3:>11.4g}{op.flops / 1e6:>14.4g}"
                     f"{op.kernel_s(d.gpu) * 1e6:>11.2f}{op.launch_s(d.launch_us) * 1e6:>11.1f}")
    lines.append(f"  {'total':<52}{'':<8}{d.launches:>9}{'':>11}{'':>14}{d.kernel_s * 1e6:>11.1f}"
                 f"{d.launch_s * 1e6:>11.1f}")
    return "\n".join(lines)


def plans(config: GemmaConfig, contexts=(512, 8192), prefill_tokens=(8192,), gpus=(H100, A100),
          levels=LEVELS, launch_us: float = LAUNCH_US) -> list[Plan]:
    """Every decode and prefill plan of these settings, decode first."""
    out = [decode(config, n, g, w, launch_us) for g in gpus for w in levels for n in contexts]
    out += [prefill(config, T, g, w, launch_us) for g in gpus for w in levels for T in prefill_tokens]
    return out


def as_json(ps: list[Plan]) -> dict:
    return {"title": "cost model: prediction (not measured)",
            "assumptions": [a.format(launch=", ".join(sorted({f"{p.launch_us:g}" for p in ps})),
                                     gpus="; ".join(sorted({p.gpu.source for p in ps}))) for a in ASSUMPTIONS],
            "plans": [dict(p.summary(), ops=[{"name": o.name, "kind": o.kind, "group": o.group, "count": o.count,
                                              "bytes": o.nbytes, "flops": o.flops, "kernel": o.kernel} for o in p.ops])
                      for p in ps]}


__all__ = ["GPU", "H100", "A100", "GPUS", "Op", "Plan", "LAUNCH_US", "LEVELS", "decode", "prefill", "plans", "report",
           "as_json", "weight_bytes_per_token", "kv_bytes_read", "visible_pairs", "gemv_split", "skeleton"]
