"""The training loop (minigemma/train.py): schedule, accumulation, checkpoints, resume, the CLI.

Models are tiny (vocabulary 64, width 16) and the data a synthetic stream, so each run is a
fraction of a second; the Shakespeare corpus is used only by the CLI test.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minigemma import train as T
from minigemma.gemma import GemmaConfig, layer_pattern

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(kind="gemma3"):
    if kind == "griffin":
        return {"model": "griffin", "config": dict(vocab_size=64, width=16, num_layers=3, num_heads=2,
                                                   mlp_expanded_width=32, attention_window_size=8,
                                                   scan="associative")}
    return {"model": "gemma3", "config": dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=8, layer_types=layer_pattern(2, 2), sliding_window=8,
                                              query_pre_attn_scalar=8, use_qk_norm=True)}


def stream(n=5000, seed=0):
    """A learnable synthetic stream: a noisy counter mod 60, with BOS (2) now and then."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.arange(n) * 7 + torch.randint(0, 3, (n,), generator=g)) % 60 + 3
    x[torch.rand(n, generator=g) < 0.01] = 2
    return x


def cfg(**kw):
    base = dict(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup=2, eval_every=4, eval_windows=8, ckpt_every=3)
    base.update(kw)
    return T.TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    peak, warm, total, ratio = 1.0, 10, 110, 0.1
    lrs = [T.lr_at(s, peak, warm, total, ratio) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # (step + 1) / warmup
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1.0)  # the cosine starts at the peak
    assert lrs[60] == pytest.approx(0.55)  # half-way: (peak + min) / 2
    assert all(b <= a for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    # an independent form of the cosine: min + (peak - min) cos²(π p / 2)
    for s in (17, 42, 99):
        p = (s - warm) / (total - warm)
        assert lrs[s] == pytest.approx(0.1 + 0.9 * math.cos(math.pi * p / 2) ** 2)


def test_accumulated_gradients_equal_the_full_batch():
    torch.manual_seed(0)
    w = torch.randn(5, 7, requires_grad=True)
    x, y = torch.randn(11, 5), torch.randint(0, 7, (11,))
    full = torch.nn.functional.cross_entropy(x @ w, y)
    g_full, = torch.autograd.grad(full, w)
    loss_sum = lambda idx: torch.nn.functional.cross_entropy(x[idx] @ w, y[idx], reduction="sum")
    for split in ([torch.arange(11)], list(torch.arange(11).split(4)), [torch.arange(0, 2), torch.arange(2, 11)]):
        w.grad = None
        mean = T.accumulate_gradients(loss_sum, split, 11)
        assert mean == pytest.approx(float(full.detach()), rel=1e-6)
        torch.testing.assert_close(w.grad, g_full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adamw_step_is_torch_adamw_bit_for_bit(seed):
    """train.adamw_step (the reference of exercise 08.adamw_step) against torch.optim.AdamW (single-tensor
    path, as make_optimizer builds it): 25 steps of fresh random gradients from zero moments, weight decay
    on and off, several shapes and hyper-parameters; the weights and both moments equal bit for bit."""
    g = torch.Generator().manual_seed(seed)
    for shape, lr, betas, eps, wd in [((5, 7), 3e-2, (0.9, 0.95), 1e-8, 0.1), ((13,), 1e-3, (0.9, 0.999), 1e-6, 0.0),
                                      ((3, 4, 2), 0.5, (0.8, 0.99), 1e-3, 0.3)]:
        p0 = torch.randn(shape, generator=g)
        param = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
        mine, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
        for step in range(1, 26):
            grad = torch.randn(shape, generator=g) * float(torch.rand(1, generator=g)) * 10 ** (step % 3 - 1)
            param.grad = grad.clone()
            opt.step()
            assert T.adamw_step(mine, grad, m, v, step, lr, betas, eps, wd) is None  # in place
            state = opt.state[param]
            assert int(state["step"]) == step
            assert torch.equal(mine, param.detach()), (shape, step)
            assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"]), (shape, step)
    # a Parameter that requires grad is updated in place too (the capstone's loop calls it on the model's)
    w = torch.nn.Parameter(torch.ones(3))
    T.adamw_step(w, torch.ones(3), torch.zeros(3), torch.zeros(3), 1, 0.1, (0.9, 0.999), 0.0, 0.0)
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.9))  # the first step moves by lr · sign(g)


@pytest.mark.parametrize("kind", ["gemma3", "griffin"])
def test_resume_is_bit_exact(tmp_path, kind):
    data, val = stream(), stream(800, seed=1)
    spec = tiny_spec(kind)
    a = T.build_model(spec)
    h_a = T.train(a, data, val, cfg(), out_dir=tmp_path / "a", spec=spec, progress=False)
    b = T.build_model(spec)
    T.train(b, data, val, cfg(), out_dir=tmp_path / "b", spec=spec, progress=False, stop_at=5)
    assert [p.name for p in T.list_checkpoints(tmp_path / "b")] == ["step-0000003.safetensors",
                                                                    "step-0000005.safetensors"]
    c = T.build_model(spec, seed=99)  # different weights: everything must come from the checkpoint
    h_c = T.train(c, data, val, cfg(), out_dir=tmp_path / "b", spec=spec, progress=False, resume=True)
    assert h_c["loss"] == h_a["loss"] and h_c["val_loss"] == h_a["val_loss"]
    for (name, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(p, q), name
    assert h_a["loss"][-1] < h_a["loss"][0]


def test_bf16_mixed_precision_trains_like_float32_and_resumes_bit_exactly(tmp_path):
    """precision="bf16-mixed": the forward under autocast, weights and AdamW's moments float32.
    Over the first 8 steps the loss stays within bfloat16's rounding of the float32 run's (2^-8
    relative on each product: below a few hundredths of a nat here; later the two runs drift
    apart as any two runs do), differs from it (the products really ran in bfloat16), the model
    learns, and a resumed run repeats the curve bit for bit."""
    data, val = stream(), stream(800, seed=1)
    spec = tiny_spec()
    f32 = T.train(T.build_model(spec), data, val, cfg(steps=30), progress=False)
    a = T.build_model(spec)
    mixed = T.train(a, data, val, cfg(steps=30, precision="bf16-mixed"), out_dir=tmp_path / "a", spec=spec,
                    progress=False)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert mixed["loss"] != f32["loss"]
    assert max(abs(x - y) for x, y in zip(mixed["loss"][:8], f32["loss"][:8])) < 0.05
    assert mixed["val_loss"][-1] < mixed["loss"][0] - 0.1
    b = T.build_model(spec)
    T.train(b, data, val, cfg(steps=30, precision="bf16-mixed"), out_dir=tmp_path / "b", spec=spec, progress=False,
            stop_at=5)
    c = T.build_model(spec, seed=99)
    resumed = T.train(c, data, val, cfg(steps=30, precision="bf16-mixed"), out_dir=tmp_path / "b", spec=spec,
                      progress=False, resume=True)
    assert resumed["loss"] == mixed["loss"] and resumed["val_loss"] == mixed["val_loss"]


def test_attention_runs_in_float32_under_cpu_autocast():
    """Mixed precision leaves attention in float32 (CPU's fused bf16 backward is the slow one)."""
    from minigemma.attention import GroupedQueryAttention, Keys, positions_after

    layer = GroupedQueryAttention(32, 4, 2, 8, window=5)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 12, 8, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 12, 8, generator=gen).bfloat16() for _ in range(2))
    pos, keys = positions_after(None, 2, 12), Keys(0, 12, layout=("self", 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.attention(q, k, v, pos, keys)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer.attention(q.float(), k.float(), v.float(), pos, keys), rtol=0, atol=0)


def test_compiled_gelu_is_the_tanh_formula():
    """Under torch.compile `gelu_tanh` is written x·σ(2u) (cheaper for the compiler than tanh). It
    must still be ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³): checked against that formula in
    float64, values and gradients, over |x| up to 12 (both tails), to float32 rounding."""
    from minigemma.layers import gelu_tanh

    x = torch.cat([torch.linspace(-12, 12, 2001), torch.randn(4096, generator=torch.Generator().manual_seed(5))])
    x64 = x.double().requires_grad_()
    u = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)
    want = 0.5 * x64 * (1 + torch.tanh(u))
    (want_grad,) = torch.autograd.grad(want.sum(), x64)
    xc = x.clone().requires_grad_()
    got = torch.compile(gelu_tanh, fullgraph=True)(xc)
    (got_grad,) = torch.autograd.grad(got.sum(), xc)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, gelu_tanh(x), rtol=1e-5, atol=1e-6)  # and eager's fused kernel


def test_compiled_training_step_matches_eager():
    """What `bench train` times as minigemma-compile: the same loss and gradients as eager, to
    float32 rounding (the compiled graph sums in another order: ~1e-6 relative)."""
    spec = tiny_spec()
    ids = torch.randint(3, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for compiled in (False, True):
        m = T.build_model(spec, seed=0)
        module = T.CausalLMLoss(torch.compile(m) if compiled else m, packed=False)  # model.head() reads through it
        loss, n = module(ids)
        grads.append((loss / n, torch.autograd.grad(loss / n, list(m.parameters()))))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision must be one of .*'fp8'"):
        T.TrainConfig(precision="fp8")


def test_checkpoint_holds_config_optimizer_and_rebuilds_the_model(tmp_path):
    spec = tiny_spec()
    m = T.build_model(spec)
    T.train(m, stream(), None, cfg(steps=3), out_dir=tmp_path, spec=spec, progress=False)
    ck = T.read_checkpoint(T.latest_checkpoint(tmp_path))
    assert ck["step"] == 3 and ck["spec"] == spec and ck["train"]["lr"] == 1e-2
    assert "lm_head.weight" in ck["model"] and ck["model"]["lm_head.weight"] is ck["model"]["embed_tokens.weight"]
    st = ck["optim"]["state"]["layers.0.self_attn.qkv_proj.weight"]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and float(st["step"]) == 3
    back = T.load_trained(tmp_path)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m.eval()(ids), rtol=0, atol=0)
    assert json.loads((tmp_path / "history.json").read_text())["step"] == [1, 2, 3]


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from minigemma import train as T
    sys.path.insert(0, {tests!r})
    from test_train import tiny_spec, stream, cfg

    def slow_save(tensors, path, metadata=None):   # a writer killed half-way through the file
        with open(path, "wb") as f:
            f.write(b"\\x00" * 1000)
            f.flush()
            print("WRITING", flush=True)
            time.sleep(60)

    spec = tiny_spec()
    m = T.build_model(spec)
    T.train(m, stream(), None, cfg(steps=6, ckpt_every=3), out_dir={out!r}, spec=spec, progress=False, stop_at=3)
    import safetensors.torch
    safetensors.torch.save_file = slow_save
    T.train(m, stream(), None, cfg(steps=6, ckpt_every=3), out_dir={out!r}, spec=spec, progress=False, resume=True)
""")


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "w.py"
    script.write_text(KILLED_WRITER.format(tests=str(ROOT / "tests"), out=str(out)))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        line = ""
        while "WRITING" not in line and time.time() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
        assert "WRITING" in line, "the writer never started"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert list(out.glob("*.partial")), "the half-written file exists under its temporary name"
    assert T.latest_checkpoint(out).name == "step-0000003.safetensors"
    spec = tiny_spec()
    m = T.build_model(spec)
    h = T.train(m, stream(), None, cfg(steps=6, ckpt_every=3), out_dir=out, spec=spec, progress=False, resume=True)
    assert h["step"] == [1, 2, 3, 4, 5, 6]


def test_latest_checkpoint_skips_a_damaged_file(tmp_path):
    spec = tiny_spec()
    T.train(T.build_model(spec), stream(), None, cfg(steps=3, ckpt_every=3), out_dir=tmp_path, spec=spec,
            progress=False)
    (tmp_path / "step-0000009.safetensors").write_bytes(b"garbage")
    assert T.latest_checkpoint(tmp_path).name == "step-0000003.safetensors"
    with pytest.raises(ValueError, match="not a minigemma training checkpoint"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        T.read_checkpoint(tmp_path / "x.safetensors")


def test_bad_batch_split_is_a_clear_error():
    with pytest.raises(ValueError, match="micro-batches"):
        T.train(T.build_model(tiny_spec()), stream(), None, cfg(batch_size=6, grad_accum=4), progress=False)


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="neither a recipe"):
        T.load_spec("no-such-recipe")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "llama", "config": {}}))
    with pytest.raises(ValueError, match="'model' must be"):
        T.load_spec(str(bad))


def test_recipes_have_about_the_same_size():
    sizes = {name: sum(p.numel() for p in T.build_model(T.load_spec(name)).parameters()) for name in T.RECIPES}
    assert 1.5e6 < sizes["tiny-gemma3"] < 2.5e6
    assert abs(sizes["tiny-griffin"] / sizes["tiny-gemma3"] - 1) < 0.1, sizes


def test_cli_trains_and_resumes(tmp_path):
    """`python -m minigemma train` on the real corpus: a small JSON spec, 3 steps, then --resume to 5."""
    spec = T.load_spec("tiny-gemma3")
    spec["config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, layer_types=["full_attention"],
                          num_attention_heads=2, head_dim=16, query_pre_attn_scalar=16)
    spec["train"] = {"batch_size": 2, "seq_len": 32, "eval_windows": 4, "warmup": 1}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    run = [sys.executable, "-m", "minigemma", "train", str(path), "--steps", "5", "--out", str(tmp_path / "run"),
           "--quiet", "--eval-every", "0"]
    r = subprocess.run(run + ["--stop-at", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 3: train loss" in r.stdout
    r = subprocess.run(run + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 5: train loss" in r.stdout and "val loss" in r.stdout
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert h["step"] == [1, 2, 3, 4, 5]
    r = subprocess.run([sys.executable, "-m", "minigemma", "train", "nope", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "neither a recipe" in r.stderr


def test_bench_train_compares_each_system_with_hf_at_its_own_precision():
    """`bench train`'s table: a -bf16 row is measured under mixed precision and divided by HF's
    -bf16 row, a float32 row by HF's float32 one (made-up numbers for the table, one real step
    of each precision for the worker)."""
    from minigemma.bench import train as B

    run = B._worker("minigemma-eager-bf16", steps=1, warmup=1, batch=2, seq_len=16, threads=None)
    assert run["system"] == "minigemma-eager-bf16" and run["precision"] == "bf16-mixed"
    assert math.isfinite(run["first_loss"])
    assert B._worker("minigemma-eager", 1, 1, 2, 16, None)["precision"] == "float32"

    def row(system, precision, tps):
        return {"system": system, "precision": precision, "tokens_per_s": tps, "tokens_per_s_range": [tps, tps],
                "step_ms": 1.0, "step_memory_mib": 100.0, "peak_rss_mib": 1.0, "warmup_s": 0.0}

    rows = [row("minigemma-compile", "float32", 9000), row("hf-sdpa", "float32", 6000),
            row("minigemma-compile-bf16", "bf16-mixed", 12000), row("hf-sdpa-bf16", "bf16-mixed", 8000)]
    result = {"command": "x", "machine": "m", "date": "d", "load_average_1min": [0, 0], "batch_size": 16,
              "seq_len": 128, "steps": 10, "repeats": 3, "systems": rows, "loss_memory": []}
    md = B._markdown(result, {r["precision"]: r for r in rows if r["system"].startswith("hf-")})
    assert "| minigemma-compile | float32 | 9000 | 9000-9000 | 1.50x |" in md
    assert "| minigemma-compile-bf16 | bf16-mixed | 12000 | 12000-12000 | 1.50x |" in md


# --------------------------------------------------------------------------------------------
# Bad input: a clear error before any work, and nothing lost
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(batch_size=-2), dict(seq_len=0),
                                 dict(grad_accum=3), dict(lr=float("nan")), dict(lr=0.0), dict(keep_checkpoints=0),
                                 dict(loss_chunk=0), dict(warmup=-1)])
def test_a_bad_config_names_the_setting(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name if name != "grad_accum" else "grad_accum"):
        cfg(**bad)


def _run_with_two_checkpoints(out):
    m = T.build_model(tiny_spec(), seed=0)
    T.train(m, stream(), None, cfg(steps=6, ckpt_every=3, eval_every=0), out_dir=out, spec=tiny_spec(), progress=False)
    return sorted(p.name for p in T.list_checkpoints(out))


def test_resume_with_only_unreadable_checkpoints_stops_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    names = _run_with_two_checkpoints(out)
    assert names == ["step-0000003.safetensors", "step-0000006.safetensors"]
    for p in T.list_checkpoints(out):
        p.write_bytes(b"not a checkpoint")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    m = T.build_model(tiny_spec(), seed=0)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint.*nothing was changed or deleted"):
        T.train(m, stream(), None, cfg(steps=9, ckpt_every=3), out_dir=out, spec=tiny_spec(), progress=False,
                resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the history too
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):  # an empty folder: nothing to resume
        T.train(m, stream(), None, cfg(), out_dir=tmp_path / "empty", spec=tiny_spec(), progress=False, resume=True)


def test_a_new_run_never_rotates_away_another_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    _run_with_two_checkpoints(out)
    m = T.build_model(tiny_spec(), seed=0)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        T.train(m, stream(), None, cfg(), out_dir=out, spec=tiny_spec(), progress=False)
    with pytest.raises(NotADirectoryError, match="is a file"):
        T.train(m, stream(), None, cfg(), out_dir=out / "step-0000003.safetensors", spec=tiny_spec(), progress=False)


def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    """A damaged checkpoint of a later step (an interrupted run's) sorts after the new ones: rotation must
    delete only this run's older files, never the one it has just written."""
    out = tmp_path / "run"
    _run_with_two_checkpoints(out)
    (out / "step-0000099.safetensors").write_bytes(b"damaged")
    m = T.build_model(tiny_spec(), seed=0)
    T.train(m, stream(), None, cfg(steps=12, ckpt_every=3, eval_every=0), out_dir=out, spec=tiny_spec(),
            progress=False, resume=True)
    names = sorted(p.name for p in T.list_checkpoints(out))
    assert names == ["step-0000009.safetensors", "step-0000012.safetensors", "step-0000099.safetensors"]
    assert T.latest_checkpoint(out).name == "step-0000012.safetensors"


def test_cli_refuses_bad_arguments_before_any_work(tmp_path):
    base = [sys.executable, "-m", "minigemma", "train", "tiny-gemma3", "--quiet"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for extra, message in [(["--steps", "0", "--out", str(tmp_path / "a")], "steps must be"),
                           (["--batch-size", "0", "--out", str(tmp_path / "b")], "batch_size must be"),
                           (["--out", str(a_file)], "is a file"),
                           (["--resume", "--out", str(tmp_path / "c")], "no readable checkpoint")]:
        r = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-500:])
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
