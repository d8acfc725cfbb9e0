"""A Hydra callback that reports which points of a multirun failed (the others still run)."""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback

__all__ = ["SweepReport"]


class SweepReport(Callback):
    """Prints one line per failed sweep point as it fails, and a summary when the sweep ends."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.done = 0

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        self.done += 1
        if job_return.status != JobStatus.FAILED:
            return
        overrides = " ".join(job_return.overrides or []) or "(no overrides)"
        error = job_return._return_value  # the exception; reading .return_value would raise it
        reason = " ".join(str(error).split()) or type(error).__name__
        self.failed.append(overrides)
        print(f"sweep point failed: {overrides}: {reason}", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if self.failed:  # only reached when the sweeper did not raise (e.g. Optuna records failed trials)
            print(
                f"{len(self.failed)} of {self.done} sweep point(s) failed: {'; '.join(self.failed)}",
                file=sys.stderr,
            )
