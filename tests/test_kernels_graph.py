"""A decode step captured once and replayed (`minigemma.kernels.graph`), checked without a GPU.

On a CPU, `RecordedGraph` stands in for a CUDA graph: it records the step's torch ops and Triton launches
with their arguments and replays them into the same tensors, host numbers frozen, as a GPU replays a graph.
The reference is the torch model (no kernels) decoding eagerly from the same prompt: every replayed step's
logits must match it (float32 in the interpreter: the kernels sum in another order, 1e-4). The checks can
fail: a step that builds its index on the host replays the capture's index and goes wrong, a capture
refuses a sync, and the toy graph below freezes a host number as a GPU would.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET=1 first, without a GPU)
from minigemma.gemma import Gemma, GemmaConfig, layer_pattern
from minigemma.generation import generate_ids, left_pad
from minigemma.kernels import decode_layer
from minigemma.kernels.graph import DecodeGraph, RecordedGraph
from minigemma.kernels.interpret import INTERPRET
from minigemma.kernels.swap import use_triton

pytestmark = pytest.mark.skipif(not INTERPRET, reason="replays in Triton's interpreter (no GPU)")
PROMPTS = [[2, 17, 5], [2, 40, 41, 42, 99]]  # left-padded to 5: row 0 starts at position 0 two slots in
STEPS = 5  # the window is 4: the rings wrap in the prompt and go round once more (in the interpreter, a
# replayed step of these two layers takes ~1 s: a program of the QKV kernel alone is ~70 ms of Python)


def tiny(family: str) -> GemmaConfig:
    """Two layers, one local (window 4) and one global: Gemma 3 (QK-norm) or Gemma 2 (soft-caps)."""
    if family == "gemma3":
        return GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, layer_types=layer_pattern(2, 2),
                           sliding_window=4, query_pre_attn_scalar=16, use_qk_norm=True)
    return GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=layer_pattern(2, 2),
                       sliding_window=4, query_pre_attn_scalar=16, family="gemma2", attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0)


def models(family: str) -> tuple[Gemma, Gemma]:
    torch.manual_seed(0)
    ref = Gemma(tiny(family)).eval()
    return ref, use_triton(copy.deepcopy(ref), verbose=False)


@torch.no_grad()
def replayed_against_eager(ref: Gemma, model: Gemma, prompts=PROMPTS, steps: int = STEPS):
    """Prompt both models, then `steps` greedy steps: the torch model eagerly, `model` through a DecodeGraph
    fed the same tokens. The largest |difference| of the logits at each step, and the DecodeGraph."""
    ids, mask = left_pad(prompts, 0)
    B, L = ids.shape[0], ids.shape[1] + steps
    cache_ref, cache = ref.new_cache(B, L), model.new_cache(B, L)
    want = ref(ids, attention_mask=mask, cache=cache_ref, last_only=True)[:, -1]
    model(ids, attention_mask=mask, cache=cache, last_only=True)
    step = DecodeGraph(model, cache)
    errors = []
    for _ in range(steps):
        token = want.argmax(-1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        want = ref(token[:, None], attention_mask=mask, cache=cache_ref, last_only=True)[:, -1]
        errors.append((step(token) - want).abs().max().item())
    return errors, step


def test_replayed_steps_match_the_eager_torch_model(monkeypatch):
    """Gemma 3, a left-padded batch of 2, both caches static, the ring wrapping: one step run as it is
    (captured), four replayed; no step runs the model's Python after the capture (the trunk is called
    twice: the prompt, the capture), and every step matches the torch model."""
    ref, model = models("gemma3")
    calls = []
    trunk0 = decode_layer.Gemma.trunk
    monkeypatch.setattr(decode_layer.Gemma, "trunk", lambda self, *a, **k: calls.append(1) or trunk0(self, *a, **k))
    errors, step = replayed_against_eager(ref, model)
    assert len(calls) == 2 and step.last == "replayed", calls
    assert step.steps == STEPS and step.cache.length == 5 + STEPS and all(c.length == 5 + STEPS for c in step.cache)
    assert max(errors) < 1e-4, [f"{e:.1e}" for e in errors]


def test_a_step_that_builds_its_index_on_the_host_replays_wrongly(monkeypatch):
    """The mistake the graph exists to catch: an index made from the host's count inside the step
    (`torch.full((1,), pos.start)`) is frozen at the capture. The captured step is right; the replays write
    the capture's slot again, and their logits leave the torch model's."""
    ref, model = models("gemma3")
    decode0 = decode_layer.DecoderLayer.decode

    def host_index(self, r, pos, cache):
        return decode0(self, r, replace(pos, index=torch.full((1,), pos.start)), cache)

    monkeypatch.setattr(decode_layer.DecoderLayer, "decode", host_index)
    errors, _ = replayed_against_eager(ref, model, PROMPTS[1:], 3)
    assert errors[0] < 1e-4 and min(errors[1:]) > 1e-2, [f"{e:.1e}" for e in errors]


def test_the_stand_in_freezes_host_numbers_and_refuses_a_sync():
    """RecordedGraph as a CUDA graph behaves: a number read on the host is replayed as captured, a tensor
    read at replay time is current, and a sync inside the capture is refused."""
    x, bump, count = torch.zeros(2), torch.ones(1), [1]
    graph = RecordedGraph()
    graph.capture(lambda: (x.add_(count[0]), x.add_(bump)))  # x += 1 (a host number), x += bump (a tensor)
    count[0], bump[0] = 100, 10
    graph.replay()
    assert x.tolist() == [13.0, 13.0]  # 2 from the capture, then 1 (frozen) + 10 (read now)
    with pytest.raises(RuntimeError, match="cannot capture"):
        RecordedGraph().capture(lambda: x.sum().item())


def test_generate_with_a_graph_gives_the_torch_models_tokens():
    """Gemma 2 (soft-caps) through `generate_ids(graph=True)`, a left-padded batch: the torch model's tokens."""
    ref, model = models("gemma2")
    want = generate_ids(ref, PROMPTS, STEPS + 1, eos_id=None)
    assert generate_ids(model, PROMPTS, STEPS + 1, eos_id=None, graph=True) == want


def test_what_cannot_be_captured_is_refused_with_the_reason():
    ref, model = models("gemma2")
    with pytest.raises(ValueError, match="use_triton"):
        DecodeGraph(ref, ref.new_cache(1, 8))
    cache = model.new_cache(1)  # grows by concatenation: no slots for the kernels
    model(torch.tensor([[2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="static cache"):
        DecodeGraph(model, cache)
    cache = model.new_cache(1, 3)
    model(torch.tensor([[2, 3]]), cache=cache)
    step = DecodeGraph(model, cache)
    with pytest.raises(ValueError, match="one token per row"):
        step(torch.tensor([[4, 5]]))
    step(torch.tensor([4]))  # the cache's last slot
    state = step.state.clone()
    with pytest.raises(ValueError, match="full"):
        step(torch.tensor([5]))
    assert torch.equal(step.state, state) and cache.length == 3  # nothing moved on
