"""On-disk cache of encoder outputs, so that sweeps over LP, kernel and pixel settings encode each image once.

What the encoders produce for one image (:class:`lposs_lab.predictor.ImageFeatures`: resized image, window
geometry, VM and VLM features) depends only on the dataset image, the encoder weights, the window and resize
setup and the encoder dtype. Those make the cache **key**; its SHA-256 names a folder::

    <root>/<hash>/key.json              the key dict, checked on every open (a stale folder is never used)
    <root>/<hash>/shard-<ns>-<pid>-<r>/ an HF ``datasets`` Arrow dataset (save_to_disk), memory-mapped

Writes are buffered and flushed as one new shard of ``shard_size`` images: a shard is written to a temporary
folder and renamed into place, so readers never see a partial shard and concurrent writers never collide.
Each row holds the id, a SHA-1 of the decoded image (a changed file is a miss, never stale features), shapes
and flattened arrays. When an id occurs in several shards the newest shard wins.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lposs_lab.config import WindowConfig
from lposs_lab.files import atomic_write
from lposs_lab.image_io import to_rgb_uint8
from lposs_lab.predictor import LPOSS, ImageFeatures
from lposs_lab.windows import Window

__all__ = ["FEATURE_FORMAT", "FeatureCache", "FeatureStore", "feature_key", "key_hash", "image_digest"]
__all__ += ["attach_feature_cache", "FeatureCacheSpec", "cached_features", "default_cache_dir"]

#: Bumped whenever the stored layout or the feature extraction changes (it is part of every key).
FEATURE_FORMAT = 1
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def default_cache_dir() -> Path:
    """``$LPOSS_CACHE_DIR`` or ``~/.cache/lposs_lab/features``."""
    env = os.environ.get("LPOSS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lposs_lab" / "features"


def key_hash(key: Mapping[str, Any]) -> str:
    """Hex SHA-256 (first 24 characters) of the canonical JSON of ``key``."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def image_digest(rgb: np.ndarray) -> str:
    """SHA-1 of a decoded ``[H, W, 3]`` uint8 image and its shape."""
    h = hashlib.sha1(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def feature_key(model: LPOSS, dataset: str, window: WindowConfig | None = None) -> dict[str, Any]:
    """Everything that determines :meth:`LPOSS.extract`'s output for the images of ``dataset``.

    Args:
        model: the predictor (its encoders' ``weights_id``, patch sizes and encoder dtype are used).
        dataset: names the image source, e.g. ``"voc@/data/VOCdevkit"``.
        window: the window setup (default ``model.config.window``); ``joint`` and ``ensemble`` do not matter.
    """
    win = window or model.config.window

    def ident(m: torch.nn.Module) -> str:
        return str(getattr(m, "weights_id", None) or f"{type(m).__module__}.{type(m).__qualname__}")

    shared = model.vm is model.vlm
    return {
        "format": FEATURE_FORMAT,
        "dataset": str(dataset),
        "vm": "<vlm>" if shared else ident(model.vm),
        "vm_patch": int(getattr(model.vm, "patch_size", 0)),
        "vlm": ident(model.vlm),
        "window": [int(win.size), int(win.stride)] if win.size > 0 else [0, 0],
        "resize": [int(win.short_side), int(win.long_side)],
        "encoder_dtype": str(model.encoder_dtype).replace("torch.", ""),
    }


def _tensor(values: np.ndarray, dtype: type, shape: list[int], device: str | torch.device) -> torch.Tensor:
    # Copy out of the memory map into torch-allocated memory: BLAS results can depend on buffer
    # alignment, and features from the cache must give bit-identical scores to fresh ones.
    out = torch.empty(tuple(shape), dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    out.view(-1).numpy()[:] = np.asarray(values, dtype=dtype)
    return out.to(device)


def _flat(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype, copy=False).reshape(-1)


class FeatureCache:
    """Per-image :class:`ImageFeatures` for one key, in memory-mapped Arrow shards under ``root/<hash>``.

    Args:
        root: cache root folder (created if missing).
        key: JSON-serialisable dict naming everything the features depend on (see :func:`feature_key`).
        shard_size: images buffered before a shard is written.
        dtype: storage dtype of the feature arrays, ``"float32"`` (exact) or ``"float16"`` (half the disk).

    Raises:
        ValueError: unknown ``dtype``, or the folder's ``key.json`` holds another key (hash collision).
    """

    def __init__(self, root: str | os.PathLike, key: Mapping[str, Any], *, shard_size: int = 8,
                 dtype: str = "float32") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown cache dtype {dtype!r}; valid choices: {', '.join(STORAGE_DTYPES)}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.key = json.loads(json.dumps({**dict(key), "storage_dtype": dtype}, sort_keys=True, default=str))
        self.hash = key_hash(self.key)
        self.path = Path(root).expanduser() / self.hash
        self.shard_size = int(shard_size)
        self.dtype = STORAGE_DTYPES[dtype]
        self._pending: dict[str, dict[str, Any]] = {}
        self._shards: dict[str, Any] = {}
        self._index: dict[str, tuple[str, int]] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        key_file = self.path / "key.json"
        if key_file.exists():
            stored = json.loads(key_file.read_text())
            if stored != self.key:
                raise ValueError(
                    f"feature cache {self.path} holds another key ({stored}); delete that folder to rebuild"
                )
        else:
            with atomic_write(key_file, "w") as fh:
                json.dump(self.key, fh, indent=1, sort_keys=True)
        self._clean_stale_temporaries()
        self.refresh()
        _OPEN.add(self)

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Pick up shards written since the last look (e.g. by another process).

        A damaged shard (truncated, or not a readable Arrow dataset) is reported with its path and
        removed: its images count as missing, so they are recomputed and stored in a new shard.
        """
        names = sorted(p.name for p in self.path.glob("shard-*") if p.is_dir())
        for name in names:  # sorted by creation time: later shards override earlier ones
            if name in self._shards:
                continue
            table = self._load_shard(self.path / name)
            if table is None:
                continue
            self._shards[name] = table
            for row, image_id in enumerate(table.column("id").to_pylist()):
                self._index[image_id] = (name, row)

    @staticmethod
    def _load_shard(path: Path) -> Any:
        import datasets
        import pyarrow as pa

        try:
            table = datasets.load_from_disk(str(path)).data.table
            table.validate(full=True)
        except (OSError, ValueError, pa.ArrowException, json.JSONDecodeError) as exc:
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            print(f"warning: damaged feature-cache shard {path} ({reason}); recomputing its images",
                  file=sys.stderr, flush=True)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return table

    def _clean_stale_temporaries(self) -> None:
        """Remove ``.tmp-shard-*`` folders of writers that died (their process is gone, or over a day old)."""
        for tmp in self.path.glob(".tmp-shard-*"):
            parts = tmp.name.split("-")
            pid = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else -1
            try:
                age = time.time() - tmp.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > 86400 or not _process_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._pending or image_id in self._index

    def __len__(self) -> int:
        return len(set(self._index) | set(self._pending))

    def ids(self) -> list[str]:
        """Cached image ids (written and pending), sorted."""
        return sorted(set(self._index) | set(self._pending))

    def digest(self, image_id: str) -> str | None:
        """The stored image digest of ``image_id`` (None when absent)."""
        row = self._row(image_id)
        return None if row is None else row["digest"]

    def _row(self, image_id: str) -> dict[str, Any] | None:
        if image_id in self._pending:
            return self._pending[image_id]
        if image_id not in self._index:
            return None
        name, i = self._index[image_id]
        table = self._shards[name]
        out: dict[str, Any] = {}
        for col in table.column_names:
            value = table.column(col)[i]
            if col in ("vm", "vlm", "image"):
                out[col] = value.values.to_numpy(zero_copy_only=False)
            else:
                out[col] = value.as_py()
        return out

    def get(self, image_id: str, *, digest: str | None = None, device: str | torch.device = "cpu"
            ) -> ImageFeatures | None:
        """The cached features of ``image_id``, or None when absent or stored for another ``digest``."""
        row = self._row(str(image_id))
        if row is None or (digest is not None and row["digest"] != digest):
            return None
        image = _tensor(row["image"], np.uint8, row["image_shape"], device).float() / 255.0
        vlm = _tensor(row["vlm"], np.float32, row["vlm_shape"], device)
        vm = vlm if row["vm_is_vlm"] else _tensor(row["vm"], np.float32, row["vm_shape"], device)
        windows = [Window(*map(int, w)) for w in row["windows"]]
        return ImageFeatures(image, tuple(row["original_size"]), windows, vm, vlm, int(row["patch_size"]))

    # ------------------------------------------------------------------ writing
    def put(self, image_id: str, feats: ImageFeatures, *, digest: str = "") -> None:
        """Queue ``feats`` for ``image_id``; a shard is written every ``shard_size`` images."""
        image = (feats.image.detach().float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        shared = feats.vm is feats.vlm
        self._pending[str(image_id)] = {
            "id": str(image_id),
            "digest": str(digest),
            "original_size": [int(v) for v in feats.original_size],
            "patch_size": int(feats.patch_size),
            "windows": [[w.y1, w.y2, w.x1, w.x2] for w in feats.windows],
            "image_shape": list(image.shape),
            "image": image.reshape(-1),
            "vm_is_vlm": bool(shared),
            "vm_shape": list(feats.vm.shape),
            "vlm_shape": list(feats.vlm.shape),
            "vm": np.zeros(0, self.dtype) if shared else _flat(feats.vm, self.dtype),
            "vlm": _flat(feats.vlm, self.dtype),
        }
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending images as one new shard (atomically: temporary folder, then rename)."""
        if not self._pending:
            return
        import datasets
        import pyarrow as pa

        rows = list(self._pending.values())

        def big(key: str, typ: Any) -> pa.Array:
            arrays = [np.asarray(r[key]) for r in rows]
            offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
            values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0), type=typ)
            return pa.LargeListArray.from_arrays(pa.array(offsets), values)

        ftype = pa.float16() if self.dtype == np.float16 else pa.float32()
        table = pa.table({
            **{k: pa.array([r[k] for r in rows]) for k in ("id", "digest", "original_size", "patch_size")},
            **{k: pa.array([r[k] for r in rows]) for k in ("windows", "image_shape", "vm_is_vlm")},
            **{k: pa.array([r[k] for r in rows]) for k in ("vm_shape", "vlm_shape")},
            "image": big("image", pa.uint8()),
            "vm": big("vm", ftype),
            "vlm": big("vlm", ftype),
        })
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.path / f".tmp-{name}"
        quiet = not datasets.utils.are_progress_bars_disabled()
        if quiet:
            datasets.utils.disable_progress_bars()
        try:
            datasets.Dataset(table).save_to_disk(str(tmp))
        finally:
            if quiet:
                datasets.utils.enable_progress_bars()
        os.replace(tmp, self.path / name)
        self._pending.clear()
        self.refresh()

    def close(self) -> None:
        """Flush pending writes."""
        self.flush()
        _OPEN.discard(self)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, n={len(self)})"


_OPEN: weakref.WeakSet[FeatureCache] = weakref.WeakSet()


def _process_alive(pid: int) -> bool:
    """Whether a process of this machine with ``pid`` exists (False for invalid pids)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@atexit.register
def _flush_open_caches() -> None:
    """At exit, write the pending images of every cache that was not closed (a run that forgot close()
    still keeps what it computed); one warning line per cache whose images could not be written."""
    for cache in list(_OPEN):
        pending = len(cache._pending)
        try:
            cache.flush()
        except (OSError, ValueError, RuntimeError, ImportError) as exc:  # disk, Arrow, interpreter exit
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            print(
                f"warning: feature cache {cache.path}: {pending} computed image(s) could not be written at "
                f"exit ({reason}); they will be recomputed next time",
                file=sys.stderr,
                flush=True,
            )


class FeatureStore:
    """The caches of one dataset for every window setup a predictor asks for (ensembles use several).

    Attach it with :func:`attach_feature_cache`; :meth:`LPOSS.predict` then takes features from here when it
    is given an ``image_id``. ``hits`` and ``misses`` count lookups (one per window setup of an ensemble);
    :meth:`tally` counts images.
    """

    def __init__(self, root: str | os.PathLike, dataset: str, *, shard_size: int = 8,
                 dtype: str = "float32") -> None:
        self.root = Path(root).expanduser()
        self.dataset = str(dataset)
        self.shard_size = shard_size
        self.dtype = dtype
        self.caches: dict[str, FeatureCache] = {}
        self.hits = 0
        self.misses = 0
        self._from_cache: dict[str, bool] = {}  # image id -> every lookup of it hit

    def cache_for(self, model: LPOSS, window: WindowConfig | None = None) -> FeatureCache:
        """The :class:`FeatureCache` of ``model``'s encoders and ``window`` (opened once)."""
        key = feature_key(model, self.dataset, window)
        h = key_hash(key)
        if h not in self.caches:
            self.caches[h] = FeatureCache(self.root, key, shard_size=self.shard_size, dtype=self.dtype)
        return self.caches[h]

    def fetch(self, model: LPOSS, image: Any, window: WindowConfig, image_id: str) -> ImageFeatures:
        """Cached features of ``image_id`` when present for this very image, else extract and store them."""
        rgb = to_rgb_uint8(image)
        digest = image_digest(rgb)
        cache = self.cache_for(model, window)
        feats = cache.get(image_id, digest=digest, device=model.device)
        hit = feats is not None
        if feats is None:
            self.misses += 1
            feats = model.extract(rgb, window)
            cache.put(image_id, feats, digest=digest)
        else:
            self.hits += 1
        self._from_cache[image_id] = self._from_cache.get(image_id, True) and hit
        return feats

    def tally(self) -> dict[str, int]:
        """``{"hits": k, "images": n}``: of the ``n`` images looked up, ``k`` came from the cache entirely
        (every window setup of an ensemble was cached); the others were encoded, in part or in full."""
        return {"hits": sum(self._from_cache.values()), "images": len(self._from_cache)}

    def flush(self) -> None:
        for cache in self.caches.values():
            cache.flush()

    def close(self) -> None:
        for cache in self.caches.values():
            cache.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, {self.dataset!r}, hits={self.hits}, misses={self.misses})"


def attach_feature_cache(model: LPOSS, root: str | os.PathLike | None, dataset: str, *, shard_size: int = 8,
                         dtype: str = "float32") -> FeatureStore:
    """Give ``model`` a :class:`FeatureStore` (``model.feature_cache``) and return it."""
    store = FeatureStore(root or default_cache_dir(), dataset, shard_size=shard_size, dtype=dtype)
    model.feature_cache = store
    return store


@dataclass(frozen=True)
class FeatureCacheSpec:
    """Where and how a run caches encoder outputs (built by the lab's tasks from ``cache.*``).

    Attributes:
        root: cache folder (None: :func:`default_cache_dir`).
        dataset: names the image source, e.g. ``"voc@/data"`` (part of every key).
        shard_size: images per shard.
        dtype: ``"float32"`` (exact) or ``"float16"``.
    """

    root: str | None
    dataset: str
    shard_size: int = 8
    dtype: str = "float32"

    def attach(self, model: LPOSS) -> FeatureStore:
        """Give ``model`` a :class:`FeatureStore` following this spec and return it."""
        return attach_feature_cache(
            model, self.root, self.dataset, shard_size=self.shard_size, dtype=self.dtype
        )


def cached_features(
    model: LPOSS, dataset: Iterable[Any], cache: FeatureStore | FeatureCache | None,
    window: WindowConfig | None = None,
) -> Iterator[tuple[str, ImageFeatures]]:
    """``(id, features)`` for every image of ``dataset``, encoded only when the cache misses.

    Args:
        model: the predictor whose encoders produce the features.
        dataset: samples as dicts with ``"id"`` and ``"image"`` (e.g. a
            :class:`lposs_lab.lab.data.SegmentationDataset`) or ``(id, image)`` pairs.
        cache: a :class:`FeatureStore`, a :class:`FeatureCache` of this model's key, or None (no caching).
        window: the window setup (default ``model.config.window``).
    """
    win = window or model.config.window
    try:
        for sample in dataset:
            image_id, image = (sample["id"], sample["image"]) if isinstance(sample, Mapping) else sample
            if cache is None:
                yield str(image_id), model.extract(image, win)
            elif isinstance(cache, FeatureStore):
                yield str(image_id), cache.fetch(model, image, win, str(image_id))
            else:
                rgb = to_rgb_uint8(image)
                digest = image_digest(rgb)
                feats = cache.get(str(image_id), digest=digest, device=model.device)
                if feats is None:
                    feats = model.extract(rgb, win)
                    cache.put(str(image_id), feats, digest=digest)
                yield str(image_id), feats
    finally:
        if cache is not None:
            cache.flush()
