"""Tasks behind ``run.py``: each takes the resolved Hydra config (the only code that reads one).

Problems with what the user asked for (:class:`lposs_lab.errors.UserError` and its subclasses) print
``error: <one line>`` and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

from lposs_lab.errors import UserError

__all__ = ["TASKS", "run_task", "UserError", "quiet_third_party"]

#: packages whose INFO lines, tips and warnings are hidden unless ``verbose=true``
_THIRD_PARTY = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "torchmetrics",
    "open_clip",
    "timm",
    "torch",
    "huggingface_hub",
    "transformers",
    "datasets",
    "wandb",
    "numba",
)

# task name -> "module:function" (imported when used, so a task's heavy dependencies load only then)
TASKS = {
    "segment": "lposs_lab.lab.tasks.segment:segment",
    "evaluate": "lposs_lab.lab.tasks.evaluate:evaluate",
}


def run_task(cfg: Any) -> Any:
    """Dispatch ``cfg.task``; a :class:`UserError` prints ``error: <one line>`` and exits with 2.

    Set ``LPOSS_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) to get the traceback of user errors too.
    """
    debug = os.environ.get("LPOSS_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"
    quiet_third_party(verbose=bool(cfg.get("verbose", False)))
    try:
        from .config import task_name

        module, func = TASKS[task_name(cfg)].split(":")
        return getattr(importlib.import_module(module), func)(cfg)
    except UserError as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def quiet_third_party(verbose: bool = False) -> None:
    """Keep the terminal to our own lines and the progress bar: other packages' INFO logging, tips and
    warnings are hidden from the console (Hydra's run log file still gets the log records)."""
    level = logging.INFO if verbose else logging.WARNING
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)
    if not verbose:
        for name in _THIRD_PARTY:
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # DataLoader workers and spawned processes too
        for package in _THIRD_PARTY:
            warnings.filterwarnings("ignore", module=rf"{package}(\..*)?$")
