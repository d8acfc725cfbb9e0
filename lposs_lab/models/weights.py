"""Where an encoder's weights come from, and loading them: hub fetches, local checkpoints, strict loading.

``pretrained`` everywhere means:

* ``True``: the registry entry's weights, fetched and cached by ``huggingface_hub`` under the real repo ids
  (timm: ``timm/<name>`` / ``model.safetensors``; open_clip ``laion2b_s34b_b88k``: the repo its
  pretrained table names, ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
  ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` are read at call time.
* a ``str`` / path: a local checkpoint (``.safetensors``, ``.bin``, ``.pth``, ``.pt``), a folder holding one
  of the entry's file names, or ``hf-hub:org/repo[/file][@revision]``.
* ``False`` / ``None``: random init from a fixed seed (meaningless features).

Missing weights raise :class:`~lposs_lab.errors.WeightsUnavailableError` whose ``details`` say which model
and repository; :func:`missing_weights_error` words one error for all of them in the caller's terms
(``STYLES``: keyword arguments of the Python API, or the command line's overrides).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, WeightsMismatchError, WeightsUnavailableError
from .hub import hf_offline, hub_reachable
from .tiny import TINY_SEED

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Pretrained",
    "CHECKPOINT_SUFFIXES",
    "STYLES",
    "parse_hf_hub",
    "fetch_hub",
    "load_checkpoint_file",
    "load_strict",
    "state_dict_mismatch",
    "resolve_pretrained",
    "with_overrides",
    "local_weights_hint",
    "missing_weights_error",
]

Pretrained = bool | str | os.PathLike | None
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

#: How each front-end names "use this local file" for an encoder kind (``vm``, ``vlm``, ``vfm``: ProxyCLIP's
#: proxy model): ``create`` for :func:`create_vm` / :func:`create_vlm`, ``python`` for
#: :meth:`lposs_lab.LPOSS.from_config` and :class:`lposs_lab.LPOSSConfig`, ``hydra`` for ``run.py``.
STYLES: dict[str, dict[str, str]] = {
    "create": {"vm": "pretrained=PATH", "vlm": "pretrained=PATH", "vfm": "vfm_pretrained=PATH"},
    "python": {"vm": "vm_pretrained=PATH", "vlm": "vlm_pretrained=PATH", "vfm": "vfm_pretrained=PATH"},
    "hydra": {"vm": "vm.pretrained=PATH", "vlm": "vlm.pretrained=PATH", "vfm": "vlm.vfm_pretrained=PATH"},
}


def local_weights_hint(kind: str, style: str = "create") -> str:
    """The setting that passes a local checkpoint for ``kind`` in ``style`` (``vm_pretrained=PATH``...)."""
    if style not in STYLES:
        raise ValueError(f"unknown message style {style!r}; valid: {', '.join(STYLES)}")
    return STYLES[style].get(kind, f"{kind}.pretrained=PATH" if style == "hydra" else "pretrained=PATH")


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unavailable_message(missing: Sequence[dict[str, str]], style: str) -> str:
    """One line naming every model of ``missing`` (hub ``details``) and the two ways out, in ``style``."""
    first = missing[0]
    flags = " ".join(local_weights_hint(d["kind"], style) for d in missing)
    if len(missing) == 1:
        return (
            f"weights for {first['kind']} '{first['name']}' unavailable: {first['repo_id']} "
            f"({first['files']}) is not in {first['where']} and cannot be downloaded ({first['reason']}); "
            f"cache it once with network access (HF_HOME), or pass a local file with {flags}"
        )
    models = " and ".join(f"{d['kind']} '{d['name']}' ({d['repo_id']})" for d in missing)
    return (
        f"weights unavailable for {models}: not in {first['where']} and cannot be downloaded "
        f"({first['reason']}); cache them once with network access (HF_HOME), or pass local files: {flags}"
    )


def missing_weights_error(errors: Sequence[WeightsUnavailableError], style: str) -> WeightsUnavailableError:
    """One error for all of ``errors``, naming the local-file settings as ``style`` spells them.

    Errors without hub details (a local file that does not exist...) are joined as they are.
    """
    if not errors:
        raise ValueError("missing_weights_error needs at least one error")
    hub = [e.details for e in errors if e.details.get("repo_id")]
    if len(hub) < len(errors):  # some are about local files: their own words, the others re-worded
        parts = [
            _unavailable_message([e.details], style) if e.details.get("repo_id") else str(e) for e in errors
        ]
        return errors[0] if len(errors) == 1 else WeightsUnavailableError("; ".join(parts))
    return WeightsUnavailableError(_unavailable_message(hub, style), **hub[0])


def parse_hf_hub(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``hf-hub:org/repo[/file][@revision]`` into ``(repo_id, filename or None, revision or None)``."""
    if not spec.startswith("hf-hub:"):
        raise ValueError(f"not an hf-hub spec: {spec!r}; expected 'hf-hub:org/repo[/file][@revision]'")
    body = spec[len("hf-hub:") :].strip().strip("/")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        revision = revision or None
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"bad hf-hub spec {spec!r}; expected 'hf-hub:org/repo[/file][@revision]'")
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{parts[1]}", filename, revision


def hf_cache_dir() -> str | None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default


def fetch_hub(
    repo_id: str, filenames: tuple[str, ...], revision: str | None, who: str, kind: str
) -> tuple[Path, str]:
    """Return ``(local path, weights id)`` of the first of ``filenames`` that huggingface_hub can provide.

    The local cache is tried first for every candidate (no network); then, unless offline, downloads in
    order, moving to the next candidate only when the hub says the file does not exist.

    Raises:
        WeightsUnavailableError: with ``details`` ``kind``, ``name``, ``repo_id``, ``files``, ``reason``,
            ``where``; its message names :func:`create_vm`'s / :func:`create_vlm`'s own argument.
    """
    from huggingface_hub import hf_hub_download

    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError as _Missing
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError as _Missing

    offline = hf_offline()
    cache_dir = hf_cache_dir()
    last_error: Exception | None = None
    passes = (True,) if offline else (True, False)
    for local_only in passes:
        if not local_only and not hub_reachable():
            break
        for filename in filenames:
            try:
                path = Path(
                    hf_hub_download(
                        repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_only
                    )
                )
            except _Missing as exc:
                last_error = exc
                continue
            except OSError as exc:  # not cached, offline, no network, unknown repo: give up on this pass
                last_error = exc
                if local_only:
                    continue
                break
            commit = path.parent.name if path.parent.parent.name == "snapshots" else (revision or "main")
            return path, f"hf:{repo_id}/{filename}@{commit}"
    if offline:
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        reason = "the hub is unreachable"
    else:
        reason = _one_line(f"{type(last_error).__name__}: {last_error}", 100)
    details = {
        "kind": kind, "name": who, "repo_id": repo_id, "files": " or ".join(filenames), "reason": reason,
        "where": str(cache_dir or "the Hugging Face cache"),
    }  # fmt: skip
    raise WeightsUnavailableError(_unavailable_message([details], "create"), **details)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``weights_only``), on CPU.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a ``module.`` prefix.
    """
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsMismatchError(f"checkpoint {p} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def state_dict_mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> str:
    """What keeps ``sd`` from loading strictly into ``model`` (missing, unexpected, misshapen keys); ``""``
    when it fits."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and v.shape != sd[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model, e.g. {'; '.join(shapes[:2])})")
    return ", ".join(parts)


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, who: str) -> None:
    """Load ``sd`` into ``model`` with every key and shape matching, else :class:`WeightsMismatchError`."""
    problem = state_dict_mismatch(model, sd)
    if problem:
        raise WeightsMismatchError(
            f"checkpoint {source} does not fit '{who}': {problem}; check the model name and arch overrides"
        )
    model.load_state_dict(sd, strict=True)


def resolve_pretrained(
    who: str, kind: str, pretrained: Pretrained, repo_id: str | None, filenames: tuple[str, ...]
) -> tuple[Path | None, str]:
    """Map ``pretrained`` to ``(checkpoint path or None for random init, weights id)``.

    ``repo_id`` is the entry's hub repository (``None``: the entry has no trained weights, ``True`` means
    random init); ``filenames`` its candidate files (in a repository or a local folder).
    """
    if pretrained is None or pretrained is False:
        return None, f"random:{TINY_SEED}"
    if pretrained is True:
        if repo_id is None:
            return None, f"random:{TINY_SEED}"
        return fetch_hub(repo_id, filenames, None, who, kind)
    if not isinstance(pretrained, str | os.PathLike):
        raise ConfigError(
            f"pretrained must be True, False, None, a path or 'hf-hub:org/repo', got {pretrained!r}"
        )
    spec = os.fspath(pretrained)
    if spec.startswith("hf-hub:"):
        hub_repo, hub_file, revision = parse_hf_hub(spec)
        return fetch_hub(hub_repo, (hub_file,) if hub_file else filenames, revision, who, kind)
    path = Path(spec).expanduser()
    if path.is_dir():
        found = [path / f for f in filenames if (path / f).is_file()]
        if not found:
            raise WeightsUnavailableError(
                f"no checkpoint ({' or '.join(filenames)}) in directory {path} for {kind} '{who}'"
            )
        path = found[0]
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint file not found for {kind} '{who}': {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(
            f"unsupported checkpoint type {path.name!r}; valid suffixes: {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    stat = path.resolve().stat()
    return path, f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def with_overrides(weights_id: str, overrides: dict[str, Any]) -> str:
    """``weights_id`` with the arch overrides appended (``#arch={...}``): other shapes, other ids."""
    return (
        weights_id
        if not overrides
        else f"{weights_id}#arch={json.dumps(overrides, sort_keys=True, default=str)}"
    )
