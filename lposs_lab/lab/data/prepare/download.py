"""Fetch an archive into ``downloads/<name>.part``: Range resume, retries with back-off, mirrors, progress.

The finished file is checked (size, then every published checksum) before it is renamed onto
``downloads/<name>``; a file that fails the check is removed (it cannot be resumed) and the next mirror is
tried. A ``.part`` left by an interrupted transfer is kept and continued with an HTTP ``Range`` request.
Only ``urllib`` is used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from lposs_lab.errors import UserError

from .manifest import Archive

__all__ = ["ArchiveError", "DownloadError", "Progress", "RetryPolicy", "check_space", "fetch", "file_digests"]

_CHUNK = 1 << 20
_FIX = "delete it and rerun to download it again (or put the right file there)"


class ArchiveError(UserError, ValueError):
    """An archive whose size or checksum is not the published one, or that lacks a needed member."""


class DownloadError(UserError, RuntimeError):
    """An archive that could not be fetched from any of its URLs."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` per URL, waiting ``delay * factor**i`` seconds between them."""

    attempts: int = 5
    delay: float = 2.0
    factor: float = 2.0
    timeout: float = 60.0

    def wait(self, attempt: int) -> float:
        return self.delay * self.factor**attempt


def file_digests(path: Path, algos: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm in ``algos`` (one read of the file)."""
    hashers = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            for h in hashers.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


def check_file(path: Path, archive: Archive, fix: str = _FIX) -> dict[str, str]:
    """Check ``path`` against the archive's size and published checksums; return its digests.

    The sha256 is always computed (it goes into the stamp), the others when published.

    Raises:
        ArchiveError: wrong size or checksum (one line naming the file, what was expected and what it is).
    """
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise ArchiveError(
            f"{archive.name} ({path}) is {size:,} bytes, the manifest says {archive.size:,}: a truncated or "
            f"different file; {fix}"
        )
    algos = tuple(dict.fromkeys(("sha256", *archive.hashes)))
    digests = file_digests(path, algos)
    for algo, want in archive.hashes.items():
        if digests[algo] != want:
            raise ArchiveError(
                f"{archive.name} ({path}) has {algo} {digests[algo]}, the manifest says {want}: a corrupted "
                f"or different file; {fix}"
            )
    return digests


def check_space(folder: Path, need: int, what: str) -> None:
    """Fail before fetching anything when ``folder``'s file system has less than ``need`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(
            f"not enough free disk space in {folder}: {what} need {need / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            "free; free some space or pass --root DIR on a larger disk"
        )


class Progress:
    """Bytes, rate and ETA of a transfer: a redrawn line on a terminal, else a line every few seconds."""

    def __init__(
        self, name: str, total: int | None, start: int = 0, stream: TextIO | None = None, every: float = 5.0
    ) -> None:
        self.name, self.total, self.done = name, total, start
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.start, self.last, self.every = time.monotonic(), start, 0.0, every

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = (self.done - self.start) / elapsed
        text = f"{self.name}: {self.done / 1e6:,.1f} MB"
        if self.total:
            text += f" of {self.total / 1e6:,.1f} MB ({100 * self.done / self.total:.0f}%)"
        text += f", {rate / 1e6:.2f} MB/s"
        if self.total and rate > 0:
            text += f", ETA {_hms(max(self.total - self.done, 0) / rate)}"
        return text

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        self.stream.write(("\r" + self.line() + "\033[K") if self.tty else self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line() + ("\033[K\n" if self.tty else "\n"))
        self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _transfer(url: str, part: Path, archive: Archive, policy: RetryPolicy, stream: TextIO | None) -> None:
    """One request: continue ``part`` from its current size; raises on a dropped or short transfer."""
    have = part.stat().st_size if part.exists() else 0
    if archive.size is not None and have >= archive.size:
        if have > archive.size:
            part.unlink()
            have = 0
        else:
            return
    headers = {"User-Agent": "lposs_lab-prepare"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=policy.timeout) as resp:
        status = resp.status
        if have and status != 206:  # the server ignored Range: start again
            have = 0
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None else archive.size
        progress = Progress(archive.name, expected, have, stream)
        with open(part, "ab" if have else "wb") as out:
            while block := resp.read(_CHUNK):
                out.write(block)
                progress.update(len(block))
        progress.close()
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise ConnectionError(f"connection closed after {got:,} of {expected:,} bytes")


def fetch(
    archive: Archive,
    downloads: Path,
    policy: RetryPolicy = RetryPolicy(),
    stream: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Path, dict[str, str]]:
    """Download ``archive`` into ``downloads/`` (resuming a ``.part``) and check it; return path and digests.

    Raises:
        DownloadError: every URL failed (the ``.part`` is kept to resume).
        ArchiveError: the last complete download had the wrong size or checksum (it is removed).
    """
    if not archive.urls:
        raise DownloadError(f"{archive.name} has no download URL in the manifest; put it in {downloads}")
    downloads.mkdir(parents=True, exist_ok=True)
    target, part = downloads / archive.name, downloads / f"{archive.name}.part"
    errors: list[str] = []
    bad: ArchiveError | None = None
    for url in archive.urls:
        for attempt in range(policy.attempts):
            try:
                _transfer(url, part, archive, policy, stream)
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and part.exists():  # Range past the end: the .part is not resumable
                    part.unlink()
                errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
                if exc.code in (401, 403, 404, 410):
                    break  # this URL will not work: next mirror
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
            else:
                try:
                    digests = check_file(part, archive, fix=f"served by {url}; the download was removed")
                except ArchiveError as exc:
                    part.unlink()
                    bad = exc
                    break  # a different mirror may serve the right file
                os.replace(part, target)
                return target, digests
            if attempt + 1 < policy.attempts:
                sleep(policy.wait(attempt))
    if bad is not None:
        raise bad
    raise DownloadError(
        f"could not download {archive.name} ({'; '.join(errors[-3:])}); rerun to resume, or download it "
        f"yourself into {downloads} (or a folder given with --archives DIR)"
    )
