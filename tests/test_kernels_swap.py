"""`use_triton`: the kernels swapped into tiny models of every family match the torch models.

Each test builds a tiny random model, copies it, swaps the Triton kernels into one copy
(`minigemma.kernels.swap.use_triton`) and compares logits (or embeddings) with the untouched torch
copy on the same inputs: full forwards with left padding, cached decoding through ring buffers that
wrap, Griffin's resets, an encoder's padding, and gradients for training. On CPU the kernels run in
Triton's interpreter, float32 only.

Tolerance: rtol 1e-4, atol 1e-5 on logits and embeddings (float32). Every swapped op computes the
same float32 formula in another order (measured differences 1e-7 to 5e-7 on logits of size ~1 after
2 to 6 layers); a wrong mask, edge or term moves logits by 1e-2 or more.
"""

import copy
import warnings

import pytest
import torch

import minigemma
import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma import quant
from minigemma.attention import GroupedQueryAttention
from minigemma.encoder import EmbeddingGemma
from minigemma.gemma import FULL, SLIDING, Gemma, GemmaConfig, layer_pattern
from minigemma.griffin import Griffin, small_config
from minigemma.layers import RMSNorm
from minigemma.kernels import attention as attention_kernels
from minigemma.kernels.swap import swap, triton_modules, use_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-5)


def _random_norms(model, seed=0):
    """Fresh models have norm weights 0 ((1 + w) = 1); give them values so that the norms' w matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _pair(model):
    torch_model = _random_norms(model).to(DEV).eval()
    fast = copy.deepcopy(torch_model)
    use_triton(fast, verbose=False)
    return torch_model, fast


def _gemma(family, seed=0, **over):
    torch.manual_seed(seed)
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, query_pre_attn_scalar=24)
    if family == "gemma2":  # soft-cap 50 on attention logits (5 here: small scores would never reach 50), 1:1
        cfg = GemmaConfig(family="gemma2", num_hidden_layers=2, layer_types=layer_pattern(2, 2), sliding_window=4,
                          attn_logit_softcapping=5.0, final_logit_softcapping=30.0, **{**base, **over})
    else:  # QK-norm, 5 local : 1 global, RoPE 10k local / 1M global scaled x8
        cfg = GemmaConfig(family="gemma3", num_hidden_layers=6, layer_types=layer_pattern(6, 6), sliding_window=5,
                          use_qk_norm=True, rope_theta=1_000_000.0, rope_scaling_factor=8.0, **{**base, **over})
    return Gemma(cfg)


def _left_padded(batch, T, pads, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.bool)
    for row, p in enumerate(pads):
        mask[row, :p] = False
    return ids.to(DEV), mask.to(DEV)


def _decode_matches(ref, fast, ids, mask, prefill, vocab):
    """Prefill `prefill` tokens, then one token at a time to the end; logits agree at every call."""
    B, T = ids.shape
    c_ref, c_fast = ref.new_cache(B, T), fast.new_cache(B, T)
    with torch.no_grad():
        want = ref(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=c_ref)
        got = fast(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=c_fast)
        torch.testing.assert_close(got, want, **TOL)
        for t in range(prefill, T):
            want = ref(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=c_ref)
            got = fast(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=c_fast)
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"decode step at index {t}: {m}")


def test_gemma2_softcap_and_1_to_1_windows_full_forward_and_cached_decoding():
    ref, fast = _pair(_gemma("gemma2"))
    assert set(triton_modules(fast).values()) == {"GroupedQueryAttention", "RMSNorm", "GeGLU", "DecoderLayer", "Gemma"}
    ids, mask = _left_padded(2, 11, (3, 0), 97, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, attention_mask=mask), ref(ids, attention_mask=mask), **TOL)
    _decode_matches(ref, fast, ids, mask, prefill=6, vocab=97)  # window 4: the local ring wraps while decoding


def test_gemma3_qk_norm_and_5_to_1_cached_decoding():
    ref, fast = _pair(_gemma("gemma3", seed=1))
    ids, mask = _left_padded(2, 10, (0, 2), 97, seed=2)
    _decode_matches(ref, fast, ids, mask, prefill=7, vocab=97)  # window 5 < 7: the chunk reads a ring, then wraps


def test_griffin_w_plus_1_edge_resets_and_decoding():
    torch.manual_seed(2)
    cfg = small_config(vocab_size=61, width=32, num_heads=2, mlp_expanded_width=48, attention_window_size=3,
                       window_edge="inclusive")  # W = 3: each query sees W + 1 = 4 keys
    ref, fast = _pair(Griffin(cfg))
    assert sorted(set(triton_modules(fast).values())) == ["GeGLU", "GroupedQueryAttention", "RGLRU", "RMSNorm"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 12), generator=g).to(DEV)
    positions = torch.tensor([list(range(12)), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], device=DEV)  # a reset
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, positions=positions), ref(ids, positions=positions), **TOL)
    _decode_matches(ref, fast, ids, torch.ones_like(ids, dtype=torch.bool), prefill=5, vocab=61)


def test_griffin_runs_the_scan_kernel_and_keeps_its_own_scan_setting(monkeypatch):
    """The Triton RGLRU overrides `recurrence` only: the kernel runs, griffin's SCANS table is the package's
    own (importing the kernels registers nothing there), and swapped back the layer runs its scan again."""
    from minigemma import griffin
    from minigemma.kernels import swap as swap_module

    assert set(griffin.SCANS) == {"sequential", "associative"}
    torch.manual_seed(4)
    model = Griffin(small_config(vocab_size=61, width=32, num_heads=2, mlp_expanded_width=48, scan="associative"))
    model = model.to(DEV).eval()
    calls = []  # the kernel, counted
    kernel = swap_module.rglru_scan
    monkeypatch.setattr(swap_module, "rglru_scan", lambda a, b, h0: calls.append(a.shape) or kernel(a, b, h0))
    use_triton(model, verbose=False)
    rglrus = [m for m in model.modules() if isinstance(m, griffin.RGLRU)]
    with torch.no_grad():
        model(torch.randint(0, 61, (1, 5)).to(DEV))
    assert rglrus and len(calls) == len(rglrus)
    use_triton(model, False, verbose=False)
    assert all(type(m) is griffin.RGLRU and m.scan == "associative" for m in rglrus)


def test_encoder_band_and_padding_as_documents():
    torch.manual_seed(3)
    cfg = GemmaConfig(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, layer_types=[SLIDING, FULL],
                      sliding_window=6, query_pre_attn_scalar=16, use_qk_norm=True, bidirectional=True)
    ref, fast = _pair(EmbeddingGemma(cfg, dense_dims=(40, 24)))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 89, (3, 13), generator=g).to(DEV)
    mask = torch.ones(3, 13, dtype=torch.bool, device=DEV)
    mask[0, 9:] = False  # right padding
    mask[1, :4] = False  # left padding
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask), ref(ids, mask), **TOL)
        torch.testing.assert_close(fast.hidden_states(ids, mask), ref.hidden_states(ids, mask), **TOL)


def test_training_gradients_match():
    ref, fast = _pair(_gemma("gemma2", seed=4))
    ids, _ = _left_padded(2, 9, (0, 0), 97, seed=5)
    for m in (ref, fast):
        m.train()
        m(ids).float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_swapping_back_restores_the_torch_model_exactly():
    ref, fast = _pair(_gemma("gemma2", seed=5))
    keys = list(fast.state_dict())
    report = swap(fast, enable=False)
    assert report.total > 0 and triton_modules(fast) == {}
    assert list(fast.state_dict()) == keys
    assert all(type(a) is type(b) for a, b in zip(fast.modules(), ref.modules()))
    ids, _ = _left_padded(1, 7, (0,), 97, seed=6)
    with torch.no_grad():
        assert torch.equal(fast(ids), ref(ids))  # the very same torch code again
    assert minigemma.use_triton(fast, verbose=False) is fast and triton_modules(fast)  # the lazy export
    assert swap(fast).total == 0  # already swapped: nothing more to do


def test_the_report_names_what_was_swapped(capsys):
    model = _gemma("gemma2", seed=6)
    use_triton(model)
    out = capsys.readouterr().out
    assert "16 modules now run Triton kernels" in out
    assert "2 x GroupedQueryAttention: RoPE and attention kernels" in out and "9 x RMSNorm" in out
    assert "2 x DecoderLayer: a decode step in five fused kernels" in out and "1 x Gemma: " in out
    use_triton(model, False)
    assert "back to torch" in capsys.readouterr().out


def test_unsupported_layers_are_left_alone_and_reported():
    class MyNorm(RMSNorm):  # a subclass with a forward of its own: never swapped by mistake
        pass

    model = torch.nn.Sequential(GroupedQueryAttention(64, 1, 1, 512), GroupedQueryAttention(64, 2, 1, 32), MyNorm(8))
    report = swap(model)
    assert report.total == 1 and type(model[1]) is attention_kernels.GroupedQueryAttention
    assert "head_dim 512 > 256" in str(report) and type(model[0]) is GroupedQueryAttention
    assert "1 x MyNorm (a subclass the kernels were not written for)" in str(report) and type(model[2]) is MyNorm


@pytest.mark.skipif(DEV == "cuda", reason="checks the refusal on CPU (the interpreter has no bfloat16)")
def test_a_bfloat16_model_on_cpu_is_left_alone_with_a_reason():
    model = quant.quantize(_gemma("gemma2", seed=7, vocab_size=128, hidden_size=128), "int8")
    with pytest.warns(UserWarning, match="computes in torch.bfloat16"):
        use_triton(model)
    assert triton_modules(model) == {}


@pytest.mark.skipif(DEV != "cuda", reason="quantised models compute in bfloat16: GPU only")
def test_quantised_modules_are_left_alone_on_a_gpu():
    model = quant.quantize(_gemma("gemma2", seed=7, vocab_size=128, hidden_size=128), "int8").to(DEV)
    report = swap(model)
    assert report.total == 13 and any("Int8Linear" in k for k in report.left_alone)
    assert all(type(m).__module__ == "minigemma.quant" for m in model.modules() if "Int8" in type(m).__name__)


def test_a_ring_decode_step_with_gradients_falls_back_with_a_warning():
    layer = copy.deepcopy(_gemma("gemma2", seed=8).layers[0].self_attn).to(DEV)  # local, window 4
    use_triton(layer, verbose=False)
    cache = layer.new_cache(1, 12)
    x = torch.randn(1, 6, 32, device=DEV)
    layer(x, cache=cache)
    attention_kernels._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.randn(1, 1, 32, device=DEV, requires_grad=True), cache=cache)
    assert any("ring buffer" in str(w.message) for w in caught)


@pytest.mark.skipif(DEV != "cuda",
                    reason="the real checkpoints on the kernels: GPU only (CPU: chapter 13 runs a few tokens)")
def test_real_checkpoints_on_a_gpu():
    from minigemma.generation import generate

    model, tok = minigemma.load_pretrained("gemma3-270m", quant="bf16")
    model = model.to(DEV)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    want = [generate(model, tok, p, max_new_tokens=16) for p in prompts]
    use_triton(model, verbose=False)
    assert [generate(model, tok, p, max_new_tokens=16) for p in prompts] == want
    st = pytest.importorskip("sentence_transformers")
    from minigemma.weights.fetch import path

    encoder, _ = minigemma.load_pretrained("embeddinggemma-300m")
    encoder = use_triton(encoder.to(DEV), verbose=False)
    texts = ["How do I sort a list in Python?", "Paris is the capital of France."]
    ours = encoder.encode(texts, prompt_name="query")
    theirs = torch.as_tensor(st.SentenceTransformer(str(path("embeddinggemma-300m")), device=DEV)
                             .encode(texts, prompt_name="query"))
    assert torch.nn.functional.cosine_similarity(ours.float().cpu(), theirs.float(), dim=-1).min() >= 0.9999


@pytest.mark.skipif(DEV == "cuda", reason="the tiny CPU path of the harness; a GPU runs the real one")
def test_the_harness_end_to_end_rows_run_at_tiny_size_and_never_time_the_interpreter():
    from minigemma.kernels import bench

    rows = bench.run_e2e("decode", "cpu", "tiny", {"copy_GBps": 10.0}) + bench.run_e2e("prefill", "cpu", "tiny", {})
    torch_rows = [r for r in rows if r["impl"] == "torch"]
    assert len(torch_rows) == 3 and all(r["value"] > 0 for r in torch_rows)
    assert all(r["ceiling"] > 0 for r in torch_rows if r["what"] == "decode")
    assert [r["note"] for r in rows if r["impl"] == "triton"] == ["not timed on CPU: the kernels run there only in "
                                                                  "Triton's interpreter"] * 2
