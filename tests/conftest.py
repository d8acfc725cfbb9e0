import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "support"))  # shared helpers: reference, models, data
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["prepare_fixtures"]  # the prepare tests' archives, server and network guard

from devices import cuda  # noqa: E402,F401 (the marker; test modules import it from tests/support/devices.py)


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_encoders():
    """``(vm, vlm)``: the tiny random-init encoders of ``vm=tiny_random vlm=tiny_random``, built once per run.

    Frozen and in eval mode; the tests that share them read them and never change their weights.
    """
    from lposs_lab.models import create_vlm, create_vm

    return create_vm("tiny_random", pretrained=False), create_vlm("tiny_random", pretrained=False)
