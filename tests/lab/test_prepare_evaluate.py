"""``task=evaluate`` on what ``prepare`` wrote, and ``dataset.download=true`` (prepare, then evaluate).

In-process through the task function on a composed config, tiny random-init models, a few images; the
archives are the synthetic ones of ``synthetic_archives``, served on 127.0.0.1 (every other connection fails).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from http_server import FileServer, guard_network
from hydra import compose, initialize_config_dir
from scoring import np_miou, write_predictions
from synthetic_archives import make_archives, write_manifest

from lposs_lab.errors import ConfigError
from lposs_lab.lab.data import DatasetError, SegmentationDataset
from lposs_lab.lab.data.prepare import RetryPolicy, load_manifest, prepare_datasets
from lposs_lab.lab.module import EvalDataModule
from lposs_lab.lab.tasks.evaluate import data_preparer, evaluate

REPO = Path(__file__).resolve().parents[2]
TINY = ["vm=tiny_random", "vlm=tiny_random", "device=cpu", "window.short_side=64", "num_workers=0"]
FAST = RetryPolicy(attempts=2, delay=0.0, timeout=10.0)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    guard_network(monkeypatch)


def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            "config",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_archives(tmp_path_factory.mktemp("archives"), n=3)


@pytest.fixture
def server(syn):
    with FileServer({f"/{n}": p for n, p in syn.archives.items()}) as srv:
        yield srv


def test_predictions_on_prepared_context59_score_like_numpy(syn, tmp_path):
    root = tmp_path / "data"
    manifest = load_manifest(write_manifest(tmp_path / "m.json", syn, None))
    prepare_datasets(["context59"], root, manifest=manifest, archives=syn.archives["val2017.zip"].parent,
                     workers=1)  # fmt: skip
    ds = SegmentationDataset("context59", root)
    preds = write_predictions(ds, tmp_path / "preds", seed=1)
    res = evaluate(
        compose_cfg(tmp_path, "dataset=context59", f"data_root={root}", f"predictions={tmp_path / 'preds'}")
    )
    gts = [syn.labels["context59"][k] for k in ds.ids]
    assert res["num_images"] == 3 and res["errors"] == []
    assert res["mIoU"] == pytest.approx(100 * np_miou([preds[k] for k in ds.ids], gts, 59)[0], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["voc", "coco_object", "cityscapes"])
def test_model_evaluates_on_prepared_data(syn, tmp_path, name):
    root = tmp_path / "data"
    manifest = load_manifest(write_manifest(tmp_path / "m.json", syn, None))
    prepare_datasets([name], root, manifest=manifest, archives=syn.archives["val2017.zip"].parent, workers=1)
    res = evaluate(compose_cfg(tmp_path, f"dataset={name}", f"data_root={root}", "limit=2", *TINY))
    assert res["num_images"] == 2 and res["errors"] == [] and 0.0 <= res["mIoU"] <= 100.0


def test_download_true_prepares_then_evaluates(syn, server, tmp_path, capsys):
    root = tmp_path / "data"
    mf = write_manifest(tmp_path / "m.json", syn, server.url)
    pred_dir = tmp_path / "preds"
    overrides = ["dataset=voc20", f"data_root={root}", "dataset.download=true", f"+dataset.manifest={mf}"]
    cfg = compose_cfg(tmp_path, *overrides, f"predictions={pred_dir}")
    prepare = data_preparer(cfg)
    assert prepare is not None
    # predictions need the ids: make them from what the generator says the split holds
    for key, label in syn.labels["voc20"].items():
        pred_dir.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(np.where(label == 255, 0, label).astype(np.uint8)).save(pred_dir / f"{key}.png")
    res = evaluate(cfg)
    assert [p for p, _ in server.requests] == ["/VOCtrainval_11-May-2012.tar"]
    assert res["num_images"] == 3 and res["mIoU"] == pytest.approx(100.0)
    err = capsys.readouterr().err
    assert "voc: ready" in err and "voc: up to date" in err  # prepare_data() ran again: a no-op
    # a second run: nothing fetched, nothing rewritten
    res2 = evaluate(compose_cfg(tmp_path / "again", *overrides, f"predictions={pred_dir}"))
    assert len(server.requests) == 1 and res2["mIoU"] == res["mIoU"]


def test_data_module_prepare_data_calls_the_preparer(syn, tmp_path):
    root = tmp_path / "data"
    manifest = load_manifest(write_manifest(tmp_path / "m.json", syn, None))
    archives = tmp_path / "mine"
    archives.mkdir()
    shutil.copy(syn.archives["ADEChallengeData2016.zip"], archives)
    calls = []

    def prepare():
        calls.append(1)
        prepare_datasets(["ade20k"], root, manifest=manifest, archives=archives, workers=1)

    prepare()
    dm = EvalDataModule(SegmentationDataset("ade20k", root), prepare=prepare)
    dm.prepare_data()
    assert len(calls) == 2 and dm.prepare_data_per_node
    EvalDataModule(SegmentationDataset("ade20k", root)).prepare_data()  # no preparer: nothing happens


def test_download_false_names_the_prepare_command(tmp_path):
    with pytest.raises(
        DatasetError, match=r"python -m lposs_lab.lab.data.prepare voc20 --root .*dataset.download=true"
    ):
        evaluate(compose_cfg(tmp_path, "dataset=voc20", f"data_root={tmp_path / 'nothing'}", *TINY))
    cfg = compose_cfg(tmp_path, "dataset=voc20", f"data_root={tmp_path}")
    assert data_preparer(cfg) is None


def test_download_true_on_an_unknown_name_is_a_config_error(tmp_path):
    cfg = compose_cfg(tmp_path, "dataset=voc20", "dataset.download=true", "dataset.name=pascal")
    with pytest.raises(ConfigError, match="unknown dataset 'pascal' to prepare"):
        data_preparer(cfg)
