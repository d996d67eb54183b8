"""Retrieval data and metrics for chapter 11: real text nobody here wrote, reachable offline.

Two tasks, both from the Python installation itself:

    code search  the standard library's own source, read with `ast`: a function's docstring (its
                 first paragraph) is the query, the function without its docstring the document
    text         `pydoc_data.topics`, the language reference behind `help("topic")`: the section
                 title is the query, the section's body the document

The evaluation split is held out by source file (`split_by_file`): no module has functions on both
sides, so the student cannot match an evaluation query by having seen its file's other functions.

Metrics for one relevant document per query (rank r, 1-based): Recall@k = [r <= k], nDCG@10 =
1 / log2(r + 1) if r <= 10 else 0 (the ideal DCG is 1). `bm25_scores` is the classic baseline
(rank-bm25's Okapi BM25). `teacher_embeddings` caches the real EmbeddingGemma's vectors in one
safetensors file per (texts, prompt) under the package cache, written atomically.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .atomic import write_atomic
from .encoder import pad_right, truncate


@dataclass(frozen=True)
class Pair:
    """One (query, document) pair and where it came from (`source`: the file or topic, the split unit)."""

    query: str
    document: str
    source: str
    task: str


# --------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def code_pairs(root: str | Path | None = None, max_doc_chars: int = 400, min_query_words: int = 4,
               max_files: int | None = None) -> list[Pair]:
    """(docstring, body) pairs from every top-level .py file's functions and methods under `root`
    (default: this Python's standard library, tests and site-packages excluded), in file order.

    Kept: functions with a docstring whose first paragraph has >= min_query_words words and a body
    of at least two statements besides the docstring. The document is the function's source,
    docstring removed (`ast.unparse`), cut to `max_doc_chars` characters.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"no source directory at {root}")
    files = sorted(p for p in root.glob("*.py"))
    if max_files is not None:
        files = files[:max_files]
    pairs, seen = [], set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are test fixtures or other encodings
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 3:
                continue
            query = _first_paragraph(doc)
            if len(query.split()) < min_query_words:
                continue
            node.body = node.body[1:]  # drop the docstring: the answer must not contain the question
            document = ast.unparse(node)[:max_doc_chars]
            if (query, document) in seen:
                continue
            seen.add((query, document))
            pairs.append(Pair(query, document, path.stem, "code"))
    return pairs


def topic_pairs(max_doc_chars: int = 400) -> list[Pair]:
    """(title, body) pairs from `pydoc_data.topics` (the language reference's help topics)."""
    from pydoc_data.topics import topics

    pairs = []
    for name in sorted(topics):
        text = topics[name].strip()
        lines = text.split("\n")
        if len(lines) < 3 or not set(lines[1].strip()) <= set("*=-"):
            continue  # no "Title\n*****" header
        body = " ".join("\n".join(lines[2:]).split())[:max_doc_chars]
        pairs.append(Pair(lines[0].strip(), body, f"topic:{name}", "text"))
    return pairs


def split_by_file(pairs: Sequence[Pair], eval_fraction: float = 0.2, salt: str = "ch11") -> tuple[list[Pair], list[Pair]]:
    """(train, eval): a pair goes to eval iff a hash of its source file falls in the eval fraction,
    so every file is wholly on one side."""
    def is_eval(source: str) -> bool:
        h = int(hashlib.sha256(f"{salt}|{source}".encode()).hexdigest()[:8], 16)
        return h / 0xFFFFFFFF < eval_fraction

    train = [p for p in pairs if not is_eval(p.source)]
    held = [p for p in pairs if is_eval(p.source)]
    return train, held


def subsample(pairs: Sequence[Pair], n: int | None, seed: int = 0) -> list[Pair]:
    """n pairs drawn without replacement (deterministic in seed), in their original order; None: all."""
    if n is None or n >= len(pairs):
        return list(pairs)
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [pairs[i] for i in idx.tolist()]


def text_ids(docs: Sequence[str]) -> torch.Tensor:
    """(N,) int64: equal texts get equal ids (the index of the text's first occurrence). As the
    `doc_ids` of `contrastive.nce_loss`, they mark the same document twice in a batch."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(d, i) for i, d in enumerate(docs)], dtype=torch.long)


def mine_hard_negatives(q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """For each query i the index of the highest-scoring document that is not its positive (a
    different text from document i), after skipping the `skip` best such documents (which are the
    likeliest unlabelled positives). q (N, E), d (N, E) unit embeddings (the teacher's) -> (N,) int64."""
    scores = (q.float() @ d.float().T).clone()  # (N, N)
    scores[doc_ids[None, :] == doc_ids[:, None]] = float("-inf")  # the positive and its duplicates
    order = scores.argsort(dim=1, descending=True)
    return order[:, skip]


@dataclass
class ChapterData:
    """The chapter's splits: code train pairs, text train pairs, held-out code pairs."""

    code_train: list[Pair]
    text_train: list[Pair]
    code_eval: list[Pair]


def chapter_data(n_train: int | None = 256, n_eval: int = 128, max_doc_chars: int = 300, seed: int = 0) -> ChapterData:
    """The standard library's code pairs split by file (n_train / n_eval drawn from each side; n_train
    None: every training pair) and every `pydoc_data` topic as the text mixture."""
    train, held = split_by_file(code_pairs(max_doc_chars=max_doc_chars))
    return ChapterData(subsample(train, n_train, seed), topic_pairs(max_doc_chars), subsample(held, n_eval, seed))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def ranks(scores: torch.Tensor, relevant: torch.Tensor | None = None) -> torch.Tensor:
    """scores (Q, N), relevant (Q,) the index of each query's one relevant document (default i) ->
    the 1-based rank of that document (ties counted against it: a tie ranks below)."""
    Q = scores.shape[0]
    relevant = torch.arange(Q) if relevant is None else relevant
    own = scores.gather(1, relevant[:, None])  # (Q, 1)
    return (scores >= own).sum(1)  # itself plus everything scoring at least as well


def recall_at_k(rank: torch.Tensor, k: int) -> float:
    return (rank <= k).double().mean().item()


def ndcg_at_10(rank: torch.Tensor) -> float:
    gain = torch.where(rank <= 10, 1.0 / torch.log2(rank.double() + 1), torch.zeros((), dtype=torch.double))
    return gain.mean().item()


def retrieval_metrics(q: torch.Tensor, d: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"R@k": Recall@k for k in ks, "nDCG@10"} of query embeddings q (Q, E) against documents d (Q, E),
    query i's relevant document being row i (or of any score matrix (Q, N): `retrieval_metrics_from_scores`)."""
    return retrieval_metrics_from_scores(q.float() @ d.float().T, ks)


def retrieval_metrics_from_scores(scores: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`retrieval_metrics` of a score matrix (Q, N) whose query i's relevant document is column i."""
    r = ranks(scores)
    out = {f"R@{k}": recall_at_k(r, k) for k in ks}
    out["nDCG@10"] = ndcg_at_10(r)
    return out


_WORD = re.compile(r"[A-Za-z]+|\d+")


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased words, snake_case and CamelCase split: "getFileName_v2" -> get file name v 2."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
    return [w.lower() for w in _WORD.findall(text)]


def bm25_scores(queries: Sequence[str], docs: Sequence[str]) -> torch.Tensor:
    """Okapi BM25 (rank-bm25, k1 = 1.5, b = 0.75) scores (Q, N)."""
    from rank_bm25 import BM25Okapi

    bm = BM25Okapi([bm25_tokens(d) or ["<empty>"] for d in docs])
    import numpy as np

    return torch.from_numpy(np.stack([bm.get_scores(bm25_tokens(q)) for q in queries]).astype(np.float64))


# --------------------------------------------------------------------------------------------
# The teacher's embeddings, cached
# --------------------------------------------------------------------------------------------
_TEACHERS: dict = {}


def teacher_cache_dir() -> Path:
    from .weights.fetch import cache_dir

    return cache_dir() / "embeddings"


def _key(texts: Sequence[str], prompt_name: str | None, tag: str) -> str:
    h = hashlib.sha256(f"{tag}|{prompt_name}|".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:16]


def teacher_embeddings(texts: Sequence[str], prompt_name: str | None, model=None, quant: str | None = "bf16",
                       batch_size: int = 16, progress: bool = True, cache: str | Path | None = None) -> torch.Tensor:
    """The teacher's unit embeddings (N, 768) of `texts`, from the cache or computed and cached.

    The file is named by a hash of (tag, prompt, every text); it is written atomically
    (`atomic.write_atomic`), so a killed run never leaves a half-written cache. `model` is loaded on a miss if None
    (`load_pretrained("embeddinggemma-300m", quant=quant)`; bf16 is the default here: it keeps cosine
    >= 0.999 with float32 (chapter 10) and was a little faster on this course's CPU, 1.49 vs 1.30
    documents/s on 32 stdlib functions, one thread, a loaded machine).
    """
    from safetensors.torch import load_file, save_file

    tag = f"embeddinggemma-300m-{quant or 'f32'}"
    folder = Path(cache) if cache is not None else teacher_cache_dir()
    path = folder / f"{tag}-{_key(texts, prompt_name, tag)}.safetensors"
    if path.is_file():
        e = load_file(path)["embeddings"]
        if e.shape[0] == len(texts):
            return e
    if model is None:  # loaded once per process, and only on a miss
        if quant not in _TEACHERS:
            from .pretrained import load_pretrained

            _TEACHERS[quant] = load_pretrained("embeddinggemma-300m", quant=quant)[0]
        model = _TEACHERS[quant]
    e = model.encode(list(texts), prompt_name=prompt_name, batch_size=batch_size, progress=progress).contiguous()
    meta = {"prompt_name": str(prompt_name), "n": str(len(texts)), "tag": tag}
    write_atomic(path, lambda tmp: save_file({"embeddings": e}, str(tmp), metadata=meta))
    return e


# --------------------------------------------------------------------------------------------
# Token rows and the student's embeddings of them
# --------------------------------------------------------------------------------------------
def tokenize(tok, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """BOS + text + EOS, cut to max_len tokens (the EOS kept)."""
    return [[tok.bos_id, *ids[:max_len - 2], tok.eos_id] for ids in tok.encode_batch(list(texts), add_bos=False)]


@torch.no_grad()
def encode_ids(model, rows: Sequence[Sequence[int]], batch_size: int = 64, dim: int | None = None) -> torch.Tensor:
    """The student's unit embeddings (N, dim) of token rows, in order, without gradients."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), dim or model.dim)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_right([rows[i] for i in idx])
        out[idx] = model(ids, mask, dim)
    return out


def mrl_table(q: torch.Tensor, d: torch.Tensor, dims: Sequence[int]) -> dict[int, dict[str, float]]:
    """`retrieval_metrics` at each MRL prefix (first d numbers, renormalised)."""
    return {dim: retrieval_metrics(truncate(q, dim), truncate(d, dim)) for dim in dims}

