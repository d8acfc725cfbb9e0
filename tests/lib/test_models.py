"""Encoders: value paths against independent computations, weights loading, registry errors."""

from __future__ import annotations

import math

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

from lposs_lab.errors import ConfigError
from lposs_lab.models import (
    VLM_MODELS,
    VM_MODELS,
    MaskCLIP,
    ViTValueEncoder,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_vlm,
    create_vm,
)
from lposs_lab.models.maskclip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from lposs_lab.models.tiny import TINY_CLIP_ARCH
from lposs_lab.models.weights import parse_hf_hub

IMNET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMNET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _zero_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    out = torch.zeros(x.shape[0], 3, math.ceil(h / p) * p, math.ceil(w / p) * p)
    out[:, :, :h, :w] = x
    return out


def _timm_hook_reference(
    model: torch.nn.Module, timm_name: str, images: torch.Tensor, p: int, **arch: int
) -> torch.Tensor:
    """Value features via timm's own dynamic-size forward and a hook on the last qkv linear."""
    import timm

    arch = {**TINY_TIMM, **arch}
    dyn = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, **arch).eval()
    dyn.load_state_dict(model.state_dict())
    captured = {}
    handle = dyn.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    x = (_zero_pad(images, p) - IMNET_MEAN) / IMNET_STD
    with torch.no_grad():
        dyn.forward_features(x)
    handle.remove()
    qkv = captured["qkv"]  # [B, 1 + N, 3 * D]
    dim = qkv.shape[-1] // 3
    v = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, dim)[:, dyn.num_prefix_tokens :, 2]
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    return F.normalize(v.reshape(x.shape[0], gh, gw, dim), dim=-1)


@pytest.mark.parametrize("hw", [(224, 224), (20, 37), (96, 160)])
def test_dino_value_path_matches_timm_forward(hw: tuple[int, int]) -> None:
    model = tiny_timm("vit_base_patch16_224.dino", depth=3)
    enc = ViTValueEncoder(model, "test").eval()
    images = _images(2, *hw)
    with torch.no_grad():
        out = enc(images)
    gh, gw = math.ceil(hw[0] / 16), math.ceil(hw[1] / 16)
    assert out.shape == (2, gh, gw, 64) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, gh, gw), atol=1e-5)
    ref = _timm_hook_reference(model, "vit_base_patch16_224.dino", images, 16, depth=3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_dinov2_value_path_layerscale_and_downsampled_pos_embed() -> None:
    name = "vit_base_patch14_dinov2.lvd142m"
    model = tiny_timm(name)
    with torch.no_grad():  # make the layer-scale factors matter
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    enc = ViTValueEncoder(model, "test")
    assert enc.patch_size == 14 and enc.native_grid == (37, 37) and enc.embed_dim == 64
    images = _images(1, 30, 45, seed=1)  # grid 3x4, from the 37x37 native position embedding
    with torch.no_grad():
        out = enc(images)
    ref = _timm_hook_reference(model, name, images, 14)
    assert out.shape == (1, 3, 4, 64)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_registers_and_no_embed_class_prefix_tokens() -> None:
    name = "vit_base_patch14_reg4_dinov2.lvd142m"
    model = tiny_timm(name)
    assert model.num_prefix_tokens == 5 and model.no_embed_class
    images = _images(1, 28, 70, seed=7)
    with torch.no_grad():
        out = ViTValueEncoder(model, "test")(images)
    torch.testing.assert_close(out, _timm_hook_reference(model, name, images, 14), atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype: torch.dtype) -> None:
    images = _images(2, 40, 56, seed=8).cuda()
    for make in (create_vm, create_vlm):
        enc = make("tiny_random", device="cuda")
        with torch.no_grad():
            ref = enc(images)
            out = enc.to(dtype)(images)
        assert out.dtype == torch.float32 and out.device.type == "cuda"
        assert (out * ref).sum(-1).min() > 0.98
        if make is create_vlm:
            text = enc.encode_text(["a cat", "a dog"])
            assert text.dtype == torch.float32 and text.device.type == "cuda"


def test_dino_padding_is_zero_before_normalisation() -> None:
    enc = ViTValueEncoder(tiny_timm(), "test")
    images = _images(1, 20, 37, seed=2)
    with torch.no_grad():
        a = enc(images)
        b = enc(_zero_pad(images, 16))
        c = enc(F.pad(images, (0, 11, 0, 12), value=0.5))  # a grey pad must give other features
    assert a.shape == (1, 2, 3, 64)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def _maskclip_reference(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP step by step, the last block's value path via self-only attention (diagonal mask)."""
    vis = model.visual
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    x = (_zero_pad(images, 16) - mean) / std
    b = x.shape[0]
    gh, gw = x.shape[-2] // 16, x.shape[-1] // 16
    pos = vis.positional_embedding
    g0 = int(round(math.sqrt(pos.shape[0] - 1)))
    patch_pos = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    saved = vis.positional_embedding.data.clone()
    vis.positional_embedding.data = pos
    try:
        tokens = vis._embeds(x)  # open_clip's own: conv1, class token, + pos, ln_pre
    finally:
        vis.positional_embedding.data = saved
    for block in vis.transformer.resblocks[:-1]:
        tokens = block(tokens)
    last = vis.transformer.resblocks[-1]
    y = last.ln_1(tokens)
    n = y.shape[1]
    self_only = torch.full((n, n), float("-inf"))
    self_only.fill_diagonal_(0.0)
    v = last.attn(y, y, y, need_weights=False, attn_mask=self_only)[0]  # = out_proj(V(y))
    v = tokens + last.ls_1(v)
    v = v + last.ls_2(last.mlp(last.ln_2(v)))
    v = vis.ln_post(v)[:, 1:] @ vis.proj
    return F.normalize(v.reshape(b, gh, gw, -1), dim=-1)


@pytest.mark.parametrize("hw", [(224, 224), (20, 37), (112, 256)])
def test_maskclip_value_path_matches_step_by_step(hw: tuple[int, int]) -> None:
    model = tiny_clip(vision_cfg={"ls_init_value": 0.7, "layers": 3})
    enc = MaskCLIP(model, "test")
    images = _images(2, *hw, seed=3)
    with torch.no_grad():
        out = enc(images)
        ref = _maskclip_reference(model, images)
    gh, gw = math.ceil(hw[0] / 16), math.ceil(hw[1] / 16)
    assert out.shape == (2, gh, gw, 32) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, gh, gw), atol=1e-5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_maskclip_encode_text_batched_equals_open_clip() -> None:
    import open_clip

    model = tiny_clip()
    enc = MaskCLIP(model, "test", text_batch_size=3)
    texts = [f"a photo of a {w}." for w in ("cat", "dog", "sky", "road", "tree", "car", "person")]
    out = enc.encode_text(texts)
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer("ViT-B-16")(texts), normalize=True)
    assert out.shape == (7, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert enc.encode_text([]).shape == (0, 32)


def test_vm_loads_timm_checkpoint_from_fake_hf_cache(monkeypatch, tmp_path) -> None:
    hub = use_fake_hf_cache(monkeypatch, tmp_path)
    saved = tiny_timm("vit_base_patch16_224.dino")
    snap = put_in_hf_cache(
        hub, "timm/vit_base_patch16_224.dino", "model.safetensors", save_safetensors(saved, tmp_path / "m.st")
    )
    vm = create_vm("dino_b16", pretrained=True, **TINY_TIMM)
    assert_same_state(vm.model, saved)
    assert vm.weights_id.startswith("dino_b16:hf:timm/vit_base_patch16_224.dino/model.safetensors@")
    assert snap.parent.name in vm.weights_id
    assert not vm.training and not any(p.requires_grad for p in vm.parameters())
    images = _images(1, 40, 50, seed=4)
    with torch.no_grad():
        assert torch.equal(vm(images), ViTValueEncoder(saved, "x")(images))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_vlm_loads_open_clip_checkpoint_from_fake_hf_cache(monkeypatch, tmp_path, fmt: str) -> None:
    hub = use_fake_hf_cache(monkeypatch, tmp_path)
    saved = tiny_clip()
    repo = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    if fmt == "safetensors":
        put_in_hf_cache(hub, repo, "open_clip_model.safetensors", save_safetensors(saved, tmp_path / "c.st"))
    else:
        put_in_hf_cache(hub, repo, "open_clip_pytorch_model.bin", save_torch(saved, tmp_path / "c.bin"))
    vlm = create_vlm("maskclip_b16", pretrained=True, **TINY_CLIP_ARCH)
    assert_same_state(vlm.model, saved)
    assert repo in vlm.weights_id and vlm.embed_dim == 32 and vlm.patch_size == 16
    images = _images(1, 48, 33, seed=5)
    with torch.no_grad():
        assert torch.equal(vlm(images), MaskCLIP(saved, "x")(images))
    torch.testing.assert_close(vlm.encode_text(["a cat"]), MaskCLIP(saved, "x").encode_text(["a cat"]))


def test_local_checkpoint_paths_and_hf_hub_prefix(monkeypatch, tmp_path) -> None:
    hub = use_fake_hf_cache(monkeypatch, tmp_path)
    saved = tiny_timm("vit_base_patch8_224.dino")
    st = save_safetensors(saved, tmp_path / "dino8.safetensors")
    pth = save_torch(saved, tmp_path / "dino8.pth")
    for path in (st, str(pth)):
        vm = create_vm("dino_b8", pretrained=path, **TINY_TIMM)
        assert_same_state(vm.model, saved)
        assert vm.patch_size == 8 and str(path) in vm.weights_id
    put_in_hf_cache(hub, "someorg/my-dino8", "model.safetensors", st)
    vm = create_vm("dino_b8", pretrained="hf-hub:someorg/my-dino8", **TINY_TIMM)
    assert_same_state(vm.model, saved)
    assert "hf:someorg/my-dino8/model.safetensors@" in vm.weights_id
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_vm("dino_b8", pretrained=str(tmp_path / "nope.safetensors"), **TINY_TIMM)
    with pytest.raises(WeightsMismatchError, match="does not fit 'dino_b16'.*shape mismatches"):
        create_vm("dino_b16", pretrained=st, **TINY_TIMM)  # patch 8 weights into a patch 16 model


def test_parse_hf_hub() -> None:
    assert parse_hf_hub("hf-hub:org/repo") == ("org/repo", None, None)
    assert parse_hf_hub("hf-hub:org/repo/sub/w.bin@v1") == ("org/repo", "sub/w.bin", "v1")
    with pytest.raises(ValueError, match="org/repo"):
        parse_hf_hub("hf-hub:justone")


@pytest.mark.parametrize(
    ("kind", "name", "repo", "file"),
    [
        ("vm", "dino_b16", "timm/vit_base_patch16_224.dino", "model.safetensors"),
        ("vm", "dinov2_b14", "timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors"),
        ("vlm", "maskclip_b16", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"),
    ],
)
def test_missing_weights_offline_raise_one_line(monkeypatch, tmp_path, kind, name, repo, file) -> None:
    use_fake_hf_cache(monkeypatch, tmp_path)
    create = create_vm if kind == "vm" else create_vlm
    with pytest.raises(WeightsUnavailableError) as info:
        create(name, pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"'{name}'" in msg and repo in msg and file in msg and "HF_HUB_OFFLINE" in msg
    assert "(HF_HOME)" in msg and msg.endswith("pass a local file with pretrained=PATH")  # create_*'s
    assert isinstance(info.value, RuntimeError)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid names: dino_b16, dino_b8, dinov2_b14, tiny_random"):
        create_vm("dino_b32")
    with pytest.raises(ValueError, match="valid names: maskclip_b16, tiny_random"):
        create_vlm("clip")
    assert set(VM_MODELS) == {"dino_b16", "dino_b8", "dinov2_b14", "tiny_random"}
    methods = ("sclip", "clearclip", "naclip", "proxyclip", "scclip")
    assert set(VLM_MODELS) == {"maskclip_b16", "tiny_random"} | {
        f"{m}_{tag}" for m in methods for tag in ("b16", "tiny_random")
    }
    with pytest.raises(ConfigError, match=r"\(e\.g\. vm=dino_b16\)"):  # a user error: one line, exit 2
        create_vm("dino_b32")


def test_tiny_random_is_deterministic_frozen_and_keeps_global_rng() -> None:
    state = torch.random.get_rng_state()
    vm1, vm2 = create_vm("tiny_random"), create_vm("tiny_random", pretrained=False)
    vlm1, vlm2 = create_vlm("tiny_random"), create_vlm("tiny_random", device="cpu")
    assert torch.equal(state, torch.random.get_rng_state())
    assert_same_state(vm1, vm2)
    assert_same_state(vlm1, vlm2)
    assert vm1.weights_id == "tiny_random:random:0" and vlm1.weights_id == "tiny_random:random:0"
    assert (vm1.patch_size, vm1.embed_dim, vlm1.patch_size, vlm1.embed_dim) == (16, 64, 16, 32)
    for enc in (vm1, vlm1):
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert create_vm("tiny_random", depth=1).weights_id != vm1.weights_id  # arch overrides enter the id


def test_lower_precision_outputs_float32() -> None:
    images = _images(1, 32, 48, seed=6)
    for enc in (create_vm("tiny_random"), create_vlm("tiny_random")):
        with torch.no_grad():
            ref = enc(images)
            out = enc.to(torch.bfloat16)(images)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert (out * ref).sum(-1).min() > 0.98  # same features up to bf16 rounding


def test_bad_images_rejected() -> None:
    vm = create_vm("tiny_random")
    with pytest.raises(ValueError, match=r"\[B, 3, h, w\]"):
        vm(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="floating"):
        vm(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_has_trained_weights_follows_the_registry_and_pretrained() -> None:
    from lposs_lab.models.registry import has_trained_weights

    assert has_trained_weights("vm", "dino_b16", True) and has_trained_weights("vlm", "sclip_b16", True)
    assert not has_trained_weights("vm", "tiny_random", True)
    assert not has_trained_weights("vlm", "naclip_tiny_random", True)
    assert not has_trained_weights("vm", "dino_b16", False)
    assert not has_trained_weights("vlm", "maskclip_b16", None)
    assert has_trained_weights("vm", "tiny_random", "/some/checkpoint.safetensors")
    with pytest.raises(ConfigError, match="valid names"):
        has_trained_weights("vm", "dino_b32", True)
