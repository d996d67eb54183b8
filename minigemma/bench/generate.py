"""CPU generation benchmark for the real Gemma 3 270M (chapter 06).

    python -m minigemma bench generate [--contexts 128,512,8192] [--decode-tokens 32] [--repeats 3]
                                       [--systems ...] [--quality-tokens 1024 | --no-quality]
                                       [--out docs/benchmarks]

Every (system, context) runs in a fresh process of its own, so peak memories and start-up times do
not mix, and every system reads the same GGUF file:

    minigemma-float32   `load_pretrained("gemma3-270m")`: the reference, every weight dequantised
    minigemma-bf16      `load_pretrained(..., quant="bf16")`
    minigemma-int8      `load_pretrained(..., quant="int8")`: int8 layers, int4 head re-scored, Q8_0 embedding
    minigemma-int4      `load_pretrained(..., quant="int4")`
    minigemma-file-codes `load_pretrained(..., file_codes=True)`: the file's own codes on the int4 kernel
                        (the default of `python -m minigemma generate`)
    minigemma-file-codes-compiled  the same model, its decode steps through `generation.CompiledStep`
                        (`generate --compile`: one graph compiled for every step; the prompt runs eagerly);
                        its first decode step, which compiles, is reported on its own ("first step")
    hf-float32          transformers' Gemma3ForCausalLM from the same GGUF (sdpa attention), float32
    llama.cpp-Q4_K_M    llama-cpp-python on the file as stored, flash_attn=True, n_batch=512
                        (only if `llama_cpp` is importable: `pip install -e '.[bench]'`)

For each context length L (prompt tokens, from a real English text that is not part of this project:
Debian's licence texts, or Python's own documentation strings where those are missing) it measures

    prefill tok/s   L / the time of the one call that reads the prompt and gives the first logits
    decode tok/s    1 / the median time of one decode step with L + i tokens in the cache, each step
                    timed inside the loop (never two whole runs subtracted); the first decode step is
                    left out of the median and reported on its own (a compiled step compiles there)
    peak RSS        the process's own peak resident memory (VmHWM) after loading, prefill and decode
    cold start      from the parent starting the process to the first new token: interpreter start,
                    imports, loading and the prefill
    greedy tokens   compared with minigemma-float32's at the same L (first step at which they differ)

A shared machine's speed drifts by 10-20% from minute to minute, so every system runs `--repeats`
times (3 by default), the systems in turn (A B C, A B C, ...; each (system, context) a fresh process
every time), and every cell of the table is the median run's value with the range of the runs, as in
`44.7 (43.1–46.0)` (of an even count, the lower middle run, as `bench train`). The JSON keeps every
run's values under `runs`; the targets use the medians.

Then, once per system (it is deterministic), its fidelity to the weights on a fixed text that is not in
this project (CPython's `pydoc_data.topics`, the first `--quality-tokens` tokens): perplexity, KL from
minigemma-float32 and top-1 agreement with it (`bench/quality.py`, which says how the 262,144-way
log-probabilities are kept out of memory). And one decode step of minigemma-file-codes and -int8
under torch.profiler: where its time goes, and its operator calls per step (`ops_per_step` in the
JSON, a number to compare before and after a change).

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
from .common import child_result, load_kwargs, machine, peak_rss_mb, positive_int, versions
from .quality import QUALITY_TOKENS, REFERENCE, run_quality

SYSTEMS = ["minigemma-float32", "minigemma-bf16", "minigemma-int8", "minigemma-int4", "minigemma-file-codes",
           "minigemma-file-codes-compiled", "hf-float32", "llama.cpp-Q4_K_M"]
COMPILED = "-compiled"  # a minigemma system whose decode steps run compiled: its level, then this
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
def level_of(system: str) -> tuple[str, bool]:
    """A minigemma system's (level, compiled): "minigemma-file-codes-compiled" -> ("file-codes", True)."""
    level = system.split("-", 1)[1]
    return (level[:-len(COMPILED)], True) if level.endswith(COMPILED) else (level, False)


def _run_minigemma(system: str, ids: list[int], n_decode: int, clock) -> dict:
    import torch

    import minigemma
    from minigemma.generation import generate_ids
    from minigemma.quant import weight_bytes_per_token

    level, compiled = level_of(system)
    t = time.perf_counter()
    model, _ = minigemma.load_pretrained("gemma3-270m", **load_kwargs(level))
    load_s = time.perf_counter() - t
    steps: list[float] = []
    with torch.inference_mode():
        tokens = generate_ids(model, [ids], n_decode + 1, eos_id=None, step_times=steps,
                              on_token=clock.first_token, compile=compiled)[0]
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
        r = _run_minigemma(system, ids, n_decode, clock)
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

    from minigemma.generation import CompiledStep

    level, compiled = level_of(system)
    model, _ = minigemma.load_pretrained("gemma3-270m", **load_kwargs(level))
    ids = torch.tensor([prompt_ids(Tokenizer.from_pretrained("gemma3-270m"), n_prompt)])
    cache = model.new_cache(1, n_prompt + 2 * n_steps + 8)
    with torch.inference_mode():
        token = model(ids, cache=cache, last_only=True)[:, -1:].argmax(-1)
        if compiled:
            step = CompiledStep(model, cache)
        else:
            def step(token):
                return model(token, cache=cache, last_only=True)[:, -1]
        for _ in range(n_steps):  # warm-up steps (the first compiles), not profiled
            token = step(token).argmax(-1)[:, None]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_steps):
                token = step(token).argmax(-1)[:, None]
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
    """One run of one system at one context, in a fresh process: its measured values (None if it failed)."""
    started = time.time()
    r = child_result(["minigemma.bench.generate", "--child", system, str(n_prompt), str(n_decode)],
                     f"{system} @ {n_prompt}")
    if r is None:
        return None
    r["cold_start_s"] = r.pop("first_token_at") - started
    r["prefill_tok_s"] = r["prompt_tokens"] / r["prefill_s"]
    # the first decode step is reported on its own (a compiled step compiles there), the median is of the rest
    r["first_step_s"] = r["step_s"][0]
    r["decode_tok_s"] = 1.0 / statistics.median(r["step_s"][1:] or r["step_s"])
    return r


# The measured values that vary from run to run: each table cell is their median run and range.
SPREAD_KEYS = ("decode_tok_s", "prefill_tok_s", "peak_rss_mb", "cold_start_s", "load_s", "first_step_s")
# What every run of a (system, context) shares: copied from the first run.
FIXED_KEYS = ("system", "prompt_tokens", "decode_tokens", "weight_bytes", "threads")


def aggregate(runs: list[dict]) -> dict:
    """One table row from the runs of one (system, context).

    Each of SPREAD_KEYS becomes the median run's value (statistics.median_low: of an even count, the
    lower middle run, so every number shown was measured) and `<key>_range` = [min, max]; the greedy
    tokens are the first run's, `tokens_same_every_run` says whether the others agreed; every run is
    kept whole under `runs`."""
    if not runs:
        raise ValueError("no runs to aggregate")
    first = runs[0]
    row = {k: first[k] for k in FIXED_KEYS if k in first}
    for key in SPREAD_KEYS:
        if not all(key in r for r in runs):  # a value older runs did not record (first_step_s)
            continue
        values = [r[key] for r in runs]
        row[key] = statistics.median_low(values)
        row[key + "_range"] = [min(values), max(values)]
    row["tokens"] = first["tokens"]
    row["tokens_same_every_run"] = all(r["tokens"] == first["tokens"] for r in runs)
    row["repeats"] = len(runs)
    row["runs"] = runs
    return row


def run_speed(systems: list[str], contexts: list[int], n_decode: int, repeats: int, runner=run_one) -> list[dict]:
    """Every system at every context, `repeats` times, the systems in turn (A B C, A B C, ...), so that a
    slow minute of a shared machine hits every system alike. One aggregated row per (system, context).

    runner(system, n_prompt, n_decode) -> one run's dict, or None if it failed (default: a fresh process)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    present = []
    for system in systems:
        if _available(system):
            present.append(system)
        else:
            print(f"[skip {system}: not importable]", file=sys.stderr)
    runs: dict[tuple[str, int], list[dict]] = {(s, L): [] for s in present for L in contexts}
    for rep in range(1, repeats + 1):
        for system in present:
            for L in contexts:
                print(f"[run {rep}/{repeats}: {system} at {L} tokens ...]", file=sys.stderr, flush=True)
                r = runner(system, L, n_decode)
                if r is None:
                    continue
                runs[(system, L)].append(r)
                print(f"[run {rep}/{repeats}: {system} at {L}: decode {r['decode_tok_s']:.1f} tok/s, prefill "
                      f"{r['prefill_tok_s']:.0f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB]", file=sys.stderr, flush=True)
    return [aggregate(rs) for rs in runs.values() if rs]


PROFILED = ("minigemma-file-codes", "minigemma-file-codes-compiled", "minigemma-int8")


def run(systems: list[str], contexts: list[int], n_decode: int, repeats: int = 3,
        quality_tokens: int | None = QUALITY_TOKENS) -> dict:
    """The whole benchmark: speed (repeated, in turn), the bandwidth, the decode-step profiles, quality."""
    results = run_speed(systems, contexts, n_decode, repeats)
    bw = memory_bandwidth_gbs()
    by = {(r["system"], r["prompt_tokens"]): r for r in results}
    for r in results:
        ref = by.get((REFERENCE, r["prompt_tokens"]))
        if ref is not None:
            r["first_difference_vs_float32"] = _first_difference(r["tokens"], ref["tokens"])
        r["roofline_tok_s"] = bw * 1e9 / r["weight_bytes"]
    profiles = []
    L_prof = 512 if 512 in contexts else contexts[0]
    for system in PROFILED:
        if system in systems:
            print(f"[profiling one decode step of {system} at {L_prof} tokens ...]", file=sys.stderr, flush=True)
            prof = profile_step(system, L_prof)
            if prof is not None:
                profiles.append(prof)
    quality = None
    if quality_tokens:
        # a compiled system's prompt runs the same eager forward as its level: its quality is that level's
        quality = run_quality([s for s in systems if _available(s) and not s.endswith(COMPILED)], quality_tokens)
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine(), python=platform.python_version(),
                memory_bandwidth_gb_s=bw, contexts=contexts, decode_tokens=n_decode, repeats=repeats,
                results=results, profiles=profiles,
                ops_per_step={p["system"]: p["ops_per_step"] for p in profiles},
                quality=quality, versions=versions())


def _get(report, system, L, key):
    r = next((r for r in report["results"] if r["system"] == system and r["prompt_tokens"] == L), None)
    return None if r is None else r.get(key)


def format_spread(value, rng, spec: str, unit: str = "") -> str:
    """A cell: the median and, when there were runs to spread, their range, e.g. `44.7 (43.1–46.0)`.

    value None -> "-"; rng None (a report from before repeats) -> the value alone."""
    if value is None:
        return "-"
    cell = f"{value:{spec}}"
    if rng is not None:
        cell += f" ({rng[0]:{spec}}–{rng[1]:{spec}})"
    return cell + unit


def format_table(report: dict, goals: bool = True) -> str:
    """The speed table (median run and range per cell), the ratios to the anchors (of the medians), the
    decode-step profiles, and the quality table. goals: each ratio and quality figure also says whether it
    meets the project's goal (the command line); off, only the measured figures (a chapter). Reads older
    reports too (one run per system, no quality)."""
    Ls = report["contexts"]
    repeats = report.get("repeats", 1)
    systems = list(dict.fromkeys(r["system"] for r in report["results"]))
    head = (["system"] + [f"decode @{L} (tok/s)" for L in Ls] + [f"prefill @{L} (tok/s)" for L in Ls]
            + [f"peak RSS @{L}" for L in Ls] + ["cold start @" + str(Ls[0]), "load", f"first decode step @{Ls[0]}",
                                                 "weights/token", "greedy = float32?"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(s, L, key, spec, unit=""):
        return format_spread(_get(report, s, L, key), _get(report, s, L, key + "_range"), spec, unit)

    for s in systems:
        cells = [s]
        cells += [cell(s, L, "decode_tok_s", ".1f") for L in Ls]
        cells += [cell(s, L, "prefill_tok_s", ".0f") for L in Ls]
        cells += [cell(s, L, "peak_rss_mb", ".0f", " MB") for L in Ls]
        cells += [cell(s, Ls[0], "cold_start_s", ".2f", " s"), cell(s, Ls[0], "load_s", ".2f", " s"),
                  cell(s, Ls[0], "first_step_s", ".2f", " s"),
                  format_spread((_get(report, s, Ls[0], "weight_bytes") or 0) / 1e6 or None, None, ".0f", " MB")]
        diffs = [_get(report, s, L, "first_difference_vs_float32") for L in Ls]
        known = [(L, d) for L, d in zip(Ls, diffs) if _get(report, s, L, "tokens") is not None
                 and _get(report, REFERENCE, L, "tokens") is not None]
        cells.append("-" if not known else ", ".join(
            f"@{L}: " + ("yes" if d is None else f"from step {d}")
            + ("" if _get(report, s, L, "tokens_same_every_run") is not False else " (runs differ)") for L, d in known))
        rows.append("| " + " | ".join(cells) + " |")
    runs_line = (f" Every system ran {repeats} times, in turn, each run a fresh process; a cell is the median run's "
                 f"value and (min–max) the range of the runs." if repeats > 1 else "")
    lines = [f"{report['machine']}, {report['date']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + f"; memory read bandwidth ~{report['memory_bandwidth_gb_s']:.1f} GB/s; "
             f"decode = 1 / median step time over {report['decode_tokens']} steps after an L-token prompt." + runs_line,
             "", *rows]
    for fast in PROFILED:
        if any(r["system"] == fast for r in report["results"]):
            lines += ["", targets(report, fast, goals=goals)]
    if report.get("ops_per_step"):
        lines += ["", "Operator calls per decode step (torch.profiler, every aten call, nested ones included): "
                  + ", ".join(f"{s} {n:.0f}" for s, n in report["ops_per_step"].items()) + "."]
    for prof in report.get("profiles", []):
        lines += ["", format_profile(prof)]
    if report.get("quality") and report["quality"]["systems"]:   # none when the float32 reference failed
        lines += ["", format_quality(report["quality"], goals=goals)]
    return "\n".join(lines)


def targets(report: dict, fast: str = "minigemma-file-codes", anchor: str = "llama.cpp-Q4_K_M",
            goals: bool = True) -> str:
    """The ratios to the anchor that the project's speed goals are set on, of the medians measured in this
    run; goals: with each goal and whether it is met."""
    Ls = report["contexts"]
    out = [f"{'Targets' if goals else 'Ratios'} ({fast} against {anchor}, same run"
           + (", medians" if report.get("repeats", 1) > 1 else "") + "):"]

    def ratio(key, L, other=anchor):
        a, b = _get(report, fast, L, key), _get(report, other, L, key)
        return None if a is None or b is None else a / b

    def line(label, value, goal, higher=True):
        if value is None:
            out.append(f"- {label}: not measured")
        elif not goals:
            out.append(f"- {label}: {value:.2f}x")
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
    out.append("- decode vs HF float32: " + (", ".join(f"@{L} {v:.2f}x" for L, v in zip(Ls, hf) if v is not None)
                                             or "not measured"))
    return "\n".join(out)


def format_quality(quality: dict, anchor: str = "llama.cpp-Q4_K_M", goals: bool = True) -> str:
    """The quality table (one row per system) and, with goals, the project's quality goals: KL no larger
    than llama.cpp's for every minigemma level, int4's perplexity within 2% of float32's."""
    text, rows = quality["text"], {r["system"]: r for r in quality["systems"]}
    n = text["tokens"]
    lines = [f"Fidelity to the weights on the first {n} tokens (BOS first; {n - 1} scored positions) of "
             f"{text['source']}, Python {text['python']}, text SHA-256 {text['text_sha256'][:16]}…, ids SHA-256 "
             f"{text['ids_sha256'][:16]}… (another Python's text differs: compare only equal hashes). One forward "
             f"pass per system, its head applied {quality['chunk']} positions at a time; KL(float32 ‖ system) and "
             f"top-1 are against {quality['reference']}. Deterministic: one run per system.", "",
             "| system | perplexity | KL from float32 (nats/token) | top-1 = float32 | peak RSS | time (load + scoring) |",
             "|---|---|---|---|---|---|"]
    for s, r in rows.items():
        ref = " (reference)" if s == quality["reference"] else ""
        lines.append(f"| {s}{ref} | {r['perplexity']:.3f} | {r['kl_from_float32']:.5f} | {100 * r['top1_agreement']:.1f}% "
                     f"| {r['peak_rss_mb']:.0f} MB | {r['seconds']:.1f} s |")
    if not goals:
        return "\n".join(lines)
    lines += ["", f"Quality targets (against {anchor}, same text):"]
    base = rows.get(anchor)
    for s, r in rows.items():
        if not s.startswith("minigemma-") or s == quality["reference"]:
            continue
        if base is None:
            lines.append(f"- KL from float32 vs llama.cpp's, {s}: {r['kl_from_float32']:.5f} vs not measured (target <=)")
        else:
            ok = r["kl_from_float32"] <= base["kl_from_float32"]
            lines.append(f"- KL from float32 vs llama.cpp's, {s}: {r['kl_from_float32']:.5f} vs "
                         f"{base['kl_from_float32']:.5f} nats/token (target <=) {'met' if ok else 'MISSED'}")
    ref = rows.get(quality["reference"])
    for s in ("minigemma-int4", "minigemma-file-codes"):
        if s in rows and ref is not None:
            rel = rows[s]["perplexity"] / ref["perplexity"] - 1
            label = "int4 perplexity within 2% of float32's" + ("" if s == "minigemma-int4" else f" ({s}, int4 codes)")
            lines.append(f"- {label}: {rows[s]['perplexity']:.3f} vs {ref['perplexity']:.3f}, {100 * rel:+.2f}% "
                         f"(target <= +2%) {'met' if rel <= 0.02 else 'MISSED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options, every one checked before any work starts (argparse exits with status 2 on bad input)."""
    ap = argparse.ArgumentParser(prog="python -m minigemma bench generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,512,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--decode-tokens", type=positive_int, default=32, help="timed decode steps per run")
    ap.add_argument("--repeats", type=positive_int, default=3,
                    help="runs of every system, in turn (each cell: the median run and the range); default 3")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    ap.add_argument("--quality-tokens", type=positive_int, default=QUALITY_TOKENS,
                    help=f"tokens of the quality text each system scores (default {QUALITY_TOKENS}; at least 2)")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality table (speed only)")
    ap.add_argument("--out", default="docs/benchmarks", help="folder for generate-cpu.json/.md ('' = do not save)")
    args = ap.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    if not args.systems:
        ap.error("--systems is empty")
    try:
        args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--contexts must be comma-separated integers, got {args.contexts!r}")
    if not args.contexts or min(args.contexts) < 1:
        ap.error(f"--contexts needs at least one prompt length >= 1, got {args.contexts}")
    if args.quality_tokens < 2:
        ap.error(f"--quality-tokens must be at least 2 (one scored prediction), got {args.quality_tokens}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args.systems, args.contexts, args.decode_tokens, args.repeats,
                 None if args.no_quality else args.quality_tokens)
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
