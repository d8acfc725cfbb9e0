"""Fixtures of the web app tests: two tiny evaluate runs (in-process), one server on a free port on
127.0.0.1 for the whole session, and Debian's chromium driven by Playwright (never ``playwright install``).

With ``CI=true`` a missing Gradio, Playwright or chromium fails the tests; elsewhere they skip.
``LPOSS_APP_SCREENSHOTS=1`` also writes the README's screenshots to ``docs/images/``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TINY = ["vm=tiny_random", "vlm=tiny_random", "device=cpu", "window.short_side=64", "num_workers=0"]
ARTIFACTS = Path(os.environ.get("LPOSS_TEST_ARTIFACTS", REPO / "outputs" / "test-artifacts"))


def need(module: str):
    """Import ``module``; missing: a failure in CI, a skip elsewhere."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        if IN_CI:
            pytest.fail(f"{module} is not installed (pip install -e '.[app]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[app]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_cfg(out: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            "config",
            overrides=[f"paths.root_dir={out}", f"paths.output_dir={out}", "logger=none",
                       "trainer.enable_progress_bar=false", *overrides],
        )  # fmt: skip


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """``runs/lposs_plus`` (predictions kept, Boundary IoU) and ``runs/maskclip`` (no predictions) on a
    4-image synthetic VOC20, made by the evaluate task itself."""
    from synthetic_data import make_dataset

    from lposs_lab.lab.tasks.evaluate import evaluate

    base = tmp_path_factory.mktemp("app_runs")
    data = make_dataset(base / "data", "voc20", n_images=4, size=(40, 56))
    runs = base / "runs"
    plus = runs / "lposs_plus"
    evaluate(compose_cfg(plus, "dataset=voc20", f"data_root={data}", *TINY, "metrics.boundary=true",
                         f"save_predictions={plus / 'predictions'}"))  # fmt: skip
    evaluate(compose_cfg(runs / "maskclip", "dataset=voc20", f"data_root={data}", *TINY, "method=maskclip"))
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    return runs


@pytest.fixture(scope="session")
def server(runs_dir, tmp_path_factory):
    """The app on a free port of 127.0.0.1 with tiny random models: ``(url, demo, settings)``."""
    need("gradio")
    from lposs_lab import LPOSSConfig, WindowConfig
    from lposs_lab.app.engine import Engine
    from lposs_lab.app.ui import AppSettings, build_app, launch

    work = tmp_path_factory.mktemp("app_work")
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")
    settings = AppSettings(
        runs=runs_dir, vm="tiny_random", vlm="tiny_random", device="cpu", port=free_port(), work=work
    )
    # a 224 short side (the predictor's default is 448) keeps the tiny models' requests quick
    config = LPOSSConfig(window=WindowConfig(short_side=224))
    demo = build_app(settings, Engine(settings.vm, settings.vlm, settings.device, config=config))
    launch(demo, settings, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}", demo, settings
    demo.close()


@pytest.fixture(scope="session")
def client(server):
    need("gradio_client")
    from gradio_client import Client

    return Client(server[0], analytics_enabled=False, verbose=False)


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium under Playwright, headless; any off-machine host fails to resolve."""
    need("playwright")
    from playwright.sync_api import sync_playwright

    path = shutil.which("chromium")
    if path is None:
        msg = "chromium is not installed (apt-get install -y chromium fonts-liberation fonts-dejavu-core)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    pw = sync_playwright().start()
    browser = pw.chromium.launch(
        executable_path=path, headless=True, args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
    )
    print(f"chromium {browser.version} at {path}")
    yield browser
    browser.close()
    pw.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def page(chromium, request):
    """A fresh page; a failing test leaves its screenshot in ``outputs/test-artifacts/``."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{request.node.name}.png"
        pg.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failure: {shot}")
    context.close()


@pytest.fixture
def readme_screenshot():
    """``shoot(page, name, tmp_path, locator=None)``: the README screenshot helper (a fixture: test modules
    never import a conftest, whose module name the other conftest files share)."""
    return _readme_screenshot


def _readme_screenshot(pg, name: str, tmp_path: Path, locator=None) -> Path:
    """Take a screenshot (of ``locator`` or the whole page); copy it to docs/images/ when asked to."""
    shot = tmp_path / name
    (locator or pg).screenshot(path=str(shot), **({} if locator is not None else {"full_page": True}))
    if os.environ.get("LPOSS_APP_SCREENSHOTS"):
        (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "images" / name)
    return shot
