"""The ``/segment`` endpoint through gradio_client, bad input, and what the server refuses to serve."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lposs_lab.app.engine import MAX_CLASSES, MAX_SIDE


def two_colour(path: Path, h: int = 48, w: int = 64) -> Path:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2 :] = (30, 30, 220)
    Image.fromarray(arr).save(path)
    return path


def segment(client, path, classes, method="lposs_plus"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), classes, method, api_name="/segment")


@pytest.mark.parametrize("method", ["maskclip", "lposs", "lposs_plus"])
def test_segment_returns_the_label_png_at_the_input_size_and_timings(client, server, tmp_path, method):
    img = two_colour(tmp_path / "two.png")
    png, info = segment(client, img, "red;crimson, blue", method)
    assert Path(png).suffix == ".png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.mode in ("P", "L") and im.size == (64, 48)
        labels = np.asarray(im)
    assert set(np.unique(labels)) <= {0, 1}
    assert info["classes"] == ["red", "blue"] and info["method"] == method and info["size"] == [48, 64]
    t = info["timings"][method]
    assert set(t) >= {"features", "patch_lp", "pixel_lp", "total"} and t["total"] > 0
    assert info["random_init"] == ["vm=tiny_random", "vlm=tiny_random"]
    # the file holds exactly the engine's labels (not re-encoded): the same request in-process
    demo = server[1]
    again = demo.engine.segment(str(img), "red;crimson, blue", methods=[method])
    np.testing.assert_array_equal(labels, again.labels[method])


def error_of(client, path, classes, method="lposs_plus") -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        segment(client, path, classes, method)
    return str(info.value)


def test_bad_inputs_are_one_line_messages_and_the_server_keeps_serving(client, tmp_path):
    img = two_colour(tmp_path / "ok.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    many = ", ".join(f"class {i}" for i in range(MAX_CLASSES + 50))
    cases = {
        (text, "red"): "not a readable image file: notes.png",
        (empty, "red"): "image file is empty: empty.jpg",
        (img, ""): "no classes given",
        (img, " , ;"): "the class list is empty",
        (img, "cat, dog, Cat"): "'Cat' is given twice",
        (img, many): f"{MAX_CLASSES + 50} classes asked for; at most {MAX_CLASSES}",
    }
    for (path, classes), expected in cases.items():
        msg = error_of(client, path, classes)
        assert expected in msg and "\n" not in msg and "Traceback" not in msg, msg
    assert "unknown method 'lposs++'" in error_of(client, img, "red", "lposs++")
    png, info = segment(client, img, "red, blue")  # served as before
    assert Image.open(png).size == (64, 48) and info["classes"] == ["red", "blue"]


def test_a_huge_image_is_downscaled_with_a_notice(client, tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((40, MAX_SIDE + 952, 3), 128, np.uint8)).save(path)
    png, info = segment(client, path, "grey, white", "maskclip")
    w, h = MAX_SIDE, round(40 * MAX_SIDE / (MAX_SIDE + 952))
    assert Image.open(png).size == (w, h) and info["size"] == [h, w]
    assert info["notices"] == [
        f"the image ({MAX_SIDE + 952}x40) was downscaled to {w}x{h} (longest side at most {MAX_SIDE}); "
        "label maps and scores are at that size"
    ]


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_no_route_serves_files_outside_the_allowed_folders(server, runs_dir):
    url, _, settings = server
    work = Path(settings.work)
    inside = runs_dir / "lposs_plus" / "results.json"
    status, body = fetch(f"{url}/gradio_api/file={inside}")  # the control: an allowed file is served
    assert status == 200 and json.loads(body)["dataset"] == "voc20"
    repo_file = Path(__file__).resolve().parents[2] / "pyproject.toml"  # the working folder's files
    targets = ["/etc/passwd", f"{work}/../../../../etc/passwd", f"{runs_dir}/../../../../../etc/passwd",
               "/proc/self/environ", str(repo_file), str(Path.home() / ".bashrc")]  # fmt: skip
    for target in targets:
        for route in ("/file=", "/gradio_api/file=", "/gradio_api/file/", "/static/", "/assets/"):
            for spelled in (target, urllib.parse.quote(target), target.replace("/", "%2F")):
                status, body = fetch(f"{url}{route}{spelled}")
                assert b"root:" not in body and b"[project]" not in body and b"PATH=" not in body, (
                    route,
                    spelled,
                    status,
                )
                if route.endswith("file="):
                    assert status in (400, 403, 404), (route, spelled, status)
    for sneaky in (
        "/gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/../../../../etc/passwd",
    ):
        status, body = fetch(url + sneaky)
        assert b"root:" not in body, (sneaky, status)


def test_uploads_over_the_cap_are_refused(server):
    url = server[0]
    boundary = "lposscap"
    payload = b"x" * (26 * 1024 * 1024)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{url}/gradio_api/upload", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 413


def test_the_server_binds_loopback_and_queues_one_model_request_at_a_time(server):
    url, demo, settings = server
    assert settings.host == "127.0.0.1" and url.startswith("http://127.0.0.1:") and not settings.share
    assert demo._queue.default_concurrency_limit == 1
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    assert fns["segment"].concurrency_id == "model"


def test_requests_wait_in_one_queue_for_the_model_and_learn_their_position(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.utils import Status

    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):  # new images: nothing kept, each request runs the encoders and both stages
        paths.append(tmp_path / f"q{i}.png")
        Image.fromarray(rng.integers(0, 255, (224, 320, 3), dtype=np.uint8)).save(paths[-1])
    jobs = [client.submit(handle_file(str(p)), "a, b", "lposs_plus", api_name="/segment") for p in paths]
    seen = []
    while not all(j.done() for j in jobs):
        seen.append(tuple(j.status().code for j in jobs))
    assert all(j.result()[1]["size"] == [224, 320] for j in jobs)
    # never both running; one waited in the queue while the other ran
    assert (Status.PROCESSING, Status.PROCESSING) not in seen
    assert {(Status.IN_QUEUE, Status.PROCESSING), (Status.PROCESSING, Status.IN_QUEUE)} & set(seen), set(seen)
