"""Loggers, callbacks and the Lightning Trainer of ``task=evaluate``, built with ``hydra.utils.instantiate``.

``logger``, ``callbacks`` and ``trainer`` are ``_target_`` configs (``conf/logger``, ``conf/callbacks``,
``conf/trainer``), as in the Lightning + Hydra template; this module only fills in what depends on the run:
the accelerator that follows ``device``, ``ddp_spawn`` for several local processes, and W&B's offline mode.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lposs_lab.errors import ConfigError

from .config import ci_config, plain

__all__ = [
    "LoggerOptions",
    "build_loggers",
    "build_callbacks",
    "check_trainer",
    "build_trainer",
    "finish_loggers",
]

#: keys of a logger config that are ours, not the logger class's
_OWN_KEYS = ("log_images",)


class LoggerOptions(dict):
    """Our options read off the logger configs (e.g. ``log_images``), by logger name."""


def wandb_has_credentials() -> bool:
    """``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc`` for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig) -> tuple[list[Any], LoggerOptions]:
    """The Lightning loggers of ``cfg.logger`` (``logger=none``: none; ``logger=[csv,wandb]``: both)."""
    section = cfg.get("logger")
    loggers: list[Any] = []
    options = LoggerOptions()
    if not section:
        return loggers, options
    for name, node in section.items():
        if node is None:
            continue
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            raise ConfigError(
                f"logger.{name} is not a logger config (no _target_); choose loggers with logger=csv, "
                "logger=[csv,wandb], logger=tensorboard or logger=none"
            )
        kwargs = plain(node)
        options[name] = {k: kwargs.pop(k) for k in _OWN_KEYS if k in kwargs}
        if kwargs["_target_"].endswith("WandbLogger"):
            _wandb_mode(kwargs)
        if "save_dir" in kwargs and kwargs["save_dir"]:
            Path(str(kwargs["save_dir"])).mkdir(parents=True, exist_ok=True)
        logger = instantiate(kwargs)
        if kwargs["_target_"].endswith("WandbLogger"):
            # Lightning always hands wandb.init an `anonymous` value; current wandb warns about the setting
            # on every run even when it is None. Leave it out (it has no effect there).
            init = getattr(logger, "_wandb_init", None)
            if isinstance(init, dict) and init.get("anonymous") is None:
                init.pop("anonymous", None)
        loggers.append(logger)
    return loggers, options


#: WANDB_MODE values left in the environment by an earlier run of this process (ours, or Lightning's "dryrun"
#: for an offline WandbLogger): the next job of a multirun decides, and says, afresh
_LEFT_BY_US: set[str] = {"dryrun"}


def _wandb_mode(kwargs: dict[str, Any]) -> None:
    """W&B never prompts: offline (and said so, for every run) when there are no credentials."""
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE", "")
    if mode in _LEFT_BY_US:
        mode = ""
    if kwargs.get("offline") or mode == "offline":
        kwargs["offline"] = True
    elif mode != "disabled" and not wandb_has_credentials():
        save_dir = kwargs.get("save_dir")
        where = f" under {Path(str(save_dir)).expanduser().resolve() / 'wandb'}" if save_dir else ""
        print(
            f"note: no W&B credentials (wandb login / WANDB_API_KEY): logging offline{where}; "
            "upload later with `wandb sync`"
        )
        kwargs["offline"] = True
        os.environ["WANDB_MODE"] = "offline"
        _LEFT_BY_US.add("offline")


def build_callbacks(
    cfg: DictConfig, options: LoggerOptions | None = None, *, report: Mapping[str, Any] | None = None
) -> list[Any]:
    """The callbacks of ``cfg.callbacks`` (a ``null`` entry is left out) plus the cache tally and the report.

    Our progress bar is named after the task and dataset (``evaluate voc20``) unless its config names it.
    ``report``: the keyword arguments of :class:`lposs_lab.lab.callbacks.EvaluationReport` (the run's
    record store, ids, classes, dataset name, Boundary IoU settings); without it the report writes nothing.
    """
    from ..callbacks import EvaluationReport, FeatureCacheTally, ImageProgressBar

    out: list[Any] = []
    section = cfg.get("callbacks") or {}
    tr = cfg.get("trainer") or {}
    dataset = (cfg.get("dataset") or {}).get("name")
    description = " ".join(str(v) for v in (cfg.get("task") or "evaluate", dataset) if v)
    for name, node in section.items():
        if node is None:
            continue
        if name == "progress_bar" and not tr.get("enable_progress_bar", True):
            continue
        named = isinstance(node, DictConfig) and "description" in node
        callback = instantiate(node)
        if isinstance(callback, ImageProgressBar) and not named:
            callback.description = description
        out.append(callback)
    log_images = max([int(o.get("log_images", 0)) for o in (options or {}).values()] or [0])
    report = {**dict(report or {}), "ci": ci_config(cfg)}
    out += [FeatureCacheTally(), EvaluationReport(**report, log_images=log_images)]
    return out


def _accelerator(cfg: DictConfig) -> tuple[str, Any]:
    tr = cfg.get("trainer") or {}
    acc = str(tr.get("accelerator", "auto"))
    devices = plain(tr.get("devices", 1))
    dev = str(cfg.get("device", "auto"))
    if acc == "auto":
        if dev == "cpu":
            acc = "cpu"
        elif dev.startswith("cuda"):
            acc = "gpu"
            if ":" in dev and devices in (1, "1"):
                devices = [int(dev.split(":", 1)[1])]
    return acc, devices


def check_trainer(cfg: DictConfig) -> None:
    """The trainer settings a run can use (checked while planning, before anything is built or written)."""
    tr = cfg.get("trainer")
    if tr is None or "_target_" not in tr:
        raise ConfigError("trainer config has no _target_; use trainer=default (conf/trainer/default.yaml)")
    strategy = str(tr.get("strategy", "auto"))
    if strategy not in ("auto", "ddp_spawn", "ddp"):
        raise ConfigError(
            f"trainer.strategy={strategy} is not supported by task=evaluate; valid choices: auto, "
            "ddp_spawn (one node, workers started from this run), ddp (torchrun, SLURM, or Lightning "
            "re-launching run.py)"
        )


def build_trainer(cfg: DictConfig, *, loggers: list[Any], callbacks: list[Any], todo: int) -> Any:
    """The test-only Trainer of ``cfg.trainer``.

    ``strategy=auto`` with more than one device becomes ``ddp_spawn``: it starts the workers from inside the
    running Hydra app (Lightning's ``ddp`` re-launches the script, which breaks Hydra multirun); on CPU the
    processes talk over gloo. With fewer images left than devices, one process per image.
    """
    check_trainer(cfg)
    tr = cfg.trainer
    accelerator, devices = _accelerator(cfg)
    strategy = str(tr.get("strategy", "auto"))
    if isinstance(devices, int) and 0 < todo < devices:
        print(f"note: {todo} image(s) left, using {todo} process(es) instead of {devices}")
        devices = todo
    num_nodes = int(tr.get("num_nodes", 1))
    single = devices in (1, "1") or (isinstance(devices, list | tuple) and len(devices) == 1)
    if strategy == "auto" and not (single and num_nodes == 1):
        strategy = "ddp_spawn"
    return instantiate(
        tr,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        logger=loggers or False,
        callbacks=callbacks,
        _convert_="all",
    )


def finish_loggers(loggers: list[Any]) -> None:
    """Close this run's W&B run, so that the next job of a multirun starts its own, and say which folder an
    offline run went to (with several processes the run lived in rank 0's worker: its newest folder)."""
    wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    if not wandb_loggers:
        return
    import wandb

    folders: list[Path] = []
    run = wandb.run
    if run is not None:
        if bool(getattr(run, "offline", False)) or run.settings.mode in ("offline", "dryrun"):
            folders.append(Path(str(getattr(run.settings, "sync_dir", "") or Path(run.dir).parent)))
        wandb.finish()
    else:
        for lg in wandb_loggers:
            if not (getattr(lg, "_offline", False) and lg.save_dir):
                continue
            runs = sorted(Path(str(lg.save_dir)).expanduser().glob("wandb/offline-run-*"))
            folders += [runs[-1].resolve()] if runs else []
    for folder in folders:
        print(f"note: W&B run written offline to {folder}; upload it with `wandb sync {folder}`")
