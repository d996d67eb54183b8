"""CPU embedding benchmark for the real EmbeddingGemma 300M (chapter 10).

    python -m minigemma bench embed [--lengths 60,250,1000] [--docs 128,64,32] [--batch-size 32]
                                    [--systems ...] [--out docs/benchmarks]

Every system runs in a fresh process of its own (peak memories and start-up costs do not mix),
once, on the same texts and batch sizes:

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
For each length it measures

    docs/s     documents / the wall time of one `encode(texts, batch_size=...)` call over all of them,
               after a warm-up call on one batch of that length (compilation happens there)
    cosine     each document's embedding against st-float32's; the worst one is reported
    peak RSS   the process's own peak resident memory (VmHWM) over loading and all lengths
    top-10     chapter 11's held-out evaluation (`retrieval.chapter_data().code_eval`: 128 docstring
               queries, query prompt, against their 128 functions, document prompt; untimed): for how
               many queries the system's ten best documents, in order, are st-float32's (and as sets),
               and, where they differ, the largest difference between st-float32's own scores of
               the documents the two put at the same rank (a near-tie flips at a tiny gap)

Results go to docs/benchmarks/embed-cpu.{json,md} with the command, machine and date. Ratios are
against st-float32 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ..atomic import write_atomic
from .common import benchmark_texts, child_result, machine, peak_rss_mb, versions

SYSTEMS = ["st-float32", "minigemma-float32", "minigemma-bf16", "minigemma-int8", "minigemma-int4",
           "minigemma-bf16-compile", "minigemma-int8-compile"]


# ----------------------------------------------------------------------------------------------
# One system, in its own process
# ----------------------------------------------------------------------------------------------
def _child(system: str, texts_file: str, out_dir: str, batch_size: int) -> None:
    import numpy as np
    import torch

    texts = {int(k): v for k, v in json.loads(Path(texts_file).read_text()).items()}
    t = time.perf_counter()
    if system == "st-float32":
        import transformers
        from sentence_transformers import SentenceTransformer

        from minigemma.weights.fetch import path

        transformers.logging.set_verbosity_error()
        st = SentenceTransformer(str(path("embeddinggemma-300m")), device="cpu")

        def encode(x, prompt_name="document"):
            return st.encode(x, prompt_name=prompt_name, batch_size=batch_size, convert_to_tensor=True).float()
    else:
        import minigemma

        level = system.split("-")[1]
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
    load_s = time.perf_counter() - t
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
    eval_file = Path(texts_file).with_name("eval.json")
    if eval_file.exists():  # chapter 11's held-out evaluation, for the top-10 comparison (untimed)
        ev = json.loads(eval_file.read_text())
        with torch.inference_mode():
            for kind in ("query", "document"):
                np.save(Path(out_dir) / f"{system}-eval-{kind}.npy", encode(ev[kind], prompt_name=kind).numpy())
    print("RESULT " + json.dumps(dict(system=system, load_s=load_s, rows=rows, peak_rss_mb=peak_rss_mb(),
                                      threads=torch.get_num_threads())), flush=True)


def run_one(system: str, texts_file: Path, out_dir: Path, batch_size: int) -> dict | None:
    return child_result(["minigemma.bench.embed", "--child", system, str(texts_file), str(out_dir), str(batch_size)],
                        system)


def top10_agreement(q, d, q_ref, d_ref) -> dict:
    """How often the ten best documents of each query, in order, are the reference's: q (Nq, E),
    d (Nd, E) and the reference's q_ref, d_ref (unit vectors, numpy or torch)."""
    import torch

    def top(qq, dd):
        qq, dd = torch.as_tensor(qq).float(), torch.as_tensor(dd).float()
        return (qq @ dd.T).topk(min(10, dd.shape[0]), dim=-1).indices

    a, b = top(q, d), top(q_ref, d_ref)
    same_order = (a == b).all(-1)
    same_set = torch.tensor([set(x.tolist()) == set(y.tolist()) for x, y in zip(a, b)])
    # where the orders differ, are they near-ties? the reference's own score of the k-th document
    # each side ranks, at the worst rank of the worst query
    s_ref = torch.as_tensor(q_ref).float() @ torch.as_tensor(d_ref).float().T
    gap = (s_ref.gather(1, b) - s_ref.gather(1, a)).abs().max()
    return {"queries": int(a.shape[0]), "top10_same_order": int(same_order.sum()), "top10_same_set": int(same_set.sum()),
            "worst_score_gap": float(gap)}


def eval_texts() -> dict[str, list[str]]:
    """Chapter 11's held-out queries and documents (the standard library's own functions)."""
    from minigemma.retrieval import chapter_data

    held = chapter_data().code_eval
    return {"query": [p.query for p in held], "document": [p.document for p in held]}


def run(systems: list[str], lengths: list[int], counts: list[int], batch_size: int) -> dict:
    import numpy as np

    from minigemma.tokenizer import Tokenizer

    load_start = os.getloadavg()[0]  # the machine may be shared: the table states the load around the run
    tok = Tokenizer.from_pretrained("embeddinggemma-300m")
    texts = benchmark_texts(tok, lengths, counts)
    token_counts = {L: [len(tok.encode(t, add_eos=True)) for t in docs] for L, docs in texts.items()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "texts.json").write_text(json.dumps({str(k): v for k, v in texts.items()}))
        (tmp / "eval.json").write_text(json.dumps(eval_texts()))
        for system in systems:
            print(f"[running {system} ...]", file=sys.stderr, flush=True)
            r = run_one(system, tmp / "texts.json", tmp, batch_size)
            if r is None:
                continue
            for row in r["rows"]:
                ref = tmp / f"st-float32-{row['length']}.npy"
                if ref.exists():
                    a, b = np.load(tmp / f"{system}-{row['length']}.npy"), np.load(ref)
                    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                    row["worst_cosine_vs_st"] = float(cos.min())
            ref = [tmp / f"st-float32-eval-{kind}.npy" for kind in ("query", "document")]
            mine = [tmp / f"{system}-eval-{kind}.npy" for kind in ("query", "document")]
            if all(f.exists() for f in ref + mine):
                r["chapter11_eval"] = top10_agreement(*(np.load(f) for f in mine + ref))
            results.append(r)
    st = {row["length"]: row["docs_per_s"] for r in results if r["system"] == "st-float32" for row in r["rows"]}
    for r in results:
        for row in r["rows"]:
            if row["length"] in st:
                row["speedup_vs_st"] = row["docs_per_s"] / st[row["length"]]
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine(), batch_size=batch_size,
                lengths=lengths, docs=counts, prompt="document",
                mean_tokens={L: sum(c) / len(c) for L, c in token_counts.items()},
                results=results, versions=versions(("torch", "transformers", "sentence-transformers")),
                load_average_at_start=load_start,
                load_average_at_end=os.getloadavg()[0])


def format_table(report: dict) -> str:
    Ls = report["lengths"]
    toks = report["mean_tokens"]
    head = (["system"] + [f"docs/s @{L} (~{toks[L] if L in toks else toks[str(L)]:.0f} tok)" for L in Ls]
            + [f"x ST @{L}" for L in Ls] + ["worst cosine vs ST", "ch. 11 top-10 = ST's", "peak RSS", "load"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        by = {row["length"]: row for row in r["rows"]}
        cells = [r["system"]]
        cells += [f"{by[L]['docs_per_s']:.2f}" if L in by else "-" for L in Ls]
        cells += [f"{by[L]['speedup_vs_st']:.2f}x" if L in by and "speedup_vs_st" in by[L] else "-" for L in Ls]
        cos = [row["worst_cosine_vs_st"] for row in r["rows"] if "worst_cosine_vs_st" in row]
        ev = r.get("chapter11_eval")
        cells += [f"{min(cos):.6f}" if cos else "-",
                  f"{ev['top10_same_order']}/{ev['queries']} in order, {ev['top10_same_set']} as sets, "
                  f"worst gap {ev.get('worst_score_gap', float('nan')):.1e}" if ev else "-",
                  f"{r['peak_rss_mb']:.0f} MB", f"{r['load_s']:.1f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    head_line = (f"{report['machine']}, {report['date']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
                 + f"; batch size {report['batch_size']}, prompt '{report['prompt']}', documents per length "
                 + ", ".join(f"{n} @{L}" for L, n in zip(Ls, report["docs"]))
                 + "; 1-minute load average"
                 + (f" at the start {report['load_average_at_start']:.2f}," if "load_average_at_start" in report else "")
                 + (f" at the end {report['load_average_at_end']:.2f}" if "load_average_at_end" in report else "")
                 + " (the start reads the minute before the run; each system's process keeps both cores busy,"
                 + " so about 2 at the end is the benchmark's own load, and more means other processes shared"
                 + " the cores, slowing whichever system was running then).")
    note = [f"Note: {report['note']}", ""] if report.get("note") else []
    return "\n".join([head_line, "", *note, *lines, "", targets(report)])


def targets(report: dict) -> str:
    """Issue 11's targets, from this run: >= 2x st-float32's docs/s at every length with worst cosine
    >= 0.999 (the fast path), and the float32 default at cosine >= 0.9999."""
    out = ["Targets (same run):"]
    for r in report["results"]:
        if r["system"] == "st-float32":
            continue
        cos = min((row.get("worst_cosine_vs_st", float("nan")) for row in r["rows"]), default=float("nan"))
        speed = [row.get("speedup_vs_st") for row in r["rows"]]
        if r["system"] == "minigemma-float32":
            out.append(f"- {r['system']}: worst cosine {cos:.6f} (target >= 0.9999) {'met' if cos >= 0.9999 else 'MISSED'}")
            continue
        fast = all(s is not None and s >= 2 for s in speed)
        ev = r.get("chapter11_eval")
        same = (f"; chapter 11's held-out top-10 in ST's order for {ev['top10_same_order']}/{ev['queries']} queries "
                f"(target: all) {'met' if ev['top10_same_order'] == ev['queries'] else 'MISSED'}") if ev else ""
        out.append(f"- {r['system']}: speed-up " + ", ".join(f"{s:.2f}x" for s in speed if s is not None)
                   + f" (target >= 2x at every length) {'met' if fast else 'MISSED'}; worst cosine {cos:.6f} "
                   + f"(target >= 0.999) {'met' if cos >= 0.999 else 'MISSED'}" + same)
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m minigemma bench embed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="60,250,1000", help="target tokens per document, comma-separated")
    ap.add_argument("--docs", default="128,64,32", help="documents per length, comma-separated")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS)
                    + " (st-float32 first: the others are compared with it)")
    ap.add_argument("--note", default="", help="a sentence saved with the table (e.g. what else ran on the machine)")
    ap.add_argument("--out", default="docs/benchmarks", help="folder for embed-cpu.json/.md ('' = do not save)")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    counts = [int(x) for x in args.docs.split(",") if x]
    if len(lengths) != len(counts):
        ap.error("--lengths and --docs need the same number of entries")
    report = run(systems, lengths, counts, args.batch_size)
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
