"""Many processes on CPU (gloo): the same `train.train` under torchrun, with DDP and with FSDP2.

Two processes with batch B each must give the loss curve of one process with batch 2B: each takes
its rows of the same global batch, and the all-reduce averages the gradients. Equal up to float
summation order: the loss of 6 AdamW steps agrees to 1e-5 relative, the weights to 1e-5.
"""

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from minigemma import train as T
    sys.path.insert(0, {tests!r})
    from test_train import tiny_spec, stream

    out, fsdp, accum = sys.argv[1], sys.argv[2] == "fsdp", int(sys.argv[3])
    d = T.init_distributed(fsdp=fsdp, device="cpu")
    spec = tiny_spec()
    model = T.build_model(spec)
    cfg = T.TrainConfig(steps=6, batch_size=8, seq_len=16, lr=1e-2, warmup=2, eval_every=3, eval_windows=8,
                        ckpt_every=6, grad_accum=accum)
    h = T.train(model, stream(), stream(800, seed=1), cfg, out_dir=out, spec=spec, d=d, progress=False)
    if d.main:
        json.dump(h, open(out + "/h.json", "w"))
    if d.world > 1 or fsdp:
        del model, h  # nothing may hold the group when it is destroyed (T.close_distributed)
        T.close_distributed()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, nproc, mode="ddp", accum=1):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    out = tmp_path / name
    out.mkdir()
    cmd = [sys.executable, str(script), str(out), mode, str(accum)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *cmd[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "h.json").read_text()), out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "one", 1)


def _weights(out):
    from minigemma import train as T

    return T.read_checkpoint(T.latest_checkpoint(out))["model"]


def _same_curve(h1, h2, rel=1e-5):
    assert h1["step"] == h2["step"] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "val_loss"):
        for a, b in zip(h1[key], h2[key]):
            assert abs(a - b) <= rel * abs(a), (key, h1[key], h2[key])
    assert h1["loss"][-1] < h1["loss"][0]


def test_two_ddp_processes_equal_one_with_twice_the_batch(tmp_path, single):
    h1, out1 = single
    h2, out2 = _run(tmp_path, "ddp", 2, "ddp")
    _same_curve(h1, h2)
    w1, w2 = _weights(out1), _weights(out2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)


def test_two_fsdp2_processes_equal_one(tmp_path, single):
    """FSDP2 (fully_shard): each process holds half of every weight, gradient and Adam moment; here
    with 2 micro-batches per process too (gradient sync only on the last)."""
    h2, out2 = _run(tmp_path, "fsdp", 2, "fsdp", accum=2)
    _same_curve(single[0], h2)
    w1, w2 = _weights(single[1]), _weights(out2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
