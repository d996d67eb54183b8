"""Chapter 07's capstone hook (minigemma/learner_griffin.py).

- with the package's own maths in the exercises' signatures as "your functions", the hook's copy of a
  Griffin computes what the model computes (a prompt, a chunk that continues it, decode steps; all five
  functions or one at a time), shares its parameters, and leaves the model as it was;
- what the hook cannot express says so;
- the capstone passes the exercises' answers and names the function that breaks the logits (the
  mutants of tests/mutants/ch07.py, which tests/test_grading.py also runs on every seed); an untouched
  stub is "not written yet".
"""

import time

import pytest
import torch

from minigemma import learner_griffin
from minigemma.attention import GroupedQueryAttention
from minigemma.grading import core
from minigemma.grading.checks import ch07
from minigemma.griffin import RGLRU, Conv1D, RecurrentBlock, rglru_step, scan_associative
from minigemma.layers import gelu_tanh

# the package's own maths in the exercises' signatures: what the checks of chapter 07 compare with
REFERENCES = dict(
    rglru_step=lambda x, r, i, lam, h_prev, reset: rglru_step(x, r, i, lam, h_prev, reset),
    associative_scan=scan_associative,
    conv1d_with_cache=ch07.conv1d_with_cache,
    recurrent_block=lambda x, ly, lx, conv, lru, lo: lo(gelu_tanh(ly(x)) * lru(conv(lx(x)))),
    local_attention=ch07.local_attention_reference,
)
FEED = (11, 2, 1, 1, 1)  # a prompt past the window (9 keys), a chunk that continues it, three decode steps


def _ids(B=2, N=sum(FEED), seed=1):
    return torch.randint(0, 64, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("names", [tuple(REFERENCES)] + [(n,) for n in REFERENCES], ids=lambda n: "+".join(n))
def test_the_references_through_the_hook_compute_the_model(names):
    model = learner_griffin.capstone_model()
    yours = learner_griffin.with_functions(model, **{n: REFERENCES[n] for n in names})
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(yours(ids), model(ids), atol=1e-5, rtol=1e-5)  # no cache
    torch.testing.assert_close(learner_griffin.fed_logits(yours, ids, FEED),
                               learner_griffin.fed_logits(model, ids, FEED), atol=1e-5, rtol=1e-5)


def test_the_copy_shares_the_weights_and_leaves_the_model_alone():
    model = learner_griffin.capstone_model()
    yours = learner_griffin.with_functions(model, **REFERENCES)
    assert yours.embed_tokens.weight is model.embed_tokens.weight is yours.lm_head.weight  # shared, still tied
    assert yours.layers[0].temporal_block.conv_1d.weight is model.layers[0].temporal_block.conv_1d.weight
    kinds = [type(m) for m in (yours.layers[0].temporal_block, yours.layers[0].temporal_block.conv_1d,
                               yours.layers[1].temporal_block.rg_lru, yours.layers[2].temporal_block)]
    assert kinds == [learner_griffin.YourRecurrentBlock, learner_griffin.YourConv1D, learner_griffin.YourRGLRU,
                     learner_griffin.YourLocalAttention]
    assert [type(m) for m in (model.layers[0].temporal_block, model.layers[0].temporal_block.conv_1d,
                              model.layers[1].temporal_block.rg_lru, model.layers[2].temporal_block)] == \
           [RecurrentBlock, Conv1D, RGLRU, GroupedQueryAttention]
    only_conv = learner_griffin.with_functions(model, conv1d_with_cache=REFERENCES["conv1d_with_cache"])
    assert type(only_conv.layers[0].temporal_block) is RecurrentBlock  # the package's class where nothing is given
    assert type(only_conv.layers[2].temporal_block) is GroupedQueryAttention


def test_the_capstone_model_is_the_same_every_time_and_leaves_the_random_state_alone():
    state = torch.random.get_rng_state()
    learner_griffin.capstone_model.cache_clear()
    first = learner_griffin.capstone_model()
    learner_griffin.capstone_model.cache_clear()
    again = learner_griffin.capstone_model()
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), q in zip(first.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
        assert p.abs().max() > 0.1, f"{name} is near zero: it would hardly change the logits"
    assert again.lm_head.weight is again.embed_tokens.weight


def test_a_wrong_function_changes_the_logits():
    ids = _ids(B=1, N=12)
    feed = (2,) + (1,) * 10
    ref = learner_griffin.fed_logits(learner_griffin.capstone_model(), ids, feed)
    no_cache = learner_griffin.YourGriffin(
        conv1d_with_cache=lambda x, w, b, p: ch07.conv1d_with_cache(x, w, b, torch.zeros_like(p)))
    assert not torch.allclose(no_cache(ids, feed), ref, atol=1e-2)  # decoding forgets the prompt's inputs


def test_what_the_hook_cannot_express_is_refused_clearly():
    model = learner_griffin.capstone_model()
    with pytest.raises(TypeError, match="unknown functions"):
        learner_griffin.with_functions(model, rms_norm=lambda x, w, eps: x)
    with pytest.raises(TypeError, match="unknown functions"):
        learner_griffin.YourGriffin(scan=scan_associative)
    with pytest.raises(TypeError, match="not functions"):
        learner_griffin.YourGriffin(rglru_step=1.0)
    with pytest.raises(TypeError, match="into a Griffin"):
        learner_griffin.with_functions(torch.nn.Linear(4, 4), local_attention=REFERENCES["local_attention"])
    for name in ("conv1d_with_cache", "recurrent_block", "local_attention"):
        yours = learner_griffin.with_functions(model, **{name: REFERENCES[name]})
        padded = torch.tensor([[True, True, True], [False, True, True]])
        with pytest.raises(ValueError, match="one document per row"):
            yours(torch.zeros(2, 3, dtype=torch.long), attention_mask=padded)
    with pytest.raises(ValueError, match="feed"):
        learner_griffin.fed_logits(model, _ids(N=5), (2, 2))
    with pytest.raises(ValueError, match="your associative_scan returned tuple"):
        learner_griffin.YourGriffin(associative_scan=lambda a, b, h0=None: (b,))(_ids(N=4), (4,))


# --------------------------------------------------------------------------------------------
# The capstone's check
# --------------------------------------------------------------------------------------------
def test_capstone_names_the_function_that_breaks_the_logits():
    from tests.mutants.ch07 import CAPSTONE_BROKEN, CORRECT, MUTANTS, YOUR_ANSWERS

    for _, right in CORRECT["07.capstone"]:
        assert core.run_check("07.capstone", right, seed=0).passed
    for label, mutant in MUTANTS["07.capstone"]:
        r = core.run_check("07.capstone", mutant, seed=0)
        name = CAPSTONE_BROKEN[label][0]
        assert not r.passed, label
        assert r.failure["why"].startswith(f"broken by your {name} (exercise 07."), (label, r.failure["why"])
        assert all(f"your {other} " not in r.failure["why"] for other in learner_griffin.FUNCTIONS if other != name)

    def conv1d_with_cache(*args):
        raise NotImplementedError()  # an untouched exercise stub

    stub = learner_griffin.YourGriffin(rglru_step=YOUR_ANSWERS["rglru_step"], conv1d_with_cache=conv1d_with_cache)
    r = core.run_check("07.capstone", stub, seed=0)
    assert not r.passed and "not written yet: conv1d_with_cache" in r.failure["error"]
    assert "rglru_step" not in r.failure["error"]


def test_capstone_check_is_cheap():
    """The whole check, every case, on one core: well under the few seconds the suite can spend on it (CPU
    time of this process, so other work on the machine does not count)."""
    from tests.mutants.ch07 import MUTANTS, YOUR_ANSWERS

    core.run_check("07.capstone", learner_griffin.YourGriffin(**YOUR_ANSWERS), seed=0)  # warm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.process_time()
        assert core.run_check("07.capstone", learner_griffin.YourGriffin(**YOUR_ANSWERS), seed=1).passed
        t1 = time.process_time()
        assert not core.run_check("07.capstone", MUTANTS["07.capstone"][0][1], seed=1).passed  # with the diagnosis
        t2 = time.process_time()
    finally:
        torch.set_num_threads(threads)
    assert t1 - t0 < 3.0 and t2 - t1 < 3.0, (t1 - t0, t2 - t1)
