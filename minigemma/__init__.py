"""minigemma: Gemma 2, Gemma 3, RecurrentGemma and EmbeddingGemma, from scratch, in readable PyTorch.

The public API. Each name is imported lazily so `import minigemma` stays fast and a chapter
only pays for what it uses.
"""

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": "minigemma.tokenizer",
    "load_pretrained": "minigemma.pretrained",
    "generate": "minigemma.generation",
    "check": "minigemma.grading",
    "use_triton": "minigemma.kernels.swap",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minigemma' has no attribute {name!r}")


def __dir__():
    """Tab completion shows the lazy public API too."""
    return sorted(set(globals()) | set(_LAZY))
