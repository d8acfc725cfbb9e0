"""stats.py: the image-level bootstrap against a plain loop over resamples, paired comparisons, settings."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from lposs_lab.errors import ConfigError
from lposs_lab.lab.records import image_record
from lposs_lab.lab.stats import (
    CIConfig,
    bootstrap_metrics,
    paired_bootstrap,
    record_counts,
    resample_weights,
    results_intervals,
    score_rows,
)
from lposs_lab.lab.tasks.config import ci_config


def make_counts(n: int, c: int, seed: int = 0, *, boundary: bool = True, absent: int | None = None) -> dict:
    """Per-image counts of ``n`` images and ``c`` classes; each class is in about a third of the images,
    class ``absent`` in none (its union is 0 everywhere)."""
    rng = np.random.default_rng(seed)
    union = rng.integers(1, 400, (n, c)) * (rng.random((n, c)) < 0.35)
    if absent is not None:
        union[:, absent] = 0
    inter = np.floor(union * rng.random((n, c))).astype(np.int64)
    labeled = union.sum(1) + rng.integers(0, 50, n)
    out = {"iou": {"intersection": inter, "union": union, "correct": inter.sum(1), "labeled": labeled}}
    if boundary:
        b_union = union // 3
        out["boundary"] = {"intersection": np.minimum(inter // 4, b_union), "union": b_union}
    return out


def reference(counts: dict, resamples: int, seed: int, level: float) -> dict:
    """The bootstrap written plainly: one resample at a time, integer sums of the drawn images' counts."""
    iou = counts["iou"]
    n, c = iou["intersection"].shape
    rng = np.random.default_rng(seed)

    def miou_of(inter, union):
        per = [inter[j] / union[j] if union[j] > 0 else np.nan for j in range(c)]
        seen = [v for v in per if not np.isnan(v)]
        return (sum(seen) / len(seen) if seen else np.nan), per

    draws = {"mIoU": [], "pixel_accuracy": [], "per_class_iou": [], "boundary_iou": [], "per_class_biou": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        m, per = miou_of(iou["intersection"][idx].sum(0), iou["union"][idx].sum(0))
        draws["mIoU"].append(m)
        draws["per_class_iou"].append(per)
        draws["pixel_accuracy"].append(iou["correct"][idx].sum() / iou["labeled"][idx].sum())
        if "boundary" in counts:
            bm, bper = miou_of(
                counts["boundary"]["intersection"][idx].sum(0), counts["boundary"]["union"][idx].sum(0)
            )
            draws["boundary_iou"].append(bm)
            draws["per_class_biou"].append(bper)

    def interval(values):
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        return None if v.size == 0 else list(100 * np.quantile(v, [(1 - level) / 2, (1 + level) / 2]))

    out = {k: interval(draws[k]) for k in ("mIoU", "pixel_accuracy")}
    out["per_class_iou"] = [interval(col) for col in np.asarray(draws["per_class_iou"]).T]
    if "boundary" in counts:
        out["boundary_iou"] = interval(draws["boundary_iou"])
        out["per_class_boundary_iou"] = [interval(col) for col in np.asarray(draws["per_class_biou"]).T]
    return out


def assert_same_intervals(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g == pytest.approx(w, abs=1e-9)


def test_bootstrap_equals_a_plain_loop_over_resamples():
    counts = make_counts(37, 6, seed=1, absent=4)
    got = bootstrap_metrics(counts, level=0.9, resamples=300, seed=7)
    want = reference(counts, 300, 7, 0.9)
    assert set(got) == set(want)
    for key in ("mIoU", "pixel_accuracy", "boundary_iou"):
        assert got[key] == pytest.approx(want[key], abs=1e-9)
    assert_same_intervals(got["per_class_iou"], want["per_class_iou"])
    assert_same_intervals(got["per_class_boundary_iou"], want["per_class_boundary_iou"])
    assert got["per_class_iou"][4] is None  # a class with no pixel in any image has no interval
    assert got["mIoU"][0] < got["mIoU"][1]


def test_a_class_in_few_images_is_left_out_of_the_resamples_that_miss_it():
    counts = make_counts(25, 3, seed=2, boundary=False)
    counts["iou"]["union"][:, 2] = 0
    counts["iou"]["intersection"][:, 2] = 0
    counts["iou"]["union"][0, 2], counts["iou"]["intersection"][0, 2] = 100, 90  # class 2: image 0 only
    got = bootstrap_metrics(counts, resamples=200, seed=3)
    want = reference(counts, 200, 3, 0.95)
    assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-9)
    assert got["per_class_iou"][2] == pytest.approx([90.0, 90.0])  # defined only where image 0 was drawn
    assert "boundary_iou" not in got


def test_same_seed_same_interval_and_chunking_does_not_matter():
    counts = make_counts(50, 5, seed=4)
    a = bootstrap_metrics(counts, resamples=200, seed=11)
    assert bootstrap_metrics(counts, resamples=200, seed=11) == a
    assert bootstrap_metrics(counts, resamples=200, seed=12)["mIoU"] != a["mIoU"]
    whole = np.concatenate(list(resample_weights(50, 200, 11)))
    chunked = np.concatenate(list(resample_weights(50, 200, 11, chunk=7)))
    assert whole.shape == (200, 50) and np.array_equal(whole, chunked)
    assert np.array_equal(whole.sum(1), np.full(200, 50.0))


def test_interval_brackets_the_point_estimate():
    counts = make_counts(400, 8, seed=5)
    point = score_rows(counts)
    ci = bootstrap_metrics(counts, resamples=500, seed=0)
    for key in ("mIoU", "pixel_accuracy", "boundary_iou"):
        low, high = ci[key]
        assert low < point[key] < high, key
        assert high - low < 10  # 400 images: a few points wide, not the whole range
    for p, (low, high) in zip(point["per_class_iou"], ci["per_class_iou"], strict=True):
        assert low < p < high


def test_one_image_split_collapses_the_interval():
    counts = make_counts(1, 4, seed=6)
    counts["iou"]["union"][0] = [10, 0, 30, 40]
    counts["iou"]["intersection"][0] = [5, 0, 30, 4]
    point = score_rows(counts)
    ci = bootstrap_metrics(counts, resamples=50, seed=0)
    assert point["mIoU"] == pytest.approx(100 * (0.5 + 1.0 + 0.1) / 3)
    assert ci["mIoU"] == pytest.approx([point["mIoU"]] * 2)
    assert ci["pixel_accuracy"] == pytest.approx([point["pixel_accuracy"]] * 2)
    assert ci["per_class_iou"][1] is None and ci["per_class_iou"][0] == pytest.approx([50.0, 50.0])


def test_paired_identical_runs_are_not_significant():
    counts = make_counts(60, 5, seed=7)
    res = paired_bootstrap(counts, counts, resamples=200, seed=0)
    assert res["delta"] == 0.0 and res["ci"] == [0.0, 0.0]
    assert res["p_value"] == 1.0 and res["significant"] is False and res["num_images"] == 60
    assert all(r["delta"] == 0.0 and r["ci"] == [0.0, 0.0] for r in res["per_class"])


def test_paired_clearly_better_run_is_significant_and_equals_a_joint_loop():
    b = make_counts(80, 4, seed=8, boundary=False)
    a = {"iou": dict(b["iou"])}
    a["iou"]["intersection"] = np.minimum(
        b["iou"]["intersection"] + 20, b["iou"]["union"]
    )  # better everywhere
    a["iou"]["intersection"][:, 3] = b["iou"]["intersection"][:, 3]  # except class 3: the same
    res = paired_bootstrap(a, b, resamples=300, seed=5, level=0.9)
    rng = np.random.default_rng(5)
    deltas = []
    for _ in range(300):  # the same images for both runs in each resample
        idx = rng.integers(0, 80, size=80)
        ia, ua = a["iou"]["intersection"][idx].sum(0), a["iou"]["union"][idx].sum(0)
        ib, ub = b["iou"]["intersection"][idx].sum(0), b["iou"]["union"][idx].sum(0)
        deltas.append(100 * (np.mean((ia / ua)[ua > 0]) - np.mean((ib / ub)[ub > 0])))
    assert res["ci"] == pytest.approx(list(np.quantile(deltas, [0.05, 0.95])), abs=1e-9)
    sa, sb = score_rows(a), score_rows(b)
    assert res["delta"] == pytest.approx(sa["mIoU"] - sb["mIoU"]) and res["delta"] > 0
    assert res["significant"] is True and res["p_value"] == pytest.approx(2 / 301)
    assert res["ci"][0] > 0
    assert [r["index"] for r in res["per_class"]][-1] == 3 and res["per_class"][-1]["delta"] == 0.0
    assert abs(res["per_class"][0]["delta"]) >= abs(res["per_class"][1]["delta"])
    swapped = paired_bootstrap(b, a, resamples=300, seed=5, level=0.9)
    assert swapped["delta"] == pytest.approx(-res["delta"]) and swapped["significant"] is True


def test_paired_refuses_different_shapes_and_unknown_metrics():
    with pytest.raises(ValueError, match="differ in images"):
        paired_bootstrap(make_counts(5, 3), make_counts(6, 3), resamples=10)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(make_counts(5, 3), make_counts(5, 3), metric="dice", resamples=10)
    with pytest.raises(ValueError, match="both runs"):
        paired_bootstrap(make_counts(5, 3, boundary=False), make_counts(5, 3), metric="boundary_iou")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"level": 1.0}, r"metrics.ci.level=1.0 is out of range; valid: a number in \(0, 1\)"),
        ({"resamples": -1}, r"metrics.ci.resamples=-1 is out of range; valid: an integer >= 0"),
        ({"seed": 1.5}, r"metrics.ci.seed=1.5 is out of range"),
    ],
)
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CIConfig(**kwargs)


def test_settings_from_the_run_config():
    assert ci_config(OmegaConf.create({})) == CIConfig()
    cfg = OmegaConf.create({"metrics": {"ci": {"level": 0.9, "resamples": 0, "seed": 3}}})
    assert ci_config(cfg) == CIConfig(0.9, 0, 3) and not ci_config(cfg).enabled
    with pytest.raises(ConfigError, match="unknown key metrics.ci.levels; valid: level, resamples, seed"):
        ci_config(OmegaConf.create({"metrics": {"ci": {"levels": 0.9}}}))


def test_results_fields_from_records():
    counts = make_counts(20, 3, seed=9, boundary=False)
    records = [
        image_record(f"im{i}", iou={k: v[i] for k, v in counts["iou"].items()}, miou=0.5) for i in range(20)
    ]
    records.insert(3, image_record("broken", error="unreadable"))
    ids, stacked = record_counts(records)
    assert len(ids) == 20 and "broken" not in ids and set(stacked) == {"iou"}
    fields = results_intervals(records, ["sky;wall", "cat", "dog"], CIConfig(resamples=100))
    assert fields["ci"] == {"level": 0.95, "resamples": 100, "seed": 0}
    assert fields["mIoU_ci"] == bootstrap_metrics(counts, resamples=100)["mIoU"]
    assert list(fields["per_class_iou_ci"]) == ["background", "cat", "dog"]
    assert results_intervals(records, ["a", "b", "c"], CIConfig(resamples=0)) == {"ci": None}


def test_wandb_summary_gets_the_interval_keys(tmp_path):
    from types import SimpleNamespace

    from pytorch_lightning.loggers import WandbLogger

    from lposs_lab.lab.callbacks import EvaluationReport
    from lposs_lab.lab.records import StateStore

    class RecordingWandb(WandbLogger):  # a W&B logger (recognised by its class) that records, no run
        def __init__(self):
            self._recorded = SimpleNamespace(summary={}, log=lambda data: None)

        @property
        def experiment(self):
            return self._recorded

    counts = make_counts(15, 3, seed=10, boundary=False)
    store = StateStore(tmp_path / "states")
    ids = [f"im{i}" for i in range(15)]
    for i, key in enumerate(ids):
        store.write(image_record(key, iou={k: v[i] for k, v in counts["iou"].items()}, miou=0.5, seconds=0.1))
    logger = RecordingWandb()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    ci = CIConfig(level=0.8, resamples=50, seed=2)
    report = EvaluationReport(store, ids, ["a", "b", "c"], dataset="voc", ci=ci)
    report.on_test_end(trainer, None)
    want = bootstrap_metrics(counts, level=0.8, resamples=50, seed=2)
    summary = logger.experiment.summary
    assert [summary["test/mIoU_ci_low"], summary["test/mIoU_ci_high"]] == want["mIoU"]
    assert [summary["test/pixel_accuracy_ci_low"], summary["test/pixel_accuracy_ci_high"]] == want[
        "pixel_accuracy"
    ]
    assert "test/boundary_iou_ci_low" not in summary and summary["voc/mIoU"] == pytest.approx(
        score_rows(counts)["mIoU"]
    )
