"""Chapter 10's capstone hook (minigemma/learner_encoder.py) and its check (10.capstone).

- with the package's own functions as "your functions", the hook's copy of a tiny encoder computes what
  the encoder computes (padding on the right and on the left, local band and global layers, full width
  and an MRL prefix, all three functions or one at a time), shares its parameters, and leaves the model
  as it was; a wrong function changes the output; what the hook cannot take is refused clearly;
- the capstone's inputs exercise every mechanism it covers: a padded batch of documents and of queries,
  a document longer than the band's half-width plus one (257 tokens), a trained MRL prefix, and rankings
  whose gaps are far wider than the tolerance;
- on the real EmbeddingGemma 300M, the capstone passes the exercises' answers, fails each mutant of
  tests/mutants/ch10.py naming exactly the function it breaks, and says "not written yet" for a stub.
"""

import pytest
import torch

from minigemma import learner_encoder
from minigemma.attention import GroupedQueryAttention
from minigemma.encoder import MRL_DIMS, EmbeddingGemma, band_window, encoder_mask, mean_pool, truncate
from minigemma.gemma import GemmaConfig, layer_pattern
from minigemma.grading import core
from minigemma.grading.checks import ch10
from minigemma.layers import RMSNorm

REFERENCES = dict(mean_pool=mean_pool, mrl_truncate=truncate, encoder_mask=encoder_mask)


def _tiny():
    """An encoder shaped like EmbeddingGemma, small enough to test: local and global layers alternate, a
    window of 4 (band |i - j| <= 2) so a text of 9 tokens crosses it, 4 query heads share 2 kv heads."""
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, layer_types=layer_pattern(4, 2), sliding_window=4,
                      query_pre_attn_scalar=8, use_qk_norm=True, rope_theta=1_000_000.0, bidirectional=True)
    model = EmbeddingGemma(cfg, dense_dims=(32, 16)).eval()
    with torch.no_grad():  # norms away from their identity start, so each one matters
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(0.0, 0.3)
    return model


def _batch():
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [0] * 3 + [1] * 6], dtype=torch.bool)  # right and left padding
    return ids, mask


@pytest.mark.parametrize("names", [tuple(REFERENCES)] + [(n,) for n in REFERENCES], ids=lambda n: "+".join(n))
def test_the_references_through_the_hook_compute_the_model(names):
    model = _tiny()
    ids, mask = _batch()
    yours = learner_encoder.with_functions(model, **{n: REFERENCES[n] for n in names})
    with torch.no_grad():
        for dim in (None, 8):
            torch.testing.assert_close(yours(ids, mask, dim), model(ids, mask, dim), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(yours(ids[:1]), model(ids[:1]), atol=1e-6, rtol=1e-5)  # no padding at all


def test_the_copy_shares_the_weights_and_leaves_the_model_alone():
    model = _tiny()
    asked = []

    def spy(attention_mask, sliding_window):
        asked.append(sliding_window)
        return encoder_mask(attention_mask, sliding_window)

    yours = learner_encoder.with_functions(model, encoder_mask=spy, mean_pool=mean_pool)
    assert yours.embed_tokens.weight is model.embed_tokens.weight
    assert yours.layers[1].mlp.gate_up_proj.weight is model.layers[1].mlp.gate_up_proj.weight
    assert yours.dense[0].weight is model.dense[0].weight
    assert type(yours) is learner_encoder.YourEncoder and type(model) is EmbeddingGemma
    assert type(yours.layers[0].self_attn) is learner_encoder.YourEncoderAttention
    assert type(model.layers[0].self_attn) is GroupedQueryAttention
    assert model.layers[0].self_attn.window == band_window(4)  # the package's layer keeps its own band
    with torch.no_grad():
        yours(*_batch())
    assert asked == [4, None]  # once per call and kind of layer: the config's W on a local layer, None on a global


def test_a_wrong_function_changes_the_output():
    model = _tiny()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, mask)
        causal = learner_encoder.with_functions(model, encoder_mask=lambda m, W: encoder_mask(m, W) & torch.ones(
            9, 9, dtype=torch.bool).tril())
        assert not torch.allclose(causal(ids, mask), want, atol=1e-3)
        no_band = learner_encoder.with_functions(model, encoder_mask=lambda m, W: encoder_mask(m, None))
        assert not torch.allclose(no_band(ids, mask), want, atol=1e-3)
        pads_too = learner_encoder.with_functions(model, mean_pool=lambda h, m: h.mean(1))
        assert not torch.allclose(pads_too(ids, mask)[1:], want[1:], atol=1e-3)
        assert torch.allclose(pads_too(ids, mask)[0], want[0], atol=1e-6)  # the unpadded row is the same


def test_what_the_hook_cannot_take_is_refused_clearly():
    model = _tiny()
    ids, mask = _batch()
    with pytest.raises(TypeError, match="unknown functions"):
        learner_encoder.with_functions(model, rms_norm=lambda x, w, eps: x)
    with pytest.raises(TypeError, match="unknown functions"):
        learner_encoder.YourEmbeddingGemma(mean_pool=mean_pool, pool=mean_pool)
    with pytest.raises(TypeError, match="not functions"):
        learner_encoder.YourEmbeddingGemma(mean_pool=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"must return a \(3, 9, 9\) boolean tensor, got a torch.int64"):
            learner_encoder.with_functions(model, encoder_mask=lambda m, W: encoder_mask(m, W).long())(ids, mask)
        with pytest.raises(ValueError, match=r"must return a \(3, 16\) tensor"):
            learner_encoder.with_functions(model, mean_pool=lambda h, m: h.mean(1, keepdim=True))(ids, mask)
        with pytest.raises(ValueError, match=r"must return a \(3, 8\) tensor"):
            learner_encoder.with_functions(model, mrl_truncate=lambda e, d: e)(ids, mask, 8)


def test_token_batches_pad_texts_of_different_lengths_together():
    assert learner_encoder.token_batches([5, 300, 7, 6], max_tokens=512) == [[1], [2, 3, 0]]
    assert learner_encoder.token_batches([600, 4], max_tokens=512) == [[0], [1]]  # a long text is a batch alone


# --------------------------------------------------------------------------------------------
# The capstone on the real model
# --------------------------------------------------------------------------------------------
def test_the_capstone_inputs_exercise_every_mechanism():
    model, _ = learner_encoder.reference_model()
    W = model.config.sliding_window
    assert W == 512 and model.config.bidirectional and "sliding_attention" in model.config.layer_types
    half = W // 2
    for texts, prompt in ((ch10.CAPSTONE_QUERIES, "query"), (ch10.CAPSTONE_DOCUMENTS, "document")):
        lengths = [len(ids) for ids in model.tokenize(list(texts), prompt)]
        padded = [b for b in learner_encoder.token_batches(lengths) if len({lengths[i] for i in b}) > 1]
        assert padded, f"no batch of the {prompt} texts is padded: {lengths}"
        if prompt == "document":  # some token pairs lie outside the band of the local layers
            assert max(lengths) > half + 1 + 40, lengths
            assert lengths[-1] == 324  # as the case's label says
    assert all(d is None or d in MRL_DIMS for d in ch10.CAPSTONE_DIMS) and 128 in ch10.CAPSTONE_DIMS
    # a right answer within the tolerance cannot reorder the top k: every gap the ranking depends on is wider
    for dim in ch10.CAPSTONE_DIMS:
        q = learner_encoder.reference_encode(ch10.CAPSTONE_QUERIES, "query", dim)
        d = learner_encoder.reference_encode(ch10.CAPSTONE_DOCUMENTS, "document", dim)
        scores = (q @ d.T).sort(dim=-1, descending=True).values[:, :ch10.CAPSTONE_K + 1]
        assert (scores[:, :-1] - scores[:, 1:]).min() > 100 * ch10.CAPSTONE_ATOL, scores


def test_capstone_names_the_function_that_breaks_the_results():
    from tests.mutants.ch10 import CAPSTONE_BROKEN, CORRECT, MUTANTS, YOUR_ANSWERS

    (_, right), = CORRECT["10.capstone"]
    r = core.run_check("10.capstone", right, seed=0)
    assert r.passed, core.format_result(r)
    for label, mutant in MUTANTS["10.capstone"]:
        r = core.run_check("10.capstone", mutant, seed=0)
        name = CAPSTONE_BROKEN[label][0]
        assert not r.passed and r.failure["why"].startswith(f"broken by your {name} (exercise"), (label, r.failure)
        assert all(f"your {other} " not in r.failure["why"]
                   for other in learner_encoder.FUNCTIONS if other != name), (label, r.failure)

    def encoder_mask(attention_mask, sliding_window):
        raise NotImplementedError()  # an untouched exercise stub

    stub = learner_encoder.YourEmbeddingGemma(**{**YOUR_ANSWERS, "encoder_mask": encoder_mask})
    r = core.run_check("10.capstone", stub, seed=0)
    assert not r.passed and "not written yet: encoder_mask" in r.failure["error"], r.failure
    assert "mean_pool" not in r.failure["error"] and "mrl_truncate" not in r.failure["error"]
