"""Chapter 08's capstone hook (minigemma/learner_train.py): the learner's loss, schedule and AdamW step train
a tiny Gemma, and the curve must be the package's.

- the reference curve is the curve of the package's training pieces with `torch.optim.AdamW` itself (so the
  hook's loop, not only its AdamW step, is the real thing), and the tiny model learns in it;
- the exercises' answers, written as a learner would and written other ways, pass; each wrong answer of
  tests/mutants/ch08.py's CAPSTONE_BROKEN fails, and the report names exactly the function it breaks;
- an untouched exercise stub says "not written yet";
- the tolerance has its margins: right answers stay 10x inside it, wrong ones 10x outside;
- the whole check stays fast (a few runs of a tenth of a second each).
"""

import pytest
import torch

from minigemma import learner_train as L
from minigemma.grading import core
from minigemma.losses import next_token_loss
from minigemma.train import lr_at
from tests.mutants.ch08 import CAPSTONE_BROKEN, CORRECT, MUTANTS, YOUR_ANSWERS

STEPS = 20


def _torch_adamw_curve(steps):
    """The hook's loop written again with torch.optim.AdamW (decay on matrices only, as train.make_optimizer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(L.SEED)
        model = L.Gemma(L.tiny_config())
    ids, mask = L.batch()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": L.WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=L.PEAK_LR, betas=L.BETAS, eps=L.EPS, foreach=False)
    curve = []
    for s in range(steps):
        loss = next_token_loss(model(ids, attention_mask=mask), ids, mask)
        loss.backward()
        curve.append(float(loss.detach()))
        for group in opt.param_groups:
            group["lr"] = lr_at(s, L.PEAK_LR, L.WARMUP, steps, L.MIN_RATIO)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.tensor(curve, dtype=torch.float64)


def test_the_reference_curve_is_torch_adamw_and_the_model_learns():
    ref = L.reference_curve(STEPS)
    assert torch.equal(ref, _torch_adamw_curve(STEPS))  # bit for bit: train.adamw_step is AdamW's step
    assert ref.shape == (STEPS,) and ref[0] > 4.0 and ref[-1] < ref[0] - 1.5  # from about ln 64 down
    ids, mask = L.batch()
    assert (~mask).sum(1).tolist() == [0, 3, 4, 0]  # one row padded on the left, one on the right


def test_the_hook_leaves_the_random_state_and_refuses_what_it_cannot_run():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    L.train_curve(2, **L.PACKAGE)
    assert torch.equal(torch.rand(3), before)
    with pytest.raises(TypeError, match="unknown functions"):
        L.YourTraining(optimizer=torch.optim.AdamW)
    with pytest.raises(TypeError, match="not functions"):
        L.YourTraining(lr_schedule=1e-3)


@pytest.mark.parametrize("label,yours", CORRECT["08.capstone"], ids=[lab for lab, _ in CORRECT["08.capstone"]])
def test_right_answers_pass_well_inside_the_tolerance(label, yours):
    for seed in (0, 1):
        r = core.run_check("08.capstone", yours, seed=seed)
        assert r.passed, core.format_result(r)
    gap = float((yours(STEPS) - L.reference_curve(STEPS)).abs().max())
    assert gap < L.TOLERANCE / 10, f"{label}: {gap:.3g}"


@pytest.mark.parametrize("label", list(CAPSTONE_BROKEN))
def test_each_wrong_answer_is_named(label):
    name = CAPSTONE_BROKEN[label][0]
    mutant = dict(MUTANTS["08.capstone"])[label]
    r = core.run_check("08.capstone", mutant, seed=0)
    assert not r.passed
    why = r.failure["why"]
    assert why.startswith(f"broken by your {name} (exercise {L.FUNCTIONS[name][1]}; the loss is off from step "), why
    assert all(f"your {other} " not in why for other in L.FUNCTIONS if other != name), why
    # the margin: the wrong answer moves the curve by more than ten times the tolerance
    assert float((mutant(STEPS) - L.reference_curve(STEPS)).abs().nan_to_num(1.0).max()) > 10 * L.TOLERANCE


def test_an_untouched_stub_is_not_written_yet():
    def adamw_step(*args):
        raise NotImplementedError()  # an untouched exercise stub

    stub = L.YourTraining(next_token_loss=YOUR_ANSWERS["next_token_loss"], adamw_step=adamw_step)
    r = core.run_check("08.capstone", stub, seed=0)
    assert not r.passed and "not written yet: adamw_step" in r.failure["error"]
    assert "next_token_loss" not in r.failure["error"]


def test_a_function_that_raises_is_named_with_its_error():
    def lr_schedule(step, peak, warmup, total, min_ratio):
        return peak * step / (warmup - 5)  # warmup is 5: ZeroDivisionError

    r = core.run_check("08.capstone", L.YourTraining(**{**YOUR_ANSWERS, "lr_schedule": lr_schedule}), seed=0)
    assert not r.passed and "your lr_schedule (it raises ZeroDivisionError" in r.failure["error"]


def test_the_check_trains_each_combination_once(monkeypatch):
    """A wrong answer nobody ran before costs four short runs (its own, then each of its three functions
    alone), however many cases and seeds: what keeps the check at about a second. Counted, not timed."""
    L.reference_curve(STEPS)
    runs = []
    real = L.train_curve
    monkeypatch.setattr(L, "train_curve", lambda steps, **fns: runs.append(steps) or real(steps, **fns))
    fresh = L.YourTraining(next_token_loss=lambda *a: YOUR_ANSWERS["next_token_loss"](*a),
                           lr_schedule=lambda *a: YOUR_ANSWERS["lr_schedule"](*a),
                           adamw_step=lambda *a: CAPSTONE_BROKEN["no bias correction"][1](*a))
    for seed in (0, 1):
        r = core.run_check("08.capstone", fresh, seed=seed)
        assert not r.passed and "broken by your adamw_step" in str(r.failure)
    assert runs == [STEPS] * 4, runs
