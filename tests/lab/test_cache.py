"""Feature cache: exact round trip, reuse across LP settings, rebuild on encoder or window changes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lposs_lab.config import LPConfig, LPOSSConfig, WindowConfig
from lposs_lab.lab.cache import (
    FeatureCache,
    FeatureCacheSpec,
    attach_feature_cache,
    cached_features,
    feature_key,
    key_hash,
)
from lposs_lab.lab.tasks.config import cache_spec
from lposs_lab.predictor import LPOSS

SMALL = WindowConfig(size=32, stride=16, short_side=48, long_side=96)
CLASSES = ["sky", "tree", "road;street"]


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return tiny_encoders


def _model(encoders, vm_is_vlm: bool = False, **cfg) -> LPOSS:
    vm, vlm = encoders
    config = LPOSSConfig(vm="clip_b16" if vm_is_vlm else "tiny_random", vlm="tiny_random", device="cpu",
                         window=cfg.pop("window", SMALL), **cfg)
    model = LPOSS(vlm if vm_is_vlm else vm, vlm, config, method=cfg.get("method", "lposs_plus"))
    model.set_classes(CLASSES)
    return model


def _images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8) for i in range(n)]


class Counter:
    """Counts forward calls of the VLM (which runs for every window batch of every extraction)."""

    def __init__(self, model: LPOSS) -> None:
        self.calls = 0
        model.vlm.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def test_round_trip_is_exact_and_scores_are_bit_identical(encoders, tmp_path):
    model = _model(encoders)
    img = _images(1)[0]
    fresh = model.extract(img)
    cache = FeatureCache(tmp_path, {"k": 1}, shard_size=1)
    cache.put("a", fresh, digest="d")
    assert len(list(cache.path.glob("shard-*"))) == 1  # shard_size=1: written at once
    again = FeatureCache(tmp_path, {"k": 1}).get("a", digest="d")
    assert again is not None
    for name in ("image", "vm", "vlm"):
        assert torch.equal(getattr(fresh, name), getattr(again, name)), name
    assert again.windows == fresh.windows and again.original_size == fresh.original_size
    assert again.patch_size == fresh.patch_size == 16
    s1, _ = model.propagate(fresh)
    s2, _ = model.propagate(again)
    assert torch.equal(s1, s2)
    assert FeatureCache(tmp_path, {"k": 1}).get("a", digest="other") is None  # changed image: a miss
    assert FeatureCache(tmp_path, {"k": 1}).get("missing") is None


def test_reused_when_only_lp_settings_change_rebuilt_for_window_or_backbone(encoders, tmp_path):
    imgs = _images(3)
    model = _model(encoders)
    counter = Counter(model)
    store = attach_feature_cache(model, tmp_path, "syn", shard_size=2)
    first = [model.predict(im, image_id=str(i)).low_res_scores for i, im in enumerate(imgs)]
    assert (store.misses, store.hits) == (3, 0)
    calls_first = counter.calls
    assert calls_first >= 3
    store.close()

    # other LP / kernel / pixel settings, new process-like predictor: no encoder call at all
    lp_model = _model(encoders, lp=LPConfig(k=3, gamma=2.0, spatial="none"))
    lp_counter = Counter(lp_model)
    lp_store = attach_feature_cache(lp_model, tmp_path, "syn")
    for i, im in enumerate(imgs):
        lp_model.predict(im, image_id=str(i))
    assert lp_counter.calls == 0 and (lp_store.hits, lp_store.misses) == (3, 0)

    # same settings: scores identical to the first, uncached run
    same = _model(encoders)
    attach_feature_cache(same, tmp_path, "syn")
    again = [same.predict(im, image_id=str(i)).low_res_scores for i, im in enumerate(imgs)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    # another window setup: a new key, everything encoded again
    win_model = _model(encoders, window=replace(SMALL, size=48, stride=24))
    win_counter = Counter(win_model)
    win_store = attach_feature_cache(win_model, tmp_path, "syn")
    for i, im in enumerate(imgs):
        win_model.predict(im, image_id=str(i))
    assert win_store.misses == 3 and win_counter.calls >= 3

    # another backbone (CLIP's own features as the VM): a new key again
    bb_model = _model(encoders, vm_is_vlm=True)
    bb_counter = Counter(bb_model)
    bb_store = attach_feature_cache(bb_model, tmp_path, "syn")
    for i, im in enumerate(imgs):
        bb_model.predict(im, image_id=str(i))
    assert bb_store.misses == 3 and bb_counter.calls >= 3
    keys = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert len(keys) == 3
    assert feature_key(bb_model, "syn")["vm"] == "<vlm>"


def test_ensemble_uses_one_cache_per_window_setup(encoders, tmp_path):
    model = _model(encoders, window=replace(SMALL, ensemble=((48, 24),)))
    store = attach_feature_cache(model, tmp_path, "syn")
    img = _images(1)[0]
    ref = model.predict(img).low_res_scores  # no id: no cache
    got = model.predict(img, image_id="x").low_res_scores
    hit = model.predict(img, image_id="x").low_res_scores
    assert len(store.caches) == 2 and store.misses == 2 and store.hits == 2
    assert torch.equal(ref, got) and torch.equal(ref, hit)
    assert store.tally() == {"hits": 0, "images": 1}  # "x" was encoded (its first lookups missed)
    store.close()
    again = attach_feature_cache(model, tmp_path, "syn")
    model.predict(img, image_id="x")
    assert again.tally() == {"hits": 1, "images": 1}


def test_tally_counts_an_image_from_the_cache_only_when_every_window_setup_hit(encoders, tmp_path):
    imgs = _images(2)
    single = _model(encoders)  # caches the ensemble's first window setup only
    attach_feature_cache(single, tmp_path, "syn")
    single.predict(imgs[0], image_id="a")
    single.feature_cache.close()
    ens = _model(encoders, window=replace(SMALL, ensemble=((48, 24),)))
    store = attach_feature_cache(ens, tmp_path, "syn")
    for i, im in enumerate(imgs):
        ens.predict(im, image_id="ab"[i])
    assert (store.hits, store.misses) == (1, 3)  # lookups: a hits once, misses once; b misses twice
    assert store.tally() == {"hits": 0, "images": 2}
    store.close()
    again = attach_feature_cache(ens, tmp_path, "syn")
    for i, im in enumerate(imgs):
        ens.predict(im, image_id="ab"[i])
    assert again.tally() == {"hits": 2, "images": 2} and again.misses == 0


def test_stale_or_colliding_key_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, {"vm": "a"})
    (cache.path / "key.json").write_text(json.dumps({"vm": "b"}))
    with pytest.raises(ValueError, match="holds another key"):
        FeatureCache(tmp_path, {"vm": "a"})
    assert key_hash({"a": 1, "b": 2}) == key_hash({"b": 2, "a": 1}) != key_hash({"a": 1, "b": 3})
    with pytest.raises(ValueError, match="float32, float16"):
        FeatureCache(tmp_path, {"vm": "c"}, dtype="int8")


def test_float16_storage_is_close_and_keyed_separately(encoders, tmp_path):
    model = _model(encoders)
    feats = model.extract(_images(1)[0])
    half = FeatureCache(tmp_path, {"k": 1}, dtype="float16")
    full = FeatureCache(tmp_path, {"k": 1})
    assert half.path != full.path
    half.put("a", feats)
    half.flush()
    got = FeatureCache(tmp_path, {"k": 1}, dtype="float16").get("a")
    assert got is not None and got.vm.dtype == torch.float32
    assert 0 < (got.vm - feats.vm).abs().max() < 2e-3


def test_newest_shard_wins_and_other_processes_shards_are_seen(encoders, tmp_path):
    model = _model(encoders)
    a, b = _images(2)
    writer = FeatureCache(tmp_path, {"k": 2})
    reader = FeatureCache(tmp_path, {"k": 2})
    writer.put("x", model.extract(a), digest="old")
    writer.flush()
    writer.put("x", model.extract(b), digest="new")
    writer.flush()
    assert reader.get("x") is None  # not refreshed yet
    reader.refresh()
    assert reader.digest("x") == "new" and len(reader) == 1
    assert torch.equal(reader.get("x").vm, model.extract(b).vm)


def test_cached_features_over_a_dataset_and_the_run_config_cache_spec(encoders, tmp_path):
    from synthetic_data import make_dataset

    from lposs_lab.lab.data import SegmentationDataset

    make_dataset(tmp_path / "data", "voc20", 2, (40, 56))
    ds = SegmentationDataset("voc20", tmp_path / "data")
    model = _model(encoders)
    counter = Counter(model)
    cfg = OmegaConf.create({"cache": {"enabled": True, "dir": str(tmp_path / "c"), "shard_size": 3}})
    spec = cache_spec(cfg, f"voc20@{tmp_path / 'data'}")
    assert spec == FeatureCacheSpec(str(tmp_path / "c"), f"voc20@{tmp_path / 'data'}", 3, "float32")
    store = spec.attach(model)
    assert store.dataset.startswith("voc20@") and model.feature_cache is store and store.shard_size == 3
    first = dict(cached_features(model, ds, store))
    n = counter.calls
    assert n >= 2 and (store.misses, store.hits) == (2, 0)
    second = dict(cached_features(model, ds, store))
    assert counter.calls == n and sorted(first) == sorted(second) == ds.ids and store.hits == 2
    assert len(list((tmp_path / "c").glob("*/shard-*"))) == 1  # flushed at the end of the first pass
    assert cache_spec(OmegaConf.create({"cache": {"enabled": False}}), "x") is None
    assert cache_spec(OmegaConf.create({}), "x") is None
    plain = dict(cached_features(model, [(i, s["image"]) for i, s in zip(ds.ids, ds, strict=True)], None))
    assert all(torch.equal(plain[k].vm, first[k].vm) for k in plain)


def test_exit_hook_writes_unclosed_caches_and_names_what_it_could_not(encoders, tmp_path, capsys):
    import shutil

    from lposs_lab.lab.cache import _flush_open_caches

    model = _model(encoders)
    feats = model.extract(_images(1)[0])
    kept = FeatureCache(tmp_path / "kept", {"k": 1}, shard_size=8)
    kept.put("a", feats)
    lost = FeatureCache(tmp_path / "lost", {"k": 1}, shard_size=8)
    lost.put("a", feats)
    lost.put("b", feats)
    shutil.rmtree(lost.path)
    lost.path.write_text("not a folder")  # its shard cannot be written
    _flush_open_caches()
    err = capsys.readouterr().err
    assert FeatureCache(tmp_path / "kept", {"k": 1}).get("a") is not None  # written by the hook
    lines = [line for line in err.splitlines() if line.startswith("warning: feature cache")]
    assert len(lines) == 1, err
    assert str(lost.path) in lines[0] and "2 computed image(s) could not be written" in lines[0]
    lost.path.unlink()
    lost._pending.clear()  # nothing left for the real exit hook


def test_evaluation_says_how_many_images_came_from_the_cache_and_names_its_bar(tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from synthetic_data import make_dataset

    from lposs_lab.lab.tasks.evaluate import evaluate

    root = make_dataset(tmp_path / "data", "voc20", n_images=3)
    conf = Path(__file__).resolve().parents[2] / "conf"

    def run(name: str) -> dict:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            cfg = compose("config", overrides=[
                f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / name}", "logger=none",
                "num_workers=0", "dataset=voc20", f"data_root={root}", "vm=tiny_random", "vlm=tiny_random",
                "device=cpu", "window.short_side=32", "method=lposs", f"text_cache_dir={tmp_path / 'text'}",
                "cache.enabled=true", f"cache.dir={tmp_path / 'features'}",
            ])
        results = evaluate(cfg)
        assert json.loads((tmp_path / name / "results.json").read_text())["cache"] == results["cache"]
        return results

    first = run("first")
    out = capsys.readouterr().out
    assert first["cache"] == {"hits": 0, "images": 3}
    assert "feature cache: 0 of 3 images from the cache" in out
    assert "evaluate voc20: 100%" in out and "DataLoader" not in out and "Testing" not in out
    second = run("second")
    assert second["cache"] == {"hits": 3, "images": 3} and second["mIoU"] == first["mIoU"]
    assert "feature cache: 3 of 3 images from the cache" in capsys.readouterr().out
