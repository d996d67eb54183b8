"""How faithful each system is to the weights: perplexity, KL from float32 and top-1 agreement (chapter 06).

`python -m minigemma bench generate` measures speed; this module measures what the speed costs. Every
system scores the same fixed text, its first 1,024 tokens (Gemma 3's tokenizer, BOS first), and gives
logits at every position. Position i predicts token i + 1, so N tokens give N - 1 scored positions:

    perplexity        exp(mean over positions of -log q(next token)): how well the system predicts the text
    KL(float32 || q)  mean over positions of sum_v p(v) (log p(v) - log q(v)), in nats per token, where p is
                      minigemma-float32's next-token distribution (the reference: every weight dequantised
                      from the file, computed in float32) and q the system's
    top-1 agreement   the fraction of positions where the system's arg-max is float32's arg-max

The text. CPython's language reference as `help("topic")` shows it: `pydoc_data.topics`, its topic
strings joined in sorted key order. Every CPython ships it (pure Python, English prose with code
examples), none of it is stored in this repository (`tests/test_bench_generate.py` checks), and no
part of the decoder was fitted on it (the int4 head's re-scoring was designed on the speed prompts,
Debian's licence texts; its k, 1,024, was raised from 512 after k = 512 missed llama.cpp's KL here, so
for that one choice this text is no longer held out). Chapter 11 does read these topics, as retrieval data for its tiny
encoder, which is not the model scored here. The text changes between Python versions, so the report
records the Python version and the SHA-256 of the text and of the token ids: two runs compare only if
those match.

Memory. The log-probabilities of 1,024 positions over a 262,144-token vocabulary take 1 GiB in
float32, so no process ever holds them all:

  * each system runs one forward pass over the whole text that stops at the final norm (the hidden
    states, (N, C)), then applies its own LM head `CHUNK` = 128 positions at a time: only one chunk's
    V-wide rows are alive at once, (128, V) float32 = 128 MiB each (the logits, the log-probs, the
    reference's, the KL's temporaries: well under 1 GiB together; llama.cpp: the text is decoded in
    batches of `CHUNK` tokens on one KV cache, every position's logits asked for);
  * the reference (minigemma-float32) runs first and writes each chunk's log-probabilities to a
    scratch folder (~1 GiB on disk for 1,024 tokens, deleted when the benchmark ends); every other
    system reads back the matching chunk, computes its KL, agreement and NLL, and drops both.

Each system runs in a fresh process of its own, as the speed runs do. Quality is deterministic, so it
runs once per system, not once per repeat.
"""

from __future__ import annotations

import hashlib
import math
import platform
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

QUALITY_TOKENS = 1024
CHUNK = 128            # positions whose logits exist at once: 128 x 262,144 float32 = 128 MiB
REFERENCE = "minigemma-float32"


# ----------------------------------------------------------------------------------------------
# The text
# ----------------------------------------------------------------------------------------------
def quality_text() -> str:
    """CPython's `pydoc_data.topics`: every topic's text, in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def quality_ids(tokenizer, n: int = QUALITY_TOKENS) -> list[int]:
    """The first n token ids of `quality_text()`, BOS first.

    Only a prefix of the text is encoded (the whole is ~100k tokens): one long enough that the cut
    lies at least 256 tokens beyond the n kept, so it cannot change them."""
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one prediction, got n={n}")
    text = quality_text()
    chars = 8 * n
    while True:
        ids = tokenizer.encode(text[:chars])
        if chars >= len(text) or len(ids) >= n + 256:
            break
        chars *= 2
    if len(ids) < n:
        raise ValueError(f"the quality text has {len(ids)} tokens on this Python, fewer than the {n} asked for")
    return ids[:n]


def ids_sha256(ids: list[int]) -> str:
    """A fingerprint of the token ids scored (the text and the tokenizer together)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def text_info(tokenizer, n: int = QUALITY_TOKENS) -> dict:
    """What the report records about the text, so that a run on another Python says it scored another text."""
    text = quality_text()
    ids = quality_ids(tokenizer, n)
    return dict(source="pydoc_data.topics (CPython's language reference topics, joined in sorted key order)",
                python=platform.python_version(), text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                tokens=n, ids_sha256=ids_sha256(ids), characters=len(tokenizer.decode(ids[1:])))


# ----------------------------------------------------------------------------------------------
# The metrics, on log-probabilities (pure functions: tests/test_bench_generate.py)
# ----------------------------------------------------------------------------------------------
def kl_rows(ref_logp, logq):
    """KL(p || q) of each row, in nats: ref_logp, logq (T, V) log-probabilities -> (T,).

    sum_v p(v) (log p(v) - log q(v)); a p(v) that underflows to 0 contributes 0, as it should."""
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1)


def perplexity(nll_sum: float, n: int) -> float:
    """exp of the mean negative log-likelihood (nats) over n predictions."""
    return math.exp(nll_sum / n)


def score(chunks: Iterable, ids: list[int], ref_dir: str | Path, reference: bool) -> dict:
    """Perplexity, mean KL(float32 || system) and top-1 agreement from a system's logits, chunk by chunk.

    chunks:    the system's logits (t, V) for consecutive positions 0, 1, ..., len(ids) - 2 (each
               predicting the next id), in pieces of any size; the reference's pieces set the sizes
               that every other system must give
    ref_dir:   the reference writes each piece's log-probabilities there (`chunk000.f32`, raw float32,
               row-major); every other system reads them back one at a time
    reference: True for the reference itself (its KL is 0 and its agreement 1 by definition)
    """
    import numpy as np
    import torch

    ref_dir = Path(ref_dir)
    targets = torch.tensor(ids[1:])                            # (N - 1,) the id each position predicts
    nll = kl = 0.0
    agree, at = 0, 0
    for k, logits in enumerate(chunks):
        t, V = logits.shape
        if at + t > len(targets):
            raise ValueError(f"the system gave logits for more than the {len(targets)} scored positions")
        logq = torch.log_softmax(logits.float(), dim=-1)      # (t, V)
        nll -= float(logq.gather(1, targets[at:at + t, None]).double().sum())
        path = ref_dir / f"chunk{k:03d}.f32"
        if reference:
            # Scratch data in a folder the benchmark deletes: a crash leaves the run failed, not a report half-written.
            logq.numpy().tofile(path)
            ref = logq
        else:
            if not path.is_file():
                raise FileNotFoundError(f"no reference log-probabilities {path}: the reference must run first")
            ref = torch.from_numpy(np.fromfile(path, dtype=np.float32))
            if ref.numel() != t * V:
                raise ValueError(f"{path} holds {ref.numel()} values, this chunk has {t} x {V}: the reference "
                                 "was cut into other chunks or has another vocabulary")
            ref = ref.view(t, V)
        kl += float(kl_rows(ref, logq).double().sum())
        agree += int((ref.argmax(-1) == logq.argmax(-1)).sum())
        at += t
        del logq, ref                                          # one chunk of V-wide rows alive at a time
    if at != len(targets):
        raise ValueError(f"the system gave logits for {at} positions, expected {len(targets)}")
    return dict(perplexity=perplexity(nll, at), kl_from_float32=kl / at, top1_agreement=agree / at,
                positions=at, nll_nats=nll / at)


# ----------------------------------------------------------------------------------------------
# Each system's logits at every position, CHUNK positions at a time
# ----------------------------------------------------------------------------------------------
def _spans(n_positions: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n_positions)) for a in range(0, n_positions, chunk)]


def minigemma_logits(level: str, ids: list[int], chunk: int = CHUNK) -> Iterator:
    """One forward pass to the final norm (hidden (N, C)), then the model's own head on `chunk` rows at a time."""
    import torch

    import minigemma

    from .common import load_kwargs

    model, _ = minigemma.load_pretrained("gemma3-270m", **load_kwargs(level))
    hidden = model(torch.tensor([ids]), return_hidden=True)[0]      # (N, C)
    for a, b in _spans(len(ids) - 1, chunk):
        yield model.logits(hidden[None, a:b])[0]                    # (b - a, V), soft-capped as decoding is


def hf_logits(ids: list[int], chunk: int = CHUNK) -> Iterator:
    """transformers' Gemma3ForCausalLM from the same GGUF, float32: its body once, its head in chunks."""
    import torch
    import transformers

    from minigemma.weights.fetch import path

    transformers.logging.set_verbosity_error()
    p = path("gemma3-270m")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                              dtype=torch.float32).eval()
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]   # (N, C)
    cap = getattr(model.config, "final_logit_softcapping", None)
    for a, b in _spans(len(ids) - 1, chunk):
        logits = model.lm_head(hidden[a:b])
        yield logits if not cap else torch.tanh(logits / cap) * cap


def llama_cpp_logits(ids: list[int], chunk: int = CHUNK) -> Iterator:
    """llama.cpp on the file as stored (Q4_K_M), a Llama of its own with logits_all=True.

    The text is decoded `chunk` tokens at a time on one KV cache, each batch asking for every
    position's logits; we read them straight from the context after each batch rather than through
    `Llama.eval`, which would also copy them into its (n_ctx, V) `scores` array (1 GiB here)."""
    import llama_cpp
    import numpy as np
    import torch

    from minigemma.weights.fetch import path

    n = len(ids)
    llm = llama_cpp.Llama(model_path=str(path("gemma3-270m")), n_ctx=n + 8, n_batch=chunk, n_ubatch=chunk,
                          logits_all=True, flash_attn=True, verbose=False)
    V = llm.n_vocab()
    for a, b in _spans(n - 1, chunk):
        piece = ids[a:b]
        llm._batch.set_batch(batch=piece, n_past=a, logits_all=True)
        llm._ctx.decode(llm._batch)
        rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(piece), V))
        yield torch.from_numpy(rows.copy())                          # copied: the next batch overwrites them


def system_logits(system: str, ids: list[int], chunk: int = CHUNK) -> Iterator:
    if system.startswith("minigemma-"):
        return minigemma_logits(system.split("-", 1)[1], ids, chunk)
    if system == "hf-float32":
        return hf_logits(ids, chunk)
    if system == "llama.cpp-Q4_K_M":
        return llama_cpp_logits(ids, chunk)
    raise ValueError(f"unknown system {system!r}")


# ----------------------------------------------------------------------------------------------
# One system, in its own process: prints one RESULT line (common.child_result reads it)
# ----------------------------------------------------------------------------------------------
def _child(system: str, ref_dir: str, n: int, chunk: int) -> None:
    import json

    import torch

    from minigemma.tokenizer import Tokenizer

    from .common import peak_rss_mb

    ids = quality_ids(Tokenizer.from_pretrained("gemma3-270m"), n)
    t = time.perf_counter()
    with torch.inference_mode():
        r = score(system_logits(system, ids, chunk), ids, ref_dir, reference=system == REFERENCE)
    r.update(system=system, seconds=time.perf_counter() - t, peak_rss_mb=peak_rss_mb(), chunk=chunk,
             ids_sha256=ids_sha256(ids))
    print("RESULT " + json.dumps(r), flush=True)


def run_quality(systems: list[str], n: int = QUALITY_TOKENS, chunk: int = CHUNK, runner=None) -> dict:
    """Score every system on the text, the reference first, each in a fresh process; a scratch folder
    holds the reference's log-probabilities until the last system has read them.

    runner(system, ref_dir, n, chunk) -> the child's dict or None (default: a fresh process)."""
    import tempfile

    from minigemma.tokenizer import Tokenizer

    from .common import child_result

    def fresh_process(system, ref_dir, n, chunk):
        return child_result(["minigemma.bench.quality", system, ref_dir, str(n), str(chunk)], f"quality of {system}")

    runner = runner or fresh_process
    info = text_info(Tokenizer.from_pretrained("gemma3-270m"), n)
    order = [REFERENCE] + [s for s in systems if s != REFERENCE]
    results = []
    with tempfile.TemporaryDirectory(prefix="minigemma-quality-") as ref_dir:
        for system in order:
            print(f"[quality of {system} on {n} tokens ...]", file=sys.stderr, flush=True)
            r = runner(system, ref_dir, n, chunk)
            if r is None:
                if system == REFERENCE:
                    print("[quality skipped: the float32 reference failed]", file=sys.stderr)
                    break
                continue
            if r.get("ids_sha256") != info["ids_sha256"]:
                raise RuntimeError(f"{system} scored other token ids than the parent's: the text or tokenizer differs")
            results.append(r)
    return dict(text=info, reference=REFERENCE, chunk=chunk, systems=results)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
