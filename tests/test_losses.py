"""Losses (minigemma/losses.py) against plain references written here, on fresh random inputs.

Tolerances: every loss is a float32 sum over the vocabulary; the references sum in float64 (or
in another order), so agreement is to ~1e-6 relative. The chunked loss sums chunk by chunk and
its gradients come from a closed form (softmax − q) instead of autograd: 1e-5 relative.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minigemma import losses
from minigemma.losses import IGNORE, Labels, Sampled, TeacherCache, TeacherHead, chunked_loss

g = torch.Generator().manual_seed(1234)


def rnd(*shape, scale=3.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def test_cross_entropy_matches_torch_with_ignored_targets():
    logits, targets = rnd(3, 7, 11), torch.randint(0, 11, (3, 7), generator=g)
    targets[0, 2] = targets[2, 6] = IGNORE
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(losses.cross_entropy(logits, targets), want, rtol=1e-6, atol=1e-6)


def test_next_token_loss_shifts_and_skips_padding():
    B, T, V = 2, 6, 9
    logits, ids = rnd(B, T, V, dtype=torch.float64), torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)  # left and right padding
    terms = []
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t] and mask[b, t + 1]:
                terms.append(-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]])
    want = torch.stack(terms).mean().float()
    torch.testing.assert_close(losses.next_token_loss(logits, ids, mask), want, rtol=1e-6, atol=1e-6)
    no_mask = torch.stack([-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
                           for b in range(B) for t in range(T - 1)]).mean().float()
    torch.testing.assert_close(losses.next_token_loss(logits, ids), no_mask, rtol=1e-6, atol=1e-6)


def test_kd_loss_is_cross_entropy_with_the_teacher_and_kl_plus_entropy():
    s, t = rnd(4, 5, 13), rnd(4, 5, 13)
    mask = torch.rand(4, 5, generator=g) > 0.3
    pt = torch.softmax(t.double(), -1)
    per = -(pt * torch.log_softmax(s.double(), -1)).sum(-1)
    want = (per * mask).sum() / mask.sum()
    torch.testing.assert_close(losses.kd_loss(s, t, mask).double(), want, rtol=1e-6, atol=1e-6)
    # −Σ p_T log p_S = KL(p_T ‖ p_S) + H(p_T): the same minimiser as the KL
    kl = F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    entropy = -(pt * pt.log()).sum(-1)
    torch.testing.assert_close(losses.kd_loss(s, t).double(), (kl.double() + entropy).mean(), rtol=1e-5, atol=1e-5)


def test_sample_ids_are_distinct_and_follow_the_teacher():
    V, n = 6, 40_000
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0, -3.0])
    ids = losses.sample_ids(logits.expand(n, V), 3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (n, 3)
    assert all(len(set(row)) == 3 for row in ids[:2000].tolist()), "sampling is without replacement"
    # the first pick of a Gumbel top-k is an exact categorical draw: frequencies within 4 sigma of p
    p = torch.softmax(logits, -1)
    freq = torch.bincount(ids[:, 0], minlength=V).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (freq, p)
    # all of a row's ids follow successive sampling without replacement: P(second = j | first = i)
    first, second = ids[:, 0], ids[:, 1]
    sel = first == 0
    cond = torch.bincount(second[sel], minlength=V).double() / sel.sum()
    want = p.clone().double()
    want[0] = 0
    want /= want.sum()
    assert ((cond - want).abs() <= 4 * (want * (1 - want) / sel.sum()).sqrt() + 1e-12).all(), (cond, want)


def test_sampled_target_is_the_renormalised_teacher_on_the_sample():
    t = rnd(3, 10)
    ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(3)])
    target = losses.sampled_target(t, ids)
    p = torch.softmax(t.double(), -1)
    for r in range(3):
        keep = p[r, ids[r]]
        want = torch.zeros(10, dtype=torch.float64)
        want[ids[r]] = keep / keep.sum()
        torch.testing.assert_close(target[r].double(), want, rtol=1e-6, atol=1e-7)
    w = losses.sampled_weights(t, ids)
    s = rnd(3, 10)
    want = -(target * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(losses.sampled_kd_loss(s, ids, w), want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_grad_is_autograds_gradient():
    """The closed form softmax(z)·Σq − q against torch.autograd on −Σ_v q_v log softmax(z)_v, row by row:
    dense targets whose rows hold all the mass, less of it (not renormalised) or none (a row not
    scored), a very peaked row (logits of ±1000), and the sparse form the callers complete with
    scatter_add_ (a label per row, mass None)."""
    n, V = 9, 23
    z = rnd(n, V)
    z[4] = torch.linspace(-1000.0, 1000.0, V)  # peaked: exp(z) alone would overflow
    q = torch.rand(n, V, generator=g) * (torch.rand(n, V, generator=g) < 0.4)
    q[0] = torch.softmax(rnd(V), -1)  # all the mass
    q[1] = 0.0  # none: a row not scored
    q[2:] = q[2:] / q[2:].sum(-1, keepdim=True).clamp(min=1e-6) * torch.rand(n - 2, 1, generator=g)  # Σq < 1
    q[4, 3] += 0.5
    zz = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(-(q * torch.log_softmax(zz, -1)).sum(), zz)
    got = losses.cross_entropy_grad(torch.log_softmax(z, -1), q, q.sum(-1))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the sparse form: mass None (every row sums to 1), the label subtracted by the caller
    y = torch.randint(0, V, (n,), generator=g)
    zz = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(zz, y, reduction="sum"), zz)
    got = losses.cross_entropy_grad(torch.log_softmax(z, -1))
    got.scatter_add_(-1, y[:, None], -torch.ones(n, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _plain(hidden, weight, cap, q):
    """The reference: full logits, soft-cap, −Σ q log softmax, mean over scored rows (autograd)."""
    z = hidden @ weight.T
    if cap:
        z = cap * torch.tanh(z / cap)
    per = -(q * torch.log_softmax(z, -1)).sum(-1)
    rows = q.sum(-1) > 0
    return per.sum() / rows.sum()


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("kind", ["labels", "sampled", "teacher"])
def test_chunked_loss_equals_unchunked_with_gradients(kind, cap):
    N, C, V, Ct = 37, 16, 50, 12
    hidden = rnd(N, C, scale=1.0).requires_grad_()
    weight = rnd(V, C, scale=1.0).requires_grad_()
    mask = torch.rand(N, generator=g) > 0.2
    if kind == "labels":
        y = torch.randint(0, V, (N,), generator=g)
        y[~mask] = IGNORE
        target = Labels(y)
        q = torch.zeros(N, V)
        q[mask, y[mask]] = 1.0
    elif kind == "sampled":
        ids = torch.stack([torch.randperm(V, generator=g)[:7] for _ in range(N)])
        w = torch.softmax(rnd(N, 7), -1)
        target = Sampled(ids, w, mask)
        q = torch.zeros(N, V).scatter_(-1, ids, w) * mask[:, None]
    else:
        th, tw = rnd(N, Ct, scale=1.0), rnd(V, Ct, scale=1.0)
        target = TeacherHead(th, tw, softcap=cap, mask=mask)
        zt = th @ tw.T
        if cap:
            zt = cap * torch.tanh(zt / cap)
        q = torch.softmax(zt, -1) * mask[:, None]
    want = _plain(hidden, weight, cap, q)
    gh_want, gw_want = torch.autograd.grad(want, (hidden, weight))
    for chunk in (5, 16, 1000):  # chunks that do not divide N, and one chunk for everything
        got = chunked_loss(hidden, weight, target, cap, chunk=chunk)
        gh, gw = torch.autograd.grad(got, (hidden, weight))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gh, gh_want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, gw_want, rtol=1e-5, atol=1e-6)


def _autocast_linear_head(hidden, weight, cap, q):
    """The independent reference for mixed precision: the plain loss with the head as autocast runs
    an `nn.Linear` (F.linear under torch.autocast: bf16 inputs, bf16 logits), then float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.linear(hidden, weight)
    assert z.dtype == torch.bfloat16
    z = z.float()
    if cap:
        z = cap * torch.tanh(z / cap)
    per = -(q * torch.log_softmax(z, -1)).sum(-1)
    return per.sum() / (q.sum(-1) > 0).sum()


@pytest.mark.parametrize("cap", [None, 30.0])
def test_chunked_loss_under_autocast_runs_the_head_like_an_autocast_linear(cap):
    """Mixed precision (train.precision_context("bf16-mixed")): the head's three products take
    bfloat16 inputs, as an autocast nn.Linear head would, and the softmax, loss and gradients stay
    float32. The loss equals the autocast-Linear reference's to float32 rounding (the same bf16
    logits; 1e-5), its gradients to bfloat16 rounding (each chunk's share of ∂W is rounded once,
    where autocast rounds the whole sum once: rtol 2e-2); and it is not the float32 head's loss."""
    N, C, V = 45, 16, 70
    hidden = rnd(N, C, scale=1.0).requires_grad_()
    weight = rnd(V, C, scale=1.0).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = IGNORE
    q = torch.zeros(N, V)
    q[y != IGNORE, y[y != IGNORE]] = 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_loss(hidden, weight, Labels(y), cap, chunk=16)
    want = _autocast_linear_head(hidden, weight, cap, q)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    float32 = _plain(hidden, weight, cap, q)
    assert abs(float((float32 - got).detach())) > 1e-4  # the products really ran in bfloat16
    plain = chunked_loss(hidden, weight, Labels(y), cap, chunk=16)
    torch.testing.assert_close(plain, float32, rtol=1e-5, atol=1e-6)  # outside autocast: float32 again


def test_chunked_cross_entropy_matches_the_model_logits_path():
    """Through a real model: chunked head + loss on return_hidden == cross_entropy(model logits)."""
    from minigemma.gemma import Gemma, preset

    torch.manual_seed(0)
    cfg = preset("gemma2-2b", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16)
    model = Gemma(cfg)  # Gemma 2: a final soft-cap of 30
    ids = torch.randint(0, 97, (2, 9), generator=g)
    targets = losses.shift_targets(ids)
    want = losses.cross_entropy(model(ids), targets)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = losses.chunked_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, targets,
                                       softcap=cfg.final_logit_softcapping, chunk=4)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_cache_round_trip_and_sizes(tmp_path):
    S, T, k, C = 3, 5, 4, 8
    cache = TeacherCache(tokens=torch.randint(0, 300, (S, T + 1), generator=g),
                         ids=torch.randint(0, 300, (S, T, k), generator=g),
                         logp=torch.log_softmax(rnd(S, T, k), -1), hidden=rnd(S, T, C),
                         meta={"teacher": "test", "k": k, "vocab_size": 262144})
    path = cache.save(tmp_path / "c.safetensors")
    assert not list(tmp_path.glob("*.partial"))
    back = TeacherCache.load(path)
    assert torch.equal(back.tokens, cache.tokens) and torch.equal(back.ids, cache.ids)
    torch.testing.assert_close(back.logp.float(), cache.logp, rtol=1e-3, atol=1e-3)  # stored as float16
    assert back.meta == cache.meta and back.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(back.weights().sum(-1), torch.ones(S, T))
    assert back.bytes_per_position() == k * (4 + 2)
    assert back.full_bytes_per_position() == 262144 * 2
    with pytest.raises(ValueError, match="not a teacher cache"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        TeacherCache.load(tmp_path / "other.safetensors")


def test_bits_per_byte():
    assert math.isclose(losses.bits_per_byte(math.log(2), 10, 10), 1.0)


def test_per_token_nll_with_a_weight_and_with_a_head_module():
    hidden, weight, y = rnd(2, 9, 8, scale=1.0), rnd(30, 8, scale=1.0), torch.randint(0, 30, (2, 9), generator=g)
    want = -torch.log_softmax(20 * torch.tanh(hidden @ weight.T / 20), -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(losses.per_token_nll(hidden, weight, y, softcap=20.0, chunk=4), want,
                               rtol=1e-5, atol=1e-6)
    head = torch.nn.Linear(8, 30, bias=False)
    head.weight.data = weight
    torch.testing.assert_close(losses.per_token_nll(hidden, head, y, softcap=20.0, chunk=5), want,
                               rtol=1e-5, atol=1e-6)


def test_teacher_pass_and_student_objectives_match_the_plain_losses():
    """distill.teacher_pass on a tiny random teacher: stored log-probs are the teacher's, and each
    objective of StudentLoss equals its plain reference on full logits."""
    from minigemma import distill
    from minigemma.gemma import Gemma

    V = 300
    torch.manual_seed(0)
    teacher = Gemma(distill.student_config(vocab_size=V, hidden=32)).eval()
    student = Gemma(distill.student_config(vocab_size=V, hidden=16))
    windows = torch.randint(3, V, (3, 9), generator=g)
    cache = distill.teacher_pass(teacher, windows, k=20, progress=False)
    with torch.no_grad():
        t_logits = teacher(windows[:, :-1])
    want_lp = torch.log_softmax(t_logits, -1).gather(-1, cache.ids)
    torch.testing.assert_close(cache.logp.float(), want_lp, rtol=2e-3, atol=2e-3)  # stored as float16
    assert all(len(set(r)) == 20 for r in cache.ids.reshape(-1, 20).tolist())
    s_logits = student(windows[:, :-1])
    refs = {"next_token": losses.cross_entropy(s_logits, windows[:, 1:]),
            "full_kd": losses.kd_loss(s_logits, t_logits),
            "sampled_kd": losses.sampled_kd_loss(s_logits, cache.ids, cache.weights())}
    for objective, want in refs.items():
        module = distill.StudentLoss(student, objective, teacher.head())
        total, n = module(cache.tokens, cache.ids, cache.logp, cache.hidden.float())
        torch.testing.assert_close(total / n, want, rtol=1e-4, atol=1e-5)
