"""Chapter 08's stability ablation: which of Gemma's stability features lets a small model train at a high
learning rate.

A 4-layer Gemma (C = 64, 4 heads of 16, vocabulary 1,024: Shakespeare in chapter 08's small tokenizer) is
trained for 60 steps of 8 × 64 tokens at three peak learning rates, in four variants, each changing ONE thing
from the baseline (sandwich norms, no QK-norm, no soft-cap):

    baseline                      RMSNorm before and after each sub-layer (Gemma 2/3's "sandwich")
    + QK-norm (Gemma 3)           q and k RMS-normalised per head before RoPE
    + soft-cap 50 (Gemma 2)       attention logits squashed into (-50, 50) by 50 · tanh(s / 50)
    - post-norms (pre-norm only)  the norms after each sub-layer removed

Each run records its validation loss and, every 10 steps, the largest attention logit |q·k|·scale
(`train.max_attention_logits`): the precursor of the instability QK-norm is meant to stop.

One seed moves the final losses by a few hundredths of a nat, as much as some differences between the
variants, so a claim about them needs several seeds: this writes every run and the mean and range over
seeds 0, 1, 2 (seed 0 is the run chapter 08 makes live):

    python -m minigemma.ablation --seeds 0 1 2 --out docs/runs/ch08-ablation.json

A seed sets both the initialisation and the order of the training batches.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import data, train
from .gemma import Gemma, GemmaConfig

# each variant changes one thing from the baseline
VARIANTS: dict[str, dict] = {
    "baseline": dict(),
    "+ QK-norm (Gemma 3)": dict(qk_norm=True),
    "+ soft-cap 50 (Gemma 2)": dict(softcap=50.0),
    "- post-norms (pre-norm only)": dict(sandwich=False),
}
LRS = (3e-3, 3e-2, 3e-1)  # peak learning rates: gentle, Gemma-ish for this size, too high
STEPS, BATCH, SEQ = 60, 8, 64
VOCAB = 1024
LOGIT_EVERY = 10  # steps between two readings of the largest attention logit


def ablation_model(qk_norm: bool = False, softcap: float | None = None, sandwich: bool = True) -> Gemma:
    """The small Gemma of the ablation: 4 global layers, C = 64, 4 heads of 16, F = 256, V = 1,024."""
    return Gemma(GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                             layer_types=["full_attention"] * 4, sliding_window=64, query_pre_attn_scalar=16,
                             use_qk_norm=qk_norm, attn_logit_softcapping=softcap, sandwich_norm=sandwich))


def run(train_stream: torch.Tensor, val_stream: torch.Tensor, probe: torch.Tensor, seeds: Sequence[int] = (0,),
        lrs: Sequence[float] = LRS, steps: int = STEPS,
        on_run: Callable[[str, float, int], None] | None = None) -> dict[tuple[str, float, int], dict]:
    """Every (variant, lr, seed): train.train's history plus `max_logit`, the largest attention logit on
    `probe` (B, T) every LOGIT_EVERY steps. on_run(variant, lr, seed) is called before each run."""
    runs = {}
    for seed in seeds:
        for variant, kw in VARIANTS.items():
            for lr in lrs:
                if on_run is not None:
                    on_run(variant, lr, seed)
                torch.manual_seed(seed)
                model = ablation_model(**kw)
                logits: list[float] = []
                cfg = train.TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ, lr=lr, warmup=10, clip=0.0,
                                        eval_every=0, eval_windows=16, ckpt_every=0, seed=seed)

                def watch(step, m, loss):
                    if step % LOGIT_EVERY == 0:
                        logits.append(max(train.max_attention_logits(m, probe)))

                history = train.train(model, train_stream, val_stream, cfg, progress=False, callback=watch)
                runs[variant, lr, seed] = dict(history, max_logit=logits)
    return runs


def final_loss(history: dict) -> float:
    """The validation loss at the end of a run (NaN if it diverged or was not evaluated)."""
    v = history["val_loss"][-1] if history["val_loss"] else float("nan")
    return v if math.isfinite(v) else float("nan")


def peak_logit(history: dict) -> float:
    """The largest attention logit a run reached."""
    return max(history["max_logit"], default=float("nan"))


def summarise(runs: dict[tuple[str, float, int], dict]) -> dict:
    """Per variant and lr, over the seeds: the final validation loss and the peak attention logit, each as
    {"mean", "min", "max", "runs"} (runs: one value per seed, in seed order). Keys are "variant @ lr"."""
    out = {}
    seeds = sorted({s for _, _, s in runs})
    for variant in VARIANTS:
        for lr in sorted({lr for _, lr, _ in runs}):
            row = {}
            for name, fn in (("val_loss", final_loss), ("max_logit", peak_logit)):
                vals = [fn(runs[variant, lr, s]) for s in seeds]
                row[name] = dict(mean=statistics.fmean(vals), min=min(vals), max=max(vals), runs=vals)
            out[f"{variant} @ {lr:g}"] = row
    return out


def corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chapter 08's data for the ablation: (train stream, validation stream, probe (8, 64)), in a 1,024-piece
    tokenizer trained on the training works."""
    train_texts, _ = data.split(data.works())
    small_tok = data.train_tokenizer(train_texts.values(), vocab_size=VOCAB)
    train_stream, val_stream, _ = data.tokenized_corpus(small_tok)
    probe = data.window_batch(val_stream, 8, 64, seed=123, step=0)[:, :-1]
    return train_stream, val_stream, probe


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minigemma.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write (atomically)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {args.seeds}")
    if args.out.is_dir():
        ap.error(f"--out is a folder: {args.out}")
    from .atomic import write_atomic

    t0 = time.perf_counter()
    streams = corpus()
    total = len(args.seeds) * len(VARIANTS) * len(LRS)
    done = [0]

    def on_run(variant, lr, seed):
        done[0] += 1
        print(f"[{done[0]}/{total}] seed {seed}, {variant}, lr {lr:g}  ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    runs = run(*streams, seeds=args.seeds, steps=args.steps, on_run=on_run)
    report = dict(command="python -m minigemma.ablation " + " ".join(argv if argv is not None else sys.argv[1:]),
                  seeds=args.seeds, steps=args.steps, lrs=list(LRS), variants=list(VARIANTS),
                  summary=summarise(runs),
                  runs={f"{v} @ {lr:g} @ seed {s}": dict(val_loss=h["val_loss"], max_logit=h["max_logit"],
                                                         loss=h["loss"])
                        for (v, lr, s), h in runs.items()},
                  seconds=round(time.perf_counter() - t0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(report, indent=1) + "\n").encode())
    print(f"wrote {args.out} ({report['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
