"""Your functions inside the real Gemma 3 270M: the hook behind the capstone (exercise 06.capstone).

The exercises of chapters 01-04 ask for six functions, each checked against the package on its own.
The capstone puts all six into the real model and asks for the same greedy text:

    from minigemma.learner import YourGemma
    yours = YourGemma(rms_norm=rms_norm, rope=rope, gqa_attention=gqa_attention, geglu=geglu,
                      layer_mask=layer_mask, kv_cache_update=kv_cache_update)
    yours(["The capital of France is"], max_new_tokens=6)   # greedy text, your code doing the maths

How it works (`with_functions`): the model is copied module by module, and in the copy each module that
one of your functions replaces becomes an instance of a small subclass that calls your function (the
package's one swap mechanism, `minigemma.swap.swap_modules`, with the table `LEARNER_CLASSES`). The copies
share every parameter with the model (no weights are copied, the model itself is left as it is), so
only the maths changes:

    module                                  subclass here      what it calls
    layers.RMSNorm (all norms, QK-norm too) YourRMSNorm        rms_norm(x, weight, eps)
    layers.GeGLU                            YourGeGLU          geglu(x, w_gate, w_up, w_down)
    attention.GroupedQueryAttention         YourAttention      rope(x, positions, base) in `project`;
                                                               layer_mask(T, layer_idx, window, every) and
                                                               gqa_attention(q, k, v, mask) in `attention`;
                                                               a YourKVCache for every layer in `new_cache`
    attention.KVCache                       YourKVCache        kv_cache_update(cache_k, cache_v, length, k, v)

These are the exercises' own signatures (01.rope, 02.gqa_attention, 02.kv_cache_update, 03.rms_norm,
03.geglu, 04.layer_mask), and the two places a faster module would hook in too (docs/ARCHITECTURE.md,
"one forward path"): `GroupedQueryAttention.project` applies RoPE, `GroupedQueryAttention.attention`
attends. A function you do not give keeps the package's. Your mask is the whole (n, n) mask of the
n tokens so far; each call takes the rows of its queries and the columns of the keys it attends, so one
mask function serves the prompt and every decode step. With your cache every layer keeps a static
buffer of all its tokens (local layers too: their window comes from your mask, not from a ring buffer).

Your functions see one document per row, as the exercises do: rows of equal length, no padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import torch
from torch import nn

from . import attention, layers
from .attention import Keys, grouped_query_attention, index_mask, split_heads
from .gemma import layer_pattern
from .swap import Swap, retype, swap_modules

# name -> (signature, the exercise that checks it on its own)
FUNCTIONS: dict[str, tuple[str, str]] = {
    "rms_norm": ("rms_norm(x, weight, eps)", "03.rms_norm"),
    "rope": ("rope(x, positions, base)", "01.rope"),
    "gqa_attention": ("gqa_attention(q, k, v, mask)", "02.gqa_attention"),
    "geglu": ("geglu(x, w_gate, w_up, w_down)", "03.geglu"),
    "layer_mask": ("layer_mask(T, layer_idx, window, every)", "04.layer_mask"),
    "kv_cache_update": ("kv_cache_update(cache_k, cache_v, length, k, v)", "02.kv_cache_update"),
}


class YourRMSNorm(layers.RMSNorm):
    """`layers.RMSNorm` computed by your `rms_norm(x, weight, eps)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._yours["rms_norm"](x, self.weight, self.eps)


class YourGeGLU(layers.GeGLU):
    """`layers.GeGLU` computed by your `geglu(x, w_gate, w_up, w_down)`: the fused (2F, C) gate_up
    weight is handed over as its two halves, gate rows first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate_up_proj.weight
        F_ = self.intermediate
        return self._yours["geglu"](x, w[:F_], w[F_:], self.down_proj.weight)


class YourKVCache(attention.KVCache):
    """`attention.KVCache` (a static buffer of max_len) written by your
    `kv_cache_update(cache_k, cache_v, length, k, v) -> (cache_k, cache_v, new_length)`; the new
    queries attend the first new_length slots, as in the package's."""

    def update(self, k: torch.Tensor, v: torch.Tensor):
        attention.check_new_kv(self, k, v)
        if self.length + k.shape[2] > self.max_len:
            raise ValueError(f"KV cache is full: {self.length + k.shape[2]} tokens do not fit in max_len={self.max_len}")
        self.k, self.v, n = self._yours["kv_cache_update"](self.k, self.v, self.length, k, v)
        self.length = int(n)
        return self.k[:, :, :self.length], self.v[:, :, :self.length], Keys(0, self.length, layout=("kv", self.length))


class YourAttention(attention.GroupedQueryAttention):
    """`attention.GroupedQueryAttention` with your RoPE, your mask, your attention and your cache (any
    of them; the others stay the package's). `_layer` = (layer_idx, window, every) of this layer in its
    model, which is what your `layer_mask` is asked."""

    def project(self, x: torch.Tensor, pos: attention.Positions):
        rope = self._yours.get("rope")
        if rope is None:
            return super().project(x, pos)
        # the package's projection (fused q/k/v, heads, QK-norm), then your RoPE at this layer's base
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = split_heads(q, H), split_heads(k, K), split_heads(v, K)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = _one_document(pos)
        return rope(q, positions, self.rotary.base), rope(k, positions, self.rotary.base), v

    def attention(self, q, k, v, pos: attention.Positions, keys: attention.Keys) -> torch.Tensor:
        yours = self._yours
        if "gqa_attention" not in yours and "layer_mask" not in yours:
            return super().attention(q, k, v, pos, keys)
        _one_document(pos)
        k_idx = (torch.arange(keys.first, keys.first + keys.count, device=q.device) if keys.in_order
                 else keys.index())  # (S,) the index of each key given
        if "layer_mask" in yours:
            n = pos.start + q.shape[2]  # tokens so far: the mask of all of them, then our rows and columns
            layer_idx, window, every = self._layer
            full = yours["layer_mask"](n, layer_idx, window, every)
            if not isinstance(full, torch.Tensor) or tuple(full.shape) != (n, n) or full.dtype != torch.bool:
                raise ValueError(f"layer_mask({n}, {layer_idx}, {window}, {every}) must return a ({n}, {n}) "
                                 f"boolean tensor, got {_kind(full)}")
            mask = full.to(q.device)[pos.index][:, k_idx]  # (T, S)
        else:
            mask = index_mask(pos.index, k_idx, self.window)  # the package's mask of this layer
        if "gqa_attention" not in yours:
            return grouped_query_attention(q, k, v, mask, self.scale)
        # your attention scales by 1/sqrt(D); Gemma's scale is query_pre_attn_scalar^-1/2 (the same for the 270M)
        return yours["gqa_attention"](q * (self.scale * math.sqrt(self.head_dim)), k, v, mask)

    def new_cache(self, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        if "kv_cache_update" not in self._yours:
            return super().new_cache(batch, max_len, dtype, device)
        if max_len is None:
            raise ValueError("your KV cache is a static buffer: give max_len")
        cache = YourKVCache(batch, self.n_kv_heads, self.head_dim, max_len=max_len, dtype=dtype, device=device)
        cache._yours = self._yours
        return cache


LEARNER_CLASSES: dict[type, tuple[type, tuple[str, ...]]] = {  # module class -> (subclass, the functions it calls)
    layers.RMSNorm: (YourRMSNorm, ("rms_norm",)),
    layers.GeGLU: (YourGeGLU, ("geglu",)),
    attention.GroupedQueryAttention: (YourAttention, ("rope", "gqa_attention", "layer_mask", "kv_cache_update")),
}


def _kind(x) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _one_document(pos: attention.Positions) -> torch.Tensor:
    """(T,) the positions of the new tokens, the same in every row: your functions see one document."""
    if pos.packed or pos.documents is not None or not bool((pos.positions == pos.positions[:1]).all()):
        raise NotImplementedError("your functions take one document per row: the capstone's prompts have equal "
                                  "lengths, with no padding")
    return pos.positions[0]


def every_of(layer_types: Sequence[str]) -> int:
    """The `every` of a layer pattern (layer i global iff (i + 1) % every == 0), as layer_mask is asked."""
    n = len(layer_types)
    for every in range(1, n + 2):
        if layer_pattern(n, every) == list(layer_types):
            return every
    raise ValueError(f"these layer types follow no 'every' pattern, so layer_mask cannot describe them: {layer_types}")


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree: new module objects (same classes, same attributes), holding the very
    same Parameter and buffer objects, so the copy shares every weight and can be swapped on its own."""
    new = type(module).__new__(type(module))
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)  # the same Parameter objects: shared, not copied
    new._buffers = dict(module._buffers)
    new._modules = {name: None if child is None else structural_copy(child) for name, child in module._modules.items()}
    return new


def windowed(model: nn.Module, window: int) -> nn.Module:
    """A copy of a Gemma (sharing every parameter) whose local layers see `window` keys instead of the
    config's: a short prompt then has keys the window cuts. Global layers stay global."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    copy = structural_copy(model)
    copy.config = dataclasses.replace(model.config, sliding_window=window)
    for module in copy.modules():
        if isinstance(module, attention.GroupedQueryAttention) and module.window is not None:
            module.window = window
    return copy


def with_functions(model: nn.Module, **functions: Callable) -> nn.Module:
    """A copy of a Gemma (2 or 3, decoder) whose modules call your functions (see the module docstring);
    it shares every parameter with `model`, which is left as it is. Unknown names are an error."""
    unknown = sorted(set(functions) - set(FUNCTIONS))
    if unknown:
        raise TypeError(f"unknown functions {unknown}; the hook takes {', '.join(FUNCTIONS)}")
    cfg = model.config
    if getattr(cfg, "bidirectional", False):
        raise ValueError("the capstone hook is for decoders: an encoder's band is not a layer_mask")
    yours = structural_copy(model)
    layer_of = {id(layer.self_attn): i for i, layer in enumerate(getattr(yours, "layers", []))}
    every = every_of(cfg.layer_types) if "layer_mask" in functions else None

    def swap_in(cls: type, wants: tuple[str, ...]) -> Swap:
        def swap(module: nn.Module) -> nn.Module | None:
            given = {name: functions[name] for name in wants if name in functions}
            if not given:
                return None  # none of your functions computes this module: the package's class stays
            if isinstance(module, attention.GroupedQueryAttention):
                if id(module) not in layer_of and "layer_mask" in given:
                    raise ValueError("layer_mask needs the layer's index: swap a whole model, not one layer")
                module._layer = (layer_of.get(id(module)), cfg.sliding_window, every)
            module._yours = given
            module = retype(cls)(module)  # a module of the copy: the model's own keeps its class
            _check_supported(module, given)
            return module

        return swap

    swap_modules(yours, {torch_cls: swap_in(cls, wants) for torch_cls, (cls, wants) in LEARNER_CLASSES.items()})
    return yours


def _check_supported(module: nn.Module, given: dict) -> None:
    """Say so clearly where the model does something the exercises' signatures cannot express."""
    if isinstance(module, YourGeGLU) and module.gate_up_proj.bias is not None:
        raise ValueError("geglu(x, w_gate, w_up, w_down) has no biases; this MLP has them (Griffin)")
    if isinstance(module, YourAttention):
        if "rope" in given and (module.rotary.rotary_dim != module.head_dim or module.rotary.scaling != 1.0):
            raise ValueError("rope(x, positions, base) rotates all of head_dim without scaling; this layer's "
                             f"RoPE is {module.rotary.extra_repr()}")
        if "gqa_attention" in given and module.softcap:
            raise ValueError("gqa_attention(q, k, v, mask) has no soft-cap; this layer caps its logits (Gemma 2)")
        if not module.causal:
            raise ValueError("the capstone hook is for causal decoders")


# --------------------------------------------------------------------------------------------
# The capstone: greedy text of the real model, with your functions
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def reference_model():
    """Gemma 3 270M in float32 and its tokenizer, loaded once per process."""
    from .pretrained import load_pretrained

    model, tokenizer = load_pretrained("gemma3-270m")
    return model.eval(), tokenizer


def greedy_texts(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt (cached decoding, the package's loop). Prompts of the
    same token length run as one batch, so no row is padded."""
    from .generation import generate_ids

    ids = [tokenizer.encode(p) for p in prompts]
    out: list[str | None] = [None] * len(prompts)
    for n in sorted({len(i) for i in ids}):
        rows = [r for r, i in enumerate(ids) if len(i) == n]
        new = generate_ids(model, [ids[r] for r in rows], max_new_tokens, eos_id=None)
        for r, toks in zip(rows, new):
            out[r] = tokenizer.decode(toks)
    return out


_TEXTS: dict = {}  # (functions, prompts, max_new_tokens, window) -> texts: see YourGemma


class YourGemma:
    """Gemma 3 270M (float32) with your functions swapped in: `yours(prompts, max_new_tokens)` returns
    the greedy texts. Any subset of the six functions of `FUNCTIONS` may be given. `window=3` cuts
    the local layers' window from 512 to 3 keys, so that a short prompt reaches its edge too.

    Texts are remembered per function objects, prompts and length, so a check that runs on several
    seeds, and the diagnosis that swaps each function in alone, generate each text once. Redefining
    a function makes a new object, so it is run again.
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

    def only(self, name: str) -> "YourGemma":
        """The same, with only your `name` swapped in (the package's code everywhere else)."""
        return YourGemma(**{name: self.functions[name]})

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, window: int | None = None) -> list[str]:
        key = (tuple(self.functions.items()), tuple(prompts), max_new_tokens, window)
        if key not in _TEXTS:
            model, tokenizer = reference_model()
            model = model if window is None else windowed(model, window)  # your layer_mask is asked this window
            _TEXTS[key] = greedy_texts(with_functions(model, **self.functions), tokenizer, prompts, max_new_tokens)
        return list(_TEXTS[key])

    def __repr__(self) -> str:
        return f"YourGemma({', '.join(self.functions) or 'nothing swapped'})"


def swapped_alone(pieces: dict[str, str], outputs_alone: Callable[[str], object],
                  wrong: Callable[[object], str | None], what: str, kind: str = "function",
                  shapes: str = "the model's shapes") -> str:
    """Every capstone's diagnosis: which of the learner's pieces breaks `what` ("the text", "the logits").

    pieces: name -> the exercise that checks it on its own. outputs_alone(name): the capstone's output
    with only that piece swapped in (the package's code everywhere else). wrong(output): None if it
    matches the reference, else a detail for the report ("" for none). A piece that raises
    NotImplementedError is not written yet; any other error names the piece too."""
    todo, broken = [], []
    for name, exercise in pieces.items():
        try:
            alone = outputs_alone(name)
        except NotImplementedError:
            todo.append(name)
            continue
        except Exception as e:  # noqa: BLE001 - a learner's error names the piece too
            why = f": {str(e).splitlines()[0][:80]}" if str(e).strip() else ""
            broken.append(f"your {name} (it raises {type(e).__name__}{why}; exercise {exercise})")
            continue
        detail = wrong(alone)
        if detail is not None:
            broken.append(f"your {name} (exercise {exercise}{detail})")
    parts = []
    if broken:
        parts.append(f"broken by {', '.join(broken)}: swapped in alone, it changes {what}")
    if todo:
        parts.append(f"not written yet: {', '.join(todo)}")
    if not parts:
        return (f"each of your {kind}s alone keeps {what}, all of them together do not: small differences "
                f"add up; compare your {kind}s' outputs with the package's on {shapes}")
    return "; ".join(parts)


def diagnose(fn, case, expected) -> str | None:
    """Which of your functions breaks the text: each is swapped in alone, and its text compared."""
    if not isinstance(fn, YourGemma) or not fn.functions:
        return None
    return swapped_alone({name: FUNCTIONS[name][1] for name in fn.functions},
                         lambda name: fn.only(name)(*case.args, **case.kwargs),
                         lambda alone: None if alone == expected else "", "the text")
