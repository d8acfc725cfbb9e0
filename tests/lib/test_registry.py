"""Encoders added from outside the package (register_vlm / register_vm, import paths, the Hydra groups), the
error wording of each front-end, and ProxyCLIP's proxy model (vfm / vfm_pretrained)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from model_fixtures import (
    TINY_TIMM,
    assert_same_state,
    put_in_hf_cache,
    save_safetensors,
    save_torch,
    tiny_timm,
    use_fake_hf_cache,
)

import lposs_lab
from lposs_lab import LPOSS, LPOSSConfig, PixelConfig, WindowConfig
from lposs_lab.errors import ConfigError, WeightsUnavailableError
from lposs_lab.models import VLM_MODELS, VM_MODELS, create_vlm, create_vm, register_vlm, register_vm
from lposs_lab.models.entries import OpenClipVLM, TimmVM
from lposs_lab.models.registry import has_trained_weights, vlm_label
from lposs_lab.models.tiny import TINY_CLIP_ARCH, TINY_VIT_ARCH

CONF = Path(__file__).resolve().parents[2] / "conf"
SMALL = WindowConfig(short_side=112, size=112, stride=112)
CLASSES = ["cat", "sky;cloud", "road"]


@pytest.fixture(autouse=True)
def clean_registry():
    """Every test here registers encoders; the tables are as before after each."""
    vms, vlms = dict(VM_MODELS), dict(VLM_MODELS)
    yield
    for table, saved in ((VM_MODELS, vms), (VLM_MODELS, vlms)):
        table.clear()
        table.update(saved)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    arr[:40] = (30, 90, 200)
    return arr


def my_clip_vlm(pretrained=True, **arch):
    """A predictor defined in this test module: MaskCLIP on a tiny 48-d CLIP of its own."""
    entry = OpenClipVLM("my_clip_vlm", "ViT-B-16", None, base_arch={**TINY_CLIP_ARCH, "embed_dim": 48})
    return entry(pretrained, **arch)


def compose_run(tmp_path: Path, *overrides: str, window: int = 112):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}", "device=cpu", "text_cache_dir=null",
            f"window.short_side={window}", f"window.size={window}", f"window.stride={window}", *overrides,
        ])  # fmt: skip


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A module outside the package, importable as ``name`` (what a user's own package is)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        from lposs_lab import register_vlm
        from lposs_lab.models.entries import OpenClipVLM
        from lposs_lab.models.tiny import TINY_CLIP_ARCH

        @register_vlm(has_weights=False, label="Plugin CLIP")
        def plugin_vlm(pretrained=True, **arch):
            return OpenClipVLM("plugin_vlm", "ViT-B-16", None, base_arch=TINY_CLIP_ARCH)(pretrained, **arch)

        def undecorated_vlm(pretrained=True, **arch):
            return plugin_vlm(pretrained, **arch)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))


# ----------------------------------------------------------------------------- register from outside
def test_a_registered_predictor_builds_through_create_vlm_and_from_config(photo):
    assert lposs_lab.register_vlm is register_vlm and lposs_lab.register_vm is register_vm
    assert register_vlm(has_weights=False, label="My CLIP")(my_clip_vlm) is my_clip_vlm  # returned as is
    vlm = create_vlm("my_clip_vlm")
    assert vlm.embed_dim == 48 and vlm.weights_id == "my_clip_vlm:random:0"
    assert not vlm.training and not any(p.requires_grad for p in vlm.parameters())
    assert_same_state(vlm, my_clip_vlm(False))  # the builder's own model, seeded
    assert not has_trained_weights("vlm", "my_clip_vlm", True)  # has_weights=False
    assert has_trained_weights("vlm", "my_clip_vlm", "/a/checkpoint.safetensors")
    assert vlm_label("my_clip_vlm") == "My CLIP"
    model = LPOSS.from_config(vm="tiny_random", vlm="my_clip_vlm", device="cpu", window=SMALL)
    assert model.vlm.weights_id == "my_clip_vlm:random:0"
    pred = model.predict(photo, classes=CLASSES)
    assert pred.labels.shape == (90, 130) and pred.low_res_scores.shape[0] == 3
    assert torch.isfinite(pred.low_res_scores).all()
    with pytest.raises(ConfigError, match="'my_clip_vlm' is already registered"):
        register_vlm(name="my_clip_vlm")(lambda pretrained=True: None)
    register_vlm(my_clip_vlm, has_weights=False)  # the same builder again (a module imported twice): fine


def test_a_registered_vm_builds_through_create_vm_and_from_config(photo):
    @register_vm(has_weights=False)
    def my_vit_b8(pretrained=True, **arch):
        entry = TimmVM("my_vit_b8", "vit_base_patch8_224.dino", None, base_arch=TINY_VIT_ARCH)
        return entry(pretrained, **arch)

    vm = create_vm("my_vit_b8")
    assert vm.patch_size == 8 and vm.embed_dim == 64 and vm.weights_id == "my_vit_b8:random:0"
    assert not has_trained_weights("vm", "my_vit_b8", True)
    model = LPOSS.from_config(vm="my_vit_b8", vlm="tiny_random", device="cpu", window=SMALL, method="lposs")
    feats = model.extract(photo)
    assert feats.vm.shape[1:] == (14, 14, 64) and feats.vlm.shape[1:3] == (14, 14)  # the VM's 8-px grid


def test_a_registered_predictor_through_the_hydra_groups(tmp_path, photo):
    from lposs_lab.lab.tasks.config import build_predictor, lposs_config, random_init_encoders

    register_vlm(my_clip_vlm, has_weights=False)
    cfg = compose_run(tmp_path, "vm=tiny_random", "vlm.name=my_clip_vlm")
    config = lposs_config(cfg)
    assert config.vlm == "my_clip_vlm" and config.vlm_pretrained is None
    assert random_init_encoders(config) == ["vm=tiny_random", "vlm=my_clip_vlm"]
    model = build_predictor(cfg)
    assert model.vlm.embed_dim == 48 and model.vlm.weights_id == "my_clip_vlm:random:0"
    assert model.predict(photo, classes=CLASSES).labels.shape == (90, 130)


def test_import_paths_and_target_name_builders_outside_the_package(tmp_path, monkeypatch):
    from lposs_lab.lab.tasks.config import build_predictor, lposs_config

    _plugin(tmp_path, monkeypatch, "lposs_test_plugin")
    vlm = create_vlm("lposs_test_plugin.plugin_vlm")  # the module's decorator registers it
    assert vlm.weights_id == "plugin_vlm:random:0" and "plugin_vlm" in VLM_MODELS
    assert not has_trained_weights("vlm", "lposs_test_plugin.plugin_vlm", True)  # its has_weights=False
    assert vlm_label("plugin_vlm") == "Plugin CLIP"
    other = create_vlm("lposs_test_plugin:undecorated_vlm")  # not decorated: registered by its path
    assert_same_state(other, vlm)
    assert has_trained_weights("vlm", "lposs_test_plugin:undecorated_vlm", True)  # the default
    cfg = compose_run(tmp_path, "vm=tiny_random", "+vlm._target_=lposs_test_plugin.plugin_vlm")
    assert lposs_config(cfg).vlm == "lposs_test_plugin.plugin_vlm"
    assert build_predictor(cfg).vlm.weights_id == "plugin_vlm:random:0"
    with pytest.raises(ConfigError, match=r"vlm=no_such_module_xyz\.f: cannot import no_such_module_xyz"):
        create_vlm("no_such_module_xyz.f")
    with pytest.raises(ConfigError, match="module lposs_test_plugin has no builder 'missing'"):
        create_vlm("lposs_test_plugin.missing")
    with pytest.raises(ConfigError, match=r"valid names: maskclip_b16, .*register_vlm"):
        create_vlm("unknown")


def test_row_labels_come_from_the_registry_entries():
    from lposs_lab.lab.tables import predictor_label, results_table

    assert [predictor_label(n) for n in ("sclip_b16", "scclip_tiny_random", "proxyclip_b16")] == [
        "SCLIP", "SC-CLIP", "ProxyCLIP",
    ]  # fmt: skip
    assert predictor_label("maskclip_b16") is None and predictor_label("tiny_random") is None
    register_vlm(name="my_fancy_clip", label="Fancy")(my_clip_vlm)  # underscores in the stem
    assert predictor_label("my_fancy_clip") == "Fancy"
    assert predictor_label("elsewhere_vlm") == "elsewhere_vlm"  # registered in another process: its name
    runs = [
        {"dataset": "voc", "method": "lposs_plus", "mIoU": 40.0, "overrides": [f"vlm={name}"],
         "config": {"vlm": {"name": name}}}
        for name in ("my_fancy_clip", "sclip_b16")
    ]  # fmt: skip
    assert [label for label, _ in results_table(runs).rows] == ["Fancy + LPOSS+", "SCLIP + LPOSS+"]


# ----------------------------------------------------------------------------- item 8: the error's words
def test_missing_weights_name_the_python_keywords_or_the_hydra_overrides(tmp_path, monkeypatch):
    from lposs_lab.lab.tasks.config import build_predictor

    use_fake_hf_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsUnavailableError) as info:
        LPOSS.from_config(vm="dino_b16", vlm="maskclip_b16", device="cpu")
    msg = str(info.value)
    assert "vlm 'maskclip_b16'" in msg and "vm 'dino_b16'" in msg and "HF_HUB_OFFLINE" in msg
    assert msg.endswith("pass local files: vlm_pretrained=PATH vm_pretrained=PATH") and "\n" not in msg
    assert "vm.pretrained" not in msg and "vlm.pretrained" not in msg
    with pytest.raises(WeightsUnavailableError) as info:
        LPOSS.from_config(vm="dino_b8", vlm="tiny_random", device="cpu")
    assert str(info.value).endswith("or pass a local file with vm_pretrained=PATH")
    with pytest.raises(WeightsUnavailableError) as info:  # the command line's front-end
        build_predictor(compose_run(tmp_path, "vm=dino_b16", "vlm=maskclip_b16"))
    msg = str(info.value)
    assert msg.endswith("pass local files: vlm.pretrained=PATH vm.pretrained=PATH")
    assert "_pretrained=" not in msg
    # ProxyCLIP's proxy model is named as such
    with pytest.raises(WeightsUnavailableError) as info:
        LPOSS.from_config(vm="tiny_random", vlm="proxyclip_tiny_random", vfm="dino_b8", vfm_pretrained=True)
    assert "vfm 'dino_b8'" in str(info.value) and str(info.value).endswith("with vfm_pretrained=PATH")
    cfg = compose_run(tmp_path, "vm=tiny_random", "vlm=proxyclip_tiny_random", "vlm.vfm=dino_b8",
                      "vlm.vfm_pretrained=true")  # fmt: skip
    with pytest.raises(WeightsUnavailableError, match=r"with vlm\.vfm_pretrained=PATH$"):
        build_predictor(cfg)


# ----------------------------------------------------------------------------- item 16: the proxy model
@pytest.fixture
def tiny_b8():
    """A tiny DINO-B/8-family VM in the registry, so real checkpoint files stay small."""
    register_vm(TimmVM("tiny_b8", "vit_base_patch8_224.dino", None, base_arch=TINY_VIT_ARCH))
    return tiny_timm("vit_base_patch8_224.dino", seed=21)


def test_vfm_pretrained_path_loads_that_file(tmp_path, tiny_b8):
    path = save_torch(tiny_b8, tmp_path / "dino8.pth")
    vlm = create_vlm("proxyclip_tiny_random", vfm="tiny_b8", vfm_pretrained=path)
    assert_same_state(vlm.vfm.model, tiny_b8)
    assert vlm.patch_size == 8 and vlm.vfm.pos_embed_mode == "dino" and str(path.resolve()) in vlm.weights_id
    model = LPOSS.from_config(vm="tiny_random", vlm="proxyclip_tiny_random", vfm="tiny_b8",
                              vfm_pretrained=str(path), device="cpu", window=SMALL)  # fmt: skip
    assert_same_state(model.vlm.vfm.model, tiny_b8)
    assert model.config.vfm == "tiny_b8" and model.vlm.vfm.weights_id != model.vm.weights_id


def test_vfm_defaults_to_the_vms_weights_when_it_is_the_vm(tmp_path, tiny_b8, photo, monkeypatch):
    from lposs_lab.lab.tasks.config import build_predictor
    from lposs_lab.models.dino import ViTValueEncoder

    path = save_safetensors(tiny_b8, tmp_path / "dino8.safetensors")
    cfg = compose_run(tmp_path, "vm=tiny_random", "vm.name=tiny_b8", f"vm.pretrained={path}",
                      "vlm=proxyclip_tiny_random", "vlm.vfm=tiny_b8", "method=lposs", window=224)  # fmt: skip
    model = build_predictor(cfg)
    assert_same_state(model.vm.model, tiny_b8)
    assert_same_state(model.vlm.vfm.model, tiny_b8)  # vlm.vfm_pretrained unset: vm.pretrained
    assert model.vlm.vfm.weights_id == model.vm.weights_id
    calls = {"vfm": 0}
    tokens = ViTValueEncoder.values_and_tokens

    def counting(self, images):
        calls["vfm"] += self is model.vlm.vfm
        return tokens(self, images)

    monkeypatch.setattr(ViTValueEncoder, "values_and_tokens", counting)
    feats = model.extract(photo)  # 224 windows at patch 8: the native 28x28 grid, where both rules agree
    assert calls["vfm"] == 0 and feats.vm.shape[1:3] == (28, 28)  # one shared DINO pass per batch
    other = LPOSS.from_config(vm="tiny_random", vlm="proxyclip_tiny_random", vfm="tiny_b8", device="cpu")
    assert "random:" in other.vlm.vfm.weights_id  # another VM: the proxy model's registry weights (none)


def test_vfm_default_is_fetched_from_the_hub_cache_in_its_real_format(tmp_path, monkeypatch):
    hub = use_fake_hf_cache(monkeypatch, tmp_path)
    dino8 = tiny_timm("vit_base_patch8_224.dino", seed=22)
    put_in_hf_cache(hub, "timm/vit_base_patch8_224.dino", "model.safetensors",
                    save_safetensors(dino8, tmp_path / "d8.safetensors"))  # fmt: skip
    vlm = create_vlm("proxyclip_tiny_random", vfm="dino_b8", vfm_pretrained=True, vfm_arch=TINY_TIMM)
    assert_same_state(vlm.vfm.model, dino8)
    assert "dino_b8:hf:timm/vit_base_patch8_224.dino/model.safetensors@" in vlm.weights_id


def test_invalid_vfm_lists_the_valid_choices(tmp_path):
    from lposs_lab.lab.tasks.config import build_predictor

    with pytest.raises(ConfigError, match="vfm='dino_b32'; valid choices: dino_b16, dino_b8, dinov2_b14"):
        create_vlm("proxyclip_tiny_random", vfm="dino_b32")
    cfg = compose_run(tmp_path, "vm=tiny_random", "vlm=proxyclip_tiny_random", "vlm.vfm=dino_b32")
    with pytest.raises(ConfigError, match="valid choices: dino_b16, dino_b8, dinov2_b14, tiny_random"):
        build_predictor(cfg)
    with pytest.raises(ConfigError, match="vfm is for ProxyCLIP only: vlm=sclip_tiny_random"):
        LPOSS.from_config(vm="tiny_random", vlm="sclip_tiny_random", vfm="dino_b8")
    with pytest.raises(ConfigError, match="vfm_pretrained is for ProxyCLIP only"):
        LPOSS.from_config(vm="tiny_random", vlm="tiny_random", vfm_pretrained="x.pth")


def test_own_proxyclip_follows_the_released_protocol_dino_b8(tmp_path):
    from lposs_lab.lab.tasks.config import lposs_config

    cfg = compose_run(tmp_path, "experiment=own_proxyclip", "dataset=voc")
    config = lposs_config(cfg)
    assert (config.vlm, config.vfm, config.vfm_pretrained) == ("proxyclip_b16", "dino_b8", None)
    assert "B/8" in cfg.report.row
    assert lposs_config(compose_run(tmp_path, "vlm=proxyclip_b16")).vfm is None  # the entry's dino_b16


# ----------------------------------------------------------------------------- pixel features
def test_only_depth_features_build_a_depth_model(photo, monkeypatch):
    from lposs_lab import pixels
    from lposs_lab.config import PIXEL_FEATURE_NAMES
    from lposs_lab.models import depth as depth_module

    monkeypatch.setattr(depth_module, "create_depth", lambda *a, **k: pytest.fail("depth model built"))
    names, features = list(PIXEL_FEATURE_NAMES), dict(pixels.PIXEL_FEATURES)
    try:
        pixels.register_pixel_feature("rgb", pixels.PixelFeature(lambda image, depth, w: image * 1.0))
        assert "rgb" in PIXEL_FEATURE_NAMES  # PixelConfig accepts it now
        cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=SMALL,
                          pixel=PixelConfig(feature="rgb"))  # fmt: skip
        model = LPOSS.from_config(cfg)
        assert model.depth_model is None
        feats = model.extract(photo)
        assert torch.equal(model.pixel_features(feats), feats.image)  # the feature's own builder
        assert model.predict(photo, classes=CLASSES).labels.shape == (90, 130)
    finally:
        PIXEL_FEATURE_NAMES[:] = names
        pixels.PIXEL_FEATURES.clear()
        pixels.PIXEL_FEATURES.update(features)
    assert pixels.needs_depth("depth") and pixels.needs_depth("lab+depth") and not pixels.needs_depth("lab")
    with pytest.raises(ValueError, match="valid choices: lab, depth, lab\\+depth"):
        pixels.needs_depth("rgb2")


def test_a_depth_feature_still_builds_its_depth_model(monkeypatch):
    from lposs_lab.models import depth as depth_module

    built = []
    real = depth_module.create_depth
    monkeypatch.setattr(
        depth_module, "create_depth", lambda name, **kw: built.append(name) or real(name, **kw)
    )
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=SMALL,
                      pixel=PixelConfig(feature="lab+depth", depth_model="tiny_random"))  # fmt: skip
    assert LPOSS.from_config(cfg).depth_model is not None and built == ["tiny_random"]


# ----------------------------------------------------------------------------- benchmarks, loggers
def test_a_new_benchmark_column_keeps_tables_importable_and_the_paper_average(tmp_path, monkeypatch):
    """tables.py with one more DATASET_COLUMNS entry (as a contributor would add it) imports and renders."""
    import importlib.util

    from lposs_lab.lab import tables

    source = Path(tables.__file__).read_text()
    anchor = '    "cityscapes": "City",\n'
    assert source.count(anchor) == 1
    edited = tmp_path / "tables_edited.py"
    edited.write_text(source.replace(anchor, anchor + '    "mapillary": "Mapillary",\n'))
    spec = importlib.util.spec_from_file_location("lposs_lab.lab._tables_edited", edited)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)  # a strict zip with the paper's 8 numbers failed here
    assert list(module.DATASET_COLUMNS)[-1] == "mapillary" and module.PAPER == tables.PAPER
    values = {d: 30.0 + i for i, d in enumerate(module.DATASET_COLUMNS)}
    runs = [{"dataset": d, "method": "lposs", "mIoU": v, "config": {}} for d, v in values.items()]
    table = module.results_table(runs)
    assert table.header[-3:] == ("Mapillary", "Avg", "Paper Avg")
    label, cells = table.rows[0]
    paper8 = [values[d] for d in tables.PAPER_DATASETS]
    assert label == "LPOSS" and cells[8] == "38.0" and cells[9] == f"{sum(paper8) / 8:.1f}"  # Avg: the 8
    paper_label, paper_cells = table.rows[1]
    paper_avg = sum(tables.PAPER["mIoU"]["lposs"].values()) / 8
    assert paper_label == "  paper (Table 1)" and paper_cells[8:10] == ("-", f"{paper_avg:.1f}")


def test_logger_tables_follow_the_logger_class_not_its_name(tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from lposs_lab.lab.callbacks import write_logger_tables

    class TeamCSVLogger(CSVLogger):  # another class name: recognised as a CSV logger all the same
        pass

    summary = {
        "per_class_iou": {"cat": 50.0, "sky": None},
        "per_image": [{"id": "a", "mIoU": 40.0, "seconds": 1.5}],
    }
    csv_logger = TeamCSVLogger(tmp_path / "csv", name="run")
    board = TensorBoardLogger(tmp_path / "tb", name="run")
    write_logger_tables([csv_logger, board], summary, "voc")
    folder = Path(csv_logger.log_dir)
    assert (folder / "per_class.csv").read_text().splitlines() == ["class,IoU", "cat,50.0", "sky,"]
    assert (folder / "per_image.csv").read_text().splitlines() == ["id,mIoU,seconds", "a,40.0,1.5"]
    assert not list((tmp_path / "tb").rglob("*.csv"))  # no table writer for TensorBoard
