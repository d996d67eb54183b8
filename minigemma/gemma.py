"""Gemma 2 and Gemma 3 (text): one decoder-only model, built from a config.

The two generations share one block (chapter 03):

    h   = x + post_attention_norm(attention(input_norm(x)))
    out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))

and differ only in config values (chapter 04):

    Gemma 2: local and global layers alternate 1:1 (window 4096); attention logits soft-capped
             at 50 and final logits at 30; RoPE base 10k everywhere.
    Gemma 3: 5 local layers to 1 global (window 512 or 1024); QK-norm instead of soft-capping;
             RoPE base 10k on local layers, 1M on global ones, linearly scaled (x8) on 4B and up.

Each layer reads its type ("sliding_attention" or "full_attention") from `config.layer_types`;
nothing else depends on the family. Parameter names follow HF's (minus the "model." prefix):
`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`, `layers.{i}.input_layernorm.weight`,
`norm.weight`, ... The LM head is the embedding matrix (tied).

Shapes: B batch, T new tokens, S keys, C hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .attention import GroupedQueryAttention, Positions, positions_after
from .layers import GeGLU, RMSNorm
from .trunk import CausalLM
from .weights.hf import CheckpointError

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_pattern(num_layers: int, every: int) -> list[str]:
    """Layer types where every `every`-th layer is global: layer i is global iff (i + 1) % every == 0.

    every=2 is Gemma 2 (local, global, local, ...); every=6 is Gemma 3 (5 local : 1 global);
    every=1 makes every layer global.
    """
    return [FULL if (i + 1) % every == 0 else SLIDING for i in range(num_layers)]


@dataclass
class GemmaConfig:
    """Everything that defines a Gemma 2 / Gemma 3 text model. Field names follow HF's configs."""

    vocab_size: int
    hidden_size: int  # C
    intermediate_size: int  # MLP width
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # K (H = K: multi-head, K = 1: multi-query)
    head_dim: int  # D
    layer_types: list[str]  # per layer: "sliding_attention" (local) or "full_attention" (global)
    sliding_window: int  # W: a local query sees its last W keys, itself included
    query_pre_attn_scalar: float  # attention scale = query_pre_attn_scalar ** -0.5
    family: str = "gemma3"  # "gemma2" or "gemma3": a label only, behaviour comes from the fields
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # RoPE base of global layers
    rope_local_base_freq: float = 10_000.0  # RoPE base of local layers
    rope_scaling_factor: float = 1.0  # linear RoPE scaling of global layers (1.0 = none)
    attn_logit_softcapping: float | None = None  # Gemma 2: 50
    final_logit_softcapping: float | None = None  # Gemma 2: 30
    use_qk_norm: bool = False  # Gemma 3
    max_position_embeddings: int = 8192
    sandwich_norm: bool = True  # norms after attention and MLP too; False: pre-norms only (an ablation)
    bidirectional: bool = False  # an encoder (EmbeddingGemma): no causal mask; local layers see a band

    def __post_init__(self):
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.family not in ("gemma2", "gemma3"):
            raise ValueError(f"family must be 'gemma2' or 'gemma3', got {self.family!r}")

    # The protocol every model config speaks (see trunk.py): the same question, one name.
    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def logit_cap(self) -> float | None:
        return self.final_logit_softcapping

    @property
    def scales_embeddings(self) -> bool:
        return True

    @classmethod
    def from_hf(cls, cfg: dict) -> "GemmaConfig":
        """Translate an HF config.json dict (model_type gemma2 or gemma3_text), old or new style."""
        model_type = cfg.get("model_type")
        if model_type not in ("gemma2", "gemma3_text"):
            hint = " (a multimodal checkpoint: only its text model is supported)" if model_type == "gemma3" else ""
            raise CheckpointError(f"config.json: model_type {model_type!r} is not gemma2 or gemma3_text{hint}")
        gemma3 = model_type == "gemma3_text"

        def need(key):
            if key not in cfg:
                raise CheckpointError(f"config.json ({model_type}) lacks {key!r}")
            return cfg[key]

        if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise CheckpointError(f"config.json: hidden_activation {cfg['hidden_activation']!r} is not supported")
        for key, ok in (("tie_word_embeddings", True), ("attention_bias", False)):
            if bool(cfg.get(key, ok)) != ok:
                raise CheckpointError(f"config.json: {key}={cfg[key]!r} is not supported (Gemma uses {ok})")

        n_layers = need("num_hidden_layers")
        layer_types = cfg.get("layer_types") or layer_pattern(n_layers, cfg.get("sliding_window_pattern",
                                                                                 6 if gemma3 else 2))
        global_theta, local_theta, factor = _rope_from_hf(cfg, gemma3)
        return cls(
            family="gemma3" if gemma3 else "gemma2",
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=need("num_key_value_heads"),
            head_dim=cfg.get("head_dim") or need("hidden_size") // need("num_attention_heads"),
            layer_types=layer_types,
            sliding_window=need("sliding_window"),
            query_pre_attn_scalar=need("query_pre_attn_scalar"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=global_theta,
            rope_local_base_freq=local_theta,
            rope_scaling_factor=factor,
            # Gemma 3 replaced attention soft-capping by QK-norm; HF's Gemma 3 ignores this field.
            attn_logit_softcapping=None if gemma3 else cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            use_qk_norm=gemma3,
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            bidirectional=bool(cfg.get("use_bidirectional_attention", False)),  # EmbeddingGemma
        )

    @classmethod
    def from_gguf(cls, metadata: dict, shapes: dict[str, tuple], where: str = "GGUF file") -> "GemmaConfig":
        """A Gemma 3 config from a GGUF header: its `gemma3.*` metadata, the embedding's shape in
        `shapes` ({tensor name: shape}, PyTorch order), and the Gemma 3 facts the header omits (the
        5 : 1 local/global pattern, the local layers' RoPE base, query_pre_attn_scalar = head_dim)."""
        arch = metadata.get("general.architecture")
        if arch != "gemma3":
            raise CheckpointError(f"{where}: architecture {arch!r}; only 'gemma3' GGUF files are supported")

        def need(key):
            if f"gemma3.{key}" not in metadata:
                raise CheckpointError(f"{where}: metadata lacks 'gemma3.{key}'")
            return metadata[f"gemma3.{key}"]

        if "token_embd.weight" not in shapes:
            raise CheckpointError(f"{where}: no token_embd.weight tensor")
        n_layers, head_dim = int(need("block_count")), int(need("attention.key_length"))
        if int(metadata.get("gemma3.attention.value_length", head_dim)) != head_dim:
            raise CheckpointError(f"{where}: key_length != value_length is not supported")
        if metadata.get("gemma3.rope.scaling.type", "none") not in ("none", "linear"):
            raise CheckpointError(f"{where}: RoPE scaling {metadata['gemma3.rope.scaling.type']!r} is not supported")
        return cls(
            family="gemma3",
            vocab_size=shapes["token_embd.weight"][0],
            hidden_size=int(need("embedding_length")),
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=n_layers,
            num_attention_heads=int(need("attention.head_count")),
            num_key_value_heads=int(need("attention.head_count_kv")),
            head_dim=head_dim,
            layer_types=layer_pattern(n_layers, 6),  # not in the header: Gemma 3's 5 local : 1 global
            sliding_window=int(need("attention.sliding_window")),
            query_pre_attn_scalar=head_dim,  # not in the header; llama.cpp scales by head_dim**-0.5 too
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(need("rope.freq_base")),  # the global layers' base
            rope_local_base_freq=10_000.0,  # not in the header
            rope_scaling_factor=float(metadata.get("gemma3.rope.scaling.factor", 1.0)),
            use_qk_norm=True,
            max_position_embeddings=int(need("context_length")),
        )


def _rope_from_hf(cfg: dict, gemma3: bool) -> tuple[float, float, float]:
    """(global base, local base, global linear factor) from either HF config style.

    Old style: rope_theta, rope_local_base_freq, rope_scaling={"rope_type": "linear", "factor": 8}.
    New style (transformers 5): rope_parameters, per layer type for Gemma 3, one dict for Gemma 2.
    """
    params = cfg.get("rope_parameters")
    if params and gemma3:
        glob, loc = params.get(FULL) or {}, params.get(SLIDING) or {}
    elif params:
        glob = loc = params
    else:
        glob = dict(cfg.get("rope_scaling") or {})
        glob["rope_theta"] = cfg.get("rope_theta", 1_000_000.0 if gemma3 else 10_000.0)
        loc = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0) if gemma3 else glob["rope_theta"]}
    for which, p in (("global", glob), ("local", loc)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise CheckpointError(f"config.json: {which} RoPE type {kind!r} is not supported (default or linear)")
    if loc.get("rope_type", loc.get("type", "default")) == "linear" and loc.get("factor", 1.0) != 1.0:
        raise CheckpointError("config.json: RoPE scaling on local layers is not supported")
    factor = glob.get("factor", 1.0) if glob.get("rope_type", glob.get("type")) == "linear" else 1.0
    default_global = 1_000_000.0 if gemma3 else 10_000.0
    return float(glob.get("rope_theta", default_global)), float(loc.get("rope_theta", 10_000.0)), float(factor)


# --------------------------------------------------------------------------------------------
# Presets: the published configs (HF config.json / text_config of each checkpoint)
# --------------------------------------------------------------------------------------------
def _gemma2(hidden, inter, layers, heads, kv, head_dim, qpas) -> GemmaConfig:
    return GemmaConfig(family="gemma2", vocab_size=256_000, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, layer_types=layer_pattern(layers, 2), sliding_window=4096,
                       query_pre_attn_scalar=qpas, rope_theta=10_000.0, rope_local_base_freq=10_000.0,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192)


def _gemma3(vocab, hidden, inter, layers, heads, kv, head_dim, qpas, window, scaling, context) -> GemmaConfig:
    return GemmaConfig(family="gemma3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, layer_types=layer_pattern(layers, 6), sliding_window=window,
                       query_pre_attn_scalar=qpas, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                       rope_scaling_factor=scaling, use_qk_norm=True, max_position_embeddings=context)


PRESETS: dict[str, GemmaConfig] = {
    #                   hidden  inter  layers heads kv head_dim qpas
    "gemma2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),
    #                    vocab  hidden  inter  layers heads kv head_dim qpas window scaling context
    "gemma3-270m": _gemma3(262_144, 640, 2048, 18, 4, 1, 256, 256, 512, 1.0, 32_768),
    "gemma3-1b": _gemma3(262_144, 1152, 6912, 26, 4, 1, 256, 256, 512, 1.0, 32_768),
    # 4B and up are multimodal checkpoints; this is their text_config (vocabulary with image tokens).
    "gemma3-4b": _gemma3(262_208, 2560, 10240, 34, 8, 4, 256, 256, 1024, 8.0, 131_072),
    "gemma3-12b": _gemma3(262_208, 3840, 15360, 48, 16, 8, 256, 256, 1024, 8.0, 131_072),
    "gemma3-27b": _gemma3(262_208, 5376, 21504, 62, 32, 16, 128, 168, 1024, 8.0, 131_072),
}


def preset(name: str, **overrides) -> GemmaConfig:
    """A copy of a published config, e.g. preset("gemma3-270m", num_hidden_layers=2)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        overrides["layer_types"] = layer_pattern(overrides["num_hidden_layers"], 2 if cfg.family == "gemma2" else 6)
    return replace(cfg, **overrides)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """One Gemma 2/3 block, local or global as `config.layer_types[layer_idx]` says.

    x (B, T, C) -> (B, T, C). Norms sit both before and after attention and the MLP ("sandwich"
    norms): the post-norm bounds what each sub-layer adds to the residual stream.
    """

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_type = c.layer_types[layer_idx]
        local = self.layer_type == SLIDING
        # A decoder's local query sees its last W keys. An encoder's sees the band |i - j| <= W // 2
        # (HF's EmbeddingGemma: window W // 2 + 1, exclusive; checked in tests/test_encoder.py).
        window = (c.sliding_window // 2 + 1 if c.bidirectional else c.sliding_window) if local else None
        self.self_attn = GroupedQueryAttention(
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            scale=c.query_pre_attn_scalar ** -0.5,
            window=window,
            causal=not c.bidirectional,
            softcap=c.attn_logit_softcapping,
            qk_norm=c.use_qk_norm, eps=c.rms_norm_eps,
            rope_base=c.rope_local_base_freq if local else c.rope_theta,
            rope_scaling=1.0 if local else c.rope_scaling_factor,
        )
        self.mlp = GeGLU(c.hidden_size, c.intermediate_size)
        post_norm = (lambda: RMSNorm(c.hidden_size, c.rms_norm_eps)) if c.sandwich_norm else nn.Identity
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = post_norm()
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = post_norm()

    def new_cache(self, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        """This layer's KV cache: all the keys for a global layer, a ring of the window for a local one."""
        return self.self_attn.new_cache(batch, max_len, dtype, device)

    def forward(self, x: torch.Tensor, pos: Positions | None = None, cache=None) -> torch.Tensor:
        """x (B, T, C); pos: where the tokens sit (default: after what the cache holds); cache: this
        layer's KV cache (or None)."""
        pos = pos or positions_after(cache, x.shape[0], x.shape[1], x.device)
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), pos, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma(CausalLM):
    """Gemma 2 / Gemma 3 causal language model: input_ids (B, T) -> logits (B, T, V).

    The shared trunk (`trunk.CausalLM`: embed · √C, the layers, the final norm, the tied head, one
    forward for every use) with Gemma's `DecoderLayer`s. Batched prompts of different lengths are
    left-padded and described by `attention_mask` (B, tokens seen including these T), True for real
    tokens; see `CausalLM.forward` for the call and `new_cache` for decoding.
    """

    def __init__(self, config: GemmaConfig):
        super().__init__(config, (DecoderLayer(config, i) for i in range(config.num_hidden_layers)))
        if not self.embed_tokens.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> "Gemma":
        """A fresh initialisation for training, as HF's Gemma does: every linear and the embedding
        N(0, std²) (std = initializer_range, 0.02), norm weights 0 (a (1 + w) scale of 1)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m is not self.lm_head:
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.zero_()
        return self


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def kv_cache_bytes(config: GemmaConfig, T: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the KV cache after T tokens: global layers keep all T, local layers min(T, W).

    2 (k and v) · batch · K · D · bytes · (n_global · T + n_local · min(T, W)).
    """
    n_global = sum(t == FULL for t in config.layer_types)
    n_local = config.num_hidden_layers - n_global
    per_token = 2 * batch * config.num_key_value_heads * config.head_dim * dtype.itemsize
    return per_token * (n_global * T + n_local * min(T, config.sliding_window))


# --------------------------------------------------------------------------------------------
# HF checkpoints: the name table (the loader is minigemma.pretrained.gemma_from_hf_dir)
# --------------------------------------------------------------------------------------------
_LAYER_TENSORS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
]


def hf_name_table(config: GemmaConfig) -> dict[str, str | None]:
    """HF checkpoint name -> our parameter name (None: skipped on purpose)."""
    table: dict[str, str | None] = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": None,  # tied to the embedding; a loader checks the two are equal
    }
    per_layer = _LAYER_TENSORS + (["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if config.use_qk_norm else [])
    for i in range(config.num_hidden_layers):
        for name in per_layer:
            table[f"model.layers.{i}.{name}"] = f"layers.{i}.{name}"
    return table


# --------------------------------------------------------------------------------------------
# llama.cpp's GGUF files of Gemma 3: names and conventions
# --------------------------------------------------------------------------------------------
# llama.cpp's converter (convert_hf_to_gguf.py) changes a Gemma checkpoint in ways a loader must undo.
# Each was found by comparing with HF transformers' own GGUF loader on the real file, not guessed
# (tests/test_gguf.py keeps checking them):
#
# * names: `blk.{i}.attn_q.weight` for `layers.{i}.self_attn.q_proj.weight` etc. (`gguf_name_table`);
# * every RMSNorm weight is stored with Gemma's `1 +` folded in (`1 + w`): a loader subtracts 1 (`is_norm`);
# * nothing else: no row permutation of q/k (unlike llama.cpp's Llama conversion), the embedding is
#   stored unscaled, and the LM head is not stored at all (tied to `token_embd`);
# * the header omits what a Gemma 3 loader must know anyway (`GemmaConfig.from_gguf` supplies it).

# llama.cpp name (per layer, after "blk.{i}.") -> our name (after "layers.{i}.")
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


def gguf_name_table(n_layers: int) -> dict[str, str]:
    """Every llama.cpp tensor name of a Gemma 3 GGUF -> our parameter name. There is no
    `output.weight`: the head is tied to `token_embd.weight`."""
    table = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    for i in range(n_layers):
        for theirs, ours in GGUF_LAYER_NAMES.items():
            table[f"blk.{i}.{theirs}"] = f"layers.{i}.{ours}"
    return table


def is_norm(name: str) -> bool:
    """Our RMSNorm weights: stored by llama.cpp as 1 + w."""
    return name.endswith(("norm.weight", "layernorm.weight"))
