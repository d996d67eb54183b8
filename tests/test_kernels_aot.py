"""The ahead-of-time check (`python -m minigemma.kernels.aot`): real Triton compiles for H100 and A100
without a GPU, judged on compile errors, shared memory and spills.

The suite runs the whole matrix (every model, both GPUs): it compiles in the background from collection on
(tests/conftest.py, at the lowest priority) and its test runs last. Results are cached
(~/.cache/minigemma/triton-aot, keyed by the kernels' sources), so a second run takes seconds; a cold one
about 4 minutes of CPU, most of it hidden behind the rest of the suite. Two kernels made to fail show the
check can fail; the launch choices are checked against the device props.
"""

import os
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from minigemma.kernels import aot  # noqa: E402
from minigemma.kernels.utils import A100, H100  # noqa: E402

PROPS = {"sm_90": H100, "sm_80": A100}

BAD = textwrap.dedent('''
    import triton
    import triton.language as tl

    SCALE = 0.5  # a plain Python float: the interpreter reads it, the compiler refuses it


    @triton.jit
    def reads_a_global(X, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(X + i, mask=i < n)
        tl.store(X + i, x * SCALE, mask=i < n)


    @triton.jit
    def huge_tiles(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        m = tl.arange(0, BM)
        n = tl.arange(0, BN)
        k = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):  # pipelined: every stage holds a (BM, BK) and a (BK, BN) tile
            a = tl.load(A + m[:, None] * K + (k0 + k)[None, :])
            b = tl.load(B + (k0 + k)[:, None] * BN + n[None, :])
            acc += tl.dot(a, b)
        tl.store(C + m[:, None] * BN + n[None, :], acc)
''')


def _job(path, fn, types, constexprs, warps=4, stages=3, kind="forward", target="sm_90"):
    return aot.Job(f"{path}:{fn}", kind, target, types, constexprs, warps, stages, ["test"])


def test_the_check_fails_on_a_global_and_on_tiles_over_shared_memory(tmp_path):
    path = tmp_path / "bad_kernels.py"
    path.write_text(BAD)
    jobs = [_job(path, "reads_a_global", dict(X="*fp32"), dict(BLOCK=128)),
            _job(path, "huge_tiles", dict(A="*bf16", B="*bf16", C="*fp32"), dict(BM=256, BN=256, BK=128)),
            _job(path, "huge_tiles", dict(A="*bf16", B="*bf16", C="*fp32"), dict(BM=64, BN=64, BK=32))]
    before = os.environ.get("TRITON_INTERPRET")
    table = aot.check(jobs, PROPS, workers=2, use_cache=False)
    assert os.environ.get("TRITON_INTERPRET") == before, "the workers' compiler setting leaked into this process"
    glob, huge, fine = table
    assert not glob["ok"] and "global" in glob["error"].lower(), glob
    assert glob["problems"] == ["does not compile"]
    assert huge["ok"] and huge["shared"] > H100.smem_per_block, huge
    assert any("shared memory" in p for p in huge["problems"]), huge
    assert fine["ok"] and not fine["problems"] and fine["dot"] == "wgmma", fine
    assert fine["blocks_per_sm"] >= 1


def test_the_full_matrix_compiles_within_limits():
    """Every kernel at every launch configuration the package would choose for every listed model (Gemma 3 270M,
    EmbeddingGemma 300M, the published Gemma 2 and Gemma 3 configs, RecurrentGemma 2B; training, prefill and
    decode; bf16 and float32) on H100 (sm_90) and A100 (sm_80): `python -m minigemma.kernels.aot`, started in
    the background at collection (tests/conftest.py) and run last. It exits 0 only when every row passes; the
    rows are checked here again, and the matrix must be the whole one."""
    import json

    from tests.conftest import start_full_matrix  # the same module pytest loaded (tests is a package)

    proc, out = start_full_matrix()
    rc = proc.wait(timeout=3600)
    log = out.with_suffix(".log").read_text()
    assert rc == 0, log[-3000:]
    table = json.loads(Path(str(out) + ".json").read_text())["rows"]
    jobs = aot.dedupe(aot.jobs_for(H100, "sm_90") + aot.jobs_for(A100, "sm_80"))
    assert len(table) == len(jobs) > 400
    assert {r["target"] for r in table} == {"sm_90", "sm_80"}
    models = {who.split()[0] for r in table for who in r["used_by"]}
    assert models >= {"gemma3-270m", "embeddinggemma-300m", "recurrentgemma-2b", "gemma2-2b", "gemma2-9b",
                      "gemma2-27b", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"}, models
    kernels = {r["kernel"] for r in table}
    assert {"fwd", "bwd_dkdv", "bwd_dq", "decode", "combine", "rms_norm_fwd", "rms_norm_bwd", "geglu_fwd",
            "geglu_bwd", "rope", "loss", "gemv_int8", "gemv_int4", "chunk", "carry", "qkv", "o_proj", "gate_up",
            "down", "residual"} <= kernels, kernels
    # every kernel compiles and fits shared memory
    bad = [(r["kernel"], r["kind"], r["dtype"], r["config"], r["problems"], r["error"]) for r in table
           if not r["ok"] or any("shared memory" in p for p in r["problems"])]
    assert not bad, bad
    assert all(r["regs"] and r["blocks_per_sm"] >= 1 for r in table)
    # and no forward or decode kernel spills, float32 included (a backward kernel has a budget instead)
    spills = [(r["kernel"], r["kind"], r["dtype"], r["config"], r["flags"], r["warps"], r["spill_stores"])
              for r in table if r["kind"] in ("forward", "decode") and r["spill_stores"]]
    assert not spills, spills
    assert not [r for r in table if r["problems"]], [(r["kernel"], r["problems"]) for r in table if r["problems"]]
    bf16_fwd = [r for r in table if r["kernel"] == "fwd" and r["dtype"] == "bf16"]
    assert bf16_fwd and {r["dot"] for r in bf16_fwd if r["target"] == "sm_90"} == {"wgmma"}
    assert {r["dot"] for r in bf16_fwd if r["target"] == "sm_80"} == {"mma"}


def test_launch_configurations_follow_the_device_props():
    from minigemma.kernels import attention as A

    assert A.target_programs(None, H100) == 264 and A.target_programs(None, A100) == 216
    for props in (H100, A100):
        for D in (128, 256):
            bm, bn, warps, stages = A._blocks(D, None, None, None, props=props, backward=True)
            assert A._smem_need(D, bm, bn, stages, 2, backward=True) <= props.smem_per_block
    assert A._blocks(256, None, None, None) == (16, 16, 1, 1)  # no props: the interpreter's tiles


def test_float32_gets_launch_choices_of_its_own():
    """float32 tiles take twice the registers of bf16 ones (and FMA products hold both operands in them):
    the launchers give float32 smaller tiles or more warps per value, and leave the interpreter's alone."""
    import torch

    from minigemma.kernels import attention as A
    from minigemma.kernels import fused_linear_loss as FL
    from minigemma.kernels import gemv as GV

    for props in (H100, A100):
        for D in (64, 128, 256):
            bm, bn, warps, stages = A._blocks(D, None, None, None, props=props, elem=4)
            bm2, bn2, warps2, _ = A._blocks(D, None, None, None, props=props, elem=2)
            assert A._smem_need(D, bm, bn, stages, 4) <= props.smem_per_block
            assert bm * bn / warps < bm2 * bn2 / warps2  # fewer score values per warp than bf16's
            assert A._decode_blocks(D, None, None, props=props, elem=4) == A._DECODE_FP32
            _, bn16, w16, st16 = A._blocks(D, None, None, None, props=props, elem=2)
            assert A._decode_blocks(D, None, None, props=props, elem=2) == (bn16, min(w16, 4), st16)
        fp32 = GV.launch_config(1, 4096, 4096, torch.float32, None, 64, None, None, props=props)
        bf16 = GV.launch_config(1, 4096, 4096, torch.bfloat16, None, 64, None, None, props=props)
        assert (fp32[1], bf16[1]) == (32, 64)
        assert FL.launch_config(262_144, None, props) == (4096, 8)
    cpu = torch.device("cpu")  # the interpreter: unchanged
    assert A._decode_blocks(256, cpu, None, elem=4) == (16, 1, 1)
    assert A._blocks(128, cpu, None, None, elem=4) == (16, 16, 1, 1)
    assert GV.launch_config(1, 4096, 4096, torch.float32, cpu, 64, None, None)[1] == 32
    assert FL.launch_config(262_144, cpu) == (1024, 1)
