"""Training-step benchmark for the chapter's tiny config (chapter 08).

    python -m minigemma bench train [--steps 10] [--repeats 3] [--batch-size 16] [--seq-len 128]
                                    [--systems ...] [--out docs/benchmarks]

One optimizer step (forward, backward, gradient clipping, AdamW) on batch × seq_len tokens of the
`tiny-gemma3` recipe's model (`train.RECIPES`), in one run on one machine, every system in a fresh
process of its own:

    minigemma-eager     `train.CausalLMLoss`: the model's one forward, the head and the loss chunked
    minigemma-compile   the same with the model under `torch.compile` (the chunked loss stays eager)
    hf-sdpa             transformers' `Gemma3ForCausalLM`, the same config, weights and batch, with
                        its default SDPA attention and its own loss on full logits (`labels=`)

each in float32 (what chapter 08 trains in), and again with the suffix `-bf16`: the same forward
under `train.precision_context("bf16-mixed")` (`torch.autocast` in bfloat16, weights and optimizer
float32), HF's included. A ratio compares systems of the same precision.

For each: tokens/s (batch × seq_len / the median step time, after warm-up steps that also compile),
and memory, from the process's resident set on Linux: `step memory` is the peak during the timed
steps (VmHWM, reset after warm-up) minus the resident set before the first step (weights, libraries),
so it counts activations, gradients, AdamW's moments and what the allocator keeps. Both use AdamW
with the same settings (`train.make_optimizer`). A shared 2-core machine's speed drifts by 10-20%
from minute to minute, so the systems run in turn `--repeats` times (a fresh process each) and the
table gives each system's median run, with the slowest and fastest.

Then the fused-loss comparison at the real vocabulary (262,144): the head and the loss alone on
batch × seq_len rows of width 640 (Gemma 3 270M's), eager (full logits, then cross-entropy) against
`losses.chunked_cross_entropy`, each in a fresh process (`distill.peak_memory`).

Results go to docs/benchmarks/train-cpu.{json,md} with the command, the machine and its load.
The numbers are measurements, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import write_atomic
from .common import machine, versions

SYSTEMS = ["minigemma-eager", "minigemma-compile", "hf-sdpa",
           "minigemma-eager-bf16", "minigemma-compile-bf16", "hf-sdpa-bf16"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM (Linux: clear_refs 5), so the peak counts only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _worker(system: str, steps: int, warmup: int, batch: int, seq_len: int, threads: int | None) -> dict:
    import torch

    from minigemma import train as T

    if threads:
        torch.set_num_threads(threads)
    name, precision = system, "bf16-mixed" if system.endswith("-bf16") else "float32"
    system = system.removesuffix("-bf16")
    spec = T.load_spec("tiny-gemma3")
    model = T.build_model(spec, seed=0)
    cfg = T.TrainConfig(batch_size=batch, seq_len=seq_len)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, spec["config"]["vocab_size"], (batch, seq_len + 1), generator=g)
               for _ in range(warmup + steps)]
    if system.startswith("hf"):
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        c = model.config
        hf_cfg = Gemma3TextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                  head_dim=c.head_dim, sliding_window=c.sliding_window, layer_types=c.layer_types,
                                  query_pre_attn_scalar=c.query_pre_attn_scalar,
                                  max_position_embeddings=c.max_position_embeddings, attn_implementation="sdpa")
        torch.manual_seed(0)
        net = Gemma3ForCausalLM(hf_cfg).train()

        def loss_of(w):
            return net(input_ids=w[:, :-1], labels=w[:, :-1]).loss  # HF shifts the labels itself
    else:
        net = model.train()
        module = T.CausalLMLoss(torch.compile(model) if system.endswith("compile") else model, packed=False)
        n_tok = batch * seq_len

        def loss_of(w):
            s, _ = module(w)
            return s / n_tok
    opt = T.make_optimizer(net, cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in {id(p): p for p in params}.values())

    def step(w):
        with T.precision_context(precision):
            loss = loss_of(w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    for w in batches[:warmup]:
        step(w)
    warmup_s = time.perf_counter() - t0
    reset = _reset_peak()
    times, losses = [], []
    for w in batches[warmup:]:
        t = time.perf_counter()
        losses.append(step(w))
        times.append(time.perf_counter() - t)
    peak = _status_kib("VmHWM")
    med = statistics.median(times)
    return {"system": name, "precision": precision,
            "params": n_params, "tokens_per_s": batch * seq_len / med, "step_ms": med * 1e3,
            "step_ms_min": min(times) * 1e3, "warmup_s": warmup_s, "peak_rss_mib": peak / 1024,
            "step_memory_mib": (peak - rss_before) / 1024, "peak_reset": reset, "first_loss": losses[0],
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minigemma bench train", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per system")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every system, in turn (the median run counts)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {SYSTEMS}")
    ap.add_argument("--no-loss-memory", action="store_true", help="skip the 262k-vocabulary loss comparison")
    ap.add_argument("--out", default="docs/benchmarks", help="folder for train-cpu.json and .md ('' = none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.warmup, args.batch_size, args.seq_len, args.threads)))
        return 0
    systems = [s for s in args.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        print(f"error: unknown systems {sorted(bad)}; choose from {SYSTEMS}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(max(1, args.repeats)):
        for s in systems:
            cmd = [sys.executable, "-m", "minigemma.bench.train", "--worker", s, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{s}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            run = json.loads(r.stdout.strip().splitlines()[-1])
            runs[s].append(run)
            print(f"run {rep + 1}: {s:24} {run['tokens_per_s']:8.0f} tok/s  step {run['step_ms']:7.1f} ms  "
                  f"step memory {run['step_memory_mib']:7.1f} MiB  peak RSS {run['peak_rss_mib']:7.1f} MiB", flush=True)
    rows = []
    for s in systems:
        if not runs[s]:
            continue
        ordered = sorted(runs[s], key=lambda x: x["tokens_per_s"])
        row = dict(ordered[(len(ordered) - 1) // 2])  # the median run (the lower one of an even count)
        row["tokens_per_s_range"] = [ordered[0]["tokens_per_s"], ordered[-1]["tokens_per_s"]]
        row["runs"] = runs[s]
        rows.append(row)
    hf = {r["precision"]: r for r in rows if r["system"].startswith("hf-")}  # the baseline of each precision
    loss_mem = []
    if not args.no_loss_memory:
        from minigemma.distill import peak_memory

        N = args.batch_size * args.seq_len
        for kind in ("eager", "chunked"):
            m = peak_memory(kind, N=N, C=640, V=262_144)
            loss_mem.append({"kind": kind, "rows": N, "width": 640, "vocab": 262_144, **m})
            print(f"loss at V=262144, {N} rows: {kind:8} peak extra {m['extra_mib']:8.1f} MiB", flush=True)
    load_after = os.getloadavg()
    result = {"command": "python -m minigemma bench train " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{machine()}, torch {versions(('torch',)).get('torch')}", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average_1min": [load_before[0], load_after[0]], "batch_size": args.batch_size,
              "seq_len": args.seq_len, "steps": args.steps, "repeats": args.repeats, "systems": rows,
              "loss_memory": loss_mem}
    if args.out:
        out = Path(args.out)
        write_atomic(out / "train-cpu.json", json.dumps(result, indent=1) + "\n")
        write_atomic(out / "train-cpu.md", _markdown(result, hf))
        print(f"wrote {out / 'train-cpu.md'}")
    return 0


def _markdown(result: dict, hf: dict) -> str:
    lines = [f"# `{result['command']}`", "",
             f"{result['machine']}, {result['date']}; 1-minute load average {result['load_average_1min'][0]:.2f} "
             f"before, {result['load_average_1min'][1]:.2f} after.", "",
             f"One training step of `tiny-gemma3` (forward, backward, clip, AdamW) on {result['batch_size']} × "
             f"{result['seq_len']} tokens; each run is the median of {result['steps']} timed steps after warm-up. "
             f"Every system ran {result.get('repeats', 1)} times, in turn, each time in a fresh process; the row is "
             "its median run, and `range` the slowest and fastest run's tokens/s. `vs HF` compares with "
             "transformers at the same precision: float32, or bf16 mixed precision (`torch.autocast`, "
             "`-bf16`).", "",
             "| system | precision | tokens/s | range | vs HF | step (ms) | step memory (MiB) | vs HF | peak RSS (MiB) "
             "| warm-up (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["systems"]:
        base = hf.get(r["precision"])
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['step_memory_mib'] / base['step_memory_mib']:.2f}x" if base and base["step_memory_mib"] > 0 else "-"
        lo, hi = r["tokens_per_s_range"]
        lines.append(f"| {r['system']} | {r['precision']} | {r['tokens_per_s']:.0f} | {lo:.0f}-{hi:.0f} | {speed} | "
                     f"{r['step_ms']:.1f} | {r['step_memory_mib']:.0f} | {mem} | {r['peak_rss_mib']:.0f} | "
                     f"{r['warmup_s']:.1f} |")
    if result["loss_memory"]:
        m = {x["kind"]: x for x in result["loss_memory"]}
        lines += ["", f"Head + loss alone at the real vocabulary (262,144), {m['eager']['rows']} rows of width 640, "
                  "forward and backward, each in a fresh process:", "",
                  "| loss | peak extra memory (MiB) |", "|---|---|"]
        for kind in ("eager", "chunked"):
            if kind in m:
                lines.append(f"| {kind} | {m[kind]['extra_mib']:.0f} |")
        if "eager" in m and "chunked" in m and m["chunked"]["extra_mib"] > 0:
            lines.append(f"\nchunked uses {m['eager']['extra_mib'] / m['chunked']['extra_mib']:.1f}x less.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
