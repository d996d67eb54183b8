"""The chapters' LONG runs, on several seeds, saved as small JSON histories the chapters plot.

A chapter's `LONG = True` knob gives its full run; running that run on one seed says nothing about how much
another seed would move it. This script runs the same configuration on each seed and writes every run's
history, so that a chapter can draw the mean and the spread beside its live short run:

    .venv/bin/python tools/long_runs.py ch08 --seeds 0 1 2   # docs/runs/ch08-long.json: chapter 08, section 4
                                                             #   (two models, 500 steps of 16 x 128 tokens)
    .venv/bin/python tools/long_runs.py ch09 --seeds 0 1 2   # docs/runs/ch09-long.json: chapter 09's three
                                                             #   objectives (100 steps of 8 x 64 tokens)
    .venv/bin/python tools/long_runs.py ch11 --seeds 0 1 2   # docs/runs/ch11-long.json: chapter 11's recipe and
                                                             #   its ablations (400 steps of 32 queries)

Each function below is its chapter's LONG branch, cell by cell; the chapter checks that the file's `config` is
what its own LONG branch would run.

What a seed sets is stated per chapter in the file (`seed_sets`). The file is
rewritten (atomically) after every run, so an interrupted sweep keeps what it finished; `--resume` skips the
runs the file already holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minigemma import data, train  # noqa: E402
from minigemma.atomic import write_atomic  # noqa: E402

KEEP = ("step", "loss", "val_step", "val_loss")  # what a plot needs (the schedule, grad norms and times are left out)


def dumps(report: dict) -> str:
    """The report as JSON with one run per line: small, and a diff shows which run changed."""
    head = json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1, ensure_ascii=False)[:-2]
    runs = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in report["runs"])
    return f'{head},\n "runs": [\n{runs}\n ]\n}}\n'


def _save(path: Path, report: dict) -> None:
    write_atomic(path, dumps(report).encode())


def _report(chapter: str, seeds: list[int], runs: list[dict], **fields) -> dict:
    return dict(command=f".venv/bin/python tools/long_runs.py {chapter} --seeds {' '.join(map(str, seeds))}",
                **fields, machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                torch=torch.__version__, runs=runs)


def _round(xs) -> list[float]:
    return [round(float(x), 5) for x in xs]


def _history(h: dict) -> dict:
    """The history's curves that a plot needs: step numbers as ints, values to 5 decimals."""
    return {k: [int(v) for v in h[k]] if k.endswith("step") else _round(h[k]) for k in KEEP if k in h}


def _load(path: Path, resume: bool) -> list[dict]:
    if resume and path.is_file():
        return json.loads(path.read_text())["runs"]
    return []


def ch08(seeds: list[int], out: Path, resume: bool) -> None:
    """Chapter 08, section 4: tiny-gemma3 and tiny-griffin, each the recipe as `python -m minigemma train`
    runs it (500 steps of 16 x 128 tokens), on each seed."""
    train_ids, val_ids, _ = data.tokenized_corpus()  # what `python -m minigemma train` reads
    runs = _load(out, resume)
    for seed in seeds:
        for name in ("tiny-gemma3", "tiny-griffin"):
            if any(r["model"] == name and r["seed"] == seed for r in runs):
                continue
            spec = train.load_spec(name)
            cfg = train.TrainConfig(**{**spec["train"], "seed": seed})
            model = train.build_model(spec, seed=seed)
            t = time.perf_counter()
            h = train.train(model, train_ids, val_ids, cfg, spec=spec, desc=f"{name} seed {seed}")
            runs.append(dict(model=name, seed=seed, seconds=round(time.perf_counter() - t, 1),
                             **_history(h)))
            _save(out, _report("ch08", seeds, runs,
                               what="chapter 08 section 4, LONG: each model as `python -m minigemma train NAME` "
                                    "trains it, with TrainConfig.seed = S",
                               seed_sets="the initialisation and the order of the training batches",
                               config={n: train.load_spec(n)["train"] for n in ("tiny-gemma3", "tiny-griffin")}))
            print(f"{name} seed {seed}: validation {h['val_loss'][-1]:.4f} ({time.perf_counter() - t:.0f} s)",
                  flush=True)


# chapter 09's LONG branch (cells 1, 5, 11, 13)
CH09 = dict(steps=100, batch=8, seq=64, val_windows=64, lr=5e-3, k=256, loss_chunk=64)


def ch09(seeds: list[int], out: Path, resume: bool) -> None:
    """Chapter 09: the three objectives from one teacher pass over the LONG run's windows, each student
    initialised from the seed (the windows, their order and the teacher's 256 samples are the chapter's
    own, seed 0: one teacher pass, ten minutes, serves every seed)."""
    import minigemma
    from minigemma import distill
    from minigemma.tokenizer import Tokenizer

    c = CH09
    runs = _load(out, resume)
    todo = [(s, o) for s in seeds for o in distill.OBJECTIVES
            if not any(r["seed"] == s and r["objective"] == o for r in runs)]
    if not todo:
        return
    tokenizer = Tokenizer.from_pretrained("gemma3-270m")
    train_ids, val_ids, _ = data.tokenized_corpus(tokenizer)
    teacher, _ = minigemma.load_pretrained("gemma3-270m", quant="bf16")
    windows = torch.cat([data.window_batch(train_ids, c["batch"], c["seq"], seed=0, step=s) for s in range(c["steps"])])
    val_windows = data.eval_windows(val_ids, c["seq"], c["val_windows"])
    t = time.perf_counter()
    cache = distill.teacher_pass(teacher, windows, k=c["k"], seed=0)
    teacher_s = time.perf_counter() - t
    mass = float(cache.logp.float().exp().sum(-1).mean())
    cfg = train.TrainConfig(steps=c["steps"], batch_size=c["batch"], seq_len=c["seq"], lr=c["lr"],
                            warmup=max(2, c["steps"] // 10), eval_every=max(1, c["steps"] // 4), weight_decay=0.0,
                            loss_chunk=c["loss_chunk"])
    head = teacher.head()
    for seed, objective in todo:
        t = time.perf_counter()
        _, h = distill.train_student(objective, cache, val_windows, cfg, teacher_head=head, seed=seed)
        runs.append(dict(objective=objective, seed=seed, seconds=round(time.perf_counter() - t, 1),
                         **_history(h)))
        _save(out, _report("ch09", seeds, runs, what="chapter 09, LONG: distill.train_student per objective",
                           seed_sets="the student's initialisation (distill.train_student's seed); the windows, "
                                     "their order and the teacher's samples are seed 0's for every seed",
                           config=c, teacher_seconds=round(teacher_s, 1), teacher_mass=round(mass, 5)))
        print(f"{objective} seed {seed}: validation {h['val_loss'][-1]:.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)


# chapter 11's LONG branch (cells 1, 15, 17, 21, 23)
CH11 = dict(n_train=None, n_eval=128, steps=400, batch=32, pre_steps=400, lr=5e-4, vocab=2048)


def ch11(seeds: list[int], out: Path, resume: bool) -> None:
    """Chapter 11: the decoder pre-training once (seed 0, as the chapter), then for each seed the full recipe,
    each ablation, the code-only run, the soup of the two, and the full recipe from a random start."""
    from dataclasses import replace

    from minigemma import contrastive as C
    from minigemma import retrieval as R

    c = CH11
    runs = _load(out, resume)
    D = R.chapter_data(n_train=c["n_train"], n_eval=c["n_eval"])

    def texts(pairs, kind):
        return [p.query if kind == "query" else p.document for p in pairs]

    splits = {"code_train": D.code_train, "text_train": D.text_train, "code_eval": D.code_eval}
    T = {name: {kind: R.teacher_embeddings(texts(pairs, kind), kind, progress=True) for kind in ("query", "document")}
         for name, pairs in splits.items()}
    training = [p.query + "\n" + p.document for p in D.code_train + D.text_train]
    tok = data.train_tokenizer(training, vocab_size=c["vocab"])

    def make_task(pairs, name):
        ids = R.text_ids(texts(pairs, "document"))
        hard = R.mine_hard_negatives(T[name]["query"], T[name]["document"], ids)
        return C.Task(R.tokenize(tok, texts(pairs, "query"), 48), R.tokenize(tok, texts(pairs, "document"), 64),
                      hard, ids, (T[name]["query"], T[name]["document"]))

    code_task, text_task = make_task(D.code_train, "code_train"), make_task(D.text_train, "text_train")
    mixed_task = C.Task.concat([code_task, text_task])
    rows = R.tokenize(tok, training, 10_000)
    stream = torch.tensor([i for r in rows for i in r])
    pre_cfg = train.TrainConfig(steps=c["pre_steps"], batch_size=16, seq_len=128, lr=3e-3, warmup=c["pre_steps"] // 10,
                                eval_every=10**9, ckpt_every=0, bos_id=tok.bos_id)
    decoder, pre_hist = C.pretrain_decoder(stream, len(tok), pre_cfg, progress=True)
    init = decoder.state_dict()
    eq, ed = R.tokenize(tok, texts(D.code_eval, "query"), 48), R.tokenize(tok, texts(D.code_eval, "document"), 64)
    dims = C.LossWeights().mrl_dims

    def table(model):
        tab = R.mrl_table(R.encode_ids(model, eq), R.encode_ids(model, ed), dims)
        return {str(d): {m: round(float(tab[d][m]), 5) for m in ("R@1", "R@5", "R@10", "nDCG@10")} for d in dims}

    teacher = R.mrl_table(T["code_eval"]["query"], T["code_eval"]["document"], dims)
    bm25 = R.retrieval_metrics_from_scores(R.bm25_scores(texts(D.code_eval, "query"), texts(D.code_eval, "document")))
    fixed = dict(pretrain_loss=_round(pre_hist["loss"]), n_code_train=len(D.code_train), n_text_train=len(D.text_train),
                 teacher={str(d): round(float(teacher[d]["nDCG@10"]), 5) for d in dims},
                 bm25={m: round(float(v), 5) for m, v in bm25.items()})

    def report(runs):
        return _report("ch11", seeds, runs, what="chapter 11, LONG: contrastive.train_tiny_encoder per run",
                       seed_sets="EmbedTrainConfig.seed: the student's initialisation before the pre-trained decoder "
                                 "is loaded (all of it for the random start), the order of the pairs and the rest of "
                                 "the steps' randomness; the decoder pre-training is seed 0's for every seed",
                       config=c, **fixed)

    for seed in seeds:
        cfg = C.EmbedTrainConfig(steps=c["steps"], batch_size=c["batch"], lr=c["lr"], warmup=min(10, c["steps"] // 5),
                                 seed=seed)
        plan = [(name, mixed_task, replace(cfg, weights=w), init) for name, w in C.ablations(cfg.weights).items()]
        plan += [("code-only run", code_task, cfg, init), ("random start", mixed_task, cfg, None)]
        models = {}
        need_soup = not any(r["seed"] == seed and r["run"] == "soup" for r in runs)
        for name, task, run_cfg, start in plan:
            have = [r for r in runs if r["seed"] == seed and r["run"] == name]
            if have and not (need_soup and name in ("full recipe", "code-only run")):  # the soup needs their weights
                continue
            t = time.perf_counter()
            model, hist = C.train_tiny_encoder(task, len(tok), run_cfg, init=start)
            models[name] = model
            if have:
                continue
            runs.append(dict(run=name, seed=seed, seconds=round(time.perf_counter() - t, 1),
                             loss=_round(h["loss"] for h in hist), table=table(model)))
            _save(out, report(runs))
            print(f"{name} seed {seed}: nDCG@10 {runs[-1]['table']['768']['nDCG@10']:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        if need_soup:
            souped = C.new_student(len(tok))
            souped.load_state_dict(C.soup([models["code-only run"].state_dict(), models["full recipe"].state_dict()]))
            runs.append(dict(run="soup", seed=seed, table=table(souped)))
            _save(out, report(runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapter", choices=["ch08", "ch09", "ch11"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--resume", action="store_true", help="keep the runs the file already holds")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "docs" / "runs" / f"{args.chapter}-long.json"
    {"ch08": ch08, "ch09": ch09, "ch11": ch11}[args.chapter](args.seeds, out, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
