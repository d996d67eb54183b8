import torch
import torch.nn.functional as F


def _rms(x, w, eps, one_plus=True, fp32=True, center=False, eps_outside=False, cast_back=True):
    y = x.float() if fp32 else x
    if center:
        y = y - y.mean(-1, keepdim=True)
    ms = y.pow(2).mean(-1, keepdim=True)
    y = y / (ms.sqrt() + eps) if eps_outside else y * torch.rsqrt(ms + eps)
    y = y * ((1 + w.float()) if one_plus else w.float())
    return y.to(x.dtype) if cast_back else y


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
        ("computed in float32 and returned in float32 for a bfloat16 x",
         lambda x, cap: x if cap is None else cap * torch.tanh(x.float() / cap)),
    ],
    "03.rms_norm": [
        ("w instead of (1 + w)", lambda x, w, eps: _rms(x, w, eps, one_plus=False)),
        ("computed in the input dtype", lambda x, w, eps: _rms(x, w, eps, fp32=False)),
        ("LayerNorm-style centring", lambda x, w, eps: _rms(x, w, eps, center=True)),
        ("eps added after the sqrt", lambda x, w, eps: _rms(x, w, eps, eps_outside=True)),
        ("no eps", lambda x, w, eps: _rms(x, w, 0.0)),
        ("eps hard-coded to 1e-6", lambda x, w, eps: _rms(x, w, 1e-6)),
        ("returned in float32, not x's dtype", lambda x, w, eps: _rms(x, w, eps, cast_back=False)),
        ("returned in float64", lambda x, w, eps: _rms(x.double(), w, eps)),
    ],
    "03.geglu": [
        ("exact (erf) GELU instead of tanh", lambda x, wg, wu, wd: _geglu(x, wg, wu, wd, act=F.gelu)),
        ("gate and up swapped", lambda x, wg, wu, wd: _geglu(x, wg, wu, wd, swap=True)),
        ("SiLU (SwiGLU)", lambda x, wg, wu, wd: _geglu(x, wg, wu, wd, act=F.silu)),
        ("no gate: down(gelu(up(x)))", lambda x, wg, wu, wd: F.gelu(x @ wu.T, approximate="tanh") @ wd.T),
        ("computed in float32 and returned in float32 for bfloat16 inputs",
         lambda x, wg, wu, wd: _geglu(x.float(), wg.float(), wu.float(), wd.float())),
    ],
}

CORRECT = {
    "03.soft_cap": [
        ("clamp-free tanh in float64", lambda x, cap: x if cap is None else (cap * torch.tanh(x.double() / cap)).to(x.dtype)),
    ],
    "03.rms_norm": [
        ("normalised, rounded to x's dtype, then scaled (and rounded again)",
         lambda x, w, eps: ((x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
                            * (1 + w.float())).to(x.dtype)),
        ("x / sqrt(mean + eps) in float64, returned in x's dtype",
         lambda x, w, eps: (x.double() / (x.double().pow(2).mean(-1, keepdim=True) + eps).sqrt()
                            * (1 + w.double())).to(x.dtype)),
    ],
    "03.geglu": [
        ("the tanh formula written out", lambda x, wg, wu, wd: _geglu(
            x, wg, wu, wd, act=lambda g: 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g ** 3))))),
        ("F.linear", lambda x, wg, wu, wd: F.linear(F.gelu(F.linear(x, wg), approximate="tanh") * F.linear(x, wu), wd)),
    ],
}


# --------------------------------------------------------------------------------------------
# 03.decoder_layer and 03.lm_head
# --------------------------------------------------------------------------------------------
def _block(x, attn, mlp, n_in, n_post_attn, n_pre_ffw, n_post_ffw, kind="right"):
    if kind == "pre-norm only":
        h = x + attn(n_in(x))
        return h + mlp(n_pre_ffw(h))
    if kind == "post-norm (norm after the residual add)":
        h = n_post_attn(x + attn(n_in(x)))
        return n_post_ffw(h + mlp(n_pre_ffw(h)))
    if kind == "parallel: the MLP reads x":
        h = x + n_post_attn(attn(n_in(x)))
        return h + n_post_ffw(mlp(n_pre_ffw(x)))
    if kind == "the residual carries the normed x":
        xn = n_in(x)
        h = xn + n_post_attn(attn(xn))
        return h + n_post_ffw(mlp(n_pre_ffw(h)))
    if kind == "norms mixed up (post-attention norm before the MLP)":
        h = x + n_pre_ffw(attn(n_in(x)))
        return h + n_post_ffw(mlp(n_post_attn(h)))
    if kind == "no residual around the MLP":
        h = x + n_post_attn(attn(n_in(x)))
        return n_post_ffw(mlp(n_pre_ffw(h)))
    h = x + n_post_attn(attn(n_in(x)))
    return h + n_post_ffw(mlp(n_pre_ffw(h)))


def _head(x, emb, w, eps, cap, norm=True, one_plus=True, cap_first=False, scale=1.0, default_cap=None):
    h = _rms(x, w, eps, one_plus=one_plus) if norm else x
    if cap_first:
        h = h if cap is None else cap * torch.tanh(h / cap)
    logits = (h @ emb.T) * scale
    cap = default_cap if cap is None else cap
    return logits if cap is None or cap_first else cap * torch.tanh(logits / cap)


_KINDS = ["pre-norm only", "post-norm (norm after the residual add)", "parallel: the MLP reads x",
          "the residual carries the normed x", "norms mixed up (post-attention norm before the MLP)",
          "no residual around the MLP"]

MUTANTS.update({
    "03.decoder_layer": [(kind, lambda *a, kind=kind: _block(*a, kind=kind)) for kind in _KINDS],
    "03.lm_head": [
        ("no final norm", lambda x, e, w, eps, cap: _head(x, e, w, eps, cap, norm=False)),
        ("final norm with w instead of (1 + w)", lambda x, e, w, eps, cap: _head(x, e, w, eps, cap, one_plus=False)),
        ("soft-cap before the head", lambda x, e, w, eps, cap: _head(x, e, w, eps, cap, cap_first=True)),
        ("logits scaled by sqrt(C) again", lambda x, e, w, eps, cap: _head(x, e, w, eps, cap, scale=x.shape[-1] ** 0.5)),
        ("caps at 30 when cap is None", lambda x, e, w, eps, cap: _head(x, e, w, eps, cap, default_cap=30.0)),
        ("float32 logits for a bfloat16 x and embedding (the head computed in float32)",
         lambda x, e, w, eps, cap: _head(x.float(), e.float(), w, eps, cap)),
    ],
})

CORRECT.update({
    "03.decoder_layer": [("as written in the statement", _block)],
    "03.lm_head": [
        ("F.linear and F.rms_norm in float32, rounded back to x's dtype", lambda x, e, w, eps, cap: (
            lambda l: l if cap is None else cap * torch.tanh(l / cap))(
            F.linear(F.rms_norm(x.float(), (x.shape[-1],), 1 + w.float(), eps), e.float())).to(x.dtype)),
    ],
})
