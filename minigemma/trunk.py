"""The trunk every model of the course shares: embed · √C -> blocks -> final RMSNorm.

    x = embed_tokens(input_ids) · √C            (B, T, C)   √C rounded as the reference rounds it
    x = layer(x, pos, cache[i]), for each layer  (B, T, C)   every temporal block has this one call
    x = norm(x)                                  (B, T, C)

Gemma 2/3 (`gemma.Gemma`) and Griffin (`griffin.Griffin`) put the tied LM head on top (`CausalLM`);
EmbeddingGemma (`encoder.EmbeddingGemma`) puts mean pooling and dense layers there instead (`Trunk`).
Only the blocks differ: Gemma's `DecoderLayer` (attention + MLP, sandwich norms), Griffin's
`ResidualBlock` (recurrent or attention, pre-norms only), the encoder's bidirectional `DecoderLayer`.

The configs speak one small protocol, so the trunk and everything above it (training, distillation,
generation) never asks which model it holds:

    config.family       "gemma2", "gemma3" or "griffin"
    config.vocab_size   V
    config.width        C (GemmaConfig.hidden_size, GriffinConfig.width)
    config.num_layers   how many blocks
    config.rms_norm_eps the norms' epsilon
    config.logit_cap    the final logits' soft-cap (Gemma 2 and Griffin: 30), or None
    config.scales_embeddings  whether the embedding is multiplied by √C

Shapes: B batch, T new tokens, C width, V vocabulary.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .attention import Cache, Positions, make_positions
from .layers import RMSNorm, activation_dtype, check_token_ids, embedding_scale, soft_cap


class Trunk(nn.Module):
    """embed_tokens · √C -> layers -> norm: (B, T) ids -> final-normed states (B, T, C).

    Parameter names are HF's (minus "model."): `embed_tokens.weight`, `layers.{i}...`, `norm.weight`.
    A subclass builds its blocks and passes them in; `scale_rounded_in` says in which dtype √C is
    rounded (None: the activations' dtype, as Gemma; RecurrentGemma rounds it in bfloat16 always).
    """

    scale_rounded_in: torch.dtype | None = None

    def __init__(self, config, layers: Iterable[nn.Module]):
        super().__init__()
        self.config = config
        C = config.width
        # built empty (initialised by the subclass): on the meta device there is nothing to initialise
        self.embed_tokens = nn.Embedding(config.vocab_size, C, _weight=torch.empty(config.vocab_size, C))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(C, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> embed_tokens(input_ids) · √C (B, T, C), the input of the first block."""
        x = self.embed_tokens(input_ids)
        if self.config.scales_embeddings:
            x = x * embedding_scale(self.config.width, x.dtype, rounded_in=self.scale_rounded_in)
        return x

    def trunk(self, input_ids: torch.Tensor, pos: Positions, cache: Cache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, C); `pos` says where the tokens sit
        (`attention.make_positions`), `cache` holds one state per layer (or None)."""
        x = self.embed(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, None if cache is None else cache[i])
        return self.norm(x)


class CausalLM(Trunk):
    """A trunk with the tied LM head: input_ids (B, T) -> logits (B, T, V), soft-capped if the config says.

    One forward serves every use: the reference (float32, no cache), training, the prompt and the
    one-token decode step (with a cache), and the fast variants, which only swap modules in
    (`minigemma.quant`, `minigemma.kernels`). Decoding with a cache:

        cache = model.new_cache(batch=B, max_len=prompt_len + new_tokens)
        logits = model(prompt_ids, cache=cache, last_only=True)        # prefill: (B, 1, V)
        logits = model(next_ids[:, None], cache=cache, last_only=True)  # one step: (B, 1, V)

    Each call appends its T tokens to every layer's state; `cache.length` counts them.
    """

    def __init__(self, config, layers: Iterable[nn.Module]):
        super().__init__(config, layers)
        # The LM head is tied: it is the embedding matrix itself (one Parameter under two names).
        # Quantisation swaps this Linear for a quantised copy and leaves the embedding alone.
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False, device="meta")
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the head's weight the embedding's (again: moving a model off the meta device unties it)."""
        self.lm_head.weight = self.embed_tokens.weight

    def head(self) -> tuple[torch.Tensor, float | None]:
        """(W (V, C), cap): the head's weight and the final soft-cap, for a loss that applies the
        head itself, chunk by chunk (`losses.chunked_loss`). A quantised head has no such weight."""
        if not isinstance(self.lm_head, nn.Linear):
            raise ValueError(f"the LM head is quantised ({type(self.lm_head).__name__}): a loss needs the "
                             "float head; load the model with quant=None or 'bf16'")
        return self.lm_head.weight, self.config.logit_cap

    def new_cache(self, batch: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> Cache:
        """One state per layer (each block's `new_cache`: a KV cache, a ring of the window, or a
        fixed-size recurrent state). dtype and device default to the activations'."""
        dtype = dtype or activation_dtype(self)
        device = device or self.norm.weight.device
        return Cache([layer.new_cache(batch, max_len, dtype, device) for layer in self.layers], batch, device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: Cache | None = None,
                last_only: bool = False, return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (the head is the costly part).

        attention_mask: (B, S) with S = tokens already in the cache + T; False marks left padding.
        positions:      (B, T) or (T,): each token's position inside its document; a 0 after the
                        first token starts a new packed document. Default: with a mask, each token's
                        count of real tokens before it (so a left-padded prompt starts at 0); else
                        continuing from the cache.
        cache:          from `new_cache`, updated in place.
        return_hidden:  return the final-normed hidden states (B, T, C) instead of logits (a
                        chunked loss applies the head itself: `head()`).
        """
        check_token_ids(input_ids, self.config.vocab_size)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        pos = make_positions(input_ids, cache, attention_mask, positions)
        x = self.trunk(input_ids, pos, cache)  # (B, T, C)
        if last_only:
            x = x[:, -1:]
        if return_hidden:
            return x
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) -> logits (B, T, V): the tied head, then the soft-cap."""
        return soft_cap(self.lm_head(hidden), self.config.logit_cap)
