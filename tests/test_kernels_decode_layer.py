"""The fused decode step (minigemma.kernels.decode_layer) against the torch model's own forward.

What runs: `use_triton` swaps Gemma's DecoderLayer and the model itself for their fused subclasses; a
one-token step with a static cache then runs five kernels a layer (QKV with its norms, QK-norm, RoPE and
the KV write; the split-K attention; o_proj with the combine; gate_up with its norms and GeGLU; down) and
one more for the final residual add and norm. The reference is the torch model (float32, its own forward,
module by module), fed the same tokens with its own cache.

Tolerance (float32, the interpreter): 2e-5 relative and absolute on logits of size ~1-10. The fused
kernels compute the same float32 operations in another order (a GEMV's sums over K tiles, a norm's mean of
squares tile by tile, the combine done per tile): measured differences are 1e-7 to 1e-6.

bf16: the same step in the emulated bf16 interpreter (`interpret.emulated_bf16`) at the GPU's tiles
(`decode_layer.blocks(..., interpret=False)`). The fused kernels round to bf16 where the torch layer rounds,
so the first layer's k and v, whose inputs are torch's own, must be torch's bf16 bits exactly (a float32
sum in another order could flip a rounding; on these inputs none does); and the logits must be as close to
the float32 model's as torch's bf16 model is. A step that skips its roundings fails the first check.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import triton
import triton.language as tl

import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET=1 first, without a GPU)
from minigemma.gemma import FULL, SLIDING, Gemma, GemmaConfig
from minigemma.kernels import decode_layer
from minigemma.kernels.interpret import INTERPRET
from minigemma.kernels.swap import use_triton

INTERPRETER = pytest.mark.skipif(not INTERPRET, reason="runs the kernels in Triton's interpreter (no GPU)")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU: the fused step compiled and run in bf16")
TOL = dict(rtol=2e-5, atol=2e-5)
FUSED = {"_qkv_kernel", "_decode_kernel", "_o_proj_kernel", "_gate_up_kernel", "_down_kernel", "_residual_kernel"}


def config(family: str, **over) -> GemmaConfig:
    """Two layers, one local (a ring of 5) and one global: every kind of step, at the interpreter's speed."""
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, head_dim=16,
                sliding_window=5, query_pre_attn_scalar=24, layer_types=[SLIDING, FULL])
    if family == "gemma3":  # MQA, QK-norm, dual RoPE bases with the global one scaled
        base.update(num_attention_heads=4, num_key_value_heads=1, use_qk_norm=True, rope_theta=1_000_000.0,
                    rope_scaling_factor=8.0)
    else:  # GQA, both soft-caps
        base.update(family="gemma2", num_attention_heads=4, num_key_value_heads=2, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0)
    return GemmaConfig(**{**base, **over})


def reference(cfg: GemmaConfig, seed: int = 0) -> Gemma:
    """The torch model, its norm weights made non-zero (a fresh model's are 0, which would hide a (1 + w) mistake)."""
    torch.manual_seed(seed)
    ref = Gemma(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return ref


def copy_of(ref: Gemma) -> Gemma:
    model = Gemma(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    return model


def pair(cfg: GemmaConfig, seed: int = 0):
    """The torch model and a copy with the same weights swapped onto the kernels (the fused classes included)."""
    ref = reference(cfg, seed)
    fast = use_triton(copy_of(ref), verbose=False)
    assert type(fast) is decode_layer.Gemma and all(type(layer) is decode_layer.DecoderLayer for layer in fast.layers)
    return ref, fast


class Launches:
    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.count = Counter()
        run0 = interpreter.InterpretedFunction.run

        def run(fn, *args, **kwargs):
            self.count[fn.fn.__name__] += 1
            return run0(fn, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)


@INTERPRETER
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@torch.no_grad()
def test_fused_steps_match_the_torch_model_through_a_ring_that_wraps_and_left_padding(family, monkeypatch):
    """Batch 2, row 0 left-padded by 3 (packed positions: RoPE and the mask read each row's own), a 4-token
    prompt, then 8 one-token steps: the window of 5 wraps the local ring, the global cache reaches 12. Every
    step's logits agree, and every step ran the fused kernels (5 a layer, 1 for the trunk) and nothing else."""
    cfg = config(family)
    ref, fast = pair(cfg)
    launches = Launches(monkeypatch)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False
    c_ref, c_fast = ref.new_cache(2, 12), fast.new_cache(2, 12)
    torch.testing.assert_close(fast(ids[:, :4], attention_mask=mask[:, :4], cache=c_fast),
                               ref(ids[:, :4], attention_mask=mask[:, :4], cache=c_ref), **TOL)
    for t in range(4, 12):
        launches.count.clear()
        got = fast(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=c_fast)
        want = ref(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=c_ref)
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"decode step at index {t}: {m}")
        assert set(launches.count) == FUSED, launches.count
        assert launches.count["_qkv_kernel"] == cfg.num_hidden_layers and launches.count["_residual_kernel"] == 1
    torch.testing.assert_close(c_fast[0].k, c_ref[0].k, **TOL)  # the QKV kernel wrote the cache itself
    torch.testing.assert_close(c_fast[1].v, c_ref[1].v, **TOL)


@INTERPRETER
@torch.no_grad()
def test_without_sandwich_norms_and_one_layer_alone(monkeypatch):
    """The pre-norm-only ablation (post-norms are nn.Identity: the residual adds δ as it is), and one layer
    swapped alone (its `forward` runs the step and adds its own residual: 5 + 1 launches)."""
    cfg = config("gemma3", sandwich_norm=False)
    ref, fast = pair(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    c_ref, c_fast = ref.new_cache(1, 9), fast.new_cache(1, 9)
    ref(ids[:, :2], cache=c_ref)
    fast(ids[:, :2], cache=c_fast)
    for t in range(2, 9):
        torch.testing.assert_close(fast(ids[:, t:t + 1], cache=c_fast), ref(ids[:, t:t + 1], cache=c_ref), **TOL)

    cfg = config("gemma2")
    layer = reference(cfg, seed=4).layers[1]  # the global layer
    alone = decode_layer.DecoderLayer.__new__(decode_layer.DecoderLayer)
    alone.__dict__.update(layer.__dict__)  # the same parameters and submodules
    use_triton(alone, verbose=False)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    c_ref, c_fast = layer.new_cache(2, 6), alone.new_cache(2, 6)
    torch.testing.assert_close(alone(x[:, :3], cache=c_fast), layer(x[:, :3], cache=c_ref), **TOL)
    launches = Launches(monkeypatch)
    for t in range(3, 6):
        torch.testing.assert_close(alone(x[:, t:t + 1], cache=c_fast), layer(x[:, t:t + 1], cache=c_ref), **TOL)
    assert launches.count["_qkv_kernel"] == 3 and launches.count["_residual_kernel"] == 3


@INTERPRETER
def test_what_the_fused_step_does_not_cover_runs_the_layers_own_forward(monkeypatch):
    """A prompt, gradients, and a global layer's cache without slots (max_len None: it grows) run module by
    module; with the growing cache the local layer (a ring always has slots) still runs its own fused step."""
    cfg = config("gemma3")
    ref, fast = pair(cfg, seed=6)
    launches = Launches(monkeypatch)
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fast(ids[:, :3], cache=fast.new_cache(1, 6))  # a prompt
    fast(ids[:, :1], cache=fast.new_cache(1, 6)).sum().backward()  # one token, but with gradients
    assert not FUSED - {"_decode_kernel"} & set(launches.count), launches.count
    c_ref, c_fast = ref.new_cache(1), fast.new_cache(1)  # growing caches
    launches.count.clear()
    with torch.no_grad():
        for t in range(6):
            torch.testing.assert_close(fast(ids[:, t:t + 1], cache=c_fast), ref(ids[:, t:t + 1], cache=c_ref),
                                       **TOL)
    assert launches.count["_qkv_kernel"] == 6 and launches.count["_combine_kernel"] == 6, launches.count


# ---- bf16 ----------------------------------------------------------------------------------------------
def _bf16_run(monkeypatch, mistake=None):
    """4 decode steps of a Gemma 3 (QK-norm) model after a 6-token prompt (the ring of 5 wraps): torch in bf16
    and the fused step in emulated bf16 at the GPU's tiles, each against the float32 model. Returns
    (max |logits − float32| of torch bf16, the same of the fused step, the share of the first layer's cached
    k and v that the fused step wrote with exactly torch's bf16 bits)."""
    from minigemma import attention as torch_attention
    from minigemma import gemma
    from minigemma.kernels import attention as attention_kernels
    from minigemma.kernels.interpret import emulated_bf16
    from minigemma.kernels.utils import retype_modules
    from minigemma.swap import retype

    cfg = config("gemma3", hidden_size=128, intermediate_size=192, head_dim=32, query_pre_attn_scalar=32)
    ref = reference(cfg, seed=8)
    low, fast = copy_of(ref).to(torch.bfloat16), copy_of(ref).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(9))
    caches = [m.new_cache(1, 10) for m in (ref, low, fast)]
    worst, same = [0.0, 0.0], []
    with torch.no_grad():
        for m, c in zip((ref, low, fast), caches):  # the prompt on torch
            m(ids[:, :6], cache=c)
        # then the GPU's path in the interpreter: bf16 allowed, the fused kernels at their GPU tiles (use_triton
        # refuses bf16 on a CPU, so the classes the fused step needs are swapped in directly)
        monkeypatch.setattr(decode_layer, "INTERPRET", False)
        monkeypatch.setattr(attention_kernels, "INTERPRET", False)
        retype_modules(fast, {gemma.Gemma: retype(decode_layer.Gemma),
                              gemma.DecoderLayer: retype(decode_layer.DecoderLayer),
                              torch_attention.GroupedQueryAttention: retype(attention_kernels.GroupedQueryAttention)})
        if mistake:
            mistake(monkeypatch)
        launches = Launches(monkeypatch)
        for t in range(6, 10):
            truth = ref(ids[:, t:t + 1], cache=caches[0])
            torch_bf16 = low(ids[:, t:t + 1], cache=caches[1]).float()
            with emulated_bf16():
                fused = fast(ids[:, t:t + 1], cache=caches[2]).float()
            worst[0] = max(worst[0], (torch_bf16 - truth).abs().max().item())
            worst[1] = max(worst[1], (fused - truth).abs().max().item())
            slot = t % cfg.sliding_window
            for name in ("k", "v"):
                same.append(torch.equal(getattr(caches[1][0], name)[:, :, slot], getattr(caches[2][0], name)[:, :, slot]))
    assert launches.count["_qkv_kernel"] == 4 * cfg.num_hidden_layers  # the fused step ran
    return worst[0], worst[1], sum(same) / len(same)


@INTERPRETER
def test_the_bf16_step_rounds_where_torch_rounds(monkeypatch):
    """The first layer's k and v (the same input as torch's: embedding, input norm, projection, QK-norm, RoPE,
    each rounded to bf16 where the torch layer rounds) are torch's bf16 bits exactly, at every step; and the
    logits are as close to float32 as torch's bf16 model is (25% and 0.01 of slack: past the first layer the
    attention and GeGLU kernels round once where torch rounds twice, as the module kernels do)."""
    torch_err, fused_err, same = _bf16_run(monkeypatch)
    assert same == 1.0
    assert 0 < torch_err and fused_err <= 1.25 * torch_err + 1e-2, (fused_err, torch_err)


@triton.jit
def _unrounded(x, DTYPE: tl.constexpr):
    return x  # a mistake: the value kept in float32 where the torch layer stores it in bf16


@INTERPRETER
def test_the_bf16_check_catches_a_missing_rounding(monkeypatch):
    """A fused step that never rounds between its operations (`_round` returning its float32 input, as if the
    layer kept float32 activations): the first layer's k and v are no longer torch's bits."""
    *_, same = _bf16_run(monkeypatch, lambda mp: mp.setattr(decode_layer, "_round", _unrounded))
    assert same < 0.5, same


@GPU
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@torch.no_grad()
def test_on_a_gpu_the_bf16_step_is_as_close_to_float32_as_torch_in_bf16(family):
    """On a GPU (`make bench-gpu`): the compiled fused step in bf16, at the GPU's own tiles and split counts,
    against the float32 model; as close to it as torch's bf16 model (cuBLAS) is, within the slack of the
    emulated test; most of the first layer's cached k and v have torch's bits (cuBLAS sums in its own order,
    so a few roundings may flip)."""
    cfg = config(family, hidden_size=256, intermediate_size=512, head_dim=128, query_pre_attn_scalar=128)
    ref = reference(cfg, seed=10)
    low, fast = copy_of(ref).cuda().to(torch.bfloat16), copy_of(ref).cuda().to(torch.bfloat16)
    ref = ref.cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(11))
    caches = [m.new_cache(2, 40) for m in (ref, low, fast)]
    for m, c in zip((ref, low, fast), caches):
        m(ids[:, :8], cache=c)
    use_triton(fast, verbose=False)
    worst, same = [0.0, 0.0], []
    for t in range(8, 40):
        truth = ref(ids[:, t:t + 1], cache=caches[0])
        worst[0] = max(worst[0], (low(ids[:, t:t + 1], cache=caches[1]).float() - truth).abs().max().item())
        worst[1] = max(worst[1], (fast(ids[:, t:t + 1], cache=caches[2]).float() - truth).abs().max().item())
        slot = t % cfg.sliding_window
        same.append((caches[1][0].k[:, :, slot] == caches[2][0].k[:, :, slot]).float().mean().item())
    assert worst[1] <= 1.25 * worst[0] + 1e-2, worst
    assert sum(same) / len(same) > 0.9, same


@GPU
@torch.no_grad()
def test_on_a_gpu_a_captured_step_replays_the_eager_steps_bits():
    """On a GPU (`make bench-gpu`): the fused bf16 step captured as a CUDA graph (`kernels.graph.DecodeGraph`)
    and replayed gives, step after step, the logits the same kernels give run one launch at a time: the
    same launches in the same order, so the same bits."""
    from minigemma.kernels.graph import DecodeGraph

    cfg = config("gemma3", hidden_size=256, intermediate_size=512, head_dim=128, query_pre_attn_scalar=128)
    eager = use_triton(copy_of(reference(cfg, seed=12)).cuda().to(torch.bfloat16), verbose=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(13))
    caches = [eager.new_cache(2, 40) for _ in range(2)]
    for c in caches:
        eager(ids[:, :8], cache=c)
    step = DecodeGraph(eager, caches[1])
    for t in range(8, 40):
        want = eager(ids[:, t:t + 1], cache=caches[0], last_only=True)[:, -1]
        assert torch.equal(step(ids[:, t]), want), t
    assert step.replay is not None and step.steps == 32
