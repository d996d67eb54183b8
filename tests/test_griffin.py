"""Griffin / RecurrentGemma against two independent references, on tiny random configs.

References:
- the official `recurrentgemma` package (its torch implementation), fed our random weights
  through the name table below;
- HF transformers' RecurrentGemmaForCausalLM, built from a config with random weights, saved with
  `save_pretrained` and loaded by our `pretrained.griffin_from_hf_dir` (so the loader is exercised too).

Tolerance: float32 logits within 1e-4 (absolute). Both sides compute the same float32 operations;
what remains is summation order (einsum vs matmul, a conv vs a loop), a few ulps per layer,
far below 1e-4 on logits of size ~1-30, while any wrong formula moves them by >= 1e-2.

The two references disagree on the attention window's left edge (official: q - W <= k, W + 1 keys;
HF: q - W < k, W keys). `GriffinConfig.window_edge` selects one; each is tested against its own
reference on sequences longer than the window, and the test below shows the two really differ.
HF also ignores document boundaries in its conv and attention (only the RG-LRU resets), so segment
resets are tested against the official package only.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from minigemma.griffin import (
    ATTENTION, PRESETS, RECURRENT, Griffin, GriffinConfig, associative_combine, causal_conv1d,
    param_count, scan_associative, scan_sequential, state_bytes,
)
from minigemma.pretrained import griffin_from_hf_dir
from minigemma.pretrained import unfused_state_dict
from minigemma.weights.hf import CheckpointError

ATOL = 1e-4


# --------------------------------------------------------------------------------------------
# The official package
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rg():
    """`recurrentgemma.torch`, imported without running `recurrentgemma/__init__.py`.

    That top-level __init__ imports the JAX implementation (jax, flax), which the test environment
    does not have: recurrentgemma pins numpy<2.4, so it is installed with --no-deps and only the
    torch side's needs (einops, jaxtyping) are installed. We register a bare package object whose
    __path__ is the installed directory; Python then imports `recurrentgemma.common` and
    `recurrentgemma.torch` from it as usual, and never executes the parent __init__.
    """
    spec = importlib.util.find_spec("recurrentgemma")
    if spec is None:
        pytest.skip("the official recurrentgemma package is not installed (pip install --no-deps recurrentgemma)")
    saved = {k: v for k, v in sys.modules.items() if k == "recurrentgemma" or k.startswith("recurrentgemma.")}
    pkg = types.ModuleType("recurrentgemma")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["recurrentgemma"] = pkg
    try:
        import recurrentgemma.torch as rgt
        from recurrentgemma import common
    except ImportError as e:
        pytest.skip(f"recurrentgemma.torch cannot be imported here: {e}")
    rgt.common = common
    yield rgt
    for k in [k for k in sys.modules if k == "recurrentgemma" or k.startswith("recurrentgemma.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def tiny_config(**kw) -> GriffinConfig:
    # width 48: sqrt(48) = 6.928 rounds to 6.9375 in bf16, so the embedding-scale rounding matters;
    # lru_width != width; 4 blocks so the pattern wraps (r, r, a, r); window 8 < the test lengths.
    base = dict(vocab_size=97, width=48, num_layers=4, num_heads=4, num_kv_heads=1, lru_width=64,
                mlp_expanded_width=80, attention_window_size=8)
    base.update(kw)
    return GriffinConfig(**base)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (biases and norm weights start at 0, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "a_param" in name or "recurrent_param" in name:
            continue  # keep the decay rates in their meaningful range
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def our_model(cfg: GriffinConfig, seed: int = 0) -> Griffin:
    torch.manual_seed(seed)
    return randomise(Griffin(cfg), seed + 1).eval()


def official_model(rg, ours: Griffin):
    """The official torch Griffin holding exactly our weights."""
    cfg = ours.config
    kinds = {RECURRENT: rg.common.TemporalBlockType.RECURRENT, ATTENTION: rg.common.TemporalBlockType.ATTENTION}
    ocfg = rg.GriffinConfig(
        vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.mlp_expanded_width,
        num_heads=cfg.num_heads, block_types=tuple(kinds[k] for k in cfg.block_types),
        embeddings_scale_by_sqrt_dim=True, attention_window_size=cfg.attention_window_size,
        logits_soft_cap=cfg.logits_soft_cap, lru_width=cfg.lru_width)
    model = rg.Griffin(ocfg, gradient_checkpointing=False).eval()
    sd = unfused_state_dict(ours)  # q/k/v and gate/up under their own names
    out = {"embedder.input_embedding": sd["embed_tokens.weight"], "final_norm.scale": sd["norm.weight"]}
    for i, kind in enumerate(cfg.block_types):
        o, m = f"blocks.{i}.", f"layers.{i}."
        out[o + "temporal_pre_norm.scale"] = sd[m + "temporal_pre_norm.weight"]
        out[o + "channel_pre_norm.scale"] = sd[m + "channel_pre_norm.weight"]
        out[o + "mlp_block.ffw_up.w"] = torch.stack([sd[m + "mlp_block.gate_proj.weight"].T,
                                                     sd[m + "mlp_block.up_proj.weight"].T])  # (2, C, E)
        out[o + "mlp_block.ffw_up.b"] = torch.stack([sd[m + "mlp_block.gate_proj.bias"],
                                                     sd[m + "mlp_block.up_proj.bias"]])[:, None, None]
        out[o + "mlp_block.ffw_down.weight"] = sd[m + "mlp_block.down_proj.weight"]
        out[o + "mlp_block.ffw_down.bias"] = sd[m + "mlp_block.down_proj.bias"]
        t = m + "temporal_block."
        if kind == RECURRENT:
            r = o + "recurrent_block."
            for lin in ("linear_x", "linear_y", "linear_out"):
                out[f"{r}{lin}.weight"], out[f"{r}{lin}.bias"] = sd[f"{t}{lin}.weight"], sd[f"{t}{lin}.bias"]
            out[r + "conv_1d.w"], out[r + "conv_1d.b"] = sd[t + "conv_1d.weight"], sd[t + "conv_1d.bias"]
            out[r + "rg_lru.a_param"] = sd[t + "rg_lru.a_param"]
            for gate in ("input_gate", "a_gate"):
                out[f"{r}rg_lru.{gate}.w"] = sd[f"{t}rg_lru.{gate}.weight"]
                out[f"{r}rg_lru.{gate}.b"] = sd[f"{t}rg_lru.{gate}.bias"]
        else:
            a = o + "attention_block."
            for theirs, mine in (("proj_q", "q_proj"), ("proj_k", "k_proj"), ("proj_v", "v_proj"),
                                 ("proj_final", "o_proj")):
                out[f"{a}{theirs}.weight"] = sd[f"{t}{mine}.weight"]
            out[a + "proj_final.bias"] = sd[t + "o_proj.bias"]
    model.load_state_dict(out, strict=True)
    return model


def _ids(cfg, B, T, seed):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Parity with the official package
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_logits_match_official_longer_than_window(rg, scan):
    ours = our_model(tiny_config(scan=scan))
    ref = official_model(rg, ours)
    ids = _ids(ours.config, 2, 29, seed=1)  # T = 29 > W = 8: the window edge is exercised
    pos = torch.arange(29).expand(2, 29)
    with torch.no_grad():
        expected, _ = ref(ids, pos, return_cache=False)
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_segment_resets_match_official(rg):
    """Two and three documents packed in one row each; positions restart at 0 mid-sequence."""
    ours = our_model(tiny_config(), seed=3)
    ref = official_model(rg, ours)
    ids = _ids(ours.config, 2, 26, seed=2)
    pos = torch.stack([torch.cat([torch.arange(11), torch.arange(15)]),
                       torch.cat([torch.arange(5), torch.arange(1), torch.arange(20)])])
    with torch.no_grad():
        expected, _ = ref(ids, pos, return_cache=False)
        got = ours(ids, positions=pos)
        plain = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # ...and the resets really change the result (otherwise this test would prove nothing)
    assert (got[:, 11:] - plain[:, 11:]).abs().max() > 1e-2
    # a document after a reset does not depend on what came before it
    ids2 = ids.clone()
    ids2[0, :11] = (ids2[0, :11] + 1) % ours.config.vocab_size
    with torch.no_grad():
        got2 = ours(ids2, positions=pos)
    torch.testing.assert_close(got2[0, 11:], got[0, 11:], atol=1e-5, rtol=0)


def test_decoding_matches_official_decoding(rg):
    """Prefill 5 tokens, then 20 single steps (past the window), through both caches."""
    ours = our_model(tiny_config(), seed=5)
    ref = official_model(rg, ours)
    ids = _ids(ours.config, 2, 25, seed=3)
    pos = torch.arange(25).expand(2, 25)
    with torch.no_grad():
        exp, cache = ref(ids[:, :5], pos[:, :5])
        expected = [exp]
        for t in range(5, 25):
            e, cache = ref(ids[:, t:t + 1], pos[:, t:t + 1], cache)
            expected.append(e)
        c = ours.new_cache(2)
        got = [ours(ids[:, :5], cache=c)] + [ours(ids[:, t:t + 1], cache=c) for t in range(5, 25)]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Parity with HF transformers (and the loader)
# --------------------------------------------------------------------------------------------
def hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, lru_width=64, intermediate_size=2 * 80, attention_window_size=8,
                block_types=["recurrent", "recurrent", "attention"], attn_implementation="eager")
    base.update(kw)
    return transformers.RecurrentGemmaConfig(**base)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = randomise(transformers.RecurrentGemmaForCausalLM(hf_config()), seed=7).eval()
    path = tmp_path_factory.mktemp("hf_rg")
    model.save_pretrained(path)
    return model, path


def test_logits_match_hf(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = griffin_from_hf_dir(path, window_edge="exclusive")  # HF's window: W keys
    ids = _ids(ours.config, 2, 27, seed=4)  # longer than the window of 8
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_rglru_resets_match_hf_layer():
    """HF resets only its RG-LRU at position 0 (its conv and attention ignore documents), so resets
    are compared with HF at that layer: the same weights, positions restarting mid-sequence."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    from minigemma.griffin import RGLRU

    torch.manual_seed(0)
    theirs = RecurrentGemmaRglru(hf_config())
    # Built alone, outside a PreTrainedModel, HF's layer keeps its torch.empty parameters (whatever
    # memory held, NaN now and then): give every one a seeded value first.
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    theirs = randomise(theirs, seed=3)
    with torch.no_grad():
        theirs.recurrent_param.uniform_(-7.0, -2.0)  # a_param = -Λ with σ(Λ) in [0.88, 0.999]
    ours = RGLRU(64, 4)
    ours.load_state_dict({"a_param": theirs.recurrent_param, "input_gate.weight": theirs.input_gate_weight,
                          "input_gate.bias": theirs.input_gate_bias, "a_gate.weight": theirs.recurrent_gate_weight,
                          "a_gate.bias": theirs.recurrent_gate_bias})
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(4))
    pos = torch.stack([torch.cat([torch.arange(7), torch.arange(12)]), torch.arange(19)])
    with torch.no_grad():
        expected = theirs(x, pos)
        got = ours(x, pos)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got[0, 7:] - ours(x, torch.arange(19).expand(2, 19))[0, 7:]).abs().max() > 1e-2  # resets matter


def test_window_edge_conventions_differ(hf_checkpoint):
    """The official edge (W + 1 keys) gives different logits from HF's (W keys) past the window,
    and identical ones before it: the disagreement is exactly the one key at q - W."""
    _, path = hf_checkpoint
    official_edge, hf_edge = griffin_from_hf_dir(path), griffin_from_hf_dir(path, window_edge="exclusive")
    ids = _ids(official_edge.config, 1, 20, seed=5)
    with torch.no_grad():
        a, b = official_edge(ids), hf_edge(ids)
    W = official_edge.config.attention_window_size
    torch.testing.assert_close(a[:, :W], b[:, :W], atol=1e-6, rtol=0)
    assert (a[:, W:] - b[:, W:]).abs().max() > 1e-3


def test_load_pretrained_dispatches_to_griffin(hf_checkpoint):
    from minigemma.pretrained import load_pretrained

    model, tok = load_pretrained(hf_checkpoint[1])
    assert isinstance(model, Griffin) and tok is None


# --------------------------------------------------------------------------------------------
# Decoding with the fixed-size state
# --------------------------------------------------------------------------------------------
def test_step_decoding_equals_full_forward():
    ours = our_model(tiny_config(window_edge="exclusive"), seed=9)
    ids = _ids(ours.config, 3, 30, seed=6)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(3)
        steps = torch.cat([ours(ids[:, t:t + 1], cache=cache) for t in range(30)], 1)
        cache = ours.new_cache(3)  # prefill in uneven chunks, then steps
        chunks = torch.cat([ours(ids[:, :3], cache=cache), ours(ids[:, 3:14], cache=cache),
                            ours(ids[:, 14:15], cache=cache), ours(ids[:, 15:], cache=cache)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_one_at_a_time():
    ours = our_model(tiny_config(), seed=11)
    a, b = _ids(ours.config, 1, 12, seed=7), _ids(ours.config, 1, 5, seed=8)
    padded = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :7] = False
    with torch.no_grad():
        cache = ours.new_cache(2)
        batch = ours(padded, cache=cache, attention_mask=mask)
        step = ours(torch.tensor([[3], [4]]), cache=cache, attention_mask=torch.cat([mask, mask[:, :1] | True], 1))
        ca, cb = ours.new_cache(1), ours.new_cache(1)
        alone_a, alone_b = ours(a, cache=ca), ours(b, cache=cb)
        step_a, step_b = ours(torch.tensor([[3]]), cache=ca), ours(torch.tensor([[4]]), cache=cb)
    torch.testing.assert_close(batch[0], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, 7:], alone_b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, torch.cat([step_a, step_b]), atol=1e-5, rtol=0)


def test_state_is_fixed_size_and_state_bytes_counts_it():
    cfg = tiny_config()
    model = Griffin(cfg)
    cache = model.new_cache(2, dtype=torch.bfloat16)
    sizes = [t.numel() * t.element_size() for t in cache.tensors()]
    assert sum(sizes) == state_bytes(cfg, 10 ** 6, batch=2, dtype=torch.bfloat16)
    with torch.no_grad():
        model.to(torch.bfloat16)(_ids(cfg, 2, 20, seed=9), cache=cache)  # run past the window
    assert [t.numel() * t.element_size() for t in cache.tensors()] == sizes
    # below the window only min(T, W + 1) keys count (the official edge); past it, nothing grows
    keys = cfg.attention_window_size + 1
    assert state_bytes(cfg, 4) < state_bytes(cfg, keys) == state_bytes(cfg, 8000)
    assert state_bytes(cfg, keys - 1) < state_bytes(cfg, keys)


# --------------------------------------------------------------------------------------------
# The scans
# --------------------------------------------------------------------------------------------
def _naive_recurrence(a, b, h0):
    h, out = h0.double(), []
    for t in range(a.shape[1]):
        h = a[:, t].double() * h + b[:, t].double()
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 129])
def test_scans_agree_with_the_recurrence(T):
    g = torch.Generator().manual_seed(T)
    a, b, h0 = torch.rand(3, T, 5, generator=g), torch.randn(3, T, 5, generator=g), torch.randn(3, 5, generator=g)
    expected = _naive_recurrence(a, b, h0)
    for scan in (scan_sequential, scan_associative):
        h, last = scan(a, b, h0)
        torch.testing.assert_close(h.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last, h[:, -1])
    h, _ = scan_associative(a, b)  # no initial state means zeros
    torch.testing.assert_close(h.double(), _naive_recurrence(a, b, torch.zeros(3, 5)), atol=1e-5, rtol=1e-5)


def test_combine_is_associative_and_not_commutative():
    g = torch.Generator().manual_seed(0)
    e = [(torch.rand(4, generator=g), torch.randn(4, generator=g)) for _ in range(3)]
    left = associative_combine(associative_combine(e[0], e[1]), e[2])
    right = associative_combine(e[0], associative_combine(e[1], e[2]))
    torch.testing.assert_close(left, right)
    swapped = associative_combine(e[1], e[0])
    assert not torch.allclose(associative_combine(e[0], e[1])[1], swapped[1])


def test_conv_cache_equals_full_conv():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 9, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(6, generator=g)
    full, _ = causal_conv1d(x, w, bias)
    # written out: y_t = b + sum_s w[3-s] x_{t-s}
    xp = torch.cat([torch.zeros(2, 3, 6), x], 1)
    expected = bias + sum(w[3 - s] * xp[:, 3 - s: 12 - s] for s in range(4))
    torch.testing.assert_close(full, expected)
    cache, outs = None, []
    for t in range(9):
        y, cache = causal_conv1d(x[:, t:t + 1], w, bias, cache)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    # positions restart at t = 4: that document sees none of the tokens before it
    positions = torch.tensor([list(range(4)) + list(range(5))] * 2)
    masked, _ = causal_conv1d(x, w, bias, positions=positions)
    fresh, _ = causal_conv1d(x[:, 4:], w, bias)
    torch.testing.assert_close(masked[:, 4:], fresh)
    torch.testing.assert_close(masked[:, :4], full[:, :4])


# --------------------------------------------------------------------------------------------
# Presets: parameter counts from two independent builds, on the meta device
# --------------------------------------------------------------------------------------------
HF_PRESETS = {  # the configs HF's conversion script gives the published checkpoints
    "recurrentgemma-2b": dict(hidden_size=2560, intermediate_size=15360, num_attention_heads=10,
                              num_key_value_heads=1, num_hidden_layers=26, vocab_size=256000),
    "recurrentgemma-9b": dict(hidden_size=4096, intermediate_size=24576, num_attention_heads=16,
                              num_key_value_heads=1, num_hidden_layers=38, vocab_size=256000),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_match_hf(name):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.RecurrentGemmaConfig(**HF_PRESETS[name])
    with torch.device("meta"):
        hf = transformers.RecurrentGemmaForCausalLM(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied head is one parameter
    assert param_count(PRESETS[name]) == hf_count
    assert GriffinConfig.from_hf(hf_cfg.to_dict()) == PRESETS[name]


@pytest.mark.parametrize("name,preset", [("recurrentgemma-2b", "RECURRENT_GEMMA_2B_V1"),
                                         ("recurrentgemma-9b", "RECURRENT_GEMMA_9B_V1")])
def test_preset_param_counts_match_official(rg, name, preset):
    ocfg = rg.GriffinConfig.from_preset(getattr(rg.Preset, preset))
    model = rg.Griffin(ocfg, gradient_checkpointing=False, device="meta")
    assert param_count(PRESETS[name]) == sum(p.numel() for p in model.parameters())
    cfg = PRESETS[name]
    assert (cfg.width, cfg.num_heads, cfg.attention_window_size, cfg.logits_soft_cap) == (
        ocfg.width, ocfg.num_heads, ocfg.attention_window_size, ocfg.logits_soft_cap)


# --------------------------------------------------------------------------------------------
# Loader errors
# --------------------------------------------------------------------------------------------
def _copy_checkpoint(src, dst, edit):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return json.loads((dst / "config.json").read_text())


def test_loader_names_missing_tensor(hf_checkpoint, tmp_path):
    name = "model.layers.1.temporal_block.rg_lru.recurrent_param"
    _copy_checkpoint(hf_checkpoint[1], tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensors for: layers\.1\.temporal_block\.rg_lru\.a_param"):
        griffin_from_hf_dir(tmp_path)


def test_loader_names_unexpected_tensor(hf_checkpoint, tmp_path):
    _copy_checkpoint(hf_checkpoint[1], tmp_path, lambda t: t.update({"model.layers.2.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.2\.extra\.weight"):
        griffin_from_hf_dir(tmp_path)


def test_loader_names_shape_mismatch(hf_checkpoint, tmp_path):
    import json

    cfg = _copy_checkpoint(hf_checkpoint[1], tmp_path, lambda t: None)
    cfg["lru_width"] = 32  # the weights say 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*linear_x\.weight \(64, 48\)"):
        griffin_from_hf_dir(tmp_path)


def test_loader_refuses_pickles(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never loaded"):
        griffin_from_hf_dir(tmp_path)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="window_edge"):
        tiny_config(window_edge="left")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny_config(lru_width=66)
    with pytest.raises(ValueError, match="positions must have shape"):
        Griffin(tiny_config())(torch.zeros(2, 5, dtype=torch.long), positions=torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------
# Generation through the shared `generate` API and CLI
# --------------------------------------------------------------------------------------------
def test_generate_ids_batched_and_cached_agree():
    from minigemma.generation import generate_ids

    model = our_model(tiny_config(), seed=13)
    prompts = [[2, 5, 9, 11, 3, 40, 41, 7, 8, 9, 10, 12, 13], [2, 17, 4]]  # longer than the window of 8
    batched = generate_ids(model, prompts, max_new_tokens=12, eos_id=None)
    alone = [generate_ids(model, [p], max_new_tokens=12, eos_id=None)[0] for p in prompts]
    uncached = generate_ids(model, prompts, max_new_tokens=12, eos_id=None, use_cache=False)
    assert batched == alone == uncached
    assert all(len(row) == 12 for row in batched)


def test_generate_cli_with_a_griffin_checkpoint(tmp_path, capsys):
    """`python -m minigemma generate --model DIR` on an HF recurrent_gemma checkpoint (random weights,
    the Gemma tokenizer, greedy): prints only the completion, the same text as `generate`."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from minigemma import generation as gen
    from minigemma.pretrained import load_pretrained

    from minigemma.weights import fetch

    spm = fetch.cache_dir() / "embeddinggemma-300m" / "tokenizer.model"  # any Gemma tokenizer will do
    if not spm.is_file():
        pytest.skip("no Gemma tokenizer.model (run `python -m minigemma fetch embeddinggemma-300m`)")
    torch.manual_seed(0)
    hf = transformers.RecurrentGemmaForCausalLM(hf_config(vocab_size=262_144, hidden_size=32, lru_width=32,
                                                          intermediate_size=64, num_hidden_layers=3))
    hf.save_pretrained(tmp_path)
    shutil.copy(spm, tmp_path / "tokenizer.model")
    assert gen.main(["The capital of France is", "--model", str(tmp_path), "--max-new-tokens", "6",
                     "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    model, tok = load_pretrained(tmp_path)
    expected = gen.generate(model, tok, "The capital of France is", 6)
    assert printed == expected + "\n"
