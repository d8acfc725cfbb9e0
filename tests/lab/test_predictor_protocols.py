"""Initial predictors beyond MaskCLIP in the lab: each method's own protocol (``experiment=own_*``) and LPOSS
over it (``experiment=over_predictor``).

The resolved per-dataset values are checked against docs/predictors.md §1-§7 (written out below, not read
from the configs); the evaluations run in-process on tiny random models and a synthetic set, and their numbers
are the library's (``LPOSS`` built from the dataclasses, scored with numpy), not only finite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from scoring import np_miou
from synthetic_data import make_dataset

from lposs_lab import LPOSS, LPOSSConfig, WindowConfig
from lposs_lab.lab import report
from lposs_lab.lab.data import SegmentationDataset
from lposs_lab.lab.tables import predictor_label, results_table
from lposs_lab.lab.tasks.evaluate import evaluate
from lposs_lab.postprocess import Abstain, PAMRStep

REPO = Path(__file__).resolve().parents[2]
DATASETS = ("voc", "voc20", "context", "context59", "coco_object", "coco_stuff", "ade20k", "cityscapes")
BACKGROUND = ("voc", "context", "coco_object")  # the sets with a background class (prob_thd / area_thd)
PREDICTORS = ("sclip", "clearclip", "naclip", "proxyclip", "scclip")

# docs/predictors.md §1-§6, per method: (short side, (window, stride), logit scale, prob_thd, area_thd); a
# dict holds the per-dataset exceptions over "default"; prob_thd / area_thd absent: off (None)
PROTOCOLS = {
    "own_sclip": dict(
        vlm="sclip_b16", postprocess="none",
        short_side={"default": 336, "coco_stuff": 448, "cityscapes": 560},
        window={"default": (224, 112)},
        logit_scale={"default": 40.0, "voc": 65.0, "context": 50.0, "coco_object": 50.0},
        prob_thd={"voc": 0.1, "context": 0.1, "coco_object": 0.1},
        area_thd={"voc": 0.1},
        paper=(59.1, 80.4, 30.4, 34.2, 30.5, 22.4, 16.1, 32.2), paper_avg=38.2,
    ),
    "own_clearclip": dict(
        vlm="clearclip_b16", postprocess="none",
        short_side={"default": 448},
        window={"default": (448, 224), "cityscapes": (224, 224)},
        logit_scale={"default": 50.0},
        prob_thd={"voc": 0.5, "context": 0.15, "coco_object": 0.4},
        area_thd={},
        paper=(51.8, 80.9, 32.6, 35.9, 33.0, 23.9, 16.7, 30.0), paper_avg=38.1,
    ),
    "own_naclip": dict(
        vlm="naclip_b16", postprocess="pamr",
        short_side={"default": 336, "cityscapes": 560},
        window={"default": (224, 112), "voc": (0, 112), "voc20": (0, 112)},
        logit_scale={"default": 40.0},
        prob_thd={"voc": 0.1, "context": 0.1, "coco_object": 0.1},
        area_thd={},
        paper=(64.1, 83.0, 35.0, 38.4, 36.2, 25.7, 19.1, 38.3), paper_avg=42.5,
    ),
    "own_proxyclip": dict(
        vlm="proxyclip_b16", postprocess="none",
        short_side={"default": 336, "ade20k": 448, "cityscapes": 448},
        window={"default": (336, 112), "cityscapes": (224, 112)},
        logit_scale={"default": 40.0},
        prob_thd={"voc": 0.2, "context": 0.15, "coco_object": 0.25},
        area_thd={},
        paper=(61.3, 80.3, 35.3, 39.1, 37.5, 26.5, 20.2, 38.1), paper_avg=42.3,
    ),
    "own_scclip": dict(
        vlm="scclip_b16", postprocess="none",
        short_side={"default": 336, "cityscapes": 560},
        window={"default": (224, 112)},
        logit_scale={"default": 40.0, "voc": 50.0, "coco_object": 55.0},
        prob_thd={"voc": 0.15, "context": 0.15, "coco_object": 0.35},
        area_thd={"voc": 0.1},
        paper=(64.6, 84.3, 36.8, 40.1, 37.7, 26.6, 20.1, 41.0), paper_avg=43.9,
    ),
}
# NACLIP without PAMR: the same protocol, its own published row
PROTOCOLS["own_naclip_nopamr"] = dict(
    PROTOCOLS["own_naclip"], postprocess="none",
    paper=(58.9, 79.7, 32.2, 35.2, 33.2, 23.3, 17.4, 35.5), paper_avg=39.4,
)


def _per(table: dict, dataset: str):
    return table.get(dataset, table.get("default"))


def _overrides(tmp_path: Path, overrides) -> list[str]:
    return [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "num_workers=0",
        f"cache.dir={tmp_path / 'features'}",
        *overrides,
    ]


def compose_cfg(tmp_path: Path, *overrides: str):
    """The run config of ``overrides``, every output under ``tmp_path`` (no logger, no progress bar)."""
    return compose_many(tmp_path, [overrides])[0]


def compose_many(tmp_path: Path, runs) -> list:
    """:func:`compose_cfg` of each override list in ``runs``, in one Hydra context (faster)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return [compose("config", overrides=_overrides(tmp_path, list(ov))) for ov in runs]


# ------------------------------------------------------------------------------------------ composition
@pytest.mark.parametrize("experiment", sorted(PROTOCOLS))
def test_own_protocol_resolves_to_the_published_values_on_every_dataset(tmp_path, experiment):
    want = PROTOCOLS[experiment]
    cfgs = compose_many(tmp_path, [[f"experiment={experiment}", f"dataset={ds}"] for ds in DATASETS])
    for ds, cfg in zip(DATASETS, cfgs, strict=True):
        got = OmegaConf.to_container(cfg, resolve=True)
        size, stride = _per(want["window"], ds)
        assert (got["task"], got["cache"]["enabled"]) == ("evaluate", True)
        assert got["vlm"]["name"] == want["vlm"] and got["method"]["name"] == "maskclip", ds
        assert got["window"]["short_side"] == _per(want["short_side"], ds), ds
        assert got["window"]["long_side"] == 2048
        assert got["window"]["size"] == size, ds
        if size:
            assert got["window"]["stride"] == stride, ds
        assert got["predict"]["logit_scale"] == _per(want["logit_scale"], ds), ds
        assert got["predict"]["unknown_threshold"] == want["prob_thd"].get(ds), ds
        assert got["predict"]["area_threshold"] == want["area_thd"].get(ds), ds
        if ds not in BACKGROUND:
            assert got["predict"]["unknown_threshold"] is None and got["predict"]["area_threshold"] is None
        assert got["postprocess"]["name"] == want["postprocess"], ds
        if want["postprocess"] == "pamr":
            assert got["postprocess"]["iterations"] == 10 and got["postprocess"]["dilations"] == [8, 16]
        rep = got["report"]
        assert rep["table"] == "own_predictors" and rep["experiment"] == experiment
        assert rep["paper_avg"] == want["paper_avg"]
        paper = dict(zip(DATASETS, want["paper"], strict=True))  # §7's column order is DATASETS'
        assert rep["paper"] == paper
        assert round(sum(paper.values()) / 8, 1) == pytest.approx(want["paper_avg"], abs=0.051)
        assert got["tags"] == ["own_predictors", experiment]


def test_own_protocol_values_can_still_be_overridden_and_compose_without_a_dataset(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=own_sclip", "dataset=voc", "window.short_side=64",
                      "predict.unknown_threshold=0.3")
    assert cfg.window.short_side == 64 and cfg.predict.unknown_threshold == 0.3
    assert cfg.predict.logit_scale == 65.0 and cfg.predict.area_threshold == 0.1
    cfg = compose_cfg(tmp_path, "experiment=own_clearclip")  # no dataset: the defaults
    assert (cfg.window.short_side, cfg.window.size, cfg.predict.unknown_threshold) == (448, 448, None)


def test_over_predictor_is_the_lposs_protocol_with_rows_named_by_predictor_and_method(tmp_path):
    methods = (("maskclip", ""), ("lposs", " + LPOSS"), ("lposs_plus", " + LPOSS+"))
    vlms = ["maskclip_b16", *[f"{p}_b16" for p in PREDICTORS]]
    # every predictor x method on VOC, every dataset for one of them (the protocol does not depend on it)
    points = [("voc", v, m, suffix) for v in vlms for m, suffix in methods]
    points += [(ds, "sclip_b16", "lposs_plus", " + LPOSS+") for ds in DATASETS if ds != "voc"]
    cfgs = compose_many(tmp_path, [["experiment=over_predictor", f"vlm={v}", f"method={m}", f"dataset={ds}"]
                                   for ds, v, m, _ in points])
    for (ds, vlm, method, suffix), cfg in zip(points, cfgs, strict=True):
        got = OmegaConf.to_container(cfg, resolve=True)
        assert got["vlm"]["name"] == vlm and got["method"]["name"] == method
        win = got["window"]
        assert (win["short_side"], win["long_side"], win["size"], win["stride"]) == (448, 2048, 224, 112), ds
        assert got["predict"]["unknown_threshold"] is None and got["postprocess"]["name"] == "none"
        assert got["report"]["row"] == (predictor_label(vlm) or "MaskCLIP") + suffix
        assert got["report"]["table"] == "over_predictors"
        published = vlm == "maskclip_b16" and method != "maskclip"
        assert (got["report"]["paper_avg"] is not None) == published
        if published:
            assert got["report"]["paper_avg"] == {"lposs": 41.3, "lposs_plus": 42.1}[method]
            assert got["report"]["paper"]["voc"] == {"lposs": 61.1, "lposs_plus": 62.4}[method]


def test_over_predictor_sweep_subdir_separates_predictors_and_methods(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        ov = ["experiment=over_predictor", "vlm=naclip_b16", "method=lposs", "dataset=ade20k"]
        cfg = compose("config", overrides=ov, return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "naclip_b16/lposs/ade20k"


# ------------------------------------------------------------------------------------------ the report
def _result(dataset, miou, *, config, method="maskclip", overrides=()):
    return {"dataset": dataset, "method": method, "mIoU": miou, "config": config,
            "overrides": list(overrides)}


def test_report_rows_are_named_by_predictor_and_method_and_published_rows_sit_beside_ours():
    runs = []
    for i, ds in enumerate(DATASETS):
        for vlm in ("sclip_b16", "naclip_b16"):
            for method in ("maskclip", "lposs_plus"):
                ov = [f"vlm={vlm}", f"method={method}", f"dataset={ds}"]
                runs.append(_result(ds, 30.0 + i, method=method, overrides=ov, config={"vlm": {"name": vlm}}))
    rows = [label for label, _ in results_table(runs).rows]
    assert rows == ["SCLIP", "SCLIP + LPOSS+", "NACLIP", "NACLIP + LPOSS+"]  # no report.row
    # report.row given (over_predictor): the row as named, no [vlm=..., method=...] suffix
    runs2 = [dict(r, config={**r["config"], "report": {"row": f"{r['config']['vlm']['name']} {r['method']}"}})
             for r in runs]
    assert [label for label, _ in results_table(runs2).rows] == [
        "sclip_b16 maskclip", "sclip_b16 lposs_plus", "naclip_b16 maskclip", "naclip_b16 lposs_plus"]
    # a sweep inside one row keeps its suffix
    sweep = [_result("voc", 1.0 + k, method="lposs", overrides=[f"lp.k={k}"], config={"report": {"row": "R"}})
             for k in (2, 4)]
    assert [label for label, _ in results_table(sweep).rows] == ["R [lp.k=2]", "R [lp.k=4]"]
    # own protocol: a "published" row with docs/predictors.md §7's numbers, Paper Avg = report.paper_avg
    want = PROTOCOLS["own_scclip"]
    paper = dict(zip(DATASETS, want["paper"], strict=True))
    rep = {"row": "SC-CLIP (own protocol)", "table": "own_predictors", "paper_avg": 43.9, "paper": paper}
    own = [_result(ds, 40.0, config={"report": rep}) for ds in DATASETS]
    table = results_table(own)
    assert [label for label, _ in table.rows] == ["SC-CLIP (own protocol)", "  published"]
    cells = dict(zip(table.header[1:], table.rows[0][1], strict=True))
    assert cells["Avg"] == "40.0" and cells["Paper Avg"] == "43.9"
    pub = dict(zip(table.header[1:], table.rows[1][1], strict=True))
    got = (pub["VOC"], pub["Object"], pub["VOC20"], pub["City"], pub["Avg"])
    assert got == ("64.6", "37.7", "84.3", "41.0", "43.9")


# ------------------------------------------------------------------------------------------ evaluations
SMALL = ["window.short_side=64", "device=cpu"]


@pytest.fixture(scope="module")
def voc20(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data"), "voc20", n_images=2)
    ds = SegmentationDataset("voc20", root)
    return root, [ds[i] for i in range(len(ds))], ds.info


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("text")


def _model(vlm: str, method: str, text_dir: Path, classes) -> LPOSS:
    config = LPOSSConfig(vm="tiny_random", vlm=vlm, device="cpu", window=WindowConfig(short_side=64))
    model = LPOSS.from_config(config, method=method, text_cache_dir=str(text_dir))
    model.set_classes(classes)
    return model


def _saved(folder: Path, samples) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"{s['id']}.png")) for s in samples]


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_predictor_alone_and_under_lposs_plus_score_the_library_predictions(tmp_path, voc20, text_dir,
                                                                          predictor):
    root, samples, info = voc20
    vlm = f"{predictor}_tiny_random"
    gts = [s["label"] for s in samples]
    model = _model(vlm, "maskclip", text_dir, info.classes)
    for method in ("maskclip", "lposs_plus"):
        out = tmp_path / method
        res = evaluate(compose_cfg(out, "experiment=over_predictor", f"vlm={vlm}", "vm=tiny_random",
                                   f"method={method}", "dataset=voc20", f"data_root={root}", *SMALL,
                                   f"text_cache_dir={text_dir}", f"save_predictions={out / 'pred'}"))
        model.method = method  # the same encoders, the other method
        want = [model.predict(s["image"]).labels.numpy() for s in samples]
        for got, w in zip(_saved(out / "pred", samples), want, strict=True):
            assert np.array_equal(got, w)
        assert res["num_images"] == 2 and res["method"] == method
        assert res["mIoU"] == pytest.approx(100 * np_miou(want, gts, info.num_classes)[0], abs=1e-9)
        label = predictor_label(vlm) + ("" if method == "maskclip" else " + LPOSS+")
        assert res["config"]["report"]["row"] == label and res["random_init"]


def test_own_protocol_abstains_to_background_on_voc(tmp_path, text_dir):
    root = make_dataset(tmp_path / "data", "voc", n_images=2)
    ds = SegmentationDataset("voc", root)
    samples = [ds[i] for i in range(len(ds))]
    gts = [s["label"] for s in samples]
    base = ["experiment=own_sclip", "vlm=sclip_tiny_random", "vm=tiny_random", "dataset=voc",
            f"data_root={root}", *SMALL, f"text_cache_dir={text_dir}"]
    # the protocol as composed (prob_thd 0.1, logit scale 65, area_thd 0.1) = the library's Abstain rule
    res = evaluate(compose_cfg(tmp_path / "a", *base, f"save_predictions={tmp_path / 'a' / 'pred'}"))
    assert res["config"]["predict"] == {"unknown_threshold": 0.1, "logit_scale": 65.0, "area_threshold": 0.1}
    model = _model("sclip_tiny_random", "maskclip", text_dir, ds.info.classes)
    rule = Abstain(0.1, logit_scale=65.0, background=0, area_threshold=0.1)
    want = [model.predict(s["image"], abstain=rule).labels.numpy() for s in samples]
    for got, w in zip(_saved(tmp_path / "a" / "pred", samples), want, strict=True):
        assert np.array_equal(got, w)
    assert res["mIoU"] == pytest.approx(100 * np_miou(want, gts, 21)[0], abs=1e-9)
    # threshold 1 at a flat softmax (logit scale 1, 21 classes): no pixel is sure, all are background
    flat = ["predict.unknown_threshold=1.0", "predict.logit_scale=1.0"]
    res = evaluate(compose_cfg(tmp_path / "b", *base, *flat, f"save_predictions={tmp_path / 'b' / 'pred'}"))
    labels = _saved(tmp_path / "b" / "pred", samples)
    assert all((lb == 0).all() for lb in labels)
    zeros = [np.zeros_like(g) for g in gts]
    assert res["mIoU"] == pytest.approx(100 * np_miou(zeros, gts, 21)[0], abs=1e-9)
    assert res["per_class_iou"]["background"] is not None


def test_pamr_end_to_end_equals_pamr_by_hand_and_changes_labels(tmp_path, voc20, text_dir):
    root, samples, info = voc20
    base = ["experiment=own_naclip", "vlm=naclip_tiny_random", "vm=tiny_random", "dataset=voc20",
            f"data_root={root}", *SMALL, f"text_cache_dir={text_dir}"]
    got = {}
    for post in ("pamr", "none"):
        out = tmp_path / post
        res = evaluate(compose_cfg(out, *base, f"postprocess={post}", f"save_predictions={out / 'pred'}"))
        assert res["config"]["window"]["size"] == 0  # NACLIP's whole image on VOC20
        got[post] = _saved(out / "pred", samples)
    config = LPOSSConfig(vm="tiny_random", vlm="naclip_tiny_random", device="cpu",
                         window=WindowConfig(size=0, short_side=64))
    model = LPOSS.from_config(config, method="maskclip", text_cache_dir=str(text_dir))
    model.set_classes(info.classes)
    step = PAMRStep(10, (8, 16))
    changed = 0
    for s, with_pamr, without in zip(samples, got["pamr"], got["none"], strict=True):
        pred = model.predict(s["image"])
        assert np.array_equal(without, pred.labels.numpy())
        # by hand: PAMR on the image-size scores, guided by the resized input (voc20 has no synonyms)
        refined = step(model.extract(s["image"]).image, pred.scores)
        assert np.array_equal(with_pamr, refined.argmax(dim=0).numpy())
        changed += int((with_pamr != without).sum())
    assert changed > 0


# ------------------------------------------------------------------------------------------ through run.py
@pytest.mark.slow
def test_over_predictor_multirun_report_has_one_row_per_predictor_and_method(tmp_path, voc20, text_dir):
    root, _, _ = voc20
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "run.py", "-m", "experiment=over_predictor",
           "vlm=sclip_tiny_random,naclip_tiny_random", "method=maskclip,lposs", "vm=tiny_random",
           "dataset=voc20", f"data_root={root}", *SMALL,
           "logger=none", "trainer.enable_progress_bar=false", "num_workers=0", f"text_cache_dir={text_dir}",
           f"cache.dir={tmp_path / 'features'}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.relative_to(sweep).parent.as_posix() for p in sweep.rglob("results.json"))
    assert files == ["naclip_tiny_random/lposs/voc20", "naclip_tiny_random/maskclip/voc20",
                     "sclip_tiny_random/lposs/voc20", "sclip_tiny_random/maskclip/voc20"]
    out = tmp_path / "report.md"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## over_predictors" in text
    labels = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and "init" in ln]
    assert labels == [f"{p} (random init)" for p in ("NACLIP + LPOSS", "NACLIP", "SCLIP + LPOSS", "SCLIP")]
    miou = {f: json.loads((sweep / f / "results.json").read_text())["mIoU"] for f in files}
    assert f"{miou['sclip_tiny_random/lposs/voc20']:.1f}" in text


def test_dense_predictor_features_differ_from_each_other(voc20, text_dir):
    # sanity: the five tiny twins are different predictors (the tests above would not see a silent fallback)
    _, samples, info = voc20
    models = [_model(f"{p}_tiny_random", "maskclip", text_dir, info.classes) for p in PREDICTORS]
    scores = [m.predict(samples[0]["image"]).scores for m in models]
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            assert not torch.allclose(scores[i], scores[j]), (PREDICTORS[i], PREDICTORS[j])
