"""`load_pretrained`: one entry point for registry names and local checkpoint directories.

Registry names are the checkpoints that `python -m minigemma fetch` brings. A local directory in
the standard HF layout is dispatched on `model_type` in its config.json; each model file owns its
loader and its explicit name table. Every loader is an ordinary function below, so an editor (or a
reader) can follow each name to its definition; the model modules are imported inside them, so
`import minigemma` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .weights.hf import CheckpointError, read_config


def _gemma_from_hf(path: Path, config: dict, dtype: torch.dtype):
    from .gemma import from_hf

    return from_hf(path, config, dtype)


def _griffin_from_hf(path: Path, config: dict, dtype: torch.dtype):
    from .griffin import from_hf

    return from_hf(path, config, dtype)


def _gemma3_270m(dtype: torch.dtype, quant: str | None):
    from .weights.gguf import load_gemma3_270m

    return load_gemma3_270m(dtype, quant)


def _embeddinggemma_300m(dtype: torch.dtype, quant: str | None):
    from .encoder import load_embeddinggemma
    from .weights.fetch import path

    model = load_embeddinggemma(path("embeddinggemma-300m"), dtype, quant)
    return model, model.tokenizer


# model_type in an HF config.json -> loader(path, config_dict, dtype) -> model
HF_LOADERS = {
    "gemma2": _gemma_from_hf,
    "gemma3_text": _gemma_from_hf,
    "recurrent_gemma": _griffin_from_hf,
}

# registry name -> loader(dtype, quant) -> (model, tokenizer)
REGISTRY = {
    "gemma3-270m": _gemma3_270m,
    "embeddinggemma-300m": _embeddinggemma_300m,
}


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype = torch.float32, quant: str | None = None):
    """Return (model, tokenizer).

    name_or_path: a registry name ("gemma3-270m", "embeddinggemma-300m"), or a directory with
                  config.json + *.safetensors (sharded or not) for model_type gemma2, gemma3_text or
                  recurrent_gemma. The tokenizer is the directory's tokenizer.model, or None.
    dtype:        the weights' dtype when not quantised (float32: the reference the parity tests use).
    quant:        None, "bf16", "int8" or "int4" (`minigemma.quant`): the fast variants, the same
                  model with quantised modules swapped in. For gemma3-270m they are built straight
                  from the GGUF file's blocks, one tensor at a time.
    """
    from .quant import LEVELS, quantize

    if quant not in LEVELS:
        raise ValueError(f"quant={quant!r}: choose from {', '.join(map(repr, LEVELS))}")
    name = str(name_or_path)
    if name in REGISTRY:
        return REGISTRY[name](dtype, quant)
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
    model = HF_LOADERS[model_type](path, config, dtype if quant is None else torch.float32)
    model = quantize(model, quant)
    tokenizer = None
    if (path / "tokenizer.model").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer(path / "tokenizer.model")
    return model, tokenizer
