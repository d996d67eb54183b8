"""Mutation testing of the exercise checks with mutmut: does each check catch a broken reference?

    .venv/bin/python tools/mutation/run.py                 # every exercise (make mutation)
    .venv/bin/python tools/mutation/run.py 03.soft_cap     # some exercises only
    .venv/bin/python tools/mutation/run.py --write-doc     # also rewrite docs/mutation.md

mutmut 3 mutates a copy of the package (in build/mutation/mutants/, never the source: the model
files may be edited while this runs) and runs tools/mutation/check_suite.py on each mutant: every
exercise whose reference executes the mutated function runs its own check, on every seed, with
the mutated reference in the learner's place.

For each exercise, a mutant counts if its reference ran it: killed on every seed, killed on some,
or survived. A survivor is either listed in tools/mutation/equivalent.toml (or equivalent/chNN.toml,
one chapter's), with the reason no
check can or should catch it, or it is a missing case. The run fails if an exercise kills less
than TARGET of its non-equivalent mutants on every seed, or if a survivor is not explained.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "build" / "mutation"
EQUIVALENT = HERE / "equivalent.toml"
EQUIVALENT_DIR = HERE / "equivalent"  # one file per chapter's exercises, chNN.toml, read after equivalent.toml
DOC = ROOT / "docs" / "mutation.md"
TARGET = 0.98
SEEDS = (0, 1, 12345)
COMMAND = ".venv/bin/python tools/mutation/run.py --write-doc   # or: make mutation"
NOT_MUTATED = ("minigemma/grading/core.py", "minigemma/grading/notebooks.py", "minigemma/grading/__init__.py")
# exercises whose check is not mutation-tested, and why
NOT_MUTATION_TESTED = {
    "06.capstone": "its reference is the real Gemma 3 270M generating greedy text: every package function the model "
                   "runs would be mutated, at several whole generations per mutant and seed. Each function it swaps in "
                   "has its own exercise here, and the hook (minigemma/learner.py) is tested in tests/test_learner_hook.py",
    "07.capstone": "its reference is a whole RecurrentGemma fed a prompt, a chunk and decode steps: every package "
                   "function the model runs would be mutated (the trunk, the attention's plans, the caches), which "
                   "tests/test_griffin.py tests against the official and HF code. Each function it swaps in has its "
                   "own exercise here, and the hook (minigemma/learner_griffin.py) is tested in "
                   "tests/test_learner_griffin.py",
    "10.capstone": "its reference is the real EmbeddingGemma 300M ranking documents: every package function the "
                   "encoder runs would be mutated, at two whole encodings per mutant and seed. The three functions it "
                   "swaps in have their own exercises here (10.mean_pool, 10.mrl_truncate, 10.encoder_mask), and the "
                   "hook (minigemma/learner_encoder.py) is tested in tests/test_learner_encoder.py",
    "08.capstone": "its reference is a whole training run of a tiny Gemma: every package function its forward and "
                   "backward run would be mutated, each mutant training the model again on every seed. The three "
                   "functions it swaps in have their own exercises here (08.next_token_loss, 08.lr_schedule, "
                   "08.adamw_step), and the hook (minigemma/learner_train.py) is tested in tests/test_learner_train.py",
    "13.capstone": "its reference is the real Gemma 3 270M's logits over a prompt: every package function the model "
                   "runs would be mutated, each mutant running the learner's kernels through the whole model in "
                   "Triton's interpreter again. The three kernels it swaps in have their own exercises here "
                   "(12.rms_norm_rows, 12.geglu_rows, 13.flash_forward_window), and the hook "
                   "(minigemma/learner_kernels.py) is tested in tests/test_learner_kernels.py",
}


# --------------------------------------------------------------------------------------------
# Which code do the references run?
# --------------------------------------------------------------------------------------------
def traced_files(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The package files (relative to ROOT) whose functions the references of `names` execute, and
    the exercises whose reference fails on its own cases (a package mid-edit): those cannot run."""
    import minigemma
    from minigemma.grading import core

    pkg = Path(os.path.abspath(minigemma.__file__)).parent  # not resolved: a linked subfolder stays inside
    seen: set[str] = set()
    broken: dict[str, str] = {}

    def profile(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code.co_filename)

    for name in names:
        ex = core.get(name)
        try:
            for seed in SEEDS:
                for case in ex.cases(seed):
                    sys.setprofile(profile)
                    try:
                        ex.run(ex.reference, case)
                    finally:
                        sys.setprofile(None)
        except Exception as e:  # noqa: BLE001 - reported, and the run fails
            broken[name] = f"{type(e).__name__}: {e}"
    files = set()
    for f in seen:
        p = Path(os.path.abspath(f))
        if pkg in p.parents:
            rel = "minigemma/" + p.relative_to(pkg).as_posix()
            if rel not in NOT_MUTATED:
                files.add(rel)
    return sorted(files), broken


# --------------------------------------------------------------------------------------------
# Running mutmut
# --------------------------------------------------------------------------------------------
def prepare(files: list[str], max_children: int) -> None:
    """A fresh work folder: the package, the check suite, and mutmut's configuration."""
    if WORK.exists():
        shutil.rmtree(WORK)
    (WORK / "tests_mutation").mkdir(parents=True)
    import minigemma  # the package this interpreter imports (the repository's, when installed editable)

    shutil.copytree(Path(minigemma.__file__).resolve().parent, WORK / "minigemma",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(HERE / "check_suite.py", WORK / "tests_mutation" / "test_checks.py")
    quoted = ", ".join(json.dumps(f) for f in files)
    (WORK / "pyproject.toml").write_text(f"""\
# written by tools/mutation/run.py
[tool.mutmut]
source_paths = ["minigemma"]
only_mutate = [{quoted}]
also_copy = ["tests_mutation/"]
pytest_add_cli_args_test_selection = ["tests_mutation/"]
# run every covering exercise's check, not only up to the first kill: the table counts each one
pytest_add_cli_args = ["--maxfail=1000000", "-p", "no:cacheprovider"]
use_git_change_detection = false
""")


def run_mutmut(max_children: int, patterns: list[str], log: Path, exercises: list[str]) -> None:
    env = dict(os.environ, MINIGEMMA_MUTATION_LOG=str(log), OMP_NUM_THREADS="1",
               MINIGEMMA_MUTATION_EXERCISES=",".join(exercises))
    env.pop("PYTHONPATH", None)  # the mutated copy, and only it, must be importable as minigemma
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *patterns]
    print("$", " ".join(cmd), f"(in {WORK})", flush=True)
    r = subprocess.run(cmd, cwd=WORK, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (WORK / "mutmut.out").write_text(r.stdout)
    if r.returncode != 0:
        print(r.stdout[-4000:])
        raise SystemExit(f"mutmut failed (exit {r.returncode}); full output in {WORK / 'mutmut.out'}")


# --------------------------------------------------------------------------------------------
# Reading the results
# --------------------------------------------------------------------------------------------
def function_of(mutant: str) -> str:
    """'minigemma.layers.xǁRMSNormǁforward__mutmut_3' -> 'minigemma.layers.RMSNorm.forward'."""
    module, _, name = mutant.rpartition(".")
    name = name.rsplit("__mutmut_", 1)[0]
    if name.startswith("xǁ"):
        cls, meth = name[2:].split("ǁ")
        return f"{module}.{cls}.{meth}"
    return f"{module}.{name[2:]}"


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and added lines of a mutant's diff, stripped and joined (the mutant's key)."""
    before = " / ".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---"))
    after = " / ".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++"))
    return before, after


def collect() -> dict:
    """mutmut's verdicts, coverage and diffs, and our per-seed log, read in the work folder."""
    cwd = os.getcwd()
    os.chdir(WORK)
    try:
        sys.path.insert(0, str(WORK / "mutants"))
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.utils.file_utils import walk_mutatable_files

        stats = json.loads(Path("mutants/mutmut-stats.json").read_text())
        covered = {f for f, tests in stats["tests_by_mangled_function_name"].items() if tests}
        status, diffs = {}, {}
        for path in walk_mutatable_files():
            data = SourceFileMutationData(path=path)
            data.load()
            for key, code in data.exit_code_by_key.items():
                if key.rsplit("__mutmut_", 1)[0] in covered:  # mutants no check reaches need no diff
                    status[key] = code
                    diffs[key] = get_diff_for_mutant(key, path=path)
    finally:
        os.chdir(cwd)
    return {"status": status, "diffs": diffs, "tests_by_function": stats["tests_by_mangled_function_name"]}


def load_equivalent() -> list[dict]:
    """The entries of equivalent.toml (shared by many exercises) and of equivalent/chNN.toml (one chapter's)."""
    entries = []
    for path in [EQUIVALENT, *sorted(EQUIVALENT_DIR.glob("*.toml"))]:
        if not path.exists():
            continue
        for e in tomllib.loads(path.read_text()).get("mutant", []):
            if not ({"function", "why"} <= set(e) and ({"before", "before_re"} & set(e))):
                raise SystemExit(f"{path}: entry {e} needs function, why, and before or before_re")
            entries.append(e)
    return entries


def explained(entries: list[dict], function: str, before: str, after: str, exercise: str | None = None) -> dict | None:
    """The entry of equivalent.toml that explains this surviving mutant, if any.

    An entry names the function (a glob) and the changed line: `before`/`after` exactly, or
    `before_re`/`after_re` as regular expressions; a missing `after` matches any mutation. An entry
    with `exercises` (a list of names) explains survivors of those exercises only: code that one
    exercise's reference runs but never reads (the parts of a layer it builds and does not use).
    """
    for e in entries:
        if not fnmatch.fnmatchcase(function, e["function"]):
            continue
        if "exercises" in e and exercise not in e["exercises"]:
            continue
        if "before" in e and e["before"] != before or "before_re" in e and not re.search(e["before_re"], before):
            continue
        if "after" in e and e["after"] != after or "after_re" in e and not re.search(e["after_re"], after):
            continue
        return e
    return None


def tally(res: dict, log: Path, exercises: list[str], entries: list[dict]) -> tuple[list[dict], list[dict]]:
    """One row per exercise, and the unexplained survivors."""
    by_test = defaultdict(set)  # exercise -> mangled functions its check covers
    for func, tests in res["tests_by_function"].items():
        for t in tests:
            m = re.search(r"test_check\[(.+)\]$", t)
            if m:
                by_test[m.group(1)].add(func)
    outcome: dict[tuple[str, str], list[int]] = {}
    why: dict[tuple[str, str], dict] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            outcome[(rec["mutant"], rec["exercise"])] = rec["killed_seeds"]
            why[(rec["mutant"], rec["exercise"])] = rec["why"]
    rows, unexplained = [], []
    for name in exercises:
        funcs = by_test.get(name, set())
        mutants = sorted(m for m in res["status"] if m.rsplit("__mutmut_", 1)[0] in funcs)
        row = {"exercise": name, "functions": sorted({function_of(m) for m in mutants}), "mutants": len(mutants),
               "every_seed": 0, "some_seeds": 0, "survived": 0, "equivalent": 0, "timeout": 0, "not_run": 0}
        for m in mutants:
            seeds = outcome.get((m, name))
            code = res["status"][m]
            before, after = changed_lines(res["diffs"][m])
            if seeds is None:  # no log line: the worker died (time limit, crash) or never ran this test
                if code in (36, 24, -24, 152, 255):
                    row["timeout"] += 1  # mutmut's CPU limit: our own 5 s check limit did not fire
                else:
                    row["not_run"] += 1
                    unexplained.append({"exercise": name, "mutant": m, "function": function_of(m),
                                        "before": before, "after": after, "status": code, "seeds": None})
                continue
            if len(seeds) == len(SEEDS):
                row["every_seed"] += 1
                continue
            eq = explained(entries, function_of(m), before, after, name)
            if eq is not None:
                row["equivalent"] += 1
                eq["used"] = eq.get("used", 0) + 1
                continue
            row["some_seeds" if seeds else "survived"] += 1
            unexplained.append({"exercise": name, "mutant": m, "function": function_of(m), "before": before,
                                "after": after, "status": code, "seeds": seeds, "why": why.get((m, name))})
        counted = row["mutants"] - row["equivalent"]
        row["rate"] = (row["every_seed"] + row["timeout"]) / counted if counted else 1.0
        rows.append(row)
    return rows, unexplained


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| exercise | mutants | equivalent | killed on every seed | on some seeds | survived | kill rate |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['exercise']} | {r['mutants']} | {r['equivalent']} | {r['every_seed'] + r['timeout']} | "
                     f"{r['some_seeds']} | {r['survived'] + r['not_run']} | {100 * r['rate']:.1f}% |")
    tot = {k: sum(r[k] for r in rows) for k in ("mutants", "equivalent", "every_seed", "timeout", "some_seeds",
                                                 "survived", "not_run")}
    counted = tot["mutants"] - tot["equivalent"]
    rate = (tot["every_seed"] + tot["timeout"]) / counted if counted else 1.0
    lines.append(f"| **all** | {tot['mutants']} | {tot['equivalent']} | {tot['every_seed'] + tot['timeout']} | "
                 f"{tot['some_seeds']} | {tot['survived'] + tot['not_run']} | {100 * rate:.1f}% |")
    return "\n".join(lines)


def write_doc(rows: list[dict], unexplained: list[dict], entries: list[dict], seconds: float, files: list[str],
              broken: dict[str, str], load: list[float] | None = None) -> None:
    import mutmut
    import torch

    # the 1-minute load average before and after: about 2 is the run's own children on 2 cores
    load_text = (f" (1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end: the run's own"
                 " children keep both cores busy, so more than about 2 means other work shared them)"
                 if load else "")

    funcs = "\n".join(f"| {r['exercise']} | {', '.join(f'`{f}`' for f in r['functions'])} |" for r in rows)
    eq_lines = "\n".join(f"- `{e['function']}`: `{e.get('before', e.get('before_re', ''))}` → "
                         f"`{e.get('after', e.get('after_re', 'any change'))}`"
                         f"{' (in ' + ', '.join(e['exercises']) + ' only)' if 'exercises' in e else ''}: {e['why']}"
                         for e in entries)
    left = "\n".join(f"- {u['exercise']}: `{u['function']}`: `{u['before']}` → `{u['after']}` "
                     f"(killed on seeds {u['seeds']})" for u in unexplained) or "None."
    DOC.write_text(f"""# Mutation testing of the exercise checks

Each exercise's check compares a learner's function with a reference. Here the references
themselves are mutated (mutmut {mutmut.__version__ if hasattr(mutmut, '__version__') else '3'}, torch {torch.__version__}): every
small change mutmut can make to a function the reference executes (an operator, a constant, an
argument, a dropped call) is handed to the check in the learner's place, on each of the seeds
{', '.join(map(str, SEEDS))} of `tests/test_grading.py`. A mutant is **killed on every seed** when the
check fails it on all three. **Equivalent** mutants cannot change what the exercise asks for
(each is listed below with its reason); the kill rate is killed-on-every-seed over the rest.
Target: at least {TARGET:.0%} for every exercise.

Command (mutmut works on a copy in `build/mutation/`; this run took {seconds / 60:.0f} minutes on a 2-core machine{load_text};
`--report-only` re-reads the last run after an edit of `equivalent.toml`):

```
{COMMAND}
```

## Kill rate per exercise

{table(rows)}

## What each exercise's reference executes (and so what is mutated)

| exercise | functions |
|---|---|
{funcs}

Files mutated: {', '.join(f'`{f}`' for f in files)}.

## Equivalent mutants

Listed in `tools/mutation/equivalent.toml` (matched on the function and the changed line, so they
survive edits elsewhere in the file). Kinds: arguments an exercise never passes (a device, a
`scale` or `softcap` left at its default, a `cache` or `seg` of the full model), error messages
and input validation the exercises do not ask for, and changes with no effect on the values
(a default that every call overrides, a dtype the value already has).

{eq_lines}

## Survivors not explained

{left}

## Exercises not run

{chr(10).join(f"- {n}: its reference fails on its own cases ({why})" for n, why in broken.items()) or "None."}

## Exercises not mutation-tested

{chr(10).join(f"- {n}: {why}." for n, why in NOT_MUTATION_TESTED.items())}
""")


def main(argv: list[str] | None = None) -> int:
    global WORK
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exercises", nargs="*", help="exercise names (default: all)")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    p.add_argument("--write-doc", action="store_true", help=f"rewrite {DOC.relative_to(ROOT)}")
    p.add_argument("--json", type=Path, help="also write the rows and the survivors as JSON here")
    p.add_argument("--work", type=Path, default=WORK, help=f"mutmut's work folder (default {WORK.relative_to(ROOT)})")
    p.add_argument("--report-only", action="store_true",
                   help="re-read the last run in the work folder (after editing equivalent.toml), run nothing")
    args = p.parse_args(argv)
    WORK = args.work.resolve()

    from minigemma.grading import core

    core.get("00.softmax")
    names = args.exercises or sorted(core.EXERCISES)
    unknown = sorted(set(names) - set(core.EXERCISES))
    if unknown:
        raise SystemExit(f"unknown exercises: {unknown}")
    for name in [n for n in names if n in NOT_MUTATION_TESTED]:
        print(f"not mutation-tested: {name}: {NOT_MUTATION_TESTED[name]}")
    names = [n for n in names if n not in NOT_MUTATION_TESTED]
    log, meta = WORK / "outcomes.jsonl", WORK / "run.json"
    if args.report_only:
        last = json.loads(meta.read_text())
        names, files, broken, seconds = last["names"], last["files"], last["broken"], last["seconds"]
        load = last.get("load")
    else:
        start, load_start = time.time(), os.getloadavg()[0]
        files, broken = traced_files(names)
        for name, why in broken.items():
            print(f"skipped {name}: its reference fails on its own cases ({why})")
        names = [n for n in names if n not in broken]
        print(f"mutating {', '.join(files)}", flush=True)
        prepare(files, args.max_children)
        run_mutmut(args.max_children, [], log, names)  # the checks to run: never those not mutation-tested
        seconds, load = time.time() - start, [load_start, os.getloadavg()[0]]
        meta.write_text(json.dumps({"names": names, "files": files, "broken": broken, "seconds": seconds,
                                    "load": load}))
    entries = load_equivalent()
    rows, unexplained = tally(collect(), log, names, entries)
    print(table(rows))
    for u in unexplained:
        print(f"  unexplained: {u['exercise']}: {u['function']}: `{u['before']}` -> `{u['after']}` "
              f"(killed on seeds {u['seeds']}; {u.get('why')})")
    print(f"{seconds:.0f} s")
    if not args.exercises:
        for e in entries:
            if not e.get("used"):
                print(f"  note: equivalent.toml entry matched no mutant (stale?): {e['function']}: "
                      f"{e.get('before', e.get('before_re'))}")
    if args.write_doc:
        write_doc(rows, unexplained, entries, seconds, files, broken, load)
        print(f"wrote {DOC.relative_to(ROOT)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "unexplained": unexplained}, indent=1))
    below = [r["exercise"] for r in rows if r["rate"] < TARGET]
    if below:
        print(f"below the {TARGET:.0%} target: {', '.join(below)}")
    return 1 if below or unexplained or broken else 0


if __name__ == "__main__":
    sys.exit(main())
