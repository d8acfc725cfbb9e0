"""The benchmark a run config names: one of the 8 (``dataset=NAME``) or your own folders (``dataset=folder``),
with the class names of ``dataset.vocabulary``; relative paths resolve against the folder the command was
started from (``paths.root_dir``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

from lposs_lab.errors import ConfigError, UserError

from ..data.benchmarks import BENCHMARKS, IGNORE_INDEX, BenchmarkInfo, get_benchmark
from ..data.folder import FOLDER, folder_benchmark
from ..data.vocabulary import VOCABULARIES, with_vocabulary
from .config import plain

__all__ = ["benchmark_of", "start_dir"]


def start_dir(cfg: DictConfig) -> Path:
    """The folder the command was started from: ``paths.root_dir`` (Hydra's ``runtime.cwd``), else the
    current folder (a config composed outside a Hydra app)."""
    try:
        root = (cfg.get("paths") or {}).get("root_dir")
    except InterpolationResolutionError:
        root = None
    return Path(str(root)) if root else Path.cwd()


def _path(value: Any, base: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _folder(ds: dict[str, Any], base: Path) -> BenchmarkInfo:
    for key in ("images", "labels"):
        if not ds.get(key):
            raise ConfigError(
                f"dataset=folder needs dataset.{key}=DIR: pass dataset.images=DIR dataset.labels=DIR "
                "dataset.classes=FILE (or an inline list [a,b])"
            )
    classes = ds.get("classes")
    if isinstance(classes, str) and "," not in classes and classes.strip():
        classes = _path(classes, base)  # a file; an inline "a,b" string stays as it is
    return folder_benchmark(
        _path(ds["images"], base),
        _path(ds["labels"], base),
        classes,
        image_suffix=ds.get("image_suffix", ".jpg"),
        label_suffix=ds.get("label_suffix", ".png"),
        ignore_index=ds.get("ignore_index", IGNORE_INDEX),
        reduce_zero_label=bool(ds.get("reduce_zero_label", False)),
        split=None if ds.get("split") in (None, "") else _path(ds["split"], base),
    )


def benchmark_of(cfg: DictConfig) -> tuple[BenchmarkInfo, Path]:
    """``(info, data_root)`` of the run's ``dataset`` group, checked (folders, classes, vocabulary).

    Raises:
        UserError: no dataset, an unknown one, no data folder; ``dataset=folder`` without its folders or
            classes; an unknown vocabulary or a vocabulary file that does not fit.
    """
    ds_cfg = cfg.get("dataset")
    if not ds_cfg or not ds_cfg.get("name"):
        raise UserError(f"no dataset given: pass dataset=NAME, one of: {', '.join([*BENCHMARKS, FOLDER])}")
    ds = plain(ds_cfg)
    base = start_dir(cfg)
    if ds["name"] == FOLDER:
        info = _folder(ds, base)
        root = Path(info.images)
    else:
        info = get_benchmark(str(ds["name"]))
        data_root = cfg.get("data_root")
        if not data_root:
            raise UserError(
                f"no data folder given: set paths.data_dir=DIR (or $LPOSS_DATA_DIR), the folder holding "
                f"{info.root}/"
            )
        root = Path(str(data_root)).expanduser()
    vocabulary = str(ds.get("vocabulary") or "default")
    if vocabulary not in VOCABULARIES:
        file = _path(vocabulary, base)
        if file.is_file() or Path(vocabulary).suffix or os.sep in vocabulary or "/" in vocabulary:
            vocabulary = os.fspath(file)  # else a misspelt name: refused with the valid choices
    return with_vocabulary(info, vocabulary), root
