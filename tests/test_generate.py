"""minigemma.generation: the decode loop, sampling filters, EOS, padding, context errors, the CLI.

Most tests run on tiny random models (Gemma and Griffin: the loop is generic) or on a scripted
stub; the last ones use the real Gemma 3 270M (loaded once) with its tokenizer.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigemma.gemma import Gemma, GemmaConfig
from minigemma.generation import (
    ContextLengthError, generate, generate_ids, left_pad, sample_next, top_k_filter, top_p_filter)
from minigemma.griffin import Griffin, GriffinConfig

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Sampling filters on a toy distribution (expected values worked out by hand)
# ----------------------------------------------------------------------------------------------
P = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = P.log()


def _kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k():
    assert _kept(top_k_filter(LOGITS, 1)) == [0]
    assert _kept(top_k_filter(LOGITS, 2)) == [0, 1]
    assert _kept(top_k_filter(LOGITS, 10)) == [0, 1, 2, 3]
    shuffled = LOGITS[[2, 0, 3, 1]]  # order in the vocabulary does not matter
    assert _kept(top_k_filter(shuffled, 2)) == [1, 3]
    with pytest.raises(ValueError):
        top_k_filter(LOGITS, 0)


def test_top_p():
    # keep the smallest set of most likely tokens with probability >= p
    assert _kept(top_p_filter(LOGITS, 0.4)) == [0]  # 0.5 >= 0.4 already
    assert _kept(top_p_filter(LOGITS, 0.5)) == [0]
    assert _kept(top_p_filter(LOGITS, 0.6)) == [0, 1]  # 0.5 < 0.6 <= 0.8
    assert _kept(top_p_filter(LOGITS, 0.85)) == [0, 1, 2]  # 0.8 < 0.85 <= 0.95
    assert _kept(top_p_filter(LOGITS, 1.0)) == [0, 1, 2, 3]
    shuffled = LOGITS[[3, 1, 0, 2]]
    assert _kept(top_p_filter(shuffled, 0.6)) == [1, 2]
    batch = torch.stack([LOGITS, LOGITS.flip(0)])  # rows are independent
    assert torch.isfinite(top_p_filter(batch, 0.6)).tolist() == [[True, True, False, False], [False, False, True, True]]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            top_p_filter(LOGITS, bad)


def test_sampling_frequencies():
    """top_k=2 renormalises 0.5 : 0.3 to 0.625 : 0.375; temperature 2 flattens to sqrt(p)."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    draws = sample_next(LOGITS.expand(n, 4), temperature=1.0, top_k=2, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert abs(freq[0] - 0.625) < 0.015 and freq[2] == freq[3] == 0
    draws = sample_next(LOGITS.expand(n, 4), temperature=2.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / n
    want = P.sqrt() / P.sqrt().sum()
    assert (freq - want).abs().max() < 0.015
    assert sample_next(LOGITS[None], temperature=0.0).item() == 0  # greedy
    with pytest.raises(ValueError):
        sample_next(LOGITS[None], temperature=-1.0)


# ----------------------------------------------------------------------------------------------
# The loop on tiny random models
# ----------------------------------------------------------------------------------------------
def tiny_gemma(context=64):
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                      sliding_window=4, query_pre_attn_scalar=16, use_qk_norm=True,
                      max_position_embeddings=context)
    model = Gemma(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # larger than default init, so greedy choices are clear-cut
    return model.eval()


def tiny_griffin():
    torch.manual_seed(0)
    return Griffin(GriffinConfig(vocab_size=300, width=32, num_layers=3, num_heads=2, mlp_expanded_width=64,
                                 attention_window_size=4)).eval()


PROMPTS = [[2, 17, 45, 99, 3, 250, 7], [2, 5], [2, 88, 12, 140], [2]]


@pytest.mark.parametrize("make", [tiny_gemma, tiny_griffin])
def test_batched_with_padding_equals_one_at_a_time(make):
    model = make()
    batch = generate_ids(model, PROMPTS, 12, eos_id=None)
    singles = [generate_ids(model, [p], 12, eos_id=None)[0] for p in PROMPTS]
    assert batch == singles
    assert all(len(s) == 12 for s in singles)
    assert len({tuple(s) for s in singles}) > 1  # different prompts, different continuations


@pytest.mark.parametrize("make", [tiny_gemma, tiny_griffin])
def test_cache_equals_recomputation(make):
    model = make()  # 12 steps: the Gemma's window of 4 is passed many times
    assert generate_ids(model, PROMPTS[:1], 12, eos_id=None) == \
        generate_ids(model, PROMPTS[:1], 12, eos_id=None, use_cache=False)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


class Scripted(torch.nn.Module):
    """A stand-in model: row b emits the ids in script[b], one per call, then keeps emitting 9."""

    def __init__(self, script, vocab=16, context=100):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.config = type("C", (), {"max_position_embeddings": context})()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, batch, max_len=None, **_):
        return None

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=False):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for b, s in enumerate(self.script):
            logits[b, 0, s[self.calls] if self.calls < len(s) else 9] = 1.0
        self.calls += 1
        return logits


def test_stops_at_eos_per_row():
    model = Scripted([[4, 5, 1, 6], [4, 5, 6, 7, 8, 1], [1]])
    seen = []
    out = generate_ids(model, [[2], [2], [2]], 10, eos_id=1, on_token=lambda r, t: seen.append((r, t)))
    assert out == [[4, 5], [4, 5, 6, 7, 8], []]
    assert model.calls == 6  # stopped once every row had its EOS, not after 10 steps
    assert seen == [(0, 4), (1, 4), (0, 5), (1, 5), (1, 6), (1, 7), (1, 8)]  # streamed as produced
    assert generate_ids(Scripted([[4, 5, 1]]), [[2]], 2, eos_id=1) == [[4, 5]]  # max_new_tokens first


def test_context_length_errors():
    model = tiny_gemma(context=16)
    with pytest.raises(ContextLengthError, match="prompt has 20 tokens but the model's context is 16"):
        generate_ids(model, [[2] * 20], 1)
    with pytest.raises(ContextLengthError, match=r"at most 6 new tokens"):
        generate_ids(model, [[2] * 10], 7)
    assert len(generate_ids(model, [[2] * 10], 6, eos_id=None)[0]) == 6  # exactly fits
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], 1)


# ----------------------------------------------------------------------------------------------
# The real model and tokenizer
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    from minigemma.pretrained import load_pretrained

    return load_pretrained("gemma3-270m")


def test_real_batch_and_stream(real):
    model, tok = real
    prompts = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4,"]
    batch = generate(model, tok, prompts, 10)
    assert batch == [generate(model, tok, p, 10) for p in prompts]
    pieces = []
    text = generate(model, tok, prompts[0], 10, stream=lambda row, s: pieces.append((row, s)))
    assert text == batch[0] and "".join(s for _, s in pieces) == text and len(pieces) > 3
    assert {row for row, _ in pieces} == {0}


def test_real_seeded_sampling_is_reproducible(real):
    model, tok = real
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, tok, "Once upon a time", 8, seed=123, **kw)
    torch.manual_seed(999)  # the global RNG must not matter
    assert generate(model, tok, "Once upon a time", 8, seed=123, **kw) == a


def test_real_prompt_longer_than_context(real):
    model, tok = real
    text = "word " * 33_000
    with pytest.raises(ContextLengthError, match="context is 32768"):
        generate(model, tok, text, 1)


def test_cli_prints_only_the_completion(real):
    """The CLI runs the fast path by default and says which on stderr; --dtype float32 is the reference."""
    import minigemma

    model, tok = real
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*extra):
        r = subprocess.run([sys.executable, "-m", "minigemma", "generate", "The capital of France is",
                            "--max-new-tokens", "6", *extra], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    ref = cli("--dtype", "float32")
    assert ref.stdout == generate(model, tok, "The capital of France is", 6) + "\n"
    assert "float32 (the reference)" in ref.stderr
    fast = cli()
    codes, _ = minigemma.load_pretrained("gemma3-270m", file_codes=True)
    assert fast.stdout == generate(codes, tok, "The capital of France is", 6) + "\n"
    assert "the GGUF file's own codes" in fast.stderr and "--dtype float32 for the reference" in fast.stderr
    assert cli("--file-codes").stdout == fast.stdout  # the default, said out loud
    bad = subprocess.run([sys.executable, "-m", "minigemma", "generate", "x", "--top-p", "2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode != 0 and "top-p" in bad.stderr and bad.stdout == ""


def test_sampling_settings_are_checked_before_the_prompt_runs():
    """A NaN temperature, top_k 0 or top_p 1.5 is named before any forward pass (the model here raises if called)."""
    class NeverCalled(torch.nn.Module):
        config = None

        def forward(self, *a, **k):
            raise AssertionError("the prompt ran before the settings were checked")

    for kw, name in [(dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
                     (dict(temperature=0.7, top_k=0), "top_k"), (dict(temperature=0.7, top_k=2.5), "top_k"),
                     (dict(temperature=0.7, top_p=1.5), "top_p"), (dict(temperature=0.7, top_p=0.0), "top_p")]:
        with pytest.raises(ValueError, match=name):
            generate_ids(NeverCalled(), [[2, 5, 6]], 4, **kw)
