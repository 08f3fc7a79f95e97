"""Atomic file writes: a unique temporary file in the target's directory, renamed into place.

    with atomic_open(path) as f:        # text (mode="w") or bytes (mode="wb")
        f.write(...)
    with atomic_path(path) as tmp:      # for writers that take a path (np.save, ...)
        np.save(tmp, array)
    write_json_atomic(path, obj); write_text_atomic(path, text)

Readers see the old file or the new one, never a partial file. Temporary
names come from `tempfile.mkstemp` (`.<name>.<random>.tmp`), so concurrent
writers of one path, in one process or several, never share a temporary
file; the last rename wins. A failed write (a full disk, a crash of the
writer code) removes its temporary file, leaves any earlier file untouched
and raises an OSError whose message names the file being written. Files get
the permissions `open` would give them (0o666 minus the umask), not
mkstemp's 0o600.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


def _named(error: OSError, path: Path) -> OSError:
    """`error` with a message that names the file being written (errno kept)."""
    what = error.strerror or str(error)
    named = OSError(f"{path}: {what} while writing it (any earlier {path.name} is unchanged)")
    named.errno = error.errno  # strerror and filename stay unset: str() is the message above
    return named


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the filesystem allows it (some refuse fsync on a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare(path: str | os.PathLike) -> tuple[Path, int, str]:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _named(e, path) from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    except OSError:
        pass  # storage without POSIX permissions (some FUSE mounts)
    return path, fd, tmp


def _commit(tmp: str, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _abandon(tmp: str, path: Path, error: BaseException) -> None:
    """Remove the temporary file of a failed write; an OS error is raised again naming `path`."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    if isinstance(error, OSError) and not str(error).startswith(f"{path}: "):
        raise _named(error, path) from error


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object whose contents replace `path` when the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path, fd, tmp = _prepare(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException as e:
        _abandon(tmp, path, e)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A unique temporary path beside `path` (an empty file) for a writer that takes a path;
    it replaces `path` when the block ends without an error. The writer must not add a suffix."""
    path, fd, tmp = _prepare(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException as e:
        _abandon(tmp, path, e)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs) -> Path:
    """JSON (by default indented, keys sorted, unknown types as str) written atomically."""
    kwargs = dict(indent=2, sort_keys=True, default=str)
    kwargs.update(dump_kwargs)
    with atomic_open(path) as f:
        json.dump(obj, f, **kwargs)
    return Path(path)
