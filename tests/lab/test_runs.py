"""Runs that stop, fail or collide say so (exit codes, messages, output names, workers, early checks),
and sweeps run on Hydra's own launchers and sweepers (submitit, joblib, Optuna)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from synthetic_data import make_dataset

from lposs_lab.errors import ConfigError, OutputError
from lposs_lab.lab.tasks.config import check_output_dir

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "vm=tiny_random",
    "vlm=tiny_random",
    "device=cpu",
    "window.short_side=64",
    "num_workers=0",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


@pytest.fixture(scope="module")
def voc20(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), "voc20", n_images=6)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    """Text embeddings of the tiny CLIP kept on disk across the runs of this module (they are slow)."""
    return tmp_path_factory.mktemp("text")


def run_py(*args, cwd, env=None, timeout=600):
    flags = [a for a in args if a.startswith("-")]
    cmd = [sys.executable, str(REPO / "run.py"), *flags, *[a for a in args if a not in flags]]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )


def popen_py(*args, cwd):
    cmd = [sys.executable, str(REPO / "run.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_states(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if len(list(folder.glob("*.state.json"))) >= n:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {n} states in {folder} after {timeout}s")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------------------------------- stopping
@pytest.mark.slow
def test_sigterm_exits_non_zero_keeps_states_and_resume_finishes(voc20, text_cache, tmp_path):
    run = tmp_path / "run"
    args = [
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        f"text_cache_dir={text_cache}",
        f"hydra.run.dir={run}",
        "pixel.max_iter=60",
    ]
    proc = popen_py(*args, cwd=tmp_path)
    wait_for_states(run / "states", 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    [line] = error_lines(err)
    assert "stopped by SIGTERM after" in line and f"resume=true hydra.run.dir={run}" in line
    assert not (run / "results.json").exists()
    kept = len(list((run / "states").glob("*.state.json")))
    assert 1 <= kept < 6
    done = run_py(*args, "resume=true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((run / "results.json").read_text())
    assert res["num_images"] == 6 and res["resumed"] == kept


@pytest.mark.slow  # a subprocess
def test_a_run_that_scores_nothing_exits_2_and_still_records_why(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=2)
    for label in (root / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png"):
        label.write_bytes(b"not a png")
    out = run_py(
        "dataset=voc20",
        f"data_root={root}",
        "method=oracle_patch",
        "num_workers=0",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = error_lines(out.stderr)
    assert "no image of voc20 could be scored (2 error(s)" in line and "cannot decode label" in line
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["num_images"] == 0 and len(res["errors"]) == 2


def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            kids.append(int(status.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dataloader_workers_exit_when_the_main_process_is_killed(voc20, text_cache, tmp_path):
    run = tmp_path / "run"
    proc = popen_py(
        "dataset=voc20",
        f"data_root={voc20}",
        *[a for a in TINY if a != "num_workers=0"],
        "num_workers=2",
        f"text_cache_dir={text_cache}",
        f"hydra.run.dir={run}",
        "pixel.max_iter=60",
        cwd=tmp_path,
    )
    wait_for_states(run / "states", 1, proc)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    end = time.time() + 15
    while time.time() < end and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]


# ---------------------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_bad_sweep_point_is_named_the_valid_point_runs_and_the_sweep_fails(voc20, text_cache, tmp_path):
    out = run_py(
        "-m",
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        f"text_cache_dir={text_cache}",
        "limit=1",
        "method=lposs",
        "lp.k=0,50",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "error: lp.k=0 is out of range; valid: an integer >= 1" in out.stderr
    assert "sweep point failed:" in out.stderr and "lp.k=0" in out.stderr
    results = sorted((tmp_path / "sweep").rglob("results.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["config"]["lp"]["k"] == 50


def test_every_value_is_validated_before_anything_is_built(repo_root, voc20, tmp_path, monkeypatch):
    from lposs_lab.lab.tasks import evaluate as ev

    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("lposs_lab.models.create_vm", boom)
    monkeypatch.setattr("lposs_lab.models.create_vlm", boom)
    for override, message in [
        ("lp.k=0", "lp.k=0 is out of range"),
        ("pixel.r=4", "pixel.r=4 is out of range"),
        ("window.stride=0", "window.stride=0"),
        ("pixel.tau=-1", "pixel.tau=-1"),
        ("device=gpu", "device='gpu'"),
        ("limit=-3", "limit=-3"),
    ]:
        with initialize_config_dir(version_base="1.3", config_dir=str(repo_root / "conf")):
            cfg = compose(
                "config",
                overrides=[
                    "dataset=voc20",
                    f"data_root={voc20}",
                    *TINY,
                    override,
                    f"paths.output_dir={tmp_path}",
                    f"paths.root_dir={tmp_path}",
                ],
            )
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            ev.plan_evaluation(cfg)
    assert not (tmp_path / "states").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [["hydra/launcher=submitit_local"], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
    ids=["submitit_local", "joblib"],
)
def test_sweep_points_run_on_hydra_launchers(voc20, text_cache, tmp_path, launcher):
    out = run_py(
        "-m",
        *launcher,
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        f"text_cache_dir={text_cache}",
        "limit=2",
        "method=lposs",
        "lp.k=3,40",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("results.json"))]
    assert sorted(r["config"]["lp"]["k"] for r in runs) == [3, 40]
    assert all(r["num_images"] == 2 and r["mIoU"] is not None for r in runs)
    # k=3 and k=40 give different graphs: the sweep really ran two configurations
    assert runs[0]["per_class_iou"] != runs[1]["per_class_iou"] or runs[0]["mIoU"] != runs[1]["mIoU"]


@pytest.mark.slow
def test_optuna_search_maximises_miou_and_the_report_shows_its_best_point(voc20, text_cache, tmp_path):
    sweep = tmp_path / "optuna"
    out = run_py(
        "hparams_search=optuna",
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        "limit=2",
        f"text_cache_dir={text_cache}",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        f"cache.dir={tmp_path / 'features'}",
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert len(trials) == 3
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {max(t['mIoU'] for t in trials)}" in best
    report = subprocess.run(
        [sys.executable, "-m", "lposs_lab.lab.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert "## Searches (best point of each)" in report.stdout and str(sweep) in report.stdout
    assert report.stdout.count("(random init)") == 3  # one trial row each, marked


# ---------------------------------------------------------------------------------------- outputs
def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def _segment(repo_root, tmp_path, images, *extra):
    from lposs_lab.lab.tasks.segment import segment

    with initialize_config_dir(version_base="1.3", config_dir=str(repo_root / "conf")):
        cfg = compose(
            "config",
            overrides=[
                "vm=tiny_random",
                "vlm=tiny_random",
                "device=cpu",
                "window.short_side=32",
                "text_cache_dir=null",
                f"image=[{','.join(str(p) for p in images)}]",
                'classes="cat,dog;puppy,sky"',
                f"out={tmp_path / 'out'}",
                f"paths.output_dir={tmp_path}",
                f"paths.root_dir={tmp_path}",
                *extra,
            ],
        )
    return segment(cfg)


@pytest.mark.parametrize(
    "names",
    [["a/x.png", "b/x.png", "c/x_1.png"], ["y.png", "y_overlay.png"], ["z.png", "z.jpg", "z.labels.png"]],
)
def test_segment_output_names_never_collide_and_json_maps_every_input(repo_root, tmp_path, names):
    inputs = [_png(tmp_path / "in" / n, i) for i, n in enumerate(names)]
    results = _segment(repo_root, tmp_path, inputs, "save_scores=true")
    written = [Path(p) for r in results for p in r["outputs"].values()]
    assert len(written) == 3 * len(inputs) == len(set(written))
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    summary = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert [r["image"] for r in summary["images"]] == [str(p) for p in inputs]
    for r, src in zip(summary["images"], inputs, strict=True):
        labels = np.asarray(Image.open(r["outputs"]["labels"]))
        assert labels.shape == (24, 32)  # each label map is its own input's, at its size
        assert Path(r["outputs"]["labels"]).name.endswith(".labels.png")
        assert src.stem in Path(r["outputs"]["labels"]).name
    assert summary["random_init"] == ["vm=tiny_random", "vlm=tiny_random"]


def test_unwritable_output_is_refused_before_any_model_is_built(repo_root, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"{blocker} is a file, not a folder"):
        check_output_dir(blocker / "sub")
    monkeypatch.setattr("lposs_lab.predictor.LPOSS.from_config", lambda *a, **k: pytest.fail("model built"))
    image = _png(tmp_path / "in.png", 0)
    from lposs_lab.lab.tasks.segment import segment

    with initialize_config_dir(version_base="1.3", config_dir=str(repo_root / "conf")):
        cfg = compose(
            "config",
            overrides=[
                f"image={image}",
                'classes="a,b"',
                f"out={blocker}/out",
                f"paths.output_dir={tmp_path}",
                f"paths.root_dir={tmp_path}",
            ],
        )
    with pytest.raises(OutputError):
        segment(cfg)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(OutputError, match="cannot write to"):
        check_output_dir(ro / "out")


@pytest.mark.slow  # a subprocess
def test_segment_cli_refusals_are_one_line(tmp_path):
    image = _png(tmp_path / "in.png", 0)
    (tmp_path / "file").write_text("x")
    cases = [
        ([f"image={image}", 'classes="cat,dog,cat"'], "class 'cat' is given twice"),
        ([f"image={image}", 'classes="cat"', f"out={tmp_path / 'file'}/o"], "is a file, not a folder"),
        ([f"image={image}", "dataset=voc"], "both dataset= and image= given"),
        ([], "nothing to do: pass dataset=NAME"),
        ([f"image=[{image},{image}]", 'classes="a,b"'], "is given twice"),
    ]
    for args, message in cases:
        out = run_py(*args, "vm=tiny_random", "vlm=tiny_random", cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr[-1500:])
        [line] = error_lines(out.stderr)
        assert message in line, (args, line)
        assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*.labels.png"))


# ---------------------------------------------------------------------------------------- data and cache
def test_out_of_range_label_is_an_error_record_naming_file_and_value(tmp_path, repo_root):
    root = make_dataset(tmp_path / "data", "voc", n_images=3)
    labels = sorted((root / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png"))
    bad = labels[1]
    arr = np.asarray(Image.open(bad)).copy()
    arr[2, 3] = 200  # VOC has 21 classes (0..20) and 255
    img = Image.fromarray(arr, mode="P")
    img.putpalette(Image.open(labels[0]).getpalette())
    img.save(bad)
    from lposs_lab.lab.tasks.evaluate import evaluate

    with initialize_config_dir(version_base="1.3", config_dir=str(repo_root / "conf")):
        cfg = compose(
            "config",
            overrides=[
                "dataset=voc",
                f"data_root={root}",
                "method=oracle_patch",
                "logger=none",
                "num_workers=0",
                "trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.root_dir={tmp_path}",
            ],
        )
    res = evaluate(cfg)
    assert res["num_images"] == 2
    [error] = res["errors"]
    assert (
        error["id"] == bad.stem and str(bad) in error["error"] and "value 200; valid: 0..20" in error["error"]
    )


def test_damaged_cache_shard_is_named_recomputed_and_replaced(tmp_path, capsys):
    import torch

    from lposs_lab import LPOSS, LPOSSConfig, WindowConfig
    from lposs_lab.lab.cache import FeatureCache, FeatureStore, feature_key
    from lposs_lab.models import create_vlm, create_vm

    model = LPOSS(
        create_vm("tiny_random", pretrained=False),
        create_vlm("tiny_random", pretrained=False),
        LPOSSConfig(window=WindowConfig(short_side=32)),
        device="cpu",
    )
    images = {
        f"im{i}": np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8) for i in range(2)
    }
    store = FeatureStore(tmp_path / "cache", "synthetic", shard_size=2)
    for key, image in images.items():
        store.fetch(model, image, model.config.window, key)
    store.close()
    folder = tmp_path / "cache" / FeatureCache(tmp_path / "cache", feature_key(model, "synthetic")).hash
    [shard] = list(folder.glob("shard-*"))
    [arrow] = list(shard.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # truncated by a crash
    stale = folder / ".tmp-shard-00000000000000000001-999999999-deadbeef"
    stale.mkdir()
    capsys.readouterr()
    again = FeatureStore(tmp_path / "cache", "synthetic", shard_size=2)
    feats = again.fetch(model, images["im0"], model.config.window, "im0")
    err = capsys.readouterr().err
    assert f"damaged feature-cache shard {shard}" in err and "recomputing its images" in err
    assert again.misses == 1 and again.hits == 0
    assert torch.equal(feats.vlm, model.extract(images["im0"]).vlm)
    again.fetch(model, images["im1"], model.config.window, "im1")
    again.close()
    assert not shard.exists() and not stale.exists()
    [new] = list(folder.glob("shard-*"))
    third = FeatureStore(tmp_path / "cache", "synthetic")
    third.fetch(model, images["im1"], model.config.window, "im1")
    assert third.hits == 1 and new.exists()


# ---------------------------------------------------------------------------------------- messages
@pytest.mark.slow  # a subprocess
def test_missing_weights_name_every_checkpoint_quickly_without_retry_noise(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}
    t0 = time.perf_counter()
    out = run_py(f"image={_png(tmp_path / 'a.png', 0)}", 'classes="a,b"', cwd=tmp_path, env=env)
    seconds = time.perf_counter() - t0
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = error_lines(out.stderr)
    assert "vlm 'maskclip_b16'" in line and "vm 'dino_b16'" in line and "the hub is unreachable" in line
    assert "vm.pretrained=PATH" in line and "vlm.pretrained=PATH" in line and len(line) < 450
    assert "Retry" not in out.stderr and "Traceback" not in out.stderr
    assert seconds < 60


@pytest.mark.slow  # a subprocess
def test_terminal_shows_our_lines_unless_verbose(tmp_path):
    image = _png(tmp_path / "a.png", 0)
    args = [
        f"image={image}",
        'classes="a,b"',
        "vm=tiny_random",
        "vlm=tiny_random",
        "device=cpu",
        "window.short_side=32",
    ]
    quiet = run_py(*args, f"out={tmp_path / 'q'}", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    text = quiet.stdout + quiet.stderr
    for noise in ("[INFO]", "INFO", "Tip", "Warning", "warn"):
        assert noise not in text, (noise, text)
    assert "a.labels.png" in quiet.stdout and "random-init weights" in quiet.stdout
    loud = run_py(*args, f"out={tmp_path / 'v'}", "verbose=true", cwd=tmp_path)
    assert loud.returncode == 0 and "INFO" in loud.stdout + loud.stderr


def test_palette_colours_are_all_visible_and_legends_stay_narrow():
    from lposs_lab.viz import LEGEND_MAX_CHARS, legend_name, overlay, palette

    colours = palette(256).astype(int)
    assert colours[:255].max(axis=1).min() >= 64  # no class is (near) black
    assert len({tuple(c) for c in colours[:150]}) == 150
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[:, 30:] = 1
    short = overlay(image, labels, ["a", "b"])
    long = overlay(image, labels, ["a", "b" * 10_000])
    assert long.width - short.width < 40 * LEGEND_MAX_CHARS
    assert legend_name("x" * 100) == "x" * (LEGEND_MAX_CHARS - 1) + "\u2026"
    noted = overlay(image, labels, ["a", "b"], note="random-init weights: meaningless")
    assert noted.height >= short.height and np.asarray(noted)[:, 60:].min() < 255
