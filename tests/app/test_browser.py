"""The app in a real browser (Debian's chromium under Playwright): segment an uploaded image, browse runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lposs_lab.app.runs import pct1

try:
    from playwright.sync_api import expect
except ModuleNotFoundError:  # the chromium fixture skips these tests (fails them with CI=true)
    expect = None

REPO = Path(__file__).resolve().parents[2]


def test_upload_type_segment_and_see_one_legend_with_every_class(server, page, tmp_path, readme_screenshot):
    url, demo, _ = server
    img = REPO / "examples" / "astronaut.jpg"
    classes = "person;astronaut, flag, rocket;space shuttle, wall;background, sky"
    page.goto(url)
    page.locator("#input-image input[type=file]").set_input_files(str(img))
    page.locator("#input-image img").first.wait_for()  # the upload preview: clicking earlier sends None
    page.locator("#classes textarea").fill(classes)
    page.get_by_role("button", name="Segment", exact=True).click()
    rows = page.locator("#legend tr.legend-row")
    rows.first.wait_for()
    names = page.locator("#legend .legend-name").all_inner_texts()
    assert names == ["person", "flag", "rocket", "wall", "sky"]
    # the classes without a pixel are marked: the same request in-process says which
    result = demo.engine.segment(str(img), classes)
    for i, name in enumerate(names):
        empty = all((labels == i).sum() == 0 for labels in result.labels.values())
        assert ("(no pixels)" in rows.nth(i).inner_text()) == empty, name
    for method in ("maskclip", "lposs", "lposs_plus"):
        assert page.locator(f"#out-{method} img").count() == 1
    assert "meaningless" in page.locator("#banner").inner_text()
    timings = page.locator("#timings").inner_text()
    assert "patch_lp" in timings and "pixel_lp" in timings
    readme_screenshot(page, "app_segment.png", tmp_path)


def test_a_bad_request_is_a_message_in_the_page(server, page, tmp_path):
    page.goto(server[0])
    img = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(img)
    page.locator("#input-image input[type=file]").set_input_files(str(img))
    page.locator("#input-image img").first.wait_for()
    page.locator("#classes textarea").fill("cat, dog, cat")
    page.get_by_role("button", name="Segment", exact=True).click()
    page.get_by_text("'cat' is given twice").first.wait_for()


def pick(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=text).first.click()


def test_runs_tab_lists_runs_worst_image_first_and_shows_its_three_images(
    server, runs_dir, page, tmp_path, readme_screenshot
):
    page.goto(server[0])
    page.get_by_role("tab", name="Runs").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text("lposs_plus")
    results = {k: json.loads((runs_dir / k / "results.json").read_text()) for k in ("lposs_plus", "maskclip")}
    text = table.inner_text()
    for key, res in results.items():
        assert key in text and pct1(res["mIoU"]) in text
    assert "broken/results.json: unreadable" in page.locator("#runs-note").inner_text()
    pick(page, "run-pick", "lposs_plus")
    records = results["lposs_plus"]["per_image"]
    worst = min(records, key=lambda r: (r["mIoU"], r["id"]))
    first = page.locator("#image-table").get_by_role("row").nth(1)  # row 0: the header
    expect(first).to_contain_text(worst["id"])
    assert pct1(worst["mIoU"]) in first.inner_text()
    assert first.locator("img").count() == 1  # its thumbnail
    first.get_by_role("gridcell").nth(1).click()
    for elem in ("run-image", "run-truth", "run-prediction"):
        page.locator(f"#{elem} img").first.wait_for()
    page.locator("#run-legend tr.legend-row").first.wait_for()
    readme_screenshot(page, "app_runs.png", tmp_path)
    # run B on the same dataset: per-image ΔmIoU, most negative first, and one image from both runs
    page.get_by_text("compare with another run on the same dataset").click()
    pick(page, "run-b", "maskclip")
    mb = {r["id"]: r["mIoU"] for r in results["maskclip"]["per_image"]}
    deltas = sorted((mb[r["id"]] - r["mIoU"], r["id"]) for r in records)
    first_delta = page.locator("#delta-table").get_by_role("row").nth(1)
    expect(first_delta).to_contain_text(deltas[0][1])
    assert f"{deltas[0][0]:+.1f}" in first_delta.inner_text()
    pick(page, "compare-pick", deltas[0][1])
    page.locator("#compare-a img").first.wait_for()
    expect(page.locator("#compare-image-note")).to_contain_text(
        "run B: this run did not keep its predictions"
    )
