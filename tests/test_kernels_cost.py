"""The cost model of the Triton kernels (minigemma.kernels.cost): its launch counts against launches counted
while the model really runs (Triton's interpreter, on CPU), its bytes and its bounds against arithmetic done
here by hand, and its report labelled as a prediction.

How launches are counted here, independently of the cost model: every Triton launch goes through
`InterpretedFunction.run` (counted by kernel name); every torch op reaching the dispatcher is seen by a
TorchDispatchMode. Of those, views and allocations launch nothing on a GPU (VIEWS), and three functions run
on the host on a GPU (read in the code): `check_token_ids` checks CPU ids only and `embedding_scale` makes a
host scalar. mm / addmm / bmm are cuBLAS's on a GPU. A host -> device copy is what `rope_frequencies` would
be if it ran inside a step: it is counted as one, and the model must make none (the RoPE frequencies are
built once per device, before the counted step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter

import pytest
import torch

import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET=1 first, without a GPU)
from minigemma import layers, quant, trunk
from minigemma.gemma import Gemma, GemmaConfig, PRESETS, layer_pattern, preset
from minigemma.kernels import attention as attention_kernels
from minigemma.kernels import bench, cost
from minigemma.kernels.gemv import gemv_int8, use_gemv
from minigemma.kernels.interpret import INTERPRET
from minigemma.kernels.swap import use_triton

INTERPRETER = pytest.mark.skipif(not INTERPRET, reason="counts launches in Triton's interpreter (no GPU)")
VIEWS = {"view", "_unsafe_view", "transpose", "t", "slice", "alias", "split_with_sizes", "unsqueeze", "select",
         "expand", "as_strided", "detach", "permute", "squeeze", "empty", "empty_strided", "empty_like"}
CUBLAS = {"mm", "addmm", "bmm"}


class Launches:
    """What ran while counting: triton (kernel name -> launches), device torch ops, cuBLAS products, h2d copies."""

    def __init__(self):
        self.triton, self.ops, self.h2d = Counter(), Counter(), 0
        self.on = False

    @property
    def cublas(self) -> int:
        return sum(n for op, n in self.ops.items() if op in CUBLAS)

    @property
    def torch(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in CUBLAS)


@contextlib.contextmanager
def counting(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    rec = Launches()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if rec.on and name not in VIEWS:
                rec.ops[name] += 1
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused():
        was, rec.on = rec.on, False
        try:
            yield
        finally:
            rec.on = was

    run0 = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if rec.on:
            rec.triton[self.fn.__name__] += 1
        with paused():  # the interpreter's own copies to and from numpy are not the kernel's launches
            return run0(self, *args, **kwargs)

    def host(fn, h2d=False):
        def wrapped(*args, **kwargs):
            if rec.on and h2d:
                rec.h2d += 1
            with paused():
                return fn(*args, **kwargs)
        return wrapped

    attention_kernels.placeholder(torch.device("cpu"))  # made once per device, never inside a step
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    monkeypatch.setattr(trunk, "check_token_ids", host(trunk.check_token_ids))
    monkeypatch.setattr(trunk, "embedding_scale", host(trunk.embedding_scale))
    monkeypatch.setattr(layers, "rope_frequencies", host(layers.rope_frequencies, h2d=True))
    with Mode():
        rec.on = True
        try:
            yield rec
        finally:
            rec.on = False


def tiny(family: str, layers: int = 6) -> GemmaConfig:
    if family == "gemma3":
        return GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                           layer_types=layer_pattern(layers, 6), sliding_window=8, query_pre_attn_scalar=16,
                           use_qk_norm=True)
    return GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,  # Gemma 2
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=layer_pattern(layers, 2),
                       sliding_window=8, query_pre_attn_scalar=16, family="gemma2", attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0)


def model_of(config: GemmaConfig) -> Gemma:
    torch.manual_seed(0)
    return Gemma(config).eval()


def assert_counts_match(plan: cost.Plan, rec: Launches) -> None:
    kinds = plan.launches_by_kind()
    assert dict(plan.triton_launches()) == dict(rec.triton)
    assert (kinds["cublas"], kinds["torch"], kinds["h2d"]) == (rec.cublas, rec.torch, rec.h2d), rec.ops
    assert plan.launches == sum(rec.triton.values()) + rec.cublas + rec.torch + rec.h2d


@torch.no_grad()
def decode_step_launches(model, context: int, monkeypatch, triton_prompt: bool = True) -> Launches:
    """The prompt (`context` tokens) first, not counted; then one decode step under use_triton, counted."""
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, context + 4)
    if triton_prompt:
        use_triton(model, verbose=False)
    model(ids[:, :context], cache=cache, last_only=True)
    if not triton_prompt:
        use_triton(model, verbose=False)
    with counting(monkeypatch) as rec:
        model(ids[:, context:], cache=cache, last_only=True)
    return rec


@INTERPRETER
@pytest.mark.parametrize("family, context", [("gemma3", 12), ("gemma3", 4), ("gemma2", 12)],
                         ids=["gemma3-ring-wrapped", "gemma3-ring-not-full", "gemma2-softcaps"])
def test_decode_launches_are_those_counted_in_the_interpreter(family, context, monkeypatch):
    """The important check: the launches the model lists for one decode step are the launches made."""
    config = tiny(family)
    rec = decode_step_launches(model_of(config), context, monkeypatch)
    assert_counts_match(cost.decode(config, context), rec)


@INTERPRETER
@pytest.mark.parametrize("family, T", [("gemma3", 12), ("gemma2", 6)])
def test_prefill_launches_are_those_counted_in_the_interpreter(family, T, monkeypatch):
    config = tiny(family)
    model = model_of(config)
    use_triton(model, verbose=False)
    ids = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, T)  # made before the prefill, as `generate` makes it
    for m in model.modules():  # each layer's RoPE frequencies reach the device on its first call, once
        if isinstance(m, layers.RotaryEmbedding):
            m.frequencies(torch.device("cpu"))
    with torch.no_grad(), counting(monkeypatch) as rec:
        model(ids, cache=cache, last_only=True)
    assert_counts_match(cost.prefill(config, T), rec)


@INTERPRETER
@pytest.mark.slow
def test_gemma3_270m_decode_launches_counted_on_its_real_layers(monkeypatch):
    """Gemma 3 270M's real layers (width 640, 4 heads of 256, window 512, all 18: 15 local, 3 global) at 512
    cached tokens, counted. The vocabulary is cut to 4,096 rows (a launch count does not depend on it; it
    keeps the float32 table small). The prompt runs on torch (fast), the decode step on the kernels."""
    config = preset("gemma3-270m", vocab_size=4096)
    rec = decode_step_launches(model_of(config), 512, monkeypatch, triton_prompt=False)
    plan = cost.decode(config, 512)
    assert_counts_match(plan, rec)
    full = cost.decode(PRESETS["gemma3-270m"], 512).launches_by_kind()
    assert full == plan.launches_by_kind()  # the real vocabulary launches the same
    assert full["h2d"] == rec.h2d == 0


def gemv_split_by_hand(N: int, K: int, sms: int, block_n: int = 64, block_k: int = 64) -> int:
    """gemv._config on a GPU at one row: max(1, min(k tiles, 16, 2 · SMs // output tiles))."""
    return max(1, min(math.ceil(K / block_k), 16, 2 * sms // math.ceil(N / block_n)))


def test_gemv_bytes_are_the_weights_and_activations_by_hand():
    c = PRESETS["gemma3-270m"]
    N, K = (4 + 2 * 1) * 256, 640  # qkv_proj: (H + 2K)·D rows, C columns
    split = gemv_split_by_hand(N, K, 132)
    assert split == 10
    plan = cost.decode(c, 512, cost.H100, "int8")
    (op,) = [o for o in plan.ops if o.kernel == "_gemv_int8_kernel" and "qkv_proj" in o.name]
    assert op.count == c.num_hidden_layers
    assert op.nbytes == N * K * 1 + N * 2 + K * 2 + split * N * 4  # int8 weight, bf16 scales, bf16 x, fp32 partials
    assert op.flops == 2 * N * K
    (mm,) = [o for o in cost.prefill(c, 1, cost.H100, "bf16").ops if o.name == "cuBLAS mm qkv_proj"]
    assert mm.nbytes == N * K * 2 + K * 2 + N * 2
    # bf16 decode: the fused QKV kernel reads the weight, the residual and δ, the norm weights (two of C, two
    # of D, float32) and the D/2 RoPE frequencies, the position; it writes x (C), q, k and v (N values)
    (fused,) = [o for o in cost.decode(c, 512, cost.H100, "bf16").ops if o.kernel == "_qkv_kernel"]
    assert fused.nbytes == N * K * 2 + 4 * (2 * K + 2 * 256 + 128) + (2 * K * 2 + K * 2 + N * 2 + 8)
    assert fused.count == c.num_hidden_layers and fused.flops == 2 * N * K


@INTERPRETER
def test_int8_linear_launches_counted_at_the_gpus_split(monkeypatch):
    """An Int8Linear at H100's split: the GEMV kernel, then torch sums the partials and casts (counted)."""
    N, K = 1536, 640
    split = gemv_split_by_hand(N, K, 132)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (128, K), generator=g, dtype=torch.int8)  # fewer rows: the same launches
    scale = torch.rand(128, generator=g).to(torch.bfloat16)
    with counting(monkeypatch) as rec:
        gemv_int8(x, q, scale, None, torch.bfloat16, split_k=split)
    plan = cost.decode(PRESETS["gemma3-270m"], 512, cost.H100, "int8")
    L = PRESETS["gemma3-270m"].num_hidden_layers
    qkv = [o for o in plan.ops if "qkv_proj" in o.name]
    assert sum(o.count for o in qkv if o.kind == "triton") == L * sum(rec.triton.values()) == L
    assert sum(o.count for o in qkv if o.kind == "torch") == L * rec.torch == 2 * L


@INTERPRETER
@pytest.mark.parametrize("width", [64, 32])
def test_int8_embedding_and_head_launches_counted(width, monkeypatch):
    """The int8 level's Q8_0 embedding and rescored int4 head (on the GEMV kernel), run and counted. The
    head's groups are 32 weights: at width 32 its GEMV has one K tile, so one split on the GPU, where it
    writes bf16 itself; at width 64, two tiles and two splits, which torch sums and casts (two launches).
    The interpreter runs one split and writes float32, which torch casts (gemv._out): one launch."""
    config = dataclasses.replace(tiny("gemma3"), hidden_size=width)  # 64: two Q8_0 blocks a row (270M: 20)
    model = quant.quantize(model_of(config), "int8")
    use_gemv(model)
    plan = cost.decode(config, 12, cost.H100, "int8")
    ids = torch.tensor([[3]])
    with torch.no_grad(), counting(monkeypatch) as rec:
        model.embed_tokens(ids)
    (emb,) = [o for o in plan.ops if o.name.startswith("Q8_0 embedding")]
    assert emb.count == rec.torch and not rec.triton
    x = torch.randn(1, 1, config.hidden_size).to(torch.bfloat16)
    quant.int4_block_rows()  # a host probe of the CPU's int4 layout, cached after its first call
    with torch.no_grad(), counting(monkeypatch) as rec:
        model.lm_head(x)
    head = plan.ops[[o.name for o in plan.ops].index("rms_norm (final)") + 1:]
    assert sum(o.count for o in head if o.kind == "triton") == sum(rec.triton.values()) == 1
    split_k = sum(o.count for o in head if o.name.startswith(("split-K sum", "cast to bf16")))
    assert split_k == (2 if width == 64 else 0)
    assert sum(o.count for o in head if o.kind != "triton") - split_k + 1 == rec.torch + rec.cublas


def test_decode_bound_is_hand_arithmetic():
    """Gemma 3 270M, bf16, 512 cached tokens: weight bytes, KV bytes and the bound, all by hand."""
    C, F, V, D, L = 640, 2048, 262_144, 256, 18
    linear = (6 * D * C + C * 4 * D + 2 * F * C + C * F) * 2  # qkv, o, gate_up, down in bf16
    norms = (4 * C + 2 * D) * 4  # four norms and the QK-norms, float32
    weights = L * (linear + norms) + C * 4 + C * 2 + V * C * 2  # final norm, one embedding row, the tied head
    kv = 2 * 1 * D * 2 * (3 * 513 + 15 * 512)  # k and v; 3 global layers see 513 keys, 15 local ones 512
    plan = cost.decode(PRESETS["gemma3-270m"], 512, cost.H100, "bf16")
    assert plan.bound_bytes == weights + kv
    assert plan.bound_tok_s == pytest.approx(3.35e12 / (weights + kv))
    assert 5_000 < plan.bound_tok_s < 7_000  # about 0.55 GB per token at 3.35 TB/s
    a100 = cost.decode(PRESETS["gemma3-270m"], 512, cost.A100, "bf16")
    assert a100.bound_tok_s == pytest.approx(2.039e12 / (weights + kv))


@pytest.mark.parametrize("level", ["bf16", "int8"])
def test_weight_bytes_agree_with_a_real_model(level):
    """The meta skeleton's count against `quant.weight_bytes_per_token` on a real (tiny) model at that level."""
    config = tiny("gemma3")
    model = quant.quantize(model_of(config), level)
    assert cost.weight_bytes_per_token(config, level) == quant.weight_bytes_per_token(model)


def test_time_is_the_stated_formula_and_never_beats_the_bound():
    plan = cost.decode(PRESETS["gemma3-270m"], 8192, cost.A100, "bf16", launch_us=7.0)
    by_hand = sum(o.count * (max(o.nbytes / 2.039e12, o.flops / 312e12) + 7e-6) for o in plan.ops)
    assert plan.time_s == pytest.approx(by_hand)
    assert plan.launch_s == pytest.approx(plan.launches * 7e-6)
    free = cost.decode(PRESETS["gemma3-270m"], 8192, cost.A100, "bf16", launch_us=0.0)
    assert free.nbytes >= free.bound_bytes  # the kernels move at least what the bound counts
    assert free.tok_s <= free.bound_tok_s * (1 + 1e-9)


def test_plan_table_says_prediction(capsys):
    assert bench.main(["--plan"]) == 0
    out = capsys.readouterr().out
    title = out.strip().splitlines()[0]
    assert "prediction (not measured)" in title
    assert "Assumptions:" in out and "4 µs" in out and "H100 SXM" in out and "A100 SXM 80GB" in out
    assert "bound tok/s" in out


def test_plan_json_is_labelled_a_prediction(capsys):
    import json

    assert bench.main(["--plan", "--json", "--gpu", "h100", "--context", "512", "--prefill", "1024"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "prediction" in rep["title"]
    assert all(p["prediction"] for p in rep["plans"])
    assert {(p["phase"], p["tokens"]) for p in rep["plans"]} == {("decode", 512), ("prefill", 1024)}
