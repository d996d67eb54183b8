"""`minigemma.atomic.write_atomic`: the one way the package writes a file."""

import pytest

from minigemma.atomic import write_atomic


def test_writes_bytes_text_and_through_a_function(tmp_path):
    assert write_atomic(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_atomic(tmp_path / "sub" / "b.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    write_atomic(tmp_path / "c.txt", lambda tmp: tmp.write_text("from a writer"))
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.txt", "c.txt", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"the old, good file")

    def crash(tmp):
        tmp.write_bytes(b"half of the new")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, crash)
    assert target.read_bytes() == b"the old, good file"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_replaces_an_existing_file_whole(tmp_path):
    target = tmp_path / "history.json"
    target.write_text("x" * 1000)
    write_atomic(target, "{}")
    assert target.read_text() == "{}"
