"""CPU embedding benchmark for the real EmbeddingGemma 300M (chapter 10).

    python -m minigemma bench embed [--lengths 60,250,1000] [--docs 128,64,32] [--batch-size 32]
                                    [--repeats 3] [--systems ...] [--out docs/benchmarks]

Every system runs in a fresh process of its own (peak memories and start-up costs do not mix), on
the same texts and batch sizes:

    st-float32               sentence-transformers on the fetched folder, float32 (the anchor)
    minigemma-float32        `load_pretrained("embeddinggemma-300m")`: the reference, float32
    minigemma-bf16           `load_pretrained(..., quant="bf16")`: bf16 weights and activations
    minigemma-int8           `load_pretrained(..., quant="int8")`: int8 linears (dense head too), Q8_0 embedding
    minigemma-int4           `load_pretrained(..., quant="int4")`: int4 linears, Q8_0 embedding
    minigemma-bf16-compile   the bf16 model with its norms, MLPs and RoPE compiled (`encoder.compile_pointwise`)
    minigemma-int8-compile   the int8 model, the same way

The texts are real English that nobody here wrote: Python's own documentation strings (the same
modules on every machine with this Python), cut into documents whose token counts are drawn
uniformly from [0.75 L, 1.25 L] for each length L (short ~60, medium ~250, long ~1,000 tokens).

Speed. A shared machine's speed drifts by 10-20% from minute to minute, so every system runs
`--repeats` times (default 3), the systems in turn (A B C A B C ...: every system sees about the
same drift), each time in a fresh process. For each length a run measures

    docs/s     documents / the wall time of one `encode(texts, batch_size=...)` call over all of them,
               after a warm-up call on one batch of that length (compilation happens there)
    x ST       the run's docs/s over st-float32's in the same round (the two ran minutes apart)
    cosine     each document's embedding against st-float32's; the worst one is reported
    peak RSS   the process's own peak resident memory (VmHWM) over loading and all lengths

and a table cell is the median run's value with the range (min-max) over the runs; the worst cosine
is the worst of all runs. The target "EmbeddingGemma >= 2x sentence-transformers at every length"
is judged on the median.

Quality. Retrieval quality replaces "the same top-10 lists as float32", which bf16 noise cannot give
where near-duplicate documents tie. For each minigemma system (its level, compiled or not) and for
the float32 reference, once (it is deterministic, not a speed), in a fresh process: nDCG@10 and
recall@10 on chapter 11's held-out split (`retrieval.chapter_data().code_eval`: 128 docstring queries
with the query prompt, against the 128 held-out functions with the document prompt, query i's one
relevant document being function i), by `retrieval.retrieval_metrics`. The target is
|level - float32| <= 0.005 for both. One query is worth 1/128 = 0.0078 of recall@10, so that
target means no query enters or leaves its top 10; a relevant document moving down one place
inside the top 10 costs between 0.0029 and 0.0001 of nDCG@10.

Results go to docs/benchmarks/embed-cpu.{json,md} with the command, machine and date; the JSON keeps
every run. Ratios are against st-float32 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..atomic import write_atomic
from .common import benchmark_texts, child_result, machine, peak_rss_mb, positive_int, versions

SYSTEMS = ["st-float32", "minigemma-float32", "minigemma-bf16", "minigemma-int8", "minigemma-int4",
           "minigemma-bf16-compile", "minigemma-int8-compile"]
ANCHOR = "st-float32"  # the speed and cosine reference
REFERENCE = "minigemma-float32"  # the quality reference: the float32 level
QUALITY_TOLERANCE = 0.005  # the largest |level - float32| allowed for nDCG@10 and recall@10


# ----------------------------------------------------------------------------------------------
# One system, in its own process
# ----------------------------------------------------------------------------------------------
def level_of(system: str) -> str:
    """The precision level of a minigemma system: "minigemma-bf16-compile" -> "bf16"."""
    if not system.startswith("minigemma-"):
        raise ValueError(f"{system!r} is not a minigemma system (it has no precision level)")
    return system.split("-")[1]


def _encoder(system: str, batch_size: int) -> tuple[Callable, float]:
    """(encode(texts, prompt_name) -> (N, 768) float32, seconds it took to load): `system`, built
    in this process."""
    t = time.perf_counter()
    if system == ANCHOR:
        import transformers
        from sentence_transformers import SentenceTransformer

        from minigemma.weights.fetch import path

        transformers.logging.set_verbosity_error()
        st = SentenceTransformer(str(path("embeddinggemma-300m")), device="cpu")

        def encode(x, prompt_name="document"):
            return st.encode(x, prompt_name=prompt_name, batch_size=batch_size, convert_to_tensor=True).float()
    else:
        import minigemma

        level = level_of(system)
        model, _ = minigemma.load_pretrained("embeddinggemma-300m", quant=None if level == "float32" else level)
        if system.endswith("-compile"):
            import torch._inductor.config

            from minigemma.encoder import compile_pointwise

            # compile in this process: a pool of compile workers would start up in the background and
            # share the 2 cores with the first timed length
            torch._inductor.config.compile_threads = 1
            compile_pointwise(model)

        def encode(x, prompt_name="document"):
            return model.encode(x, prompt_name=prompt_name, batch_size=batch_size)
    return encode, time.perf_counter() - t


def _child(system: str, texts_file: str, out_dir: str, batch_size: int) -> None:
    """One timed run: every length of `texts_file`; embeddings saved as <system>-<L>.npy."""
    import numpy as np
    import torch

    texts = {int(k): v for k, v in json.loads(Path(texts_file).read_text()).items()}
    encode, load_s = _encoder(system, batch_size)
    rows = []
    for L, docs in texts.items():
        with torch.inference_mode():
            t = time.perf_counter()
            # warm-up on one full batch: compilation and the first touch of a batch's buffers (page faults,
            # allocator growth) are not throughput; a warm-up of 2 texts left the first length ~20% slow
            encode(docs[:batch_size])
            warm_s = time.perf_counter() - t
            t = time.perf_counter()
            emb = encode(docs)
            dt = time.perf_counter() - t
        np.save(Path(out_dir) / f"{system}-{L}.npy", emb.numpy())
        rows.append(dict(length=L, docs=len(docs), seconds=dt, docs_per_s=len(docs) / dt, warmup_s=warm_s))
    print("RESULT " + json.dumps(dict(system=system, load_s=load_s, rows=rows, peak_rss_mb=peak_rss_mb(),
                                      threads=torch.get_num_threads())), flush=True)


def _quality_child(system: str, eval_file: str, out_dir: str, batch_size: int) -> None:
    """Chapter 11's held-out queries and documents embedded (untimed), saved as
    <system>-eval-query.npy (Q, 768) and <system>-eval-document.npy (N, 768)."""
    import numpy as np
    import torch

    ev = json.loads(Path(eval_file).read_text())
    encode, load_s = _encoder(system, batch_size)
    t = time.perf_counter()
    with torch.inference_mode():
        for kind in ("query", "document"):  # each with its own prompt, as chapter 11 embeds them
            np.save(Path(out_dir) / f"{system}-eval-{kind}.npy", encode(ev[kind], prompt_name=kind).numpy())
    print("RESULT " + json.dumps(dict(system=system, load_s=load_s, encode_s=time.perf_counter() - t)), flush=True)


def run_one(system: str, texts_file: Path, out_dir: Path, batch_size: int) -> dict | None:
    """One timed run of `system` in a fresh process (None if it failed)."""
    return child_result(["minigemma.bench.embed", "--child", system, str(texts_file), str(out_dir), str(batch_size)],
                        system)


def run_quality(system: str, eval_file: Path, out_dir: Path, batch_size: int) -> dict | None:
    """`system`'s chapter 11 embeddings in a fresh process (None if it failed)."""
    return child_result(["minigemma.bench.embed", "--quality-child", system, str(eval_file), str(out_dir),
                         str(batch_size)], f"{system} (quality)")


# ----------------------------------------------------------------------------------------------
# Speed: the systems in turn, the median run and the range
# ----------------------------------------------------------------------------------------------
def in_turn(systems: list[str], repeats: int, measure: Callable[[str, int], dict | None]) -> dict[str, list[dict]]:
    """{system: its runs}: `repeats` rounds, each running every system once in the order given
    (A B C A B C ...), `measure(system, round)` being one run (a result dict, or None if it failed;
    rounds count from 1). Each run is tagged with its round, so that it can be compared with the
    anchor's run of the same round."""
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rnd in range(1, repeats + 1):
        for s in systems:
            print(f"[round {rnd}/{repeats}: {s} ...]", file=sys.stderr, flush=True)
            r = measure(s, rnd)
            if r is not None:
                runs[s].append({**r, "round": rnd})
    return runs


def spread(values: list[float]) -> dict[str, float] | None:
    """{"median", "min", "max"} of measured values (None if there are none). The median is the
    middle value, the lower of the two middle ones for an even count (`statistics.median_low`, as
    `bench train`'s median run): always a value that was measured, never an average of two."""
    if not values:
        return None
    return {"median": statistics.median_low(values), "min": min(values), "max": max(values)}


def cosine_rows(a, b):
    """Row-wise cosine similarity of a (N, E) and b (N, E) (numpy) -> (N,)."""
    import numpy as np

    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def compare_with_anchor(runs: dict[str, list[dict]], embeddings: Callable[[str, int, int], object]) -> None:
    """In place: each run's rows get `speedup_vs_st` (its docs/s over the anchor's in the same round)
    and `worst_cosine_vs_st` (its worst document against the anchor's, where both embeddings exist).
    embeddings(system, round, length) -> (N, E) array or None."""
    anchor = {(r["round"], row["length"]): row for r in runs.get(ANCHOR, []) for row in r["rows"]}
    for system_runs in runs.values():
        for r in system_runs:
            for row in r["rows"]:
                key = (r["round"], row["length"])
                if key in anchor:
                    row["speedup_vs_st"] = row["docs_per_s"] / anchor[key]["docs_per_s"]
                mine, st = embeddings(r["system"], *key), embeddings(ANCHOR, *key)
                if mine is not None and st is not None:
                    row["worst_cosine_vs_st"] = float(cosine_rows(mine, st).min())


def summarise(system: str, runs: list[dict], lengths: list[int]) -> dict:
    """One system's table row: for each length the spread of docs/s and of the speed-up, the worst
    cosine of any run; the spread of peak RSS and load time; and every run, kept as measured."""
    rows = []
    for L in lengths:
        at = [row for r in runs for row in r["rows"] if row["length"] == L]
        cos = [row["worst_cosine_vs_st"] for row in at if "worst_cosine_vs_st" in row]
        rows.append({"length": L, "docs_per_s": spread([row["docs_per_s"] for row in at]),
                     "speedup_vs_st": spread([row["speedup_vs_st"] for row in at if "speedup_vs_st" in row]),
                     "worst_cosine_vs_st": min(cos) if cos else None})
    return {"system": system, "repeats_done": len(runs), "rows": rows,
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs]), "load_s": spread([r["load_s"] for r in runs]),
            "runs": runs}


# ----------------------------------------------------------------------------------------------
# Quality: chapter 11's held-out retrieval, each level against float32
# ----------------------------------------------------------------------------------------------
def eval_texts() -> dict[str, list[str]]:
    """Chapter 11's held-out split, as the chapter builds it (`retrieval.chapter_data(...).code_eval`):
    {"query": Q docstrings, "document": the Q functions}, query i's relevant document being i."""
    from minigemma.retrieval import chapter_data

    held = chapter_data(n_eval=128).code_eval  # as chapter 11 calls it (the training side plays no part)
    return {"query": [p.query for p in held], "document": [p.document for p in held]}


def retrieval_quality(q, d) -> dict[str, float]:
    """{"nDCG@10", "recall@10"} of unit query embeddings q (Q, E) against documents d (N, E), query
    i's one relevant document being row i of d (numpy or torch): `retrieval.retrieval_metrics`,
    which chapter 11 reports."""
    import torch

    from minigemma.retrieval import retrieval_metrics

    m = retrieval_metrics(torch.as_tensor(q), torch.as_tensor(d), ks=(10,))
    return {"nDCG@10": m["nDCG@10"], "recall@10": m["R@10"]}


def judge_quality(metrics: dict[str, dict[str, float]], reference: str = REFERENCE,
                  tolerance: float = QUALITY_TOLERANCE) -> list[dict]:
    """One row per system of `metrics` ({system: retrieval_quality(...)}), the reference first: its
    metrics, their differences from the reference's and whether both are within `tolerance`
    (`met`: True / False; None for the reference itself, or when the reference is missing)."""
    ref = metrics.get(reference)
    rows = []
    for system in sorted(metrics, key=lambda s: s != reference):  # the reference first, then in order
        m = metrics[system]
        row = {"system": system, "level": level_of(system), **m}
        if ref is not None and system != reference:
            deltas = {f"delta_{k}": m[k] - ref[k] for k in ("nDCG@10", "recall@10")}
            # a tiny allowance for float rounding: 0.805 - 0.800 is 0.00500000000000006 in binary
            row.update(deltas, met=all(abs(v) <= tolerance + 1e-12 for v in deltas.values()))
        else:
            row.update({"delta_nDCG@10": None, "delta_recall@10": None, "met": None})
        rows.append(row)
    return rows


def quality_systems(systems: list[str]) -> list[str]:
    """The systems whose quality is measured: float32 (the reference, even if not timed) and every
    minigemma system of the run; none without a minigemma system."""
    mine = [s for s in systems if s.startswith("minigemma-")]
    return [REFERENCE] + [s for s in mine if s != REFERENCE] if mine else []


def measure_quality(systems: list[str], tmp: Path, batch_size: int) -> dict:
    """Chapter 11's held-out nDCG@10 and recall@10 of every system of `quality_systems`, each once in
    a fresh process, judged against float32: {"rows", "queries", "seconds", ...}."""
    import numpy as np

    t = time.perf_counter()
    ev = eval_texts()
    write_atomic(tmp / "eval.json", json.dumps(ev))
    metrics, seconds = {}, {}
    for system in quality_systems(systems):
        print(f"[quality: {system} ...]", file=sys.stderr, flush=True)
        t_system = time.perf_counter()
        if run_quality(system, tmp / "eval.json", tmp, batch_size) is not None:
            q, d = (np.load(tmp / f"{system}-eval-{kind}.npy") for kind in ("query", "document"))
            metrics[system] = retrieval_quality(q, d)
            seconds[system] = time.perf_counter() - t_system  # its process: start-up, loading, embedding
    rows = [{**row, "seconds": seconds[row["system"]]} for row in judge_quality(metrics)]
    return {"split": "retrieval.chapter_data().code_eval (chapter 11's held-out code search)",
            "queries": len(ev["query"]), "documents": len(ev["document"]), "tolerance": QUALITY_TOLERANCE,
            "rows": rows, "seconds": time.perf_counter() - t}


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
def prepare_texts(lengths: list[int], counts: list[int]) -> tuple[dict[int, list[str]], dict[int, float]]:
    """({L: texts}, {L: mean tokens per text}): the docstring corpus cut to each length."""
    from minigemma.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("embeddinggemma-300m")
    texts = benchmark_texts(tok, lengths, counts)
    mean = {L: sum(len(tok.encode(t, add_eos=True)) for t in docs) / len(docs) for L, docs in texts.items()}
    return texts, mean


def run(systems: list[str], lengths: list[int], counts: list[int], batch_size: int, repeats: int) -> dict:
    """The whole benchmark: `repeats` rounds of every system in turn, then the quality of every
    minigemma system once; the report (every run kept, each system's cells, the quality rows)."""
    import numpy as np

    load_start = os.getloadavg()[0]  # the machine may be shared: the table states the load around the run
    texts, mean_tokens = prepare_texts(lengths, counts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_atomic(tmp / "texts.json", json.dumps({str(k): v for k, v in texts.items()}))

        # each round's embeddings in a folder of its own: a run is compared with the anchor's of its round
        def measure(system, round_):
            folder = tmp / f"round-{round_}"
            folder.mkdir(exist_ok=True)
            return run_one(system, tmp / "texts.json", folder, batch_size)

        runs = in_turn(systems, repeats, measure)

        def embeddings(system, round_, length):
            f = tmp / f"round-{round_}" / f"{system}-{length}.npy"
            return np.load(f) if f.exists() else None

        compare_with_anchor(runs, embeddings)
        load_end = os.getloadavg()[0]
        quality = measure_quality(systems, tmp, batch_size)
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine(), batch_size=batch_size,
                lengths=lengths, docs=counts, repeats=repeats, prompt="document", mean_tokens=mean_tokens,
                results=[summarise(s, runs[s], lengths) for s in systems if runs[s]], quality=quality,
                versions=versions(("torch", "transformers", "sentence-transformers")),
                load_average_at_start=load_start, load_average_at_end=load_end)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def format_spread(s: dict | None, spec: str, unit: str = "") -> str:
    """A cell: the median, its unit, and the range of the runs, e.g. `2.05x (1.98–2.11)`; "-" if not measured."""
    if s is None:
        return "-"
    return f"{s['median']:{spec}}{unit} ({s['min']:{spec}}–{s['max']:{spec}})"


def format_table(report: dict) -> str:
    """The speed table (one row per system, every cell its median run and range), the quality table,
    and the targets."""
    Ls = report["lengths"]
    toks = {int(k): v for k, v in report["mean_tokens"].items()}  # JSON keys come back as strings
    head = (["system"] + [f"docs/s @{L} (~{toks[L]:.0f} tok)" for L in Ls] + [f"x ST @{L}" for L in Ls]
            + ["worst cosine vs ST", "peak RSS", "load"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        by = {row["length"]: row for row in r["rows"]}
        cos = [row["worst_cosine_vs_st"] for row in r["rows"] if row["worst_cosine_vs_st"] is not None]
        cells = ([r["system"]] + [format_spread(by[L]["docs_per_s"], ".2f") for L in Ls]
                 + [format_spread(by[L]["speedup_vs_st"], ".2f", "x") for L in Ls]
                 + [f"{min(cos):.6f}" if cos else "-", format_spread(r["peak_rss_mb"], ".0f", " MB"),
                    format_spread(r["load_s"], ".1f", " s")])
        lines.append("| " + " | ".join(cells) + " |")
    runs = {r["system"]: r["repeats_done"] for r in report["results"]}
    short = [f"{s} {n}/{report['repeats']}" for s, n in runs.items() if n < report["repeats"]]
    head_line = (f"{report['machine']}, {report['date']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
                 + f"; batch size {report['batch_size']}, prompt '{report['prompt']}', documents per length "
                 + ", ".join(f"{n} @{L}" for L, n in zip(Ls, report["docs"]))
                 + f". Every system ran {report['repeats']} times, in turn (a fresh process each run); a cell is"
                 " the median run's value and (min–max) the range of the runs; x ST is each run's docs/s over"
                 " st-float32's in the same round, so its median and range are of those ratios; the worst cosine"
                 " is the worst of every run." + (f" Runs that failed: {', '.join(short)}." if short else "")
                 + " 1-minute load average"
                 + f" at the start {report['load_average_at_start']:.2f}, at the end of the timed runs"
                 + f" {report['load_average_at_end']:.2f} (the start reads the minute before the run;"
                 + " each system's process keeps both cores busy,"
                 + " so about 2 at the end is the benchmark's own load, and more means other processes shared"
                 + " the cores, slowing whichever system was running then).")
    note = [f"Note: {report['note']}", ""] if report.get("note") else []
    quality = ["", format_quality(report["quality"])] if report.get("quality", {}).get("rows") else []
    return "\n".join([head_line, "", *note, *lines, *quality, "", targets(report)])


def format_quality(quality: dict) -> str:
    """The quality table: one row per system, its chapter 11 metrics and their differences from float32's."""
    tol = quality["tolerance"]
    lines = [f"Retrieval quality on {quality['split']}: {quality['queries']} queries against {quality['documents']}"
             f" documents, one relevant document each. Deterministic: one run per system, in a process of its"
             f" own ({quality['seconds']:.0f} s in all, building the split included). Target: |system - float32|"
             f" <= {tol} for both metrics (one query is worth {1 / quality['queries']:.4f} of recall@10).", "",
             f"| system | level | nDCG@10 | recall@10 | Δ nDCG@10 | Δ recall@10 | within ±{tol} | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in quality["rows"]:
        if r["system"] == REFERENCE:
            verdict, d_n, d_r = "reference", "-", "-"
        else:
            verdict = {True: "met", False: "MISSED", None: "- (no float32)"}[r["met"]]
            d_n = "-" if r["delta_nDCG@10"] is None else f"{r['delta_nDCG@10']:+.4f}"
            d_r = "-" if r["delta_recall@10"] is None else f"{r['delta_recall@10']:+.4f}"
        lines.append(f"| {r['system']} | {r['level']} | {r['nDCG@10']:.4f} | {r['recall@10']:.4f} | {d_n} | {d_r} "
                     f"| {verdict} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def targets(report: dict) -> str:
    """The issue's targets, from this run: each fast system >= 2x st-float32's docs/s at every length
    (the median of the rounds' ratios), worst cosine >= 0.999 and chapter 11's quality within the
    tolerance of float32's; the float32 default at cosine >= 0.9999."""
    quality = {r["system"]: r for r in report.get("quality", {}).get("rows", [])}
    out = ["Targets (same run" + (", medians" if report["repeats"] > 1 else "") + "):"]
    for r in report["results"]:
        if r["system"] == ANCHOR:
            continue
        cos = [row["worst_cosine_vs_st"] for row in r["rows"] if row["worst_cosine_vs_st"] is not None]
        cos_text = f"worst cosine {min(cos):.6f}" if cos else "worst cosine not measured"
        if r["system"] == REFERENCE:
            ok = bool(cos) and min(cos) >= 0.9999
            out.append(f"- {r['system']}: {cos_text} (target >= 0.9999) {'met' if ok else 'MISSED'}")
            continue
        speed = [row["speedup_vs_st"] for row in r["rows"]]
        if all(s is not None for s in speed):
            fast = all(s["median"] >= 2 for s in speed)
            speed_text = (", ".join(f"{s['median']:.2f}x" for s in speed)
                          + f" (target >= 2x at every length) {'met' if fast else 'MISSED'}")
        else:
            speed_text = "not measured (no st-float32 run in some round)"
        q = quality.get(r["system"])
        if q is None or q["met"] is None:
            q_text = "chapter 11 quality not measured"
        else:
            q_text = (f"chapter 11 Δ nDCG@10 {q['delta_nDCG@10']:+.4f}, Δ recall@10 {q['delta_recall@10']:+.4f} "
                      f"(target |Δ| <= {report['quality']['tolerance']}) {'met' if q['met'] else 'MISSED'}")
        out.append(f"- {r['system']}: speed-up {speed_text}; {cos_text} (target >= 0.999) "
                   f"{'met' if cos and min(cos) >= 0.999 else 'MISSED'}; {q_text}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1, e.g. "60,250,1000"."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("needs at least one number")
    return [positive_int(x) for x in items]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    if argv[:1] == ["--quality-child"]:
        _quality_child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m minigemma bench embed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=_int_list, default="60,250,1000", help="target tokens per document, comma-separated")
    ap.add_argument("--docs", type=_int_list, default="128,64,32", help="documents per length, comma-separated")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--repeats", type=positive_int, default=3,
                    help="runs of every system, in turn (each cell: the median run and the range); default 3")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS)
                    + f" ({ANCHOR} runs first in each round: the others are compared with it)")
    ap.add_argument("--note", default="", help="a sentence saved with the table (e.g. what else ran on the machine)")
    ap.add_argument("--out", default="docs/benchmarks", help="folder for embed-cpu.json/.md ('' = do not save)")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        ap.error(f"--systems: unknown systems {unknown}; choose from {SYSTEMS}" if unknown else "--systems: none given")
    systems = sorted(dict.fromkeys(systems), key=lambda s: s != ANCHOR)  # the anchor first, no system twice
    if len(args.lengths) != len(args.docs):
        ap.error(f"--lengths and --docs need the same number of entries, got {len(args.lengths)} and {len(args.docs)}")
    report = run(systems, args.lengths, args.docs, args.batch_size, args.repeats)
    report["command"] = " ".join(["python -m minigemma bench embed", shlex.join(argv)]).strip()
    if args.note:
        report["note"] = args.note
    table = format_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        write_atomic(out / "embed-cpu.json", json.dumps(report, indent=1) + "\n")
        write_atomic(out / "embed-cpu.md", f"# `{report['command']}`\n\n{table}\n")
        print(f"[saved {out / 'embed-cpu.json'} and .md]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
