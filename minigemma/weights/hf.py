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


def empty_model(cls, config, dtype: torch.dtype = torch.float32, device="cpu") -> torch.nn.Module:
    """`cls(config)` in `dtype` with uninitialised memory: built on the meta device (no memory, no
    random init for weights a loader overwrites anyway), then given real storage. Tied weights are
    re-tied (`tie_weights`), since leaving the meta device gives every Parameter new storage."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


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


class Lazy:
    """A checkpoint tensor not read yet: its shape, and how to read it (e.g. dequantise a GGUF block
    tensor). Loaders hand these to `load_state_strict`, which reads one tensor at a time while copying,
    so a whole float32 copy of the checkpoint never exists."""

    def __init__(self, shape, read: Callable[[], torch.Tensor]):
        self.shape, self.read = tuple(shape), read


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


def load_state_strict(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor | Lazy],
    name_map: Callable[[str], str | None],
    where: str = "checkpoint",
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Copy checkpoint tensors into `model` through an explicit name map, checked both ways first
    (`match_names`). `transforms` maps a model tensor name to a function applied to its checkpoint
    tensor (applied before the shape check for tensors in memory; `Lazy` ones must keep their shape).
    `Lazy` tensors are read one at a time while copying.
    """
    transforms = transforms or {}
    ready = {}
    for ck_name, t in tensors.items():
        ours = name_map(ck_name)
        if isinstance(t, torch.Tensor) and ours in transforms:
            t = transforms[ours](t)
        ready[ck_name] = t
    plan = match_names(model, {n: tuple(t.shape) for n, t in ready.items()}, name_map, where)
    params = dict(model.state_dict(keep_vars=True))
    parts = fused_parts(model)
    with torch.no_grad():
        for ck_name, ours in plan.items():
            t = ready[ck_name]
            if isinstance(t, Lazy):
                t = t.read()
                if ours in transforms:
                    t = transforms[ours](t)
            fused, lo, hi = parts.get(ours, (ours, None, None))
            target = params[fused] if lo is None else params[fused][lo:hi]
            target.copy_(t.to(target.dtype))
