"""`load_pretrained`: one entry point for registry names and local checkpoint directories.

Registry names are the checkpoints that `python -m minigemma fetch` brings. A local directory in
the standard HF layout is dispatched on `model_type` in its config.json; each model file owns its
loader and its explicit name table.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .weights.hf import CheckpointError, read_config

# model_type in an HF config.json -> "module:function(path, config_dict, dtype) -> model"
HF_LOADERS: dict[str, str] = {
    "gemma2": "minigemma.gemma:from_hf",
    "gemma3_text": "minigemma.gemma:from_hf",
    "recurrent_gemma": "minigemma.griffin:from_hf",
}

# registry name -> "module:function(dtype) -> (model, tokenizer)"
REGISTRY: dict[str, str] = {
    "gemma3-270m": "minigemma.weights.gguf:load_gemma3_270m",
    "embeddinggemma-300m": "minigemma.encoder:load_embeddinggemma",
}


def _resolve(target: str, what: str):
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise NotImplementedError(f"{what}: the course has not built {module} yet") from e
    if not hasattr(mod, func):
        raise NotImplementedError(f"{what}: {module}.{func} is not built yet")
    return getattr(mod, func)


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer).

    name_or_path: a registry name ("gemma3-270m", "embeddinggemma-300m"), or a directory with
    config.json + *.safetensors (sharded or not) for model_type gemma2, gemma3_text or
    recurrent_gemma. The tokenizer is the directory's tokenizer.model, or None if it has none.
    """
    name = str(name_or_path)
    if name in REGISTRY:
        return _resolve(REGISTRY[name], name)(dtype=dtype)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ValueError(f"{name!r} is neither a known checkpoint ({', '.join(REGISTRY)}) "
                         "nor an existing directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory (config.json + *.safetensors)")
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in HF_LOADERS:
        raise CheckpointError(f"{path}/config.json: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(HF_LOADERS)}")
    model = _resolve(HF_LOADERS[model_type], f"model_type {model_type}")(path, config, dtype)
    tokenizer = None
    if (path / "tokenizer.model").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer(path / "tokenizer.model")
    return model, tokenizer
