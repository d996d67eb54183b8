"""Reading a sentence-transformers folder (EmbeddingGemma's format), safely.

    modules.json                        the pipeline, in order: [{"type": ..., "path": ...}, ...]
    config.json, model.safetensors      the transformer: an HF config, and its tensors without "model."
    1_Pooling/config.json               pooling_mode_mean_tokens, include_prompt, ...
    2_Dense/config.json                 in_features, out_features, bias, activation_function
    2_Dense/model.safetensors           "linear.weight" (out, in)   (and 3_Dense/, ...)
    config_sentence_transformers.json   the task prompts
    sentence_bert_config.json           max_seq_length
    tokenizer.model                     SentencePiece

`read_folder(path, pipeline)` reads and checks all of it, and no tensor: it returns the configs, the
prompts, and every tensor as a `weights.hf.Lazy` (its shape, and its rows on demand). Only what
minigemma's encoder computes is accepted: mean pooling over every token (the prompt included) and
Dense layers without bias or activation; anything else is refused with the reason. Only safetensors
files are read, never a pickle. This file knows the format, not the model: which tensor is which
parameter is `encoder.st_name_table`'s business, and `minigemma.pretrained` builds the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .hf import CheckpointError, Lazy, read_config

MODULE = "sentence_transformers.models."
TRANSFORMER, POOLING, DENSE, NORMALIZE = (MODULE + k for k in ("Transformer", "Pooling", "Dense", "Normalize"))


@dataclass
class Folder:
    """A checked sentence-transformers folder; nothing of its weights read yet."""

    path: Path
    config: dict  # the transformer's config.json
    dense_folders: list[str]  # each Dense module's folder, in pipeline order
    dense_dims: list[int]  # and its out_features
    prompts: dict[str, str]  # prompt name -> prefix ("query" -> "task: search result | query: ")
    max_seq_length: int | None
    tokenizer: Path  # tokenizer.model
    tensors: dict[str, Lazy] = field(repr=False)  # "name" (transformer) or "2_Dense/linear.weight"


def read_json(path: Path) -> dict | list:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected a sentence-transformers folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_folder(path: str | Path, pipeline: list[str]) -> Folder:
    """Read and check a sentence-transformers folder whose modules.json must list exactly `pipeline`
    (module types, e.g. [TRANSFORMER, POOLING, DENSE, DENSE, NORMALIZE])."""
    path = Path(path).expanduser()
    modules = read_json(path / "modules.json")
    kinds = [m.get("type") for m in modules]
    if kinds != pipeline:
        raise CheckpointError(f"{path}/modules.json: pipeline {kinds} is not {pipeline}")
    dense_folders, dense_dims = [], []
    for m in modules:
        if m["type"] == POOLING:
            pooling = read_json(path / m["path"] / "config.json")
            if not pooling.get("pooling_mode_mean_tokens") or not pooling.get("include_prompt", True):
                raise CheckpointError(f"{path}/{m['path']}: only mean pooling over every token (prompt "
                                      f"included) is supported, got {pooling}")
        elif m["type"] == DENSE:
            cfg = read_json(path / m["path"] / "config.json")
            if cfg.get("bias", True) or not cfg.get("activation_function", "").endswith("Identity"):
                raise CheckpointError(f"{path}/{m['path']}: only a Dense without bias or activation is "
                                      f"supported, got {cfg}")
            dense_folders.append(m["path"])
            dense_dims.append(cfg["out_features"])
    config = read_config(path)
    prompts = dict(read_json(path / "config_sentence_transformers.json").get("prompts") or {})
    max_length = read_json(path / "sentence_bert_config.json").get("max_seq_length")
    if not (path / "tokenizer.model").is_file():
        raise CheckpointError(f"{path}: no tokenizer.model")
    return Folder(path, config, dense_folders, dense_dims, prompts, max_length, path / "tokenizer.model",
                  list_tensors(path, dense_folders))


def list_tensors(path: Path, dense_folders: list[str]) -> dict[str, Lazy]:
    """Every tensor of the transformer ("name") and of each Dense ("2_Dense/linear.weight"): its
    shape, read from the safetensors header, and its rows on demand (`read_rows`)."""
    from safetensors import SafetensorError, safe_open

    files = {"": path / "model.safetensors", **{d: path / d / "model.safetensors" for d in dense_folders}}
    tensors = {}
    for prefix, f in files.items():
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (only safetensors weights are read)")
        try:
            with safe_open(str(f), "pt") as handle:
                for name in handle.keys():
                    shape = tuple(handle.get_slice(name).get_shape())
                    tensors[f"{prefix}/{name}" if prefix else name] = Lazy(shape, partial(read_rows, f, name))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot be read as safetensors (truncated or corrupt?): {e}") from e
    return tensors


def read_rows(file: Path, name: str, start: int, end: int) -> torch.Tensor:
    """Rows start..end-1 of tensor `name` of a safetensors file. The file is opened for each block,
    so only that block is ever mapped into memory: loading holds the model and one block, never a
    second copy of the 1.2 GB of weights."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return handle.get_slice(name)[start:end]
