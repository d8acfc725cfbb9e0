"""What a run asks for, checked before torch, Lightning or any model is imported (about a second).

The tasks check everything again, and more (decoding every image, listing a benchmark's files, the
trainer, the resume state); this pass catches the common mistakes early and with the same one-line
messages: a missing image, a bad class list, an out-of-range or unknown config value (``lp.k=-5``,
``pixel.depth_model``, ``pixel.backend=triton`` without CUDA), an unwritable ``out=``, a missing
benchmark folder. It imports only the standard library, OmegaConf and torch-free parts of the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from lposs_lab.inputs import check_image_path, parse_classes

from .config import check_output_dir, lposs_config

__all__ = ["precheck", "check_images", "check_benchmark_folder"]


def check_images(value: Any) -> list[Path]:
    """Every path of ``image=`` (one path or a list) names a non-empty file (not decoded here).

    Raises:
        lposs_lab.errors.ImageError: the first missing, directory or empty path.
    """
    if value is None:
        return []
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    return [check_image_path(Path(str(item)).expanduser()) for item in items]


def check_benchmark_folder(cfg: Any) -> None:
    """The benchmark ``dataset=`` names sits under ``data_root`` (its image folder exists); for
    ``dataset=folder`` its folders hold images and labels, and its classes (and any vocabulary) fit.

    Raises:
        lposs_lab.errors.ConfigError: unknown benchmark name, vocabulary or folder settings.
        lposs_lab.lab.data.DatasetError: the data folder or the benchmark's image folder is missing.
    """
    from ..data.benchmarks import resolve_root
    from ..data.folder import FOLDER
    from .benchmark import benchmark_of

    section = cfg.get("dataset")
    name = section.get("name") if hasattr(section, "get") else section
    if not name or (name != FOLDER and not cfg.get("data_root")):
        return  # the task says what to pass
    info, root = benchmark_of(cfg)
    if name != FOLDER:
        resolve_root(info, root)


def precheck(task: str, cfg: Any) -> None:
    """Check the run config of ``task`` (``segment``, ``evaluate``, ``refine``) as far as it can be
    checked without building anything; raises the :class:`lposs_lab.errors.UserError` the task would."""
    if task == "segment":
        check_images(cfg.get("image"))
        parse_classes(cfg.get("classes"))
    else:
        check_benchmark_folder(cfg)
    lposs_config(cfg)  # every vm/vlm/lp/pixel/window value, the depth model, the pixel backend
    if task == "segment":
        check_output_dir(Path(str(cfg.get("out") or "outputs")).expanduser(), create=False)
