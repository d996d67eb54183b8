"""The Gemma 3 tokenizer: a thin wrapper around SentencePiece.

Gemma 3 (and EmbeddingGemma, which reuses it) ships one SentencePiece model, ``tokenizer.model``:
262,144 pieces, byte fallback (any UTF-8 byte missing from the vocabulary becomes a ``<0xNN>``
piece, so nothing is ever unknown), no dummy space prefix, and whitespace runs as pieces of their
own. Special ids: PAD 0, EOS 1, BOS 2, UNK 3.

The ids are the same as Hugging Face's ``GemmaTokenizer`` (``tests/test_tokenizer.py`` checks
this), with one deliberate difference: text is always text here. The literal string ``"<bos>"``
in the input is encoded as the characters ``<``, ``bos``, ``>``, never as the BOS id; HF would
turn it into id 2. Add BOS with ``add_bos=True`` instead.

Usage::

    tok = Tokenizer.from_pretrained("embeddinggemma-300m")   # or a folder, or a .model file
    ids = tok.encode("Hello world")        # [2, 9259, 1902]: BOS first
    tok.decode(ids)                        # '<bos>Hello world'
    tok.decode(ids, skip_special=True)     # 'Hello world'
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

# Checkpoints whose tokenizer.model lives in another checkpoint's folder. The Gemma 3
# GGUF carries its vocabulary inside the GGUF, not as tokenizer.model; it is the same vocabulary
# as EmbeddingGemma's tokenizer.model (checked in tests/test_tokenizer.py).
_TOKENIZER_FROM = {"gemma3-270m": "embeddinggemma-300m"}


class Tokenizer:
    """Text <-> token ids for Gemma 3, backed by a SentencePiece ``tokenizer.model``."""

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()
        # Control tokens (PAD, EOS, BOS for Gemma) mark structure; they never come from text.
        self.control_ids: frozenset[int] = frozenset(
            i for i in range(self.vocab_size) if self.sp.is_control(i))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "Tokenizer":
        """Load from a checkpoint name (``embeddinggemma-300m``, ``gemma3-270m``: fetched and
        verified via ``minigemma.weights.fetch.path``), a folder holding ``tokenizer.model``, or
        the ``.model`` file itself."""
        from minigemma.weights import fetch

        key = str(name_or_path)
        if key in fetch.CHECKPOINTS:
            folder = fetch.path(_TOKENIZER_FROM.get(key, key), files=["tokenizer.model"])  # verify only what we read
            model = folder / "tokenizer.model"
        else:
            p = Path(name_or_path).expanduser()
            if p.is_dir():
                model = p / "tokenizer.model"
                if not model.is_file():
                    raise FileNotFoundError(f"{p} has no tokenizer.model")
            elif p.is_file():
                model = p
            else:
                raise FileNotFoundError(
                    f"{name_or_path!r} is neither a checkpoint name ({', '.join(fetch.CHECKPOINTS)}) "
                    "nor an existing folder or tokenizer.model file")
        return cls(model)

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS first unless ``add_bos=False``; EOS last if ``add_eos``."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     add_eos: bool = False) -> list[list[int]]:
        """``encode`` for each text (no padding: see ``pad_id``)."""
        return [([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])
                for ids in self.sp.encode(list(texts))]

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of ``ids``.

        By default nothing is hidden: control tokens come out as their names (``<bos>``,
        ``<eos>``, ``<pad>``), as Hugging Face's ``decode`` does, so what you see is what the model
        saw. ``skip_special=True`` drops them. Other pieces (``<start_of_turn>``, ``<unused0>``,
        byte pieces) always decode to their text; so ``decode(encode(x, add_bos=False)) == x``.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.control_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # -- the vocabulary ------------------------------------------------------------------------

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (spaces show as ``▁``; bytes as ``<0xNN>``)."""
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of a vocabulary entry; ``unk_id`` if there is no such piece."""
        return self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"
