"""Chapter 13's capstone hook (minigemma/learner_kernels.py) and its check (13.capstone).

- with the exercises' answers as "your kernels", the hook's copy of a tiny Gemma 3 computes what the model
  computes (all three kernels, or one at a time), through the exercises' own launchers, on shapes whose tails
  every kernel must mask (rows of 24 in a block of 32, F = 40 in blocks of 32, a prompt of 40 = 32 + 8 queries
  whose window skips a key block); it shares the model's parameters and leaves the model as it was; what the
  hook cannot take is refused clearly;
- the capstone's inputs exercise what the real model can afford in the interpreter: the window (cut to 4)
  changes the logits, the prompt (8 tokens) cuts the block of queries and the block of keys, and the greedy
  tokens' margins are far wider than the logits' tolerance;
- on the real Gemma 3 270M, the capstone passes the exercises' answers, fails each mutant of
  tests/mutants/ch13.py naming exactly the kernel it breaks, and says "not written yet" for a stub.
"""

import pytest
import torch

from minigemma import learner_kernels
from minigemma.attention import GroupedQueryAttention
from minigemma.gemma import Gemma, GemmaConfig, layer_pattern
from minigemma.grading import core
from minigemma.grading.checks import ch13
from minigemma.kernels import attention as attention_kernels
from minigemma.layers import RMSNorm
from tests.mutants.ch13 import CAPSTONE_BROKEN, CORRECT, MUTANTS, YOUR_ANSWERS

core.get("13.capstone")  # registers every exercise: the hook launches your kernels with their launchers


def _tiny(**kw):
    """A Gemma 3 shaped model small enough for the interpreter, with every tail: rows of C = 24 (a block of
    32), F = 40 (blocks of 32), 4 query heads sharing 2 kv heads of 16; 2 of every 3 layers local, window 3."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, layer_types=layer_pattern(3, 3), sliding_window=3,
               query_pre_attn_scalar=16, use_qk_norm=True, rope_theta=1_000_000.0)
    cfg.update(kw)
    model = Gemma(GemmaConfig(**cfg)).eval()
    with torch.no_grad():  # norms away from their identity start, so each one matters
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(0.0, 0.3)
    return model


IDS = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(1))  # 32 + 8 queries: a skipped block


@pytest.mark.parametrize("names", [tuple(YOUR_ANSWERS)] + [(n,) for n in YOUR_ANSWERS], ids=lambda n: "+".join(n))
def test_the_answers_through_the_hook_compute_the_model(names):
    model = _tiny()
    yours = learner_kernels.with_kernels(model, **{n: YOUR_ANSWERS[n] for n in names})
    with torch.no_grad():
        torch.testing.assert_close(yours(IDS), model(IDS), atol=2e-5, rtol=1e-4)


def test_the_copy_shares_the_weights_and_runs_on_the_packages_kernels_elsewhere():
    model = _tiny()
    yours = learner_kernels.with_kernels(model, flash_forward_window=YOUR_ANSWERS["flash_forward_window"])
    assert yours.embed_tokens.weight is model.embed_tokens.weight is yours.lm_head.weight  # shared, still tied
    assert yours.layers[1].mlp.gate_up_proj.weight is model.layers[1].mlp.gate_up_proj.weight
    assert type(yours.layers[0].self_attn) is learner_kernels.YourAttention
    assert type(yours.norm) is not RMSNorm and type(yours.norm).__module__ == "minigemma.kernels.rms_norm"
    assert type(model.layers[0].self_attn) is GroupedQueryAttention and type(model.norm) is RMSNorm
    windowed = learner_kernels.windowed(model, 2)
    assert [m.self_attn.window for m in windowed.layers] == [2, 2, None] and windowed.config.sliding_window == 2
    assert [m.self_attn.window for m in model.layers] == [3, 3, None] and model.config.sliding_window == 3


def test_a_decode_step_runs_the_packages_kernels():
    """Only a prompt is yours: a step against the cache (here one layer's, not fused) is the package's kernel."""
    model = _tiny()
    yours = learner_kernels.with_kernels(model, flash_forward_window=YOUR_ANSWERS["flash_forward_window"])
    attn = yours.layers[2].self_attn  # a global layer: its cache holds the prompt's keys in order
    calls = []
    original = attention_kernels.GroupedQueryAttention.attention
    try:
        attention_kernels.GroupedQueryAttention.attention = lambda self, *a: calls.append(1) or original(self, *a)
        with torch.no_grad():
            x = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(2))
            cache = attn.new_cache(1, 8)
            attn(x, cache=cache)  # a prompt: yours
            assert calls == []
            attn(x[:, :1], cache=cache)  # a step: the package's
            assert calls == [1]
    finally:
        attention_kernels.GroupedQueryAttention.attention = original


def test_a_wrong_kernel_changes_the_output():
    model = _tiny()
    name, wrong = CAPSTONE_BROKEN["flash attention's window one key too long (i − j ≤ window)"]
    with torch.no_grad():
        assert not torch.allclose(learner_kernels.with_kernels(model, **{name: wrong})(IDS), model(IDS), atol=1e-3)


def test_what_the_hook_cannot_express_is_refused_clearly():
    with pytest.raises(TypeError, match="unknown kernels"):
        learner_kernels.with_kernels(_tiny(), softmax=YOUR_ANSWERS["rms_norm_rows"])
    with pytest.raises(TypeError, match="unknown kernels"):
        learner_kernels.YourKernels(rope=YOUR_ANSWERS["rms_norm_rows"])
    with pytest.raises(ValueError, match="soft-cap"):
        learner_kernels.with_kernels(_tiny(attn_logit_softcapping=50.0, use_qk_norm=False),
                                     flash_forward_window=YOUR_ANSWERS["flash_forward_window"])
    with pytest.raises(ValueError, match="head_dim is 8"):
        learner_kernels.with_kernels(_tiny(head_dim=8, query_pre_attn_scalar=8),
                                     flash_forward_window=YOUR_ANSWERS["flash_forward_window"])
    with pytest.raises(ValueError, match="eps"):
        learner_kernels.with_kernels(_tiny(rms_norm_eps=1e-5), rms_norm_rows=YOUR_ANSWERS["rms_norm_rows"])


# --------------------------------------------------------------------------------------------
# The capstone on the real model
# --------------------------------------------------------------------------------------------
def test_the_capstones_inputs_exercise_what_it_covers():
    model, tokenizer = learner_kernels.reference_model()
    ids = tokenizer.encode(ch13.CAPSTONE_PROMPT)
    T, W = len(ids), ch13.CAPSTONE_WINDOW
    assert T == ch13.CAPSTONE_TOKENS and W < T < 16  # the window cuts keys; both blocks (32 queries, 16 keys) cut by T
    tokens, logits = learner_kernels.reference_outputs(ch13.CAPSTONE_PROMPT, W)
    full = learner_kernels.prompt_outputs(model, ids)[1]
    assert (logits - full).abs().max() > 1.0  # the cut window changes the logits
    (case,) = core.get("13.capstone").cases(0)
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min()
    assert margin > 20 * (case.atol + case.rtol * logits.abs().max()), margin  # the tokens cannot flip by rounding


def test_capstone_names_the_kernel_that_breaks_the_logits():
    for label, right in CORRECT["13.capstone"]:
        r = core.run_check("13.capstone", right, seed=0)
        assert r.passed, (label, core.format_result(r))
    for label, mutant in MUTANTS["13.capstone"]:
        r = core.run_check("13.capstone", mutant, seed=0)
        name = CAPSTONE_BROKEN[label][0]
        reason = r.failure.get("why") or r.failure.get("error")
        assert not r.passed and reason.startswith(f"broken by your {name} ("), (label, reason)
        assert all(f"your {other} " not in reason for other in learner_kernels.KERNELS if other != name), reason


def test_an_untouched_stub_is_not_written_yet():
    def geglu_kernel(gu_ptr, out_ptr, F, stride_gu, BLOCK):
        raise NotImplementedError()  # an untouched exercise stub

    stub = learner_kernels.YourKernels(rms_norm_rows=YOUR_ANSWERS["rms_norm_rows"], geglu_rows=geglu_kernel)
    r = core.run_check("13.capstone", stub, seed=0)
    assert not r.passed and "not written yet: geglu_rows" in r.failure["error"]
    assert "rms_norm_rows" not in r.failure["error"]
