"""Chapter 11's data and metrics: the split holds whole files out, the metrics agree with
scikit-learn's nDCG and a loop, BM25 agrees with the BM25 formula, the teacher cache round-trips."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigemma import retrieval as R


def test_code_pairs_from_the_stdlib_and_the_file_split(tmp_path):
    (tmp_path / "a.py").write_text(
        'def f(x):\n    """Return the sum of x and one."""\n    y = x + 1\n    return y\n\n'
        'def g():\n    """Too short."""\n    a = 1\n    return a\n\n'
        'def h(z):\n    """Sort the items by their name field."""\n    return z\n')  # h: one statement only
    (tmp_path / "broken.py").write_text("def (:\n")
    pairs = R.code_pairs(tmp_path)
    assert [p.query for p in pairs] == ["Return the sum of x and one."]
    assert "Return the sum" not in pairs[0].document and "y = x + 1" in pairs[0].document
    real = R.code_pairs(max_files=40)
    assert len(real) > 50 and all(p.task == "code" for p in real)
    train, held = R.split_by_file(real, eval_fraction=0.3)
    assert held and train and not ({p.source for p in train} & {p.source for p in held})
    assert len(train) + len(held) == len(real)
    with pytest.raises(FileNotFoundError):
        R.code_pairs(tmp_path / "missing")


def test_topic_pairs():
    pairs = R.topic_pairs()
    assert len(pairs) > 40 and all(p.query and p.document and p.query not in ("", "*") for p in pairs)


def test_ranks_recall_ndcg_against_loops_and_sklearn():
    from sklearn.metrics import ndcg_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 30, generator=g, dtype=torch.float64)
    scores[3, 3] = 10.0  # one certain hit
    r = R.ranks(scores)
    for i in range(20):
        assert r[i].item() == 1 + sum(1 for j in range(30) if j != i and scores[i, j] >= scores[i, i])
    assert r[3].item() == 1
    for k in (1, 5, 10):
        assert R.recall_at_k(r, k) == sum(int(x) <= k for x in r) / 20
    truth = torch.zeros(20, 30)
    truth[torch.arange(20), torch.arange(20)] = 1
    want = ndcg_score(truth.numpy(), scores.numpy(), k=10)
    assert abs(R.ndcg_at_10(r) - want) < 1e-9
    m = R.retrieval_metrics(F.normalize(torch.eye(4), dim=-1), torch.eye(4))
    assert m == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "nDCG@10": 1.0}


def test_bm25_matches_the_formula():
    docs = ["the cat sat on the mat", "dogs chase cats", "a mat of red wool", "readFile returns bytes"]
    got = R.bm25_scores(["cat mat", "read file"], docs)
    toks = [R.bm25_tokens(d) for d in docs]
    N, avg = len(toks), sum(map(len, toks)) / len(toks)
    k1, b, eps = 1.5, 0.75, 0.25

    def idf(w):
        n = sum(w in t for t in toks)
        v = math.log(N - n + 0.5) - math.log(n + 0.5)
        return v

    idfs = {w: idf(w) for t in toks for w in t}
    floor = eps * sum(idfs.values()) / len(idfs)  # rank-bm25 lifts negative idfs to eps * mean idf
    idfs = {w: (v if v >= 0 else floor) for w, v in idfs.items()}
    for qi, q in enumerate(["cat mat", "read file"]):
        for di, t in enumerate(toks):
            want = sum(idfs.get(w, 0.0) * t.count(w) * (k1 + 1) / (t.count(w) + k1 * (1 - b + b * len(t) / avg))
                       for w in R.bm25_tokens(q))
            assert abs(got[qi, di].item() - want) < 1e-9
    assert R.bm25_tokens("getFileName_v2") == ["get", "file", "name", "v", "2"]


def test_hard_negatives_skip_the_positive_and_duplicates():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.7, 0.7]]), dim=-1)
    d = q.clone()
    ids = R.text_ids(["a", "b", "a", "c"])
    assert ids.tolist() == [0, 1, 0, 3]
    hn = R.mine_hard_negatives(q, d, ids)
    assert hn.tolist()[0] == 3 and hn.tolist()[2] == 3  # not itself, not its duplicate
    assert all(ids[h] != ids[i] for i, h in enumerate(hn.tolist()))


class _FakeTeacher:
    calls = 0

    def encode(self, texts, prompt_name=None, batch_size=16, progress=False):
        _FakeTeacher.calls += 1
        return F.normalize(torch.arange(len(texts) * 4, dtype=torch.float32).reshape(len(texts), 4) + 1, dim=-1)


def test_teacher_cache_round_trips_and_is_keyed_by_texts_and_prompt(tmp_path):
    t = _FakeTeacher()
    a = R.teacher_embeddings(["x", "y"], "query", t, cache=tmp_path, progress=False)
    b = R.teacher_embeddings(["x", "y"], "query", t, cache=tmp_path, progress=False)
    assert _FakeTeacher.calls == 1 and torch.equal(a, b)
    R.teacher_embeddings(["x", "y"], "document", t, cache=tmp_path, progress=False)
    R.teacher_embeddings(["x", "z"], "query", t, cache=tmp_path, progress=False)
    assert _FakeTeacher.calls == 3
    assert not list(tmp_path.glob("*.partial")) and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_student_is_the_tiny_decoder_shape_turned_encoder():
    from minigemma.contrastive import tiny_encoder_config
    from minigemma.encoder import EmbeddingGemma, pad_right

    cfg = tiny_encoder_config(vocab_size=128, layers=2, hidden=64)
    assert cfg.bidirectional and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (2, 32, 256)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="multiple"):
        tiny_encoder_config(hidden=48)
    m = EmbeddingGemma(cfg, dense_dims=(64,))
    ids, mask = pad_right([[2, 5, 6, 1], [2, 7, 1]])
    e = R.encode_ids(m, [[2, 5, 6, 1], [2, 7, 1]], dim=32)
    assert e.shape == (2, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(e[1], m(ids[1:, :3], mask[1:, :3], 32)[0], atol=1e-5, rtol=1e-5)  # padding hidden
