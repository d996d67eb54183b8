"""`python -m minigemma.kernels.aot`: every kernel compiled ahead of time for H100 and A100, no GPU needed.

The interpreter (TRITON_INTERPRET=1, the CPU tests) is lax: it runs Python, so it accepts what the
real compiler refuses (a plain Python float read as a global inside @triton.jit code), never allocates
shared memory and never runs out of registers. This module runs the real compiler instead, for the
launch configurations the package would choose on each GPU: the launchers pick tiles, warps, stages and
splits from a `utils.DeviceProps` (SM count, shared memory per block, capability), so this machine
computes what an H100 (sm_90) or an A100 (sm_80) would run, and Triton compiles it to PTX and a cubin
without a device. The shipped `ptxas -v` then reports registers and spills.

Shapes: Gemma 3 270M, EmbeddingGemma 300M (the 270M stack, bidirectional), every published Gemma 2 and
Gemma 3 config (`gemma.PRESETS`, head_dim 128 and 256) and RecurrentGemma 2B; training (forward and
backward, packed documents) and decoding (batch 1 and 8, cache 8192); bfloat16 and float32.
Identical compiles are done once (the table says which models use each).

Each row: compiles or not (the error), registers per thread, spill stores/loads (bytes per thread),
shared memory per program, resident programs per SM (from registers, shared memory and threads), and
what `tl.dot` became: `wgmma` (Hopper's asynchronous warpgroup MMA), `mma` (mma.sync, Ampere's tensor
cores), `fma` (float32 "ieee" products on the CUDA cores; expected for float32) or `-` (no dot).

It exits non-zero when a kernel does not compile, needs more shared memory than the target allows one
program, or spills in a forward or decode kernel. Backward kernels get a budget of
BACKWARD_SPILL_BYTES spill stores per thread: they hold two (BLOCK_N, D) float32 accumulators (dK, dV)
plus a recomputed P and dS tile and two operand tiles, so at head_dim 256 a few spilled registers are
the price of tiles large enough to use the tensor cores; a spill is a store to local memory that L1
keeps, run once per loop trip, small next to the four matrix products of that trip. Above the budget
the spills are a design problem (the tiles or warps are wrong), and the check fails. float32
backward ("ieee" FMA products, training a float32 reference) is reported but only held to the same
budget when `--strict-fp32` is given: it is the correctness path, not the fast one.

Results: the table is printed and written to docs/benchmarks/kernels-aot.md and .json. Triton's cache
(TRITON_CACHE_DIR, default ~/.cache/minigemma/triton-aot/triton) and this module's own per-compile
results (~/.cache/minigemma/triton-aot/results, keyed by the kernels' sources and Triton's version)
make a second run fast; a run from nothing works too.

The compiler must be the real one: `import minigemma.kernels` turns the interpreter on where there is
no GPU, so the compiles run in worker processes started with TRITON_INTERPRET=0, where @triton.jit
gives real JITFunctions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_atomic

BACKWARD_SPILL_BYTES = 256  # spill stores per thread allowed in a backward kernel (see above)
CACHE = Path(os.environ.get("MINIGEMMA_AOT_CACHE", Path.home() / ".cache" / "minigemma" / "triton-aot"))
ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("sm_90", "sm_80")


# --------------------------------------------------------------------------------------------
# Jobs: one compile each
# --------------------------------------------------------------------------------------------
@dataclass
class Job:
    kernel: str  # "module:function" (module a dotted name, or a path to a .py file)
    kind: str  # forward, backward or decode
    target: str  # sm_90 or sm_80
    types: dict  # argument name -> Triton type ("*bf16", "i32", "fp32"); constexprs are given in `constexprs`
    constexprs: dict
    num_warps: int
    num_stages: int
    used_by: list = field(default_factory=list)

    def key(self) -> str:
        return json.dumps([self.kernel, self.target, sorted(self.types.items()), sorted(self.constexprs.items()),
                           self.num_warps, self.num_stages], default=str)


def tl_name(v):
    """A constexpr as it goes into the table and the compile: tl dtypes by name."""
    return str(v).replace("triton.language.", "") if not isinstance(v, (bool, int, float, str)) else v


def _t(dtype: str) -> str:
    return {"bf16": "*bf16", "fp32": "*fp32"}[dtype]


def model_shapes():
    """(name, dict of what the kernels see) for every model of the matrix."""
    from minigemma import gemma, griffin

    out = []
    for name, c in gemma.PRESETS.items():
        out.append((name, dict(C=c.hidden_size, F=c.intermediate_size, H=c.num_attention_heads,
                               K=c.num_key_value_heads, D=c.head_dim, V=c.vocab_size, rotary=c.head_dim,
                               softcap=c.family == "gemma2", causal=True, qk_norm=c.family == "gemma3",
                               windowed=True, glob=True, decoder=True, rglru=0)))
    c = gemma.PRESETS["gemma3-270m"]  # EmbeddingGemma 300M: the 270M stack, bidirectional (docs: padding)
    out.append(("embeddinggemma-300m", dict(C=768, F=1152, H=3, K=1, D=256, V=262_144, rotary=256, softcap=False,
                                            causal=False, qk_norm=True, windowed=True, glob=True, decoder=False,
                                            rglru=0)))
    g = griffin.PRESETS["recurrentgemma-2b"]
    out.append(("recurrentgemma-2b", dict(C=g.width, F=g.mlp_expanded_width, H=g.num_heads, K=1, D=g.head_dim,
                                          V=256_000, rotary=int(g.head_dim * g.partial_rotary_factor),
                                          softcap=False, causal=True, qk_norm=False, windowed=True, glob=False,
                                          decoder=True, rglru=g.lru_width)))
    return out


TRAIN_ROWS, TRAIN_T, DECODE_BATCHES, CACHE_LEN = 8 * 2048, 2048, (1, 8), 8192


def jobs_for(props, target: str, models: tuple[str, ...] | None = None,
             dtypes: tuple[str, ...] = ("bf16", "fp32")) -> list[Job]:
    """Every compile the package would ask for on a GPU with these props (for these models and dtypes)."""
    import triton

    from minigemma.quant import int4_block_rows

    from . import attention as A
    from . import fused_linear_loss as FL
    from .decode_layer import blocks as DLB
    from . import geglu as GG
    from . import gemv as GV
    from . import rms_norm as RN
    from . import rope as RP
    from .utils import num_warps

    jobs: list[Job] = []

    def add(kernel, kind, types, constexprs, warps, stages, who):
        jobs.append(Job(kernel, kind, target, types, {k: tl_name(v) for k, v in constexprs.items()}, warps,
                        stages, [who]))

    m = "minigemma.kernels."
    for name, s in model_shapes():
        if models is not None and name not in models:
            continue
        for dt in dtypes:
            P = _t(dt)
            elem = 2 if dt == "bf16" else 4
            prec = "ieee" if dt == "fp32" else "tf32"
            D, H, K = s["D"], s["H"], s["K"]
            BLOCK_D = max(16, triton.next_power_of_2(D))
            who = f"{name} {dt}"
            # ---- attention: training (packed documents, forward + backward) and prefill; decode
            masks = []
            if s["decoder"]:
                if s["glob"]:
                    masks.append(dict(CAUSAL=True, WINDOW=False))
                masks.append(dict(CAUSAL=True, WINDOW=True))
            else:
                masks += [dict(CAUSAL=False, WINDOW=False), dict(CAUSAL=False, WINDOW=True)]
            for mk in masks:
                train = dict(mk, SOFTCAP=s["softcap"], PACKED=s["decoder"], DOCS=not s["decoder"], PRECISION=prec)
                prefill = dict(mk, SOFTCAP=s["softcap"], PACKED=False, DOCS=not s["decoder"], PRECISION=prec)
                pos_t = "*i64" if s["decoder"] else "*i32"
                for flags, phase in ((train, "training"), (prefill, "prefill")):
                    bm, bn, w, st = A.blocks(D, None, None, None, props=props, elem=elem)
                    types = dict(Q=P, K=P, V=P, O=P, LSE="*fp32", POS=pos_t if flags["PACKED"] else "*i32",
                                 DOC="*i64" if flags["DOCS"] else "*i32", TILES="*fp32", scale="fp32",
                                 softcap="fp32")
                    add(m + "attention:_fwd_kernel", "forward", types,
                        dict(D=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, COUNT=False, **flags), w, st,
                        f"{who} {phase}")
                bm, bn, w, st = A.blocks(D, None, None, None, props=props, backward=True, elem=elem)
                types = dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DK=P, DV=P,
                             POS="*i64" if train["PACKED"] else "*i32", DOC="*i64" if train["DOCS"] else "*i32",
                             scale="fp32", softcap="fp32")
                cx = dict(D=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, **train)
                add(m + "attention:_bwd_dkdv_kernel", "backward", types, cx, w, st, f"{who} training")
                types = {k: v for k, v in types.items() if k not in ("DK", "DV")} | dict(DQ=P)
                add(m + "attention:_bwd_dq_kernel", "backward", types, cx, w, st, f"{who} training")
            if s["decoder"]:
                for ring in ([False] if not s["windowed"] else [False, True] if s["glob"] else [True]):
                    bn, w, st = A.decode_blocks(D, None, None, props=props, elem=elem)
                    G = H // K
                    # module by module: the host's index, a ring's slot indices read; the fused step (Gemma):
                    # the index read from the device, a ring's slot indices derived from it
                    for indexed in (False, True) if not s["rglru"] else (False,):
                        types = dict(Q=P, K=P, V=P, K_IDX="*i64" if ring and not indexed else "*i32", POS="*i32",
                                     INDEX="*i64" if indexed else "*i32", O_PART="*fp32", LSE_PART="*fp32",
                                     scale="fp32", softcap="fp32")
                        add(m + "attention:_decode_kernel", "decode", types,
                            dict(D=D, BLOCK_D=BLOCK_D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=bn,
                                 CAUSAL=True, WINDOW=ring, SOFTCAP=s["softcap"], PACKED=False, RING=ring,
                                 INDEXED=indexed, PRECISION=prec), w, st,
                            f"{who} decode" + (", fused step" if indexed else ""))
                    for batch in DECODE_BATCHES:
                        S = CACHE_LEN if not ring else 4096
                        n = A.decode_splits(batch, K, S, bn, A.target_programs(None, props))
                        kps = triton.cdiv(triton.cdiv(S, n), bn) * bn
                        n = triton.cdiv(S, kps)
                        cx = A.combine_config(n, D)
                        add(m + "attention:_combine_kernel", "decode", dict(O_PART="*fp32", LSE_PART="*fp32", O=P),
                            cx, 4, 3, f"{who} decode B={batch}")
            # ---- RMSNorm (the model width; QK-norm over head_dim), GeGLU, RoPE
            widths = [s["C"]] + ([D] if s["qk_norm"] else [])
            for C in widths:
                for rows, phase in ((TRAIN_ROWS, "training"), (DECODE_BATCHES[0], "decode"),
                                    (DECODE_BATCHES[1], "decode")):
                    n_rows = rows * (H if C == D else 1)
                    BR, BC = RN.block_sizes(n_rows, C)
                    types = dict(X=P, W="*fp32", Y=P, RSTD="*fp32", eps="fp32")
                    kind = "decode" if phase == "decode" else "forward"
                    add(m + "rms_norm:_rms_norm_fwd_kernel", kind, types, dict(BLOCK_R=BR, BLOCK_C=BC),
                        num_warps(BR * BC), 3, f"{who} {phase}")
                    if phase == "training":
                        types = dict(DY=P, X=P, W="*fp32", RSTD="*fp32", DX=P, DW_PART="*fp32")
                        add(m + "rms_norm:_rms_norm_bwd_kernel", "backward", types, dict(BLOCK_R=BR, BLOCK_C=BC),
                            num_warps(BR * BC), 3, f"{who} {phase}")
            for rows, phase in ((TRAIN_ROWS, "training"), (DECODE_BATCHES[0], "decode"), (DECODE_BATCHES[1], "decode")):
                grid, kw = GG.launch_config(rows, s["F"])
                cx = dict(BLOCK_R=kw["BLOCK_R"], BLOCK_F=kw["BLOCK_F"])
                add(m + "geglu:_geglu_fwd_kernel", "decode" if phase == "decode" else "forward",
                    dict(GU=P, OUT=P), cx, kw["num_warps"], 3, f"{who} {phase}")
                if phase == "training":
                    add(m + "geglu:_geglu_bwd_kernel", "backward", dict(DY=P, GU=P, DGU=P), cx, kw["num_warps"], 3,
                        f"{who} {phase}")
            half = s["rotary"] // 2
            for T, phase in ((TRAIN_T, "training"), (1, "decode")):
                BH = triton.next_power_of_2(half)
                BP = triton.next_power_of_2(D - 2 * half) if D > 2 * half else 0
                BT = max(1, min(triton.next_power_of_2(T), 2048 // BH))
                for sign in ((1, -1) if phase == "training" else (1,)):
                    add(m + "rope:_rope_kernel", "backward" if sign < 0 else "decode" if phase == "decode"
                        else "forward", dict(X=P, POS="*i64", INV_FREQ="*fp32", OUT=P),
                        dict(SIGN=sign, HALF=half, BLOCK_T=BT, BLOCK_H=BH, BLOCK_P=BP), num_warps(BT * BH), 3,
                        f"{who} {phase}")
            # ---- RG-LRU scan (Griffin): float32 state; a and x in the activations' dtype
            if s["rglru"]:
                R = s["rglru"]
                BD = min(128, triton.next_power_of_2(R))
                for summary in (True, False):
                    for reverse in (False, True):
                        types = dict(A="*fp32", X=P if not reverse else "*fp32", R="*i1", CARRY="*fp32",
                                     Y="*fp32" if not reverse else P, A_SUM="*fp32", H_SUM="*fp32", H_LAST="*fp32",
                                     H="*fp32", H0="*fp32", DA="*fp32")
                        add(m + "rglru_scan:_chunk_kernel", "backward" if reverse else "forward", types,
                            dict(SUMMARY=summary, REVERSE=reverse, HAS_RESET=True, HAS_H0=reverse, CHUNK=64,
                                 BLOCK_D=BD), num_warps(BD * 8), 3, f"{who} training")
                add(m + "rglru_scan:_carry_kernel", "forward",
                    dict(A_SUM="*fp32", H_SUM="*fp32", H0="*fp32", CARRY="*fp32"),
                    dict(HAS_H0=False, BLOCK_D=BD), num_warps(BD * 8), 3, f"{who} training")
            # ---- the fused LM head + loss (training): labels, and Gemma 3's sampled distillation
            bv, lw = FL.launch_config(s["V"], None, props)
            for k_ids, teacher in ((1, False), (256, False), (1, True)):
                types = dict(Z="*fp32", ZT="*fp32" if not teacher else P, IDS="*i64", WTS="*fp32", VALID="*fp32",
                             LOSS="*fp32", softcap="fp32", softcap_t="fp32", scale="fp32")
                add(m + "fused_linear_loss:_loss_kernel", "forward", types,
                    dict(SOFTCAP=s["softcap"], SOFTCAP_T=teacher and s["softcap"], TEACHER=teacher, GRAD=True,
                         BLOCK_V=bv, BLOCK_K=max(16, triton.next_power_of_2(k_ids))), lw, 3, f"{who} training")
            # ---- the fused decode step of a Gemma layer (kernels.decode_layer): bf16 or float32 weights
            if s["decoder"] and not s["rglru"]:
                DL = "decode_layer:"
                dt_tl = "bfloat16" if dt == "bf16" else "float32"
                N32 = "*fp32"  # norm weights and RoPE frequencies
                for has_delta in (False, True):  # the first layer reads the embedding; the others a pending residual
                    cfg = DLB("qkv", D, interpret=False)
                    add(m + DL + "_qkv_kernel", "decode",
                        dict(R=P, DELTA=P, W_POST=N32, W_IN=N32, X_OUT=P, W=P, QN=N32, KN=N32, POS="*i64",
                             INV_FREQ=N32, INDEX="*i64", Q=P, K_CACHE=P, V_CACHE=P, eps_post="fp32", eps="fp32",
                             eps_qk="fp32"),
                        dict(DTYPE=dt_tl, HAS_DELTA=has_delta, POST_NORM=True, QK_NORM=s["qk_norm"], HALF=D // 2,
                             BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"], 3, f"{who} decode")
                cfg = DLB("o_proj", D, interpret=False)
                add(m + DL + "_o_proj_kernel", "decode", dict(O_PART="*fp32", LSE_PART="*fp32", W=P, Y=P),
                    dict(DTYPE=dt_tl, D=D, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                         BLOCK_SPLITS=A.COMBINE_SPLITS), cfg["num_warps"], 3, f"{who} decode")
                cfg = DLB("gate_up", D, interpret=False)
                add(m + DL + "_gate_up_kernel", "decode",
                    dict(R=P, DELTA=P, W_POST=N32, W_PRE=N32, H_OUT=P, W=P, Y=P, eps_post="fp32", eps="fp32"),
                    dict(DTYPE=dt_tl, POST_NORM=True, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"]),
                    cfg["num_warps"], 3, f"{who} decode")
                cfg = DLB("down", D, interpret=False)
                add(m + DL + "_down_kernel", "decode", dict(X=P, W=P, Y=P),
                    dict(DTYPE=dt_tl, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"], 3,
                    f"{who} decode")
                cfg = DLB("residual", D, interpret=False)
                for norm in (True, False):  # the trunk's last kernel; a layer run on its own
                    add(m + DL + "_residual_kernel", "decode",
                        dict(R=P, DELTA=P, W_POST=N32, W_NORM=N32, Y=P, eps_post="fp32", eps="fp32"),
                        dict(DTYPE=dt_tl, POST_NORM=True, NORM=norm, BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"], 3,
                        f"{who} decode")
            # ---- weight-only int8 / int4 GEMVs (decode), every linear layer of the model and the head
            if s["decoder"]:
                C, F, V = s["C"], s["F"], s["V"]
                linears = [((H + 2 * K) * D, C), (C, H * D), (2 * F, C), (C, F), (V, C)]
                if s["rglru"]:
                    linears = [(2 * s["rglru"], C), (C, s["rglru"]), (2 * F, C), (C, F), (V, C)]
                half_rows = int4_block_rows() // 2
                x_dtype = __import__("torch").bfloat16 if dt == "bf16" else __import__("torch").float32
                for batch in DECODE_BATCHES:
                    for N, Kd in linears:
                        BM, BN, BK, split, grid, dot, precision, warps = GV.launch_config(batch, N, Kd, x_dtype, None, 64,
                                                                                   None, None, props=props)
                        y = "*fp32" if split > 1 else P
                        add(m + "gemv:_gemv_int8_kernel", "decode",
                            dict(X=P, Q="*i8", S="*bf16", B="*bf16", Y=y),
                            dict(HAS_BIAS=False, SPLIT_K=split, DOT=dot, PRECISION=precision, BLOCK_M=BM,
                                 BLOCK_N=BN, BLOCK_K=BK), warps, 3, f"{who} decode B={batch}")
                        BM, BN, BK, split, grid, dot, precision, warps = GV.launch_config(batch, N, Kd, x_dtype, None, 32,
                                                                                   None, None, props=props)
                        add(m + "gemv:_gemv_int4_kernel", "decode",
                            dict(X=P, PK="*u8", SZ="*bf16", B="*bf16", Y="*fp32" if split > 1 else P),
                            dict(HAS_BIAS=False, SPLIT_K=split, DOT=dot, PRECISION=precision, HALF=half_rows,
                                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK), warps, 3, f"{who} decode B={batch}")
    return jobs


def representative(jobs: list[Job]) -> list[Job]:
    """One job per (kernel, kind, dtype): the first the matrix asks for (the CI's quick subset)."""
    seen, out = set(), []
    for j in jobs:
        k = (j.kernel, j.kind, _dtype(j))
        if k not in seen:
            seen.add(k)
            out.append(j)
    return out


def check(jobs: list[Job], props_by_target: dict, workers: int = 2, use_cache: bool = True,
          strict_fp32: bool = False) -> list[dict]:
    """Compile `jobs` and judge them: the table's rows (a row with `problems` fails the check)."""
    return rows(jobs, run_jobs(jobs, workers, use_cache), props_by_target, strict_fp32)


def dedupe(jobs: list[Job]) -> list[Job]:
    seen: dict[str, Job] = {}
    for j in jobs:
        k = j.key()
        if k in seen:
            for w in j.used_by:
                if w not in seen[k].used_by:
                    seen[k].used_by.append(w)
        else:
            seen[k] = j
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# One compile (in a worker process with TRITON_INTERPRET=0)
# --------------------------------------------------------------------------------------------
def _load_kernel(spec: str):
    mod, fn = spec.rsplit(":", 1)
    if mod.endswith(".py"):
        import importlib.util

        sp = importlib.util.spec_from_file_location(Path(mod).stem + "_aot", mod)
        module = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(module)
    else:
        import importlib

        module = importlib.import_module(mod)
    return getattr(module, fn)


def _aligned(name: str, ty: str) -> bool:
    """Would the JIT mark this argument divisible by 16? Pointers: torch allocates 16-byte aligned blocks
    (views at odd offsets aside). Strides: every model of the matrix has widths and head dims that are
    multiples of 16, so every row stride is; sizes (T, S, N, ...) vary and are left unmarked."""
    return ty.startswith("*") or name.startswith(("s_", "stride"))


def _signature(fn, types: dict, constexprs: dict):
    """(signature, constexprs, attrs) for ASTSource, with the JIT's divisibility specialisation."""
    import triton.language as tl

    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
            v = constexprs[n]
            names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16",
                     "float16": "float16", "float32": "float32"}
            if isinstance(v, str) and n != "PRECISION" and v in names:  # a tl dtype, by its name
                v = getattr(tl, names[v])
            cx[n] = v
        elif n in constexprs:  # a runtime argument the JIT compiles as a constant (an int equal to 1)
            sig[n], cx[n] = "constexpr", constexprs[n]
        else:  # "i32:16" / "i32:1": said outright whether the JIT would see a multiple of 16 (`gpu_report`)
            sig[n], said, div = types.get(n, "i32").partition(":")
            if (div == "16" if said else _aligned(n, sig[n])) and sig[n] != "fp32":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def _ptx_facts(ptx: str, has_dot: bool) -> dict:
    """What the PTX says: what `tl.dot` became (wgmma, mma, fma: float32 "ieee" products on the CUDA cores,
    or - for a kernel without one), and the global loads by width in bytes ({"16": 4, "4": 2}: four 128-bit
    load instructions and two 32-bit ones, per thread)."""
    dot = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else \
        ("fma" if has_dot else "-")
    loads: dict[int, int] = {}
    for vec, bits in re.findall(r"\bld\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        width = int(vec or 1) * int(bits) // 8
        loads[width] = loads.get(width, 0) + 1
    copies: dict[int, int] = {}  # cp.async: global -> shared memory without registers, what num_stages pipelines
    for width in re.findall(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[A-Za-z0-9_:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],"
                            r"\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        copies[int(width, 0)] = copies.get(int(width, 0), 0) + 1
    return dict(dot=dot, loads={str(k): v for k, v in sorted(loads.items())},
                async_copies={str(k): v for k, v in sorted(copies.items())},
                tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)))


def compile_one(job: dict) -> dict:
    """Compile one job; returns its report (never raises)."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = dict(ok=False, error=None, regs=None, spill_stores=None, spill_loads=None, shared=None, dot="-",
               seconds=None)
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = _load_kernel(job["kernel"])
        fn = getattr(fn, "fn", None) and fn  # a JITFunction
        if fn is None or not hasattr(fn, "params"):
            raise TypeError(f"{job['kernel']} is not a @triton.jit function (was TRITON_INTERPRET on?)")
        sig, cx, attrs = _signature(fn, job["types"], job["constexprs"])
        cap = int(job["target"].removeprefix("sm_"))
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", cap, 32),
                           options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        ptx = k.asm["ptx"]
        res["shared"] = int(k.metadata.shared)
        import inspect

        # the package's kernels with a tl.dot take PRECISION; another kernel (a learner's) is read from its source
        has_dot = "PRECISION" in job["constexprs"] or "tl.dot(" in inspect.getsource(fn.fn)
        res.update(_ptx_facts(ptx, has_dot))
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"
            p.write_text(ptx)
            from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

            # Triton's own ptxas for this target, with the flags Triton's make_cubin passes
            cmd = [get_ptxas(cap).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cap)}",
                   str(p), "-o", str(Path(d) / "k.cubin")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError("ptxas: " + out.stderr.strip()[-400:])
            log = out.stderr + out.stdout
        r = re.search(r"Used (\d+) registers", log)
        s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        res["regs"] = int(r.group(1)) if r else None
        res["spill_stores"], res["spill_loads"] = (int(s.group(1)), int(s.group(2))) if s else (0, 0)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - the report says what failed
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        # a CompilationError quotes the source first and says what went wrong at the end
        res["error"] = msg if len(msg) <= 300 else msg[:60] + " ... " + msg[-240:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _source_hash() -> str:
    """What a compile's result depends on besides its job: Triton's version, the modules that define
    @triton.jit code (a kernel and the helpers it calls) and this module's compile path. Host-only modules
    (the cost model, the benchmarks, the CUDA graph) are left out: editing them keeps the cache."""
    import inspect

    import triton

    h = hashlib.sha256(triton.__version__.encode())
    for p in sorted(Path(__file__).parent.glob("*.py")):
        text = p.read_bytes()
        if re.search(rb"^@triton\.jit", text, re.M):
            h.update(p.name.encode() + text)
    for fn in (compile_one, _signature, _aligned, _ptx_facts):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def _cache_key(job: Job, salt: str) -> str:
    extra = ""
    if job.kernel.split(":")[0].endswith(".py"):
        extra = hashlib.sha256(Path(job.kernel.split(":")[0]).read_bytes()).hexdigest()
    return hashlib.sha256((salt + extra + job.key()).encode()).hexdigest()[:24]


@contextmanager
def compiler_env():
    """The environment the spawned workers start with, set only while they start: this process (a test
    run, a notebook's kernels started from it) keeps its own TRITON_INTERPRET."""
    want = {"TRITON_INTERPRET": "0",  # the workers' @triton.jit must be the real compiler
            "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"),  # 3.9's default, said out loud
            "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", str(CACHE / "triton"))}
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_jobs(jobs: list[Job], workers: int, use_cache: bool = True) -> list[dict]:
    """Compile every job (cached results reused); returns one report per job, in order."""
    rdir = CACHE / "results"
    rdir.mkdir(parents=True, exist_ok=True)
    salt = _source_hash()
    results: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, j in enumerate(jobs):
        f = rdir / f"{_cache_key(j, salt)}.json"
        if use_cache and f.exists():
            results[i] = json.loads(f.read_text())
        else:
            todo.append(i)
    if todo:
        import multiprocessing as mp

        with compiler_env(), ProcessPoolExecutor(max_workers=max(1, workers),
                                                 mp_context=mp.get_context("spawn")) as ex:
            for i, res in zip(todo, ex.map(compile_one, [asdict(jobs[i]) for i in todo])):
                results[i] = res
                write_atomic(rdir / f"{_cache_key(jobs[i], salt)}.json", json.dumps(res))
    return results


# --------------------------------------------------------------------------------------------
# Judging and the table
# --------------------------------------------------------------------------------------------
def occupancy_limits(props, regs: int, warps: int, shared: int) -> dict[str, int]:
    """Programs per SM each resource allows: registers (allocated per warp in units of 256), shared memory
    (plus 1 KiB the driver reserves per program), threads, and the hardware's cap on programs."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    return {"registers": props.regs_per_sm // (per_warp * warps),
            "shared memory": props.smem_per_sm // (shared + 1024) if shared else props.max_blocks_per_sm,
            "threads": props.threads_per_sm // (32 * warps),
            "the hardware's cap on programs": props.max_blocks_per_sm}


def occupancy(props, regs: int, warps: int, shared: int) -> int:
    """Programs resident per SM: the smallest of `occupancy_limits`."""
    return max(0, min(occupancy_limits(props, regs, warps, shared).values()))


def problems(job: Job, res: dict, props, strict_fp32: bool = False) -> list[str]:
    """Why this row fails the check (empty: it passes)."""
    if not res["ok"]:
        return ["does not compile"]
    out = []
    if res["shared"] > props.smem_per_block:
        out.append(f"shared memory {res['shared']} B > {props.smem_per_block} B per block")
    spill = res["spill_stores"] or 0
    fp32 = job.types.get("Q", job.types.get("X", "")) == "*fp32"
    if spill and job.kind in ("forward", "decode"):
        out.append(f"spills {spill} B in a {job.kind} kernel")
    elif spill > BACKWARD_SPILL_BYTES and job.kind == "backward" and (strict_fp32 or not fp32):
        out.append(f"spills {spill} B > the backward budget of {BACKWARD_SPILL_BYTES} B")
    return out


def warnings_for(job: Job, res: dict) -> list[str]:
    """What the table flags without failing the check: float32 backward spills over the budget."""
    spill = (res.get("spill_stores") or 0) if res["ok"] else 0
    fp32 = job.types.get("Q", job.types.get("X", "")) == "*fp32"
    if job.kind == "backward" and fp32 and spill > BACKWARD_SPILL_BYTES:
        return [f"float32 backward spills {spill} B (over the {BACKWARD_SPILL_BYTES} B budget; not fixed)"]
    return []


def _short(kernel: str) -> str:
    return kernel.rsplit(":", 1)[1].strip("_").removesuffix("_kernel")


def _dtype(job: Job) -> str:
    for n in ("X", "Q", "GU", "DY", "Z", "R", "W"):
        if n in job.types:
            return job.types[n].lstrip("*")
    return "fp32"


def rows(jobs, results, props_by_target, strict_fp32=False):
    out = []
    for j, r in zip(jobs, results):
        props = props_by_target[j.target]
        occ = occupancy(props, r["regs"], j.num_warps, r["shared"]) if r["ok"] else None
        cx = {k: v for k, v in j.constexprs.items() if k.startswith("BLOCK") or k in ("SPLIT_K", "CHUNK", "HALF")}
        flags = [k for k, v in j.constexprs.items() if v is True]
        out.append(dict(kernel=_short(j.kernel), kind=j.kind, target=j.target, dtype=_dtype(j),
                        config=" ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in cx.items()),
                        flags=" ".join(flags), warps=j.num_warps, stages=j.num_stages, ok=r["ok"], error=r["error"],
                        regs=r["regs"], spill_stores=r["spill_stores"], spill_loads=r["spill_loads"],
                        shared=r["shared"], blocks_per_sm=occ, dot=r["dot"],
                        problems=problems(j, r, props, strict_fp32),
                        warnings=[] if strict_fp32 else warnings_for(j, r), used_by=j.used_by))
    return out


def markdown(table, command, seconds, n_requested) -> str:
    lines = ["# Triton kernels compiled ahead of time (compiler reports, not timings)", "",
             f"Produced by `{command}` with triton {__import__('triton').__version__}, no GPU: "
             f"{len(table)} distinct compiles ({n_requested} requested) in {seconds:.0f} s on this machine.",
             "Registers and spills from `ptxas -v`; shared memory from Triton's metadata; blocks/SM is the "
             "occupancy those allow; dot is what `tl.dot` became in the PTX. A row's `problems` fail the check.",
             "Nothing here was run on a GPU.", "",
             "| kernel | kind | target | dtype | tiles | flags | warps | stages | regs | spill st/ld (B) | "
             "shared (B) | blocks/SM | dot | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if r["ok"]:
            lines.append(f"| {r['kernel']} | {r['kind']} | {r['target']} | {r['dtype']} | {r['config']} | "
                         f"{r['flags']} | {r['warps']} | {r['stages']} | {r['regs']} | "
                         f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['blocks_per_sm']} | "
                         f"{r['dot']} | {'; '.join(r['problems'] + ['warning: ' + w for w in r['warnings']])} |")
        else:
            lines.append(f"| {r['kernel']} | {r['kind']} | {r['target']} | {r['dtype']} | {r['config']} | "
                         f"{r['flags']} | {r['warps']} | {r['stages']} | | | | | | "
                         f"{(r['error'] or '').replace('|', '/')} |")
    bad = [r for r in table if r["problems"]]
    warned = [r for r in table if r["warnings"]]
    lines += ["", f"{len(bad)} of {len(table)} compiles fail the check; {len(warned)} more carry a warning "
              "(float32 backward spills, reported, not held to the budget without --strict-fp32)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minigemma.kernels.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS), help="sm_90 and/or sm_80")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "kernels-aot"),
                    help="write OUT.md and OUT.json ('' to skip)")
    ap.add_argument("--no-cache", action="store_true", help="ignore this module's cached results")
    ap.add_argument("--strict-fp32", action="store_true", help="hold float32 backward kernels to the budget too")
    ap.add_argument("--device", default="", help="'cuda': this machine's GPU, its own props and target, "
                    "instead of --targets")
    ap.add_argument("--kernels", default="", help="only kernels whose name contains one of these (comma separated)")
    args = ap.parse_args(argv)

    from .utils import A100, H100

    props_by_target = {"sm_90": H100, "sm_80": A100}
    targets = args.targets.split(",")
    if args.device:  # the real device (make bench-gpu): its SM count and shared memory, its compute capability
        import torch

        from .utils import device_props

        props = device_props(torch.device(args.device))
        if props is None:
            ap.error(f"--device {args.device}: not a CUDA device")
        target = f"sm_{props.capability[0]}{props.capability[1]}"
        props_by_target, targets = {target: props}, [target]
    t0 = time.perf_counter()
    jobs = []
    for t in targets:
        jobs += jobs_for(props_by_target[t], t)
    n_req = len(jobs)
    jobs = dedupe(jobs)
    if args.kernels:
        keep = args.kernels.split(",")
        jobs = [j for j in jobs if any(k in j.kernel for k in keep)]
    results = run_jobs(jobs, args.workers, use_cache=not args.no_cache)
    seconds = time.perf_counter() - t0
    table = rows(jobs, results, props_by_target, args.strict_fp32)
    command = "python -m minigemma.kernels.aot" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    md = markdown(table, command, seconds, n_req)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out + ".md"), md)
        write_atomic(Path(args.out + ".json"), json.dumps(dict(command=command, seconds=round(seconds, 1),
                                                               backward_spill_bytes=BACKWARD_SPILL_BYTES,
                                                               rows=table), indent=1) + "\n")
    bad = [r for r in table if r["problems"]]
    print(f"{len(table)} compiles in {seconds:.1f} s; {len(bad)} fail the check", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
