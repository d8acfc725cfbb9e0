"""``python -m lposs_lab.lab.data.prepare NAME... --root DIR``: the 8 benchmarks from their raw archives.

Downloads (resumable, checked), extracts only the validation members, converts the labels with no
mmseg/mmcv/Detail API/pycocotools/cityscapesscripts, verifies what the lab will read and stamps it, so a
rerun does nothing. See ``docs/reproduce.md``.
"""

from .download import ArchiveError, DownloadError, RetryPolicy
from .manifest import ALIASES, NEEDS, TARGETS, Manifest, ManifestError, load_manifest, resolve_names
from .pipeline import CityscapesMissing, default_data_dir, prepare_command, prepare_datasets
from .stamp import CONVERTER_VERSION, STAMP_NAME

__all__ = [
    "ALIASES",
    "CONVERTER_VERSION",
    "NEEDS",
    "STAMP_NAME",
    "TARGETS",
    "ArchiveError",
    "CityscapesMissing",
    "DownloadError",
    "Manifest",
    "ManifestError",
    "RetryPolicy",
    "default_data_dir",
    "load_manifest",
    "prepare_command",
    "prepare_datasets",
    "resolve_names",
]
