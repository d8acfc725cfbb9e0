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

from lposs_lab.errors import ConfigError, UserError

__all__ = [
    "TASKS",
    "task_name",
    "run_task",
    "objective",
    "UserError",
    "SweepPointFailed",
    "quiet_third_party",
]

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
    "refine": "lposs_lab.lab.tasks.refine:refine_task",
}


def task_name(cfg: Any) -> str:
    """``task`` when given; else ``evaluate`` for a run naming a dataset (``refine`` with ``scores=``),
    ``segment`` for one naming images."""
    task = cfg.get("task")
    if task is not None:
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(sorted(TASKS))}")
        return str(task)
    dataset = cfg.get("dataset")
    has_dataset = bool(dataset) and bool(dataset.get("name") if hasattr(dataset, "get") else dataset)
    has_image = cfg.get("image") is not None
    if has_dataset and has_image:
        raise ConfigError(
            "both dataset= and image= given: pass dataset=NAME to evaluate a benchmark, or image=PATH "
            "'classes=\"a,b\"' to segment images (or say which with task=evaluate|segment)"
        )
    if has_dataset:
        return "refine" if cfg.get("scores") else "evaluate"
    if has_image:
        return "segment"
    raise ConfigError(
        "nothing to do: pass dataset=NAME to evaluate a benchmark (e.g. dataset=ade20k), or "
        "image=PATH 'classes=\"cat,dog\"' to segment your own images"
    )


class SweepPointFailed(UserError):
    """One point of a multirun failed with a user error; the sweep goes on and exits non-zero at the end."""


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
    except ValueError:  # not inside a Hydra app
        return False


def run_task(cfg: Any) -> Any:
    """Dispatch ``cfg.task``; a :class:`UserError` prints ``error: <one line>`` and exits with 2.

    In a multirun the failing point is reported the same way and raised as :class:`SweepPointFailed`, so
    Hydra runs the other points and the sweep exits non-zero at the end. Set ``LPOSS_DEBUG=1`` (or Hydra's
    ``HYDRA_FULL_ERROR=1``) to get the traceback of user errors too.
    """
    debug = os.environ.get("LPOSS_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"
    quiet_third_party(verbose=bool(cfg.get("verbose", False)))
    try:
        name = task_name(cfg)
        if name in ("segment", "evaluate", "refine"):
            from .precheck import precheck

            precheck(name, cfg)  # the common mistakes, before torch and the task's modules are imported
        module, func = TASKS[name].split(":")
        return getattr(importlib.import_module(module), func)(cfg)
    except UserError as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if _in_multirun():
            raise SweepPointFailed(msg) from None
        sys.exit(2)


def objective(result: Any, metric: str | None) -> Any:
    """What ``run.py`` returns to Hydra: ``result[metric]`` for an optimising sweeper, else ``result``."""
    if not metric or not isinstance(result, dict):
        return result
    if metric not in result:
        raise ConfigError(
            f"optimized_metric={metric!r} is not in the task's results; valid: {', '.join(result)}"
        )
    value = result[metric]
    if value is None:
        raise UserError(f"the run gave no {metric} (no image scored); this sweep point cannot be ranked")
    return float(value)


def quiet_third_party(verbose: bool = False) -> None:
    """Keep the terminal to our own lines and the progress bar: other packages' INFO logging, tips and
    warnings are hidden from the console (Hydra's run log file still gets the log records)."""
    level = logging.INFO if verbose else logging.WARNING
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)
    if not verbose:
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # hub retries / warnings
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in _THIRD_PARTY:
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # DataLoader workers and spawned processes too
        for package in _THIRD_PARTY:
            warnings.filterwarnings("ignore", module=rf"{package}(\..*)?$")
