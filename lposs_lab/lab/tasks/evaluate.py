"""``task=evaluate``: score a benchmark split with LPOSS/LPOSS+, saved predictions or the patch oracle.

    python run.py dataset=ade20k vm=dino_b8 lp.k=800                # LPOSS+ on ADE20k, paths.data_dir
    python run.py dataset=voc predictions=preds/ metrics.boundary=true
    python run.py dataset=voc method=oracle_patch
    python run.py dataset=voc trainer.devices=4                     # 4 processes (DDP), same numbers
    python run.py dataset=voc hydra.run.dir=RUN resume=true         # continue a stopped run in RUN
    python run.py dataset=voc20 dataset.download=true               # fetch and convert VOC first if needed

Three steps: :func:`plan_evaluation` checks everything the run needs and builds nothing,
:func:`run_evaluation` builds the loggers, trainer and Lightning module and runs the test loop,
:func:`write_results` sums the per-image records into ``results.json`` and the printed table.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lposs_lab import __version__
from lposs_lab.errors import ConfigError, UserError
from lposs_lab.files import atomic_write

from ..data.benchmarks import BenchmarkInfo
from ..data.dataset import SegmentationDataset
from ..data.folder import unpaired_files
from ..metrics import DILATION_RATIO
from ..records import StateStore, summarize
from ..stats import CIConfig, results_intervals
from ..tables import method_label, results_table
from .benchmark import benchmark_of
from .config import (
    abstain_rule,
    cache_spec,
    check_output_dir,
    ci_config,
    hydra_overrides,
    lposs_config,
    method_name,
    plain,
    postprocess_step,
    random_init_encoders,
    run_dir_of,
    text_cache_dir,
)
from .launch import EvaluationStopped, launched_world_size, process_rank, shared_dirs_are_explicit

__all__ = [
    "EvalPlan",
    "data_preparer",
    "dataset_of",
    "plan_evaluation",
    "run_evaluation",
    "write_results",
    "evaluate",
]

# top-level keys of task overrides that describe an ablation (shown in the table's row label)
_ABLATION_KEYS = ("vm", "vlm", "lp", "pixel", "window", "encoder_dtype")


@dataclass
class EvalPlan:
    """Everything one evaluation needs, checked, before anything is built or written."""

    info: BenchmarkInfo
    dataset: SegmentationDataset
    method: str
    label: str
    meta: dict[str, Any]
    source: Any
    store: StateStore
    resume: bool
    done: list[str]
    boundary: bool
    dilation_ratio: float
    run_dir: Path
    results_path: Path
    overrides: list[str]
    resolved: dict[str, Any]
    save_predictions: str | None = None
    num_workers: int = 0
    ci: CIConfig = field(default_factory=CIConfig)
    prepare: Callable[[], Any] | None = None  # dataset.download=true: the data module's prepare_data()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def todo(self) -> int:
        return len(self.dataset) - len(self.done)


def dataset_of(cfg: DictConfig) -> tuple[BenchmarkInfo, SegmentationDataset]:
    """The benchmark and its dataset a run names (``dataset``, ``data_root``, ``limit``), checked.

    ``dataset=folder`` lists its images without a label and labels without an image in one warning line.
    """
    info, root = benchmark_of(cfg)
    limit = cfg.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit={limit!r} is out of range; valid: an integer >= 0 (or null for all images)")
    dataset = SegmentationDataset(info, root, limit=limit, index_cache_dir=cfg.get("index_cache_dir"))
    if not info.strict and process_rank() == 0:
        unpaired = unpaired_files(info)
        if unpaired:
            print(f"warning: dataset={info.name}: {unpaired.message()}", file=sys.stderr, flush=True)
    if len(dataset) == 0:
        raise UserError(f"nothing to evaluate: limit={limit} selects no image of {info.name}")
    return info, dataset


def data_preparer(cfg: DictConfig) -> Callable[[], Any] | None:
    """``dataset.download=true``: the ``prepare`` call making this run's benchmark under ``data_root``.

    ``+dataset.manifest=FILE`` replaces the packaged manifest (mirrors), ``+dataset.archives=DIR`` uses
    archives already there and fetches nothing. None when ``dataset.download`` is false.
    """
    ds_cfg = cfg.get("dataset") or {}
    if not ds_cfg.get("download", False):
        return None
    from ..data.prepare import load_manifest, prepare_datasets, resolve_names

    name = str(ds_cfg.get("name"))
    resolve_names([name])  # a dataset prepare cannot make: one line naming the valid ones
    root = cfg.get("data_root")
    if not root:
        raise UserError("dataset.download=true needs a data folder: set paths.data_dir=DIR or LPOSS_DATA_DIR")
    manifest = ds_cfg.get("manifest")
    return functools.partial(
        prepare_datasets,
        [name],
        Path(str(root)).expanduser(),
        manifest=load_manifest(str(manifest)) if manifest else None,
        archives=str(ds_cfg.archives) if ds_cfg.get("archives") else None,
    )


def _source(cfg: DictConfig, info: BenchmarkInfo, dataset: SegmentationDataset) -> tuple[str, Any, dict]:
    """``(method, label source, meta)`` of the run: the predictor, saved predictions or the oracle."""
    from ..sources import PatchOracle, PredictorSource, SavedPredictions

    config = lposs_config(cfg)  # validates every hyperparameter before anything is built
    method = method_name(cfg, config)
    meth_cfg = cfg.get("method") or {}
    predictions = cfg.get("predictions")
    if predictions:
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
        source = SavedPredictions(str(pred_dir), info.num_classes)
        return "predictions", source, {"mode": "predictions", "predictions": str(pred_dir.resolve())}
    if method == "oracle_patch":
        oracle = PatchOracle(int(meth_cfg.get("patch", 16)), str(meth_cfg.get("mode", "nearest-exact")))
        return (
            method,
            oracle,
            {"mode": "oracle_patch", "oracle": {"patch": oracle.patch, "mode": oracle.mode}},
        )
    cache = cache_spec(cfg, f"{info.name}@{dataset.data_root.expanduser().resolve()}")
    save = cfg.get("save_scores")
    scores_dir = None if save in (None, False) else str(run_dir_of(cfg) / "scores" if save is True else save)
    if scores_dir is not None:
        check_output_dir(scores_dir)
    source = PredictorSource(
        config,
        method,
        list(info.classes),
        text_cache_dir(cfg),
        cache,
        abstain=abstain_rule(cfg, background=info.background),
        postprocess=postprocess_step(cfg),
        save_scores=scores_dir,
    )
    meta = {
        "mode": "model",
        "method": method,
        "vm": config.vm,
        "vlm": config.vlm,
        "encoder_dtype": config.encoder_dtype,
        **{k: plain(cfg[k]) for k in ("lp", "pixel", "window")},
        "predict": plain(cfg.get("predict")),
        "postprocess": plain(cfg.get("postprocess")),
    }
    return method, source, meta


def plan_evaluation(cfg: DictConfig) -> EvalPlan:
    """Check the run config, the data, the outputs and the resume state; build nothing.

    The output folders are created (to check they are writable); no file is written.
    """
    info, dataset = dataset_of(cfg)
    method, source, meta = _source(cfg, info, dataset)
    mcfg = cfg.get("metrics") or {}
    boundary = bool(mcfg.get("boundary", False))
    dilation = float(mcfg.get("dilation_ratio", DILATION_RATIO))
    ci = ci_config(cfg)
    meta = {
        "dataset": info.name,
        "vocabulary": info.vocabulary,
        **({"classes": list(info.classes)} if info.vocabulary != "default" or not info.strict else {}),
        **({"data": _folder_meta(info)} if not info.strict else {}),
        **meta,
        "metrics": {"boundary": boundary, "dilation_ratio": dilation},
        "version": __version__,
    }
    run_dir = run_dir_of(cfg)
    store = StateStore(Path(str(cfg.get("state_dir") or run_dir / "states")).expanduser())
    results_path = Path(str(cfg.get("results_json") or run_dir / "results.json")).expanduser()
    save_predictions = str(cfg.save_predictions) if cfg.get("save_predictions") else None
    for folder in (store.root, results_path.parent, *([Path(save_predictions)] if save_predictions else [])):
        check_output_dir(folder)
    resume = bool(cfg.get("resume", False)) or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    launched = launched_world_size()
    if launched > 1 and not shared_dirs_are_explicit():
        raise UserError(
            f"this is one of {launched} launched processes (WORLD_SIZE/SLURM_NTASKS): pass "
            "hydra.run.dir=DIR (or state_dir=DIR) on a filesystem all of them share, so they agree on "
            "where per-image results go"
        )
    from .trainer import check_trainer

    check_trainer(cfg)
    store.check(meta, resume)
    have = store.done_ids() if resume else set()
    done = [k for k in dataset.ids if k in have]
    overrides = hydra_overrides()
    ablation = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in _ABLATION_KEYS]
    if info.vocabulary != "default":
        ablation.append(f"vocabulary={Path(info.vocabulary).name}")
    label = method_label(method) + (f" [{', '.join(ablation)}]" if ablation else "")
    return EvalPlan(
        info=info,
        dataset=dataset,
        method=method,
        label=label,
        meta=meta,
        source=source,
        store=store,
        resume=resume,
        done=done,
        boundary=boundary,
        dilation_ratio=dilation,
        run_dir=run_dir,
        results_path=results_path,
        overrides=overrides,
        resolved=plain(cfg),
        save_predictions=save_predictions,
        num_workers=int(cfg.get("num_workers", 0)),
        ci=ci,
    )


def run_evaluation(plan: EvalPlan, cfg: DictConfig) -> int | None:
    """Build the loggers, callbacks, trainer and module from ``cfg``; run the test loop.

    Returns the number of processes on rank 0, ``None`` on the other ranks.

    Raises:
        EvaluationStopped: the run received SIGTERM (SLURM preemption or time-out, ``kill``); the images
            evaluated so far keep their records.
    """
    from ..module import EvalDataModule, EvalModule
    from .trainer import build_callbacks, build_loggers, build_trainer, finish_loggers

    if process_rank() == 0:  # external launchers (torchrun, SLURM) start every rank in this function
        plan.store.prepare(plan.meta)
    module = EvalModule(
        plan.info.classes,
        plan.source,
        plan.store,
        resumed=plan.store.load(plan.done) if plan.done else (),
        ids=plan.dataset.ids,
        boundary=plan.boundary,
        dilation_ratio=plan.dilation_ratio,
        save_predictions=plan.save_predictions,
        hparams={
            "config": plan.resolved,
            "lposs_lab_version": __version__,
            "label": plan.label,
            "dataset": plan.info.name,
            "vocabulary": plan.info.vocabulary,
        },
    )
    datamodule = EvalDataModule(
        plan.dataset, skip=plan.done, num_workers=plan.num_workers, prepare=plan.prepare
    )
    loggers, options = build_loggers(cfg)
    report = {
        "store": plan.store,
        "ids": plan.dataset.ids,
        "classes": plan.info.classes,
        "dataset": plan.info.name,
        "boundary": plan.boundary,
        "dilation_ratio": plan.dilation_ratio,
    }
    callbacks = build_callbacks(cfg, options, report=report)
    trainer = build_trainer(cfg, loggers=loggers, callbacks=callbacks, todo=plan.todo)
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    except SystemExit as exc:  # Lightning ends the loop with SIGTERMException (exit status 0) on SIGTERM
        if trainer.received_sigterm:
            raise EvaluationStopped(plan.store, len(plan.dataset)) from exc
        raise
    finally:
        finish_loggers(loggers)
    if trainer.received_sigterm:
        raise EvaluationStopped(plan.store, len(plan.dataset))
    tally = {k: int(trainer.callback_metrics[f"cache/{k}"]) for k in ("hits", "images")
             if f"cache/{k}" in trainer.callback_metrics}  # summed over processes (FeatureCacheTally)
    if len(tally) == 2:
        plan.extra["cache"] = tally
    return trainer.world_size if trainer.is_global_zero else None


def write_results(plan: EvalPlan, wall: float, world: int) -> dict[str, Any]:
    """Sum the records of every image into ``results.json`` (atomically) and print the table."""
    records = plan.store.load(plan.dataset.ids)
    summary = summarize(
        records, plan.info.classes, boundary=plan.boundary, dilation_ratio=plan.dilation_ratio
    )
    intervals = results_intervals(records, plan.info.classes, plan.ci, boundary=plan.boundary)
    results: dict[str, Any] = {
        "dataset": plan.info.name,
        "vocabulary": plan.info.vocabulary,
        "method": plan.method,
        "label": plan.label,
    }
    # each score followed by its interval (percent, like the score), when metrics.ci is on
    for key in ("mIoU", *(["boundary_iou"] if plan.boundary else []), "pixel_accuracy"):
        results[key] = summary[key]
        if f"{key}_ci" in intervals:
            results[f"{key}_ci"] = intervals[f"{key}_ci"]
    results.update(
        ci=intervals["ci"],
        num_images=summary["num_images"],
        errors=summary["errors"],
        resumed=len(plan.done),
    )
    for key in ("per_class_iou", *(["per_class_boundary_iou"] if plan.boundary else [])):
        results[key] = summary[key]
        if f"{key}_ci" in intervals:
            results[f"{key}_ci"] = intervals[f"{key}_ci"]
    results.update(
        seconds_per_image=summary["seconds_per_image"],
        wall_seconds=round(wall, 3),
        processes=world,
        state_dir=str(plan.store.root),
        predictions=plan.meta.get("predictions"),
        version=__version__,
        random_init=_random_init(plan),
        **({"cache": plan.extra["cache"]} if "cache" in plan.extra else {}),
        overrides=plan.overrides,
        config=plan.resolved,
        per_image=summary["per_image"],
    )
    with atomic_write(plan.results_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print()
    print(results_table([results], "mIoU", all_datasets=False, ci="interval").to_text())
    if plan.boundary:
        print()
        print(results_table([results], "boundary_iou", all_datasets=False, ci="interval").to_text())
    if plan.ci.enabled:
        level, n_res = 100 * plan.ci.level, plan.ci.resamples
        print(f"[low, high]: {level:g} % bootstrap interval over the images ({n_res} resamples)")
        iv = results.get("mIoU_ci")
        if iv and results["mIoU"] is not None and not iv[0] <= results["mIoU"] <= iv[1]:
            print(
                "note: the mIoU lies outside its interval: classes that are in few images score lower in "
                "resamples that hold fewer of those images (their false positives elsewhere stay), so the "
                "percentile interval sits low; read its width, and compare runs with `python -m "
                "lposs_lab.lab.report compare` (README: Reading differences)"
            )
    n = summary["num_images"]
    print(
        f"\n{plan.info.name}: {n} image(s) scored in {wall:.1f}s ({world} process(es)); "
        f"results: {plan.results_path}"
    )
    if "cache" in results:
        tally = results["cache"]
        print(f"feature cache: {tally['hits']} of {tally['images']} images from the cache")
    if results["random_init"]:
        print(
            "note: random-init weights ("
            + ", ".join(results["random_init"])
            + "): the numbers are meaningless"
        )
    if summary["errors"]:
        print(f"{len(summary['errors'])} image(s) could not be evaluated (results.json 'errors'):")
        for e in summary["errors"]:
            print(f"  {e['id']}: {e['error']}")
    return results


def _folder_meta(info: BenchmarkInfo) -> dict[str, Any]:
    """What a ``dataset=folder`` run scored (its state store refuses to resume with other folders)."""
    keys = ("images", "labels", "image_suffix", "label_suffix", "split", "reduce_zero_label", "ignore_index")
    return {k: getattr(info, k) for k in keys}
def report_saved_scores(plan: EvalPlan) -> str | None:
    """Print (and return) where ``save_scores`` put the score files and their total size; None without."""
    folder = getattr(plan.source, "save_scores", None)
    if not folder:
        return None
    sizes = [p.stat().st_size for p in (Path(folder) / f"{k}.npz" for k in plan.dataset.ids) if p.is_file()]
    per_image = sum(sizes) / len(sizes) if sizes else 0.0
    line = (
        f"scores: {len(sizes)} file(s), {_megabytes(sum(sizes))} in all ({_megabytes(per_image)} per image), "
        f"in {Path(folder).resolve()}"
    )
    print(line)
    return line


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n / 1e3:.1f} kB"


def _random_init(plan: EvalPlan) -> list[str]:
    """Encoders of this run without trained weights (none when the labels do not come from a model)."""
    config = getattr(plan.source, "config", None)
    return [] if config is None else random_init_encoders(config)


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Run ``task=evaluate``; returns the results dict (on rank 0) after writing ``results_json``.

    Exits non-zero (a :class:`UserError`) when no image could be scored; ``results.json`` still lists why.
    """
    prepare = data_preparer(cfg)
    if prepare is not None:  # the plan reads the file list, so the data is made first; the data module's
        prepare()  # prepare_data() (Lightning, once per node) runs it again: a no-op on the fresh stamp
    plan = plan_evaluation(cfg)
    plan.prepare = prepare
    t0 = time.perf_counter()
    world = 1
    if plan.todo > 0:
        try:
            world = run_evaluation(plan, cfg)
        except EvaluationStopped as stop:
            print(f"error: {stop.message(plan.run_dir)}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)
        if world is None:
            return None
    else:
        print(f"all {len(plan.dataset)} images already evaluated in {plan.store.root}; summing their states")
    results = write_results(plan, time.perf_counter() - t0, world)
    report_saved_scores(plan)
    if results["num_images"] == 0:
        first = results["errors"][0]["error"] if results["errors"] else "no image was scored"
        raise UserError(
            f"no image of {plan.info.name} could be scored ({len(results['errors'])} error(s), listed in "
            f"{plan.results_path}); first: {first}"
        )
    return results
