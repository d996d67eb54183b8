"""Gemma 2 / Gemma 3: parity with HF transformers, loader errors, presets, KV caches.

The reference is HF transformers (a test-only dependency): tiny random `Gemma2ForCausalLM` /
`Gemma3ForCausalLM` models are written with `save_pretrained` and read back with our
`load_pretrained`. Logits are compared in float32 with max |diff| <= 1e-4: both sides run the
same float32 maths in a different order, which costs ~1e-6 on logits of size ~10; a wrong
formula (a mask off by one, a missing (1 + w), a skipped cap) costs > 1e-2.
"""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from minigemma.attention import KVCache, RingKVCache, index_mask, make_positions, sliding_window_mask  # noqa: E402
from minigemma.gemma import (  # noqa: E402
    FULL, PRESETS, SLIDING, Gemma, GemmaConfig, kv_cache_bytes, layer_pattern, preset,
)
from minigemma.pretrained import load_pretrained  # noqa: E402
from minigemma.weights.hf import CheckpointError  # noqa: E402

ATOL = 1e-4
VOCAB = 101


def _hf_model(family: str, seed: int = 0, qk_gain: float = 4.0, **kw):
    """A tiny random HF Gemma with weights large enough that every detail shows in the logits."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                query_pre_attn_scalar=16, attn_implementation="eager")
    base.update(kw)
    torch.manual_seed(seed)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**base))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # (1 + w): w != 0 so a missing "1 +" shows
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # nn.Linear (out, in)
                gain = qk_gain if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
    return model.eval()


def _left_padded(B, T, seed, pad=(0, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : pad[b % len(pad)]] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _hf_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def _save_and_load(model, tmp_path, **save_kw):
    model.save_pretrained(tmp_path, **save_kw)
    ours, tokenizer = load_pretrained(tmp_path)
    assert tokenizer is None
    return ours


PARITY_CASES = {
    # family, HF config overrides
    "gemma2 GQA 4q/2kv, qpas 16, caps on": ("gemma2", {}),
    "gemma2 MQA, caps off": ("gemma2", dict(num_key_value_heads=1, attn_logit_softcapping=None,
                                            final_logit_softcapping=None)),
    "gemma2 MHA, qpas 40, odd window": ("gemma2", dict(num_key_value_heads=4, query_pre_attn_scalar=40,
                                                       sliding_window=7, num_hidden_layers=3)),
    "gemma3 GQA, linear rope x4, pattern 3": ("gemma3", dict(num_hidden_layers=5, sliding_window_pattern=3,
                                                             rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "gemma3 MQA, default pattern, final cap on": ("gemma3", dict(num_hidden_layers=7, num_key_value_heads=1,
                                                                 final_logit_softcapping=30.0,
                                                                 query_pre_attn_scalar=24)),
}


@pytest.mark.parametrize("name", PARITY_CASES)
def test_logits_match_hf(name, tmp_path):
    family, kw = PARITY_CASES[name]
    hf = _hf_model(family, **kw)
    ours = _save_and_load(hf, tmp_path)
    ids, mask = _left_padded(B=3, T=17, seed=1)  # T > window: both local and global masks matter
    expected = _hf_logits(hf, ids, mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask.bool())
    real = mask.bool()
    diff = (got - expected).abs()[real].max().item()
    assert diff <= ATOL, f"{name}: max |logit diff| {diff:.3g} > {ATOL}"
    assert expected[real].abs().max() > 1.0, "logits too small for the comparison to mean anything"


def test_softcaps_matter_in_the_parity_model(tmp_path):
    """The tolerance is far below what each cap changes, so the parity tests would catch a skipped cap."""
    ours = _save_and_load(_hf_model("gemma2"), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = ours(ids)
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            uncapped = Gemma(replace(ours.config, **{field: None}))
            uncapped.load_state_dict(ours.state_dict())
            changed = (uncapped(ids) - base).abs().max().item()
            assert changed > 100 * ATOL, f"dropping {field} changed logits by only {changed:.3g}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_each_decoder_layer_matches_hf(family, tmp_path):
    """Feed every HF layer's own input to our layer, so a failure names the layer that diverges."""
    hf = _hf_model(family, num_hidden_layers=6, sliding_window_pattern=3) if family == "gemma3" else \
        _hf_model(family, num_hidden_layers=4)
    ours = _save_and_load(hf, tmp_path)
    seen = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x.detach().clone(), (output[0] if isinstance(output, tuple) else output).detach().clone())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(hf.model.layers)]
    ids, mask = _left_padded(B=2, T=14, seed=5, pad=(0, 4))
    try:
        _hf_logits(hf, ids, mask)
    finally:
        for h in handles:
            h.remove()
    real = mask.bool()
    pos = make_positions(ids, None, real, None)  # what Gemma.forward hands every layer
    for i, layer in enumerate(ours.layers):
        x, expected = seen[i]
        with torch.no_grad():
            got = layer(x, pos)
        diff = (got - expected).abs()[real].max().item()
        assert diff <= ATOL, f"layer {i} ({layer.layer_type}): max |diff| {diff:.3g}"


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------
def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_model("gemma3", num_hidden_layers=3)
    ours = _save_and_load(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, mask = _left_padded(B=2, T=9, seed=2)
    with torch.no_grad():
        diff = (ours(ids, attention_mask=mask.bool()) - _hf_logits(hf, ids, mask)).abs()[mask.bool()].max()
    assert diff <= ATOL


def _edit_checkpoint(tmp_path, edit):
    hf = _hf_model("gemma2", num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors for: layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.zeros(16)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*model\.layers\.0\.mlp\.gate_proj\.weight \(96, 64\)"):
        load_pretrained(tmp_path)


def test_untied_head_is_refused(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: t.update({"lm_head.weight": torch.randn(VOCAB, 64)}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    hf = _hf_model("gemma2", num_hidden_layers=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=r"pickle.*pytorch_model\.bin"):
        load_pretrained(tmp_path)


def test_unsupported_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    with pytest.raises(CheckpointError, match="gemma3"):
        load_pretrained(tmp_path)


def test_published_old_style_config_is_read():
    """The Gemma 3 12B text_config as published (rope_theta / rope_local_base_freq / rope_scaling)."""
    published = {
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_local_base_freq": 10000,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000,
        "sliding_window": 1024, "sliding_window_pattern": 6, "max_position_embeddings": 131072,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }
    assert GemmaConfig.from_hf(published) == PRESETS["gemma3-12b"]


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def _hf_config_for(cfg: GemmaConfig):
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
              sliding_window=cfg.sliding_window, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
              max_position_embeddings=cfg.max_position_embeddings)
    if cfg.family == "gemma2":
        return Gemma2ForCausalLM, Gemma2Config(**kw)
    scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor} if cfg.rope_scaling_factor != 1 else None
    return Gemma3ForCausalLM, Gemma3TextConfig(**kw, rope_scaling=scaling)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_on_meta_with_hf_parameter_count(name):
    cfg = PRESETS[name]
    cls, hf_cfg = _hf_config_for(cfg)
    with torch.device("meta"):
        ours, ref = Gemma(cfg), cls(hf_cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref, f"{name}: {n_ours:,} parameters, HF {n_ref:,}"
    # the HF config of the same model reads back as the preset (layer pattern, RoPE, caps, QK-norm)
    assert GemmaConfig.from_hf(hf_cfg.to_dict()) == cfg


def test_preset_layer_patterns():
    assert PRESETS["gemma2-2b"].layer_types[:3] == [SLIDING, FULL, SLIDING]
    assert [i for i, t in enumerate(PRESETS["gemma3-270m"].layer_types) if t == FULL] == [5, 11, 17]
    assert preset("gemma3-1b", num_hidden_layers=6).layer_types == [SLIDING] * 5 + [FULL]


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        preset("gemma3-270m", num_hidden_layers=4, layer_types=[SLIDING] * 3)
    with pytest.raises(ValueError, match="not a multiple"):
        preset("gemma2-2b", num_key_value_heads=3)
    model = Gemma(_tiny_config())
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------
# KV caches
# --------------------------------------------------------------------------------------------
def _tiny_config(**kw):
    base = dict(family="gemma3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, layer_types=layer_pattern(4, 2),
                sliding_window=4, query_pre_attn_scalar=8, use_qk_norm=True, rope_theta=1e6,
                rope_scaling_factor=2.0)
    base.update(kw)
    return GemmaConfig(**base)


def _random_gemma(config, seed=0):
    torch.manual_seed(seed)
    model = Gemma(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model.eval()


def test_index_mask_is_the_chapter_01_masks():
    T = 9
    idx = torch.arange(T)
    assert torch.equal(index_mask(idx, idx, 3), sliding_window_mask(T, 3))
    # a ring buffer's rotated keys give the same mask up to the key order
    perm = torch.randperm(T)
    assert torch.equal(index_mask(idx, idx[perm], 3), sliding_window_mask(T, 3)[:, perm])


def test_ring_buffer_holds_the_last_window():
    cache = RingKVCache(1, 1, 2, window=4)
    for step in range(11):
        k = torch.full((1, 1, 1, 2), float(step))
        _, _, k_idx = cache.update(k, k)
        slots = cache.slot_index()
        held = sorted(i for i in slots.tolist() if i >= 0)
        assert held == list(range(max(0, step - 3), step + 1))  # the last 4 tokens, or all if fewer
        assert (slots == -1).sum() == max(0, 3 - step)
        # each slot holds the token its index names (we stored k = the token's index)
        assert torch.equal(cache.k[0, 0, :, 0][slots >= 0], slots[slots >= 0].float())
    assert cache.k.shape[2] == 4  # memory stays bounded


@pytest.mark.parametrize("static", [True, False])
def test_cached_decoding_matches_full_forward(static):
    """Prefill, one chunk longer than the window, then single steps until the ring wrapped twice."""
    model = _random_gemma(_tiny_config(final_logit_softcapping=30.0))
    T = 19
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=2, max_len=T if static else None)
        steps = [model(ids[:, :3], cache=cache), model(ids[:, 3:9], cache=cache)]  # chunk of 6 > window 4
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(9, T)]
    assert cache[0].length == T
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= 1e-5, f"cached decoding differs from the full forward by {diff:.3g}"


def test_cached_decoding_with_left_padding_matches_full_forward():
    model = _random_gemma(_tiny_config(num_key_value_heads=1))
    ids, mask = _left_padded(B=3, T=15, seed=4, pad=(0, 2, 5))
    mask = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, last_only=False)
        cache = model.new_cache(batch=3)
        steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)]
        steps += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(8, 15)]
        last = model(ids, attention_mask=mask, last_only=True)
    got = torch.cat(steps, dim=1)
    assert (got - full).abs()[mask].max() <= 1e-5
    assert torch.allclose(last, full[:, -1:], atol=1e-6)


def test_static_cache_refuses_overflow():
    cache = KVCache(1, 1, 4, max_len=3)
    cache.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="full"):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def _allocated_bytes(cache):
    return sum(c.k.nbytes + c.v.nbytes for c in cache)


@pytest.mark.parametrize("name", list(PRESETS))
def test_kv_cache_bytes_is_what_new_cache_allocates(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Gemma(cfg)
    W = cfg.sliding_window
    for T, batch, dtype in [(1, 1, torch.bfloat16), (W - 1, 2, torch.bfloat16), (W, 1, torch.float32),
                            (W + 1, 3, torch.bfloat16), (32_768, 1, torch.bfloat16)]:
        cache = model.new_cache(batch=batch, max_len=T, dtype=dtype, device="meta")
        assert kv_cache_bytes(cfg, T, batch, dtype) == _allocated_bytes(cache), (name, T, batch, dtype)


def test_kv_cache_bytes_after_real_decoding():
    """Allocate for real on CPU, decode past the window, and count the bytes the cache tensors hold."""
    cfg = _tiny_config()
    model = _random_gemma(cfg)
    T = 11
    cache = model.new_cache(batch=2, max_len=T, dtype=torch.float32)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 6)), cache=cache)
        for _ in range(T - 6):
            model(torch.randint(0, VOCAB, (2, 1)), cache=cache)
    assert _allocated_bytes(cache) == kv_cache_bytes(cfg, T, batch=2, dtype=torch.float32)


def test_kv_cache_bytes_matches_hand_arithmetic_for_270m():
    """The facts file's numbers for Gemma 3 270M in bf16 at 32K: 576 MiB global-only, 103.5 MiB with 5:1, W=512."""
    cfg = PRESETS["gemma3-270m"]
    MiB = 2 ** 20
    assert kv_cache_bytes(cfg, 32_768) == 103.5 * MiB
    assert kv_cache_bytes(preset("gemma3-270m", layer_types=[FULL] * 18), 32_768) == 576 * MiB


# --------------------------------------------------------------------------------------------
# Attention blocks: chunked local prompts, mask-free decode steps
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_local_layers_read_only_their_window_in_query_chunks(monkeypatch, padded):
    """A local layer's long prompt is cut into chunks of queries that each read only the keys inside
    their window; the logits must equal the unchunked forward (HF parity above covers that one)."""
    from minigemma import attention

    model = _random_gemma(_tiny_config())  # W = 4
    ids, mask = _left_padded(B=2, T=23, seed=9, pad=(0, 5))
    mask = mask.bool() if padded else None
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        monkeypatch.setattr(attention, "QUERY_CHUNK", 3)
        chunked = model(ids, attention_mask=mask)
    real = mask if padded else torch.ones_like(ids, dtype=torch.bool)
    assert (chunked - whole).abs()[real].max() <= 1e-5
    pos = make_positions(ids, None, mask, None)
    blocks = attention.attention_blocks(pos, attention.Keys(0, 23), window=4)
    assert len(blocks) == 8  # ceil(23 / 3) chunks
    assert all(b.k1 - b.k0 <= 4 - 1 + (b.q1 - b.q0) for b in blocks)  # W - 1 keys before the chunk, no more
    assert [b.k0 for b in blocks] == [max(0, b.q0 - 3) for b in blocks]


def test_a_local_layers_prompt_inside_its_window_is_one_causal_block():
    """Where a local layer's whole prompt fits in its window, the window hides nothing that causality does
    not: one block for the fused causal kernel, no mask built. One token more and the band needs its mask."""
    from minigemma import attention

    for T, W in ((3, 4), (4, 4), (5, 4)):
        pos = make_positions(torch.zeros(1, T, dtype=torch.long), None, None, None)
        (block,) = attention.attention_blocks(pos, attention.Keys(0, T), window=W)
        fits = T <= W
        assert block.causal == fits and (block.mask is None) == fits, (T, W)
    model = _random_gemma(_tiny_config())  # W = 4
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        banded = model(ids)  # 5 tokens: the local layers' explicit band mask
        fused = model(ids[:, :4])  # 4 tokens: their causal block (the first 4 queries see the same keys)
    assert (fused - banded[:, :4]).abs().max() <= 1e-5  # float32, the same sums in another kernel


def test_decode_steps_need_no_mask_and_prompts_no_square_mask():
    """The plans the fast paths rely on: a global layer's unpadded prompt is one causal block (no T x T
    mask is built), a decode step against every key it may see has no mask at all, in a global cache and
    in a ring that has wrapped; padding always brings a mask."""
    from minigemma import attention

    model = _random_gemma(_tiny_config())
    cache = model.new_cache(batch=1, max_len=12)
    prompt = make_positions(torch.zeros(1, 6, dtype=torch.long), cache, None, None)
    (glob,) = prompt.blocks(attention.Keys(0, 6, layout=("self", 6)), window=None)
    assert glob.causal and glob.mask is None
    for t in range(6, 11):  # steps past the ring's wrap (W = 4)
        step = make_positions(torch.zeros(1, 1, dtype=torch.long), cache, None, None)
        ring = attention.RingKVCache(1, 1, 2, window=4)
        ring.length = t
        _, _, keys = ring.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        assert [b.mask for b in step.blocks(keys, window=4)] == [None]
        assert [b.mask for b in step.blocks(attention.Keys(0, t + 1, layout=("kv", t + 1)), window=None)] == [None]
    padded = make_positions(torch.zeros(2, 5, dtype=torch.long), None, torch.tensor([[0, 1, 1, 1, 1]] * 2).bool(), None)
    assert padded.packed and padded.blocks(attention.Keys(0, 5), window=None)[0].mask is not None
