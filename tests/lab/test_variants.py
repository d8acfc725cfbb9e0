"""Every paper variant as a config: it composes, maps onto the dataclasses, and the predictor it builds gives
the numbers of the same variant composed by hand from the library's stages (tests/support/pipeline.py).

The variants' maths against the float64 reference is tested in tests/lib/test_predictor_variants.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from pipeline import scores_by_hand

from lposs_lab.config import LPConfig, LPOSSConfig, PixelConfig, WindowConfig
from lposs_lab.lab.tasks.config import lposs_config, method_name
from lposs_lab.predictor import LPOSS

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


@pytest.mark.parametrize(  # _base.yaml is what the recipes share, not a recipe
    "name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))
)
def test_every_experiment_composes_for_evaluate_with_report_tags_and_wandb_group(name):
    cfg = _compose(_group_override("experiment", name), "dataset=voc", "logger=[csv,wandb]")
    assert cfg.task == "evaluate"
    assert cfg.report.table and cfg.report.experiment == name
    assert list(cfg.tags) == [cfg.report.table, name]
    assert cfg.logger.wandb.group == name and list(cfg.logger.wandb.tags) == list(cfg.tags)  # one recipe
    assert cfg.logger.csv._target_.endswith("CSVLogger")
    lposs_config(cfg)  # maps onto the dataclasses (which validate every value)


@pytest.mark.parametrize(
    "name,param", [("fig10_k", "lp.k"), ("fig10_sigma", "lp.sigma"), ("fig10_r", "pixel.r")]
)
def test_hparams_search_is_a_multirun_sweep(name, param):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[_group_override("hparams_search", name)], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert len(str(cfg.hydra.sweeper.params[param]).split(",")) >= 8
    assert cfg.report.x == param


def _image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)


# a 40x56 image resized to 240x336: four windows of w224, one of w448; the pixel stage over 80k pixels
# (and a 5x5 pixel neighbourhood, to keep it quick)
VARIANT_SIZE = ["window.short_side=240", "window.long_side=336", "pixel.r=5"]
BASE = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", pixel=PixelConfig(r=5),
                   window=WindowConfig(size=224, stride=112, short_side=240, long_side=336))
DEPTH = PixelConfig(r=5, feature="depth", depth_model="tiny_random")

# overrides -> (the dataclasses they mean, written out here, and the method)
VARIANT_RUNS = {
    "window=none": (replace(BASE, window=replace(BASE.window, size=0)), "lposs_plus"),
    "window=w448": (replace(BASE, window=replace(BASE.window, size=448, stride=224)), "lposs_plus"),
    "window=ensemble": (replace(BASE, window=replace(BASE.window, ensemble=((448, 224),))), "lposs_plus"),
    "window=per_window": (replace(BASE, window=replace(BASE.window, joint=False)), "lposs_plus"),
    "vm=clip_b16": (replace(BASE, vm="clip_b16"), "lposs_plus"),
    "pixel=depth,pixel.depth_model=tiny_random": (replace(BASE, pixel=DEPTH), "lposs_plus"),
    "pixel=lab_depth,pixel.depth_model=tiny_random": (
        replace(BASE, pixel=replace(DEPTH, feature="lab+depth")), "lposs_plus"
    ),
    "method=lposs,ADJ:exp": (replace(BASE, lp=LPConfig(appearance="exp", sigma_a=0.1)), "lposs"),
    "method=lposs,ADJ:linear": (replace(BASE, lp=LPConfig(spatial="linear")), "lposs"),
    "method=lposs,ADJ:no_spatial": (replace(BASE, lp=LPConfig(spatial="none")), "lposs"),
    "ADJ:pixel_rbf": (replace(BASE, pixel=PixelConfig(r=5, spatial="rbf", sigma_s=6.0)), "lposs_plus"),
    "method=maskclip": (BASE, "maskclip"),
}


@pytest.fixture(scope="module")
def default_scores():
    """The variant-free setting's scores (LPOSS+ and LPOSS), to show that each variant changes them."""
    out = {}
    for method in ("lposs_plus", "lposs"):
        model = LPOSS.from_config(BASE, method=method, text_cache_dir=None)
        out[method] = model.predict(_image(), CLASSES).low_res_scores
    return out


CLASSES = ["sky", "tree;bush", "road"]


@pytest.mark.parametrize("variant", sorted(VARIANT_RUNS))
def test_every_variant_runs_end_to_end_and_equals_its_computation_by_hand(variant, default_scores):
    over = [_group_override("adjacency", o[4:]) if o.startswith("ADJ:") else o for o in variant.split(",")]
    extra = [] if "vm=clip_b16" in over else ["vm=tiny_random"]
    cfg = _compose(*over, "vlm=tiny_random", "device=cpu", *VARIANT_SIZE, *extra)
    config = lposs_config(cfg)
    want_config, want_method = VARIANT_RUNS[variant]
    assert config == want_config and method_name(cfg, config) == want_method
    model = LPOSS.from_config(config, method=method_name(cfg, config), text_cache_dir=None)
    pred = model.predict(_image(), CLASSES)
    assert pred.labels.shape == (40, 56) and pred.class_names == ["sky", "tree", "road"]
    hand = scores_by_hand(model, want_config, want_method, _image(), CLASSES)
    assert torch.allclose(pred.low_res_scores, hand, atol=1e-5), (pred.low_res_scores - hand).abs().max()
    # the labels are the argmax of the scores at the input size
    assert torch.equal(pred.labels, pred.scores.argmax(0))
    # and the variant matters: other numbers than the same method without it
    base = default_scores["lposs" if want_method == "maskclip" else want_method]
    if pred.low_res_scores.shape == base.shape:
        assert not torch.allclose(pred.low_res_scores, base, atol=1e-4)


@pytest.mark.parametrize("experiment", ["table3_ensemble"])
def test_experiments_evaluate_end_to_end_on_synthetic_data(experiment, tmp_path):
    import json

    from synthetic_data import make_dataset

    from lposs_lab.lab.tasks.evaluate import evaluate

    make_dataset(tmp_path / "data", "voc20", 2, (40, 56))
    overrides = [
        _group_override("experiment", experiment), "dataset=voc20", f"paths.data_dir={tmp_path / 'data'}",
        f"paths.root_dir={tmp_path}", "vm=tiny_random", "vlm=tiny_random", "device=cpu", *SMALL,
        "logger=none", "trainer.enable_progress_bar=false", "num_workers=0",
        f"++cache.dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    res = evaluate(_compose(*overrides, f"paths.output_dir={tmp_path / 'out'}"))
    assert res is not None and res["num_images"] == 2 and 0 <= res["mIoU"] <= 100
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["report"]["experiment"] == experiment and saved["mIoU"] == res["mIoU"]
    assert saved["config"]["data_root"] == str(tmp_path / "data")
    assert len(list((tmp_path / "cache").glob("*/shard-*"))) == 2  # one cache per window setup
    # a second run of the recipe takes every feature from the cache and gives the same numbers
    again = evaluate(_compose(*overrides, f"paths.output_dir={tmp_path / 'out2'}"))
    assert again["mIoU"] == res["mIoU"] and again["per_class_iou"] == res["per_class_iou"]
    assert len(list((tmp_path / "cache").glob("*/shard-*"))) == 2
