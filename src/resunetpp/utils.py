"""Small helpers shared across the package."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (atomic on POSIX).

    A crash mid-write leaves the previous file intact, never a truncated one.

    Raises:
        OSError: `path` is a folder, a file lies where a folder above it should be, or it cannot be written:
            one line naming `path` (never the temporary file), with the cause's errno.
    """
    path = Path(path)
    if path.is_dir():
        raise _cannot_write(path, IsADirectoryError(errno.EISDIR, "it is a folder; give a file name"))
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise _cannot_write(path, NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder"))
    output_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        if tmp in (e.filename, e.filename2):  # say it of the file asked for, not of the temporary one
            raise _cannot_write(path, e) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def output_folder(out: str | os.PathLike, create: bool = True) -> Path:
    """`out` as a folder to write into, made (with its parents) unless `create` is False.

    Raises:
        NotADirectoryError: `out`, or a folder above it, is a file (never replaced).
        OSError: it cannot be made (permission denied, a read-only disk): one line saying what to do.
    """
    out = Path(out)
    blocker = _file_in_the_way(out)
    if blocker == out:
        raise _one_line(NotADirectoryError, errno.ENOTDIR, f"{out}: exists and is a file, not a folder; choose "
                        "another output folder (nothing was written)")
    if blocker is not None:
        raise _one_line(NotADirectoryError, errno.ENOTDIR, f"{out}: cannot create this folder because {blocker} "
                        "is a file; choose another output folder")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise _one_line(PermissionError, errno.EACCES, f"{out}: cannot create this folder: permission denied; "
                            "choose a folder you can write to") from None
        except OSError as e:
            raise _one_line(type(e), e.errno, f"{out}: cannot create this folder ({e.strerror}); choose another "
                            "output folder") from None
    return out


def _file_in_the_way(folder: Path) -> Path | None:
    """`folder` or the nearest existing folder above it, where that is a file."""
    nearest = next((a for a in [folder, *folder.parents] if a.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def _cannot_write(path: Path, e: OSError) -> OSError:
    """`e` as one line about `path`, not the temporary file beside it."""
    reason = e.strerror or str(e)
    return _one_line(type(e), e.errno, f"cannot write {path}: {reason}", reason)


def _one_line(kind: type[OSError], code: int | None, message: str, reason: str | None = None) -> OSError:
    """An OSError whose text is just `message` (no "[Errno N]"), keeping the errno (a full disk stays
    recognisable) and, as `reason`, the words without the path, for callers that name the file themselves."""
    err = kind(message)
    err.errno, err.reason = code, reason or message
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
