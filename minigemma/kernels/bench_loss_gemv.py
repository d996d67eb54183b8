"""The harness's entries for the fused head + loss and the int8/int4 decode GEMV (`python -m minigemma.kernels.bench`).

kernels/bench.py imports this module once, after its own entries; it registers into the bench module
the report is read from: `minigemma.kernels.bench`, or `__main__` when that file runs as
`python -m minigemma.kernels.bench` (the same source executed under another name).

    fused_linear_cross_entropy   h (N, C) -> head (V, C) -> cross-entropy, fwd and fwd+bwd, peak memory
    kd_full / kd_sampled         chapter 09's distillation losses on the same fused head, fwd+bwd, peak memory
    gemv_int8 / gemv_int4        weight-only decode products at M = 1 and 32, in the quantised modules' bytes

Implementations: eager = the plain full-logit loss (or dequantise-then-matmul for the GEMVs, what torch
does without a kernel for these layouts), compile = the same under torch.compile, chunked = the
package's own `losses.chunked_loss`, ours = the Triton kernels, liger = Liger-Kernel's fused linear
cross-entropy, bf16 = the unquantised product in the run's dtype (bf16 on a GPU, float32 with --cpu: what the GEMV's
bytes are saved against), module = the quantised module's own forward (torch's CPU kernels: timed only
with --cpu). The GEMVs' GB/s count the bytes of the quantised weights, x and y, for every implementation.
"""

from __future__ import annotations

import sys

import torch


def _bench():
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == "minigemma.kernels.bench":
        return main
    return sys.modules["minigemma.kernels.bench"]


B = _bench()

# ---- the fused head + loss --------------------------------------------------------------------
LOSS_SIZES = {  # size -> (N rows = B·T, C student, V, C teacher)
    "gemma3": {"gpu": (4096, 640, 262_144, 1152), "cpu": (256, 640, 32_768, 1152), "tiny": (7, 16, 300, 12)},
    "gemma2": {"gpu": (2048, 2304, 256_000, 3584), "cpu": (128, 2304, 16_384, 3584), "tiny": (6, 24, 200, 12)},
}


def _loss_make(model: str, kind: str, cap: float | None):
    def make(device, dtype, size):
        N, C, V, C_T = LOSS_SIZES[model][size]
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, C, generator=g).to(device, dtype)
        w = (0.05 * torch.randn(V, C, generator=g)).to(device, dtype)
        out = {"h": h, "w": w, "cap": cap, "kind": kind}
        y = torch.randint(0, V, (N,), generator=g)
        y[:: 17] = -100  # some positions not scored (padding, document ends)
        out["y"] = y.to(device)
        if kind == "sampled":  # Gemma 3: 256 ids per position from the teacher, their renormalised probabilities
            k = min(256, V // 2)
            start = torch.randint(0, V, (N, 1), generator=g)
            out["ids"] = ((start + (V // k) * torch.arange(k)) % V).to(device)  # k distinct ids per row
            out["p"] = torch.softmax(torch.randn(N, k, generator=g), -1).to(device)
        if kind == "full":  # Gemma 2: the teacher's whole distribution, from its hidden states and head
            out["ht"] = torch.randn(N, C_T, generator=g).to(device, dtype)
            out["wt"] = (0.05 * torch.randn(V, C_T, generator=g)).to(device, dtype)
        return out
    return make


def _target(inputs):
    from minigemma.losses import Labels, Sampled, TeacherHead

    kind = inputs["kind"]
    if kind == "labels":
        return Labels(inputs["y"])
    if kind == "sampled":
        return Sampled(inputs["ids"], inputs["p"])
    return TeacherHead(inputs["ht"], inputs["wt"], inputs["cap"])


def _eager_loss(h, w, inputs):
    """The plain full-logit loss: every (N, V) logit materialised, autograd through all of it."""
    from minigemma import losses
    from minigemma.layers import soft_cap

    z = soft_cap(h @ w.T, inputs["cap"])
    if inputs["kind"] == "labels":
        return losses.cross_entropy(z, inputs["y"])
    if inputs["kind"] == "sampled":
        return losses.sampled_kd_loss(z, inputs["ids"], inputs["p"])
    return losses.kd_loss(z, soft_cap(inputs["ht"] @ inputs["wt"].T, inputs["cap"]))


def _loss_impls(backward: bool):
    from minigemma import losses

    from .fused_linear_loss import fused_linear_loss

    def wrap(run):
        def factory(inputs):
            if not backward:
                def fwd():
                    with torch.no_grad():
                        return run(inputs["h"], inputs["w"], inputs)
                return fwd
            h, w = inputs["h"].detach().requires_grad_(), inputs["w"].detach().requires_grad_()
            return B.fwd_bwd(lambda: run(h, w, inputs), [h, w])
        return factory

    def chunked(h, w, inputs):
        return losses.chunked_loss(h, w, _target(inputs), inputs["cap"])

    def ours(h, w, inputs):
        return fused_linear_loss(h, w, _target(inputs), inputs["cap"])

    compiled = {}

    def compile_(inputs):
        kind = inputs["kind"]
        if kind not in compiled:
            compiled[kind] = B.compile_fn(_eager_loss)
        return wrap(compiled[kind])(inputs)

    def liger(inputs):
        B.need_gpu(inputs)
        if inputs["kind"] != "labels":
            raise B.Unavailable("Liger's fused linear JSD is a different loss (a JSD, or a KL without the "
                                "sampled targets): no counterpart")
        cls = B.load_liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
        try:
            fn = cls(softcap=inputs["cap"]) if inputs["cap"] else cls()
        except TypeError:
            raise B.Unavailable("this Liger-Kernel has no soft-cap") from None
        return wrap(lambda h, w, ins: fn(w, h, ins["y"]))(inputs)

    return {"eager": wrap(_eager_loss), "compile": compile_, "chunked": wrap(chunked), "ours": wrap(ours),
            "liger": liger}


def _loss_flops(backward: bool):
    def n(inputs):
        (N, C), V = inputs["h"].shape, inputs["w"].shape[0]
        teacher = 2 * N * V * inputs["ht"].shape[1] if "ht" in inputs else 0
        return 2 * N * V * C * (3 if backward else 1) + teacher  # logits; with the backward dh and dW too
    return n


_NOTES = {"eager": "all N x V logits materialised", "chunked": "losses.chunked_loss (torch, chunk by chunk)"}
for _bwd in (False, True):
    _what = "fwd+bwd" if _bwd else "fwd"
    N_, C_, V_, CT_ = LOSS_SIZES["gemma3"]["gpu"]
    B.register(B.Entry(f"fused_linear_cross_entropy {_what}", f"h ({N_}, {C_}) -> head ({V_}, {C_}), Gemma 3 270M",
                       _loss_make("gemma3", "labels", None), _loss_impls(_bwd), flops=_loss_flops(_bwd),
                       peak_memory=True, notes=_NOTES))
N_, C_, V_, CT_ = LOSS_SIZES["gemma2"]["gpu"]
B.register(B.Entry("fused_linear_cross_entropy soft-cap fwd+bwd",
                   f"h ({N_}, {C_}) -> head ({V_}, {C_}), final soft-cap 30, Gemma 2 2B",
                   _loss_make("gemma2", "labels", 30.0), _loss_impls(True), flops=_loss_flops(True), peak_memory=True,
                   notes=_NOTES))
N_, C_, V_, CT_ = LOSS_SIZES["gemma3"]["gpu"]
B.register(B.Entry("kd_full fwd+bwd", f"student h ({N_}, {C_}), teacher h ({N_}, {CT_}), V = {V_}: Gemma 2's KD",
                   _loss_make("gemma3", "full", None), _loss_impls(True), flops=_loss_flops(True), peak_memory=True,
                   notes=_NOTES))
B.register(B.Entry("kd_sampled fwd+bwd", f"h ({N_}, {C_}) -> V = {V_}, 256 sampled ids per row: Gemma 3's KD",
                   _loss_make("gemma3", "sampled", None), _loss_impls(True), flops=_loss_flops(True), peak_memory=True,
                   notes=_NOTES))


# ---- the int8 / int4 decode GEMV --------------------------------------------------------------
GEMV_SIZES = {  # size -> (N, K): what one decode step reads
    "head": {"gpu": (262_144, 640), "cpu": (32_768, 640), "tiny": (80, 128)},  # Gemma 3 270M's LM head
    "mlp": {"gpu": (18_432, 2304), "cpu": (4096, 2304), "tiny": (48, 96)},  # Gemma 2 2B's fused gate_up
}


def _gemv_make(kind: str, shape: str, M: int):
    def make(device, dtype, size):
        from minigemma import quant

        N, K = GEMV_SIZES[shape][size]
        g = torch.Generator().manual_seed(0)
        w = 0.05 * torch.randn(N, K, generator=g)
        if kind == "int8":
            mod = quant.Int8Linear.from_weight(w)
        elif kind == "int4":
            mod = quant.Int4Linear.from_weight(w, 128 if shape == "head" else 32)
        else:  # two planes: 8-bit codes (a GGUF file's Q8_0) on the 4-bit layout
            v = torch.randint(-127, 128, (N, K), generator=g)
            mod = quant.Int4Linear.from_codes(v, 1e-3 * torch.rand(N, K // 32, generator=g) + 1e-4,
                                              torch.zeros(N, K // 32))
        x = torch.randn(M if size != "tiny" else min(M, 3), K, generator=g).to(device, dtype)
        return {"x": x, "module": mod.to(device), "w_bf16": mod.dequantized().to(device, dtype)}
    return make


def _gemv_impls():
    from minigemma import quant

    from .gemv import gemv_int4, gemv_int8

    def eager(inputs):  # no kernel for the layout: dequantise (what the modules do for prompts), then multiply
        x, m = inputs["x"], inputs["module"]
        if isinstance(m, quant.Int8Linear):
            return lambda: x @ (m.q.to(x.dtype) * m.scale[:, None].to(x.dtype)).T
        return lambda: x @ m.dequantized(x.dtype).T

    def compiled(inputs):
        x, m = inputs["x"], inputs["module"]
        if isinstance(m, quant.Int8Linear):
            fn = B.compile_fn(lambda x, q, s: x @ (q.to(x.dtype) * s[:, None].to(x.dtype)).T)
            return lambda: fn(x, m.q, m.scale)
        raise B.Unavailable("not timed: the int4 layout's unpacking does not compile to one kernel")

    def ours(inputs):
        x, m = inputs["x"], inputs["module"]
        if isinstance(m, quant.Int8Linear):
            return lambda: gemv_int8(x, m.q, m.scale, m.bias)
        return lambda: gemv_int4(x, m.packed, m.scale_zero, m.group_size, m.bias)

    def bf16(inputs):
        x, w = inputs["x"], inputs["w_bf16"]
        return lambda: x @ w.T

    def module(inputs):
        if inputs["x"].device.type != "cpu":
            raise B.Unavailable("torch's int8/int4 kernels for these layouts are CPU kernels")
        return lambda: inputs["module"](inputs["x"])

    return {"eager": eager, "compile": compiled, "ours": ours, "bf16": bf16, "module": module}


def _gemv_bytes(inputs):
    m, x = inputs["module"], inputs["x"]
    weights = sum(t.numel() * t.element_size() for t in m.buffers() if t is not None)
    return weights + x.numel() * x.element_size() + x.shape[0] * (m.out_features * x.element_size())


_GEMV_NOTES = {"eager": "dequantise, then a product in the run's dtype",
               "bf16": "the unquantised weight in the run's dtype (bf16 on a GPU); its GB/s counts the quantised bytes",
               "module": "torch's CPU kernel (_weight_int8pack_mm / _weight_int4pack_mm_for_cpu)"}
for _M in (1, 32):
    for _kind, _shape, _what in (("int8", "head", "int8"), ("int4", "head", "int4, groups of 128"),
                                 ("int4x2", "mlp", "int4 x 2 planes (8-bit codes), groups of 32")):
        N_, K_ = GEMV_SIZES[_shape]["gpu"]
        B.register(B.Entry(f"gemv_{_kind.replace('x2', '')} {'2-plane ' if _kind == 'int4x2' else ''}M={_M} fwd",
                           f"x ({_M}, {K_}) @ W ({N_}, {K_}) {_what}: "
                           + ("Gemma 3 270M's head" if _shape == "head" else "Gemma 2 2B's gate_up"),
                           _gemv_make(_kind, _shape, _M), _gemv_impls(), nbytes=_gemv_bytes, notes=_GEMV_NOTES))
