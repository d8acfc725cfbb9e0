"""How this process was launched (torchrun, SLURM, Lightning's re-launch) and how a stopped run says so."""

from __future__ import annotations

import os
from pathlib import Path

from ..records import StateStore

__all__ = ["EvaluationStopped", "process_rank", "launched_world_size", "shared_dirs_are_explicit"]


class EvaluationStopped(Exception):
    """The run was stopped by SIGTERM (``kill``, SLURM preemption or time-out) before every image was done."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM

    def __init__(self, store: StateStore, total: int) -> None:
        super().__init__("stopped by SIGTERM")
        self.store = store
        self.total = total

    def message(self, run_dir: Path) -> str:
        done = len(self.store.done_ids())
        return (
            f"stopped by SIGTERM after {done} of {self.total} images (their states are kept in "
            f"{self.store.root}); continue with the same overrides plus: resume=true hydra.run.dir={run_dir}"
        )


def process_rank() -> int:
    """This process's global rank as launchers set it (0 when not launched as one of many)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def launched_world_size() -> int:
    """How many processes an external launcher (torchrun, SLURM, Lightning's ddp) started; 1 if none."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def shared_dirs_are_explicit() -> bool:
    """Whether the run folder (or the state folder) was given on the command line, so that every process
    of a multi-process launch writes its per-image states to the same place."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not a Hydra app: every path comes from the caller
        return True
    if str(hc.mode) == "RunMode.MULTIRUN":  # the sweep folder is fixed by the sweep's config
        return True
    given = [o.lstrip("+~").split("=")[0] for o in [*hc.overrides.hydra, *hc.overrides.task]]
    return "hydra.run.dir" in given or "state_dir" in given
