"""The kernel benchmark harness (python -m minigemma.kernels.bench): without a GPU it must say so and
report nothing it did not measure; with --cpu it times only torch on the CPU, labelled as such; and
every entry's implementations compute the same thing (else the harness would compare unlike ops)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minigemma.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no GPU)
from minigemma.kernels import bench, bounds_checked

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="checks the no-GPU report; on a GPU the harness runs the real thing")


@NO_GPU_ONLY
def test_without_a_gpu_it_says_so_and_measures_nothing():
    r = subprocess.run([sys.executable, "-m", "minigemma.kernels.bench", "--save", "unused"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "No GPU here" in r.stdout and "Nothing was measured" in r.stdout
    assert "GB/s" not in r.stdout.replace("GB/s, bytes", "") and "ms" not in r.stdout.split()
    assert "Nothing measured, nothing saved." in r.stdout and not (ROOT / "unused").exists()
    assert "fused_linear_cross_entropy" in r.stdout  # what is not built yet is named


@NO_GPU_ONLY
def test_cpu_mode_times_torch_only_and_labels_it(tmp_path, capsys):
    assert bench.main(["--cpu", "--size", "tiny", "--ops", "rms_norm", "--impls", "eager,ours",
                       "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CPU only, no GPU" in out and "copy:" in out
    (js,) = tmp_path.glob("kernels-cpu-*.json")
    rep = json.loads(js.read_text())
    assert rep["kind"] == "cpu" and rep["ceilings"]["copy_GBps"] > 0
    rows = {(r["op"], r["impl"]): r for r in rep["rows"]}
    assert rows[("rms_norm fwd", "eager")]["ms"] > 0
    assert rows[("rms_norm fwd", "ours")]["ms"] is None and "interpreter" in rows[("rms_norm fwd", "ours")]["note"]
    assert (tmp_path / js.name.replace(".json", ".md")).exists()


@pytest.mark.parametrize("entry", [e for e in bench.ENTRIES if e.name.endswith(" fwd")], ids=lambda e: e.name)
def test_entry_implementations_agree(entry):
    """At tiny sizes: the kernel ("ours") and the eager reference of every forward entry give the same output."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = entry.make(device, torch.float32, "tiny")
    outs = {}
    for impl in ("eager", "ours"):
        with bounds_checked():
            out = entry.impls[impl](inputs)()
        outs[impl] = out if isinstance(out, tuple) else (out,)
    for want, got in zip(outs["eager"], outs["ours"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 rounding only (see the op's tests)
