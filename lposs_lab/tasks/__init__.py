"""Tasks behind ``run.py``: each takes the resolved Hydra config; user errors become one line and exit 2."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__all__ = ["TASKS", "run_task", "UserError"]

# task name -> "module:function" (imported lazily so a task's heavy dependencies load only when used)
TASKS = {
    "segment": "lposs_lab.tasks.segment:segment",
    "evaluate": "lposs_lab.tasks.evaluate:evaluate",
}


class UserError(Exception):
    """A problem with what the user asked for; reported as one line, exit status 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ..image_io import ImageError

    types: list[type[BaseException]] = [UserError, ImageError, ValueError, FileNotFoundError]
    try:
        from ..models import WeightsUnavailableError

        types.append(WeightsUnavailableError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def run_task(cfg: Any) -> Any:
    """Dispatch ``cfg.task``; errors in the user's input print ``error: <one line>`` and exit with 2.

    Set ``LPOSS_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) to get the traceback instead.
    """
    task = cfg.get("task")
    if task not in TASKS:
        print(f"error: unknown task {task!r}; valid tasks: {', '.join(sorted(TASKS))}", file=sys.stderr)
        sys.exit(2)
    module, func = TASKS[task].split(":")
    debug = os.environ.get("LPOSS_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        return getattr(importlib.import_module(module), func)(cfg)
    except _user_error_types() as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
