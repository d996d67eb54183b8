"""minigemma.weights.gguf (and the Gemma 3 loader on it, pretrained.gemma_from_gguf) on the real
Gemma 3 270M Q4_K_M GGUF, against independent references.

References:
* HF transformers loading the same GGUF (`from_pretrained(dir, gguf_file=...)`), in float32. Its
  GGUF path uses the `gguf` package's reader and dequantiser, not ours.
* the `gguf` package (llama.cpp's own Python package): `gguf.quants.dequantize`,
  `GGML_QUANT_SIZES`, and `GGUFWriter` for small hand-made files in the error tests.

Everything real is loaded once per module. HF's reader parses the 262,144-string vocabulary
slowly, twice (~50 s on 2 cores), and the model needs none of it, so HF reads a copy of the file
without the tokenizer keys (every tensor byte and model key kept; ~8 s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minigemma.generation import generate_ids
from minigemma.weights import fetch
from minigemma.pretrained import unfused_state_dict
from minigemma.gemma import gguf_name_table
from minigemma.pretrained import gemma_from_gguf
from minigemma.weights.gguf import (
    GGML_TYPES, CheckpointError, bits_per_weight, dequantize_q4_k, dequantize_q8_0, read_gguf)

gguf = pytest.importorskip("gguf")

# Varied prompts: prose, code, non-Latin scripts and digits, and one past the 512-token window.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Zwölf Boxkämpfer jagen Viktor. 東京は日本の首都です。 1234 + 5678 =",
    " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones." for i in range(45)),
]


# ----------------------------------------------------------------------------------------------
# Fixtures: the real file, our model, HF's model (each once)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def path():
    return fetch.fetch("gemma3-270m", progress=False)


@pytest.fixture(scope="module")
def ours(path):
    return gemma_from_gguf(path, torch.float32)


@pytest.fixture(scope="module")
def tok():
    from minigemma.tokenizer import Tokenizer

    return Tokenizer.from_pretrained("gemma3-270m")


def _without_vocabulary(src, dst):
    """Copy a GGUF with the gguf package's writer, dropping the tokenizer.* keys (the vocabulary
    size goes in `gemma3.vocab_size`, where HF's GGUF config mapping reads it)."""
    f = read_gguf(src)
    w = gguf.GGUFWriter(str(dst), f.metadata["general.architecture"])
    for key, value in f.metadata.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    w.add_uint32("gemma3.vocab_size", f.tensors["token_embd.weight"].shape[0])
    for name, info in f.tensors.items():
        raw = f.raw(name).numpy()
        if info.type.name == "F32":
            w.add_tensor(name, raw.view(np.float32).reshape(info.shape))
        else:  # (rows, bytes per row) of the stored blocks, verbatim
            w.add_tensor(name, raw.reshape(info.shape[0], -1), raw_dtype=gguf.GGMLQuantizationType(info.type.id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf(path, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    copy = tmp_path_factory.mktemp("gguf") / path.name
    _without_vocabulary(path, copy)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(copy.parent), gguf_file=copy.name,
                                                              dtype=torch.float32)
    copy.unlink()
    return model.eval()


@pytest.fixture(scope="module")
def long_ids(tok):
    ids = tok.encode(PROMPTS[-1])
    assert len(ids) > 560, "the long prompt must pass the 512-token window"
    return ids


@pytest.fixture(scope="module")
def long_logits(ours, hf, long_ids):
    """(ours, HF) logits (T, V) on the long prompt, computed once."""
    with torch.no_grad():
        ids = torch.tensor([long_ids])
        return ours(ids)[0], hf(ids).logits[0]


# ----------------------------------------------------------------------------------------------
# The container and the block formats
# ----------------------------------------------------------------------------------------------
def test_block_sizes_match_gguf_package():
    for t in GGML_TYPES.values():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.id)] == (t.block_size, t.type_size), t.name


def test_bits_per_weight():
    # by hand: bytes per block * 8 / weights per block
    assert bits_per_weight("F32") == 32
    assert bits_per_weight("Q8_0") == 34 * 8 / 32 == 8.5
    assert bits_per_weight("Q5_0") == 22 * 8 / 32 == 5.5
    assert bits_per_weight("Q4_K") == 144 * 8 / 256 == 4.5
    assert bits_per_weight("Q6_K") == 210 * 8 / 256 == 6.5625
    with pytest.raises(ValueError, match="unknown ggml type"):
        bits_per_weight("Q3_Z")


def test_header(path):
    f = read_gguf(path)
    assert f.version == 3 and f.metadata["general.architecture"] == "gemma3"
    assert len(f.tensors) == 236  # 2 + 18 layers x 13
    assert set(f.tensors) == set(gguf_name_table(18))
    types = {name: info.type.name for name, info in f.tensors.items()}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_output.weight"] == "Q4_K"
    assert f.tensors["token_embd.weight"].shape == (262_144, 640)  # PyTorch order: (vocab, hidden)
    assert f.tensors["blk.3.ffn_down.weight"].shape == (640, 2048)
    assert f.data_start % 32 == 0
    # tensors are laid out back to back (up to alignment) and the last one ends at the file's end
    spans = sorted((i.offset, i.offset + i.n_bytes) for i in f.tensors.values())
    assert all(0 <= b[0] - a[1] < 32 for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == path.stat().st_size


def _random_blocks(g, n_blocks, type_size, fp16_offsets):
    """Random block bytes whose fp16 scale fields hold finite values (random bytes could be NaN)."""
    raw = torch.randint(0, 256, (n_blocks, type_size), generator=g, dtype=torch.uint8)
    for off in fp16_offsets:
        raw[:, off:off + 2] = (torch.randn(n_blocks, 1, generator=g) * 0.01).half().view(torch.uint8)
    return raw


@pytest.mark.parametrize("name, ours_fn, type_size, fp16", [
    ("Q8_0", dequantize_q8_0, 34, [0]), ("Q4_K", dequantize_q4_k, 144, [0, 2])])
def test_dequantisers_match_gguf_package(path, name, ours_fn, type_size, fp16):
    qtype = gguf.GGMLQuantizationType[name]
    block = GGML_TYPES[qtype.value].block_size
    g = torch.Generator().manual_seed(0)
    raw = _random_blocks(g, 24, type_size, fp16)
    ref = gguf.quants.dequantize(raw.numpy().reshape(-1), qtype)
    got = ours_fn(raw, (24 * block,))
    assert torch.equal(got, torch.from_numpy(ref)), name  # same float32 operations: bit-exact
    # and on real bytes from the file (the first rows of a tensor of that type)
    f = read_gguf(path)
    tname = next(n for n, i in f.tensors.items() if i.type.name == name)
    info = f.tensors[tname]
    rows, cols = 8, info.shape[1]
    raw = f.raw(tname)[: rows * cols // block * type_size]
    ref = gguf.quants.dequantize(raw.numpy(), qtype).reshape(rows, cols)
    assert torch.equal(ours_fn(raw, (rows, cols)), torch.from_numpy(ref)), tname


def test_quantization_step(path):
    """Q8_0, Q5_0 and Q6_K store w = step * integer, so w / step must be whole numbers."""
    from minigemma.weights.gguf import quantization_step

    f = read_gguf(path)
    for name in ("blk.0.attn_v.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        info = f.tensors[name]
        w, step = f.tensor(name), quantization_step(f.raw(name), info.type, info.shape)
        k = w[step > 0] / step[step > 0]
        assert (k - k.round()).abs().max() < 1e-3, name
        assert (step > 0).float().mean() > 0.99


def test_dequantiser_rejects_wrong_size():
    with pytest.raises(ValueError, match="blocks"):
        dequantize_q8_0(torch.zeros(35, dtype=torch.uint8), (32,))
    with pytest.raises(ValueError, match="needs"):
        dequantize_q4_k(torch.zeros(144, dtype=torch.uint8), (512,))


# ----------------------------------------------------------------------------------------------
# Loading: every weight equals HF's, conventions undone
# ----------------------------------------------------------------------------------------------
def test_config(ours, hf):
    c, h = ours.config, hf.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar",
                  "max_position_embeddings", "layer_types"):
        assert getattr(c, field) == getattr(h, field), field
    assert c.rms_norm_eps == pytest.approx(h.rms_norm_eps)
    rp = h.rope_parameters
    assert c.rope_theta == rp["full_attention"]["rope_theta"] == 1e6
    assert c.rope_local_base_freq == rp["sliding_attention"]["rope_theta"] == 1e4


def test_every_weight_equals_hf(ours, hf):
    """Names, the 1+w norms, no row permutation: each tensor equal, bit for bit (both dequantise
    the same bytes with the same float32 operations, and both subtract 1 in float32)."""
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert torch.equal(theirs.pop("lm_head.weight"), theirs["embed_tokens.weight"])  # tied in both
    mine = unfused_state_dict(ours)  # q/k/v and gate/up under HF's separate names
    assert mine.pop("lm_head.weight").data_ptr() == ours.embed_tokens.weight.data_ptr()  # tied: one tensor
    assert set(mine) == set(theirs)
    for name, w in mine.items():
        assert torch.equal(w, theirs[name]), name
    # the convention that was undone: GGUF stores 1 + w for every RMSNorm
    f = read_gguf(fetch.path("gemma3-270m"))
    stored = f.tensor("blk.0.attn_norm.weight")
    assert torch.equal(stored - 1, mine["layers.0.input_layernorm.weight"])
    assert (stored - mine["layers.0.input_layernorm.weight"]).abs().max() == 1.0


def test_tokenizer_is_the_gguf_vocabulary(path, tok):
    """Our SentencePiece model (from EmbeddingGemma's folder) holds the GGUF's pieces and scores.

    llama.cpp's converter changed two things, both for special tokens only: user-defined pieces
    (token_type 4: the whitespace runs) are stored with real spaces instead of U+2581, and control
    and user-defined tokens (types 3, 4) get score -1000 instead of 0.
    """
    md = read_gguf(path).metadata
    pieces, scores, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], md["tokenizer.ggml.token_type"]
    assert len(pieces) == tok.vocab_size == 262_144
    sp_pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    sp_scores = np.array([tok.sp.get_score(i) for i in range(tok.vocab_size)], dtype=np.float32)
    normal = (types == 1) | (types == 6)  # normal pieces and <0xNN> byte pieces
    special = ~normal
    assert normal.sum() > 255_000 and set(np.unique(types[special])) == {3, 4}
    for i in range(tok.vocab_size):
        want = sp_pieces[i] if normal[i] else sp_pieces[i].replace("\u2581", " ")
        assert pieces[i] == want, i
    assert np.array_equal(sp_scores[normal], scores[normal])
    assert (scores[special] == -1000).all() and (sp_scores[special] == 0).all()
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)


# ----------------------------------------------------------------------------------------------
# The forward pass and generation, real weights, float32
# ----------------------------------------------------------------------------------------------
# Logits reach |x| ~ 35. Two float32 implementations of the same maths differ by summation order
# (HF's attention vs ours, fused vs separate ops): ~1e-7 relative per op, grown through 18 layers
# to a few 1e-4 on the long prompt (measured 3e-4). 2e-3 leaves room for other BLAS builds while a
# real mistake moves logits by O(0.1-10): e.g. a window one key too wide, checked below.
LOGIT_ATOL = 2e-3


@torch.no_grad()
def test_logits_match_hf(ours, hf, tok, long_logits):
    for prompt in PROMPTS[:-1]:
        ids = torch.tensor([tok.encode(prompt)])
        got, want = ours(ids)[0], hf(ids).logits[0]
        diff = (got - want).abs().max().item()
        assert diff < LOGIT_ATOL, f"{prompt!r}: max |diff| {diff:.2e}"
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    got, want = long_logits
    assert (got - want).abs().max() < LOGIT_ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@torch.no_grad()
def test_long_prompt_exercises_the_window(ours, long_ids, long_logits):
    """Past 512 tokens the local layers' mask matters: a window one key too wide breaks parity."""
    want = long_logits[1][512:]
    local = [layer.self_attn for layer in ours.layers if layer.self_attn.window is not None]
    assert len(local) == 15
    try:
        for a in local:
            a.window = 513
        wrong = ours(torch.tensor([long_ids]))[0, 512:]
    finally:
        for a in local:
            a.window = 512
    assert (wrong - want).abs().max() > 50 * LOGIT_ATOL


@torch.no_grad()
def test_greedy_32_tokens_match_hf_generate(ours, hf, tok):
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)[0, len(ids):].tolist()
        if tok.eos_id in want:  # HF keeps EOS (and pads after it); we stop before it
            want = want[:want.index(tok.eos_id)]
        assert generate_ids(ours, [ids], 32) == [want], prompt


@torch.no_grad()
def test_cache_matches_no_cache(ours, tok, long_ids, long_logits):
    # tokens: 8 greedy steps with the cache == recomputing the whole sequence each step
    ids = tok.encode(PROMPTS[0])
    assert generate_ids(ours, [ids], 8) == generate_ids(ours, [ids], 8, use_cache=False)
    # logits across the window edge: prefill 300 + 260 (a chunk that wraps the 512-slot ring
    # buffer), then one token at a time from position 560 on; compared with one full (causal) pass
    T = len(long_ids)
    seq = torch.tensor([long_ids])
    cache = ours.new_cache(batch=1, max_len=T)
    steps = [ours(seq[:, :300], cache=cache), ours(seq[:, 300:560], cache=cache)]
    steps += [ours(seq[:, t:t + 1], cache=cache) for t in range(560, T)]
    cached = torch.cat(steps, dim=1)[0]
    assert (cached - long_logits[0]).abs().max() < LOGIT_ATOL
    assert (cached - long_logits[1]).abs().max() < LOGIT_ATOL  # and with HF's
    # memory: local layers hold a ring of 512 keys, global ones all T
    types = ours.config.layer_types
    assert {c.k.shape[2] for c, t in zip(cache, types) if t == "sliding_attention"} == {512}
    assert {c.k.shape[2] for c, t in zip(cache, types) if t == "full_attention"} == {T}


# ----------------------------------------------------------------------------------------------
# Clear errors for bad files (small GGUFs written by the gguf package's own writer)
# ----------------------------------------------------------------------------------------------
TINY = dict(vocab=64, hidden=16, ffn=32, layers=2, heads=2, kv=1, head_dim=8)


def _tiny_tensors(rng):
    c = TINY
    t = {"token_embd.weight": (c["vocab"], c["hidden"]), "output_norm.weight": (c["hidden"],)}
    for i in range(c["layers"]):
        shapes = {"attn_q": (c["heads"] * c["head_dim"], c["hidden"]), "attn_k": (c["kv"] * c["head_dim"], c["hidden"]),
                  "attn_v": (c["kv"] * c["head_dim"], c["hidden"]), "attn_output": (c["hidden"], c["heads"] * c["head_dim"]),
                  "attn_q_norm": (c["head_dim"],), "attn_k_norm": (c["head_dim"],),
                  "ffn_gate": (c["ffn"], c["hidden"]), "ffn_up": (c["ffn"], c["hidden"]), "ffn_down": (c["hidden"], c["ffn"]),
                  "attn_norm": (c["hidden"],), "post_attention_norm": (c["hidden"],), "ffn_norm": (c["hidden"],),
                  "post_ffw_norm": (c["hidden"],)}
        t.update({f"blk.{i}.{k}.weight": s for k, s in shapes.items()})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def _write_tiny(p, tensors, arch="gemma3"):
    c = TINY
    w = gguf.GGUFWriter(str(p), arch)
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", c["hidden"])
    w.add_uint32(f"{arch}.block_count", c["layers"])
    w.add_uint32(f"{arch}.feed_forward_length", c["ffn"])
    w.add_uint32(f"{arch}.attention.head_count", c["heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", c["kv"])
    w.add_uint32(f"{arch}.attention.key_length", c["head_dim"])
    w.add_uint32(f"{arch}.attention.value_length", c["head_dim"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_uint32(f"{arch}.attention.sliding_window", 4)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_tiny_gguf_round_trip(tmp_path):
    from minigemma import load_pretrained

    tensors = _tiny_tensors(np.random.default_rng(0))
    p = _write_tiny(tmp_path / "tiny.gguf", tensors)
    model = gemma_from_gguf(p)
    sd = unfused_state_dict(model)
    table = gguf_name_table(TINY["layers"])
    for name, arr in tensors.items():
        want = torch.from_numpy(arr) - (1.0 if "norm" in name else 0.0)
        assert torch.equal(sd[table[name]], want), name
    assert model.config.layer_types == ["sliding_attention"] * 2 and model.config.sliding_window == 4
    same, tokenizer = load_pretrained(p)  # a .gguf path: the same loader, and no tokenizer.model
    want = model.state_dict()
    assert tokenizer is None and all(torch.equal(t, want[n]) for n, t in same.state_dict().items())


def test_truncated_and_corrupt_files(tmp_path, path):
    data = path.read_bytes()
    cases = {
        "short.gguf": (data[:10], "too short"),
        "header.gguf": (data[:1_000_000], "header ends early"),  # the vocabulary is cut
        "data.gguf": (data[:200_000_000], "truncated"),  # tensors past the end
        "magic.gguf": (b"GGML" + data[4:100_000], "not a GGUF file"),
        "version.gguf": (data[:4] + (7).to_bytes(4, "little") + data[8:100_000], "version 7"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            gemma_from_gguf(p)
    with pytest.raises(CheckpointError, match="no such file"):
        gemma_from_gguf(tmp_path / "absent.gguf")


def test_wrong_architecture(tmp_path):
    p = _write_tiny(tmp_path / "llama.gguf", _tiny_tensors(np.random.default_rng(0)), arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama'"):
        gemma_from_gguf(p)


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    rng = np.random.default_rng(0)
    t = _tiny_tensors(rng)
    del t["blk.1.ffn_up.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors for: layers\.1\.mlp\.up_proj\.weight"):
        gemma_from_gguf(_write_tiny(tmp_path / "missing.gguf", t))
    t = _tiny_tensors(rng)
    t["output.weight"] = rng.standard_normal((TINY["vocab"], TINY["hidden"])).astype(np.float32)
    t["blk.0.extra.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: blk\.0\.extra\.weight, output\.weight"):
        gemma_from_gguf(_write_tiny(tmp_path / "unexpected.gguf", t))
    t = _tiny_tensors(rng)
    t["blk.0.attn_k.weight"] = rng.standard_normal((16, TINY["hidden"])).astype(np.float32)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blk\.0\.attn_k\.weight \(16, 16\)"):
        gemma_from_gguf(_write_tiny(tmp_path / "shape.gguf", t))


# ----------------------------------------------------------------------------------------------
# The int8 fast path (minigemma.quant)
# ----------------------------------------------------------------------------------------------
def test_int8_linear_matches_its_dequantised_weight():
    from minigemma.quant import Int8Linear, int8_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    q, scale = int8_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # half a step at most
    lin = Int8Linear(q, scale)
    w_deq = q.float() * scale.bfloat16().float()[:, None]
    for M in (1, 3, 40):  # the decode kernel (M <= 16) and the prefill path
        x = torch.randn(2, M, 64, generator=g)
        want = x.bfloat16().float() @ w_deq.T
        got = lin(x).float()
        assert got.shape == (2, M, 96)
        assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding (8 bits) of x, W and y
