"""Kernel benchmarks: the device's own ceilings first, then every op, eager vs compile vs ours vs Liger.

    python -m minigemma.kernels.bench                      # on a GPU: everything
    python -m minigemma.kernels.bench --ops rms_norm,rglru_scan --save docs/benchmarks
    python -m minigemma.kernels.bench --cpu                # no GPU: torch eager and torch.compile on this CPU
    python -m minigemma.kernels.bench --plan               # runs nothing: the cost model's prediction (kernels.cost)
    make bench-kernels

On a GPU it first measures two ceilings on this very device: the bandwidth of a large device-to-
device copy (GB/s, bytes read + bytes written) and the throughput of a large bf16 matmul (TFLOP/s).
Then, per op, `triton.testing.do_bench` medians (ms) for each implementation that exists:

    eager     the package's torch code (the reference the kernel is tested against)
    compile   the same code under torch.compile
    ours      the Triton kernel in minigemma.kernels
    liger     Liger-Kernel's op, where it has one (`pip install -e '.[bench]'`)

and the achieved GB/s for the op's minimum traffic (every input read once, every output written
once: the same byte count for every implementation) as a share of the measured copy bandwidth, or
TFLOP/s against the matmul ceiling for compute-bound ops, plus peak memory where an entry asks.

Without a GPU it says so and measures nothing: the kernels then run only in Triton's interpreter,
whose speed says nothing about them. `--cpu` times eager and compile on the CPU instead, labelled as
such, at smaller sizes; `ours` and `liger` are never timed there.

Each op is an `Entry` in `ENTRIES`; later kernels (the fused loss, the int8/int4 GEMV) add theirs
with `register(...)`. `PENDING` lists what is not built yet, so the report says so.

Attention (chapter 13) is compute-bound: its entries report TFLOP/s of the products over the (query,
key) pairs the mask lets through, as a share of the measured matmul ceiling, for causal, window 512
at 8K and 32K, Gemma 2's soft-cap and EmbeddingGemma's band, against the model's own path, PyTorch's
SDPA (flash backend where the mask allows) and FlexAttention. End to end (`E2E`, GPU): the real
Gemma 3 270M in bf16, torch vs `use_triton` — decode tok/s at batch 1 and 32 against the bandwidth
roofline (bytes read per step over the measured copy bandwidth), prefill tok/s at 8K, a per-kernel
profile — and EmbeddingGemma's documents/s against sentence-transformers on the same GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minigemma.atomic import write_atomic

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton: the correctness path of the entries


class Unavailable(Exception):
    """This implementation does not exist here (not installed, no such op, not on this device)."""


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One op at one shape, forward or forward+backward, and every way to run it.

    make(device, dtype, size) -> inputs (a dict); size is "gpu", "cpu" (smaller) or "tiny" (tests).
    impls: name -> (inputs -> a thunk that runs the op once); raise Unavailable to skip with a reason.
    nbytes(inputs): the minimum traffic of the op; flops(inputs): its arithmetic. One of them.
    baseline: the implementation the speed-ups are relative to.
    """

    name: str
    shape: str
    make: Callable[[str, torch.dtype, str], dict]
    impls: dict[str, Callable[[dict], Callable[[], Any]]]
    nbytes: Callable[[dict], int] | None = None
    flops: Callable[[dict], int] | None = None
    dtype: torch.dtype = torch.bfloat16
    baseline: str = "eager"
    peak_memory: bool = False
    notes: dict[str, str] = field(default_factory=dict)


ENTRIES: list[Entry] = []
PENDING: dict[str, str] = {}  # op -> why it is not built yet (named in every report)


def register(entry: Entry) -> Entry:
    ENTRIES.append(entry)
    return entry


def fwd_bwd(fn, inputs_needing_grad, seed=0):
    """A thunk running fn() and a backward of a fixed random cotangent, gradients cleared each time."""
    state = {}

    def run():
        for t in inputs_needing_grad:
            t.grad = None
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        if "dy" not in state:
            g = torch.Generator(device=outs[0].device).manual_seed(seed)
            state["dy"] = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs]
        torch.autograd.backward(outs, state["dy"])
    return run


def compile_fn(fn):
    """torch.compile(fn, dynamic=False), made at the first call: importing this module (`--plan`) compiles nothing."""
    compiled = []

    def run(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args, **kwargs)
    return run


def load_liger(module: str, attr: str):
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except ImportError:
        raise Unavailable("Liger-Kernel not installed (pip install -e '.[bench]')") from None
    except AttributeError:
        raise Unavailable(f"this Liger-Kernel has no {module}.{attr}") from None


def need_gpu(inputs):
    if next(iter(t for t in inputs.values() if isinstance(t, torch.Tensor))).device.type != "cuda":
        raise Unavailable("GPU only")


# ---- RMSNorm -------------------------------------------------------------------------------
def _rms_make(device, dtype, size, qk=False):
    g = torch.Generator().manual_seed(0)
    if qk:  # Gemma 3 270M's QK-norm on q: (B, H, T, D) as a view of the (B, T, H·D) projection
        B, T, H, D = {"gpu": (8, 2048, 4, 256), "cpu": (1, 512, 4, 256), "tiny": (1, 5, 2, 24)}[size]
        x = torch.randn(B, T, H * D, generator=g).to(device, dtype).view(B, T, H, D).transpose(1, 2)
        C = D
    else:  # Gemma 3 270M's hidden size, B·T rows
        N, C = {"gpu": (16384, 640), "cpu": (2048, 640), "tiny": (7, 40)}[size]
        x = torch.randn(N, C, generator=g).to(device, dtype)
    w = (0.1 * torch.randn(C, generator=g)).to(device, dtype)
    return {"x": x, "w": w}


def _rms_impls(backward: bool):
    from .rms_norm import reference, rms_norm

    def with_grad(inputs):
        return {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def wrap(f):
        def factory(inputs):
            if not backward:
                return lambda: f(inputs["x"], inputs["w"])
            ins = with_grad(inputs)
            return fwd_bwd(lambda: f(ins["x"], ins["w"]), [ins["x"], ins["w"]])
        return factory

    def liger(inputs):
        need_gpu(inputs)
        fn = load_liger("liger_kernel.transformers.functional", "liger_rms_norm")
        return wrap(lambda x, w: fn(x, w, 1e-6, offset=1.0, casting_mode="gemma", in_place=False))(inputs)

    return {"eager": wrap(reference), "compile": wrap(compile_fn(reference)), "ours": wrap(rms_norm), "liger": liger}


def _rms_bytes(backward):
    def n(inputs):
        x, w = inputs["x"], inputs["w"]
        io = x.numel() * x.element_size()
        return (5 if backward else 2) * io + w.numel() * w.element_size() * (2 if backward else 1)
    return n


# ---- GeGLU ---------------------------------------------------------------------------------
def _geglu_make(device, dtype, size):
    N, F = {"gpu": (16384, 2048), "cpu": (2048, 2048), "tiny": (5, 37)}[size]  # 270M: MLP width 2048
    return {"gate_up": (2 * torch.randn(N, 2 * F, generator=torch.Generator().manual_seed(0))).to(device, dtype)}


def _geglu_impls(backward: bool):
    from .geglu import geglu, reference

    def wrap(f):
        def factory(inputs):
            if not backward:
                return lambda: f(inputs["gate_up"])
            gu = inputs["gate_up"].detach().requires_grad_()
            return fwd_bwd(lambda: f(gu), [gu])
        return factory

    def liger(inputs):
        need_gpu(inputs)
        fn = load_liger("liger_kernel.transformers.functional", "liger_geglu")
        gate, up = (t.contiguous() for t in inputs["gate_up"].chunk(2, dim=-1))  # Liger takes two tensors
        if not backward:
            return lambda: fn(gate, up)
        gate.requires_grad_(), up.requires_grad_()
        return fwd_bwd(lambda: fn(gate, up), [gate, up])

    return {"eager": wrap(reference), "compile": wrap(compile_fn(reference)), "ours": wrap(geglu), "liger": liger}


def _geglu_bytes(backward):
    def n(inputs):
        gu = inputs["gate_up"]
        F_elems = gu.numel() // 2
        return (8 if backward else 3) * F_elems * gu.element_size()
    return n


# ---- RoPE ----------------------------------------------------------------------------------
def _rope_make(device, dtype, size):
    B, T = {"gpu": (8, 2048), "cpu": (1, 512), "tiny": (1, 9)}[size]
    H, K, D = (4, 1, 256) if size != "tiny" else (2, 1, 16)  # 270M: 4 query heads, 1 KV head, head_dim 256
    g = torch.Generator().manual_seed(0)
    return {"q": torch.randn(B, H, T, D, generator=g).to(device, dtype),
            "k": torch.randn(B, K, T, D, generator=g).to(device, dtype),
            "positions": torch.arange(T, device=device)}


def _rope_impls(backward: bool):
    from minigemma.layers import apply_rope, rope_cos_sin, rope_frequencies

    from .rope import rope

    def tables(inputs):  # the model computes them once per forward and shares them across layers
        D = inputs["q"].shape[-1]
        return rope_cos_sin(inputs["positions"], rope_frequencies(D).to(inputs["q"].device))

    def eager_fn(compiled):
        def qk(q, k, cos, sin):
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return compile_fn(qk) if compiled else qk

    def factory_for(run):
        def factory(inputs):
            if not backward:
                return lambda: run(inputs["q"], inputs["k"], inputs)
            q, k = inputs["q"].detach().requires_grad_(), inputs["k"].detach().requires_grad_()
            return fwd_bwd(lambda: run(q, k, inputs), [q, k])
        return factory

    def eager(compiled):
        f = eager_fn(compiled)

        def factory(inputs):
            cos, sin = tables(inputs)
            return factory_for(lambda q, k, _: f(q, k, cos, sin))(inputs)
        return factory

    def ours(q, k, inputs):
        return rope(q, inputs["positions"]), rope(k, inputs["positions"])

    def liger(inputs):
        need_gpu(inputs)
        fn = load_liger("liger_kernel.transformers.functional", "liger_rope")
        cos, sin = tables(inputs)
        cos, sin = cos[None].to(inputs["q"].dtype), sin[None].to(inputs["q"].dtype)  # (1, T, D)
        return factory_for(lambda q, k, _: fn(q, k, cos, sin))(inputs)

    return {"eager": eager(False), "compile": eager(True), "ours": factory_for(ours), "liger": liger}


def _rope_bytes(backward):
    def n(inputs):
        q, k = inputs["q"], inputs["k"]
        return (4 if backward else 2) * (q.numel() + k.numel()) * q.element_size()
    return n


# ---- RG-LRU scan ---------------------------------------------------------------------------
def _scan_make(device, dtype, size):
    B, T, D = {"gpu": (1, 4096, 2560), "cpu": (1, 512, 256), "tiny": (1, 37, 5)}[size]  # recurrentgemma-2b: 2560
    g = torch.Generator().manual_seed(0)
    a = torch.rand(B, T, D, generator=g) ** 0.1
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    return {"a": a.to(device, dtype), "b": torch.randn(B, T, D, generator=g).to(device, dtype),
            "reset": reset.to(device)}


def _scan_impls(backward: bool):
    from minigemma.griffin import scan_associative

    from .rglru_scan import reference, rglru_scan

    def wrap(f):
        def factory(inputs):
            if not backward:
                return lambda: f(inputs["a"], inputs["b"], None, inputs["reset"])
            a, b = inputs["a"].detach().requires_grad_(), inputs["b"].detach().requires_grad_()
            return fwd_bwd(lambda: f(a, b, None, inputs["reset"]), [a, b])
        return factory

    def associative(a, b, h0, reset):
        return scan_associative(a * ~reset[..., None], b, h0)

    def no_compile(inputs):
        raise Unavailable("not timed: torch.compile unrolls the T-step loop (minutes to compile at T = 4096)")

    def no_liger(inputs):
        raise Unavailable("Liger-Kernel has no linear-recurrence scan")

    return {"eager": wrap(reference), "eager (assoc.)": wrap(associative),
            "compile (assoc.)": wrap(compile_fn(associative)), "compile": no_compile, "ours": wrap(rglru_scan),
            "liger": no_liger}


def _scan_bytes(backward):
    def n(inputs):
        a = inputs["a"]
        io, f32 = a.numel() * a.element_size(), a.numel() * 4
        fwd = 2 * io + f32  # read a, b; write h (float32)
        return fwd + (2 * io + 3 * f32 if backward else 0)  # read a, dh, h; write da, db
    return n


for _bwd in (False, True):
    _what = "fwd+bwd" if _bwd else "fwd"
    register(Entry(f"rms_norm {_what}", "x (B·T=16384, 640), Gemma 3 270M hidden", _rms_make, _rms_impls(_bwd),
                   nbytes=_rms_bytes(_bwd)))
    register(Entry(f"qk_norm {_what}", "q (8, 4, 2048, 256), a transposed view",
                   lambda d, t, s: _rms_make(d, t, s, qk=True), _rms_impls(_bwd), nbytes=_rms_bytes(_bwd)))
    register(Entry(f"geglu {_what}", "gate_up (16384, 2·2048) -> (16384, 2048)", _geglu_make, _geglu_impls(_bwd),
                   nbytes=_geglu_bytes(_bwd), notes={"liger": "gate and up as two contiguous tensors"}))
    register(Entry(f"rope {_what}", "q (8, 4, 2048, 256) and k (8, 1, 2048, 256)", _rope_make, _rope_impls(_bwd),
                   nbytes=_rope_bytes(_bwd), notes={"eager": "cos/sin tables precomputed, as the model shares them",
                                                    "compile": "cos/sin tables precomputed"}))
    register(Entry(f"rglru_scan {_what}", "a, b (1, 4096, 2560) float32, reset at t=0", _scan_make, _scan_impls(_bwd),
                   nbytes=_scan_bytes(_bwd), dtype=torch.float32))


# ---- Attention (chapter 13) ----------------------------------------------------------------
# (B, H, K, T, D) per size and the mask. Gemma 3 270M's heads (4 query, 1 K/V, head_dim 256) for the
# causal and windowed entries; Gemma 2 2B's (8, 4, 256; soft-cap 50, window 4096); EmbeddingGemma's
# (3, 1, 256; the band |i - j| <= 256 of its window 512).
ATTENTION_CASES = {
    "causal-8K": ({"gpu": (4, 4, 1, 8192, 256), "cpu": (1, 4, 1, 1024, 256), "tiny": (1, 2, 1, 40, 16)},
                  dict(causal=True)),
    "causal-32K": ({"gpu": (1, 4, 1, 32768, 256), "cpu": (1, 4, 1, 2048, 256), "tiny": (1, 2, 1, 50, 16)},
                   dict(causal=True)),
    "window512-8K": ({"gpu": (4, 4, 1, 8192, 256), "cpu": (1, 4, 1, 1024, 256), "tiny": (1, 2, 1, 40, 16)},
                     dict(causal=True, window=512, tiny_window=7)),
    "window512-32K": ({"gpu": (1, 4, 1, 32768, 256), "cpu": (1, 4, 1, 2048, 256), "tiny": (1, 2, 1, 50, 16)},
                      dict(causal=True, window=512, tiny_window=9)),
    "softcap-8K": ({"gpu": (1, 8, 4, 8192, 256), "cpu": (1, 8, 4, 512, 256), "tiny": (1, 4, 2, 33, 16)},
                   dict(causal=True, window=4096, softcap=50.0, tiny_window=11)),
    "band-8K": ({"gpu": (1, 3, 1, 8192, 256), "cpu": (1, 3, 1, 1024, 256), "tiny": (1, 3, 1, 37, 16)},
                dict(causal=False, window=257, tiny_window=6)),
}


def _attention_mask(case: str, size: str) -> dict:
    spec = dict(ATTENTION_CASES[case][1])
    tiny_window = spec.pop("tiny_window", None)
    if size == "tiny" and tiny_window:
        spec["window"] = tiny_window
    spec.setdefault("window", None)
    spec.setdefault("softcap", None)
    return spec


def _attention_make(case: str):
    def make(device, dtype, size):
        B, H, K, T, D = ATTENTION_CASES[case][0][size]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, n, T, D, generator=g).to(device, dtype) for n in (H, K, K))
        return {"q": q, "k": k, "v": v, "mask": _attention_mask(case, size)}
    return make


def _visible_pairs(T: int, causal: bool, window: int | None) -> int:
    """(query, key) pairs the mask lets through: the work any implementation that skips nothing
    invisible must do (`index_mask`'s rule, counted row by row)."""
    i = torch.arange(T, dtype=torch.float64)
    lo = torch.zeros_like(i) if window is None else (i - window + 1).clamp(min=0)
    hi = i if causal else (torch.full_like(i, T - 1) if window is None else (i + window - 1).clamp(max=T - 1))
    return int((hi - lo + 1).sum())


def _attention_flops(backward: bool):
    def n(inputs):
        B, H, T, D = inputs["q"].shape
        m = inputs["mask"]
        fwd = 4 * B * H * D * _visible_pairs(T, m["causal"], m["window"])  # q kᵀ and p v, 2 flops per multiply-add
        return int(fwd * (3.5 if backward else 1))  # the backward recomputes q kᵀ and does 4 more products
    return n


def _attention_impls(backward: bool):
    from .attention import flash_attention, reference

    def wrap(run):
        def factory(inputs):
            q, k, v, m = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
            if not backward:
                return lambda: run(q, k, v, m)
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return fwd_bwd(lambda: run(q, k, v, m), [q, k, v])
        return factory

    def eager(q, k, v, m):  # the model's own path: SDPA over attention_blocks, explicit scores under a soft-cap
        return reference(q, k, v, scale=q.shape[-1] ** -0.5, softcap=m["softcap"], causal=m["causal"],
                         window=m["window"])

    def ours(q, k, v, m):
        return flash_attention(q, k, v, softcap=m["softcap"], causal=m["causal"], window=m["window"])

    def sdpa(inputs):
        need_gpu(inputs)
        m = inputs["mask"]
        if m["softcap"]:
            raise Unavailable("SDPA has no soft-cap")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        import torch.nn.functional as F

        T = inputs["q"].shape[2]
        if m["window"] is None:  # the flash backend: causal or no mask, GQA without copies
            def run(q, k, v, m):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=m["causal"], enable_gqa=True)
        else:  # flash takes no mask: the memory-efficient backend with a (T, T) boolean mask
            from minigemma.attention import index_mask

            idx = torch.arange(T, device=inputs["q"].device)
            bool_mask = index_mask(idx, idx, m["window"], causal=m["causal"])

            def run(q, k, v, m):
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, enable_gqa=True)
        return wrap(run)(inputs)

    def flex(inputs):
        need_gpu(inputs)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        m = inputs["mask"]
        T, W, causal, cap = inputs["q"].shape[2], m["window"], m["causal"], m["softcap"]

        def mask_mod(b, h, i, j):
            ok = (j <= i) if causal else (i >= 0)
            if W is not None:
                ok = ok & ((i - j).abs() < W)
            return ok

        block_mask = create_block_mask(mask_mod, None, None, T, T, device=inputs["q"].device)
        score_mod = (lambda s, b, h, i, j: cap * torch.tanh(s / cap)) if cap else None
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, m):
            return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
        return wrap(run)(inputs)

    def no_compile(inputs):
        raise Unavailable("see flex: FlexAttention is torch.compile's attention")

    return {"eager": wrap(eager), "compile": no_compile, "sdpa": sdpa, "flex": flex, "ours": wrap(ours)}


for _case in ATTENTION_CASES:
    for _bwd in ((False, True) if _case in ("causal-8K", "window512-8K") else (False,)):
        _B, _H, _K, _T, _D = ATTENTION_CASES[_case][0]["gpu"]
        _m = ATTENTION_CASES[_case][1]
        register(Entry(f"attention {_case} {'fwd+bwd' if _bwd else 'fwd'}",
                       f"q ({_B}, {_H}, {_T}, {_D}), k/v ({_B}, {_K}, {_T}, {_D})"
                       + (f", window {_m['window']}" if _m.get("window") else "")
                       + (", soft-cap 50" if _m.get("softcap") else "") + ("" if _m["causal"] else ", bidirectional"),
                       _attention_make(_case), _attention_impls(_bwd), flops=_attention_flops(_bwd),
                       notes={"eager": "the model's path: SDPA over attention_blocks (cost follows W)"}))

from . import bench_loss_gemv  # noqa: E402,F401  (registers the fused loss and int8/int4 GEMV entries)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
BUDGET_S = {"gpu": 1.0, "cpu": 1.0, "tiny": 0.1}  # CPU timing: seconds of repeats per measurement


def _time_ms(fn, device: str, budget_s: float = 1.0) -> float:
    """Median milliseconds of fn(): do_bench on a GPU, wall clock (perf_counter) on a CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times, budget = [], time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < budget and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ceilings(device: str, size: str) -> dict:
    """Copy bandwidth (GB/s) and matmul throughput, measured here and now."""
    out = {}
    n_bytes = {"gpu": 1 << 30, "cpu": 1 << 28, "tiny": 1 << 20}[size]
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), device, BUDGET_S[size])
    out["copy_GBps"] = 2 * n_bytes / ms / 1e6
    del x, y
    n = {"gpu": 8192, "cpu": 1024, "tiny": 64}[size]
    for dtype in ([torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = _time_ms(lambda: a @ b, device, BUDGET_S[size])
        out[f"matmul_{str(dtype).replace('torch.', '')}_TFLOPs"] = 2 * n ** 3 / ms / 1e9
    out["matmul_n"] = n
    out["copy_bytes"] = n_bytes
    return out


def run_entry(entry: Entry, device: str, size: str, only: set[str] | None = None) -> list[dict]:
    dtype = entry.dtype if device == "cuda" else torch.float32
    inputs = entry.make(device, dtype, size)
    shape_here = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items()
                           if isinstance(v, torch.Tensor) and v.dim() > 1)
    rows = []
    for impl, factory in entry.impls.items():
        row = {"op": entry.name, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "ms": None,
               "note": entry.notes.get(impl, ""), "shape_here": shape_here}
        if only is not None and impl not in only:
            continue
        try:
            if device == "cpu" and impl in ("ours", "liger"):
                raise Unavailable("not timed on CPU: the kernels run there only in Triton's interpreter"
                                  if impl == "ours" else "needs a GPU")
            fn = factory(inputs)
            if device == "cuda" and entry.peak_memory:
                fn()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["ms"] = _time_ms(fn, device, BUDGET_S[size])
        except Unavailable as e:
            row["note"] = str(e)
        except Exception as e:  # noqa: BLE001 - one broken implementation must not hide the others
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if row["ms"] is not None:
            if entry.nbytes is not None:
                row["GBps"] = entry.nbytes(inputs) / row["ms"] / 1e6
            if entry.flops is not None:
                row["TFLOPs"] = entry.flops(inputs) / row["ms"] / 1e9
        rows.append(row)
    base = next((r["ms"] for r in rows if r["impl"] == entry.baseline and r["ms"]), None)
    for r in rows:
        if r["ms"] and base:
            r["speedup"] = base / r["ms"]
    return rows


# --------------------------------------------------------------------------------------------
# End to end: the real models, torch and with the kernels swapped in (`use_triton`)
# --------------------------------------------------------------------------------------------
E2E = {
    "decode": "Gemma 3 270M bf16 greedy decode tok/s at batch 1 and 32, against the bandwidth roofline",
    "prefill": "Gemma 3 270M bf16 prefill tok/s of an 8,192-token prompt",
    "profile": "where one decode step's and one prefill's GPU time goes, kernel by kernel (torch.profiler)",
    "embed": "EmbeddingGemma 300M documents/s (~60 tokens, batch 32), against sentence-transformers",
}
E2E_SIZES = {  # size -> (decode prompt, decode steps, prefill T, documents)
    "gpu": (512, 64, 8192, 512),
    "tiny": (12, 4, 24, 8),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gemma(device: str, size: str):
    """Gemma 3 270M in bf16 on the GPU; size "tiny": a tiny random Gemma 3 in float32 (tests the code path)."""
    if size == "tiny":
        from minigemma.gemma import Gemma, GemmaConfig, layer_pattern

        torch.manual_seed(0)
        cfg = GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, layer_types=layer_pattern(6, 6),
                          sliding_window=8, query_pre_attn_scalar=16, use_qk_norm=True)
        return Gemma(cfg).to(device).eval()
    import minigemma

    model, _ = minigemma.load_pretrained("gemma3-270m", quant="bf16")
    return model.to(device).eval()


def _implementations(model, device: str):
    """("torch", "triton"): the same model object, the kernels swapped in for the second and out after."""
    from .swap import swap

    yield "torch"
    if device != "cuda":
        return
    swap(model)
    try:
        yield "triton"
    finally:
        swap(model, enable=False)


@torch.no_grad()
def _decode_step_ms(model, batch: int, prompt: int, steps: int, device: str, graph: bool = False) -> float:
    """Median ms of one greedy decode step after a `prompt`-token prefill, each step timed in the loop;
    graph: the step captured once and replayed (`kernels.graph.DecodeGraph`)."""
    from .graph import DecodeGraph

    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    cache = model.new_cache(batch, prompt + steps + 1)
    logits = model(ids, cache=cache, last_only=True)
    step = DecodeGraph(model, cache) if graph else None
    times = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t = time.perf_counter()
        logits = model(nxt, cache=cache, last_only=True) if step is None else step(nxt)[:, None]
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[len(times) // 4:])  # the first steps warm up


def e2e_decode(device: str, size: str, ceil: dict) -> list[dict]:
    from minigemma.gemma import kv_cache_bytes
    from minigemma.quant import weight_bytes_per_token

    prompt, steps, _, _ = E2E_SIZES[size]
    model = _gemma(device, size)
    dtype = next(p.dtype for p in model.parameters() if p.dim() > 1)
    weights = weight_bytes_per_token(model)
    rows = []
    for batch in (1, 32):
        kv = kv_cache_bytes(model.config, prompt + steps // 2, batch, dtype)  # read once per step, all rows
        roofline = batch / ((weights + kv) / (ceil["copy_GBps"] * 1e9))  # tok/s if only the bytes took time
        for impl in _implementations(model, device):
            for graph in ((False, True) if impl == "triton" else (False,)):
                ms = _decode_step_ms(model, batch, prompt, steps, device, graph)
                rows.append({"what": "decode", "impl": impl + (", CUDA graph" if graph else ""),
                             "setting": f"batch {batch}, {prompt}-token prompt", "value": batch / ms * 1e3,
                             "unit": "tok/s", "ceiling": roofline,
                             "note": f"roofline = (weights {weights / 1e6:.3g} MB + KV {kv / 1e6:.3g} MB) read "
                                     "per step at the copy bandwidth"})
        if device != "cuda":
            rows.append({"what": "decode", "impl": "triton", "setting": f"batch {batch}", "value": None,
                         "note": "not timed on CPU: the kernels run there only in Triton's interpreter"})
    return rows


@torch.no_grad()
def e2e_prefill(device: str, size: str, ceil: dict) -> list[dict]:
    _, _, T, _ = E2E_SIZES[size]
    model = _gemma(device, size)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for impl in _implementations(model, device):
        def run():
            return model(ids, cache=model.new_cache(1, T), last_only=True)
        ms = _time_ms(run, device, BUDGET_S.get(size, 1.0))
        rows.append({"what": "prefill", "impl": impl, "setting": f"{T} tokens, batch 1", "value": T / ms * 1e3,
                     "unit": "tok/s"})
    return rows


@torch.no_grad()
def e2e_profile(device: str, size: str, ceil: dict) -> list[dict]:
    if device != "cuda":
        return [{"what": "profile", "impl": "triton", "setting": "", "value": None, "note": "GPU only"}]
    from torch.profiler import ProfilerActivity, profile

    prompt, _, T, _ = E2E_SIZES[size]
    model = _gemma(device, size)
    rows = []
    for impl in _implementations(model, device):
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2)).to(device)
        for phase in ("decode", "prefill"):
            cache = model.new_cache(1, T + 2)
            if phase == "decode":  # the prompt first, outside the profile: one step is profiled
                nxt = model(ids[:, :prompt], cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(nxt if phase == "decode" else ids, cache=cache, last_only=True)
                _sync(device)
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            total = sum(e.device_time_total for e in events)
            for e in sorted(events, key=lambda e: -e.device_time_total)[:10]:
                rows.append({"what": f"profile {phase}", "impl": impl, "setting": e.key[:60],
                             "value": e.device_time_total / 1e3, "unit": "ms",
                             "note": f"{100 * e.device_time_total / total:.0f}% of GPU time, {e.count} launches"})
    return rows


def e2e_embed(device: str, size: str, ceil: dict) -> list[dict]:
    _, _, _, n_docs = E2E_SIZES[size]
    if size == "tiny":
        return [{"what": "embed", "impl": "torch", "setting": "", "value": None,
                 "note": "needs the real EmbeddingGemma folder: GPU size only"}]
    import minigemma
    from minigemma.bench.common import benchmark_texts
    from minigemma.weights.fetch import path

    encoder, tok = minigemma.load_pretrained("embeddinggemma-300m")
    encoder = encoder.to(device).eval()
    texts = benchmark_texts(tok, [60], [n_docs])[60]
    rows = []
    for impl in _implementations(encoder, device):
        encoder.encode(texts[:32], prompt_name="document")  # warm-up
        _sync(device)
        t = time.perf_counter()
        encoder.encode(texts, prompt_name="document")
        _sync(device)
        rows.append({"what": "embed", "impl": impl, "setting": f"{n_docs} documents of ~60 tokens, batch 32",
                     "value": n_docs / (time.perf_counter() - t), "unit": "docs/s"})
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        rows.append({"what": "embed", "impl": "sentence-transformers", "setting": "", "value": None,
                     "note": "not installed (pip install -e '.[test]')"})
        return rows
    st = SentenceTransformer(str(path("embeddinggemma-300m")), device=device)
    st.encode(texts[:32], prompt_name="document", batch_size=32)
    _sync(device)
    t = time.perf_counter()
    st.encode(texts, prompt_name="document", batch_size=32)
    _sync(device)
    rows.append({"what": "embed", "impl": "sentence-transformers", "setting": "float32, batch 32",
                 "value": n_docs / (time.perf_counter() - t), "unit": "docs/s"})
    return rows


E2E_RUNS = {"decode": e2e_decode, "prefill": e2e_prefill, "profile": e2e_profile, "embed": e2e_embed}


def run_e2e(name: str, device: str, size: str, ceil: dict) -> list[dict]:
    """One end-to-end benchmark; a failure becomes a row saying so, never a crash of the whole report."""
    try:
        return E2E_RUNS[name](device, size, ceil)
    except Exception as e:  # noqa: BLE001
        return [{"what": name, "impl": "", "setting": "", "value": None,
                 "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_report(rep: dict) -> str:
    lines = [f"# Kernel benchmarks: {rep['device']}", "",
             f"- command: `{rep['command']}`", f"- date: {rep['date']}",
             f"- torch {rep['torch']}, triton {rep['triton']}, {rep['cpu_count']} CPU cores, "
             f"load average {rep['load']} when it started", ""]
    if rep["kind"] == "cpu":
        lines += ["**CPU only, no GPU.** Times are wall-clock medians of torch eager and torch.compile on this CPU, "
                  "at the smaller `cpu` sizes; the Triton kernels are not timed (here they run only in Triton's "
                  "interpreter), and no figure below says anything about a GPU. At these sizes the data can sit "
                  "in the CPU's caches, so a share of the copy bandwidth above 100% is possible.", ""]
    c = rep["ceilings"]
    lines += ["## Ceilings measured on this device", "",
              f"- copy: {c['copy_GBps']:.1f} GB/s ({c['copy_bytes'] / 2**20:.0f} MiB copied, read + write counted)"]
    lines += [f"- {k.replace('_TFLOPs', '').replace('_', ' ')} ({c['matmul_n']}³): {v:.2f} TFLOP/s"
              for k, v in c.items() if k.endswith("TFLOPs")]
    lines += ["", "## Ops", "",
              "Memory-bound ops: GB/s of their minimum traffic, as a share of the copy bandwidth. Attention: "
              "TFLOP/s of the products over the (query, key) pairs its mask lets through, as a share of the "
              "matmul ceiling in its dtype.", "",
              "| op | shape | impl | dtype | median ms | throughput | % of ceiling | vs eager | note |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rep["rows"]:
        ms = f"{r['ms']:.4g}" if r.get("ms") else "—"
        thr = pct = ""
        if r.get("GBps"):
            thr, pct = f"{r['GBps']:.3g} GB/s", f"{100 * r['GBps'] / c['copy_GBps']:.0f}%"
        elif r.get("TFLOPs"):
            top = c.get(f"matmul_{r['dtype']}_TFLOPs")
            thr, pct = f"{r['TFLOPs']:.3g} TFLOP/s", f"{100 * r['TFLOPs'] / top:.0f}%" if top else ""
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        note = r.get("note", "") + (f" peak {r['peak_MiB']:.0f} MiB" if r.get("peak_MiB") is not None else "")
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['dtype']} | {ms} | {thr} | {pct} | {sp} "
                     f"| {note} |")
    if rep.get("e2e"):
        lines += ["", "## End to end", "", "| benchmark | impl | setting | value | ceiling | % of ceiling | note |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in rep["e2e"]:
            val = f"{r['value']:.4g} {r.get('unit', '')}" if r.get("value") is not None else "—"
            top = f"{r['ceiling']:.4g} {r.get('unit', '')}" if r.get("ceiling") else ""
            pct = f"{100 * r['value'] / r['ceiling']:.0f}%" if r.get("ceiling") and r.get("value") else ""
            lines.append(f"| {r['what']} | {r['impl']} | {r['setting']} | {val} | {top} | {pct} "
                         f"| {r.get('note', '')} |")
    if PENDING:
        lines += ["", "Not built yet: " + "; ".join(f"`{k}` ({v})" for k, v in PENDING.items()) + "."]
    return "\n".join(lines) + "\n"


def _save(rep: dict, folder: str) -> list[Path]:
    out = Path(folder)
    slug = "".join(ch if ch.isalnum() else "-" for ch in rep["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stem = out / f"kernels-{'cpu-' if rep['kind'] == 'cpu' else ''}{slug}-{rep['date'][:10]}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    for p, text in zip(paths, (json.dumps(rep, indent=1) + "\n", format_report(rep))):
        write_atomic(p, text)
    return paths


def print_plan(args) -> int:
    """`--plan`: the cost model of the kernels at Gemma 3 270M's shapes, printed; nothing runs on a device."""
    from minigemma.gemma import PRESETS

    from . import cost

    unknown = sorted(set(args.gpu.split(",")) - set(cost.GPUS))
    if unknown:
        raise SystemExit(f"--gpu: unknown {unknown}; choose from {sorted(cost.GPUS)}")
    plans = cost.plans(PRESETS["gemma3-270m"], contexts=[int(n) for n in args.context.split(",") if n],
                       prefill_tokens=[int(n) for n in args.prefill.split(",") if n],
                       gpus=[cost.GPUS[g] for g in args.gpu.split(",")],
                       launch_us=cost.LAUNCH_US if args.launch_us is None else args.launch_us)
    print(json.dumps(cost.as_json(plans), indent=1) if args.json else cost.report(plans))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m minigemma.kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="", help="comma-separated op names (e.g. rms_norm,rglru_scan); default all")
    ap.add_argument("--impls", default="", help="comma-separated implementations; default all")
    ap.add_argument("--cpu", action="store_true", help="no GPU: time torch eager and torch.compile on the CPU")
    ap.add_argument("--size", choices=["gpu", "cpu", "tiny"], default=None,
                    help="problem sizes (default: the device's)")
    ap.add_argument("--save", default="", help="folder for kernels-<device>-<date>.md/.json ('' = do not save)")
    ap.add_argument("--plan", action="store_true",
                    help="run nothing: print the cost model's prediction for Gemma 3 270M (kernels.cost)")
    ap.add_argument("--json", action="store_true", help="with --plan: the prediction as JSON")
    ap.add_argument("--gpu", default="h100,a100", help="with --plan: GPUs to predict for (h100, a100)")
    ap.add_argument("--context", default="512,8192", help="with --plan: cached tokens before a decode step")
    ap.add_argument("--prefill", default="8192", help="with --plan: prompt lengths of a prefill")
    ap.add_argument("--launch-us", type=float, default=None, help="with --plan: µs per launch (default 4)")
    args = ap.parse_args(argv)
    if args.plan:
        return print_plan(args)
    ops = [o for o in args.ops.split(",") if o]
    known = sorted({e.name.split()[0] for e in ENTRIES} | set(E2E))
    unknown = sorted(set(ops) - set(known))
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {known}")
    entries = [e for e in ENTRIES if not ops or e.name.split()[0] in ops]
    e2e = [n for n in E2E if not ops or n in ops]
    only = {i for i in args.impls.split(",") if i} or None

    import triton

    print(f"minigemma kernel benchmarks · torch {torch.__version__} · triton {triton.__version__}")
    if not GPU and not args.cpu:
        print(f"No GPU here (torch.cuda.is_available() is False; CPU: {device_name()}).\n"
              "Nothing was measured: the Triton kernels run on this machine only in Triton's interpreter "
              "(numpy on the CPU), whose speed says nothing about the kernels, and no GPU figure is reported.\n"
              "Their correctness is tested here all the same: pytest tests/test_kernels_*.py.\n"
              "To time torch eager and torch.compile on this CPU instead (labelled as CPU timings): --cpu")
        print("Registered ops: " + ", ".join(e.name for e in entries))
        print("End to end, with the kernels swapped into the real models (GPU): " + ", ".join(e2e))
        if PENDING:
            print("Not built yet: " + "; ".join(f"{k} ({v})" for k, v in PENDING.items()))
        if args.save:
            print("Nothing measured, nothing saved.")
        return 0

    device = "cuda" if GPU else "cpu"
    size = args.size or ("gpu" if GPU else "cpu")
    rep = {"kind": "gpu" if GPU else "cpu", "device": device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python -m minigemma.kernels.bench " + " ".join(argv), "size": size,
           "cpu_count": os.cpu_count(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    if not GPU:
        print(f"No GPU: timing torch eager and torch.compile on this CPU ({rep['device']}), size '{size}'. "
              "These are CPU timings; the Triton kernels are not timed.")
    print("measuring the device's ceilings ...", flush=True)
    rep["ceilings"] = ceilings(device, size)
    rep["rows"] = []
    for e in entries:
        print(f"timing {e.name} ...", flush=True)
        for r in run_entry(e, device, size, only):
            r["shape"] = e.shape if size == "gpu" else r.pop("shape_here")
            rep["rows"].append(r)
    rep["e2e"] = []
    for name in e2e:
        if size not in E2E_SIZES:  # the CPU's own end-to-end figures come from chapter 06's and 10's benchmarks
            rep["e2e"].append({"what": name, "impl": "", "setting": "", "value": None,
                               "note": "GPU (or --size tiny); CPU figures: python -m minigemma bench generate, "
                                       "bench embed"})
            continue
        print(f"end to end: {name} ...", flush=True)
        rep["e2e"] += run_e2e(name, device, size, rep["ceilings"])
    text = format_report(rep)
    print()
    print(text)
    if args.save:
        for p in _save(rep, args.save):
            print(f"saved {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
