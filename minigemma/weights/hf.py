"""Reading a standard Hugging Face checkpoint directory, safely.

Layout: `config.json`, then either `model.safetensors` or shards listed in
`model.safetensors.index.json`, and optionally `tokenizer.model`. Only safetensors is read:
pickled `*.bin` / `*.pt` files are refused, never unpickled.

Each model file (gemma.py, griffin.py, ...) owns one explicit table from checkpoint names to its
own parameter names; `load_state_strict` applies it and checks it in both directions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

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


def load_state_strict(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    name_map: Callable[[str], str | None],
    where: str = "checkpoint",
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Copy checkpoint tensors into `model` through an explicit name map, checked both ways.

    name_map(checkpoint_name) -> model parameter name, or None to skip the tensor on purpose
    (e.g. a tied head stored twice). Every model parameter must be filled exactly once, every
    checkpoint tensor must map somewhere, and every shape must match; errors list all offenders.
    """
    transforms = transforms or {}
    params = dict(model.state_dict())
    filled: set[str] = set()
    unexpected, mismatched = [], []
    mapped: dict[str, torch.Tensor] = {}
    for ck_name, t in tensors.items():
        ours = name_map(ck_name)
        if ours is None:
            continue
        if ours not in params:
            unexpected.append(ck_name)
            continue
        if ours in transforms:
            t = transforms[ours](t)
        if tuple(t.shape) != tuple(params[ours].shape):
            mismatched.append(f"{ck_name} {tuple(t.shape)} -> {ours} {tuple(params[ours].shape)}")
            continue
        mapped[ours] = t
        filled.add(ours)
    missing = sorted(set(params) - filled - _non_persistent(model))
    problems = []
    if missing:
        problems.append(f"missing tensors for: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatch (config does not match the weights?): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: " + " | ".join(problems))
    with torch.no_grad():
        for name, t in mapped.items():
            params[name].copy_(t.to(params[name].dtype))


def _non_persistent(model: torch.nn.Module) -> set[str]:
    """state_dict keys that are derived (e.g. tied weights listed twice) rather than loaded."""
    tied = getattr(model, "_tied_state_keys", ())
    return set(tied)
