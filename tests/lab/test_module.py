"""The evaluation lab's Lightning pieces sharding, oracle, the module's metrics, states, resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from synthetic_data import make_dataset

from lposs_lab import LPOSSConfig, WindowConfig
from lposs_lab.lab.data.benchmarks import SegmentationDataset
from lposs_lab.image_io import ImageError
from lposs_lab.lab.module import EvalDataModule, EvalModule, make_trainer, oracle_patch_labels, read_prediction
from lposs_lab.lab.records import StateStore, StateStoreError, format_table, summarize

I = 255  # noqa: E741


def np_miou(preds, gts, num_classes):
    """Independent reference: total intersection / union per class over the split, NaN-mean, ignore 255."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for p, g in zip(preds, gts, strict=True):
        valid = g != I
        for c in range(num_classes):
            pc, gc = (p == c) & valid, (g == c) & valid
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
    seen = union > 0
    return float((inter[seen] / union[seen]).mean()), inter, union


def write_predictions(ds: SegmentationDataset, folder, seed=0, keep=0.6):
    """Noisy copies of the ground truth as <id>.png; returns {id: pred array}."""
    rng = np.random.default_rng(seed)
    c = ds.info.num_classes
    out = {}
    for i in range(len(ds)):
        s = ds[i]
        gt = s["label"]
        noise = rng.integers(0, c, gt.shape)
        pred = np.where((rng.random(gt.shape) < keep) & (gt != I), gt, noise).astype(np.uint8)
        pred[0, :3] = I  # "no prediction" pixels are allowed
        path = folder / f"{s['id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(path)
        out[s["id"]] = pred
    return out


def run_module(ds, tmp_path, name="states", resume=False, **kw):
    store = StateStore(tmp_path / name)
    module = EvalModule(ds.info.classes, store=store, **kw)
    dm = EvalDataModule(ds, store=store, resume=resume)
    trainer = make_trainer(accelerator="cpu", devices=1, logger=False, progress_bar=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return module, store, trainer, dm


# ------------------------------------------------------------------------------------------ pure pieces
def test_oracle_patch_aligned_blocks_are_exact_and_odd_sizes_hand_checked():
    gt = torch.arange(6).reshape(2, 3).repeat_interleave(16, 0).repeat_interleave(16, 1)  # 32x48, 16px blocks
    assert torch.equal(oracle_patch_labels(gt), gt)
    # 20x20: grid round(1.25)=1 -> the whole map takes the centre pixel's label (row 10, col 10)
    g = torch.zeros(20, 20, dtype=torch.long)
    g[10:, 10:] = 3
    assert torch.equal(oracle_patch_labels(g), torch.full((20, 20), 3))
    # "nearest" samples the top-left pixel instead
    assert torch.equal(oracle_patch_labels(g, mode="nearest"), torch.zeros(20, 20, dtype=torch.long))
    # ignored centre -> no prediction (255) over that cell; tiny images keep one cell
    g[10, 10] = I
    assert oracle_patch_labels(g).unique().tolist() == [I]
    assert oracle_patch_labels(torch.full((3, 5), 7)).shape == (3, 5)
    with pytest.raises(ValueError, match="nearest"):
        oracle_patch_labels(g, mode="bilinear")


def test_read_prediction_checks(tmp_path):
    Image.fromarray(np.array([[0, 1], [255, 2]], np.uint8)).save(tmp_path / "a.png")
    assert read_prediction(tmp_path, "a", (2, 2), 3).tolist() == [[0, 1], [255, 2]]
    with pytest.raises(ImageError, match="b.png not found"):
        read_prediction(tmp_path, "b", (2, 2), 3)
    with pytest.raises(ImageError, match="is 2x2, its ground truth 3x2"):
        read_prediction(tmp_path, "a", (3, 2), 3)
    with pytest.raises(ImageError, match="holds value 2; valid: 0..1"):
        read_prediction(tmp_path, "a", (2, 2), 2)


@pytest.mark.parametrize(("n", "world"), [(5, 2), (7, 3), (2, 2)])
def test_datamodule_shards_without_duplicates(tmp_path, n, world):
    ds = SegmentationDataset("voc20", make_dataset(tmp_path, "voc20", n_images=n))
    seen = []
    for rank in range(world):
        dm = EvalDataModule(ds)
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=world, strategy=SimpleNamespace(broadcast=lambda x, src: x)
        )
        dm.setup("test")
        ids = [b[0]["id"] for b in dm.test_dataloader()]
        assert abs(len(ids) - n / world) < 1
        seen += ids
    assert sorted(seen) == ds.ids  # every image exactly once: no padding duplicates


# ------------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("bench", ["voc20", "cityscapes"])
def test_module_predictions_metrics_equal_hand_computed(tmp_path, bench):
    ds = SegmentationDataset(bench, make_dataset(tmp_path / "data", bench, n_images=5))
    preds = write_predictions(ds, tmp_path / "preds")
    module, store, trainer, _ = run_module(
        ds, tmp_path, mode="predictions", predictions_dir=str(tmp_path / "preds"), boundary=True
    )
    gts = [ds[i]["label"] for i in range(len(ds))]
    ref, inter, union = np_miou([preds[k] for k in ds.ids], gts, ds.info.num_classes)
    assert trainer.callback_metrics["test/mIoU"].item() == pytest.approx(100 * ref, abs=1e-4)
    assert trainer.callback_metrics["test/num_images"].item() == 5
    assert module.iou.intersection.tolist() == inter.astype(int).tolist()
    # the per-image state files sum to the same totals
    records = store.load(ds.ids)
    assert len(records) == 5 and all(r["rank"] == 0 for r in records)
    res = summarize(records, ds.info.classes, boundary=True)
    assert res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    assert res["boundary_iou"] == pytest.approx(
        trainer.callback_metrics["test/boundary_iou"].item(), abs=1e-4
    )
    assert 0 < res["boundary_iou"] < 100 and res["num_images"] == 5 and not res["errors"]
    valid = union > 0
    pc = [v for v in res["per_class_iou"].values()]
    assert [v is None for v in pc] == (~valid).tolist()
    # a perfect prediction folder scores 100
    for i in range(len(ds)):
        s = ds[i]
        Image.fromarray(s["label"]).save(tmp_path / "preds" / f"{s['id']}.png")
    _, store2, trainer2, _ = run_module(
        ds, tmp_path, "s2", mode="predictions", predictions_dir=str(tmp_path / "preds")
    )
    assert trainer2.callback_metrics["test/mIoU"].item() == pytest.approx(100.0)


def test_module_model_mode_records_and_resume_equal_full_run(tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=6)
    lposs = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=64))
    kw = dict(mode="model", lposs=lposs, method="lposs", boundary=True)
    full_ds = SegmentationDataset("voc", root)
    module, store, trainer, _ = run_module(full_ds, tmp_path, "full", **kw)
    full = summarize(store.load(full_ds.ids), full_ds.info.classes, boundary=True)
    assert full["num_images"] == 6 and all(r["seconds"] > 0 for r in full["per_image"])
    assert trainer.callback_metrics["test/mIoU"].item() == pytest.approx(full["mIoU"], abs=1e-4)
    # first 2 images, then resume over all 6: only 4 are predicted, numbers identical
    run_module(SegmentationDataset("voc", root, limit=2), tmp_path, "part", **kw)
    module2, store2, trainer2, dm2 = run_module(full_ds, tmp_path, "part", resume=True, **kw)
    assert dm2.done_ids == full_ds.ids[:2] and len(dm2.todo) == 4
    resumed = summarize(store2.load(full_ds.ids), full_ds.info.classes, boundary=True)
    for key in ("mIoU", "boundary_iou", "pixel_accuracy", "per_class_iou", "per_class_boundary_iou"):
        assert resumed[key] == full[key], key
    # the logged (torchmetrics) numbers include the earlier images too
    assert trainer2.callback_metrics["test/num_images"].item() == 6
    assert trainer2.callback_metrics["test/mIoU"].item() == pytest.approx(full["mIoU"], abs=1e-4)


def test_corrupt_image_is_recorded_not_scored(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=4)
    ds = SegmentationDataset("voc20", root)
    bad = ds.samples[1][1]
    bad.write_bytes(bad.read_bytes()[:50])  # truncated JPEG
    module, store, trainer, _ = run_module(ds, tmp_path, mode="oracle_patch")
    res = summarize(store.load(ds.ids), ds.info.classes)
    assert res["num_images"] == 3 and trainer.callback_metrics["test/num_images"].item() == 3
    assert [e["id"] for e in res["errors"]] == [ds.ids[1]] and "cannot decode" in res["errors"][0]["error"]


# ------------------------------------------------------------------------------------------ store and table
def test_state_store_guards(tmp_path):
    store = StateStore(tmp_path / "st")
    store.prepare({"a": 1}, resume=False)
    store.write({"id": "x/y", "error": "boom"})
    assert store.done_ids() == {"x/y"} and (tmp_path / "st" / "x%2Fy.state.json").is_file()
    with pytest.raises(StateStoreError, match="already holds 1 image state"):
        store.prepare({"a": 1}, resume=False)
    with pytest.raises(StateStoreError, match="differs in a"):
        store.prepare({"a": 2}, resume=True)
    store.prepare({"a": 1}, resume=True)
    with pytest.raises(StateStoreError, match="no state for image 'z'"):
        store.load(["z"])
    assert json.loads((tmp_path / "st" / "meta.json").read_text()) == {"a": 1}


def test_paper_table_format():
    runs = [
        {"dataset": d, "method": "lposs_plus", "mIoU": 50.0 + i, "boundary_iou": 30.0}
        for i, d in enumerate(
            ["voc", "coco_object", "context", "context59", "coco_stuff", "voc20", "ade20k", "cityscapes"]
        )
    ]
    text = format_table(runs)
    lines = text.splitlines()
    assert lines[0].split() == [
        "mIoU",
        "(%)",
        "VOC",
        "Object",
        "Context",
        "C59",
        "Stuff",
        "VOC20",
        "ADE",
        "City",
        "Avg",
    ]
    assert lines[1].split() == ["LPOSS+", *[f"{50.0 + i:.1f}" for i in range(8)], "53.5"]
    assert lines[2].split()[-1] == "42.1"  # the paper's average (Table 1)
    assert "Boundary IoU (%)" in text and text.splitlines()[-1].split()[-1] == "32.1"
    one = format_table([{"dataset": "voc", "method": "oracle_patch", "label": "x [lp.k=3]", "mIoU": math.pi}])
    assert [ln.split() for ln in one.splitlines()] == [["mIoU", "(%)", "VOC"], ["x", "[lp.k=3]", "3.1"]]


def test_trainer_uses_spawn_for_many_devices():
    trainer = make_trainer(accelerator="cpu", devices=2, logger=False, progress_bar=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.strategy._start_method == "spawn"
    assert isinstance(make_trainer(accelerator="cpu", devices=1, logger=False), pl.Trainer)
