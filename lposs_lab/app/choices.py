"""The page's choices: initial predictors whose weights are at hand, and the benchmarks' vocabularies."""

from __future__ import annotations

import os
from pathlib import Path

from lposs_lab.lab.data.benchmarks import BENCHMARKS, get_benchmark

__all__ = ["EXAMPLE_CLASSES", "weights_at_hand", "vlm_choices", "class_presets", "examples"]

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Classes offered with an example image (those of ``make demo``).
EXAMPLE_CLASSES = {"astronaut.jpg": "person;astronaut, flag, rocket;space shuttle, wall;background"}


def _cached(repo_id: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    from lposs_lab.models.weights import hf_cache_dir

    return any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=hf_cache_dir()), str) for f in files)


def weights_at_hand(kind: str, name: str) -> bool:
    """Whether ``create_vm``/``create_vlm(name)`` can build without a download: random-init entries, or
    trained weights already in the Hugging Face cache (a ProxyCLIP VLM also needs its DINO's)."""
    from lposs_lab.models.registry import VLM_MODELS, VM_MODELS, has_trained_weights

    if not has_trained_weights(kind, name, True):
        return True
    entry = (VM_MODELS if kind == "vm" else VLM_MODELS)[name]
    if kind == "vm":
        return _cached(entry.hf_repo, tuple(entry.hf_files))
    repo_id, files = entry.hub_location()
    vfm = getattr(entry, "vfm", None)
    return repo_id is not None and _cached(repo_id, files) and (vfm is None or weights_at_hand("vm", vfm))


def vlm_choices(current: str) -> list[tuple[str, str]]:
    """``(label, name)`` of every VLM whose weights are at hand (random ones marked), ``current`` first."""
    from lposs_lab.models.registry import VLM_MODELS, has_trained_weights

    out = []
    for name in VLM_MODELS:
        if name != current and not weights_at_hand("vlm", name):
            continue
        mark = "" if has_trained_weights("vlm", name, True) else " (random init)"
        out.append((f"{name}{mark}", name))
    out.sort(key=lambda c: c[1] != current)
    return out


def class_presets() -> dict[str, str]:
    """Benchmark name -> its vocabulary as the classes box takes it (``,`` classes, ``;`` synonyms).

    Names holding a comma are written with a space instead (the box splits on commas).
    """
    out = {}
    for name in BENCHMARKS:
        info = get_benchmark(name)
        out[name] = ", ".join(c.replace(",", " ") for c in info.classes)
    return out


def examples(folder: str | os.PathLike = EXAMPLES_DIR) -> list[str]:
    """Image files of ``examples/`` (sorted), for the page's examples."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
