"""`load_pretrained`, and every loader of the package behind it.

A loader reads a format (`minigemma.weights`: GGUF, HF safetensors directories, sentence-transformers
folders), takes the config and the name table from the model's own file (gemma.py, griffin.py,
encoder.py), and builds the model the gpt-fast way:

    model   = Gemma(config) on the meta device                 names and shapes only, no memory
    weights = CheckpointRows(model, tensors, table)            the table checked both ways, nothing read
    model   = quantize(model, level, weights)                  the level's modules swapped in, then
                                                               every tensor read, a block of rows at a time

so one function (`quant.quantize`) decides what each module becomes, at every precision, and no
float32 copy of a checkpoint (or of its 262,144-row embedding) is ever held on the way to a smaller
model. The quantised models of a fetched GGUF are also saved, once, beside the file, and read back
in a fraction of a second (`read_quantized`).

    name or path                        loader
    "gemma3-270m"                       gemma_from_gguf: the fetched Q4_K_M GGUF, with Gemma 3's tokenizer
    "embeddinggemma-300m"               embeddinggemma_from_st_dir: the fetched sentence-transformers folder
    a .gguf file                        gemma_from_gguf
    a sentence-transformers folder      embeddinggemma_from_st_dir (it has a modules.json)
    an HF directory                     by config.json's model_type: gemma_from_hf_dir, griffin_from_hf_dir
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .atomic import write_atomic
from .encoder import MRL_DIMS, EmbeddingGemma, st_name_table
from .gemma import Gemma, GemmaConfig, gguf_name_table, hf_name_table, is_norm
from .griffin import Griffin, GriffinConfig, hf_transforms
from .griffin import hf_name_table as griffin_name_table
from .quant import LEVELS, Int4Linear, cast_activations, quantize
from .tokenizer import Tokenizer
from .weights import fetch
from .weights.gguf import integer_codes, read_gguf
from .weights.hf import CheckpointError, Lazy, read_config, read_safetensors
from .weights.sentence_transformers import DENSE, NORMALIZE, POOLING, TRANSFORMER, read_folder


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype = torch.float32, quant: str | None = None,
                    *, file_codes: bool = False):
    """Return (model, tokenizer).

    name_or_path: a checkpoint name ("gemma3-270m", "embeddinggemma-300m"), a .gguf file, a
                  sentence-transformers folder, or a directory with config.json + *.safetensors
                  (sharded or not) of model_type gemma2, gemma3_text or recurrent_gemma. The tokenizer
                  is the checkpoint's (the folder's tokenizer.model), or None.
    dtype:        the weights' dtype when not quantised (float32: the reference the parity tests
                  use). Norm weights stay float32, so dtype=torch.bfloat16 is the model of quant="bf16".
    quant:        a precision level of `quant.quantize`: None, "bf16", "int8" or "int4", the same
                  model with quantised modules swapped in, read from the checkpoint a tensor at a time.
    file_codes:   (GGUF only) run the file's own integer codes on the int4 kernel: every linear keeps
                  the 4-, 5-, 6- or 8-bit codes the file stores, instead of codes computed at "int4";
                  the embedding and the head are as at "int4".
    """
    check_precision(quant, file_codes)
    name = str(name_or_path)
    if name in LOADERS:
        return LOADERS[name](dtype, quant, file_codes)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ValueError(f"{name!r} is neither a known checkpoint ({', '.join(LOADERS)}) "
                         "nor an existing file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return gemma_from_gguf(path, dtype, quant, file_codes=file_codes), None
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory (config.json + *.safetensors)")
    if file_codes:
        raise ValueError(f"file_codes=True: {path} stores no integer codes of its own (a GGUF file does)")
    if (path / "modules.json").is_file():
        model = embeddinggemma_from_st_dir(path, dtype, quant)
        return model, model.tokenizer
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in HF_LOADERS:
        raise CheckpointError(f"{path}/config.json: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(HF_LOADERS)}")
    model = HF_LOADERS[model_type](path, config, dtype, quant)
    tokenizer = Tokenizer(path / "tokenizer.model") if (path / "tokenizer.model").is_file() else None
    return model, tokenizer


def check_precision(quant: str | None, file_codes: bool = False) -> None:
    """`quant` must be a level; the file's codes run on the int4 kernel, so they go with None or "int4"."""
    if quant not in LEVELS:
        raise ValueError(f"quant={quant!r}: choose from {', '.join(map(repr, LEVELS))}")
    if file_codes and quant not in (None, "int4"):
        raise ValueError(f"file_codes=True runs the file's own codes on the int4 kernel; it does not go "
                         f"with quant={quant!r}")


def at_precision(skeleton: nn.Module, weights: CheckpointRows, dtype: torch.dtype, quant: str | None,
                 codes=None) -> nn.Module:
    """The model from a meta-device `skeleton` and its `weights`: at level `quant` (the file's `codes`
    on the int4 kernel, if given), or unquantised in `dtype`. Norm weights stay float32 either way
    (`cast_activations`, which also sets the dtypes the weights are read into)."""
    if quant is None and codes is None:
        cast_activations(skeleton, dtype)
    return quantize(skeleton, "int4" if codes is not None else quant, weights, codes=codes).eval()


# ----------------------------------------------------------------------------------------------
# A checkpoint's tensors, matched to the model's by the model file's table, read a block of rows at a time
# ----------------------------------------------------------------------------------------------
def fused_parts(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """Checkpoint-side names of the tensors that fill a model's fused parameters.

    A module that stacks several projections into one (`GroupedQueryAttention.qkv_proj` from q_proj,
    k_proj and v_proj; `GeGLU.gate_up_proj` from gate_proj and up_proj) says so with a
    `fused_parts()` method. Returns {"layers.0.mlp.gate_proj.weight": ("layers.0.mlp.gate_up_proj.weight",
    first_row, end_row), ...}, for weights and, where the fused layer has one, biases.
    """
    out: dict[str, tuple[str, int, int]] = {}
    for prefix, module in model.named_modules():
        if not hasattr(module, "fused_parts"):
            continue
        p = f"{prefix}." if prefix else ""
        for part, (fused, lo, hi) in module.fused_parts().items():
            for kind in ("weight", "bias"):
                if getattr(getattr(module, fused), kind, None) is not None:
                    out[f"{p}{part}.{kind}"] = (f"{p}{fused}.{kind}", lo, hi)
    return out


def unfused_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every fused tensor split back into its parts, under the names a
    checkpoint uses ("...q_proj.weight", "...gate_proj.bias"): the inverse of what loaders fuse."""
    sd = dict(model.state_dict())
    for part, (fused, lo, hi) in fused_parts(model).items():
        sd[part] = sd[fused][lo:hi]
    for fused in {f for f, _, _ in fused_parts(model).values()}:
        del sd[fused]
    return sd


def match_names(
    model: torch.nn.Module,
    shapes: Mapping[str, tuple],
    name_map: Callable[[str], str | None],
    where: str = "checkpoint",
) -> dict[str, str]:
    """Check a checkpoint's tensor names and shapes against `model`, both ways; return the plan
    {checkpoint name: model tensor name}. Nothing is read or copied.

    name_map(checkpoint_name) -> model tensor name, or None to skip the tensor on purpose (e.g. a
    tied head stored twice). A name may also be one part of a fused parameter (`fused_parts`):
    "layers.0.self_attn.k_proj.weight" fills rows of "layers.0.self_attn.qkv_proj.weight". Tied
    tensors (one Parameter under two names, like a head tied to the embedding) are filled through
    either name. Every model tensor must be filled exactly once, every checkpoint tensor must map
    somewhere, and every shape must match; the CheckpointError lists all offenders, by the names a
    checkpoint uses. Works on a model built on the meta device.
    """
    params = dict(model.state_dict(keep_vars=True))
    parts = fused_parts(model)
    want = {name: tuple(t.shape) for name, t in params.items()}
    for part, (fused, lo, hi) in parts.items():
        want[part] = (hi - lo,) + want[fused][1:]
    aliases: dict[int, list[str]] = {}  # tied tensors (Gemma's head is the embedding) are filled once
    for name, t in params.items():
        aliases.setdefault(id(t), []).append(name)
    plan: dict[str, str] = {}
    unexpected, mismatched = [], []
    for ck_name, shape in shapes.items():
        ours = name_map(ck_name)
        if ours is None:
            continue
        if ours not in want:
            unexpected.append(ck_name)
        elif tuple(shape) != want[ours]:
            mismatched.append(f"{ck_name} {tuple(shape)} -> {ours} {want[ours]}")
        else:
            plan[ck_name] = ours
    filled = set(plan.values())
    has_parts = {fused for fused, _, _ in parts.values()}
    missing = sorted(
        name for name in want if name not in filled
        and name not in has_parts  # reported through its parts, the names a checkpoint uses
        and not (name in parts and parts[name][0] in filled)  # a fused tensor given whole
        and not (name in params and any(a in filled for a in aliases[id(params[name])])))  # tied
    problems = []
    if missing:
        problems.append(f"missing tensors for: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatch (config does not match the weights?): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: " + " | ".join(problems))
    return plan


class CheckpointRows:
    """Our tensors, read from a checkpoint a block of rows at a time: `weights` for `quant.quantize`.

    Built from `tensors` ({checkpoint name: tensor or Lazy}) and `name_map` (the model file's table),
    checked against `model` both ways and for every shape first (`match_names`; a model on the meta
    device will do). Then

        weights(name)          our tensor `name` ("layers.0.self_attn.qkv_proj.weight") as float32
                               chunks of `rows` rows (the last one shorter), in row order: a fused
                               tensor's parts one after the other (q, k, v), a tied tensor under
                               either of its names
        weights.sources(name)  the checkpoint names that fill it, in row order

    The chunk size trades memory for speed (the int8 270M from its GGUF, measured): 4,096-row chunks
    (10 MB) leave the heap fragmented, 100 MB above the model at the peak (VmHWM); 256-row chunks cost
    the float32 load twice the time, in per-call overhead; 1,024 rows keeps the peak within 30 MB of
    the smallest and the float32 load within 30% of the fastest.

    `transforms` maps one of our names (a part's, for fused tensors) to a function of its checkpoint
    tensor: a tensor in memory is transformed whole, before the shape check (it may change the shape,
    like Griffin's conv layout); a `Lazy` one chunk by chunk (it must keep the shape, like GGUF's
    `w - 1` norms).
    """

    def __init__(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor | Lazy],
                 name_map: Callable[[str], str | None], where: str = "checkpoint",
                 transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 rows: int = 1024):
        self.transforms, self.rows = dict(transforms or {}), rows
        self.tensors: dict[str, torch.Tensor | Lazy] = {}
        for ck_name, t in tensors.items():
            ours = name_map(ck_name)
            if isinstance(t, torch.Tensor) and ours in self.transforms:
                t = self.transforms[ours](t)
            self.tensors[ck_name] = t
        plan = match_names(model, {n: tuple(t.shape) for n, t in self.tensors.items()}, name_map, where)
        params = model.state_dict(keep_vars=True)
        first = {}  # a tied tensor's first name (the embedding's, not the head's)
        for name, t in params.items():
            first.setdefault(id(t), name)
        self.canonical = {name: first[id(t)] for name, t in params.items()}
        parts = fused_parts(model)
        self.pieces: dict[str, list[tuple[int, str, str]]] = {}  # our tensor -> [(first row, ck name, our part)]
        for ck_name, ours in plan.items():
            fused, lo, _ = parts.get(ours, (ours, 0, None))
            self.pieces.setdefault(self.canonical[fused], []).append((lo, ck_name, ours))
        for pieces in self.pieces.values():
            pieces.sort()

    def sources(self, name: str) -> list[str]:
        return [ck for _, ck, _ in self.pieces[self.canonical.get(name, name)]]

    def __call__(self, name: str) -> Iterator[torch.Tensor]:
        buf, n = [], 0
        for piece in self._pieces(name):
            while piece.shape[0]:  # cut and join the pieces into chunks of exactly `rows` rows
                take = min(self.rows - n, piece.shape[0])
                buf.append(piece[:take])
                n, piece = n + take, piece[take:]
                if n == self.rows:
                    yield buf[0] if len(buf) == 1 else torch.cat(buf)
                    buf, n = [], 0
        if buf:
            yield buf[0] if len(buf) == 1 else torch.cat(buf)

    def _pieces(self, name: str) -> Iterator[torch.Tensor]:
        for _, ck_name, ours in self.pieces[self.canonical.get(name, name)]:
            t, transform = self.tensors[ck_name], self.transforms.get(ours)
            for r in range(0, t.shape[0], self.rows):
                end = min(t.shape[0], r + self.rows)
                if isinstance(t, Lazy):
                    chunk = t.rows(r, end)
                    yield (transform(chunk) if transform else chunk).float()
                else:
                    yield t[r:end].float()

    def names(self) -> list[str]:
        """Every tensor of the model this fills (a tied one under its first name)."""
        return list(self.pieces)


def load_state_strict(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor | Lazy],
    name_map: Callable[[str], str | None],
    where: str = "checkpoint",
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Copy checkpoint tensors into `model` (which has its memory) through an explicit name map,
    checked both ways first (`match_names`), a block of rows at a time (`CheckpointRows`)."""
    weights = CheckpointRows(model, tensors, name_map, where, transforms)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in weights.names():
            r = 0
            for chunk in weights(name):
                params[name][r:r + chunk.shape[0]].copy_(chunk)
                r += chunk.shape[0]


# ----------------------------------------------------------------------------------------------
# GGUF -> Gemma 3, and the quantised models saved beside the file
# ----------------------------------------------------------------------------------------------
QUANTIZED_FORMAT = "4"  # bump when the quantised modules' tensors change: older saved files are rebuilt


def gemma_from_gguf(path: str | Path, dtype: torch.dtype = torch.float32, quant: str | None = None, *,
                    file_codes: bool = False, cache_key: str | None = None) -> Gemma:
    """A Gemma 3 GGUF file -> minigemma's `Gemma`, through `gemma.gguf_name_table` (norms: w - 1).

    Every weight is dequantised, a block of rows at a time, into the model at its precision (see
    `load_pretrained`); quantised, it equals quantize(gemma_from_gguf(path), quant) tensor for tensor
    (tests/test_quant.py), without a float32 copy ever existing. With file_codes, each linear keeps the
    file's own integer codes (`weights.gguf.integer_codes`).

    cache_key: the file's SHA-256, when known: the quantised model (int8, int4, the file's codes) is
               then saved beside the file (`quantized/<name>.<level>.safetensors`, written atomically,
               with the hash, the level and a format number in its header) and read from there next
               time. A saved file for another hash, level or format, or an unreadable one, is rebuilt.

    Raises CheckpointError for a truncated or corrupt file, another architecture, and (listing every
    offender) missing, unexpected or wrongly shaped tensors.
    """
    check_precision(quant, file_codes)
    path = Path(path)
    f = read_gguf(path)
    config = GemmaConfig.from_gguf(f.metadata, {n: info.shape for n, info in f.tensors.items()}, where=str(path))
    level = "int4" if file_codes else quant
    saved = None
    if cache_key is not None and level in ("int8", "int4"):
        name = "file-codes" if file_codes else level
        saved = path.parent / "quantized" / f"{path.stem}.{name}.safetensors"
        meta = {"gguf_sha256": cache_key, "level": name, "format": QUANTIZED_FORMAT}
        with torch.device("meta"):
            skeleton = Gemma(config)
        model = read_quantized(skeleton, level, saved, meta)
        if model is not None:
            return model

    with torch.device("meta"):
        model = Gemma(config)
    table = gguf_name_table(config.num_hidden_layers)
    tensors = {name: Lazy(info.shape, partial(f.rows, name)) for name, info in f.tensors.items()}
    minus_one = {ours: (lambda w: w - 1.0) for ours in table.values() if is_norm(ours)}
    weights = CheckpointRows(model, tensors, lambda n: table.get(n, f"<unmapped> {n}"), str(path), minus_one)

    def codes(name: str) -> list:  # the file's codes of our weight `name`, one triple per stacked part
        return [integer_codes(f.raw(ck), f.tensors[ck].type, f.tensors[ck].shape) for ck in weights.sources(name)]

    model = at_precision(model, weights, dtype, quant, codes if file_codes else None)
    if saved is not None:
        write_quantized(model, saved, meta)
    return model


def write_quantized(model: nn.Module, path: Path, meta: dict[str, str]) -> None:
    """Every tensor of a quantised model in one safetensors file, written atomically, `meta` in its header."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_quantized(skeleton: nn.Module, level: str, path: Path, meta: dict[str, str]) -> nn.Module | None:
    """A model saved by `write_quantized`, the gpt-fast way: `skeleton` (the float model on the meta
    device) gets the level's modules swapped in empty (`quantize` without weights), then the saved
    tensors are assigned to it, every name checked both ways and each tensor's dtype and shape. None, and the file removed, if it is
    unreadable or was written for other `meta` (another file, level or format): the caller rebuilds it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            stored = fh.metadata() or {}
        if any(stored.get(k) != v for k, v in meta.items()):
            raise ValueError(f"written for {stored}, wanted {meta}")
        state = load_file(str(path))
        model = quantize(skeleton, level)
        want = model.state_dict(keep_vars=True)
        planes = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Int4Linear)
                  for b in ("packed", "scale_zero")}
        if set(state) != set(want) or any(not _same_layout(state[k], want[k], k in planes) for k in want):
            raise ValueError("its tensors are not the level's")
        for name, t in state.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(want[name], nn.Parameter):
                module._parameters[attr] = nn.Parameter(t, requires_grad=want[name].requires_grad)
            else:
                module._buffers[attr] = t
    except (SafetensorError, OSError, ValueError, RuntimeError):
        path.unlink(missing_ok=True)
        return None
    return model.eval()


def _same_layout(saved: torch.Tensor, empty: torch.Tensor, planes_vary: bool) -> bool:
    """A saved tensor fits the skeleton's: the same dtype and shape, except where `planes_vary` (an
    Int4Linear's `packed` (P, N, K/2) and `scale_zero` (P, K/g, N, 2)): its planes P are the file's codes'
    choice, one for 4-bit codes and two for 5- to 8-bit ones, while the skeleton has one."""
    if saved.dtype != empty.dtype or saved.dim() != empty.dim():
        return False
    if planes_vary:
        return saved.shape[0] in (1, 2) and saved.shape[1:] == empty.shape[1:]
    return saved.shape == empty.shape


# ----------------------------------------------------------------------------------------------
# HF checkpoint directories -> Gemma, Griffin
# ----------------------------------------------------------------------------------------------
def gemma_from_hf_dir(path: str | Path, config: dict | None = None, dtype: torch.dtype = torch.float32,
                      quant: str | None = None) -> Gemma:
    """A Gemma from an HF checkpoint directory (config.json + safetensors, sharded or not), through
    `gemma.hf_name_table`, checked both ways and for every shape. `config`: config.json, if read."""
    check_precision(quant)
    cfg = GemmaConfig.from_hf(read_config(path) if config is None else config)
    tensors = read_safetensors(path)
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise CheckpointError(f"{path}: lm_head.weight differs from model.embed_tokens.weight; "
                              "Gemma ties them, an untied head is not supported")
    with torch.device("meta"):
        model = Gemma(cfg)
    table = hf_name_table(cfg)
    # A name missing from the table maps to a non-parameter, so match_names reports it as unexpected.
    weights = CheckpointRows(model, tensors, lambda n: table.get(n, f"<unmapped> {n}"), str(path))
    return at_precision(model, weights, dtype, quant)


def griffin_from_hf_dir(path: str | Path, config: dict | None = None, dtype: torch.dtype = torch.float32,
                        quant: str | None = None, **overrides) -> Griffin:
    """A Griffin from an HF `recurrent_gemma` checkpoint directory (config.json + safetensors), through
    `griffin.hf_name_table`, checked both ways and for every shape. `overrides` go to
    GriffinConfig.from_hf (e.g. window_edge="exclusive" to reproduce HF's forward exactly)."""
    check_precision(quant)
    cfg = GriffinConfig.from_hf(read_config(path) if config is None else config, **overrides)
    tensors = read_safetensors(path)
    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{path}: no model.embed_tokens.weight; is this an HF recurrent_gemma checkpoint?")
    with torch.device("meta"):
        model = Griffin(cfg)
    table = griffin_name_table(cfg)
    weights = CheckpointRows(model, tensors, lambda n: table.get(n, f"<unmapped> {n}"), str(path),
                             hf_transforms(cfg))
    return at_precision(model, weights, dtype, quant)


# model_type in an HF config.json -> loader(path, config_dict, dtype, quant) -> model
HF_LOADERS = {
    "gemma2": gemma_from_hf_dir,
    "gemma3_text": gemma_from_hf_dir,
    "recurrent_gemma": griffin_from_hf_dir,
}


# ----------------------------------------------------------------------------------------------
# sentence-transformers folder -> EmbeddingGemma
# ----------------------------------------------------------------------------------------------
EMBEDDINGGEMMA_PIPELINE = [TRANSFORMER, POOLING, DENSE, DENSE, NORMALIZE]


def embeddinggemma_from_st_dir(path: str | Path, dtype: torch.dtype = torch.float32,
                               quant: str | None = None) -> EmbeddingGemma:
    """An EmbeddingGemma from a sentence-transformers folder (`weights.sentence_transformers.read_folder`:
    modules.json must be Transformer -> mean Pooling (prompt included) -> Dense -> Dense -> Normalize,
    the Dense layers without bias or activation), with its prompts, max length and tokenizer. The name
    table (`encoder.st_name_table`) is checked both ways and for every shape before anything is read."""
    check_precision(quant)
    folder = read_folder(path, EMBEDDINGGEMMA_PIPELINE)
    config = GemmaConfig.from_hf(folder.config)
    if not config.bidirectional:
        raise CheckpointError(f"{folder.path}/config.json: use_bidirectional_attention is not true; not an encoder")
    tokenizer = Tokenizer(folder.tokenizer)
    with torch.device("meta"):
        # EmbeddingGemma was trained with MRL at 768, 512, 256 and 128 (its model card); another folder: its width
        mrl = MRL_DIMS if (folder.dense_dims or [config.hidden_size])[-1] == MRL_DIMS[0] else None
        model = EmbeddingGemma(config, folder.dense_dims, folder.prompts, folder.max_seq_length, tokenizer, mrl)
    table = st_name_table(config, folder.dense_folders)
    # Blocks of 4,096 rows: safetensors reads small slices slowly (256-row blocks took the float32 load
    # from 8 s to 24 s, measured); a 262,144 x 768 embedding is then 64 blocks of 12 MB.
    weights = CheckpointRows(model, folder.tensors, lambda n: table.get(n, f"<unmapped> {n}"), str(folder.path),
                             rows=4096)
    return at_precision(model, weights, dtype, quant)


# ----------------------------------------------------------------------------------------------
# The checkpoints `python -m minigemma fetch` brings
# ----------------------------------------------------------------------------------------------
def _gemma3_270m(dtype: torch.dtype, quant: str | None, file_codes: bool):
    gguf = fetch.path("gemma3-270m")  # verified against its SHA-256
    sha = fetch.CHECKPOINTS["gemma3-270m"].files[gguf.name][0]
    model = gemma_from_gguf(gguf, dtype, quant, file_codes=file_codes, cache_key=sha)
    return model, Tokenizer.from_pretrained("gemma3-270m")


def _embeddinggemma_300m(dtype: torch.dtype, quant: str | None, file_codes: bool):
    if file_codes:
        raise ValueError("file_codes=True: embeddinggemma-300m is a float32 safetensors folder, with no "
                         "integer codes of its own (gemma3-270m, a GGUF file, has them)")
    model = embeddinggemma_from_st_dir(fetch.path("embeddinggemma-300m"), dtype, quant)
    return model, model.tokenizer


# checkpoint name -> loader(dtype, quant, file_codes) -> (model, tokenizer)
LOADERS = {
    "gemma3-270m": _gemma3_270m,
    "embeddinggemma-300m": _embeddinggemma_300m,
}
