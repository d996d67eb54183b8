"""CPU generation benchmark for the real Gemma 3 270M (chapter 05).

    python -m minigemma bench generate [--decode-tokens 64] [--prompt-tokens 512] [--out docs/benchmarks]

For each system, in its own subprocess (so peak memories do not mix), on the same GGUF file:

    minigemma float32   the faithful model (weights dequantised to float32)
    minigemma bfloat16  `model.to(torch.bfloat16)`
    minigemma int8      `minigemma.quant.quantize_int8`: int8 weights + bf16 activations, int8 head
    minigemma int8-fast               the same weights decoded by `minigemma.quant.FastDecoder` (fewer ops/token)
    minigemma int8-int4head-fast      int8 layers, int4 head (groups of 32) whose top 64 logits are
                                      recomputed exactly (`quantize(..., head="int4", rescore=64)`), FastDecoder
    minigemma int8-int4head-compiled  the same with `FastDecoder(model, compile=True)` (torch.compile)
    HF float32 eager    transformers' Gemma3ForCausalLM from the same GGUF, `generate`, eager attention
    llama.cpp Q4_K_M    llama-cpp-python on the file as stored (only if `llama_cpp` is importable)

it measures prefill tokens/s (one pass over a 512-token prompt, up to the first new token),
greedy decode tokens/s (64 more tokens, timed separately), and the process's peak RSS. A warm-up
generation (4 tokens after the same prompt, so compiled code sees the timed shapes) runs first; its
time, which includes torch.compile's compilation where used, is reported but not counted. Ratios
are against HF measured in the same run. Each row also reports the weight bytes one decode step
reads, the roofline that implies at the measured memory bandwidth, and whether its greedy tokens
equal minigemma float32's (and if not, at which step they first differ). Results are written to
docs/benchmarks/generate-cpu.{json,md} with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SYSTEMS = ["minigemma-float32", "minigemma-bfloat16", "minigemma-int8", "minigemma-int8-fast",
           "minigemma-int8-int4head-fast", "minigemma-int8-int4head-compiled", "hf-float32-eager",
           "llama.cpp-Q4_K_M"]

TEXT = ("The history of computing is a story of ideas meeting machines. Early mechanical calculators "
        "added and multiplied with gears; later, vacuum tubes and then transistors made electronic "
        "computers possible. Programming languages grew from raw machine code to assembly, then to "
        "high-level languages that let people describe what they wanted rather than how to do it. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n token ids (BOS first) of plain English text."""
    ids = tokenizer.encode(TEXT * (n // 40 + 2))
    return ids[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# One system, run in a subprocess: prints one JSON line
# ----------------------------------------------------------------------------------------------
def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _run_minigemma(variant: str, ids: list[int], n_decode: int) -> dict:
    from .generation import generate_ids
    from .quant import FastDecoder, quantize, weight_bytes_per_token
    from .weights.fetch import path
    from .weights.gguf import load_gguf

    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    model = load_gguf(path("gemma3-270m"), dtype)
    if variant.startswith("int8-int4head"):
        model = quantize(model, layers="int8", head="int4", group_size=32, rescore=64)
    elif variant.startswith("int8"):
        model = quantize(model, layers="int8", head="int8")
    if variant.endswith("-fast") or variant.endswith("-compiled"):
        model = FastDecoder(model, compile=variant.endswith("-compiled"))
    t_warm, _ = _time(lambda: generate_ids(model, [ids], 4, eos_id=None))  # warm-up (and compilation)
    t_first, _ = _time(lambda: generate_ids(model, [ids], 1, eos_id=None))
    t_all, out = _time(lambda: generate_ids(model, [ids], n_decode + 1, eos_id=None))
    return dict(prefill_s=t_first, decode_s=t_all - t_first, tokens=out[0], warmup_s=t_warm,
                weight_bytes=weight_bytes_per_token(model))


def _run_hf(ids: list[int], n_decode: int) -> dict:
    import transformers

    from .weights.fetch import path

    transformers.logging.set_verbosity_error()
    p = path("gemma3-270m")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=torch.float32, attn_implementation="eager").eval()

    def gen(x, n):
        with torch.no_grad():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)[0, x.shape[1]:].tolist()

    x = torch.tensor([ids])
    gen(x[:, :16], 4)  # warm-up
    t_first, _ = _time(lambda: gen(x, 1))
    t_all, out = _time(lambda: gen(x, n_decode + 1))
    embed = model.model.embed_tokens.weight
    params = sum(t.numel() * t.element_size() for t in model.parameters())  # the head is tied: counted once
    return dict(prefill_s=t_first, decode_s=t_all - t_first, tokens=out,
                weight_bytes=params + embed.shape[1] * embed.element_size())


def _run_llama_cpp(ids: list[int], n_decode: int) -> dict:
    import llama_cpp

    from .weights.fetch import path
    from .weights.gguf import read_gguf

    p = path("gemma3-270m")
    llm = llama_cpp.Llama(model_path=str(p), n_ctx=len(ids) + n_decode + 8, n_threads=os.cpu_count(),
                          n_batch=len(ids), verbose=False, logits_all=False)

    import numpy as np

    def last_logits():  # llm.scores holds logits only with logits_all=True, which would slow prefill down
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))

    def gen(n):
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            tok = int(last_logits().argmax())
            out.append(tok)
            llm.eval([tok])
        return out

    llm.reset()
    llm.eval(ids[:16])  # warm-up
    t_first, _ = _time(lambda: gen(1))
    t_all, out = _time(lambda: gen(n_decode + 1))
    f = read_gguf(p)
    embd = f.tensors["token_embd.weight"]
    stored = sum(i.n_bytes for i in f.tensors.values())
    return dict(prefill_s=t_first, decode_s=t_all - t_first, tokens=out,
                weight_bytes=stored - embd.n_bytes + embd.n_bytes // embd.shape[0] + embd.n_bytes)


def _child(system: str, n_prompt: int, n_decode: int) -> None:
    from .tokenizer import Tokenizer

    torch.manual_seed(0)
    ids = prompt_ids(Tokenizer.from_pretrained("gemma3-270m"), n_prompt)
    if system.startswith("minigemma-"):
        r = _run_minigemma(system.split("-", 1)[1], ids, n_decode)
    elif system == "hf-float32-eager":
        r = _run_hf(ids, n_decode)
    elif system == "llama.cpp-Q4_K_M":
        r = _run_llama_cpp(ids, n_decode)
    else:
        raise SystemExit(f"unknown system {system!r}")
    r.update(system=system, peak_rss_mb=_peak_rss_mb(), prompt_tokens=len(ids), decode_tokens=n_decode,
             threads=torch.get_num_threads())
    print("RESULT " + json.dumps(r), flush=True)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth estimate: the best of a few full reductions over a large float32 tensor."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_time(lambda: x.sum())[0] for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _available(system: str) -> bool:
    if system == "llama.cpp-Q4_K_M":
        import importlib.util
        return importlib.util.find_spec("llama_cpp") is not None
    if system == "hf-float32-eager":
        import importlib.util
        return importlib.util.find_spec("transformers") is not None
    return True


def run(systems: list[str], n_prompt: int, n_decode: int) -> dict:
    results = []
    for system in systems:
        if not _available(system):
            print(f"[skip {system}: not importable]", file=sys.stderr)
            continue
        print(f"[running {system} ...]", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "minigemma.bench", "--child", system, str(n_prompt), str(n_decode)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(f"[{system} failed]\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[len("RESULT "):]))
    bw = memory_bandwidth_gbs()
    ref = next((r for r in results if r["system"] == "minigemma-float32"), None)
    hf = next((r for r in results if r["system"] == "hf-float32-eager"), None)
    for r in results:
        r["prefill_tok_s"] = r["prompt_tokens"] / r["prefill_s"]
        r["decode_tok_s"] = r["decode_tokens"] / r["decode_s"]
        r["roofline_tok_s"] = bw * 1e9 / r["weight_bytes"]
        if hf is not None:
            r["decode_vs_hf"] = r["decode_tok_s"] / (hf["decode_tokens"] / hf["decode_s"])
            r["prefill_vs_hf"] = r["prefill_tok_s"] / (hf["prompt_tokens"] / hf["prefill_s"])
        if ref is not None:
            r["first_difference_vs_float32"] = _first_difference(r["tokens"], ref["tokens"])
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=_machine(), torch=torch.__version__,
        memory_bandwidth_gb_s=bw, results=results)


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        extra = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    except OSError:
        extra = []
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(extra)})" if extra else "")


def format_table(report: dict) -> str:
    r0 = report["results"][0] if report["results"] else {"prompt_tokens": "?", "decode_tokens": "?"}
    rows = [f"| system | weights read/token | prefill tok/s ({r0['prompt_tokens']}) | decode tok/s ({r0['decode_tokens']}) | decode vs HF | "
            "roofline tok/s | peak RSS | greedy = float32? | warm-up (incl. compile) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        diff = r.get("first_difference_vs_float32")
        same = ("-" if "first_difference_vs_float32" not in r  # no float32 run to compare with
                else f"yes ({r['decode_tokens']}/{r['decode_tokens']})" if diff is None else f"differs from token {diff}")
        vs_hf = f"{r['decode_vs_hf']:.2f}x" if "decode_vs_hf" in r else "-"
        rows.append(f"| {r['system']} | {r['weight_bytes'] / 1e6:.0f} MB | {r['prefill_tok_s']:.0f} | "
                    f"{r['decode_tok_s']:.1f} | {vs_hf} | "
                    f"{r['roofline_tok_s']:.0f} | {r['peak_rss_mb']:.0f} MB | {same} | "
                    + (f"{r['warmup_s']:.1f} s |" if "warmup_s" in r else "- |"))
    head = (f"{report['machine']}, torch {report['torch']}, {report['date']}; memory read bandwidth "
            f"~{report['memory_bandwidth_gb_s']:.1f} GB/s (roofline = bandwidth / weight bytes per token).")
    return head + "\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m minigemma bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["generate"])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    ap.add_argument("--out", default="docs/benchmarks", help="folder for generate-cpu.json/.md ('' = do not save)")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    report = run(systems, args.prompt_tokens, args.decode_tokens)
    report["command"] = "python -m minigemma bench " + " ".join(argv)
    table = format_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generate-cpu.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "generate-cpu.md").write_text(f"# `{report['command']}`\n\n{table}\n")
        print(f"[saved {out / 'generate-cpu.json'} and .md]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
