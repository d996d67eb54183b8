"""CPU generation benchmark for the real Gemma 3 270M (chapter 06).

    python -m minigemma bench generate [--contexts 128,512,8192] [--decode-tokens 32]
                                       [--systems ...] [--out docs/benchmarks]

Every (system, context) runs in a fresh process of its own, so peak memories and start-up times do
not mix, and every system reads the same GGUF file:

    minigemma-float32   `load_pretrained("gemma3-270m")`: the reference, every weight dequantised
    minigemma-bf16      `load_pretrained(..., quant="bf16")`
    minigemma-int8      `load_pretrained(..., quant="int8")`: int8 layers, int4 head re-scored, Q8_0 embedding
    minigemma-int4      `load_pretrained(..., quant="int4")`
    minigemma-file-codes `load_pretrained(..., file_codes=True)`: the file's own codes on the int4 kernel
                        (the default of `python -m minigemma generate`)
    hf-float32          transformers' Gemma3ForCausalLM from the same GGUF (sdpa attention), float32
    llama.cpp-Q4_K_M    llama-cpp-python on the file as stored, flash_attn=True, n_batch=512
                        (only if `llama_cpp` is importable: `pip install -e '.[bench]'`)

For each context length L (prompt tokens, from a real English text that is not part of this project:
Debian's licence texts, or Python's own documentation strings where those are missing) it measures

    prefill tok/s   L / the time of the one call that reads the prompt and gives the first logits
    decode tok/s    1 / the median time of one decode step with L + i tokens in the cache, each step
                    timed inside the loop (never two whole runs subtracted)
    peak RSS        the process's own peak resident memory (VmHWM) after loading, prefill and decode
    cold start      from the parent starting the process to the first new token: interpreter start,
                    imports, loading and the prefill
    greedy tokens   compared with minigemma-float32's at the same L (first step at which they differ)

Results go to docs/benchmarks/generate-cpu.{json,md} with the command and the machine. Ratios are
against llama.cpp and HF measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ..atomic import write_atomic
from .common import child_result, machine, peak_rss_mb, versions

SYSTEMS = ["minigemma-float32", "minigemma-bf16", "minigemma-int8", "minigemma-int4", "minigemma-file-codes",
           "hf-float32", "llama.cpp-Q4_K_M"]
DEFAULT_SYSTEMS = SYSTEMS
LICENCES = ["GPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "LGPL-3", "Artistic"]


def prompt_text() -> str:
    """The prompts' real prose, not in this project: Debian's licence texts, or else Python's docstrings."""
    root = Path("/usr/share/common-licenses")
    texts = [(root / n).read_text(errors="replace") for n in LICENCES if (root / n).is_file()]
    if sum(len(t) for t in texts) > 60_000:
        return "\n\n".join(texts)
    import pydoc
    import inspect
    mods = ["argparse", "collections", "typing", "pathlib", "subprocess", "asyncio", "email", "json", "re",
            "unittest", "logging", "decimal", "datetime", "itertools", "functools", "threading", "socket"]
    docs = []
    for name in mods:
        mod = pydoc.locate(name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(doc)
    return "\n\n".join(docs)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n token ids (BOS first) of `prompt_text()`, repeated if it is too short."""
    ids = tokenizer.encode(prompt_text())
    while len(ids) < n:
        ids = ids + ids[1:]
    return ids[:n]


# ----------------------------------------------------------------------------------------------
# One (system, context), run in its own process: prints one JSON line
# ----------------------------------------------------------------------------------------------
def load_kwargs(level: str) -> dict:
    """`load_pretrained`'s arguments for a minigemma system's level ("float32", "bf16", ..., "file-codes")."""
    if level == "file-codes":
        return {"file_codes": True}
    return {"quant": None if level == "float32" else level}


def _run_minigemma(level: str, ids: list[int], n_decode: int, clock) -> dict:
    import torch

    import minigemma
    from minigemma.generation import generate_ids
    from minigemma.quant import weight_bytes_per_token

    t = time.perf_counter()
    model, _ = minigemma.load_pretrained("gemma3-270m", **load_kwargs(level))
    load_s = time.perf_counter() - t
    steps: list[float] = []
    with torch.inference_mode():
        tokens = generate_ids(model, [ids], n_decode + 1, eos_id=None, step_times=steps,
                              on_token=clock.first_token)[0]
    return dict(load_s=load_s, prefill_s=steps[0], step_s=steps[1:], tokens=tokens,
                weight_bytes=weight_bytes_per_token(model))


def _run_hf(ids: list[int], n_decode: int, clock) -> dict:
    import torch
    import transformers

    from minigemma.weights.fetch import path

    transformers.logging.set_verbosity_error()
    p = path("gemma3-270m")
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                              dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    steps, tokens = [], []
    with torch.inference_mode():
        cache = transformers.DynamicCache(config=model.config)
        x = torch.tensor([ids])
        for i in range(n_decode + 1):  # greedy, one call per token, each timed
            t = time.perf_counter()
            out = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - t)
            tokens.append(nxt)
            if i == 0:
                clock.first_token(0, nxt)
            x = torch.tensor([[nxt]])
    embed = model.model.embed_tokens.weight
    params = sum(t.numel() * t.element_size() for t in model.parameters())  # the tied head counted once
    return dict(load_s=load_s, prefill_s=steps[0], step_s=steps[1:], tokens=tokens,
                weight_bytes=params + embed.shape[1] * embed.element_size())


def _run_llama_cpp(ids: list[int], n_decode: int, clock) -> dict:
    import numpy as np
    import llama_cpp

    from minigemma.weights.fetch import path
    from minigemma.weights.gguf import read_gguf

    p = path("gemma3-270m")
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(p), n_ctx=len(ids) + n_decode + 8, n_threads=os.cpu_count(),
                          n_batch=512, flash_attn=True, verbose=False, logits_all=False)
    load_s = time.perf_counter() - t

    def last_logits():  # llm.scores holds logits only with logits_all=True, which slows the prefill
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))

    steps, tokens = [], []
    t = time.perf_counter()
    llm.eval(ids)
    tok = int(last_logits().argmax())
    steps.append(time.perf_counter() - t)
    clock.first_token(0, tok)
    tokens.append(tok)
    for _ in range(n_decode):
        t = time.perf_counter()
        llm.eval([tok])
        tok = int(last_logits().argmax())
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
    f = read_gguf(p)
    embd = f.tensors["token_embd.weight"]
    stored = sum(i.n_bytes for i in f.tensors.values())
    return dict(load_s=load_s, prefill_s=steps[0], step_s=steps[1:], tokens=tokens,
                weight_bytes=stored + embd.n_bytes // embd.shape[0])  # the head reads the table, a step one row


class _Clock:
    """Records when the first new token exists, on the wall clock the parent also reads."""

    def __init__(self):
        self.first_token_at = None

    def first_token(self, row, token):
        if self.first_token_at is None:
            self.first_token_at = time.time()


def _child(system: str, n_prompt: int, n_decode: int) -> None:
    clock = _Clock()
    from minigemma.tokenizer import Tokenizer

    ids = prompt_ids(Tokenizer.from_pretrained("gemma3-270m"), n_prompt)
    if system.startswith("minigemma-"):
        r = _run_minigemma(system.split("-", 1)[1], ids, n_decode, clock)
    elif system == "hf-float32":
        r = _run_hf(ids, n_decode, clock)
    elif system == "llama.cpp-Q4_K_M":
        r = _run_llama_cpp(ids, n_decode, clock)
    else:
        raise SystemExit(f"unknown system {system!r}")
    import torch

    r.update(system=system, peak_rss_mb=peak_rss_mb(), prompt_tokens=len(ids), decode_tokens=n_decode,
             threads=torch.get_num_threads(), first_token_at=clock.first_token_at)
    print("RESULT " + json.dumps(r), flush=True)


def _profile_child(system: str, n_prompt: int, n_steps: int = 5) -> None:
    """Where one decode step's time goes: torch.profiler over a few steps after an L-token prompt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import minigemma
    from minigemma.tokenizer import Tokenizer

    level = system.split("-", 1)[1]
    model, _ = minigemma.load_pretrained("gemma3-270m", **load_kwargs(level))
    ids = torch.tensor([prompt_ids(Tokenizer.from_pretrained("gemma3-270m"), n_prompt)])
    cache = model.new_cache(1, n_prompt + 2 * n_steps + 8)
    with torch.inference_mode():
        token = model(ids, cache=cache, last_only=True)[:, -1:].argmax(-1)
        for _ in range(n_steps):  # warm-up steps, not profiled
            token = model(token, cache=cache, last_only=True)[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_steps):
                token = model(token, cache=cache, last_only=True)[:, -1:].argmax(-1)
    events = prof.key_averages()
    ms = lambda us: us / n_steps / 1e3  # noqa: E731  (per step)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)
    r = dict(system=system, prompt_tokens=n_prompt, steps=n_steps,
             self_cpu_ms=ms(sum(e.self_cpu_time_total for e in events)),
             ops_per_step=sum(e.count for e in events) / n_steps,
             gemv_ms=ms(sum(e.self_cpu_time_total for e in events if "pack_mm" in e.key or e.key in ("aten::mm", "aten::addmm"))),
             top=[dict(op=e.key, ms=ms(e.self_cpu_time_total), calls=e.count / n_steps) for e in top[:10]])
    print("RESULT " + json.dumps(r), flush=True)


def profile_step(system: str, n_prompt: int) -> dict | None:
    return child_result(["minigemma.bench.generate", "--profile-child", system, str(n_prompt)],
                        f"profile of {system} @ {n_prompt}")


def format_profile(prof: dict) -> str:
    lines = [f"One decode step of {prof['system']} after {prof['prompt_tokens']} prompt tokens (torch.profiler, "
             f"the mean over {prof['steps']} steps, self CPU time): {prof['self_cpu_ms']:.1f} ms in "
             f"{prof['ops_per_step']:.0f} operator calls; the weight products (int8/int4 GEMVs) take "
             f"{prof['gemv_ms']:.1f} ms, the other {prof['self_cpu_ms'] - prof['gemv_ms']:.1f} ms is everything else "
             "(attention, norms, casts, copies, the per-call cost of eager PyTorch).", "",
             "| operator | ms / step | calls / step |", "|---|---|---|"]
    lines += [f"| `{t['op']}` | {t['ms']:.2f} | {t['calls']:.0f} |" for t in prof["top"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth estimate: the best of a few full reductions over a large float32 tensor."""
    import torch

    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _available(system: str) -> bool:
    import importlib.util

    if system == "llama.cpp-Q4_K_M":
        return importlib.util.find_spec("llama_cpp") is not None
    if system == "hf-float32":
        return importlib.util.find_spec("transformers") is not None
    return True


def run_one(system: str, n_prompt: int, n_decode: int) -> dict | None:
    started = time.time()
    r = child_result(["minigemma.bench.generate", "--child", system, str(n_prompt), str(n_decode)],
                     f"{system} @ {n_prompt}")
    if r is None:
        return None
    r["cold_start_s"] = r.pop("first_token_at") - started
    r["prefill_tok_s"] = r["prompt_tokens"] / r["prefill_s"]
    r["decode_tok_s"] = 1.0 / statistics.median(r["step_s"])
    return r


def run(systems: list[str], contexts: list[int], n_decode: int) -> dict:
    results = []
    for system in systems:
        if not _available(system):
            print(f"[skip {system}: not importable]", file=sys.stderr)
            continue
        for L in contexts:
            print(f"[running {system} at {L} tokens ...]", file=sys.stderr, flush=True)
            r = run_one(system, L, n_decode)
            if r is not None:
                results.append(r)
    bw = memory_bandwidth_gbs()
    by = {(r["system"], r["prompt_tokens"]): r for r in results}
    for r in results:
        ref = by.get(("minigemma-float32", r["prompt_tokens"]))
        if ref is not None:
            r["first_difference_vs_float32"] = _first_difference(r["tokens"], ref["tokens"])
        r["roofline_tok_s"] = bw * 1e9 / r["weight_bytes"]
    profiles = []
    for system in ("minigemma-file-codes", "minigemma-int8"):
        if system in systems and 512 in contexts:
            print(f"[profiling one decode step of {system} at 512 tokens ...]", file=sys.stderr, flush=True)
            prof = profile_step(system, 512)
            if prof is not None:
                profiles.append(prof)
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine(), python=platform.python_version(),
                memory_bandwidth_gb_s=bw, contexts=contexts, decode_tokens=n_decode, results=results,
                profiles=profiles, versions=versions())


def _get(report, system, L, key):
    r = next((r for r in report["results"] if r["system"] == system and r["prompt_tokens"] == L), None)
    return None if r is None else r.get(key)


def format_table(report: dict) -> str:
    """The table, one row per system, and the targets of issue 8 as ratios from this run."""
    Ls = report["contexts"]
    systems = list(dict.fromkeys(r["system"] for r in report["results"]))
    head = (["system"] + [f"decode @{L} (tok/s)" for L in Ls] + [f"prefill @{L} (tok/s)" for L in Ls]
            + [f"peak RSS @{L}" for L in Ls] + ["cold start @" + str(Ls[0]), "load", "weights/token", "greedy = float32?"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, spec, unit=""):
        return "-" if v is None else f"{v:{spec}}{unit}"

    for s in systems:
        cells = [s]
        cells += [fmt(_get(report, s, L, "decode_tok_s"), ".1f") for L in Ls]
        cells += [fmt(_get(report, s, L, "prefill_tok_s"), ".0f") for L in Ls]
        cells += [fmt(_get(report, s, L, "peak_rss_mb"), ".0f", " MB") for L in Ls]
        cells += [fmt(_get(report, s, Ls[0], "cold_start_s"), ".2f", " s"), fmt(_get(report, s, Ls[0], "load_s"), ".2f", " s"),
                  fmt((_get(report, s, Ls[0], "weight_bytes") or 0) / 1e6 or None, ".0f", " MB")]
        diffs = [_get(report, s, L, "first_difference_vs_float32") for L in Ls]
        known = [(L, d) for L, d in zip(Ls, diffs) if _get(report, s, L, "tokens") is not None
                 and _get(report, "minigemma-float32", L, "tokens") is not None]
        cells.append("-" if not known else ", ".join(
            f"@{L}: " + ("yes" if d is None else f"from step {d}") for L, d in known))
        rows.append("| " + " | ".join(cells) + " |")
    lines = [f"{report['machine']}, {report['date']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + f"; memory read bandwidth ~{report['memory_bandwidth_gb_s']:.1f} GB/s; "
             f"decode = 1 / median step time over {report['decode_tokens']} steps after an L-token prompt.",
             "", *rows]
    for fast in ("minigemma-file-codes", "minigemma-int8"):
        if any(r["system"] == fast for r in report["results"]):
            lines += ["", targets(report, fast)]
    for prof in report.get("profiles", []):
        lines += ["", format_profile(prof)]
    return "\n".join(lines)


def targets(report: dict, fast: str = "minigemma-file-codes", anchor: str = "llama.cpp-Q4_K_M") -> str:
    """Issue 8's targets, as ratios measured in this run."""
    Ls = report["contexts"]
    out = [f"Targets ({fast} against {anchor}, same run):"]

    def ratio(key, L, other=anchor):
        a, b = _get(report, fast, L, key), _get(report, other, L, key)
        return None if a is None or b is None else a / b

    def line(label, value, goal, higher=True):
        if value is None:
            out.append(f"- {label}: not measured")
        else:
            ok = value >= goal if higher else value <= goal
            out.append(f"- {label}: {value:.2f}x (target {'>=' if higher else '<='} {goal}x) {'met' if ok else 'MISSED'}")

    if 512 in Ls:
        line("decode @512 vs llama.cpp", ratio("decode_tok_s", 512), 1.0)
    if 8192 in Ls and 128 in Ls:
        a, b = _get(report, fast, 8192, "decode_tok_s"), _get(report, fast, 128, "decode_tok_s")
        line("decode @8192 / own decode @128", None if a is None or b is None else a / b, 0.8)
    if 8192 in Ls:
        line("prefill @8192 vs llama.cpp", ratio("prefill_tok_s", 8192), 1.0)
    if 512 in Ls:
        line("prefill @512 vs llama.cpp", ratio("prefill_tok_s", 512), 1.0)
    for L in (512, 8192):
        if L in Ls:
            line(f"peak RSS @{L} vs llama.cpp", ratio("peak_rss_mb", L), 1.5, higher=False)
    line(f"cold start @{Ls[0]} vs llama.cpp", ratio("cold_start_s", Ls[0]), 2.0, higher=False)
    hf = [ratio("decode_tok_s", L, "hf-float32") for L in Ls]
    out.append("- decode vs HF float32: " + ", ".join(f"@{L} {v:.2f}x" for L, v in zip(Ls, hf) if v is not None))
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m minigemma bench generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,512,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    ap.add_argument("--out", default="docs/benchmarks", help="folder for generate-cpu.json/.md ('' = do not save)")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    contexts = [int(c) for c in args.contexts.split(",") if c]
    report = run(systems, contexts, args.decode_tokens)
    report["command"] = "python -m minigemma bench generate " + " ".join(argv)
    table = format_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        write_atomic(out / "generate-cpu.json", json.dumps(report, indent=1) + "\n")
        write_atomic(out / "generate-cpu.md", f"# `{report['command']}`\n\n{table}\n")
        print(f"[saved {out / 'generate-cpu.json'} and .md]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--profile-child":
        _profile_child(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
