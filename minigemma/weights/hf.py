"""Reading a standard Hugging Face checkpoint directory, safely.

Layout: `config.json`, then either `model.safetensors` or shards listed in
`model.safetensors.index.json`, and optionally `tokenizer.model`. Only safetensors is read:
pickled `*.bin` / `*.pt` files are refused, never unpickled.

This module only reads: it knows no model. Each model file (gemma.py, griffin.py, encoder.py) owns
the table from checkpoint names to its parameter names, and `minigemma.pretrained` checks that table
both ways and builds the model (`CheckpointRows`, `quant.quantize`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file or tensor and why."""


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; expected an HF checkpoint directory "
                              "(config.json + *.safetensors)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (f" Found pickle files ({', '.join(pickles)}), which are never loaded: convert them to "
            "safetensors." if pickles else "")
    raise CheckpointError(f"{path}: no *.safetensors weights.{hint}")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all shards), by its checkpoint name."""
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot be read as safetensors (truncated or corrupt?): {e}") from e
        tensors.update(shard)
    return tensors


class Lazy:
    """A checkpoint tensor not read yet: its shape, and how to read rows start..end of it (e.g.
    dequantise those rows of a GGUF block tensor, or read them from a safetensors file). Loaders hand
    these to `CheckpointRows`, which reads one block of rows at a time, so a whole float32 copy of the
    checkpoint, or even of its 262,144-row embedding, never exists."""

    def __init__(self, shape, rows: Callable[[int, int], torch.Tensor]):
        self.shape, self.rows = tuple(shape), rows

    def read(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])
