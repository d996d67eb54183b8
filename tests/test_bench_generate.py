"""`python -m minigemma bench generate`: repeats in turn, median and range, the quality metrics, bad arguments.

Fast: no model runs. The child processes are replaced by fake runners, the metrics are checked on tiny
hand-made logits against torch's own `kl_div` / `cross_entropy`, and the quality text against every file of
the repository.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigemma.bench import generate as G
from minigemma.bench import quality as Q

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Median and range
# ----------------------------------------------------------------------------------------------
def test_a_cell_is_the_median_and_the_range():
    assert G.format_spread(44.7, [43.1, 46.0], ".1f") == "44.7 (43.1–46.0)"
    assert G.format_spread(519.4, [515.2, 522.9], ".0f", " MB") == "519 (515–523) MB"
    assert G.format_spread(2.5, None, ".2f", " s") == "2.50 s"   # a report from before repeats
    assert G.format_spread(None, [1, 2], ".1f") == "-"


def _run(system, L, decode, prefill=500.0, rss=600.0, cold=2.0, load=1.0, tokens=(1, 2, 3)):
    return dict(system=system, prompt_tokens=L, decode_tokens=3, weight_bytes=200e6, threads=2,
                decode_tok_s=decode, prefill_tok_s=prefill, peak_rss_mb=rss, cold_start_s=cold, load_s=load,
                step_s=[1 / decode] * 3, prefill_s=L / prefill, tokens=list(tokens))


def test_aggregate_keeps_every_run_and_takes_the_median_run_per_value():
    runs = [_run("a", 128, 46.0, rss=610), _run("a", 128, 43.1, rss=600), _run("a", 128, 44.7, rss=650)]
    row = G.aggregate(runs)
    assert row["decode_tok_s"] == 44.7 and row["decode_tok_s_range"] == [43.1, 46.0]
    assert row["peak_rss_mb"] == 610 and row["peak_rss_mb_range"] == [600, 650]
    assert row["runs"] == runs and row["repeats"] == 3
    assert row["tokens_same_every_run"] is True
    # An even count: the lower middle run (every value shown was measured), as bench train does.
    even = G.aggregate([_run("a", 128, v) for v in (4.0, 1.0, 3.0, 2.0)])
    assert even["decode_tok_s"] == 2.0 and even["decode_tok_s_range"] == [1.0, 4.0]
    differ = G.aggregate([_run("a", 128, 1.0), _run("a", 128, 2.0, tokens=(1, 2, 9))])
    assert differ["tokens_same_every_run"] is False and differ["tokens"] == [1, 2, 3]


def test_repeats_run_the_systems_in_turn_and_every_row_has_all_its_runs():
    systems, contexts = ["minigemma-float32", "minigemma-int8", "minigemma-int4"], [128, 512]
    calls = []

    def fake_runner(system, L, n_decode):
        calls.append((system, L))
        if (system, L) == ("minigemma-int8", 512) and len(calls) > 6:
            return None                                   # a failed run is left out, not fatal
        return _run(system, L, decode=float(len(calls)))  # each call a different speed

    rows = G.run_speed(systems, contexts, 3, repeats=3, runner=fake_runner)
    expected = [(s, L) for _ in range(3) for s in systems for L in contexts]   # A B C, A B C, A B C
    assert calls == expected
    by = {(r["system"], r["prompt_tokens"]): r for r in rows}
    assert set(by) == set(expected)
    # minigemma-int4 @512 was calls 6, 12, 18: median 12, range 6-18
    r = by[("minigemma-int4", 512)]
    assert [x["decode_tok_s"] for x in r["runs"]] == [6.0, 12.0, 18.0]
    assert r["decode_tok_s"] == 12.0 and r["decode_tok_s_range"] == [6.0, 18.0]
    assert len(by[("minigemma-int8", 512)]["runs"]) == 1   # two of its three runs failed


def test_the_first_decode_step_is_reported_apart_from_the_median(monkeypatch):
    """A compiled step compiles in its first decode step: run_one reports that step on its own and takes
    the decode median of the others (here the median of all four would be 0.03 s, of the last three 0.02)."""
    import time

    fake = dict(first_token_at=time.time(), prompt_tokens=4, prefill_s=0.5, step_s=[30.0, 0.02, 0.01, 0.03])
    monkeypatch.setattr(G, "child_result", lambda args, label: dict(fake))
    r = G.run_one("minigemma-file-codes-compiled", 4, 4)
    assert r["first_step_s"] == 30.0 and r["decode_tok_s"] == pytest.approx(1 / 0.02)


def test_a_compiled_system_is_its_level_with_compiled_steps():
    assert G.level_of("minigemma-file-codes-compiled") == ("file-codes", True)
    assert G.level_of("minigemma-file-codes") == ("file-codes", False)
    assert G.level_of("minigemma-int8") == ("int8", False)


def test_run_speed_refuses_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        G.run_speed(["minigemma-float32"], [128], 3, repeats=0, runner=lambda *a: pytest.fail("ran"))


def _report(rows, quality=None, repeats=3):
    return dict(machine="test cpu", date="today", versions={"torch": "x"}, memory_bandwidth_gb_s=10.0,
                contexts=sorted({r["prompt_tokens"] for r in rows}), decode_tokens=3, repeats=repeats, results=rows,
                profiles=[], ops_per_step={"minigemma-file-codes": 7351.0}, quality=quality)


def test_the_table_shows_median_and_range_and_the_targets_use_the_medians():
    fast = G.aggregate([_run("minigemma-file-codes", 512, v, prefill=p) for v, p in ((60, 300), (30, 900), (61, 310))])
    llama = G.aggregate([_run("llama.cpp-Q4_K_M", 512, v, prefill=p) for v, p in ((50, 600), (52, 620), (20, 100))])
    text = G.format_table(_report([fast, llama]))
    assert "| minigemma-file-codes | 60.0 (30.0–61.0) |" in text
    assert "| llama.cpp-Q4_K_M | 50.0 (20.0–52.0) |" in text
    assert "310 (300–900)" in text                       # prefill: median and range
    # Targets from the medians: decode 60 / 50 = 1.20x (the means, 50.3 / 40.7, would give 1.24x)
    assert "Targets (minigemma-file-codes against llama.cpp-Q4_K_M, same run, medians):" in text
    assert "- decode @512 vs llama.cpp: 1.20x (target >= 1.0x) met" in text
    assert "- prefill @512 vs llama.cpp: 0.52x (target >= 1.0x) MISSED" in text   # 310 / 600
    assert "Operator calls per decode step" in text and "minigemma-file-codes 7351" in text


def test_the_saved_report_of_before_repeats_still_formats():
    """Chapter 06 prints docs/benchmarks/generate-cpu.json with `format_table`, whichever version saved it."""
    saved = ROOT / "docs" / "benchmarks" / "generate-cpu.json"
    if not saved.is_file():
        pytest.skip("no saved benchmark report")
    report = json.loads(saved.read_text())
    text = G.format_table(report)
    first = report["results"][0]
    assert f"| {first['system']} | " in text and "Targets (" in text
    # the chapter's view: the same figures, no goals and no verdicts
    text = G.format_table(report, goals=False)
    assert f"| {first['system']} | " in text and "Ratios (" in text
    assert not any(word in text for word in ("target", "Target", "MISSED", " met")), text


# ----------------------------------------------------------------------------------------------
# The quality metrics on hand-made logits
# ----------------------------------------------------------------------------------------------
def test_kl_rows_matches_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    expected = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)   # KL(p || q), torch's own
    torch.testing.assert_close(Q.kl_rows(logp, logq), expected)
    assert torch.all(Q.kl_rows(logp, logp).abs() < 1e-6)
    # KL is not symmetric: the direction matters, and ours is KL(float32 || system)
    assert not torch.allclose(Q.kl_rows(logp, logq), Q.kl_rows(logq, logp))


def test_perplexity_of_known_distributions(tmp_path):
    V = 8
    ids = [0, 3, 5, 1, 7, 2]
    uniform = torch.zeros(len(ids) - 1, V)
    with torch.inference_mode():
        r = Q.score([uniform], ids, tmp_path, reference=True)
    assert r["perplexity"] == pytest.approx(V) and r["kl_from_float32"] == 0 and r["top1_agreement"] == 1
    # Each next token has probability exactly 1/4: perplexity 4
    logits = torch.full((len(ids) - 1, V), -1e9)
    for i, nxt in enumerate(ids[1:]):
        logits[i, nxt] = math.log(0.25)
        logits[i, (nxt + 1) % V] = math.log(0.75)
    with torch.inference_mode():
        assert Q.score([logits], ids, tmp_path, reference=True)["perplexity"] == pytest.approx(4.0)


def test_score_in_chunks_against_a_whole_independent_computation(tmp_path):
    g = torch.Generator().manual_seed(1)
    N, V = 23, 37
    ids = torch.randint(0, V, (N,), generator=g).tolist()
    ref_logits = torch.randn(N - 1, V, generator=g) * 2
    sys_logits = ref_logits + 0.7 * torch.randn(N - 1, V, generator=g)
    pieces = [(0, 8), (8, 16), (16, 22)]
    with torch.inference_mode():
        ref = Q.score([ref_logits[a:b] for a, b in pieces], ids, tmp_path, reference=True)
        got = Q.score([sys_logits[a:b] for a, b in pieces], ids, tmp_path, reference=False)
    targets = torch.tensor(ids[1:])
    assert ref["perplexity"] == pytest.approx(math.exp(F.cross_entropy(ref_logits, targets).item()), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(F.cross_entropy(sys_logits, targets).item()), rel=1e-6)
    kl = F.kl_div(sys_logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    assert got["kl_from_float32"] == pytest.approx(kl.item(), rel=1e-5)
    agree = (sys_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    assert 0 < agree < 1                                  # the case checks the count, not a trivial 0 or 1
    assert got["top1_agreement"] == pytest.approx(agree)
    assert got["positions"] == N - 1


def test_score_refuses_chunks_that_do_not_match_the_reference(tmp_path):
    ids = [i % 5 for i in range(9)]
    logits = torch.randn(8, 5)
    with torch.inference_mode():
        with pytest.raises(FileNotFoundError, match="reference must run first"):
            Q.score([logits], ids, tmp_path, reference=False)
        Q.score([logits[:4], logits[4:]], ids, tmp_path, reference=True)
        with pytest.raises(ValueError, match="other chunks"):
            Q.score([logits[:3], logits[3:]], ids, tmp_path, reference=False)
        with pytest.raises(ValueError, match="expected 8"):
            Q.score([logits[:4]], ids, tmp_path, reference=False)


def _tokenizer():
    from minigemma.tokenizer import Tokenizer
    from minigemma.weights import fetch

    try:
        return Tokenizer.from_pretrained("gemma3-270m")
    except fetch.FetchError as e:
        pytest.skip(str(e))


def test_run_quality_runs_the_reference_first_and_cleans_its_scratch_folder():
    ids = Q.quality_ids(_tokenizer(), 16)
    seen = []

    def fake(system, ref_dir, n, chunk):
        seen.append((system, ref_dir))
        assert os.path.isdir(ref_dir)
        return dict(system=system, perplexity=10.0, kl_from_float32=0.0, top1_agreement=1.0, positions=n - 1,
                    peak_rss_mb=1.0, seconds=1.0, ids_sha256=Q.ids_sha256(ids))

    out = Q.run_quality(["minigemma-int8", "minigemma-float32"], n=16, chunk=4, runner=fake)
    assert [s for s, _ in seen] == ["minigemma-float32", "minigemma-int8"]
    assert not os.path.exists(seen[0][1])                 # the scratch log-probs are gone
    assert out["text"]["tokens"] == 16 and len(out["text"]["text_sha256"]) == 64
    assert out["text"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_the_quality_table_and_its_targets():
    info = dict(source="pydoc_data.topics", python="3.11.7", text_sha256="a" * 64, ids_sha256="b" * 64, tokens=1024)

    def row(system, ppl, kl, top1):
        return dict(system=system, perplexity=ppl, kl_from_float32=kl, top1_agreement=top1, peak_rss_mb=500.0,
                    seconds=3.0)

    quality = dict(text=info, reference="minigemma-float32", chunk=128, systems=[
        row("minigemma-float32", 10.0, 0.0, 1.0), row("minigemma-int8", 10.01, 0.002, 0.99),
        row("minigemma-int4", 10.3, 0.05, 0.9), row("llama.cpp-Q4_K_M", 10.2, 0.03, 0.93)])
    text = G.format_quality(quality)
    assert "| minigemma-int8 | 10.010 | 0.00200 | 99.0% |" in text
    assert "- KL from float32 vs llama.cpp's, minigemma-int8: 0.00200 vs 0.03000 nats/token (target <=) met" in text
    assert "- KL from float32 vs llama.cpp's, minigemma-int4: 0.05000 vs 0.03000 nats/token (target <=) MISSED" in text
    assert "- int4 perplexity within 2% of float32's: 10.300 vs 10.000, +3.00% (target <= +2%) MISSED" in text
    plain = G.format_quality(quality, goals=False)  # a chapter's view: the table alone
    assert "| minigemma-int8 | 10.010 | 0.00200 | 99.0% |" in plain and "target" not in plain and "MISSED" not in plain


# ----------------------------------------------------------------------------------------------
# The quality text is in no file of this repository
# ----------------------------------------------------------------------------------------------
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


def files_containing(needles: list[str], root: Path) -> list[str]:
    """'path: needle' for every file under root holding a needle as written or JSON-escaped (a notebook's form)."""
    forms = {n: (n, json.dumps(n)[1:-1]) for n in needles}
    hits = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            p = Path(folder) / name
            if p.stat().st_size > 50_000_000:
                continue
            text = p.read_bytes().decode("utf-8", errors="ignore")
            hits += [f"{p.relative_to(root)}: {n[:50]}" for n, fs in forms.items() if any(f in text for f in fs)]
    return hits


def test_the_quality_text_is_in_no_file_of_the_repository(tmp_path):
    tok = _tokenizer()
    used = tok.decode(Q.quality_ids(tok, Q.QUALITY_TOKENS)[1:])       # the text the 1,024 tokens cover
    lines = list(dict.fromkeys(ln.strip() for ln in used.splitlines() if len(ln.strip()) >= 40))
    assert len(lines) >= 20, "too few distinctive lines to check"
    # The scanner finds a line that is there, raw and inside a notebook's JSON
    (tmp_path / "a.txt").write_text("x\n" + lines[0] + "\ny")
    (tmp_path / "b.ipynb").write_text(json.dumps({"source": [lines[1] + "\n"]}))
    assert len(files_containing(lines[:2], tmp_path)) == 2
    assert files_containing(lines, ROOT) == []


# ----------------------------------------------------------------------------------------------
# Bad arguments stop before any work
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: must be at least 1, got 0"),
    (["--repeats", "two"], "--repeats: 'two' is not a whole number"),
    (["--decode-tokens", "0"], "--decode-tokens: must be at least 1"),
    (["--systems", "minigemma-float64"], "unknown systems ['minigemma-float64']"),
    (["--contexts", "128,abc"], "--contexts must be comma-separated integers"),
    (["--contexts", "0"], "--contexts needs at least one prompt length >= 1"),
    (["--quality-tokens", "1"], "--quality-tokens must be at least 2"),
])
def test_bad_arguments_stop_before_any_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(G, "run", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as e:
        G.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_line_refuses_zero_repeats():
    p = subprocess.run([sys.executable, "-m", "minigemma", "bench", "generate", "--repeats", "0", "--out", ""],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2
    assert "argument --repeats: must be at least 1, got 0" in p.stderr
    assert "[run" not in p.stderr                         # nothing ran
