"""Triton kernels, imported as `minigemma.kernels` (never as a top-level `kernels`, a name PyPI already uses).

Each kernel sits beside its torch reference, its test and its benchmark.
"""
