"""The mutation-testing harness (`make mutation`, tools/mutation/run.py) works.

The full run takes minutes and is not part of `make test`; here it runs on one small exercise in a
temporary work folder (about 15 s): mutmut must find the mutants of `soft_cap`, the check must kill
every one on every seed, and the table must say so. The helpers that read mutmut's results and
match equivalent mutants are checked on their own.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "tools" / "mutation" / "run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)


def test_mutation_run_on_one_exercise(tmp_path):
    pytest.importorskip("mutmut")
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "mutation" / "run.py"), "03.soft_cap",
                        "--max-children", "2", "--work", str(tmp_path / "work"), "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["exercise"] == "03.soft_cap" and row["functions"] == ["minigemma.grading.checks.ch03.soft_cap_reference",
                                                                "minigemma.layers.soft_cap"]
    assert row["mutants"] >= 3 and row["every_seed"] == row["mutants"] and row["rate"] == 1.0
    assert res["unexplained"] == []
    assert "| 03.soft_cap |" in r.stdout and "100.0%" in r.stdout
    assert not (ROOT / "mutants").exists(), "mutmut must work in its own folder, never in the repository"


def test_helpers_name_functions_and_changed_lines():
    assert run.function_of("minigemma.layers.x_soft_cap__mutmut_3") == "minigemma.layers.soft_cap"
    assert run.function_of("minigemma.layers.xǁRMSNormǁforward__mutmut_12") == "minigemma.layers.RMSNorm.forward"
    diff = "--- a\n+++ b\n@@ -1 +1 @@\n def f(x):\n-    return x + 1\n+    return x - 1\n"
    assert run.changed_lines(diff) == ("return x + 1", "return x - 1")


def test_equivalent_list_is_well_formed_and_matches_narrowly():
    entries = run.load_equivalent()
    assert entries and all(len(e["why"]) > 20 for e in entries), "every equivalent mutant needs its reason"
    device = ("minigemma.attention.causal_mask", "k_pos = torch.arange(S, device=device)[None, :]")
    assert run.explained(entries, *device, "k_pos = torch.arange(S, device=None)[None, :]")
    assert run.explained(entries, *device, "k_pos = torch.arange(S, )[None, :]")
    # a real change on the same line is not explained away
    assert not run.explained(entries, *device, "k_pos = torch.arange(S + 1, device=device)[None, :]")
    assert not run.explained(entries, "minigemma.layers.soft_cap", "return cap * torch.tanh(x / cap)",
                             "return cap * torch.tanh(x * cap)")
