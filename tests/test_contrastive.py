"""Chapter 11's losses against straightforward references written here (Python loops, float64), on
fresh random unit vectors; the training loop and souping on a tiny encoder.

Tolerances: the package computes in float32 with matrix products and the references in float64 with
loops, so values agree to ~1e-6 relative; 1e-5 leaves room for the log-sum-exp of B + 1 terms.
"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from minigemma.contrastive import (EmbedTrainConfig, LossWeights, ablations, distill_loss, embedding_loss,
                                   nce_loss, soup, spread_out, train_encoder)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def nce_reference(q, p, n, doc_ids, tau, alpha):
    """-1/B Σ_i log( e^{s_ii} / (Σ_{j: j == i or id_j != id_i} e^{s_ij} + w_i e^{s(q_i, n_i)}) )."""
    q, p = q.double(), p.double()
    B = len(q)
    total = 0.0
    for i in range(B):
        pos = math.exp(float(q[i] @ p[i]) / tau)
        denom = 0.0
        for j in range(B):
            if j != i and doc_ids is not None and int(doc_ids[j]) == int(doc_ids[i]):
                continue
            denom += math.exp(float(q[i] @ p[j]) / tau)
        if n is not None:
            c = float(q[i] @ n[i].double())
            denom += math.exp(alpha * c) * math.exp(c / tau)
        total += -math.log(pos / denom)
    return total / B


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_neg,with_ids,alpha", [(True, True, 5.0), (True, False, 0.0), (False, True, 5.0),
                                                      (False, False, 0.0), (True, True, 2.0)])
def test_nce_matches_reference(seed, with_neg, with_ids, alpha):
    B, E, tau = 7, 16, 0.1  # tau 0.1 keeps exp() within float64's range in the reference
    q, p, n = _unit(B, E, seed=seed), _unit(B, E, seed=seed + 100), _unit(B, E, seed=seed + 200)
    ids = torch.tensor([0, 1, 0, 3, 1, 5, 6]) if with_ids else None  # rows 0/2 and 1/4 share a document
    got = nce_loss(q, p, n if with_neg else None, ids, tau=tau, alpha=alpha)
    want = nce_reference(q, p, n if with_neg else None, ids, tau, alpha)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - want) <= 1e-5 * max(1.0, abs(want))


def test_nce_masking_and_hardness_change_the_loss_and_the_weight_has_no_gradient():
    q, p, n = _unit(6, 8, seed=3), _unit(6, 8, seed=4), _unit(6, 8, seed=5)
    ids = torch.tensor([0, 0, 2, 3, 4, 5])
    assert nce_loss(q, p, n, ids) < nce_loss(q, p, n, None)  # fewer terms in a denominator
    assert nce_loss(q, p, n, None, alpha=5.0) != nce_loss(q, p, n, None, alpha=0.0)
    # stopgrad: the gradient w.r.t. n is that of a constant weight w_i times e^{s/τ}
    n1 = n.clone().requires_grad_(True)
    nce_loss(q, p, n1, None, tau=0.5, alpha=3.0).backward()
    n2 = n.clone().requires_grad_(True)
    w = torch.exp(3.0 * (q * n).sum(-1))  # a constant
    logits = torch.cat([q @ p.T / 0.5, ((q * n2).sum(-1) / 0.5 + torch.log(w))[:, None]], 1)
    F.cross_entropy(logits, torch.arange(6)).backward()
    torch.testing.assert_close(n1.grad, n2.grad, atol=1e-6, rtol=1e-5)


def test_nce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="q and p"):
        nce_loss(_unit(4, 8), _unit(3, 8))
    with pytest.raises(ValueError, match="hard negatives"):
        nce_loss(_unit(4, 8), _unit(4, 8), _unit(4, 6))


@pytest.mark.parametrize("seed", [0, 1])
def test_spread_out_matches_reference(seed):
    e = _unit(9, 5, seed=seed)
    want = sum(float(e[i].double() @ e[j].double()) ** 2 for i in range(9) for j in range(9) if i != j) / (9 * 8)
    assert abs(spread_out(e).item() - want) < 1e-6
    # orthonormal rows are perfectly spread, identical rows maximally crowded
    assert spread_out(torch.eye(5)).item() == 0.0
    assert abs(spread_out(_unit(1, 5).expand(4, 5)).item() - 1.0) < 1e-6
    with pytest.raises(ValueError):
        spread_out(_unit(1, 5))


def test_distill_matches_reference_and_stops_teacher_gradient():
    s, t = _unit(5, 12, seed=1).requires_grad_(True), _unit(5, 12, seed=2).requires_grad_(True)
    want = sum(1 - float(s[i].detach().double() @ t[i].detach().double()) for i in range(5)) / 5
    loss = distill_loss(s, t)
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert distill_loss(t.detach(), t.detach()).abs().item() < 1e-6
    with pytest.raises(ValueError, match="must match"):
        distill_loss(_unit(5, 12), _unit(5, 8))


def test_embedding_loss_sums_the_components_over_mrl_prefixes():
    B, E = 6, 16
    q, p, n = _unit(B, E, seed=1), _unit(B, E, seed=2), _unit(B, E, seed=3)
    t = (_unit(B, E, seed=4), _unit(B, E, seed=5), _unit(B, E, seed=6))
    ids = torch.arange(B)
    w = LossWeights(mrl_dims=(16, 8, 4), tau=0.1, spread=0.5, distill=2.0)
    got, parts = embedding_loss(q, p, n, ids, t, w)
    want = 0.0
    for d in (16, 8, 4):
        cut = [F.normalize(x[:, :d], dim=-1) for x in (q, p, n, *t)]
        want += nce_reference(cut[0], cut[1], cut[2], ids, 0.1, 5.0)
        want += 0.5 * (spread_out(cut[0]).item() + spread_out(cut[1]).item())
        want += 2.0 * sum(distill_loss(cut[k], cut[k + 3]).item() for k in range(3)) / 3
    assert abs(got.item() - want) < 1e-5 * want
    # each ablation changes the loss
    values = {name: embedding_loss(q, p, n, torch.tensor([0, 0, 1, 2, 3, 4]), t, replace(v, mrl_dims=v.mrl_dims))[0].item()
              for name, v in ablations(w).items()}
    assert len(set(round(v, 6) for v in values.values())) == len(values)


def test_soup_is_the_parameterwise_average():
    a = {"w": torch.randn(3, 4), "b": torch.randn(4), "step": torch.tensor(3)}
    b = {"w": torch.randn(3, 4), "b": torch.randn(4), "step": torch.tensor(7)}
    s = soup([a, b])
    torch.testing.assert_close(s["w"], (a["w"] + b["w"]) / 2)
    s = soup([a, b], weights=[3, 1])
    torch.testing.assert_close(s["b"], 0.75 * a["b"] + 0.25 * b["b"])
    assert s["step"].item() == 3  # integers are not averaged
    with pytest.raises(ValueError, match="shape"):
        soup([a, {**b, "w": torch.randn(4, 3)}])
    with pytest.raises(ValueError, match="positive"):
        soup([a, b], weights=[1, 0])


def test_training_lowers_the_loss_on_a_tiny_encoder():
    from minigemma.contrastive import tiny_encoder_config
    from minigemma.encoder import EmbeddingGemma, pad_right

    torch.manual_seed(0)
    cfg = tiny_encoder_config(vocab_size=64, layers=1, hidden=32)
    model = EmbeddingGemma(cfg, dense_dims=(16,))
    g = torch.Generator().manual_seed(0)
    N = 32
    qs = [torch.randint(4, 64, (6,), generator=g).tolist() for _ in range(N)]
    ds = [q + torch.randint(4, 64, (4,), generator=g).tolist() for q in qs]  # a document contains its query

    def encode_rows(kind, rows):
        ids, mask = pad_right([(qs if kind == "query" else ds)[i] for i in rows.tolist()])
        return model(ids, mask)

    hard = (torch.arange(N) + 1) % N
    tcfg = EmbedTrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=3,
                            weights=LossWeights(mrl_dims=(16, 8), distill=0.0, tau=0.1))
    hist = train_encoder(model, encode_rows, N, hard, torch.arange(N), tcfg)
    first = sum(h["nce"] for h in hist[:3]) / 3
    last = sum(h["nce"] for h in hist[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_pretrained_decoder_starts_the_student():
    """`pretrain_decoder` lowers the next-token loss; `new_student(init=...)` takes every stack weight
    from it and keeps only the dense layers random (those of the same seed without init); a wrong
    state dict is refused by name."""
    from minigemma.contrastive import new_student, pretrain_decoder
    from minigemma.train import TrainConfig

    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 60, (200,), generator=g).tolist()
    docs = [[2, *(4 + (a + i) % 60 for i in range(12)), 1] for a in starts]  # counting: learnable
    stream = torch.tensor([i for d in docs for i in d])
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, lr=3e-3, warmup=3, eval_every=10**9, eval_windows=4,
                      ckpt_every=0, bos_id=2)
    decoder, hist = pretrain_decoder(stream, 64, cfg, layers=2, hidden=32)
    assert hist["loss"][-1] < 0.8 * hist["loss"][0], hist["loss"]
    assert decoder.config.bidirectional is False

    init = decoder.state_dict()
    fresh, started = new_student(64, layers=2, hidden=32, seed=0), new_student(64, layers=2, hidden=32, seed=0, init=init)
    assert started.config.bidirectional is True
    for name, p in started.state_dict().items():
        if name.startswith("dense."):
            torch.testing.assert_close(p, fresh.state_dict()[name], rtol=0, atol=0)  # the seed's random dense
        else:
            torch.testing.assert_close(p, init[name], rtol=0, atol=0)
    torch.testing.assert_close(init["lm_head.weight"], init["embed_tokens.weight"], rtol=0, atol=0)  # tied
    assert not torch.equal(started.embed_tokens.weight, fresh.embed_tokens.weight)
    with pytest.raises(ValueError, match="not this student's decoder"):
        new_student(64, layers=2, hidden=32, init={k: v for k, v in init.items() if not k.startswith("norm")})


@pytest.mark.parametrize("warmup", [0, 1])
def test_no_warmup_starts_at_the_full_learning_rate(warmup):
    """warmup 0 (what `min(10, steps // 5)` gives a run of under 5 steps) means none, as 1 does: the first step
    runs at the peak rate, not a division by zero."""
    from minigemma.contrastive import tiny_encoder_config
    from minigemma.encoder import EmbeddingGemma, pad_right

    torch.manual_seed(0)
    model = EmbeddingGemma(tiny_encoder_config(vocab_size=64, layers=1, hidden=32), dense_dims=(16,))
    seqs = [[5 + i, 6 + i, 7] for i in range(8)]

    def encode_rows(kind, rows):
        return model(*pad_right([seqs[i] for i in rows.tolist()]))

    cfg = EmbedTrainConfig(steps=3, batch_size=4, lr=1e-3, warmup=warmup,
                           weights=LossWeights(mrl_dims=(16,), distill=0.0))
    hist = train_encoder(model, encode_rows, 8, (torch.arange(8) + 1) % 8, torch.arange(8), cfg)
    assert hist[0]["lr"] == pytest.approx(1e-3) and len(hist) == 3
