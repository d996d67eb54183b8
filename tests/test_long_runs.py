"""The chapters' shipped LONG runs (docs/runs/ch08-long.json, ch09-long.json, ch11-long.json, written by
tools/long_runs.py): at least three seeds of every run a chapter plots, each a whole run of the configuration the
script states, which is the one the package's own recipes and the chapter's LONG branch use. The chapters check
the figures their text quotes against these files when they run; this checks the files themselves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import long_runs  # noqa: E402


def shipped(chapter: str) -> dict:
    return json.loads((ROOT / "docs" / "runs" / f"{chapter}-long.json").read_text())


def seeds_of(report: dict, key: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in report["runs"]:
        out.setdefault(r[key], []).append(r["seed"])
    return out


def test_ch08_two_models_three_seeds_each_the_recipes_own_config():
    from minigemma import train

    report = shipped("ch08")
    assert report["command"].startswith(".venv/bin/python tools/long_runs.py ch08")
    assert seeds_of(report, "model") == {"tiny-gemma3": [0, 1, 2], "tiny-griffin": [0, 1, 2]}
    for name, cfg in report["config"].items():
        assert cfg == train.load_spec(name)["train"]  # what `python -m minigemma train NAME` runs
    for r in report["runs"]:
        steps = report["config"][r["model"]]["steps"]
        assert r["step"] == list(range(1, steps + 1)) and len(r["loss"]) == steps
        assert r["val_step"][-1] == steps and len(r["val_loss"]) == len(r["val_step"])


def test_ch09_three_objectives_three_seeds_each():
    from minigemma import distill

    report = shipped("ch09")
    assert report["config"] == long_runs.CH09
    assert seeds_of(report, "objective") == {o: [0, 1, 2] for o in distill.OBJECTIVES}
    for r in report["runs"]:
        assert r["step"] == list(range(1, long_runs.CH09["steps"] + 1))
        assert r["val_step"][0] == 0 and r["val_step"][-1] == long_runs.CH09["steps"]
    # every student starts from its own seed's initialisation, the same for the three objectives
    for seed in (0, 1, 2):
        first = {r["val_loss"][0] for r in report["runs"] if r["seed"] == seed}
        assert len(first) == 1
    assert len({r["val_loss"][0] for r in report["runs"]}) == 3


def test_ch11_every_run_of_the_chapter_three_seeds_each():
    from minigemma import contrastive as C

    report = shipped("ch11")
    assert report["config"] == long_runs.CH11
    runs = list(C.ablations(C.LossWeights())) + ["code-only run", "random start", "soup"]
    assert seeds_of(report, "run") == {r: [0, 1, 2] for r in runs}
    for r in report["runs"]:
        dims = [str(d) for d in C.LossWeights().mrl_dims]
        assert list(r["table"]) == dims and all(0 <= r["table"][d]["nDCG@10"] <= 1 for d in dims)
        if r["run"] != "soup":  # the soup is not trained: it averages two runs' weights
            assert len(r["loss"]) == long_runs.CH11["steps"]


def test_the_files_are_written_one_run_per_line_and_read_back_the_same(tmp_path):
    report = dict(command="x", config={"steps": 2}, runs=[{"seed": 0, "loss": [1.0, 0.5]}, {"seed": 1, "loss": [2.0]}])
    path = tmp_path / "r.json"
    long_runs._save(path, report)
    text = path.read_text()
    assert json.loads(text) == report
    assert [line.strip(" ,") for line in text.splitlines() if '"seed"' in line] == [
        '{"seed": 0, "loss": [1.0, 0.5]}', '{"seed": 1, "loss": [2.0]}']


@pytest.mark.parametrize("chapter", ["ch08", "ch09", "ch11"])
def test_the_shipped_files_are_what_the_script_writes(chapter):
    text = (ROOT / "docs" / "runs" / f"{chapter}-long.json").read_text()
    assert long_runs.dumps(json.loads(text)) == text
