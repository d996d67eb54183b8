"""The course map (chapters/README.md) agrees with the chapters folder and the graded exercises.

Whoever adds a chapter adds its row; whoever adds or renames an exercise updates its chapter's row.
"""

import re
from pathlib import Path

from minigemma.grading import core

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "chapters" / "README.md"


def _rows():
    rows = {}
    for line in MAP.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d\d", cells[0]):
            rows[cells[0]] = dict(zip(["num", "chapter", "prereq", "time", "exercises", "files"], cells))
    return rows


def test_every_chapter_has_a_row_and_every_row_a_chapter():
    chapters = {p.name for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")}
    rows = _rows()
    linked = {}
    for num, row in rows.items():
        m = re.search(r"\]\(((\d\d)_[^)]+\.ipynb)\)", row["chapter"])
        assert m, f"row {num}: the chapter cell must link its notebook: {row['chapter']}"
        assert m.group(2) == num, f"row {num} links {m.group(1)}"
        linked[m.group(1)] = num
    assert set(linked) == chapters, {"chapters without a row": sorted(chapters - set(linked)),
                                     "rows without a chapter": sorted(set(linked) - chapters)}
    nums = list(rows)
    assert nums == sorted(nums), "rows in chapter order"


def test_rows_name_the_chapters_exercises_prerequisites_time_and_files():
    core.get("00.softmax")
    for num, row in _rows().items():
        listed = re.findall(r"`(\d\d\.\w+)`", row["exercises"])
        graded = [ex.name for ex in core.exercises_for(num)]
        assert sorted(listed) == sorted(graded), f"chapter {num}: map lists {listed}, graded are {graded}"
        prereqs = re.findall(r"\d\d", row["prereq"])
        assert prereqs or row["prereq"] == "none", f"chapter {num}: prerequisites {row['prereq']!r}"
        assert all(p < num and p in _rows() for p in prereqs), f"chapter {num}: prerequisites {prereqs}"
        assert re.search(r"\d+ (s|min)", row["time"]), f"chapter {num}: run time {row['time']!r}"
        files = [f for f in re.findall(r"`([^`]+)`", row["files"]) if "/" in f or f.endswith(".py")]
        assert files, f"chapter {num}: no package files"
        for f in files:
            assert (ROOT / "minigemma" / f).exists() or (ROOT / f).exists(), f"chapter {num}: no such file {f}"
