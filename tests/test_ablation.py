"""Chapter 08's stability ablation (minigemma/ablation.py): one change per variant, the seeds' summary, the CLI."""

import dataclasses
import math

import pytest

from minigemma import ablation

def test_each_variant_changes_exactly_one_config_field_from_the_baseline():
    base = dataclasses.asdict(ablation.ablation_model().config)
    for name, kw in ablation.VARIANTS.items():
        cfg = dataclasses.asdict(ablation.ablation_model(**kw).config)
        changed = [k for k in base if base[k] != cfg[k]]
        assert len(changed) == (0 if name == "baseline" else 1), (name, changed)


def test_summary_is_mean_min_max_over_seeds_per_variant_and_lr():
    def h(v, logits):
        return dict(val_loss=[9.0, v], max_logit=logits, loss=[], step=[])

    runs = {}
    for variant in ablation.VARIANTS:
        runs[variant, 0.1, 0] = h(5.0, [1.0, 4.0])
        runs[variant, 0.1, 1] = h(6.0, [2.0])
        runs[variant, 0.1, 2] = h(float("nan"), [8.0, 3.0])  # a diverged run counts as NaN, not as a number
    s = ablation.summarise(runs)
    row = s["baseline @ 0.1"]
    assert row["max_logit"] == dict(mean=pytest.approx(14 / 3), min=2.0, max=8.0, runs=[4.0, 2.0, 8.0])
    assert row["val_loss"]["runs"][:2] == [5.0, 6.0] and math.isnan(row["val_loss"]["runs"][2])
    assert math.isnan(row["val_loss"]["mean"])


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--seeds", "1", "1"], "repeats"),
                                           ([], "--out")])
def test_cli_refuses_bad_arguments_before_any_work(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(ablation, "corpus", lambda: pytest.fail("work started before the arguments were checked"))
    with pytest.raises(SystemExit) as e:
        ablation.main(argv + (["--out", "x.json"] if argv and "--out" not in argv else []))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_shipped_seeds_cover_every_variant_and_rate():
    """docs/runs/ch08-ablation.json: at least 3 seeds of every (variant, lr), its summary agreeing with its runs."""
    import json
    from pathlib import Path

    report = json.loads((Path(__file__).resolve().parents[1] / "docs" / "runs" / "ch08-ablation.json").read_text())
    assert len(report["seeds"]) >= 3 and report["variants"] == list(ablation.VARIANTS)
    for variant in ablation.VARIANTS:
        for lr in report["lrs"]:
            row = report["summary"][f"{variant} @ {lr:g}"]["val_loss"]
            finals = [report["runs"][f"{variant} @ {lr:g} @ seed {s}"]["val_loss"][-1] for s in report["seeds"]]
            assert row["runs"] == pytest.approx(finals) and row["min"] <= row["mean"] <= row["max"]
