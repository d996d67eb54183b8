"""EmbeddingGemma: the Gemma 3 stack as a text encoder (chapter 10).

A decoder predicts the next token, so each token may only look back. An encoder turns a whole text
into one vector, so every token may look both ways. EmbeddingGemma 300M is Gemma 3's own stack with
one config value changed, `GemmaConfig.bidirectional = True`:

    global layer   every token sees every token of its text (no causal mask)
    local layer    a symmetric band: |i - j| <= W // 2 for the config's sliding_window W = 512,
                   i.e. 256 keys on each side plus itself (HF's EmbeddingGemma; the band was found
                   by comparing with sentence-transformers on texts longer than 512 tokens)

and sentence-transformers' pipeline around it (the folder's modules.json):

    input_ids (B, T)  ->  Gemma 3 stack, bidirectional              (B, T, C)   C = 768
                      ->  mean over the real tokens (prompt, BOS and EOS included)   (B, C)
                      ->  Dense C -> 4C, Dense 4C -> C, no bias, no activation        (B, C)
                      ->  L2 normalisation                                             (B, C)

Texts are prefixed with a task prompt ("task: search result | query: " for queries, "title: none |
text: " for documents, more in the folder's config_sentence_transformers.json), and tokenised with
BOS first and EOS last. Matryoshka (MRL) training makes every prefix of the vector an embedding too:
keep the first 512, 256 or 128 numbers and normalise again (`truncate`).

Padding. An encoder sees keys after the query, so the causal trick (a pad at position 0 is a
one-token document nobody after it can see) is not enough: a right pad would be visible to every
real token before it. Every pad is therefore its own document (`document_ids`), and attention
never crosses documents; left and right padding both give the unpadded result.

    model, tok = minigemma.load_pretrained("embeddinggemma-300m")       # (or quant="bf16"/"int8"/"int4")
    q = model.encode(["how do I sort a list?"], prompt_name="query")    # (1, 768), unit length
    d = model.encode(docs, prompt_name="document", dim=256)             # (N, 256), unit length
    scores = q @ d.T                                                    # cosine similarities

Shapes: B texts, T tokens, C hidden width (768), E embedding width (768, or an MRL prefix).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import index_mask, make_positions
from .gemma import DecoderLayer, GemmaConfig, hf_name_table
from .layers import RMSNorm, check_token_ids
from .trunk import Trunk

MRL_DIMS = (768, 512, 256, 128)  # the prefixes EmbeddingGemma was trained to embed with


# --------------------------------------------------------------------------------------------
# The pieces: padding as documents, the band, pooling, MRL truncation
# --------------------------------------------------------------------------------------------
def document_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids for an encoder's padded batch: every real token 0, the pad at column t
    its own document t + 1. Attention never crosses documents, so no real token sees a pad and a
    pad sees only itself (its row of the mask is never empty, so softmax never divides by zero)."""
    m = attention_mask.bool()
    col = torch.arange(1, m.shape[1] + 1, device=m.device).expand_as(m)
    return torch.where(m, 0, col)


def band_window(sliding_window: int) -> int:
    """The attention `window` (|i - j| < window) of an encoder's local layer: W // 2 + 1.

    HF halves the config's window for a bidirectional model (`sliding_window // 2 + 1`, an exclusive
    bound): a query sees W // 2 keys on each side and itself, W + 1 keys in all for an even W.
    `gemma.DecoderLayer` applies the same rule; tests/test_encoder.py checks it against
    sentence-transformers, and that W // 2 and W // 2 + 2 give measurably different outputs.
    """
    return sliding_window // 2 + 1


def encoder_mask(attention_mask: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """The (B, T, T) boolean mask of an encoder layer: query i sees key j iff both are in the same
    document (`document_ids`: pads are one-token documents) and, on a local layer (sliding_window W
    given), |i - j| <= W // 2. A global layer (None) has no band. The model builds the same mask
    block by block (`attention.attention_blocks`); this whole-matrix form is for reading and drawing."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    docs = document_ids(attention_mask)
    window = None if sliding_window is None else band_window(sliding_window)
    return index_mask(idx, idx, window, causal=False, q_doc=docs, k_doc=docs)[:, 0]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' vectors: hidden (B, T, C), attention_mask (B, T) -> (B, C) float32.

    sum_t m_t h_t / sum_t m_t, with m_t = 1 for a real token (prompt, BOS and EOS included, as
    sentence-transformers' `include_prompt=True`) and 0 for a pad. A row without a real token gives 0.
    """
    m = attention_mask.to(torch.float32)[..., None]  # (B, T, 1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """MRL: the first `dim` numbers of each embedding (N, E), normalised to unit length -> (N, dim)."""
    if not 1 <= dim <= embeddings.shape[-1]:
        raise ValueError(f"dim must be in [1, {embeddings.shape[-1]}], got {dim}")
    return F.normalize(embeddings[..., :dim].float(), dim=-1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class EmbeddingGemma(Trunk):
    """Gemma 3 as a text encoder: input_ids (B, T) -> unit-length embeddings (B, E).

    The stack is the shared trunk (`trunk.Trunk`) with Gemma's own `gemma.DecoderLayer`s and the
    parameter names of `gemma.Gemma` (`embed_tokens`, `layers.{i}...`, `norm`), built from a config
    with `bidirectional=True`; there is no LM head. On top: mean pooling, the dense layers `dense.0`, `dense.1` (C -> 4C -> C, no bias,
    no activation; `dense_dims=()` leaves them out) and L2 normalisation.

    `encode(texts, ...)` tokenises, batches texts of similar length together and returns the
    embeddings in the input's order; it needs `tokenizer` (the loader sets it) and reads the task
    prompts from `prompts`.
    """

    def __init__(self, config: GemmaConfig, dense_dims: Sequence[int] = (3072, 768),
                 prompts: dict[str, str] | None = None, max_length: int | None = None, tokenizer=None,
                 mrl_dims: Sequence[int] | None = None):
        if not config.bidirectional:
            raise ValueError("an encoder needs GemmaConfig(bidirectional=True)")
        super().__init__(config, (DecoderLayer(config, i) for i in range(config.num_hidden_layers)))
        dims = [config.hidden_size, *dense_dims]
        self.dense = nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:])))
        # the widths this model was trained to embed at (MRL): a prefix it was not trained for is no embedding
        self.mrl_dims = tuple(mrl_dims) if mrl_dims else (dims[-1],)
        self.prompts = dict(prompts or {})
        self.max_length = max_length or config.max_position_embeddings
        self.tokenizer = tokenizer
        if not self.embed_tokens.weight.is_meta:
            self.reset_parameters()

    @property
    def dim(self) -> int:
        """E: the width of a full embedding."""
        return self.dense[-1].out_features if len(self.dense) else self.config.hidden_size

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> "EmbeddingGemma":
        """A fresh initialisation, as `Gemma.reset_parameters`: linears and embedding N(0, std²), norms 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.zero_()
        return self

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) True for real tokens -> final-normed states (B, T, C).

        The same trunk as `Gemma.forward`; the only addition is the documents: with padding, every
        pad is a document of its own (`document_ids`), so padding on either side changes nothing.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to hide: the masks stay the plain (cheaper) ones
        pos = make_positions(input_ids, None, attention_mask, None)  # RoPE positions count real tokens
        if attention_mask is not None:
            pos.documents = document_ids(attention_mask)
        return self.trunk(input_ids, pos)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                dim: int | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) -> unit-length embeddings (B, E) float32
        (or (B, dim): the MRL prefix, normalised again)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        return self.pool(self.hidden_states(input_ids, attention_mask), attention_mask, dim)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """Token states (B, T, C) -> the unit embedding (B, E): mean over the real tokens, the dense
        layers, L2 normalisation (then the MRL prefix `dim`, normalised again)."""
        pooled = mean_pool(hidden, attention_mask)  # (B, C) float32
        for linear in self.dense:
            pooled = linear(pooled.to(_dtype_of(linear)))
        e = F.normalize(pooled.float(), dim=-1)  # (B, E)
        return e if dim is None or dim == e.shape[-1] else truncate(e, dim)

    # ----------------------------------------------------------------------------------------
    # Text in, vectors out
    # ----------------------------------------------------------------------------------------
    def prompt_text(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The prefix for a task: a name from `prompts` ("query", "document", "Clustering", ...) or
        a literal `prompt`; neither gives no prefix."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt_name or prompt, not both")
        if prompt is not None:
            return prompt
        if prompt_name is None:
            return ""
        if prompt_name not in self.prompts:
            raise ValueError(f"unknown prompt_name {prompt_name!r}; this model knows: {', '.join(self.prompts) or 'none'}")
        return self.prompts[prompt_name]

    def tokenize(self, texts: Sequence[str], prompt_name: str | None = None, prompt: str | None = None) -> list[list[int]]:
        """Token ids as sentence-transformers makes them: BOS, prompt + text, EOS; texts longer than
        `max_length` tokens keep their first max_length - 2 pieces between BOS and EOS."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: set model.tokenizer (load_pretrained does)")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        prefix = self.prompt_text(prompt_name, prompt)
        tok = self.tokenizer
        pieces = tok.encode_batch([prefix + t for t in texts], add_bos=False, add_eos=False)
        return [[tok.bos_id, *p[:self.max_length - 2], tok.eos_id] for p in pieces]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], prompt_name: str | None = None, dim: int | None = None,
               batch_size: int = 32, prompt: str | None = None, progress: bool = False) -> torch.Tensor:
        """Embed `texts`: (N, dim) float32, each row of unit length, in the order of `texts`.

        prompt_name: None, "query", "document" or another key of `prompts`; prompt: a literal prefix.
        dim:         E (default) or an MRL prefix (512, 256, 128), normalised again.
        batch_size:  the most texts per forward pass. Texts are sorted by token count first and a
                     batch ends early rather than pad more than it computes (`length_batches`);
                     each row is padded on the right and its pads are hidden.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string (encode([text]) embeds one text)")
        dim = self.dim if dim is None else dim
        if dim not in self.mrl_dims:
            raise ValueError(f"dim={dim} is not a width this model was trained to embed at: choose one of "
                             f"{', '.join(map(str, self.mrl_dims))} (any other prefix of the vector is not an embedding)")
        ids = self.tokenize(list(texts), prompt_name, prompt)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = torch.empty(len(ids), dim)
        batches = length_batches([len(r) for r in ids], batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        device = self.norm.weight.device
        for rows in batches:
            input_ids, mask = pad_right([ids[i] for i in rows], self.tokenizer.pad_id, device)
            out[rows] = self(input_ids, mask, dim).cpu()
        return out


def compile_pointwise(model: nn.Module, dynamic: bool = True) -> nn.Module:
    """In place: `torch.compile` every RMSNorm and GeGLU of `model`, and each attention layer's QK-norm
    and RoPE (`norm_and_rotate`); returns it.

    On a CPU the matrix products are not the only cost: around them sit element-wise passes over
    every activation (a bf16 model's norms cast to float32 and back, x², the mean, the scales; GELU
    times up; RoPE's float32 copy, four products, two sums and a concatenation), each a separate
    trip through memory in eager mode. Inductor fuses each into one loop. The attention itself
    stays eager: its mask planning is Python that depends on the text length, which would recompile
    for every new length. Every norm shares one compiled graph per rank (and every GeGLU, and every
    `norm_and_rotate`, one), so compiling costs one warm-up call, not one per layer.
    """
    from .attention import GroupedQueryAttention
    from .layers import GeGLU

    for m in model.modules():
        if isinstance(m, (RMSNorm, GeGLU)):
            m.compile(dynamic=dynamic)
        elif isinstance(m, GroupedQueryAttention):
            m.norm_and_rotate = torch.compile(m.norm_and_rotate, dynamic=dynamic)
    return model


def _dtype_of(linear: nn.Module) -> torch.dtype:
    w = getattr(linear, "weight", None)
    return w.dtype if w is not None else torch.bfloat16  # quantised linears take bf16


def length_batches(lengths: Sequence[int], batch_size: int, min_fill: float = 0.95) -> list[list[int]]:
    """Indices of texts with these token counts, in batches of at most `batch_size`, longest first.

    Every row of a batch is padded to its longest, and the pads cost as much as real tokens in every
    matrix product. So a batch also ends before the real tokens would fall below `min_fill` of its
    padded B × T. Sorted texts whose lengths spread ±25% waste 11–26% of every product in batches of
    32 (the most when all the texts fit one batch); these waste at most 5%, in batches that still
    give each product hundreds of token rows, enough to run at speed.
    Longest first, so the memory peak comes at once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for i in order:
        b = batches[-1] if batches else None
        if b and len(b) < batch_size and real + lengths[i] >= min_fill * lengths[b[0]] * (len(b) + 1):
            b.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


def pad_right(rows: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids (B, T) padded on the right with pad_id, and the mask (B, T), True = real."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :len(r)] = True
    return input_ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------
# sentence-transformers folders: the name table (the loader is minigemma.pretrained.embeddinggemma_from_st_dir)
# --------------------------------------------------------------------------------------------
def st_name_table(config: GemmaConfig, dense_folders: Iterable[str]) -> dict[str, str | None]:
    """Checkpoint name -> our parameter name for a sentence-transformers folder. The transformer's
    tensors are HF Gemma 3's without the "model." prefix; Dense folder k holds "linear.weight"."""
    table = {name.removeprefix("model."): ours for name, ours in hf_name_table(config).items() if ours is not None}
    for k, folder in enumerate(dense_folders):
        table[f"{folder}/linear.weight"] = f"dense.{k}.weight"
    return table
