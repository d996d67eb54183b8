"""A decode step captured once and replayed: a CUDA graph, gpt-fast's way to pay for one launch a token.

The host enqueues every kernel a GPU runs, at a few µs a launch; the fused step (`kernels.decode_layer`)
still makes ~100 of them a token. A CUDA graph records the launches of one step (each kernel, its grid,
its arguments: addresses and host numbers) and replays the whole list with one call. A replay re-issues
the *same* arguments, so anything the step works out on the host (an index, a slot, a length) stays
frozen at its value during the capture. A step can be captured only if everything that changes from
token to token lives in device memory, at an address that does not move:

    the token            `DecodeGraph.token` (B, 1), copied in before each replay
    its index, its RoPE  `DecodeGraph.state` (1 + B,) = [index, position of each row], `Positions` views
    positions            of it; one `add_` after each step moves both on
    the KV caches        static (allocated once, `max_len`); each kernel finds its slot from the index
    temporaries          the graph's private memory pool gives each allocation of the capture the same
                         address at every replay

On a CPU there is no CUDA graph: `RecordedGraph` stands in for one. It records every torch op and every
Triton launch of the step with its arguments, and a replay runs the list again with the same tensors
(the same addresses) and the same host numbers, as a GPU would. A value frozen at capture then gives a
wrong replay here as it would there (tests/test_kernels_graph.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from minigemma.attention import Cache
from minigemma.layers import activation_dtype

from .decode_layer import DecoderLayer, Gemma
from .interpret import INTERPRET

# ops whose result the host must wait for: a capture cannot contain one (CUDA refuses; so does RecordedGraph)
SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
         "_unique2", "unique_consecutive", "repeat_interleave", "allclose"}
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class RecordedGraph:
    """A CPU stand-in for `torch.cuda.CUDAGraph`: `capture(body)` runs body once and records each torch
    op and Triton launch with its arguments; `replay()` issues them again, into the same tensors.

    What a replay does, op by op: a view is not replayed (its tensor already aliases the right memory);
    an allocation is not either (its tensor stays, as in a graph's pool); an op that writes into its
    arguments (`add_`, `copy_`, a kernel) runs again on them; any other op is recomputed and copied into
    the tensor it returned during the capture. Host numbers are kept as they were: frozen."""

    def __init__(self):
        self.calls: list[Callable[[], None]] = []

    def capture(self, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        from torch.utils._python_dispatch import TorchDispatchMode

        calls, on = self.calls, [True]

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if on[0] and func.overloadpacket.__name__ in SYNCS:
                    raise RuntimeError(f"{func.overloadpacket.__name__} makes the host wait for the device: "
                                       "a CUDA graph cannot capture it")
                out = func(*args, **kwargs)
                if on[0]:
                    call = _replayable(func, args, kwargs, out)
                    if call is not None:
                        calls.append(call)
                return out

        with Record(), _recording_launches(calls, on):
            return body()

    def replay(self) -> None:
        for call in self.calls:
            call()


def _replayable(func, args, kwargs, out) -> Callable[[], None] | None:
    if func.is_view or func.overloadpacket.__name__ in _ALLOCATIONS:
        return None
    if func._schema.is_mutable:  # writes into its arguments: run it again on them
        return lambda: func(*args, **kwargs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]

    def recompute():
        new = func(*args, **kwargs)
        for o, n in zip(outs, new if isinstance(new, (tuple, list)) else (new,)):
            o.copy_(n)
    return recompute


@contextlib.contextmanager
def _recording_launches(calls: list, on: list):
    """Record each interpreted Triton launch (the interpreter's own copies to and from numpy unrecorded)."""
    if not INTERPRET:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    run0 = InterpretedFunction.run

    def run(self, *args, **kwargs):
        was, on[0] = on[0], False
        try:
            result = run0(self, *args, **kwargs)
        finally:
            on[0] = was
        if was:
            calls.append(lambda: run0(self, *args, **kwargs))
        return result

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = run0


class DecodeGraph:
    """One-token decode steps of a model under `use_triton`, captured once and replayed.

        step = DecodeGraph(model, cache)   # after the prompt: cache from model.new_cache(B, max_len)
        logits = step(next_ids)            # (B,) or (B, 1) -> (B, V); again for every new token

    The first step runs as it is (on a GPU, it compiles the kernels, which a capture cannot); the second
    is captured and replayed, and every later one only replayed, after the host's bookkeeping (each
    cache's count and its check that the token fits). On a GPU the graph is a `torch.cuda.CUDAGraph`; on
    a CPU, `RecordedGraph`. The logits returned live in the graph's memory: the next step overwrites them.
    """

    def __init__(self, model: Gemma, cache: Cache):
        if not isinstance(model, Gemma):
            raise ValueError(f"DecodeGraph takes a Gemma under use_triton (minigemma.kernels.use_triton), "
                             f"got {type(model).__name__}")
        self.model, self.cache = model, cache
        self.token = torch.zeros(cache.next_position.shape[0], 1, dtype=torch.long, device=model.norm.weight.device)
        self.state, self.pos = cache.step_positions()  # state: [index, position of each row], on the device
        dtype = activation_dtype(model)
        with torch.no_grad():  # as the steps will run
            why = [f"layer {i}" for i, (layer, c) in enumerate(zip(model.layers, cache))
                   if not (isinstance(layer, DecoderLayer) and layer.fusable(self.pos, c, dtype))]
        if why:
            raise ValueError(f"{', '.join(why[:3])} cannot fuse a decode step (kernels.decode_layer: a static cache "
                             "from new_cache(B, max_len), plain projections, no gradient), so the step cannot "
                             "be captured")
        self.logits: torch.Tensor | None = None
        self.replay: Callable[[], None] | None = None
        self.steps = 0
        self.last = ""  # how the last step ran: "run" (the warm-up), "captured" or "replayed"

    def _body(self) -> torch.Tensor:
        """The step: token, state and caches -> logits (B, V). Its launches are what a replay re-issues."""
        hidden = self.model.trunk(self.token, self.pos, self.cache)  # (B, 1, C)
        return self.model.logits(hidden)[:, -1]

    def _capture(self) -> tuple[torch.Tensor, Callable[[], None]]:
        if self.token.device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._body()
            return logits, graph.replay
        graph = RecordedGraph()
        return graph.capture(self._body), graph.replay

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        B = self.token.shape[0]
        if token.numel() != B or token.device != self.token.device:
            raise ValueError(f"a step takes one token per row, (B,) or (B, 1) with B = {B} on "
                             f"{self.token.device}; got {tuple(token.shape)} on {token.device}")
        self.token.copy_(token.reshape(B, 1))
        if self.replay is not None:
            for c in self.cache:
                c.claim_one()  # what the step does on the host, which a replay skips
            self.replay()
            self.last = "replayed"
        else:
            self.pos.start = self.cache.length
            self.pos._memo.clear()
            if self.steps == 0 and self.token.device.type == "cuda":
                side = torch.cuda.Stream()  # the warm-up: the kernels compile here, outside any capture
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.logits = self._body()
                torch.cuda.current_stream().wait_stream(side)
                self.last = "run"
            else:
                self.logits, replay = self._capture()  # the host's bookkeeping ran once, in the capture
                replay()  # this step (a capture runs nothing on a GPU; RecordedGraph's ran it already, and a
                self.replay = replay  # step run twice writes the same values to the same slots)
                self.last = "captured"
        self.steps += 1
        self.cache.stepped(self.state)  # the next token's index and positions, on the device
        return self.logits


__all__ = ["DecodeGraph", "RecordedGraph", "SYNCS"]
