"""``prepare_datasets``: check everything, fetch what is missing, check it, extract, convert, verify, stamp.

Everything that can fail on the user's input fails before the first byte is fetched: unknown names, an
unwritable root, Cityscapes zips that are not there, archives missing from ``--archives DIR``, too little
free space. Every archive is checked (size, checksums) before anything is extracted from any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from lposs_lab.errors import OutputError, UserError
from lposs_lab.files import atomic_write

from .download import RetryPolicy, check_file, check_space, fetch
from .manifest import NEEDS, Archive, Manifest, load_manifest, resolve_names
from .recipes import RECIPES, BuildContext, default_workers
from .stamp import read_valid_stamp, stamp_path, write_stamp
from .verify import verify_target

__all__ = ["CityscapesMissing", "default_data_dir", "prepare_command", "prepare_datasets"]

_REGISTER = "https://www.cityscapes-dataset.com/register/"
_DOWNLOADS = "https://www.cityscapes-dataset.com/downloads/"


class CityscapesMissing(UserError, FileNotFoundError):
    """The two Cityscapes zips (behind a login) are not there; the message says how to get them."""


def default_data_dir() -> Path:
    """``paths.data_dir``'s rule: ``$LPOSS_DATA_DIR`` when set, else ``data/`` in the current folder."""
    env = os.environ.get("LPOSS_DATA_DIR")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def prepare_command(names: list[str], root: Path | None = None) -> str:
    """The shell command that prepares ``names`` (under ``root``)."""
    tail = f" --root {root}" if root is not None else ""
    return f"python -m lposs_lab.lab.data.prepare {' '.join(names)}{tail}"


def _check_writable(root: Path) -> Path:
    downloads = root / "downloads"
    fix = "pass --root DIR (a writable folder)"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to the data root {root}: {exc.strerror or exc}; {fix}") from None
    for folder in (root, downloads):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write to the data root {root}: {folder} is not writable; {fix}")
    return downloads


@contextlib.contextmanager
def _lock(downloads: Path) -> Iterator[None]:
    """One ``prepare`` at a time per data root (several ranks of one launch may call it together)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(downloads / ".prepare.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cityscapes_message(root: Path, downloads: Path, manifest: Manifest, missing: list[str]) -> str:
    files = " and ".join(
        f"{a.name} ({a.describe_size()})" for a in (manifest.archive(n) for n in NEEDS["cityscapes"])
    )
    return (
        f"cityscapes needs {files}, which are behind a free login and not found "
        f"(missing: {', '.join(missing)}); register at {_REGISTER}, download both from {_DOWNLOADS} "
        f"into {downloads} (or a folder you pass with --archives DIR), then rerun: "
        f"{prepare_command(['cityscapes'], root)}"
    )


def _verified(archive: Archive, path: Path, cache: Path, force: bool) -> dict[str, str]:
    """Digests of ``path`` checked against the manifest; remembered (by size and mtime) in ``cache``."""
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache / f"{archive.name}.json"
    if not force:
        with contextlib.suppress(OSError, ValueError):
            seen = json.loads(memo.read_text())
            if all(seen.get(k) == v for k, v in key.items()):
                digests = seen["digests"]
                if archive.size in (None, st.st_size) and all(
                    digests.get(a) == d for a, d in archive.hashes.items()
                ):
                    return digests
    digests = check_file(path, archive)
    with atomic_write(memo, "w") as fh:
        json.dump({**key, "digests": digests}, fh)
    return digests


def prepare_datasets(
    names: list[str],
    root: str | os.PathLike | None = None,
    *,
    manifest: Manifest | None = None,
    archives: str | os.PathLike | None = None,
    force: bool = False,
    cityscapes_from_polygons: bool = False,
    workers: int | None = None,
    policy: RetryPolicy | None = None,
    log: Callable[[str], None] | None = None,
    stream: TextIO | None = None,
) -> dict[str, dict[str, Any]]:
    """Prepare the targets ``names`` ask for under ``root``; return ``{target: stamp}``.

    Args:
        names: targets (``voc context coco_stuff ade20k cityscapes``), ``all``, or ``dataset=`` names.
        root: data root (default :func:`default_data_dir`).
        manifest: archives and expected counts (default: the packaged manifest).
        archives: a folder holding the archives already; nothing is fetched.
        force: redo every step even where a valid stamp or finished file exists.
        cityscapes_from_polygons: draw Cityscapes labels from the polygons, not ``labelIds``.
        workers: conversion processes (default: the usable CPUs, at most 8).
        policy: retries and back-off of downloads (default :class:`RetryPolicy`).
        log: where progress lines go (default: stderr).
        stream: where the download progress bar goes (default: stderr).

    Raises:
        UserError: bad names, unwritable root, missing archives or space, a wrong archive, a prepared
            set that does not verify (one line each).
    """
    if log is None:

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

    targets = resolve_names(list(names))
    policy = policy or RetryPolicy()
    manifest = manifest or load_manifest()
    root = Path(root).expanduser().absolute() if root is not None else default_data_dir()
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise UserError(f"--workers {workers} is out of range; valid: an integer >= 1")
    given = Path(archives).expanduser().absolute() if archives is not None else None
    if given is not None and not given.is_dir():
        raise UserError(
            f"--archives {given} is not a folder; pass the folder holding the downloaded archives"
        )
    downloads = _check_writable(root)
    done: dict[str, dict[str, Any]] = {}
    with _lock(downloads):
        todo = []
        for t in targets:
            stamp = None if force else read_valid_stamp(t, root, manifest, cityscapes_from_polygons)
            if stamp is not None:
                log(f"{t}: up to date ({', '.join(f'{k} {v}' for k, v in stamp['counts'].items())} images)")
                done[t] = stamp
            else:
                todo.append(t)
        if not todo:
            return done
        wanted = list(dict.fromkeys(a for t in todo for a in NEEDS[t]))
        for name in wanted:
            manifest.archive(name)
        located: dict[str, Path] = {}
        for name in wanted:
            for folder in ([given] if given else []) + [downloads]:
                if (folder / name).is_file():
                    located[name] = folder / name
                    break
        if "cityscapes" in todo:
            absent = [n for n in NEEDS["cityscapes"] if n not in located]
            if absent:
                raise CityscapesMissing(_cityscapes_message(root, downloads, manifest, absent))
        missing = [n for n in wanted if n not in located]
        if missing and given is not None:
            raise UserError(
                f"--archives {given} lacks {', '.join(missing)} (for {', '.join(todo)}); put them there "
                "or leave out --archives to download them"
            )
        if missing:
            parts = {n: downloads / f"{n}.part" for n in missing}
            need = sum(
                max(
                    (manifest.archive(n).size or 0) - (parts[n].stat().st_size if parts[n].exists() else 0), 0
                )
                for n in missing
            )
            check_space(downloads, need, f"the downloads ({', '.join(missing)})")
        digests: dict[str, dict[str, Any]] = {}
        for name in missing:
            log(f"downloading {name} ({manifest.archive(name).describe_size()})")
            located[name], d = fetch(manifest.archive(name), downloads, policy, stream)
            _remember(downloads, located[name], d)
        for name in wanted:  # every archive checked before anything is extracted
            d = _verified(manifest.archive(name), located[name], downloads / ".verified", force)
            digests[name] = {"size": located[name].stat().st_size, **d}
        for t in todo:
            t0 = time.perf_counter()
            log(f"{t}: preparing under {root}")
            # a stamp that no longer fits (another converter version or route): its files are redone
            redo = force or stamp_path(t, root).exists()
            ctx = BuildContext(
                root, {n: located[n] for n in NEEDS[t]}, redo, cityscapes_from_polygons, workers, log
            )
            RECIPES[t](ctx)
            counts = verify_target(t, root, manifest.expected.get(t), workers)
            write_stamp(t, root, digests, counts, cityscapes_from_polygons)
            done[t] = {"counts": counts, "seconds": round(time.perf_counter() - t0, 2)}
            log(
                f"{t}: ready ({', '.join(f'{k} {v}' for k, v in counts.items())} images, "
                f"{time.perf_counter() - t0:.1f}s)"
            )
    return done


def _remember(downloads: Path, path: Path, digests: dict[str, str]) -> None:
    """Record the digests of a file just checked by :func:`fetch` so it is not hashed a second time."""
    st = path.stat()
    with atomic_write(downloads / ".verified" / f"{path.name}.json", "w") as fh:
        json.dump(
            {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "digests": digests},
            fh,
        )
