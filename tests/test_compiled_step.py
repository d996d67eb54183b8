"""The decode step compiled once for a whole generation (`generation.CompiledStep`, `Positions.captured`).

The reference is the model's ordinary eager decode (float32) from the same prompt, fed the same tokens:
every captured step's logits must match it. Run eagerly, the captured path (each cache's `write_at`, the
mask over the whole static buffer from the index tensor) does the same arithmetic on the same keys, with
masked slots added, so it agrees to float32 rounding (1e-5). Compiled, inductor fuses and reorders the
sums (and computes GELU through a sigmoid): 1e-4. The checks can fail: a step that read the cache's
length as a Python int would recompile at every token (the graph count is checked), a ring whose slot
indices were wrong would attend the wrong keys once it wraps (window 4, more steps than that).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from minigemma import generation
from minigemma.gemma import Gemma, GemmaConfig, layer_pattern
from minigemma.generation import CompiledStep, generate_ids, left_pad

PROMPTS = [[2, 17, 5], [2, 40, 41, 42, 99]]  # left-padded to 5: row 0 starts two slots in
STEPS = 6  # window 4: the rings wrap in the prompt and go round again


def tiny(family: str) -> GemmaConfig:
    """Two layers, one local (window 4) and one global: Gemma 3 (QK-norm) or Gemma 2 (soft-caps)."""
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  head_dim=16, layer_types=layer_pattern(2, 2), sliding_window=4, query_pre_attn_scalar=16)
    if family == "gemma3":
        return GemmaConfig(num_key_value_heads=1, use_qk_norm=True, **common)
    return GemmaConfig(num_key_value_heads=2, family="gemma2", attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, **common)


@torch.no_grad()
def captured_against_eager(family: str, prompts=PROMPTS, steps: int = STEPS, compiled: bool = False):
    """Prompt two caches of one model, then `steps` greedy steps: eagerly, and through a CompiledStep fed
    the same tokens. The largest |difference| of the logits at each step, and the step."""
    torch.manual_seed(0)
    model = Gemma(tiny(family)).eval()
    ids, mask = left_pad(prompts, 0)
    B, L = ids.shape[0], ids.shape[1] + steps
    cache_ref, cache = model.new_cache(B, L), model.new_cache(B, L)
    want = model(ids, attention_mask=mask, cache=cache_ref, last_only=True)[:, -1]
    model(ids, attention_mask=mask, cache=cache, last_only=True)
    step = CompiledStep(model, cache)
    if not compiled:
        step.step = generation._step  # the captured path, run eagerly
    errors = []
    for _ in range(steps):
        token = want.argmax(-1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        want = model(token[:, None], attention_mask=mask, cache=cache_ref, last_only=True)[:, -1]
        errors.append((step(token) - want).abs().max().item())
    assert cache.length == cache_ref.length and all(c.length == r.length for c, r in zip(cache, cache_ref))
    assert torch.equal(cache.next_position, cache_ref.next_position)
    return errors, step


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_captured_path_matches_eager_decode(family):
    """Left padding, rings wrapping, QK-norm or soft-caps: the captured path, eagerly, step for step."""
    errors, _ = captured_against_eager(family)
    assert max(errors) < 1e-5, errors


def test_captured_path_on_one_unpadded_prompt():
    """One row, no padding (no document mask): the plain causal and window masks from the index."""
    errors, _ = captured_against_eager("gemma3", prompts=[[2, 7, 9, 11, 13, 15]], steps=8)
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_compiled_steps_match_and_compile_once(family):
    """torch.compile of the step: every step matches eager decode, and one graph serves them all."""
    torch._dynamo.reset()
    counters.clear()
    errors, step = captured_against_eager(family, compiled=True)
    assert max(errors) < 1e-4, errors
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert step.steps == STEPS


def test_generate_ids_compiled_gives_the_eager_tokens():
    torch.manual_seed(0)
    model = Gemma(tiny("gemma3")).eval()
    eager = generate_ids(model, PROMPTS, 7, eos_id=None)
    assert generate_ids(model, PROMPTS, 7, eos_id=None, compile=True) == eager
    with pytest.raises(ValueError, match="choose one"):
        generate_ids(model, PROMPTS, 2, graph=True, compile=True)


@torch.no_grad()
def test_refusals_name_the_problem():
    torch.manual_seed(0)
    model = Gemma(tiny("gemma3")).eval()
    cache = model.new_cache(1)  # no max_len: the global layer's cache grows, there is no static buffer
    model(torch.tensor([[2, 5]]), cache=cache)
    with pytest.raises(ValueError, match="static"):
        CompiledStep(model, cache)
    cache = model.new_cache(1, max_len=3)
    model(torch.tensor([[2, 5]]), cache=cache)
    step = CompiledStep(model, cache)
    step.step = generation._step
    step(torch.tensor([7]))
    with pytest.raises(ValueError, match="KV cache is full"):
        step(torch.tensor([7]))
    with pytest.raises(ValueError, match="one token per row"):
        step(torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="must lie in"):
        CompiledStep(model, model.new_cache(1, max_len=3))(torch.tensor([500]))
