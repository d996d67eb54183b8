"""The command line: python -m minigemma embed (chapter 10).

    python -m minigemma embed "some text" "another text"                 # JSON lines, one vector per text
    python -m minigemma embed --dim 256 --out vectors.npy < texts.txt    # one text per line, (N, 256) float32
    python -m minigemma embed --query "copy a file" "shutil.copy ..." "json.dumps ..."   # ranked, best first

The model is `load_pretrained("embeddinggemma-300m")` (or a sentence-transformers folder given with
--model), at the precision --quant names; the work is `EmbeddingGemma.encode` (minigemma/encoder.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atomic import write_atomic


def main(argv=None) -> int:
    """python -m minigemma embed [TEXT ...] [--query Q] [--prompt NAME] [--dim D] [--quant LEVEL] [--out FILE]"""
    ap = argparse.ArgumentParser(
        prog="python -m minigemma embed",
        description="Embed texts with EmbeddingGemma 300M (one text per argument, or one per line of stdin). "
                    "Writes JSON lines {\"text\", \"embedding\"} to stdout, or to --out (.jsonl, or .npy for an "
                    "(N, dim) float32 array). With --query, ranks the texts by cosine similarity to the query "
                    "instead and writes JSON lines {\"rank\", \"score\", \"index\", \"text\"}.")
    ap.add_argument("texts", nargs="*", help="texts to embed; none: read stdin, one text per line")
    ap.add_argument("--query", help="rank the texts against this query (the query gets the 'query' prompt)")
    ap.add_argument("--prompt", help="prompt name for the texts (default: none, or 'document' with --query); "
                                     "e.g. query, document, Clustering, STS")
    ap.add_argument("--dim", type=int, default=None, help="MRL dimension: 768 (default), 512, 256 or 128")
    ap.add_argument("--quant", choices=["bf16", "int8", "int4"], default=None, help="weights (default float32)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the norms, MLPs and RoPE (faster on many texts; "
                                                           "the first batch pays for compiling)")
    ap.add_argument("--top", type=int, default=None, help="with --query: print only the best K")
    ap.add_argument("--out", help="write here instead of stdout: FILE.npy (embeddings) or any other name (JSON lines)")
    ap.add_argument("--model", default="embeddinggemma-300m",
                    help="checkpoint name or a sentence-transformers folder (default embeddinggemma-300m)")
    args = ap.parse_args(argv)

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        ap.error("no texts: pass them as arguments or on stdin, one per line")
    if args.out and args.out.endswith(".npy") and args.query is not None:
        ap.error("--query writes a ranking (JSON lines), not embeddings: drop --query or use another --out name")
    from .encoder import MRL_DIMS, compile_pointwise
    from .pretrained import load_pretrained

    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.dim is not None and args.model == "embeddinggemma-300m" and args.dim not in MRL_DIMS:
        ap.error(f"--dim {args.dim}: EmbeddingGemma embeds at {', '.join(map(str, MRL_DIMS))} (MRL); "
                 "another prefix of its vector is not an embedding")

    model, _ = load_pretrained(args.model, quant=args.quant)
    if args.compile:
        compile_pointwise(model)
    try:
        prompt_name = args.prompt or ("document" if args.query is not None else None)
        emb = model.encode(texts, prompt_name=prompt_name, dim=args.dim, batch_size=args.batch_size)
        q = None if args.query is None else model.encode([args.query], prompt_name="query", dim=args.dim)
    except ValueError as e:
        ap.error(str(e))

    if q is not None:
        scores = (emb @ q[0]).tolist()
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[:args.top]
        lines = [json.dumps({"rank": r + 1, "score": round(scores[i], 6), "index": i, "text": texts[i]})
                 for r, i in enumerate(order)]
    elif args.out and args.out.endswith(".npy"):
        import numpy as np

        def save(tmp):
            with open(tmp, "wb") as f:
                np.save(f, emb.numpy())

        write_atomic(Path(args.out), save)
        print(f"[saved {len(texts)} x {emb.shape[1]} float32 embeddings to {args.out}]", file=sys.stderr)
        return 0
    else:
        lines = [json.dumps({"text": t, "embedding": [round(v, 7) for v in e.tolist()]}) for t, e in zip(texts, emb)]
    text = "\n".join(lines) + "\n"
    if args.out:
        write_atomic(Path(args.out), text)
        print(f"[saved {len(lines)} lines to {args.out}]", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
