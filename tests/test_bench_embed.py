"""`python -m minigemma bench embed` without the real model: the systems run in turn, each cell is the
median run and the range, chapter 11's retrieval quality (nDCG@10, recall@10) is computed as by hand
and judged against float32 within ±0.005, and bad options stop before any work. The child processes
are replaced by fakes that return chosen numbers, so every expected value below is worked out by hand."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigemma.bench import embed as E


def test_spread_is_the_median_run_and_the_range():
    assert E.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    # an even count: the lower middle run (a value that was measured), not the average 2.5
    assert E.spread([4.0, 1.0, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert E.spread([]) is None


def test_in_turn_runs_every_system_once_per_round_and_keeps_the_runs():
    calls = []

    def measure(system, round_):
        calls.append((system, round_))
        return None if (system, round_) == ("B", 2) else {"system": system}  # B fails once

    runs = E.in_turn(["A", "B", "C"], 2, measure)
    assert calls == [("A", 1), ("B", 1), ("C", 1), ("A", 2), ("B", 2), ("C", 2)]
    assert [r["round"] for r in runs["A"]] == [1, 2] and [r["round"] for r in runs["B"]] == [1]


# --------------------------------------------------------------------------------------------
# The whole command, its child processes faked
# --------------------------------------------------------------------------------------------
ST = np.eye(4, dtype=np.float32)  # st-float32's 4 document vectors (unit)
BF16 = ST.copy()
BF16[1] = [0.8, 0.6, 0.0, 0.0]  # document 1 against ST's [0, 1, 0, 0]: cosine 0.6, the worst
DOCS_PER_S = {"st-float32": [10.0, 10.0, 12.5], "minigemma-bf16": [20.0, 26.0, 23.0]}  # rounds 1, 2, 3


def scores_to_vectors(scores):
    """Query vectors whose scores against one-hot documents (the identity) are `scores`, as unit rows
    (normalising a row keeps its order)."""
    return F.normalize(torch.tensor(scores, dtype=torch.float64), dim=-1).numpy(), np.eye(len(scores[0]))


# chapter 11 faked with 2 queries and 12 documents; query i's relevant document is document i
FLOAT32_SCORES = [[12.0 - j for j in range(12)],  # query 0: document 0 first -> rank 1
                  [11.0, 10.0, 12.0] + [9.0 - j for j in range(9)]]  # query 1: documents 2, 0 above 1 -> rank 3
BF16_SCORES = [[12.0 - j for j in range(12)],  # query 0: rank 1, as float32
               [11.0, 10.0, 12.0, 10.5] + [9.0 - j for j in range(8)]]  # query 1: document 3 also above -> rank 4


@pytest.fixture
def fake_children(monkeypatch):
    calls = []

    def run_one(system, texts_file, out_dir, batch_size):
        rnd = int(out_dir.name.split("-")[1])  # "round-2"
        calls.append((system, rnd))
        texts = json.loads(texts_file.read_text())
        assert list(texts) == ["60"] and len(texts["60"]) == 4
        np.save(out_dir / f"{system}-60.npy", ST if system == "st-float32" else BF16)
        v = DOCS_PER_S[system][rnd - 1]
        return {"system": system, "load_s": 1.0 * rnd, "peak_rss_mb": 1000.0 + rnd,
                "rows": [{"length": 60, "docs": 4, "seconds": 4 / v, "docs_per_s": v, "warmup_s": 0.1}]}

    def run_quality(system, eval_file, out_dir, batch_size):
        calls.append((system, "quality"))
        q, d = scores_to_vectors(FLOAT32_SCORES if system == "minigemma-float32" else BF16_SCORES)
        np.save(out_dir / f"{system}-eval-query.npy", q)
        np.save(out_dir / f"{system}-eval-document.npy", d)
        return {"system": system, "load_s": 0.0, "encode_s": 0.0}

    monkeypatch.setattr(E, "run_one", run_one)
    monkeypatch.setattr(E, "run_quality", run_quality)
    monkeypatch.setattr(E, "prepare_texts", lambda lengths, counts: ({60: ["a", "b", "c", "d"]}, {60: 61.0}))
    monkeypatch.setattr(E, "eval_texts", lambda: {"query": ["q0", "q1"], "document": [f"d{i}" for i in range(12)]})
    return calls


def test_bench_runs_in_turn_and_reports_median_range_and_quality(fake_children, tmp_path, capsys):
    assert E.main(["--systems", "minigemma-bf16,st-float32", "--lengths", "60", "--docs", "4",
                   "--repeats", "3", "--out", str(tmp_path)]) == 0
    # st-float32 first in every round (the others are compared with it), the systems in turn;
    # quality once per system after the timed rounds, float32 (the reference) though not timed
    assert fake_children == [("st-float32", 1), ("minigemma-bf16", 1), ("st-float32", 2), ("minigemma-bf16", 2),
                             ("st-float32", 3), ("minigemma-bf16", 3),
                             ("minigemma-float32", "quality"), ("minigemma-bf16", "quality")]
    report = json.loads((tmp_path / "embed-cpu.json").read_text())
    bf16 = next(r for r in report["results"] if r["system"] == "minigemma-bf16")
    assert [run["round"] for run in bf16["runs"]] == [1, 2, 3]  # every run kept
    row = bf16["rows"][0]
    assert row["docs_per_s"] == {"median": 23.0, "min": 20.0, "max": 26.0}
    # each round against st-float32's of the same round: 20/10 = 2.0, 26/10 = 2.6, 23/12.5 = 1.84
    assert row["speedup_vs_st"] == pytest.approx({"median": 2.0, "min": 1.84, "max": 2.6})
    assert row["worst_cosine_vs_st"] == pytest.approx(0.6)
    assert bf16["peak_rss_mb"] == {"median": 1002.0, "min": 1001.0, "max": 1003.0}

    # quality by hand: float32 ranks the relevant documents 1 and 3, bf16 ranks them 1 and 4
    q = {r["system"]: r for r in report["quality"]["rows"]}
    f32_ndcg, bf16_ndcg = (1 + 1 / math.log2(4)) / 2, (1 + 1 / math.log2(5)) / 2
    assert q["minigemma-float32"]["nDCG@10"] == pytest.approx(f32_ndcg) and q["minigemma-float32"]["met"] is None
    assert q["minigemma-bf16"]["nDCG@10"] == pytest.approx(bf16_ndcg)
    assert q["minigemma-bf16"]["recall@10"] == q["minigemma-float32"]["recall@10"] == 1.0
    assert q["minigemma-bf16"]["delta_nDCG@10"] == pytest.approx(bf16_ndcg - f32_ndcg)  # -0.035: missed
    assert q["minigemma-bf16"]["met"] is False
    assert report["quality"]["queries"] == 2 and report["quality"]["seconds"] >= 0

    md = (tmp_path / "embed-cpu.md").read_text()
    printed = capsys.readouterr().out
    for text in (md, printed):
        assert "| minigemma-bf16 | 23.00 (20.00–26.00) | 2.00x (1.84–2.60) | 0.600000 | 1002 MB (1001–1003) |" in text
        assert f"| minigemma-bf16 | bf16 | {bf16_ndcg:.4f} | 1.0000 | {bf16_ndcg - f32_ndcg:+.4f} | +0.0000 | MISSED | 0 s |" in text
        assert "speed-up 2.00x (target >= 2x at every length) met" in text  # judged on the median, 2.0
        assert "worst cosine 0.600000 (target >= 0.999) MISSED" in text
    assert md.startswith("# `python -m minigemma bench embed --systems minigemma-bf16,st-float32")


# --------------------------------------------------------------------------------------------
# Quality: the metrics by hand, the ±0.005 judgement
# --------------------------------------------------------------------------------------------
def test_retrieval_quality_on_a_hand_made_ranking():
    """Four queries against 12 one-hot documents, query i's relevant document i at a chosen rank."""
    scores = torch.zeros(4, 12)
    scores[0] = torch.arange(12, 0, -1.0)  # document 0 highest: rank 1
    scores[1] = torch.arange(12, 0, -1.0)
    scores[1, 1] = 9.5  # documents 0 (12) and 2 (10) above it, 3 (9) below: rank 3
    scores[2] = torch.arange(1, 13.0)  # document 2 scores 3, nine documents above: rank 10, just in
    scores[3] = torch.arange(1, 13.0)  # document 3 scores 4, eight above: rank 9 ...
    scores[3, 3] = 12.0  # ... but raised to tie with document 11 at the top: a tie counts against it, rank 2
    q = F.normalize(scores, dim=-1)
    m = E.retrieval_quality(q, torch.eye(12))
    # recall@10: all four ranks (1, 3, 10, 2) are <= 10; nDCG@10: the mean of 1 / log2(rank + 1)
    assert m["recall@10"] == 1.0
    assert m["nDCG@10"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(11) + 1 / math.log2(3)) / 4)
    # one more place down for query 2 (rank 11) takes it out of the top 10: recall 3/4, its gain 0
    scores[2, 2] = 1.5
    m = E.retrieval_quality(F.normalize(scores, dim=-1), torch.eye(12))
    assert m["recall@10"] == 0.75
    assert m["nDCG@10"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(3)) / 4)


def test_quality_within_a_half_hundredth_of_float32():
    metrics = {"minigemma-int8": {"nDCG@10": 0.800, "recall@10": 0.9 - 1 / 128},  # one query out of the top 10
               "minigemma-bf16": {"nDCG@10": 0.805, "recall@10": 0.9},  # +0.005 exactly: within
               "minigemma-float32": {"nDCG@10": 0.800, "recall@10": 0.9},
               "minigemma-int4": {"nDCG@10": 0.794, "recall@10": 0.9}}  # -0.006: outside
    rows = E.judge_quality(metrics)
    assert [r["system"] for r in rows] == ["minigemma-float32", "minigemma-int8", "minigemma-bf16", "minigemma-int4"]
    by = {r["system"]: r for r in rows}
    assert by["minigemma-float32"]["met"] is None and by["minigemma-float32"]["level"] == "float32"
    assert by["minigemma-bf16"]["met"] is True and by["minigemma-bf16"]["delta_nDCG@10"] == pytest.approx(0.005)
    assert by["minigemma-int8"]["met"] is False and by["minigemma-int8"]["delta_recall@10"] == pytest.approx(-0.0078125)
    assert by["minigemma-int4"]["met"] is False and by["minigemma-int4"]["delta_nDCG@10"] == pytest.approx(-0.006)
    # without float32 nothing is judged
    alone = E.judge_quality({"minigemma-bf16": metrics["minigemma-bf16"]})
    assert alone[0]["met"] is None and alone[0]["delta_nDCG@10"] is None


def test_quality_systems_are_float32_and_every_minigemma_system():
    assert E.quality_systems(["st-float32", "minigemma-bf16-compile", "minigemma-int4"]) == \
        ["minigemma-float32", "minigemma-bf16-compile", "minigemma-int4"]
    assert E.quality_systems(["minigemma-bf16", "minigemma-float32"]) == ["minigemma-float32", "minigemma-bf16"]
    assert E.quality_systems(["st-float32"]) == []
    assert E.level_of("minigemma-int8-compile") == "int8"
    with pytest.raises(ValueError, match="not a minigemma system"):
        E.level_of("st-float32")


# --------------------------------------------------------------------------------------------
# Bad options: an argparse error before any work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--repeats", "two"], "argument --repeats: 'two' is not a whole number"),
    (["--lengths", "60,x"], "argument --lengths: 'x' is not a whole number"),
    (["--docs", "8,0,4"], "argument --docs: must be at least 1, got 0"),
    (["--lengths", "60,250", "--docs", "8"], "--lengths and --docs need the same number of entries, got 2 and 1"),
    (["--systems", "minigemma-fp16"], "unknown systems ['minigemma-fp16']"),
])
def test_bad_options_stop_before_any_work(monkeypatch, capsys, args, message):
    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(E, "prepare_texts", no_work)
    monkeypatch.setattr(E, "run", no_work)
    with pytest.raises(SystemExit) as exit_:
        E.main(args + ["--out", ""])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
