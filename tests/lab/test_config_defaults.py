"""The composed Hydra defaults (conf/config.yaml) equal the config dataclasses' defaults, field by field."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lposs_lab.config import LPConfig, LPOSSConfig, PixelConfig, WindowConfig
from lposs_lab.lab.callbacks import EvaluationReport
from lposs_lab.lab.metrics import DILATION_RATIO, BoundaryIoU, boundary_iterations
from lposs_lab.lab.module import EvalModule
from lposs_lab.lab.records import summarize
from lposs_lab.lab.tasks.config import lposs_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("defaults")
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("config", overrides=[f"paths.root_dir={out}", f"paths.output_dir={out}"])


GROUPS = [("lp", LPConfig), ("pixel", PixelConfig), ("window", WindowConfig)]


@pytest.mark.parametrize(("group", "cls"), GROUPS)
def test_each_group_states_every_field_with_the_dataclass_default(cfg, group, cls):
    node = OmegaConf.to_container(cfg[group], resolve=True)
    assert set(node) == {f.name for f in fields(cls)}, f"conf/{group} keys differ from {cls.__name__}"
    default = cls()
    for f in fields(cls):
        want = getattr(default, f.name)
        got = tuple(tuple(e) for e in node[f.name]) if f.name == "ensemble" else node[f.name]
        where = f"{group}.{f.name}: yaml {got!r}, {cls.__name__} {want!r}"
        assert got == want and type(got) is type(want), where


def test_composed_defaults_are_lposs_config_defaults(cfg):
    got, want = lposs_config(cfg), LPOSSConfig()
    for f in fields(LPOSSConfig):
        assert getattr(got, f.name) == getattr(want, f.name), f.name
    assert got == want
    assert cfg.vm.name == want.vm and cfg.vlm.name == want.vlm
    assert cfg.vm.pretrained is None and cfg.vlm.pretrained is None
    assert cfg.device == want.device and cfg.encoder_dtype == want.encoder_dtype


def test_metrics_defaults_are_stated_once(cfg):
    assert cfg.metrics.dilation_ratio == DILATION_RATIO and cfg.metrics.boundary is False
    users = (boundary_iterations, BoundaryIoU.__init__, summarize, EvalModule.__init__)
    for fn in (*users, EvaluationReport.__init__):
        default = inspect.signature(fn).parameters["dilation_ratio"].default
        assert default == DILATION_RATIO, fn.__qualname__


def test_no_unread_seed(cfg):
    # the method is deterministic (no sampling anywhere): a seed key would be read by nothing
    assert "seed" not in cfg
