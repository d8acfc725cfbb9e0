"""Dense CLIP predictors (docs/predictors.md): the library against an independent float64 reference.

The reference below is written from docs/predictors.md §0-§5 in plain float64 torch over the models' state
dicts (hand-written LayerNorm, softmax, attention, QuickGELU/GELU, bicubic and bilinear resampling
matrices); it calls nothing from ``lposs_lab``. Tiny random models are jittered (tests/model_fixtures.py)
so zero biases and unit LayerNorms matter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_fixtures import tiny_clip, tiny_timm

from lposs_lab.models import SCCLIP, DenseCLIP, ProxyCLIP, ViTValueEncoder
from lposs_lab.models.clip_dense import clip_trunk
from lposs_lab.models.proxyclip import proxy_attention

D64 = torch.float64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMNET_MEAN = (0.485, 0.456, 0.406)
IMNET_STD = (0.229, 0.224, 0.225)
TOL = 1e-4


# ----------------------------------------------------------------------------- float64 reference
def sd64(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(D64) for k, v in module.state_dict().items()}


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def softmax(x):
    m = x.max(-1, keepdim=True).values
    e = torch.exp(x - m)
    return e / e.sum(-1, keepdim=True)


def l2n(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def cubic_matrix(g: int, g0: int) -> torch.Tensor:
    """[g, g0] bicubic (a=-0.75) sampling with source coordinate (i + 0.5) * g0 / (g + 0.1) - 0.5."""
    a = -0.75

    def w(s):
        s = abs(s)
        if s <= 1:
            return (a + 2) * s**3 - (a + 3) * s**2 + 1
        if s < 2:
            return a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
        return 0.0

    out = torch.zeros(g, g0, dtype=D64)
    for i in range(g):
        src = (i + 0.5) * g0 / (g + 0.1) - 0.5
        x0 = math.floor(src)
        t = src - x0
        for o in (-1, 0, 1, 2):
            out[i, min(max(x0 + o, 0), g0 - 1)] += w(t - o)
    return out


def bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in] bilinear, align_corners=False, size-based."""
    m = torch.zeros(out_size, in_size, dtype=D64)
    for i in range(out_size):
        src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def resample_pos(pos, g0, grid):
    """[1 + g0*g0, C] -> [1 + gh*gw, C] with the (g + 0.1)/g0 rule (CLS row kept)."""
    if tuple(grid) == (g0, g0):
        return pos
    patch = pos[1:].reshape(g0, g0, -1)
    mh, mw = cubic_matrix(grid[0], g0), cubic_matrix(grid[1], g0)
    out = torch.einsum("ia,abc,jb->ijc", mh, patch, mw).reshape(grid[0] * grid[1], -1)
    return torch.cat([pos[:1], out])


def patchify(images, p, mean, std):
    x = images.to(D64)
    x = (x - torch.tensor(mean, dtype=D64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=D64).view(1, 3, 1, 1)
    b, _, h, w = x.shape
    gh, gw = h // p, w // p
    return x.reshape(b, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * p * p), (gh, gw)


def heads_of(x, n_heads):
    b, t, c = x.shape
    return x.reshape(b, t, n_heads, c // n_heads).transpose(1, 2)


def merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class RefCLIP:
    """float64 OpenAI-CLIP vision tower (QuickGELU) from an open_clip state dict."""

    def __init__(self, model):
        self.sd = sd64(model)
        self.n_heads = model.visual.transformer.resblocks[0].attn.num_heads
        self.layers = len(model.visual.transformer.resblocks)
        self.p = model.visual.conv1.weight.shape[-1]
        self.g0 = int(round(math.sqrt(self.sd["visual.positional_embedding"].shape[0] - 1)))

    def w(self, i, name):
        return self.sd[f"visual.transformer.resblocks.{i}.{name}"]

    def qkv(self, i, x):
        y = ln(x, self.w(i, "ln_1.weight"), self.w(i, "ln_1.bias"), 1e-5)
        qkv = y @ self.w(i, "attn.in_proj_weight").T + self.w(i, "attn.in_proj_bias")
        c = x.shape[-1]
        return tuple(heads_of(qkv[..., j * c : (j + 1) * c], self.n_heads) for j in range(3))

    def out(self, i, attn, v):
        return merge_heads(attn @ v) @ self.w(i, "attn.out_proj.weight").T + self.w(i, "attn.out_proj.bias")

    def mlp(self, i, z):
        y = ln(z, self.w(i, "ln_2.weight"), self.w(i, "ln_2.bias"), 1e-5)
        h = y @ self.w(i, "mlp.c_fc.weight").T + self.w(i, "mlp.c_fc.bias")
        h = h * torch.sigmoid(1.702 * h)
        return h @ self.w(i, "mlp.c_proj.weight").T + self.w(i, "mlp.c_proj.bias")

    def block(self, i, x):
        q, k, v = self.qkv(i, x)
        s = q.shape[-1] ** -0.5
        x = x + self.out(i, softmax(s * q @ k.transpose(-1, -2)), v)
        return x + self.mlp(i, x)

    def trunk(self, images):
        """-> X = B_{L-1}, {i: B_i}, grid."""
        sd = self.sd
        patches, grid = patchify(images, self.p, CLIP_MEAN, CLIP_STD)
        c = sd["visual.conv1.weight"].shape[0]
        tok = patches @ sd["visual.conv1.weight"].reshape(c, -1).T
        cls = sd["visual.class_embedding"].view(1, 1, c).expand(tok.shape[0], 1, c)
        x = torch.cat([cls, tok], 1) + resample_pos(sd["visual.positional_embedding"], self.g0, grid)
        x = ln(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
        outs = {}
        for i in range(self.layers - 1):
            x = self.block(i, x)
            outs[i + 1] = x
        return x, outs, grid

    def head(self, z):
        y = ln(z, self.sd["visual.ln_post.weight"], self.sd["visual.ln_post.bias"], 1e-5)
        return l2n(y @ self.sd["visual.proj"])

    def last(self):
        return self.layers - 1


def ref_sclip(ref: RefCLIP, images):
    x, _, grid = ref.trunk(images)
    i = ref.last()
    q, k, v = ref.qkv(i, x)
    s = q.shape[-1] ** -0.5
    a = softmax(s * q @ q.transpose(-1, -2)) + softmax(s * k @ k.transpose(-1, -2))
    z = x + ref.out(i, a, v)
    z = z + ref.mlp(i, z)
    return ref.head(z)[:, 1:].reshape(x.shape[0], *grid, -1)


def ref_clearclip(ref: RefCLIP, images):
    x, _, grid = ref.trunk(images)
    i = ref.last()
    q, _, v = ref.qkv(i, x)
    z = ref.out(i, softmax(q.shape[-1] ** -0.5 * q @ q.transpose(-1, -2)), v)
    return ref.head(z)[:, 1:].reshape(x.shape[0], *grid, -1)


def ref_omega(gh, gw, sigma=5.0):
    n = gh * gw
    om = np.zeros((1 + n, 1 + n))
    for a in range(n):
        for b in range(n):
            ra, ca, rb, cb = a // gw, a % gw, b // gw, b % gw
            om[1 + a, 1 + b] = math.exp(-((ra - rb) ** 2 + (ca - cb) ** 2) / (2 * sigma**2))
    return torch.from_numpy(om)


def ref_naclip(ref: RefCLIP, images):
    x, _, grid = ref.trunk(images)
    i = ref.last()
    _, k, v = ref.qkv(i, x)
    z = ref.out(i, softmax(k.shape[-1] ** -0.5 * k @ k.transpose(-1, -2) + ref_omega(*grid)), v)
    return ref.head(z)[:, 1:].reshape(x.shape[0], *grid, -1)


def ref_dino_tokens(model, images):
    """float64 timm DINO ViT: final-normed output tokens, CLS dropped, [B, M, D]; (g+0.1)/g0 pos rule."""
    sd = sd64(model)
    p = model.patch_embed.proj.weight.shape[-1]
    n_heads = model.blocks[0].attn.num_heads
    patches, grid = patchify(images, p, IMNET_MEAN, IMNET_STD)
    dim = sd["patch_embed.proj.weight"].shape[0]
    tok = patches @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    cls = sd["cls_token"].expand(tok.shape[0], 1, dim)
    pos = sd["pos_embed"][0]
    g0 = int(round(math.sqrt(pos.shape[0] - 1)))
    x = torch.cat([cls, tok], 1) + resample_pos(pos, g0, grid)
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        y = ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        qkv = y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, k, v = (heads_of(qkv[..., j * dim : (j + 1) * dim], n_heads) for j in range(3))
        a = softmax(q.shape[-1] ** -0.5 * q @ k.transpose(-1, -2))
        x = x + merge_heads(a @ v) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        y = ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        h = y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return ln(x, sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 1:], grid


def ref_proxy_logits(tokens, beta=1.2, gamma=3.0):
    """[B, M, D] -> [B, M, M] float64 L = γ (S − β μ), μ per window."""
    out = []
    for t in tokens:  # one window at a time
        pn = l2n(t.to(D64))
        s = pn @ pn.T
        out.append(gamma * (s - beta * s.mean()))
    return torch.stack(out)


def ref_proxy_attention(tokens, beta=1.2, gamma=3.0, near_keep=None):
    """``near_keep``: [B, M, M] bool decisions to use where |L| < 1e-5 (float32 rounding may flip the
    mask of an entry that sits on the threshold: those, and only those, take the library's decision)."""
    out = []
    for w, logit in enumerate(ref_proxy_logits(tokens, beta, gamma)):
        keep = logit >= 0
        if near_keep is not None:
            near = logit.abs() < 1e-5
            keep = torch.where(near, near_keep[w], keep)
        masked = torch.where(keep, logit, torch.full_like(logit, -math.inf))
        for r in range(masked.shape[0]):
            if torch.isinf(masked[r]).all():  # documented fallback: identity row
                masked[r, r] = 0.0
        out.append(softmax(masked))
    return torch.stack(out)


def ref_proxyclip(ref: RefCLIP, vfm_model, images, near_keep=None):
    x, _, (gh, gw) = ref.trunk(images)
    tokens, (mh, mw) = ref_dino_tokens(vfm_model, images)
    i = ref.last()
    _, _, v = ref.qkv(i, x)  # [B, H, T, d]
    v = v[:, :, 1:].reshape(v.shape[0], v.shape[1], gh, gw, -1)
    v = torch.einsum("ia,bhacd,jc->bhijd", bilinear_matrix(mh, gh), v, bilinear_matrix(mw, gw))
    v = v.reshape(v.shape[0], v.shape[1], mh * mw, -1)
    a = ref_proxy_attention(tokens, near_keep=near_keep)[:, None]
    return ref.head(ref.out(i, a, v)).reshape(x.shape[0], mh, mw, -1)


def ref_lof_anomalies(p):
    """p [N, C] float64 numpy -> bool [N] by the (code) LOF rule."""
    n = p.shape[0]
    d = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1)[:, :30]
    kappa = np.take_along_axis(d, order, axis=1)[:, -1]
    lof = np.array([np.mean(kappa[i] / kappa[order[i]]) for i in range(n)])
    return lof > np.quantile(lof, 0.95)


def ref_fill(grid, anom):
    """grid [gh, gw, C], anom [gh, gw] numpy."""
    gh, gw, _ = grid.shape
    out = grid.copy()
    for r in range(gh):
        for c in range(gw):
            if not anom[r, c]:
                continue
            nb = [grid[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                  if (rr, cc) != (r, c) and 0 <= rr < gh and 0 <= cc < gw and not anom[rr, cc]]  # fmt: skip
            if nb:
                out[r, c] = np.mean(nb, axis=0)
    return out


def ref_cos(x):
    xn = l2n(x)
    return xn @ xn.T


def ref_mix(c):
    m = torch.where(c >= 0.4, c, torch.zeros_like(c))
    return m / (m.sum(-1, keepdim=True) + 1e-6)


def ref_scclip(ref: RefCLIP, images):
    x, outs, (gh, gw) = ref.trunk(images)
    i = ref.last()
    feats, flags = [], []
    for b in range(x.shape[0]):  # every statistic per window
        p = x[b, 1:].numpy()
        anom = ref_lof_anomalies(p).reshape(gh, gw)
        flags.append(anom)
        p_f = torch.from_numpy(ref_fill(p.reshape(gh, gw, -1), anom).reshape(gh * gw, -1))
        p9 = outs[9][b, 1:].numpy()
        p9_f = torch.from_numpy(ref_fill(p9.reshape(gh, gw, -1), anom).reshape(gh * gw, -1))
        c9, c4 = ref_cos(p9_f), ref_cos(outs[4][b, 1:])
        m_pre, m_post = ref_mix(c9), ref_mix(c4)
        logit = 3.0 * (c9 - c9.mean())
        a_mid = softmax(torch.where(logit >= 0, logit, torch.full_like(logit, -math.inf)))

        def branch(rows, cls, a_mid=a_mid, m_post=m_post):
            _, k, v = ref.qkv(i, rows[None])
            a = 0.5 * (a_mid + softmax(k.shape[-1] ** -0.5 * k @ k.transpose(-1, -2)))
            return m_post @ (ref.out(i, a, v)[0] + 0.3 * cls)

        z1 = branch(m_pre @ p_f, x[b, 0])
        r = sum(outs[j][b] for j in range(4, 11))
        z2 = branch(r[1:], r[0])
        feats.append(ref.head(z1 + z2).reshape(gh, gw, -1))
    return torch.stack(feats), np.stack(flags)


# ----------------------------------------------------------------------------- helpers
def images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(out, ref):
    """max over tokens of ||out_i - ref_i|| / ||ref_i||."""
    diff = (out.to(D64) - ref).norm(dim=-1) / ref.norm(dim=-1)
    return float(diff.max())


def quick_clip(layers=2, seed=123):
    return tiny_clip(seed=seed, quick_gelu=True, vision_cfg={"layers": layers})


HW = [(224, 224), (224, 336)]


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("hw", HW)
@pytest.mark.parametrize(("method", "ref_fn"), [("sclip", ref_sclip), ("clearclip", ref_clearclip),
                                                 ("naclip", ref_naclip)])  # fmt: skip
def test_dense_methods_match_float64_reference(method, ref_fn, hw):
    model = quick_clip(layers=3)
    enc = DenseCLIP(model, "test", method=method)
    x = images(2, *hw, seed=1)
    with torch.no_grad():
        out = enc(x)
    ref = ref_fn(RefCLIP(model), x)
    assert out.shape == ref.shape == (2, hw[0] // 16, hw[1] // 16, 32) and out.dtype == torch.float32
    err = rel_err(out, ref)
    assert err <= TOL, err


@pytest.mark.parametrize(("hw", "vfm_name"), [((224, 224), "vit_base_patch16_224.dino"),
                                              ((224, 336), "vit_base_patch16_224.dino"),
                                              ((224, 224), "vit_base_patch8_224.dino")])  # fmt: skip
def test_proxyclip_matches_float64_reference(hw, vfm_name):
    model, vfm_model = quick_clip(), tiny_timm(vfm_name, seed=7)
    enc = ProxyCLIP(model, "test", vfm=ViTValueEncoder(vfm_model, "dino", pos_embed_mode="dino"))
    x = images(2, *hw, seed=2)
    with torch.no_grad():
        out = enc(x)
        _, tokens = enc.vfm.values_and_tokens(x)
    ref_tokens, _ = ref_dino_tokens(vfm_model, x)
    torch.testing.assert_close(tokens.reshape(ref_tokens.shape).to(D64), ref_tokens, atol=1e-4, rtol=1e-4)
    # the mask decisions first: equal except where L sits on the threshold within float32 rounding
    lib_keep = proxy_attention(tokens.reshape(2, -1, tokens.shape[-1])) > 0
    logits = ref_proxy_logits(ref_tokens)
    flipped = lib_keep != (logits >= 0)
    assert bool((logits[flipped].abs() < 1e-5).all()) and int(flipped.sum()) <= 10
    dropped = float((~lib_keep).double().mean())
    assert 0.2 < dropped < 0.95, dropped  # the mask matters
    ref = ref_proxyclip(RefCLIP(model), vfm_model, x, near_keep=lib_keep)
    p = 16 if "16" in vfm_name else 8
    assert out.shape == ref.shape == (2, hw[0] // p, hw[1] // p, 32)
    err = rel_err(out, ref)
    assert err <= TOL, err


@pytest.mark.parametrize("hw", HW)
def test_scclip_matches_float64_reference(hw):
    model = quick_clip(layers=12)
    enc = SCCLIP(model, "test")
    x = images(2, *hw, seed=3)
    ref_model = RefCLIP(model)
    ref, ref_flags = ref_scclip(ref_model, x)
    with torch.no_grad():
        out = enc(x)
        tokens, grid, _ = clip_trunk(model.visual, x, CLIP_MEAN, CLIP_STD, (14, 14))
        flags = enc.anomalies(tokens[:, 1:], grid)
    n = grid[0] * grid[1]
    expected = n - 1 - math.floor(0.95 * (n - 1))  # 10 of 196, 15 of 294
    assert flags.sum(dim=(1, 2)).tolist() == [expected] * 2
    np.testing.assert_array_equal(flags.numpy(), ref_flags)  # the anomaly sets first
    assert out.shape == ref.shape == (2, *grid, 32)
    err = rel_err(out, ref)
    assert err <= TOL, err
