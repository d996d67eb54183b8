"""The capstone's hook (minigemma/learner.py) and the new exercises' reference adapters.

- with the checks' own references as "your functions", the hook's copy of a model computes what the
  model computes (prompt and cached decoding, local and global layers, all six functions or one at a
  time), shares its parameters, and leaves the model as it was;
- what the hook cannot express says so;
- on the real Gemma 3 270M, the capstone passes the exercises' answers and names the function that
  breaks the text (the mutants of tests/mutants/ch06.py; their texts are shared with test_grading.py);
- the reference adapters of 03.lm_head and 03.decoder_layer are the model's own code paths, and the
  GGUF bytes the 05.gguf_header cases are written as read the same with the `gguf` package.
"""

import pytest
import torch

from minigemma import learner
from minigemma.attention import GroupedQueryAttention, grouped_query_attention
from minigemma.gemma import DecoderLayer, Gemma, GemmaConfig, layer_pattern
from minigemma.grading import core
from minigemma.grading.checks import ch01, ch02, ch03, ch04, ch05
from minigemma.layers import RMSNorm, embedding_scale

# the package's own maths in the exercises' signatures: the references the checks compare with
REFERENCES = dict(rms_norm=ch03.rms_norm_reference, rope=ch01.rope_reference, gqa_attention=grouped_query_attention,
                  geglu=ch03.geglu_reference, layer_mask=ch04.layer_mask_reference,
                  kv_cache_update=lambda ck, cv, n, k, v: ch02.kv_cache_update_reference(ck, cv, n, k, v))


def _tiny(**kw):
    """A Gemma 3 shaped model small enough to test: 2 of every 3 layers local with a window of 3, so a
    prompt of 7 and a few decode steps cross the window; 4 query heads share 2 kv heads."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, layer_types=layer_pattern(3, 3), sliding_window=3,
               query_pre_attn_scalar=8, use_qk_norm=True, rope_theta=1_000_000.0)
    cfg.update(kw)
    model = Gemma(GemmaConfig(**cfg)).eval()
    with torch.no_grad():  # norms away from their identity start, so each one matters
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(0.0, 0.3)
    return model


def _decode(model, ids, steps=4):
    """Logits of a prompt and then of `steps` fed tokens, through the model's cache."""
    cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1] + steps)
    out = [model(ids, cache=cache)]
    for t in range(steps):
        out.append(model(ids[:, t % ids.shape[1]:][:, :1], cache=cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("names", [tuple(REFERENCES)] + [(n,) for n in REFERENCES], ids=lambda n: "+".join(n))
def test_the_references_through_the_hook_compute_the_model(names):
    model = _tiny()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    yours = learner.with_functions(model, **{n: REFERENCES[n] for n in names})
    with torch.no_grad():
        torch.testing.assert_close(yours(ids), model(ids), atol=1e-5, rtol=1e-4)  # no cache
        torch.testing.assert_close(_decode(yours, ids), _decode(model, ids), atol=1e-5, rtol=1e-4)


def test_the_copy_shares_the_weights_and_leaves_the_model_alone():
    model = _tiny()
    yours = learner.with_functions(model, **REFERENCES)
    assert yours.embed_tokens.weight is model.embed_tokens.weight is yours.lm_head.weight  # shared, still tied
    assert yours.layers[1].mlp.gate_up_proj.weight is model.layers[1].mlp.gate_up_proj.weight
    assert type(yours.layers[0].self_attn) is learner.YourAttention and type(yours.norm) is learner.YourRMSNorm
    assert type(model.layers[0].self_attn) is GroupedQueryAttention and type(model.norm) is RMSNorm
    assert [m._layer for m in (yours.layers[i].self_attn for i in range(3))] == [(0, 3, 3), (1, 3, 3), (2, 3, 3)]
    cache = yours.new_cache(batch=1, max_len=5)
    assert all(type(c) is learner.YourKVCache for c in cache)  # every layer: the window comes from your mask


def test_a_wrong_function_changes_the_output():
    model = _tiny()
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    causal_everywhere = learner.with_functions(model, layer_mask=lambda T, i, W, every: torch.ones(T, T).tril().bool())
    with torch.no_grad():
        assert not torch.allclose(causal_everywhere(ids), model(ids), atol=1e-3)  # the window is gone


def test_what_the_hook_cannot_express_is_refused_clearly():
    model = _tiny()
    with pytest.raises(TypeError, match="unknown functions"):
        learner.with_functions(model, softmax=torch.softmax)
    with pytest.raises(TypeError, match="unknown functions"):
        learner.YourGemma(rms_norm=ch03.rms_norm_reference, attention=grouped_query_attention)
    with pytest.raises(ValueError, match="soft-cap"):
        learner.with_functions(_tiny(attn_logit_softcapping=50.0, use_qk_norm=False), gqa_attention=grouped_query_attention)
    with pytest.raises(ValueError, match="rotates all of head_dim"):
        learner.with_functions(_tiny(rope_scaling_factor=8.0), rope=ch01.rope_reference)
    with pytest.raises(ValueError, match="no 'every' pattern"):
        learner.with_functions(_tiny(layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
                               layer_mask=ch04.layer_mask_reference)
    yours = learner.with_functions(model, rope=ch01.rope_reference)
    padded = torch.tensor([[True, True, True], [False, True, True]])
    with pytest.raises(NotImplementedError, match="one document per row"):
        yours(torch.zeros(2, 3, dtype=torch.long), attention_mask=padded)


def test_every_of_reads_the_pattern():
    assert learner.every_of(layer_pattern(18, 6)) == 6
    assert learner.every_of(layer_pattern(26, 2)) == 2
    assert learner.every_of(layer_pattern(4, 1)) == 1


# --------------------------------------------------------------------------------------------
# The capstone on the real model
# --------------------------------------------------------------------------------------------
def test_capstone_names_the_function_that_breaks_the_text():
    from tests.mutants.ch06 import CAPSTONE_BROKEN, CORRECT, MUTANTS, YOUR_ANSWERS

    (_, right), = CORRECT["06.capstone"]
    assert core.run_check("06.capstone", right, seed=0).passed
    for label, mutant in MUTANTS["06.capstone"]:
        r = core.run_check("06.capstone", mutant, seed=0)
        name = CAPSTONE_BROKEN[label][0]
        assert not r.passed and r.failure["why"].startswith(f"broken by your {name} (exercise")
        assert all(f"your {other} " not in r.failure["why"] for other in learner.FUNCTIONS if other != name)
    def geglu(*args):
        raise NotImplementedError()  # an untouched exercise stub

    stub = learner.YourGemma(rope=YOUR_ANSWERS["rope"], geglu=geglu)
    r = core.run_check("06.capstone", stub, seed=0)
    assert not r.passed and "not written yet: geglu" in r.failure["error"] and "rope" not in r.failure["error"]


# --------------------------------------------------------------------------------------------
# The reference adapters are the model's own code paths
# --------------------------------------------------------------------------------------------
def test_lm_head_reference_is_gemmas_tail():
    """A Gemma with no layers is embedding · √C -> final norm -> tied head -> cap: the adapter on the scaled
    embedding must give its logits."""
    for cap in (None, 30.0):
        model = _tiny(num_hidden_layers=0, layer_types=[], final_logit_softcapping=cap)
        ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            x = model.embed_tokens(ids) * embedding_scale(16, torch.float32)
            got = ch03.lm_head_reference(x, model.embed_tokens.weight, model.norm.weight, model.config.rms_norm_eps, cap)
            torch.testing.assert_close(got, model(ids), atol=1e-5, rtol=1e-5)


def test_decoder_layer_reference_is_the_layers_forward():
    model = _tiny()
    layer: DecoderLayer = model.layers[0]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    subs = [ch03.Sublayer(n, m) for n, m in [("attention", lambda h: layer.self_attn(h)), ("mlp", layer.mlp),
                                            ("input_norm", layer.input_layernorm),
                                            ("post_attention_norm", layer.post_attention_layernorm),
                                            ("pre_feedforward_norm", layer.pre_feedforward_layernorm),
                                            ("post_feedforward_norm", layer.post_feedforward_layernorm)]]
    with torch.no_grad():
        torch.testing.assert_close(ch03.decoder_layer_reference(x, *subs), layer(x))


def test_gguf_case_files_read_the_same_with_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    for i, case in enumerate(core.get("05.gguf_header").cases(0)):
        path = tmp_path / f"{i}.gguf"
        path.write_bytes(case.args[0])
        theirs = gguf.GGUFReader(path)
        version, metadata, tensors = ch05.gguf_header_reference(case.args[0])
        assert [k for k, _ in metadata] == [k for k in theirs.fields if not k.startswith("GGUF.")], case.label
        for (k, v), field in zip(metadata, (theirs.fields[k] for k, _ in metadata)):
            assert v == field.contents(), (case.label, k)
        assert [(n, tuple(s), t) for n, s, t, _ in tensors] == \
               [(t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type)) for t in theirs.tensors], case.label
        assert [o for *_, o in tensors] == [int(t.data_offset) for t in theirs.tensors], case.label
