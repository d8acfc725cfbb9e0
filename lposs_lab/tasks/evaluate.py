"""``task=evaluate``: score a benchmark split with LPOSS/LPOSS+, saved predictions or the patch oracle.

    python run.py task=evaluate dataset=voc data_root=/data        # LPOSS+ on VOC; results.json in run dir
    python run.py task=evaluate dataset=voc data_root=/data predictions=preds/ metrics.boundary=true
    python run.py task=evaluate dataset=voc data_root=/data method=oracle_patch
    python run.py task=evaluate ... trainer.devices=4                   # 4 processes (DDP), same numbers
    python run.py task=evaluate ... hydra.run.dir=RUN resume=true       # continue a killed run in RUN

See docs/reproduce.md for the data layouts and the paper's tables.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["evaluate", "make_logger", "run_dir_of"]

# top-level keys of task overrides that describe an ablation (shown in the table's row label)
_ABLATION_KEYS = ("vm", "vlm", "lp", "pixel", "window", "encoder_dtype")


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output folder of this run (the current folder outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # HydraConfig not set
        return Path.cwd()


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _env_rank() -> int:
    """This process's global rank as launchers set it (0 when not launched as one of many)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _launched_world_size() -> int:
    """How many processes an external launcher (torchrun, SLURM, Lightning's ddp) started; 1 if none."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def _shared_dirs_are_explicit() -> bool:
    """Whether the run folder (or the state folder) was given on the command line, so that every
    process of a multi-process launch writes its per-image states to the same place."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not a Hydra app: every path comes from the caller
        return True
    given = [o.lstrip("+~").split("=")[0] for o in [*hc.overrides.hydra, *hc.overrides.task]]
    return "hydra.run.dir" in given or "state_dir" in given


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_logger(lcfg: Any, run_dir: Path) -> Any:
    """The Lightning logger a ``logger`` config group describes (``False`` for ``logger=none``).

    ``wandb`` never prompts: ``logger.offline=true`` sets ``WANDB_MODE=offline``; online without credentials
    (``WANDB_API_KEY`` or ``wandb login``) is a one-line error.
    """
    from . import UserError

    lcfg = lcfg or {}
    name = str(lcfg.get("name", "none"))
    save_dir = str(lcfg.get("save_dir") or run_dir)
    if name in ("none", "null", "false", "False"):
        return False
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name=str(lcfg.get("subdir", "csv")))
    if name == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        offline = bool(lcfg.get("offline", False))
        if offline:
            os.environ["WANDB_MODE"] = "offline"
        elif (
            os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun")
            and not _wandb_has_credentials()
        ):
            raise UserError(
                "logger=wandb needs W&B credentials (run `wandb login` or set WANDB_API_KEY), "
                "or pass logger.offline=true"
            )
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tags = [str(t) for t in (lcfg.get("tags") or [])]
        return WandbLogger(
            project=str(lcfg.get("project") or "lposs_lab"),
            entity=lcfg.get("entity"),
            group=lcfg.get("group"),
            name=lcfg.get("run_name"),
            tags=tags,
            save_dir=save_dir,
            offline=offline,
            anonymous=False,
            job_type="evaluate",
        )
    raise UserError(f"unknown logger {name!r}; valid: csv, wandb, none (e.g. logger=csv)")


def _finish_logger(logger: Any) -> None:
    """Close this run's W&B run, so that the next job of a multirun starts its own."""
    if type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _accelerator(cfg: DictConfig) -> tuple[str, Any]:
    tr = cfg.get("trainer") or {}
    acc = str(tr.get("accelerator", "auto"))
    devices = tr.get("devices", 1)
    devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    dev = str(cfg.get("device", "auto"))
    if acc == "auto":
        if dev == "cpu":
            acc = "cpu"
        elif dev.startswith("cuda"):
            acc = "gpu"
            if ":" in dev and devices in (1, "1"):
                devices = [int(dev.split(":", 1)[1])]
    return acc, devices


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Run ``task=evaluate``; returns the results dict (on rank 0) and writes ``results_json``."""
    from .. import __version__
    from ..data.benchmarks import BENCHMARKS, SegmentationDataset, get_benchmark
    from ..image_io import atomic_write
    from ..results import StateStore, format_table, method_label, summarize
    from . import UserError
    from .common import lposs_config, method_name

    ds_cfg = cfg.get("dataset")
    if not ds_cfg or not ds_cfg.get("name"):
        raise UserError(f"no dataset given: pass dataset=NAME, one of: {', '.join(BENCHMARKS)}")
    info = get_benchmark(str(ds_cfg.name))
    if not cfg.get("data_root"):
        raise UserError(
            f"no data_root given: pass data_root=DIR, the folder holding {info.root}/ (docs/reproduce.md)"
        )
    data_root = Path(str(cfg.data_root)).expanduser()
    limit = cfg.get("limit")
    dataset = SegmentationDataset(
        info,
        data_root,
        limit=None if limit is None else int(limit),
        index_cache_dir=cfg.get("index_cache_dir"),
    )
    if len(dataset) == 0:
        raise UserError(f"nothing to evaluate: limit={limit} selects no image of {info.name}")
    mcfg = cfg.get("metrics") or {}
    boundary = bool(mcfg.get("boundary", False))
    dilation = float(mcfg.get("dilation_ratio", 0.02))
    config = lposs_config(cfg)
    method = method_name(cfg, config)
    meth_cfg = cfg.get("method") or {}
    predictions = cfg.get("predictions")
    mode = "predictions" if predictions else ("oracle_patch" if method == "oracle_patch" else "model")
    meta: dict[str, Any] = {
        "dataset": info.name,
        "mode": mode,
        "metrics": {"boundary": boundary, "dilation_ratio": dilation},
        "version": __version__,
    }
    if mode == "predictions":
        method = "predictions"
        pred_dir = Path(str(predictions)).expanduser()
        if not pred_dir.is_dir():
            raise UserError(
                f"predictions folder {pred_dir} not found; pass predictions=DIR holding <id>.png files"
            )
        missing = [k for k in dataset.ids if not (pred_dir / f"{k}.png").is_file()]
        if missing:
            raise UserError(
                f"prediction {pred_dir / (missing[0] + '.png')} not found ({len(missing)} of {len(dataset)} "
                f"images lack one); predictions=DIR must hold <id>.png for every image"
            )
        meta["predictions"] = str(pred_dir.resolve())
    elif mode == "oracle_patch":
        meta["oracle"] = {
            "patch": int(meth_cfg.get("patch", 16)),
            "mode": str(meth_cfg.get("mode", "nearest-exact")),
        }
    else:
        meta.update(
            method=method,
            vm=config.vm,
            vlm=config.vlm,
            encoder_dtype=config.encoder_dtype,
            **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("lp", "pixel", "window")},
        )

    run_dir = run_dir_of(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    store = StateStore(Path(str(cfg.get("state_dir") or run_dir / "states")).expanduser())
    resume = bool(cfg.get("resume", False))
    launched = _launched_world_size()
    if launched > 1 and not _shared_dirs_are_explicit():
        raise UserError(
            f"this is one of {launched} launched processes (WORLD_SIZE/SLURM_NTASKS): pass "
            "hydra.run.dir=DIR (or state_dir=DIR) on a filesystem all of them share, so they agree on "
            "where per-image results go"
        )
    if _env_rank() == 0:  # external launchers (torchrun, SLURM) start every rank in this function
        store.prepare(meta, resume)
    done = store.done_ids() & set(dataset.ids) if resume else set()
    todo = len(dataset) - len(done)

    accelerator, devices = _accelerator(cfg)
    tr = cfg.get("trainer") or {}
    strategy = str(tr.get("strategy", "auto"))
    if strategy not in ("auto", "ddp_spawn", "ddp"):
        raise UserError(
            f"trainer.strategy={strategy} is not supported by task=evaluate; valid choices: auto, "
            "ddp_spawn (one node, workers started from this run), ddp (torchrun, SLURM, or Lightning "
            "re-launching run.py)"
        )
    if isinstance(devices, int) and 0 < todo < devices:
        print(f"note: {todo} image(s) left, using {todo} process(es) instead of {devices}")
        devices = todo
    from ..lightning import EvalDataModule, EvalModule, make_trainer  # Lightning imports slowly: after checks

    overrides = _overrides()
    ablation = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in _ABLATION_KEYS]
    label = method_label(method) + (f" [{', '.join(ablation)}]" if ablation else "")
    module = EvalModule(
        info.classes,
        mode=mode,
        store=store,
        lposs=config,
        method=method,
        predictions_dir=str(predictions) if predictions else None,
        oracle_patch=int(meth_cfg.get("patch", 16)),
        oracle_mode=str(meth_cfg.get("mode", "nearest-exact")),
        boundary=boundary,
        dilation_ratio=dilation,
        save_predictions=str(cfg.save_predictions) if cfg.get("save_predictions") else None,
        hparams={"config": resolved, "lposs_lab_version": __version__, "label": label},
        stop_after=cfg.get("debug_stop_after"),
    )
    datamodule = EvalDataModule(
        dataset, store=store, resume=resume, num_workers=int(cfg.get("num_workers", 0))
    )
    t0 = time.perf_counter()
    world = 1
    if todo > 0:
        logger = make_logger(cfg.get("logger"), run_dir)
        trainer = make_trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=int(tr.get("num_nodes", 1)),
            logger=logger,
            progress_bar=bool(tr.get("enable_progress_bar", True)),
            default_root_dir=str(run_dir),
        )
        try:
            trainer.test(module, datamodule=datamodule, verbose=False)
        finally:
            _finish_logger(logger)
        if not trainer.is_global_zero:
            return None
        world = trainer.world_size
    else:
        print(f"all {len(dataset)} images already evaluated in {store.root}; summing their states")
    wall = time.perf_counter() - t0

    records = store.load(dataset.ids)
    summary = summarize(records, info.classes, boundary=boundary, dilation_ratio=dilation)
    results: dict[str, Any] = {
        "dataset": info.name,
        "method": method,
        "label": label,
        "mIoU": summary["mIoU"],
    }
    if boundary:
        results["boundary_iou"] = summary["boundary_iou"]
    results.update(
        pixel_accuracy=summary["pixel_accuracy"],
        num_images=summary["num_images"],
        errors=summary["errors"],
        resumed=len(done),
        per_class_iou=summary["per_class_iou"],
    )
    if boundary:
        results["per_class_boundary_iou"] = summary["per_class_boundary_iou"]
    results.update(
        seconds_per_image=summary["seconds_per_image"],
        wall_seconds=round(wall, 3),
        processes=world,
        state_dir=str(store.root),
        predictions=meta.get("predictions"),
        version=__version__,
        overrides=overrides,
        config=resolved,
        per_image=summary["per_image"],
    )
    out = Path(str(cfg.get("results_json") or run_dir / "results.json")).expanduser()
    with atomic_write(out, "w") as fh:
        json.dump(results, fh, indent=1)
    print()
    print(format_table([results]))
    n = summary["num_images"]
    print(f"\n{info.name}: {n} image(s) scored in {wall:.1f}s ({world} process(es)); results: {out}")
    if summary["errors"]:
        print(f"{len(summary['errors'])} image(s) could not be evaluated (results.json 'errors'):")
        for e in summary["errors"]:
            print(f"  {e['id']}: {e['error']}")
    return results
