"""Your functions inside a RecurrentGemma: the hook behind chapter 07's capstone (exercise 07.capstone).

Chapter 07's exercises ask for the pieces of Griffin one at a time, each checked on its own. The capstone
puts five of them into a whole RecurrentGemma (`minigemma.griffin.Griffin`) and asks for the model's
logits, for a prompt and for the tokens that follow it through the cache:

    from minigemma.learner_griffin import YourGriffin
    yours = YourGriffin(rglru_step=rglru_step, associative_scan=associative_scan,
                        conv1d_with_cache=conv1d_with_cache, recurrent_block=recurrent_block,
                        local_attention=local_attention)
    yours(ids, feed=(11, 2, 1, 1))   # logits (B, 15, V): a prompt of 11, a chunk of 2, two decode steps

How it works (`with_functions`): as for chapter 06's capstone (`minigemma.learner`), the model is copied
module by module (`learner.structural_copy`: the copies share every parameter), and in the copy each
module that one of your functions computes becomes an instance of a small subclass that calls it (the
package's one swap mechanism, `minigemma.swap.swap_modules`, with the table `LEARNER_CLASSES`):

    module                        subclass here         what it calls
    griffin.RecurrentBlock        YourRecurrentBlock    recurrent_block(x, linear_y, linear_x, conv_1d, rg_lru,
                                                        linear_out): the block's modules as functions of one
                                                        tensor; conv_1d and rg_lru carry the block's state
    griffin.Conv1D                YourConv1D            conv1d_with_cache(x, w, bias, x_prev): x_prev is the
                                                        state's last P - 1 inputs (zeros for a new sequence),
                                                        the cache it returns is the state's next
    griffin.RGLRU                 YourRGLRU             associative_scan(a, b, h0) in `recurrence` (where a
                                                        kernel goes too): the package's gates give a and b;
                                                        rglru_step(x, r, i, lam, h_prev, reset) one token at a
                                                        time, from the state's h (lam = Λ = -a_param)
    attention.GroupedQueryAttention  YourLocalAttention local_attention(q, k, v, positions, config) over every
                                                        token so far (q, k, v before RoPE, kept in a
                                                        `TokensSoFar` cache); the rows of the new tokens

These are the exercises' own signatures (07.rglru_step, 07.associative_scan, 07.conv1d_with_cache,
07.recurrent_block, 07.local_attention). A function you do not give keeps the package's code. The RG-LRU
runs a prompt or a chunk (T > 1) through your scan when you give one, and each decode step (T = 1) through
your rglru_step when you give one, as a served model does (a parallel scan over the prompt, one step per
token after it); given alone, either one runs every call. Your local attention computes RoPE, the window
and the attention of all the tokens so far at every call, so its cache keeps them all: the window comes
from your mask, not from a ring buffer.

Your functions see one document per row, as the exercises do: rows of equal length, no padding.

The capstone's model (`capstone_model`) is a small RecurrentGemma with random weights drawn from a fixed
seed: the real checkpoints are too large for a check that runs in a few seconds, and every mechanism the
capstone covers only needs the shapes to be right and the numbers to be far from zero.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import nn

from .attention import GroupedQueryAttention, Positions, merge_heads, positions_after, split_heads
from .griffin import RGLRU, Conv1D, Griffin, GriffinConfig, RecurrentBlock, RecurrentState
from .learner import structural_copy, swapped_alone
from .swap import Swap, retype, swap_modules

# name -> (signature, the exercise that checks it on its own)
FUNCTIONS: dict[str, tuple[str, str]] = {
    "rglru_step": ("rglru_step(x, r, i, lam, h_prev, reset)", "07.rglru_step"),
    "associative_scan": ("associative_scan(a, b, h0)", "07.associative_scan"),
    "conv1d_with_cache": ("conv1d_with_cache(x, w, bias, x_prev)", "07.conv1d_with_cache"),
    "recurrent_block": ("recurrent_block(x, linear_y, linear_x, conv_1d, rg_lru, linear_out)", "07.recurrent_block"),
    "local_attention": ("local_attention(q, k, v, positions, config)", "07.local_attention"),
}


def _tensor(got, name: str, shape: tuple) -> torch.Tensor:
    """`got` if it is a tensor of `shape`, else a clear error that names your function."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(shape):
        kind = f"a tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
        raise ValueError(f"your {name} returned {kind}; expected a tensor of shape {tuple(shape)}")
    return got


def _pair(got, name: str, first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ValueError(f"your {name} returned {type(got).__name__}; expected a pair of tensors, shapes "
                         f"{tuple(first)} and {tuple(second)}")
    return _tensor(got[0], name, first), _tensor(got[1], name, second)


class YourRGLRU(RGLRU):
    """`griffin.RGLRU` with your scan (`recurrence`) and your one-step RG-LRU (decode steps)."""

    def forward(self, x, positions, state: RecurrentState | None = None):
        yours = self._yours
        B, T, R = x.shape
        if "rglru_step" not in yours or (T > 1 and "associative_scan" in yours):
            return super().forward(x, positions, state)  # the package's gates, a and b; `recurrence` chains them
        r = torch.sigmoid(self.a_gate(x))
        i = torch.sigmoid(self.input_gate(x))
        lam = -self.a_param  # Λ: the parameter stores -Λ, so σ(Λ) = exp(-softplus(a_param))
        reset = positions == 0  # (B, T): a document starts
        h = torch.zeros(B, R, dtype=torch.float32, device=x.device) if state is None else state.h
        hs = []
        for t in range(T):
            h = _tensor(yours["rglru_step"](x[:, t], r[:, t], i[:, t], lam, h, reset[:, t]), "rglru_step", (B, R))
            hs.append(h)
        if state is not None:
            state.h = h.float()
        return torch.stack(hs, dim=1).to(x.dtype)

    def recurrence(self, a, b, h0=None):
        if "associative_scan" not in self._yours:
            return super().recurrence(a, b, h0)
        B, T, R = a.shape
        h, h_last = _pair(self._yours["associative_scan"](a, b, h0), "associative_scan", (B, T, R), (B, R))
        return h.float(), h_last.float()


class YourConv1D(Conv1D):
    """`griffin.Conv1D` computed by your `conv1d_with_cache(x, w, bias, x_prev) -> (y, new cache)`."""

    def forward(self, x, positions, state: RecurrentState | None = None):
        if positions is not None:
            raise ValueError("your conv1d_with_cache takes one document per row: the capstone's rows have no "
                             "padding and no packed documents")
        B, T, R = x.shape
        P = self.weight.shape[0]
        x_prev = x.new_zeros(B, P - 1, R) if state is None else state.conv_x
        y, tail = _pair(self._yours["conv1d_with_cache"](x, self.weight, self.bias, x_prev), "conv1d_with_cache",
                        (B, T, R), (B, P - 1, R))
        if state is not None:
            state.conv_x = tail.to(state.conv_x.dtype)
        return y


class YourRecurrentBlock(RecurrentBlock):
    """`griffin.RecurrentBlock` computed by your `recurrent_block`, given the block's modules as functions
    of one tensor: the conv and the RG-LRU read and update the block's state (yours, if you gave them)."""

    def forward(self, x: torch.Tensor, pos: Positions, cache: RecurrentState | None = None) -> torch.Tensor:
        if pos.packed:
            raise ValueError("your recurrent_block takes one document per row: the capstone's rows have no "
                             "padding and no packed documents")

        def conv_1d(u):
            return self.conv_1d(u, None, cache)

        def rg_lru(u):
            return self.rg_lru(u, pos.positions, cache)

        out = self._yours["recurrent_block"](x, self.linear_y, self.linear_x, conv_1d, rg_lru, self.linear_out)
        return _tensor(out, "recurrent_block", x.shape)


class TokensSoFar:
    """YourLocalAttention's cache: q, k and v (before RoPE) of every token so far, (B, H or K, S, D)."""

    def __init__(self, batch: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype=torch.float32, device=None):
        self.q = torch.zeros(batch, n_heads, 0, head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, q, k, v):
        self.q, self.k, self.v = (torch.cat([old, new.to(old.dtype)], dim=2)
                                  for old, new in ((self.q, q), (self.k, k), (self.v, v)))
        self.length = self.k.shape[2]
        return self.q, self.k, self.v


class YourLocalAttention(GroupedQueryAttention):
    """Griffin's local attention computed by your `local_attention(q, k, v, positions, config)`: the
    package's projections, then your RoPE, window and attention over every token so far, of which the
    new tokens' rows are kept. `_config` is the model's GriffinConfig, which your function is given."""

    def new_cache(self, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        return TokensSoFar(batch, self.n_heads, self.n_kv_heads, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, pos: Positions | None = None, cache: TokensSoFar | None = None):
        B, T, _ = x.shape
        pos = pos or positions_after(cache, B, T, x.device)
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = split_heads(q, H), split_heads(k, K), split_heads(v, K)
        if cache is not None:
            if cache.length != pos.start:
                raise ValueError(f"this layer's cache holds {cache.length} tokens but the new ones start at "
                                 f"index {pos.start}")
            q, k, v = cache.update(q, k, v)  # every token so far
        S = k.shape[2]
        one_document = not pos.packed and pos.documents is None and bool((pos.positions == pos.index).all())
        if not one_document or S != pos.start + T:
            raise ValueError("your local_attention takes one document per row: the capstone's rows have no "
                             "padding and no packed documents")
        out = _tensor(self._yours["local_attention"](q, k, v, torch.arange(S, device=x.device), self._config),
                      "local_attention", (B, H, S, D))
        return self.o_proj(merge_heads(out[:, :, S - T:]))


LEARNER_CLASSES: dict[type, tuple[type, tuple[str, ...]]] = {  # module class -> (subclass, the functions it calls)
    RecurrentBlock: (YourRecurrentBlock, ("recurrent_block",)),
    Conv1D: (YourConv1D, ("conv1d_with_cache",)),
    RGLRU: (YourRGLRU, ("rglru_step", "associative_scan")),
    GroupedQueryAttention: (YourLocalAttention, ("local_attention",)),
}


def with_functions(model: Griffin, **functions: Callable) -> Griffin:
    """A copy of a Griffin whose modules call your functions (see the module docstring); it shares every
    parameter with `model`, which is left as it is. Unknown names are an error."""
    unknown = sorted(set(functions) - set(FUNCTIONS))
    if unknown:
        raise TypeError(f"unknown functions {unknown}; the hook takes {', '.join(FUNCTIONS)}")
    if not isinstance(model, Griffin):
        raise TypeError(f"the hook swaps your functions into a Griffin (minigemma.griffin.Griffin), not a "
                        f"{type(model).__name__}")
    cfg = model.config
    yours = structural_copy(model)

    def swap_in(cls: type, wants: tuple[str, ...]) -> Swap:
        def swap(module: nn.Module) -> nn.Module | None:
            given = {name: functions[name] for name in wants if name in functions}
            if not given:
                return None  # none of your functions computes this module: the package's class stays
            module._yours = given
            if isinstance(module, GroupedQueryAttention):
                module._config = cfg
            module = retype(cls)(module)  # a module of the copy: the model's own keeps its class
            _check_supported(module, cfg)
            return module

        return swap

    swap_modules(yours, {torch_cls: swap_in(cls, wants) for torch_cls, (cls, wants) in LEARNER_CLASSES.items()})
    return yours


def _check_supported(module: nn.Module, cfg: GriffinConfig) -> None:
    """Say so clearly where the model does something the exercises' signatures cannot express."""
    if isinstance(module, YourRGLRU) and module.c != 8.0 and "rglru_step" in module._yours:
        raise ValueError(f"rglru_step uses c = 8 (a = sigmoid(Λ)^(8 r)); this model's rnn_c is {module.c}")
    if isinstance(module, YourLocalAttention):
        keys = cfg.attention_window_size + (1 if cfg.window_edge == "inclusive" else 0)
        if (module.window != keys or module.qk_norm or module.softcap or not module.causal
                or module.rotary.rotary_dim != cfg.rotary_dim or module.rotary.scaling != 1.0
                or module.rotary.base != cfg.rope_base or module.scale != module.head_dim ** -0.5):
            raise ValueError("local_attention(q, k, v, positions, config) computes Griffin's local attention as "
                             "the config describes it; this layer is another kind")


# --------------------------------------------------------------------------------------------
# The capstone: a small RecurrentGemma's logits, your functions doing the maths
# --------------------------------------------------------------------------------------------
# Two recurrent blocks and one attention block (the RecurrentGemma pattern), 4 heads of 8 sharing one
# kv head, a window of 8 (a query sees 9 keys: the official edge), a conv of 4 taps.
CAPSTONE_CONFIG = dict(vocab_size=64, width=32, num_layers=3, num_heads=4, num_kv_heads=1, lru_width=32,
                       mlp_expanded_width=64, conv1d_width=4, attention_window_size=8)
CAPSTONE_SEED = 2024
# The capstone's tolerance: the same maths summed in another order (a scan instead of a loop, a sigmoid
# instead of the package's log space, RoPE's angles computed another way) differs by ~1e-6 in float32
# logits of size ~1; each plausible slip changes them by far more than this.
ATOL, RTOL = 1e-4, 1e-4


@functools.lru_cache(maxsize=1)
def capstone_model() -> Griffin:
    """The capstone's RecurrentGemma (float32): `CAPSTONE_CONFIG` with random weights drawn from a generator
    seeded with `CAPSTONE_SEED` (the same every run, and the global random state is left alone). The
    reference initialisation first; then the norms, the biases and the conv, which it starts at (or near)
    zero, drawn away from it, so that every one of them changes the logits."""
    cfg = GriffinConfig(**CAPSTONE_CONFIG)
    g = torch.Generator().manual_seed(CAPSTONE_SEED)
    with torch.device("meta"):
        model = Griffin(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # moving off the meta device unties the head from the embedding
    model.reset_parameters(generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(0.0, 0.3, generator=g)
            elif name.endswith("conv_1d.weight"):
                p.normal_(0.0, 0.5, generator=g)
    return model.eval().requires_grad_(False)


def fed_logits(model: nn.Module, ids: torch.Tensor, feed: Sequence[int]) -> torch.Tensor:
    """The logits (B, N, V) of ids (B, N) fed to `model` in chunks of the lengths `feed` (summing to N):
    the first is the prompt, each next one continues from the cache (a 1 is one decode step)."""
    if sum(feed) != ids.shape[1] or min(feed) < 1:
        raise ValueError(f"feed {tuple(feed)} must be positive lengths summing to the {ids.shape[1]} tokens")
    cache = model.new_cache(batch=ids.shape[0])
    out, start = [], 0
    with torch.no_grad():
        for n in feed:
            out.append(model(ids[:, start:start + n], cache=cache))
            start += n
    return torch.cat(out, dim=1)


def _with_copied_weights(model: nn.Module) -> nn.Module:
    """A structural copy of `model` holding copies of its parameters (tied ones stay tied)."""
    new = structural_copy(model)
    copies: dict[int, nn.Parameter] = {}
    for module in new.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = copies.setdefault(id(p), nn.Parameter(p.detach().clone(), p.requires_grad))
    return new


class YourGriffin:
    """The capstone's RecurrentGemma (`capstone_model`) with your functions swapped in:
    `yours(ids, feed)` returns the logits (B, N, V) of ids (B, N) fed in chunks of the lengths `feed`
    (a prompt, then what continues from the cache). Any subset of the five functions of `FUNCTIONS`
    may be given. Each call swaps them into a fresh copy of the model, so nothing your functions do to
    the tensors they are handed reaches the next call."""

    def __init__(self, **functions: Callable):
        unknown = sorted(set(functions) - set(FUNCTIONS))
        if unknown:
            raise TypeError(f"unknown functions {unknown}; give any of: "
                            + ", ".join(sig for sig, _ in FUNCTIONS.values()))
        bad = [name for name, f in functions.items() if not callable(f)]
        if bad:
            raise TypeError(f"not functions: {bad}")
        self.functions = {name: functions[name] for name in FUNCTIONS if name in functions}

    def only(self, name: str) -> "YourGriffin":
        """The same, with only your `name` swapped in (the package's code everywhere else)."""
        return YourGriffin(**{name: self.functions[name]})

    def __call__(self, ids: torch.Tensor, feed: Sequence[int]) -> torch.Tensor:
        model = with_functions(_with_copied_weights(capstone_model()), **self.functions)
        return fed_logits(model, ids, feed)

    def __repr__(self) -> str:
        return f"YourGriffin({', '.join(self.functions) or 'nothing swapped'})"


def diagnose(fn, case, expected) -> str | None:
    """Which of your functions breaks the logits: each is swapped in alone, and its logits compared."""
    if not isinstance(fn, YourGriffin) or not fn.functions:
        return None
    return swapped_alone({name: FUNCTIONS[name][1] for name in fn.functions},
                         lambda name: fn.only(name)(*case.args, **case.kwargs),
                         lambda alone: None if alone.shape == expected.shape
                         and torch.allclose(alone, expected, atol=ATOL, rtol=RTOL) else "", "the logits")
