"""Every paper variant as a config: it composes, maps onto the dataclasses, computes right, runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from reference import ref_refine_patches, ref_refine_pixels, rel_err

from lposs_lab.config import LPOSSConfig, PixelConfig, WindowConfig
from lposs_lab.models import create_vlm, create_vm
from lposs_lab.pixels import refine_pixels
from lposs_lab.predictor import LPOSS
from lposs_lab.propagation import refine_patches
from lposs_lab.lab.tasks.common import lposs_config, method_name

CONF = Path(__file__).resolve().parents[2] / "conf"
SMALL = ["window.short_side=48", "window.long_side=96"]


def _group_override(group: str, option: str) -> str:
    """``group=option`` when config.yaml's defaults name the group, else ``+group=option`` (append)."""
    text = (CONF / "config.yaml").read_text()
    listed = any(line.strip().startswith(f"- {group}:") or line.strip().startswith(f"- optional {group}:")
                 for line in text.splitlines())
    return f"{group}={option}" if listed else f"+{group}={option}"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# (group, option) -> expected dataclass fields
EXPECTED = {
    ("vm", "dino_b16"): {"vm": "dino_b16"},
    ("vm", "dino_b8"): {"vm": "dino_b8"},
    ("vm", "dinov2_b14"): {"vm": "dinov2_b14"},
    ("vm", "clip_b16"): {"vm": "clip_b16"},
    ("window", "w224"): {"window.size": 224, "window.stride": 112, "window.joint": True},
    ("window", "w448"): {"window.size": 448, "window.stride": 224, "window.ensemble": ()},
    ("window", "none"): {"window.size": 0},
    ("window", "ensemble"): {"window.size": 224, "window.ensemble": ((448, 224),)},
    ("window", "per_window"): {"window.size": 224, "window.joint": False},
    ("pixel", "lab"): {"pixel.feature": "lab"},
    ("pixel", "depth"): {"pixel.feature": "depth", "pixel.depth_model": "depth_anything_v2_small"},
    ("pixel", "lab_depth"): {"pixel.feature": "lab+depth"},
    ("adjacency", "power"): {"lp.appearance": "power"},
    ("adjacency", "exp"): {"lp.appearance": "exp"},
    ("adjacency", "rbf"): {"lp.spatial": "rbf"},
    ("adjacency", "linear"): {"lp.spatial": "linear"},
    ("adjacency", "no_spatial"): {"lp.spatial": "none"},
    ("adjacency", "pixel_binary"): {"pixel.spatial": "binary"},
    ("adjacency", "pixel_rbf"): {"pixel.spatial": "rbf"},
    ("experiment", "dino_b8"): {"vm": "dino_b8", "lp.k": 800},
    ("experiment", "dinov2_b14"): {"vm": "dinov2_b14", "lp.gamma": 7.0},
    ("experiment", "table4_no_spatial"): {"lp.spatial": "none"},
    ("experiment", "table4_clip_sa"): {"vm": "clip_b16"},
    ("experiment", "table3_ensemble"): {"window.ensemble": ((448, 224),)},
}


def _field(config: LPOSSConfig, dotted: str):
    obj = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("group,option", sorted(EXPECTED), ids=lambda v: str(v))
def test_config_group_resolves_onto_the_dataclasses(group, option):
    over = option if group in ("vm", "window", "pixel", "method") else None
    cfg = _compose(f"{group}={over}" if over else _group_override(group, option))
    config = lposs_config(cfg)
    for dotted, value in EXPECTED[(group, option)].items():
        assert _field(config, dotted) == value, dotted


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_for_evaluate_with_report_and_logger_tags(name):
    cfg = _compose(_group_override("experiment", name), "dataset=voc")
    assert cfg.task == "evaluate"
    assert cfg.report.table and cfg.report.experiment == name
    assert cfg.logger.group == cfg.report.table and name in list(cfg.logger.tags)
    lposs_config(cfg)  # maps onto the dataclasses


@pytest.mark.parametrize(
    "name,param", [("fig10_k", "lp.k"), ("fig10_sigma", "lp.sigma"), ("fig10_r", "pixel.r")]
)
def test_hparams_search_is_a_multirun_sweep(name, param):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[_group_override("hparams_search", name)], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert len(str(cfg.hydra.sweeper.params[param]).split(",")) >= 8
    assert cfg.report.x == param


@pytest.mark.parametrize(
    "kernel",
    [{"appearance": "power"}, {"appearance": "exp", "sigma_a": 0.3}, {"spatial": "linear", "sigma": 0.004},
     {"spatial": "none"}, {"appearance": "exp", "spatial": "none", "sigma_a": 0.5}],
)
def test_patch_kernel_variants_match_the_float64_reference(kernel):
    g = torch.Generator().manual_seed(3)
    n = 60
    feats = torch.randn(n, 8, generator=g)
    pos = torch.rand(n, 2, generator=g) * 200
    y = torch.randn(n, 4, generator=g)
    got = refine_patches(feats, pos, y, k=12, **kernel)
    want = ref_refine_patches(feats.numpy(), pos.numpy(), y.numpy(), k=12, **kernel)
    assert rel_err(got.numpy(), want) < 1e-4


@pytest.mark.parametrize("feature", ["lab", "depth", "lab+depth"])
@pytest.mark.parametrize("spatial", ["binary", "rbf"])
def test_pixel_variants_match_the_float64_reference(feature, spatial):
    from lposs_lab.models.depth import pixel_features

    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 12, 15, generator=g)
    depth = torch.rand(12, 15, generator=g)
    scores = torch.randn(3, 12, 15, generator=g)
    feats = pixel_features(img, depth, feature, depth_weight=0.5)
    assert feats.shape[0] == {"lab": 3, "depth": 1, "lab+depth": 4}[feature]
    got = refine_pixels(img, scores, r=5, tau=0.05, spatial=spatial, sigma_s=2.0, features=feats)
    ref_feats = None if feature == "lab" else feats.double().numpy()
    if feature == "lab+depth":  # the reference's own Lab, plus the depth channel
        from reference import ref_lab_features

        ref_feats = np.concatenate([ref_lab_features(img.numpy()), 0.5 * depth.double().numpy()[None]])
    want = ref_refine_pixels(img.numpy(), scores.numpy(), r=5, tau=0.05, spatial=spatial, sigma_s=2.0,
                             features=ref_feats)
    assert rel_err(got.numpy(), want) < 1e-3


@pytest.fixture(scope="module")
def encoders():
    return create_vm("tiny_random", pretrained=False), create_vlm("tiny_random", pretrained=False)


def _image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)


WIN = WindowConfig(size=32, stride=16, short_side=48, long_side=96)


def test_ensemble_is_the_mean_of_its_window_setups(encoders):
    vm, vlm = encoders
    win = replace(WIN, ensemble=((48, 24),))
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=win)
    classes = ["a", "b", "c"]
    ens = LPOSS(vm, vlm, cfg).predict(_image(), classes)
    one = LPOSS(vm, vlm, replace(cfg, window=WIN)).predict(_image(), classes)
    two = LPOSS(vm, vlm, replace(cfg, window=WindowConfig(48, 24, 48, 96))).predict(_image(), classes)
    assert torch.allclose(ens.low_res_scores, (one.low_res_scores + two.low_res_scores) / 2, atol=1e-6)


def test_per_window_graphs_differ_from_the_joint_graph_and_equal_separate_solves(encoders):
    vm, vlm = encoders
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=replace(WIN, joint=False))
    model = LPOSS(vm, vlm, cfg, method="lposs")
    model.set_classes(["a", "b"])
    feats = model.extract(_image())
    per, _ = model.propagate(feats)
    joint_model = LPOSS(vm, vlm, replace(cfg, window=WIN), method="lposs")
    joint_model.set_classes(["a", "b"])
    joint, _ = joint_model.propagate(feats)
    assert not torch.allclose(per, joint)
    # window 0 alone as a one-window image gives that window's rows of the per-window result
    from lposs_lab.windows import patch_positions

    b, gh, gw, _ = feats.vm.shape
    pos = patch_positions(feats.windows[:1], (gh, gw), 16)
    y0 = feats.vlm[0].reshape(gh * gw, -1) @ model._text.T
    x0 = refine_patches(feats.vm[0].reshape(gh * gw, -1), pos, y0, k=400)
    assert b > 1 and x0.shape == (gh * gw, 2)


def test_clip_b16_uses_the_vlm_features_as_graph_features(encoders):
    vm, vlm = encoders
    base = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WIN)
    clip = LPOSS(vlm, vlm, replace(base, vm="clip_b16"), method="lposs")
    via_flag = LPOSS(vm, vlm, replace(base, lp=replace(base.lp, graph_features="vlm")), method="lposs")
    dino = LPOSS(vm, vlm, base, method="lposs")
    a = clip.predict(_image(), ["a", "b", "c"]).low_res_scores
    b = via_flag.predict(_image(), ["a", "b", "c"]).low_res_scores
    c = dino.predict(_image(), ["a", "b", "c"]).low_res_scores
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c)
    feats = clip.extract(_image())
    assert feats.vm is feats.vlm  # one forward pass, shared


def test_from_config_builds_clip_b16_and_depth_variants_offline():
    cfg = LPOSSConfig(vm="clip_b16", vlm="tiny_random", device="cpu", window=WIN,
                      pixel=PixelConfig(feature="lab+depth", depth_model="tiny_random"))
    model = LPOSS.from_config(cfg)
    assert model.vm is model.vlm and model.depth_model is not None
    pred = model.predict(_image(), ["a", "b"])
    assert pred.labels.shape == (40, 56) and torch.isfinite(pred.low_res_scores).all()
    lab_only = LPOSS(model.vm, model.vlm, replace(cfg, pixel=PixelConfig()))
    assert not torch.allclose(pred.low_res_scores, lab_only.predict(_image(), ["a", "b"]).low_res_scores)
    with pytest.raises(ValueError, match="valid: lab, depth, lab\\+depth"):
        LPOSS(model.vm, model.vlm, replace(cfg, pixel=PixelConfig(feature="rgb")))


VARIANT_RUNS = [
    ["window=none"], ["window=w448"], ["window=ensemble"], ["window=per_window"], ["vm=clip_b16"],
    ["pixel=depth", "pixel.depth_model=tiny_random"], ["pixel=lab_depth", "pixel.depth_model=tiny_random"],
    ["method=lposs", "ADJ:exp"], ["method=lposs", "ADJ:linear"], ["method=lposs", "ADJ:no_spatial"],
    ["ADJ:pixel_rbf"], ["method=maskclip"],
]


@pytest.mark.parametrize("overrides", VARIANT_RUNS, ids=lambda o: "+".join(o))
def test_every_variant_runs_end_to_end_with_tiny_models(overrides):
    over = [_group_override("adjacency", o[4:]) if o.startswith("ADJ:") else o for o in overrides]
    cfg = _compose(*over, "vlm=tiny_random", "device=cpu", *SMALL,
                   *([] if "vm=clip_b16" in over else ["vm=tiny_random"]))
    config = lposs_config(cfg)
    model = LPOSS.from_config(config, method=method_name(cfg, config))
    pred = model.predict(_image(), ["sky", "tree;bush", "road"])
    assert pred.labels.shape == (40, 56)
    assert pred.low_res_scores.shape[0] == 3 and torch.isfinite(pred.low_res_scores).all()


@pytest.mark.parametrize("experiment", ["table3_ensemble"])
def test_experiments_evaluate_end_to_end_on_synthetic_data(experiment, tmp_path, monkeypatch):
    import json

    from synthetic_data import make_dataset

    from lposs_lab.lab.tasks.evaluate import evaluate

    make_dataset(tmp_path / "data", "voc20", 2, (40, 56))
    monkeypatch.chdir(tmp_path)
    vm = [] if experiment == "table4_clip_sa" else ["vm=tiny_random"]
    cfg = _compose(
        _group_override("experiment", experiment), "dataset=voc20", f"data_root={tmp_path / 'data'}", *vm,
        "vlm=tiny_random", "device=cpu", *SMALL, "logger=none", "trainer.enable_progress_bar=false",
        "num_workers=0", f"results_json={tmp_path / 'results.json'}", f"state_dir={tmp_path / 'states'}",
        f"++cache.dir={tmp_path / 'cache'}", f"out={tmp_path}",
    )
    res = evaluate(cfg)
    assert res is not None and res["num_images"] == 2 and 0 <= res["mIoU"] <= 100
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["report"]["experiment"] == experiment
    assert len(list((tmp_path / "cache").glob("*/shard-*"))) >= 1  # features were cached
