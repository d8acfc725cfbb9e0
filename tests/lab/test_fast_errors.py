"""User mistakes on the command line: one ``error:`` line, exit status 2, found before torch is imported.

In-process: Hydra's composition errors through :func:`hydra_error_line`, the early checks of
:func:`precheck`, the config checks of the pixel backend and depth model. One cheap subprocess checks that
the early checks import no torch (what makes them fast); the ``run.py`` end-to-end cases are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException

import lposs_lab.config as config_module
from lposs_lab.config import DEPTH_MODEL_NAMES, LPOSSConfig, PixelConfig
from lposs_lab.errors import ConfigError, ImageError, OutputError, UserError
from lposs_lab.lab.data import DatasetError
from lposs_lab.lab.tasks import run_task
from lposs_lab.lab.tasks.hydra_errors import hydra_error_line
from lposs_lab.lab.tasks.precheck import precheck

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
IMAGE = REPO / "examples" / "astronaut.jpg"
VMS = "clip_b16, dino_b16, dino_b8, dinov2_b14, tiny_random"
LP_KEYS = "k, gamma, sigma, dist_pow, alpha, max_iter, tol, appearance, sigma_a, spatial, graph_features"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _hydra_line(*overrides: str) -> str:
    with pytest.raises((ConfigCompositionException, OverrideParseException)) as info:
        _compose(*overrides)
    return hydra_error_line(info.value)


# ------------------------------------------------------------------ Hydra's errors, in-process


def test_group_choice_typo_lists_the_choices():
    assert _hydra_line("vm=dino_b61") == f"vm=dino_b61 is not a choice; valid: {VMS}"
    assert _hydra_line("dataset=ade20") == (
        "dataset=ade20 is not a choice; valid: ade20k, cityscapes, coco_object, coco_stuff, context, "
        "context59, folder, voc, voc20"
    )


def test_unknown_key_names_the_group_keys_and_no_plus():
    line = _hydra_line("lp.kk=800")
    assert line == f"lp.kk is not a key of lp; valid: {LP_KEYS}"
    assert "+" not in line
    assert _hydra_line("vm.pretrainde=x") == "vm.pretrainde is not a key of vm; valid: name, pretrained"
    top = _hydra_line("lp_k=800")
    assert top.startswith("lp_k is not a config key; valid: paths, vm, vlm, lp, pixel,")
    assert "hydra" not in top.split("valid:")[1].split(", ")


def test_unquoted_list_says_how_to_quote():
    assert _hydra_line("image=x.jpg", "classes=cat,dog") == (
        "classes=cat,dog is ambiguous: a comma separates sweep values; quote the value: "
        "'classes=\"cat,dog\"' (or sweep over it with -m)"
    )


def test_other_override_errors_are_one_line():
    parse = _hydra_line("lp.k=[1")
    assert parse.startswith("cannot parse an override: no viable alternative at input '[1'; see https://")
    sweep = _hydra_line("lp.k=range(1,3)")
    assert sweep == "lp.k=range(1,3) is a sweep: add -m (--multirun) to run every value"
    for line in (parse, _hydra_line("+lp.k=4")):
        assert "\n" not in line and "Config search path" not in line


# ------------------------------------------------------------------ early checks, in-process


def _segment_cfg(tmp_path: Path, *overrides: str):
    return _compose(f"image={IMAGE}", "classes=cat", f"out={tmp_path / 'out'}", *overrides)


@pytest.mark.parametrize(
    ("overrides", "kind", "message"),
    [
        (("image=MISSING",), ImageError, "image not found: MISSING"),
        (("lp.k=-5",), ConfigError, "lp.k=-5 is out of range; valid: an integer >= 1"),
        (("classes=''",), ConfigError, "the class list is empty: pass classes="),
        (
            ("pixel.depth_model=depth_xl",),
            ConfigError,
            "pixel.depth_model='depth_xl' is out of range; valid: depth_anything_v2_small | tiny_random",
        ),
        (
            ("pixel.backend=triton", "device=cpu"),
            ConfigError,
            "pixel.backend='triton' cannot run here; valid here: auto | torch | numba; triton needs a CUDA "
            "device, and device=cpu",
        ),
    ],
)
def test_precheck_segment(tmp_path, monkeypatch, overrides, kind, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    missing = tmp_path / "nope.jpg"
    cfg = _segment_cfg(tmp_path, *[o.replace("MISSING", str(missing)) for o in overrides])
    with pytest.raises(kind) as info:
        precheck("segment", cfg)
    assert str(info.value).startswith(message.replace("MISSING", str(missing)))
    assert not (tmp_path / "out").exists() or kind is OutputError  # nothing created for a bad config


def test_precheck_output_below_a_file(tmp_path):
    with pytest.raises(OutputError, match=r"astronaut\.jpg is a file, not a folder; choose another location"):
        precheck("segment", _segment_cfg(tmp_path, f"out={IMAGE}/out"))


def test_precheck_benchmark_folder(tmp_path):
    cfg = _compose("dataset=voc", f"paths.data_dir={tmp_path / 'data'}")
    with pytest.raises(DatasetError, match=rf"^data root {tmp_path / 'data'} not found \(voc expected as "):
        precheck("evaluate", cfg)
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match=r"JPEGImages not found; expected the MMSegmentation layout"):
        precheck("refine", cfg)


def test_precheck_passes_a_good_run(tmp_path):
    precheck("segment", _segment_cfg(tmp_path))
    assert not (tmp_path / "out").exists()  # its nearest existing folder checked writable; nothing created
    assert not list(tmp_path.glob(".lposs-write-check-*"))  # the probe file is gone


def test_run_task_reports_a_precheck_error_in_one_line(tmp_path, capsys):
    cfg = _segment_cfg(tmp_path, "lp.k=-5")
    with pytest.raises(SystemExit) as info:
        run_task(cfg)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: lp.k=-5 is out of range; valid: an integer >= 1\n"


# ------------------------------------------------------------------ config checks


def test_depth_model_names_match_the_depth_registry():
    from lposs_lab.models.depth import DEPTH_MODELS

    assert tuple(DEPTH_MODELS) == DEPTH_MODEL_NAMES
    with pytest.raises(ConfigError, match="pixel.depth_model='big'"):
        PixelConfig(depth_model="big")


def test_triton_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(config_module, "_cuda_device_files", lambda: False)
    triton = PixelConfig(backend="triton")
    with pytest.raises(ConfigError) as info:
        LPOSSConfig(pixel=triton)
    assert str(info.value) == (
        "pixel.backend='triton' cannot run here; valid here: auto | torch | numba; triton needs a CUDA "
        "device, this machine has none (device=auto)"
    )
    assert isinstance(info.value, UserError)
    LPOSSConfig(pixel=PixelConfig(backend="triton", enabled=False))  # the stage does not run: no error
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter runs on CPU tensors
    assert LPOSSConfig(pixel=triton).pixel.backend == "triton"


# ------------------------------------------------------------------ what keeps it fast

_NO_TORCH = textwrap.dedent(
    """
    import sys
    from hydra import compose, initialize_config_dir
    from lposs_lab.errors import UserError
    from lposs_lab.lab.tasks import task_name
    from lposs_lab.lab.tasks.precheck import precheck
    import lposs_lab.lab.tasks.hydra_errors
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        for overrides in (["image=" + sys.argv[2], "classes=cat", "out=" + sys.argv[3]],
                          ["dataset=voc", "paths.data_dir=" + sys.argv[3]]):
            cfg = compose("config", overrides=overrides)
            try:
                precheck(task_name(cfg), cfg)
            except UserError:
                pass
    heavy = [m for m in ("torch", "lightning", "pytorch_lightning", "timm", "open_clip", "datasets")
             if m in sys.modules]
    print("HEAVY", heavy)
    """
)


def test_precheck_imports_no_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(CONF), str(IMAGE), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HEAVY []"


# ------------------------------------------------------------------ run.py end to end


def _run_py(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})})
    flags = [a for a in args if a.startswith("-")]
    cmd = [sys.executable, str(REPO / "run.py"), *flags, *[a for a in args if a not in flags]]
    cmd.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environ)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("dataset=voc", "vm=dino_b61"), f"error: vm=dino_b61 is not a choice; valid: {VMS}"),
        (("-m", "dataset=voc", "vm=dino_b61,dino_b16"), f"error: vm=dino_b61 is not a choice; valid: {VMS}"),
        (("dataset=voc", "lp.kk=800"), f"error: lp.kk is not a key of lp; valid: {LP_KEYS}"),
        (
            (f"image={IMAGE}", "classes=cat,dog"),
            "error: classes=cat,dog is ambiguous: a comma separates sweep values; quote the value: "
            "'classes=\"cat,dog\"' (or sweep over it with -m)",
        ),
        (
            (f"image={IMAGE}", "classes=cat", "lp.k=-5"),
            "error: lp.k=-5 is out of range; valid: an integer >= 1",
        ),
    ],
)
def test_run_py_one_line_exit_2(tmp_path, args, line):
    res = _run_py(tmp_path, *args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr == line + "\n"


@pytest.mark.slow
def test_run_py_full_hydra_error_and_cfg(tmp_path):
    full = _run_py(tmp_path, "vm=dino_b61", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1
    assert "MissingConfigException" in full.stderr and "Available options in 'vm'" in full.stderr
    shown = _run_py(tmp_path, "--cfg", "job", "vm=tiny_random")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "name: tiny_random" in shown.stdout


def test_package_exports_resolve_lazily():
    import importlib

    import lposs_lab

    for name in lposs_lab.__all__:
        assert getattr(lposs_lab, name) is not None, name
    importlib.import_module("lposs_lab.refine")  # the submodule must not replace the function it exports
    assert callable(lposs_lab.refine) and lposs_lab.refine.__name__ == "refine"
    assert lposs_lab.LPOSSConfig is LPOSSConfig and lposs_lab.ImageError is ImageError
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lposs_lab.nope  # noqa: B018
