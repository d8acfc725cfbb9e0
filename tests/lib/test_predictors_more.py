"""Dense CLIP predictors: docs/predictors.md §8 invariants, batching, checkpoints, registry, LPOSS on top."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import (
    TINY_TIMM,
    assert_same_state,
    put_in_hf_cache,
    save_safetensors,
    save_torch,
    tiny_clip,
    tiny_timm,
    use_fake_hf_cache,
)

from lposs_lab import LPOSS, LPOSSConfig, WindowConfig
from lposs_lab.models import SCCLIP, VLM_MODELS, DenseCLIP, ProxyCLIP, ViTValueEncoder, create_vlm, create_vm
from lposs_lab.models.clip_dense import (
    clearclip_attention,
    clip_head,
    clip_trunk,
    last_block,
    naclip_attention,
    naclip_omega,
    sclip_attention,
    split_qkv,
)
from lposs_lab.models.maskclip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from lposs_lab.models.proxyclip import proxy_attention, shared_vfm_forward
from lposs_lab.models.scclip import fill_anomalies, lof_anomalies, lof_scores
from lposs_lab.models.tiny import TINY_QUICKGELU_CLIP_ARCH, TINY_SCCLIP_ARCH

NEW = ("sclip", "clearclip", "naclip", "proxyclip", "scclip")


def images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def quick_clip(layers=2, seed=123):
    return tiny_clip(seed=seed, quick_gelu=True, vision_cfg={"layers": layers})


# ----------------------------------------------------------------------------- §8 invariants
def test_attention_row_sums():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1 + 12, 8, generator=g), torch.randn(2, 3, 1 + 12, 8, generator=g)
    torch.testing.assert_close(sclip_attention(q, k).sum(-1), torch.full((2, 3, 13), 2.0))
    torch.testing.assert_close(clearclip_attention(q).sum(-1), torch.ones(2, 3, 13))
    torch.testing.assert_close(naclip_attention(k, (3, 4)).sum(-1), torch.ones(2, 3, 13))


def test_unmodified_last_block_reproduces_clip_tokens():
    model = quick_clip(layers=3)
    vis = model.visual
    x = images(2, 224, 224, seed=1)
    with torch.no_grad():
        tokens, grid, _ = clip_trunk(vis, x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, (14, 14))
        last = vis.transformer.resblocks[-1]
        q, k, v = split_qkv(last, last.ln_1(tokens))
        qk = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        feats = clip_head(vis, last_block(last, tokens, qk, v, residual=True, ffn=True), drop_cls=False)
        mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
        normed = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        vis.output_tokens = True
        try:
            pooled, own = vis(normed)  # open_clip's own forward: pooled (CLS @ proj), ln_post'd patch tokens
        finally:
            vis.output_tokens = False
    assert grid == (14, 14)
    torch.testing.assert_close(feats[:, 1:], F.normalize(own @ vis.proj, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[:, 0], F.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-5)


def test_naclip_omega_properties_and_numbers():
    om = naclip_omega((14, 14))
    assert om.shape == (197, 197)
    assert torch.equal(om, om.T) and torch.equal(om[1:, 1:].diagonal(), torch.ones(196))
    assert not om[0].any() and not om[:, 0].any()
    assert om[1, 2].item() == pytest.approx(0.98020, abs=5e-6)  # 4-neighbour
    assert om[1, 1 + 15].item() == pytest.approx(0.96079, abs=5e-6)  # diagonal neighbour
    assert om[1, 196].item() == pytest.approx(1.16e-3, abs=5e-6)  # opposite corners
    assert om[1, 196].item() == pytest.approx(math.exp(-338 / 50), rel=1e-6)
    gh, gw, sigma = 5, 7, 5.0  # non-square: a delta image per patch convolved with a Gaussian window
    om = naclip_omega((gh, gw), sigma)
    r = torch.arange(-(gh - 1), gh, dtype=torch.float64)
    c = torch.arange(-(gw - 1), gw, dtype=torch.float64)
    window = torch.exp(-(r[:, None] ** 2 + c[None] ** 2) / (2 * sigma**2))  # (2gh-1) x (2gw-1)
    for j in range(gh * gw):
        delta = torch.zeros(1, 1, gh, gw, dtype=torch.float64)
        delta[0, 0, j // gw, j % gw] = 1.0
        conv = F.conv2d(delta, window[None, None], padding=(gh - 1, gw - 1))[0, 0]
        torch.testing.assert_close(om[1:, 1 + j].double(), conv.reshape(-1), atol=1e-6, rtol=1e-6)


def test_proxyclip_identity_similarity_gives_value_path():
    model = quick_clip()
    enc = ProxyCLIP(model, "t", vfm=ViTValueEncoder(tiny_timm(), "d"))
    x = images(1, 224, 224, seed=2)
    orth = torch.eye(196).reshape(1, 14, 14, 196)  # S = I
    assert torch.equal(proxy_attention(orth.reshape(1, 196, 196)), torch.eye(196)[None])
    with torch.no_grad():
        out = enc(x, vfm_tokens=orth)
        vis = model.visual
        tokens, _, _ = clip_trunk(vis, x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, (14, 14))
        last = vis.transformer.resblocks[-1]
        dim = tokens.shape[-1]
        y = last.ln_1(tokens)[:, 1:]
        v = y @ last.attn.in_proj_weight[2 * dim :].T + last.attn.in_proj_bias[2 * dim :]
        ref = F.normalize(vis.ln_post(last.attn.out_proj(v)) @ vis.proj, dim=-1).reshape(1, 14, 14, -1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_proxyclip_degenerate_rows_fall_back_to_identity():
    g = torch.Generator().manual_seed(3)
    const = torch.ones(2, 16, 8)  # near-uniform window: mu = 1 > 1/beta, every row would be all -inf
    assert torch.equal(proxy_attention(const), torch.eye(16).expand(2, 16, 16))
    tokens = torch.randn(1, 16, 8, generator=g)
    tokens[0, 5] = 0.0  # a zero token: S row 0 < beta*mu, only that row is degenerate
    att = proxy_attention(tokens)
    assert torch.isfinite(att).all()
    assert torch.equal(att[0, 5], torch.eye(16)[5])
    pn = F.normalize(tokens[0].double(), dim=-1)
    s = pn @ pn.T
    logits = 3.0 * (s - 1.2 * s.mean())
    expected = torch.where(logits >= 0, logits, torch.tensor(-math.inf, dtype=torch.float64)).softmax(-1)
    others = [i for i in range(16) if i != 5]
    torch.testing.assert_close(att[0, others].double(), expected[others], atol=1e-6, rtol=1e-6)
    model = quick_clip()  # through the model: constant VFM tokens give finite features (A = I)
    enc = ProxyCLIP(model, "t", vfm=ViTValueEncoder(tiny_timm(), "d"))
    with torch.no_grad():
        out = enc(images(1, 224, 224), vfm_tokens=torch.ones(1, 14, 14, 64))
        ident = enc(images(1, 224, 224), vfm_tokens=torch.eye(196).reshape(1, 14, 14, 196))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ident)


def test_scclip_lof_counts_and_fill():
    g = torch.Generator().manual_seed(4)
    for n, expected in ((196, 10), (784, 40)):
        flags = lof_anomalies(lof_scores(torch.randn(3, n, 16, generator=g)))
        assert flags.sum(-1).tolist() == [expected] * 3
    mask = torch.rand(2, 14, 14, generator=g) < 0.3
    const = torch.full((2, 14, 14, 8), 0.5)  # sums of 0.5 are exact: bitwise unchanged
    assert torch.equal(fill_anomalies(const, mask), const)
    const = torch.full((2, 14, 14, 8), 0.7)  # unchanged up to the float32 rounding of a mean
    torch.testing.assert_close(fill_anomalies(const, mask), const, atol=0, rtol=2e-7)
    grid = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 3, 3, 2)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 1] = True
    out = fill_anomalies(grid, mask)
    assert torch.equal(out[0, 0, 0], grid[0, 1, :2].mean(0))  # in-image, non-anomalous neighbours only
    assert torch.equal(out[0, 0, 1], grid[0, [0, 1, 1, 1], [2, 0, 1, 2]].mean(0))
    alone = torch.ones(1, 3, 3, dtype=torch.bool)
    assert torch.equal(fill_anomalies(grid, alone), grid)  # no normal neighbour: kept as is


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("kind", ["proxyclip", "scclip"])
def test_batch_equals_one_window_at_a_time(kind):
    if kind == "proxyclip":
        enc = ProxyCLIP(quick_clip(), "t", vfm=ViTValueEncoder(tiny_timm(), "d"))
    else:
        enc = SCCLIP(quick_clip(layers=12), "t")
    x = images(3, 224, 224, seed=5)
    x[1] = 0.5 + 0.01 * x[1]  # a near-uniform window beside textured ones: per-window statistics differ
    with torch.no_grad():
        batched = enc(x)
        single = torch.cat([enc(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoints and registry
# every predictor once and every file format at least once: the formats share one reader
# (registry.load_checkpoint_file), so the full 5 x 3 product only repeated it
CHECKPOINT_CASES = [
    ("sclip", "safetensors"), ("clearclip", "bin"), ("naclip", "pt"), ("proxyclip", "bin"),
    ("scclip", "safetensors"),
]


def test_the_checkpoint_cases_cover_every_predictor_and_format():
    assert {m for m, _ in CHECKPOINT_CASES} == set(NEW)
    assert {f for _, f in CHECKPOINT_CASES} == {"safetensors", "bin", "pt"}


@pytest.mark.parametrize(("method", "fmt"), CHECKPOINT_CASES)
def test_local_checkpoints_load_through_create_vlm(tmp_path, method, fmt):
    layers = 12 if method == "scclip" else 2
    saved = quick_clip(layers=layers, seed=11)
    path = tmp_path / f"clip.{fmt}"
    save_safetensors(saved, path) if fmt == "safetensors" else save_torch(saved, path)
    arch = TINY_SCCLIP_ARCH if method == "scclip" else TINY_QUICKGELU_CLIP_ARCH
    extra = {}
    vfm_model = tiny_timm("vit_base_patch16_224.dino", seed=12)
    if method == "proxyclip":
        dino_path = save_safetensors(vfm_model, tmp_path / "dino.safetensors")
        extra = {"vfm_pretrained": dino_path, "vfm_arch": TINY_TIMM}
    vlm = create_vlm(f"{method}_b16", pretrained=path, **extra, **arch)
    assert_same_state(vlm.model, saved)
    assert str(path.resolve()) in vlm.weights_id and vlm.embed_dim == 32 and vlm.patch_size == 16
    if method == "proxyclip":
        ref_enc = ProxyCLIP(saved, "x", vfm=ViTValueEncoder(vfm_model, "d", pos_embed_mode="dino"))
        assert_same_state(vlm.vfm.model, vfm_model)
    elif method == "scclip":
        ref_enc = SCCLIP(saved, "x")
    else:
        ref_enc = DenseCLIP(saved, "x", method=method)
    x = images(1, 224, 224, seed=6)
    with torch.no_grad():
        assert torch.equal(vlm(x), ref_enc(x))
    torch.testing.assert_close(vlm.encode_text(["a cat", "a dog"]), ref_enc.encode_text(["a cat", "a dog"]))


def test_openai_weights_from_hub_location(monkeypatch, tmp_path):
    hub = use_fake_hf_cache(monkeypatch, tmp_path)
    saved, dino = quick_clip(seed=13), tiny_timm(seed=14)
    repo = "timm/vit_base_patch16_clip_224.openai"  # open_clip's table: ViT-B-16-quickgelu / openai
    put_in_hf_cache(hub, repo, "open_clip_pytorch_model.bin", save_torch(saved, tmp_path / "c.bin"))
    dino_file = save_safetensors(dino, tmp_path / "d.safetensors")
    put_in_hf_cache(hub, "timm/vit_base_patch16_224.dino", "model.safetensors", dino_file)
    vlm = create_vlm("proxyclip_b16", pretrained=True, vfm_arch=TINY_TIMM, **TINY_QUICKGELU_CLIP_ARCH)
    assert_same_state(vlm.model, saved)
    assert_same_state(vlm.vfm.model, dino)
    assert repo in vlm.weights_id and "timm/vit_base_patch16_224.dino" in vlm.weights_id
    vm = create_vm("dino_b16", pretrained=True, **TINY_TIMM)
    assert vlm.shares_vfm_with(vm, (14, 14)) and not vlm.shares_vfm_with(vm, (14, 21))


def test_registry_names_and_errors():
    for method in NEW:
        assert f"{method}_b16" in VLM_MODELS and f"{method}_tiny_random" in VLM_MODELS
    with pytest.raises(ValueError, match="valid names: maskclip_b16, tiny_random, sclip_b16") as info:
        create_vlm("sc_clip")
    for name in VLM_MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="no VFM"):
        create_vlm("sclip_tiny_random", vfm_pretrained=False)
    real = create_vlm("sclip_b16", pretrained=False)  # the real architecture, random init
    assert real.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    assert real.embed_dim == 512 and real.tokenizer_name == "ViT-B-16-quickgelu"
    for method in NEW:
        enc = create_vlm(f"{method}_tiny_random")
        assert enc.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match=r"\[B, 3, h, w\]"):
        create_vlm("naclip_tiny_random")(torch.rand(3, 224, 224))
    with pytest.raises(ValueError, match="layers"):
        SCCLIP(quick_clip(layers=4), "t")


# ----------------------------------------------------------------------------- LPOSS end to end
@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)
    arr[:60] = (200, 40, 30)
    return arr


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("predict", ["maskclip", "lposs_plus"])
def test_lposs_end_to_end_with_each_tiny_vlm(photo, method, predict):
    cfg = LPOSSConfig(vm="tiny_random", vlm=f"{method}_tiny_random", device="cpu",
                      window=WindowConfig(short_side=224))  # fmt: skip
    model = LPOSS.from_config(cfg, method=predict)
    pred = model.predict(photo, classes=["cat", "sky;cloud", "road"])
    assert pred.labels.shape == (120, 170) and pred.low_res_scores.shape[0] == 3
    assert torch.isfinite(pred.low_res_scores).all()
    feats = model.extract(photo)
    vlm = create_vlm(f"{method}_tiny_random")
    crops = torch.stack([torch.from_numpy(np.asarray(feats.image.permute(1, 2, 0)))
                         [w.y1 : w.y2, w.x1 : w.x2].permute(2, 0, 1) for w in feats.windows])  # fmt: skip
    with torch.no_grad():
        expected = vlm(crops)
    torch.testing.assert_close(feats.vlm, expected, atol=1e-5, rtol=1e-5)  # the VLM's own numbers
    text = model._text
    scores = feats.vlm.reshape(-1, feats.vlm.shape[-1]) @ text.T
    assert float(scores.abs().max()) <= 1.0 + 1e-5 and float(scores.std()) > 0


def test_proxyclip_shares_the_vm_pass(photo, monkeypatch):
    vm, vlm = create_vm("tiny_random"), create_vlm("proxyclip_tiny_random")
    x = images(3, 224, 224, seed=8)
    with torch.no_grad():
        pair = shared_vfm_forward(vlm, vm, x)
        separate = (vm(x), vlm(x))
    assert pair is not None
    torch.testing.assert_close(pair[0], separate[0], atol=0, rtol=0)
    torch.testing.assert_close(pair[1], separate[1], atol=1e-6, rtol=1e-6)
    assert shared_vfm_forward(vlm, vm, images(1, 224, 336)) is None  # other rule at a non-native grid
    assert shared_vfm_forward(vlm, create_vm("tiny_random", depth=1), x) is None  # other weights
    assert shared_vfm_forward(create_vlm("sclip_tiny_random"), vm, x) is None
    calls = {"vfm": 0, "vm": 0}
    vfm_forward, vm_forward = ViTValueEncoder.values_and_tokens, ViTValueEncoder.forward

    def count_tokens(self, images):
        calls["vfm" if self is not vm else "vm"] += 1
        return vfm_forward(self, images)

    def count_forward(self, images):
        calls["vm"] += 1
        return vm_forward(self, images)

    model = LPOSS(vm, vlm, LPOSSConfig(device="cpu", window=WindowConfig(short_side=224)), method="lposs")
    monkeypatch.setattr(ViTValueEncoder, "values_and_tokens", count_tokens)
    monkeypatch.setattr(ViTValueEncoder, "forward", count_forward)
    shared = model.extract(photo)
    assert calls == {"vfm": 0, "vm": 1}  # one DINO pass per window batch, the VM's
    monkeypatch.undo()
    separate_vm = create_vm("tiny_random", depth=1)
    cfg = LPOSSConfig(device="cpu", window=WindowConfig(short_side=224))
    other = LPOSS(separate_vm, vlm, cfg, method="lposs")
    apart = other.extract(photo)
    torch.testing.assert_close(shared.vlm, apart.vlm, atol=1e-6, rtol=1e-6)  # same ProxyCLIP features
