import torch
import torch.nn.functional as F


def _rms(x, w, eps, one_plus=True, fp32=True, center=False, eps_outside=False):
    y = x.float() if fp32 else x
    if center:
        y = y - y.mean(-1, keepdim=True)
    ms = y.pow(2).mean(-1, keepdim=True)
    y = y / (ms.sqrt() + eps) if eps_outside else y * torch.rsqrt(ms + eps)
    return (y * ((1 + w.float()) if one_plus else w.float())).to(x.dtype)


def _geglu(x, wg, wu, wd, act=lambda t: F.gelu(t, approximate="tanh"), swap=False):
    if swap:
        wg, wu = wu, wg
    return (act(x @ wg.T) * (x @ wu.T)) @ wd.T


MUTANTS = {
    "03.soft_cap": [
        ("hard clamp to ±cap", lambda x, cap: x if cap is None else x.clamp(-cap, cap)),
        ("tanh(x) · cap (no division)", lambda x, cap: x if cap is None else torch.tanh(x) * cap),
        ("tanh(x / cap) without the factor cap", lambda x, cap: x if cap is None else torch.tanh(x / cap)),
        ("cap=None crashes or zeroes", lambda x, cap: 30.0 * torch.tanh(x / 30.0) if cap is None else cap * torch.tanh(x / cap)),
    ],
    "03.rms_norm": [
        ("w instead of (1 + w)", lambda x, w, eps: _rms(x, w, eps, one_plus=False)),
        ("computed in the input dtype", lambda x, w, eps: _rms(x, w, eps, fp32=False)),
        ("LayerNorm-style centring", lambda x, w, eps: _rms(x, w, eps, center=True)),
        ("eps added after the sqrt", lambda x, w, eps: _rms(x, w, eps, eps_outside=True)),
        ("no eps", lambda x, w, eps: _rms(x, w, 0.0)),
    ],
    "03.geglu": [
        ("exact (erf) GELU instead of tanh", lambda x, wg, wu, wd: _geglu(x, wg, wu, wd, act=F.gelu)),
        ("gate and up swapped", lambda x, wg, wu, wd: _geglu(x, wg, wu, wd, swap=True)),
        ("SiLU (SwiGLU)", lambda x, wg, wu, wd: _geglu(x, wg, wu, wd, act=F.silu)),
        ("no gate: down(gelu(up(x)))", lambda x, wg, wu, wd: F.gelu(x @ wu.T, approximate="tanh") @ wd.T),
    ],
}
