"""Tests for minigemma.tokenizer against the real Gemma 3 tokenizer.model and HF's tokenizer.

The reference is transformers' GemmaTokenizer loaded from the fetched EmbeddingGemma folder. In
transformers 5.x that class is backed by `tokenizers` and reads the folder's tokenizer.json:
`GemmaTokenizer(vocab_file=...)` silently ignores the .model file, and converting the .model needs
protobuf. So this compares two independent files and implementations: SentencePiece on
tokenizer.model versus HF tokenizers on tokenizer.json.
"""

from __future__ import annotations

import struct

import pytest

from minigemma.tokenizer import Tokenizer
from minigemma.weights import fetch

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-9 $1,000,000.00 2025-01-31",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Straße, Ärger, Öl, Maß.",
    "我能吞下玻璃而不伤身体。机器学习是人工智能的一个分支。",
    "日本語のテキスト：東京は日本の首都です。カタカナ、ひらがな、漢字。ｶﾀｶﾅ",
    "مرحبا بالعالم! اللغة العربية تكتب من اليمين إلى اليسار. ١٢٣",
    "नमस्ते दुनिया। हिंदी भाषा देवनागरी लिपि में लिखी जाती है।",
    "Привет, мир! Ελληνικά. 한국어 텍스트. ภาษาไทย. עברית.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 🇩🇪 ❤️ 🤖👍🏽",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0: pass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C\n<div class=\"x\">&amp;</div>",
    "   leading spaces, trailing spaces   ",
    "runs:      six spaces\n\n\n\nfour newlines\t\t\ttabs \r\n crlf" + " " * 40 + "end",
    # byte fallback: characters outside the vocabulary become <0xNN> pieces
    "\U0001D54F\U0001F9EC \u2603 \U00010348 \x00\x01\x7f \uFFFD \U000E0001 \U0010FFFF \uE000",
    "rare CJK: 𠀀𪚥𰻞, Tibetan ཀཁག, Ethiopic ሀሁሂ, Cherokee ᏣᎳᎩ, Ogham ᚁᚂᚃ",
    # no normalization: these must round-trip unchanged
    "Ｆｕｌｌｗｉｄｔｈ ﬁ ligature ① ℌ Å vs Å, e\u0301 vs é, ǅ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "<unused0> <start_of_image> <mask>",
    "",
    " ",
    "\n",
    "a",
]


@pytest.fixture(scope="module")
def folder():
    return fetch.fetch("embeddinggemma-300m", progress=False)


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer(folder / "tokenizer.model")


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import GemmaTokenizer

    return GemmaTokenizer.from_pretrained(str(folder))


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == len(tok) == 262_144
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.piece_to_id("<start_of_turn>") == 105 and tok.piece_to_id("<end_of_turn>") == 106
    assert tok.piece_to_id("no such piece, surely") == tok.unk_id
    assert tok.control_ids == {0, 1, 2}
    with pytest.raises(ValueError):
        tok.id_to_piece(262_144)


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_hf(tok, hf, text):
    plain = hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_bos=False) == plain
    assert tok.encode(text) == [2] + plain
    # EmbeddingGemma's tokenizer config adds both BOS and EOS.
    assert tok.encode(text, add_bos=True, add_eos=True) == hf(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"][:-1])


def test_same_ids_as_hf_on_one_long_text(tok, hf):
    text = "\n\n".join(TEXTS) * 3
    assert tok.encode(text) == [2] + hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.decode(tok.encode(text), skip_special=True) == text


def test_byte_fallback(tok):
    ids = tok.encode("\U0010FFFF", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBF>"]
    assert tok.decode(ids) == "\U0010FFFF"


def test_whitespace_is_kept(tok):
    # No dummy prefix: "Hello" at the start and " Hello" differ, and spaces are never dropped.
    assert tok.encode("Hello", add_bos=False) != tok.encode(" Hello", add_bos=False)
    assert tok.id_to_piece(tok.encode("  ", add_bos=False)[0]) == "▁▁"


def test_decode_specials(tok):
    ids = [2] + tok.encode("Hi", add_bos=False) + [1, 0, 0]
    assert tok.decode(ids) == "<bos>Hi<eos><pad><pad>"
    assert tok.decode(ids, skip_special=True) == "Hi"
    assert tok.decode([105]) == "<start_of_turn>"  # not a control token: always shown
    with pytest.raises(ValueError):
        tok.decode([262_144])
    # Text is text: a literal "<bos>" is not the BOS id (HF would make it id 2).
    assert 2 not in tok.encode("<bos>", add_bos=False)


def test_encode_batch(tok):
    assert tok.encode_batch(TEXTS[:4]) == [tok.encode(t) for t in TEXTS[:4]]
    assert tok.encode_batch(["x"], add_bos=False, add_eos=True) == [tok.encode("x", False, True)]


def test_from_pretrained(folder, tmp_path):
    by_name = Tokenizer.from_pretrained("embeddinggemma-300m")
    assert by_name.model_file == folder / "tokenizer.model"
    assert Tokenizer.from_pretrained(folder).encode("hi") == by_name.encode("hi")
    assert Tokenizer.from_pretrained(folder / "tokenizer.model").vocab_size == 262_144
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="embeddinggemma-300m"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def _gguf_tokens(path) -> list[str]:
    """The ``tokenizer.ggml.tokens`` array of a GGUF file (a tiny reader of the metadata header;
    gguf.GGUFReader takes ~15 s on a 262k-entry vocabulary)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        buf = f.read(64 << 20)
    assert buf[:4] == b"GGUF"
    pos = 4 + 4 + 8
    (n_kv,) = struct.unpack_from("<Q", buf, pos)
    pos += 8

    def string(pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    def skip(t, pos):
        if t == 8:
            return string(pos)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            for _ in range(n):
                pos = skip(et, pos)
            return pos
        return pos + sizes[t]

    for _ in range(n_kv):
        key, pos = string(pos)
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key == "tokenizer.ggml.tokens":
            et, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            out = []
            for _ in range(n):
                s, pos = string(pos)
                out.append(s)
            return out
        pos = skip(t, pos)
    raise KeyError("tokenizer.ggml.tokens")


def test_gemma3_gguf_has_the_same_vocabulary(tok):
    """Why ``from_pretrained("gemma3-270m")`` may use EmbeddingGemma's tokenizer.model."""
    gguf_path = fetch.fetch("gemma3-270m", progress=False)
    tokens = _gguf_tokens(gguf_path)
    assert len(tokens) == tok.vocab_size
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    # llama.cpp writes the 30 whitespace-run pieces ("▁▁" ...) with real spaces.
    differ = [i for i, (a, b) in enumerate(zip(tokens, pieces)) if a != b]
    assert len(differ) <= 31
    assert all(tokens[i] == pieces[i].replace("▁", " ") for i in differ)
    assert Tokenizer.from_pretrained("gemma3-270m").model_file == tok.model_file


# --------------------------------------------------------------------------------------------
# data.bpe_merge: one merge of byte-pair encoding (exercise 08.bpe_merge), on examples worked out by hand
# --------------------------------------------------------------------------------------------
def test_bpe_merge_by_hand():
    from minigemma.data import bpe_merge

    # "low lower lowest" as characters (l=1, o=2, w=3, e=4, r=5, s=6, t=7), one word per sequence. Pairs:
    # (1,2) x3, (2,3) x3, (3,4) x2, (4,5) x1, (4,6) x1, (6,7) x1: (1,2) and (2,3) tie at 3, the smaller wins
    words = [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7]]
    merged, pair = bpe_merge(words, 8)
    assert pair == (1, 2) and merged == [[8, 3], [8, 3, 4, 5], [8, 3, 4, 6, 7]]
    # the next merge on the result: (8,3) x3 wins; then (9,4) x2
    merged, pair = bpe_merge(merged, 9)
    assert pair == (8, 3) and merged == [[9], [9, 4, 5], [9, 4, 6, 7]]
    merged, pair = bpe_merge(merged, 10)
    assert pair == (9, 4) and merged == [[9], [10, 5], [10, 6, 7]]
    # "aaaa b aaa": (a,a) counted 3 + 2 = 5 times (each position), merged left to right without overlap
    merged, pair = bpe_merge([[1, 1, 1, 1], [2], [1, 1, 1]], 3)
    assert pair == (1, 1) and merged == [[3, 3], [2], [3, 1]]
    # a pair across two sequences never counts: inside them only (2,3) exists, though (1,2) spans twice
    assert bpe_merge([[1], [2, 3], [1], [2, 3]], 4) == ([[1], [4], [1], [4]], (2, 3))
    # empty sequences are kept; with no pair at all, nothing changes and the pair is None
    assert bpe_merge([[], [5, 6], []], 7) == ([[], [7], []], (5, 6))
    assert bpe_merge([[5], [], [6]], 7) == ([[5], [], [6]], None)
    # the input is left as it was
    corpus = [[1, 2, 1, 2]]
    bpe_merge(corpus, 3)
    assert corpus == [[1, 2, 1, 2]]
