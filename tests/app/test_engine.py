"""The app's segmentation without a server: kept features give the numbers of a fresh prediction, the
abstain slider, the legend and the downloads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lposs_lab import LPOSS, LPOSSConfig, WindowConfig
from lposs_lab.app.engine import WINDOWS, AppInputError, Engine, Params, parse_class_box, read_image
from lposs_lab.app.render import blend, enlarge, legend_html, save_label_png, save_scores_npz
from lposs_lab.postprocess import Abstain
from lposs_lab.viz import palette

CONFIG = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=64))
CLASSES = "red;crimson, blue, green"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("tiny_random", "tiny_random", "cpu", config=CONFIG)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
    arr[:, :26] = (220, 30, 30)
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(arr).save(path)
    return path


def fresh(config: LPOSSConfig, method: str, image, abstain=None):
    model = LPOSS.from_config(config, method=method)
    return model.predict(str(image), classes=parse_class_box(CLASSES), abstain=abstain)


def test_a_slider_move_reuses_the_features_and_equals_a_fresh_prediction(engine, image):
    first = engine.segment(image, CLASSES)
    assert not first.features_reused and first.class_names == ["red", "blue", "green"]
    params = Params(k=7, gamma=1.5, sigma=0.05, r=5, tau=0.05)
    moved = engine.segment(image, CLASSES, params=params)
    assert moved.features_reused and moved.unchanged == ["maskclip"]  # a patch control: not the initial
    assert all(moved.timings[m]["features"] < 0.05 for m in ("lposs", "lposs_plus"))
    np.testing.assert_array_equal(moved.labels["maskclip"], first.labels["maskclip"])
    config = replace(CONFIG, lp=replace(CONFIG.lp, k=7, gamma=1.5, sigma=0.05),
                     pixel=replace(CONFIG.pixel, r=5, tau=0.05))  # fmt: skip
    for method in ("maskclip", "lposs", "lposs_plus"):
        ref = fresh(config, method, image)
        np.testing.assert_array_equal(moved.labels[method], ref.labels.numpy())
        np.testing.assert_allclose(moved.scores[method], ref.scores.numpy(), rtol=1e-2, atol=1e-3)
    assert len(engine.models) == 1  # one model per (vm, vlm, device), kept


def test_each_control_reruns_only_the_methods_it_changes(engine, image):
    engine.segment(image, CLASSES)
    assert engine.segment(image, CLASSES).unchanged == ["maskclip", "lposs", "lposs_plus"]
    assert engine.segment(image, CLASSES, params=Params(tau=0.02)).unchanged == ["maskclip", "lposs"]
    assert engine.segment(image, CLASSES, params=Params(threshold=0.3)).unchanged == []
    assert engine.segment(image, "red, blue").unchanged == []  # other classes


def test_another_window_recomputes_the_features(engine, image):
    engine.segment(image, CLASSES)
    other = engine.segment(image, CLASSES, params=Params(window="whole image"))
    assert not other.features_reused
    assert WINDOWS["whole image"] == (0, 0)


def test_the_abstain_slider_equals_the_library_rule_and_marks_unknown(engine, image):
    res = engine.segment(image, CLASSES, params=Params(threshold=0.6))
    ref = fresh(CONFIG, "lposs_plus", image, abstain=Abstain(0.6))
    np.testing.assert_array_equal(res.labels["lposs_plus"], ref.labels.numpy())
    everything = engine.segment(image, CLASSES, params=Params(threshold=1.0))
    assert all((lab == 255).all() for lab in everything.labels.values())
    legend = legend_html(everything.class_names, everything.labels)
    assert legend.count("(no pixels)") == 3 and "unknown</td><td>100.0%" in legend


@pytest.mark.parametrize(
    ("classes", "message"),
    [(None, "no classes given"), ("  ", "no classes given"), ("a, b, A", "'A' is given twice"),
     (",".join(map(str, range(201))), "201 classes asked for; at most 200")],
)  # fmt: skip
def test_bad_class_boxes(classes, message):
    with pytest.raises(AppInputError, match=message):
        parse_class_box(classes)


def test_bad_files_and_huge_images(tmp_path):
    with pytest.raises(AppInputError, match="no image given"):
        read_image(None)
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(AppInputError, match="^image file is empty: e.png$"):
        read_image(tmp_path / "e.png")
    Image.fromarray(np.zeros((30, 300, 3), np.uint8)).save(tmp_path / "w.png")
    rgb, notices = read_image(tmp_path / "w.png", max_side=100)
    assert rgb.shape == (10, 100, 3) and notices[0].startswith("the image (300x30) was downscaled to 100x10")


def test_an_out_of_range_control_is_a_message(engine, image):
    with pytest.raises(AppInputError, match="^lp.k=0 is out of range; valid: an integer >= 1$"):
        engine.segment(image, CLASSES, params=Params(k=0))
    with pytest.raises(AppInputError, match="unknown window 'w999'"):
        engine.segment(image, CLASSES, params=Params(window="w999"))


def test_legend_lists_every_class_with_its_share_and_marks_those_without_pixels():
    a = np.array([[0, 0], [1, 255]], np.uint8)
    b = np.array([[1, 1], [1, 1]], np.uint8)
    legend = legend_html(["cat", "dog", "bird"], {"a": a, "b": b}, {"a": "A", "b": "B"})
    assert legend.count('class="legend-row"') == 4  # three classes and unknown
    assert "cat</span></td><td>50.0%</td><td>&ndash;" in legend
    assert "dog</span></td><td>25.0%</td><td>100.0%" in legend
    assert 'bird</span> <em class="no-pixels">(no pixels)</em>' in legend
    r, g, bl = palette(256)[2]
    assert f"rgb({r},{g},{bl})" in legend


def test_downloads_keep_the_label_values_and_the_scores(tmp_path):
    labels = np.array([[0, 3], [255, 1]], np.uint8)
    with Image.open(save_label_png(labels, tmp_path / "l.png")) as im:
        assert im.mode == "P" and im.size == (2, 2)
        np.testing.assert_array_equal(np.asarray(im), labels)
    scores = {"lposs": np.arange(8, dtype=np.float16).reshape(2, 2, 2)}
    with np.load(save_scores_npz(scores, ["a", "b"], tmp_path / "s.npz")) as z:
        assert z["class_names"].tolist() == ["a", "b"]
        np.testing.assert_array_equal(z["lposs"], scores["lposs"])


def test_blend_and_enlarge():
    image = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 255], [0, 0, 0]], np.uint8)
    out = blend(image, labels, alpha=0.5)
    expected = np.floor(100 * 0.5 + palette(256)[labels].astype(np.float64) * 0.5 + 0.5)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    big = enlarge(out, side=12)
    assert big.shape == (8, 12, 3) and (big[:4, :4] == out[0, 0]).all()
