"""Read only the members a validation split needs from a tar or zip archive, streaming and safely.

Every member is checked before anything is written: tar members go through ``tarfile``'s ``data`` filter
(no absolute paths, no ``..``, no links or devices), zip names may not be absolute or climb out of the
target. Each file is streamed to a temporary name and renamed (a reader never sees half a file); a file
already there with the member's size is kept, so an interrupted run resumes file by file.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from lposs_lab.files import atomic_write

from .download import ArchiveError

__all__ = ["ArchiveReader", "open_archive"]


def _safe_zip_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and ":" not in (p.parts[0] if p.parts else "")


class ArchiveReader:
    """Member names, sizes and streams of one tar or zip file (opened with :func:`open_archive`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._zip: zipfile.ZipFile | None = None
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)
                self._members = {i.filename: i for i in self._zip.infolist() if not i.is_dir()}
            else:
                self._tar = tarfile.open(path, "r:*")
                self._members = {m.name: m for m in self._tar.getmembers() if not m.isdir()}
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ArchiveError(
                f"{path.name} ({path}) cannot be read as a tar or zip archive: {exc}"
            ) from None

    def close(self) -> None:
        for handle in (self._tar, self._zip):
            if handle is not None:
                handle.close()

    def names(self) -> list[str]:
        return list(self._members)

    def size(self, name: str) -> int:
        m = self._members[name]
        return m.file_size if self._zip is not None else m.size

    def _check(self, name: str) -> None:
        m = self._members[name]
        if self._zip is not None:
            ok = _safe_zip_name(name)
        else:
            try:
                tarfile.data_filter(m, "/extract-target")
                ok = m.isfile()
            except tarfile.FilterError:
                ok = False
        if not ok:
            raise ArchiveError(
                f"{self.path.name}: member {name!r} is not a plain file inside the archive; refused"
            )

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """A binary stream of member ``name`` (checked first)."""
        if name not in self._members:
            raise ArchiveError(f"{self.path.name} has no member {name!r}")
        self._check(name)
        if self._zip is not None:
            with self._zip.open(self._members[name]) as fh:
                yield fh
        else:
            fh = self._tar.extractfile(self._members[name])
            if fh is None:
                raise ArchiveError(f"{self.path.name}: member {name!r} is not a regular file")
            with fh:
                yield fh

    def read(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()

    def require(self, names: list[str], what: str) -> None:
        """Raise one error naming the members of ``names`` that the archive lacks."""
        missing = [n for n in names if n not in self._members]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ArchiveError(
                f"{self.path.name} lacks {len(missing)} member(s) {what} needs: {shown}; wrong file?"
            )

    def extract(self, pairs: list[tuple[str, Path]], target: Path, overwrite: bool = False) -> int:
        """Write member ``m`` to ``dest`` for every ``(m, dest)``; return how many files were written.

        Every member is checked (present, safe, ``dest`` inside ``target``) before the first file is written.
        """
        self.require([m for m, _ in pairs], str(target))
        root = target.resolve()
        for member, dest in pairs:
            self._check(member)
            if not dest.resolve().is_relative_to(root):
                raise ArchiveError(
                    f"{self.path.name}: member {member!r} would land outside {target}; refused"
                )
        written = 0
        for member, dest in pairs:
            if not overwrite and dest.is_file() and dest.stat().st_size == self.size(member):
                continue
            with self.open(member) as src, atomic_write(dest) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            written += 1
        return written


@contextmanager
def open_archive(path: Path) -> Iterator[ArchiveReader]:
    reader = ArchiveReader(path)
    try:
        yield reader
    finally:
        reader.close()
