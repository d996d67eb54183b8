"""Text generation: a KV-cached decode loop with greedy, temperature, top-k and top-p sampling.

    model, tok = minigemma.load_pretrained("gemma3-270m")
    minigemma.generate(model, tok, "The capital of France is", max_new_tokens=16)
    minigemma.generate(model, tok, ["Hi", "A longer prompt"], temperature=0.8, top_p=0.95, seed=0)

The loop (chapter 06):

    prefill  the whole (left-padded) prompt goes through the model once, filling every layer's
             cache; only the last position's logits are computed (the 262k-way head is costly)
    decode   one token per step: sample from the last logits, feed the token back, repeat
             until every row has produced EOS or max_new_tokens tokens

The cache comes from `model.new_cache(batch, max_len)`: for Gemma 3, global layers keep every
key (a static buffer of max_len) and local layers a ring buffer of the window, so their memory
stays bounded however long the text grows. Any model with the same call shape works (Gemma,
Griffin): `model(input_ids, attention_mask=..., cache=..., last_only=True) -> (B, 1, V)`.

Command line (prints only the completion on stdout, streamed; progress goes to stderr):

    python -m minigemma generate "PROMPT" [--model gemma3-270m|FILE.gguf|DIR] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S]
        [--quant none|bf16|int8|int4 | --file-codes | --dtype float32|bfloat16] [--compile]

By default it runs the fast path (`fast_path`: for gemma3-270m the GGUF file's own codes on the int4
kernel, `--file-codes`; int8 elsewhere) and says so on stderr; `--dtype float32` gives the float32
reference.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Callable, Sequence

import torch

from .layers import check_token_ids
from .quant import RESCORE


class ContextLengthError(ValueError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf. logits (..., V).

    Ties with the k-th value are kept, so a row may keep more than k entries.
    """
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability is >= p.

    A token is kept if the probability of the tokens strictly more likely than it is < p, so the
    most likely token is always kept and p=1 keeps everything. logits (..., V).
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """A clear error for sampling settings that mean nothing, before any work is done."""
    import math
    import numbers

    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 (or None: no top-k), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None: no top-p), got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax; top-k/p ignored)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------
# The decode loop
# ----------------------------------------------------------------------------------------------
def context_length(model) -> int | None:
    """The longest sequence the model was built for (None: no limit, e.g. Griffin)."""
    return getattr(model.config, "max_position_embeddings", None)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, L), attention_mask (B, L) bool), padded on the left so that every
    row's last prompt token sits in the last column, where the first new token is predicted."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = True
    return ids, mask


# ----------------------------------------------------------------------------------------------
# The decode step compiled once (gpt-fast's recipe, on a CPU)
# ----------------------------------------------------------------------------------------------
def _step(model, token: torch.Tensor, pos, cache) -> torch.Tensor:
    """The step a `CompiledStep` compiles: the model's own trunk and head on one token. (B, 1) -> (B, V)."""
    return model.logits(model.trunk(token, pos, cache))[:, -1]


class CompiledStep:
    """One-token decode steps through `torch.compile`, compiled once for a whole generation.

        step = CompiledStep(model, cache)   # after the prompt; cache from model.new_cache(B, max_len)
        logits = step(next_ids)             # (B,) or (B, 1) -> (B, V); again for every new token

    Eager PyTorch pays its dispatch on each of the ~7,800 small operations of a step of Gemma 3 270M
    (chapter 06 profiles them); inductor fuses them into a few loops of C++. But the compiled graph is
    only reused while nothing it read on the host changes, and an eager step reads the cache's length
    as a Python int (its slices, its RoPE positions, its attention plan): every token would recompile.
    So the step runs with `Positions.captured`, as gpt-fast's model does: the token's index and
    positions live in a tensor (`state`, moved on by one `add_` per step), each cache writes the token
    at that index (`KVCache.write_at`: `index_copy_` into the static buffer) and attends its whole
    buffer under a mask computed from it. Shapes and code are the same at every token, so the first
    step compiles (tens of seconds on 2 cores the first time; a few seconds once inductor's on-disk
    cache holds it) and every later one runs the compiled graph. The host keeps the counts (each
    cache's `length`, the check that the token fits), outside the graph.

    It is the same forward (`model.trunk`, `model.logits`): nothing is rewritten, only the caches'
    write changes, and the quantised modules run inside the graph as they run outside it. Gemma only
    (KV caches with static buffers: `new_cache(B, max_len)`); a Griffin's recurrent state is not written
    this way. Chapter 13's `kernels.graph.DecodeGraph` meets the same rule on a GPU.
    """

    def __init__(self, model, cache):
        from .attention import KVCache, RingKVCache

        bad = [i for i, c in enumerate(cache) if not (isinstance(c, RingKVCache)
                                                      or (isinstance(c, KVCache) and c.max_len is not None))]
        if bad:
            raise ValueError(f"a compiled step needs every layer's cache static (new_cache(B, max_len)) and a "
                             f"KV cache; layer {bad[0]} holds a {type(cache[bad[0]]).__name__}"
                             + ("" if isinstance(cache[bad[0]], (KVCache, RingKVCache)) else
                                " (only a Gemma's steps compile this way)"))
        self.model, self.cache = model, cache
        self.token = torch.zeros(cache.next_position.shape[0], 1, dtype=torch.long, device=cache.next_position.device)
        self.state, self.pos = cache.step_positions(captured=True)  # state: [index, position of each row]
        self.max_len = min((c.max_len for c in cache if c.max_len is not None), default=None)
        # cpp_wrapper: the graph's calls into its kernels are made from generated C++ rather than Python,
        # ~1.3 ms less per step on the course's 2-core machine (16.3 -> 14.7 ms), for a longer first compile
        self.step = torch.compile(_step, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
        self.steps = 0

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        B = self.token.shape[0]
        if token.numel() != B:
            raise ValueError(f"a step takes one token per row, (B,) or (B, 1) with B = {B}; got {tuple(token.shape)}")
        check_token_ids(token.reshape(B, 1), self.model.config.vocab_size)
        if self.max_len is not None and self.cache.length + 1 > self.max_len:
            raise ValueError(f"KV cache is full: {self.cache.length + 1} tokens do not fit in max_len={self.max_len}")
        self.token.copy_(token.reshape(B, 1))
        self.pos._memo.clear()  # the masks and RoPE angles of the last step are recomputed inside the graph
        # After the first step (which compiles) the guards are not evaluated: every call passes the same
        # objects with the same shapes, and the tests count one graph over whole generations (rings that
        # wrap included), so the guards could only ever say "the same graph" (~0.3 ms a step saved of ~15).
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.steps > 0)
        with warnings.catch_warnings(), stance:  # two notes the compiler prints once, harmless here
            warnings.filterwarnings("ignore", "Dynamo detected a call to a `functools.lru_cache`")  # RoPE's table
            warnings.filterwarnings("ignore", "bf16 and fp16 are mixed")  # the Q8_0 embedding's fp16 scales
            logits = self.step(self.model, self.token, self.pos, self.cache)
        for c in self.cache:  # the host's counts, which the graph does not keep
            c.length += 1
        self.cache.stepped(self.state)
        self.steps += 1
        return logits


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_id: int | None = 1, pad_id: int = 0,
                 on_token: Callable[[int, int], None] | None = None, use_cache: bool = True,
                 step_times: list[float] | None = None, graph: bool = False,
                 compile: bool = False) -> list[list[int]]:
    """Token-level generation: prompt id lists -> the new ids of each row (EOS not included).

    on_token(row, token_id) is called for each new token as it is produced.
    use_cache=False recomputes the whole sequence every step (for tests: it must agree).
    step_times: if a list is given, the wall time of every model call is appended to it, the
    prefill first, then one entry per decode step (`python -m minigemma bench generate` reads it).
    graph: capture the decode step once and replay it (`kernels.graph.DecodeGraph`: a CUDA graph on a GPU,
    its stand-in on a CPU), for a Gemma under `use_triton` whose every layer fuses its step.
    compile: run the decode steps through `CompiledStep` (a Gemma: one graph for every step; the first
    step pays the compilation). The prompt runs eagerly either way.
    """
    if graph and compile:
        raise ValueError("graph and compile are two ways to capture the step: choose one")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the tokenizer adds BOS)")
    check_sampling(temperature, top_k, top_p)  # before the prompt's forward pass, not after it
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    longest, limit = max(len(p) for p in prompts), context_length(model)
    if limit is not None and longest > limit:
        raise ContextLengthError(f"the prompt has {longest} tokens but the model's context is {limit} "
                                 f"tokens: shorten the prompt")
    if limit is not None and longest + max_new_tokens > limit:
        raise ContextLengthError(f"the prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) is "
                                 f"{longest + max_new_tokens} tokens, more than the model's context of "
                                 f"{limit}: ask for at most {limit - longest} new tokens")
    B = len(prompts)
    ids, mask = left_pad(prompts, pad_id)
    padded = not bool(mask.all())
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(batch=B, max_len=ids.shape[1] + max_new_tokens) if use_cache else None
    seq, step_in = ids, ids  # everything so far; what to feed this step
    step = None  # the captured decode step, with graph
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        if (graph or compile) and use_cache and cache.length:
            if step is None and graph:
                from minigemma.kernels.graph import DecodeGraph
                step = DecodeGraph(model, cache)
            elif step is None:
                step = CompiledStep(model, cache)
            logits = step(step_in)
        else:
            logits = model(step_in, attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # finished rows idle on PAD
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            if eos_id is not None and t == eos_id:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
        if bool(done.all()):
            break
        if padded:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        if use_cache:
            step_in = nxt[:, None]
        else:
            seq = step_in = torch.cat([seq, nxt[:, None]], dim=1)
    return out


class StreamDecoder:
    """Turns a stream of token ids into a stream of text pieces.

    Decoding token by token would break multi-byte characters (byte-fallback pieces) and
    SentencePiece's spaces, so it decodes everything so far and emits only what is new, holding
    back a trailing incomplete character (U+FFFD) until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special=True)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stream: Callable[[int, str], None] | None = None,
             compile: bool = False) -> str | list[str]:
    """Continue each prompt; return only the completion text (a str for a str, a list for a list).

    temperature 0 is greedy decoding; otherwise logits / temperature are filtered by top_k and
    top_p and sampled (seed makes it reproducible). Each row stops at EOS or after
    max_new_tokens. Prompts of different lengths are left-padded and give the same tokens as
    one at a time. stream(row, text) is called with each new piece of text as it is decoded.
    Raises ContextLengthError if prompt + max_new_tokens exceeds the model's context. compile: the
    decode steps through `CompiledStep` (see `generate_ids`).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    ids = [tokenizer.encode(t) for t in texts]
    decoders = [StreamDecoder(tokenizer) for _ in texts]

    def on_token(row, t):
        piece = decoders[row].push(t)
        if stream is not None and piece:
            stream(row, piece)

    generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, on_token=on_token, compile=compile)
    outs = []
    for row, d in enumerate(decoders):
        rest = d.flush()
        if stream is not None and rest:
            stream(row, rest)
        outs.append(tokenizer.decode(d.ids, skip_special=True))
    return outs[0] if single else outs


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANT_NAMES = {
    None: "float32 (the reference)",
    "bf16": "bfloat16 weights",
    "int8": f"int8 layers, an int4 head whose top {RESCORE} logits are exact, bf16 activations",
    "int4": f"int4 layers, an int4 head whose top {RESCORE} logits are exact, bf16 activations",
}
FILE_CODES_NAME = (f"the GGUF file's own codes on the int4 kernel, an int4 head whose top {RESCORE} logits are exact, "
                   "bf16 activations")


def fast_path(model_name: str) -> dict:
    """What `generate` loads unless told otherwise (load_pretrained's keywords): for the course's GGUF
    checkpoint the file's own codes (whose greedy tokens follow float32's most closely, chapter 05);
    elsewhere int8."""
    return {"file_codes": True} if model_name == "gemma3-270m" else {"quant": "int8"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minigemma generate",
                                 description="Continue a prompt. Only the completion goes to stdout.")
    ap.add_argument("prompt")
    ap.add_argument("--model", default="gemma3-270m",
                    help="checkpoint name, .gguf file or checkpoint directory (default gemma3-270m)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quant", choices=["none", "bf16", "int8", "int4"], default=None,
                    help="weight precision (default: the fast path, --file-codes for gemma3-270m and int8 "
                         "otherwise; none: the float32 reference)")
    ap.add_argument("--file-codes", action="store_true",
                    help="a GGUF checkpoint's own integer codes on the int4 kernel (the default for gemma3-270m)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="unquantised weights in this dtype; --dtype float32 is the reference")
    ap.add_argument("--compile", action="store_true",
                    help="compile the decode step once (CompiledStep, a Gemma): each token 1.3-1.6x faster, after a "
                         "first step that compiles (a minute the first time, seconds once cached); worth it for "
                         "long generations")
    args = ap.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        ap.error(str(e).replace("temperature", "--temperature").replace("top_k", "--top-k").replace("top_p", "--top-p"))
    if sum([args.dtype is not None, args.quant is not None, args.file_codes]) > 1:
        ap.error("--dtype, --quant and --file-codes each choose the weights' precision: give one of them")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.dtype is not None:
        precision = {"dtype": DTYPES[args.dtype]}
    elif args.quant is not None:
        precision = {"quant": None if args.quant == "none" else args.quant}
    else:
        precision = {"file_codes": True} if args.file_codes else fast_path(args.model)

    from .pretrained import load_pretrained

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_pretrained(args.model, **precision)
    except ValueError as e:  # e.g. --file-codes for a checkpoint without codes of its own
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer.model", file=sys.stderr)
        return 2
    if precision.get("file_codes"):
        what = FILE_CODES_NAME
    elif precision.get("dtype") == torch.bfloat16:
        what = QUANT_NAMES["bf16"]
    else:
        what = QUANT_NAMES[precision.get("quant")]
    hint = "; --dtype float32 for the reference" if what != QUANT_NAMES[None] else ""
    print(f"[loaded {args.model} as {what} in {time.perf_counter() - t0:.1f} s{hint}]", file=sys.stderr)

    def stream(row, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=stream, compile=args.compile)
    except ContextLengthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{len(text)} characters in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0
