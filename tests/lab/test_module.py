"""The evaluation lab's Lightning pieces: sharding, label sources, the module's metrics, records, resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image
from scoring import np_boundary_miou, np_miou, np_pixel_accuracy, write_predictions
from synthetic_data import make_dataset

from lposs_lab import LPOSS, LPOSSConfig, WindowConfig
from lposs_lab.image_io import ImageError
from lposs_lab.lab.data import SegmentationDataset
from lposs_lab.lab.module import EvalDataModule, EvalModule
from lposs_lab.lab.records import StateStore, StateStoreError, summarize
from lposs_lab.lab.sources import (
    PatchOracle,
    PredictorSource,
    SavedPredictions,
    oracle_patch_labels,
    read_prediction,
)

I = 255  # noqa: E741

TRAINER_YAML = Path(__file__).resolve().parents[2] / "conf" / "trainer" / "default.yaml"
TRAINER_FLAGS = {  # the flags of conf/trainer/default.yaml, without _target_ and Hydra interpolations
    k: v
    for k, v in yaml.safe_load(TRAINER_YAML.read_text()).items()
    if not k.startswith("_") and not str(v).startswith("${")
}


def make_trainer(**kw) -> pl.Trainer:
    flags = {**TRAINER_FLAGS, "accelerator": "cpu", "devices": 1, "strategy": "auto", "logger": False,
             "enable_progress_bar": False, **kw}
    return pl.Trainer(**flags)


def run_module(ds, tmp_path, source, name="states", skip=(), resumed=(), **kw):
    store = StateStore(tmp_path / name)
    module = EvalModule(ds.info.classes, source, store, resumed=resumed, **kw)
    dm = EvalDataModule(ds, skip=skip)
    trainer = make_trainer()
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


@pytest.mark.parametrize(("n", "world", "skip"), [(5, 2, 0), (7, 3, 0), (2, 2, 0), (7, 2, 3)])
def test_datamodule_shards_without_duplicates_and_skips_done_ids(tmp_path, n, world, skip):
    ds = SegmentationDataset("voc20", make_dataset(tmp_path, "voc20", n_images=n))
    done = ds.ids[1 : 1 + skip]
    seen = []
    for rank in range(world):
        dm = EvalDataModule(ds, skip=done)
        assert dm.todo == [i for i, k in enumerate(ds.ids) if k not in done]
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        ids = [b[0]["id"] for b in dm.test_dataloader()]
        assert ids == [ds.ids[i] for i in dm.todo[rank::world]]
        seen += ids
    # every image still to do exactly once (no padding duplicates), the done ones never loaded
    assert sorted(seen) == sorted(set(ds.ids) - set(done))
    with pytest.raises(ValueError, match="num_workers"):
        EvalDataModule(ds, num_workers=-1)


# ------------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("bench", ["voc20", "cityscapes"])
def test_module_predictions_metrics_equal_hand_computed(tmp_path, bench):
    ds = SegmentationDataset(bench, make_dataset(tmp_path / "data", bench, n_images=5))
    preds = write_predictions(ds, tmp_path / "preds")
    source = SavedPredictions(str(tmp_path / "preds"), ds.info.num_classes)
    module, store, trainer, _ = run_module(ds, tmp_path, source, boundary=True)
    gts = [ds[i]["label"] for i in range(len(ds))]
    pred_list = [preds[k] for k in ds.ids]
    ref, inter, union = np_miou(pred_list, gts, ds.info.num_classes)
    ref_b = np_boundary_miou(pred_list, gts, ds.info.num_classes)
    metrics = trainer.callback_metrics
    assert metrics["test/mIoU"].item() == pytest.approx(100 * ref, abs=1e-4)
    assert metrics["test/boundary_iou"].item() == pytest.approx(100 * ref_b, abs=1e-4)
    assert metrics["test/pixel_accuracy"].item() == pytest.approx(100 * np_pixel_accuracy(pred_list, gts))
    assert metrics["test/num_images"].item() == 5
    # the per-image records sum to the same totals, each holding its own image's counts
    records = store.load(ds.ids)
    assert len(records) == 5 and all(r["rank"] == 0 for r in records)
    assert sum(np.array(r["iou"]["intersection"]) for r in records).tolist() == inter.astype(int).tolist()
    _, inter0, _ = np_miou([pred_list[0]], [gts[0]], ds.info.num_classes)
    assert records[0]["iou"]["intersection"] == inter0.astype(int).tolist()
    assert records[0]["mIoU"] == pytest.approx(np_miou([pred_list[0]], [gts[0]], ds.info.num_classes)[0])
    res = summarize(records, ds.info.classes, boundary=True)
    assert res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    assert res["boundary_iou"] == pytest.approx(100 * ref_b, abs=1e-9)
    assert 0 < res["boundary_iou"] < 100 and res["num_images"] == 5 and not res["errors"]
    assert [v is None for v in res["per_class_iou"].values()] == (union == 0).tolist()
    # a perfect prediction folder scores 100
    for i in range(len(ds)):
        s = ds[i]
        Image.fromarray(s["label"]).save(tmp_path / "preds" / f"{s['id']}.png")
    _, _, trainer2, _ = run_module(ds, tmp_path, source, "s2")
    assert trainer2.callback_metrics["test/mIoU"].item() == pytest.approx(100.0)


def test_test_step_returns_the_label_maps_and_save_predictions_writes_them(tmp_path):
    ds = SegmentationDataset("voc20", make_dataset(tmp_path / "data", "voc20", n_images=3))
    module = EvalModule(ds.info.classes, PatchOracle(), StateStore(tmp_path / "st"),
                        save_predictions=str(tmp_path / "saved"))
    module.setup("test")
    out = module.test_step([ds[0], ds[1]], 0)
    assert sorted(out) == ds.ids[:2]
    for i in range(2):
        want = oracle_patch_labels(torch.from_numpy(ds[i]["label"].astype(np.int64)))
        assert torch.equal(out[ds.ids[i]], want)
        saved = read_prediction(tmp_path / "saved", ds.ids[i], tuple(want.shape), ds.info.num_classes)
        assert torch.equal(saved, want)  # save_predictions output is valid predictions= input
    record, labels = module.evaluate_sample({"id": "x", "image": None, "label": None, "error": "bad\nfile"})
    assert labels is None and record == {"id": "x", "error": "bad file"}
    assert json.loads(StateStore(tmp_path / "st").path("x").read_text()) == record


def test_module_model_mode_equals_the_predictor_and_resume_equals_full_run(tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=6)
    lposs = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=64))
    full_ds = SegmentationDataset("voc", root)
    source = PredictorSource(lposs, "lposs", list(full_ds.info.classes), text_cache_dir=None)
    module, store, trainer, _ = run_module(full_ds, tmp_path, source, "full", boundary=True)
    full = summarize(store.load(full_ds.ids), full_ds.info.classes, boundary=True)
    assert full["num_images"] == 6 and all(r["seconds"] > 0 for r in full["per_image"])
    assert trainer.callback_metrics["test/mIoU"].item() == pytest.approx(full["mIoU"], abs=1e-4)
    # the source's numbers are the predictor's: the same config built directly, scored by numpy
    direct = LPOSS.from_config(lposs, method="lposs", text_cache_dir=None)
    direct.set_classes(full_ds.info.classes)
    samples = [full_ds[i] for i in range(len(full_ds))]
    preds = [direct.predict(s["image"]).labels.numpy() for s in samples]
    ref, _, _ = np_miou(preds, [s["label"] for s in samples], full_ds.info.num_classes)
    assert full["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    # a pickled source (what ddp_spawn sends to workers) carries no predictor; setup() builds it again
    import pickle

    assert pickle.loads(pickle.dumps(source)).predictor is None and source.predictor is not None
    # first 2 images, then resume over all 6: only 4 are predicted, numbers identical
    part_src = PredictorSource(lposs, "lposs", list(full_ds.info.classes), text_cache_dir=None)
    run_module(SegmentationDataset("voc", root, limit=2), tmp_path, part_src, "part", boundary=True)
    part = StateStore(tmp_path / "part")
    done = sorted(part.done_ids())
    assert done == full_ds.ids[:2]
    before = {k: part.path(k).stat().st_mtime_ns for k in done}
    _, store2, trainer2, dm2 = run_module(
        full_ds, tmp_path, part_src, "part", skip=done, resumed=part.load(done), boundary=True
    )
    assert len(dm2.todo) == 4
    assert {k: part.path(k).stat().st_mtime_ns for k in done} == before  # not evaluated again
    resumed = summarize(store2.load(full_ds.ids), full_ds.info.classes, boundary=True)
    for key in ("mIoU", "boundary_iou", "pixel_accuracy", "per_class_iou", "per_class_boundary_iou"):
        assert resumed[key] == full[key], key
    # the logged (torchmetrics) numbers include the earlier images too
    assert trainer2.callback_metrics["test/num_images"].item() == 6
    assert trainer2.callback_metrics["test/mIoU"].item() == pytest.approx(full["mIoU"], abs=1e-4)
    assert trainer2.callback_metrics["test/boundary_iou"].item() == pytest.approx(
        full["boundary_iou"], abs=1e-4
    )


def test_corrupt_image_and_out_of_range_label_are_recorded_not_scored(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=4)
    ds = SegmentationDataset("voc20", root)
    bad = ds.samples[1][1]
    bad.write_bytes(bad.read_bytes()[:50])  # truncated JPEG
    label = np.asarray(Image.open(ds.samples[3][2])).copy()
    label[2, 2] = 77  # raw 77 -> class 76 of a 20-class benchmark
    Image.fromarray(label).save(ds.samples[3][2])
    module, store, trainer, _ = run_module(ds, tmp_path, PatchOracle())
    res = summarize(store.load(ds.ids), ds.info.classes)
    assert res["num_images"] == 2 and trainer.callback_metrics["test/num_images"].item() == 2
    errors = {e["id"]: e["error"] for e in res["errors"]}
    assert sorted(errors) == [ds.ids[1], ds.ids[3]]
    assert "cannot decode" in errors[ds.ids[1]] and str(bad) in errors[ds.ids[1]]
    assert "holds value 76" in errors[ds.ids[3]] and str(ds.samples[3][2]) in errors[ds.ids[3]]
    gts = [ds[i]["label"] for i in (0, 2)]
    oracle = [oracle_patch_labels(torch.from_numpy(g.astype(np.int64))).numpy() for g in gts]
    assert res["mIoU"] == pytest.approx(100 * np_miou(oracle, gts, 20)[0], abs=1e-9)


# ------------------------------------------------------------------------------------------ store
def test_state_store_check_writes_nothing_and_guards_resume(tmp_path):
    store = StateStore(tmp_path / "st")
    store.check({"a": 1}, resume=False)  # an empty store: anything goes, nothing written
    assert not (tmp_path / "st").exists()
    store.prepare({"a": 1})
    store.write({"id": "x/y", "error": "boom"})
    assert store.done_ids() == {"x/y"} and (tmp_path / "st" / "x%2Fy.state.json").is_file()
    with pytest.raises(StateStoreError, match="already holds 1 image state"):
        store.check({"a": 1}, resume=False)
    with pytest.raises(StateStoreError, match="differs in a"):
        store.check({"a": 2}, resume=True)
    store.check({"a": 1}, resume=True)
    with pytest.raises(StateStoreError, match="no state for image 'z'"):
        store.load(["z"])
    assert json.loads((tmp_path / "st" / "meta.json").read_text()) == {"a": 1}
    (tmp_path / "st" / "q.state.json").write_text("{")
    with pytest.raises(StateStoreError, match="unreadable state file .*q.state.json"):
        store.load(["q"])
