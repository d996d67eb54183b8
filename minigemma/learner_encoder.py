"""Your functions inside the real EmbeddingGemma 300M: the hook behind chapter 10's capstone (exercise 10.capstone).

Chapter 10's exercises ask for three functions, each checked against the package on its own. The
capstone puts them into the real encoder and asks for the same search results:

    from minigemma.learner_encoder import YourEmbeddingGemma
    yours = YourEmbeddingGemma(mean_pool=mean_pool, mrl_truncate=mrl_truncate, encoder_mask=encoder_mask)
    yours.encode(["how do I sort a list?"], prompt_name="query", dim=128)   # (1, 128), your code doing the maths
    yours(queries, documents, k=3, dims=(None, 128))   # per width: top-k documents, query and document vectors

How it works (`with_functions`), as `minigemma.learner` does it for the decoder: the model is copied
module by module (`learner.structural_copy`: new module objects sharing every parameter, so no weight
is copied and the model itself is left as it is), and in the copy each module that one of your
functions replaces becomes an instance of a small subclass that calls your function:

    module                                   subclass here          what it calls
    attention.GroupedQueryAttention          YourEncoderAttention   encoder_mask(attention_mask, sliding_window)
                                                                    in `attention`, the mask of every layer
    encoder.EmbeddingGemma (the copy's root) YourEncoder            mean_pool(hidden, attention_mask) and
                                                                    mrl_truncate(embeddings, dim) in `pool`

The attention layers are swapped by the package's one swap mechanism, `swap.swap_modules`; the root,
which `swap_modules` never visits (it swaps children), is retyped with the same `swap.retype`.

These are the exercises' own signatures (10.mean_pool, 10.mrl_truncate, 10.encoder_mask). Your mask is
asked, on each layer, for the (B, T, T) mask of the batch: the batch's attention_mask (True for a real
token) and the layer's sliding_window W (512 on a local layer, None on a global one); the layer then
attends with it (`attention.grouped_query_attention`, the readable reference). Your pooling gets the
final-normed token states (B, T, C) and the same attention_mask; the dense layers and the L2
normalisation stay the package's. Your truncation makes the MRL prefix of the normalised vectors;
at full width nothing is truncated. A function you do not give keeps the package's.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, encoder
from .attention import grouped_query_attention
from .learner import structural_copy, swapped_alone
from .swap import retype, swap_modules

# name -> (signature, the exercise that checks it on its own)
FUNCTIONS: dict[str, tuple[str, str]] = {
    "mean_pool": ("mean_pool(hidden, attention_mask)", "10.mean_pool"),
    "mrl_truncate": ("mrl_truncate(embeddings, dim)", "10.mrl_truncate"),
    "encoder_mask": ("encoder_mask(attention_mask, sliding_window)", "10.encoder_mask"),
}


def _kind(x) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class YourEncoderAttention(attention.GroupedQueryAttention):
    """`attention.GroupedQueryAttention` of an encoder, attending with your
    `encoder_mask(attention_mask, sliding_window)`. `_sliding_window` is what this layer asks: the
    config's W on a local layer, None on a global one."""

    def attention(self, q, k, v, pos: attention.Positions, keys: attention.Keys) -> torch.Tensor:
        B, T = q.shape[0], q.shape[2]
        if pos.start != 0 or keys.count != T or not keys.in_order:
            raise NotImplementedError("your encoder_mask covers a whole batch at once: no cache")
        W = self._sliding_window

        def make() -> torch.Tensor:  # once per call and per kind of layer, as the package plans its masks
            # the batch's attention_mask, back from the documents (every pad is its own; real tokens are 0)
            real = (torch.ones(B, T, dtype=torch.bool, device=q.device) if pos.documents is None
                    else pos.documents == 0)
            mask = self._yours["encoder_mask"](real, W)
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T, T) or mask.dtype != torch.bool:
                raise ValueError(f"encoder_mask(attention_mask of shape {(B, T)}, {W}) must return a "
                                 f"({B}, {T}, {T}) boolean tensor, got {_kind(mask)}")
            return mask.to(q.device)[:, None]  # (B, 1, T, T): the same for every head

        mask = pos.once(("your encoder_mask", W), make)
        return grouped_query_attention(q, k, v, mask, self.scale, self.softcap)


class YourEncoder(encoder.EmbeddingGemma):
    """`encoder.EmbeddingGemma` whose `pool` calls your `mean_pool(hidden, attention_mask)` and your
    `mrl_truncate(embeddings, dim)` (either may be missing: the package's then)."""

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        mean_pool = self._yours.get("mean_pool", encoder.mean_pool)
        truncate = self._yours.get("mrl_truncate", encoder.truncate)
        B, C = hidden.shape[0], hidden.shape[-1]
        pooled = mean_pool(hidden, attention_mask)
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (B, C):
            raise ValueError(f"mean_pool(hidden of shape {tuple(hidden.shape)}, attention_mask) must return a "
                             f"({B}, {C}) tensor, got {_kind(pooled)}")
        for linear in self.dense:  # the dense layers and the normalisation: the package's
            pooled = linear(pooled.to(linear.weight.dtype))
        e = F.normalize(pooled.float(), dim=-1)  # (B, E)
        if dim is None or dim == e.shape[-1]:
            return e
        out = truncate(e, dim)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, dim):
            raise ValueError(f"mrl_truncate(embeddings of shape {tuple(e.shape)}, {dim}) must return a ({B}, {dim}) "
                             f"tensor, got {_kind(out)}")
        return out


def with_functions(model: encoder.EmbeddingGemma, **functions: Callable) -> encoder.EmbeddingGemma:
    """A copy of an EmbeddingGemma whose modules call your functions (see the module docstring); it
    shares every parameter with `model`, which is left as it is. Unknown names are an error."""
    unknown = sorted(set(functions) - set(FUNCTIONS))
    if unknown:
        raise TypeError(f"unknown functions {unknown}; the hook takes {', '.join(FUNCTIONS)}")
    if not isinstance(model, encoder.EmbeddingGemma) or type(model) is not encoder.EmbeddingGemma:
        raise TypeError(f"the hook takes an encoder.EmbeddingGemma, got {type(model).__name__}")
    cfg = model.config
    yours = structural_copy(model)

    if "encoder_mask" in functions:
        def swap_in(module: nn.Module) -> nn.Module:
            module._yours = {"encoder_mask": functions["encoder_mask"]}
            module._sliding_window = None if module.window is None else cfg.sliding_window  # as the exercise asks
            return retype(YourEncoderAttention)(module)  # a module of the copy: the model's own keeps its class

        swap_modules(yours, {attention.GroupedQueryAttention: swap_in})
    yours._yours = {name: functions[name] for name in ("mean_pool", "mrl_truncate") if name in functions}
    return retype(YourEncoder)(yours)


# --------------------------------------------------------------------------------------------
# The capstone: search results of the real model, with your functions
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def reference_model():
    """EmbeddingGemma 300M in float32 and its tokenizer, loaded once per process."""
    from .pretrained import load_pretrained

    model, tokenizer = load_pretrained("embeddinggemma-300m")
    return model.eval(), tokenizer


MAX_BATCH_TOKENS = 512  # a batch holds at most this many tokens, pads included


def token_batches(lengths: Sequence[int], max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices of texts with these token counts in batches, longest first: a batch grows while its rows,
    each padded to its longest, hold at most `max_tokens` tokens (a longer text is a batch alone). Texts
    of different lengths in one batch are padded on the right."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def hidden_states(model: encoder.EmbeddingGemma, ids: Sequence[Sequence[int]], pad_id: int):
    """[(rows, hidden (b, T, C), attention_mask (b, T))] for each batch of `token_batches`."""
    out = []
    with torch.inference_mode():
        for rows in token_batches([len(r) for r in ids]):
            input_ids, mask = encoder.pad_right([ids[i] for i in rows], pad_id)
            out.append((rows, model.hidden_states(input_ids, mask), mask))
    return out


def pooled(model: encoder.EmbeddingGemma, states, n: int, dim: int | None) -> torch.Tensor:
    """(n, dim or E) the embeddings of `hidden_states`' batches, in the texts' order."""
    out: list = [None] * n
    with torch.inference_mode():
        for rows, hidden, mask in states:
            for r, e in zip(rows, model.pool(hidden, mask, dim)):
                out[r] = e
    return torch.stack(out)


_STATES: dict = {}  # (encoder_mask or None, texts, prompt_name) -> hidden states


def token_states(texts: Sequence[str], prompt_name: str | None, encoder_mask: Callable | None = None):
    """`hidden_states` of the texts in the reference model, or in its copy with your `encoder_mask` (only the
    mask changes them). Remembered per mask function and texts, so the package's run, yours, and the
    diagnosis that swaps each function in alone run the model once per mask."""
    key = (encoder_mask, tuple(texts), prompt_name)
    if key not in _STATES:
        base, tokenizer = reference_model()
        model = base if encoder_mask is None else with_functions(base, encoder_mask=encoder_mask)
        _STATES[key] = hidden_states(model, base.tokenize(list(texts), prompt_name), tokenizer.pad_id)
    return _STATES[key]


def reference_encode(texts: Sequence[str], prompt_name: str | None = None, dim: int | None = None) -> torch.Tensor:
    """(N, dim or E): EmbeddingGemma 300M's own embeddings, the package's code everywhere."""
    base, _ = reference_model()
    return pooled(base, token_states(texts, prompt_name), len(texts), dim)


def search(encode: Callable, queries: Sequence[str], documents: Sequence[str], k: int,
           dims: Sequence[int | None] = (None,)) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each width of `dims` (None: the full E): the top-k documents of each query by cosine similarity
    (Q, k) long, best first; the query vectors (Q, E) ("query" prompt); the document vectors (N, E)
    ("document" prompt)."""
    out = []
    for dim in dims:
        q = encode(queries, "query", dim)
        d = encode(documents, "document", dim)
        out.append((torch.topk(q @ d.T, k, dim=-1).indices, q, d))
    return out


class YourEmbeddingGemma:
    """EmbeddingGemma 300M (float32) with your functions swapped in. Any subset of the three functions
    of `FUNCTIONS` may be given.

    `encode(texts, prompt_name, dim)`: the embeddings, (N, dim) float32, as `EmbeddingGemma.encode`
    (batched by `token_batches`, so texts of different lengths are padded).
    `yours(queries, documents, k, dims)`: `search` with your functions: for each width of `dims`
    (None: the full 768), the top-k documents of each query by cosine similarity (Q, k), the query
    vectors (Q, E) and the document vectors (N, E).

    The token states are remembered per mask function and texts (`token_states`), so a check that runs
    on several seeds, and the diagnosis that swaps each function in alone, run the model once per mask.
    Redefining a function makes a new object, so it is run again.
    """

    def __init__(self, **functions: Callable):
        unknown = sorted(set(functions) - set(FUNCTIONS))
        if unknown:
            raise TypeError(f"unknown functions {unknown}; give any of: "
                            + ", ".join(sig for sig, _ in FUNCTIONS.values()))
        bad = [name for name, f in functions.items() if not callable(f)]
        if bad:
            raise TypeError(f"not functions: {bad}")
        self.functions = {name: functions[name] for name in FUNCTIONS if name in functions}

    def only(self, name: str) -> "YourEmbeddingGemma":
        """The same, with only your `name` swapped in (the package's code everywhere else)."""
        return YourEmbeddingGemma(**{name: self.functions[name]})

    def encode(self, texts: Sequence[str], prompt_name: str | None = None, dim: int | None = None) -> torch.Tensor:
        base, _ = reference_model()
        states = token_states(texts, prompt_name, self.functions.get("encoder_mask"))
        return pooled(with_functions(base, **self.functions), states, len(texts), dim)

    def __call__(self, queries: Sequence[str], documents: Sequence[str], k: int,
                 dims: Sequence[int | None] = (None,)) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return search(self.encode, queries, documents, k, dims)

    def __repr__(self) -> str:
        return f"YourEmbeddingGemma({', '.join(self.functions) or 'nothing swapped'})"


def same_results(expected, got, atol: float, rtol: float) -> bool:
    """The check's comparison, for the diagnosis: the same top-k documents, vectors within the tolerance."""
    try:
        return len(got) == len(expected) and all(
            torch.equal(t, gt) and all(g.shape == e.shape and torch.allclose(g, e, atol=atol, rtol=rtol)
                                       for g, e in ((gq, q), (gd, d)))
            for (t, q, d), (gt, gq, gd) in zip(expected, got))
    except (TypeError, ValueError, RuntimeError):
        return False


def diagnose(fn, case, expected) -> str | None:
    """Which of your functions breaks the results: each is swapped in alone, and its results compared."""
    if not isinstance(fn, YourEmbeddingGemma) or not fn.functions:
        return None
    return swapped_alone({name: FUNCTIONS[name][1] for name in fn.functions},
                         lambda name: fn.only(name)(*case.args, **case.kwargs),
                         lambda alone: None if same_results(expected, alone, case.atol, case.rtol) else "",
                         "the results")
