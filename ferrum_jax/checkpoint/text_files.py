"""The user's own files around a model: prompt files, chat templates, JSONL requests and
results, report paths.

Only regular files are read where a file is meant: a FIFO, `/dev/stdout` behind a pipe or a
terminal would block the read forever, and `/dev/zero` never ends. Reads stop at
`TEXT_FILE_LIMIT`. Every refusal is one `invalid_parameter` error naming the flag, so the
CLI reports it as an argument error before any weight loads.
"""

from __future__ import annotations

import os
import pathlib
import stat
from typing import BinaryIO

from ferrum_jax.choices import TEXT_FILE_LIMIT
from ferrum_jax.errors import FerrumError


def _refuse(flag: str, path: str | os.PathLike[str], problem: str) -> FerrumError:
    return FerrumError.invalid_parameter(f"{flag} {path}: {problem}")


def open_regular(path: str | os.PathLike[str], flag: str) -> BinaryIO:
    """`path` opened for binary reading once it is known to be a regular file."""
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _refuse(flag, path, "no such file") from None
    except OSError as e:
        raise _refuse(flag, path, f"cannot read it ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _refuse(flag, path, "is a directory" if stat.S_ISDIR(mode) else "not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_text_file(path: str | os.PathLike[str], flag: str) -> str:
    """The UTF-8 text of the regular file `path`, at most `TEXT_FILE_LIMIT` bytes."""
    with open_regular(path, flag) as f:
        data = f.read(TEXT_FILE_LIMIT + 1)
    if len(data) > TEXT_FILE_LIMIT:
        raise _refuse(flag, path, f"larger than the {TEXT_FILE_LIMIT // 2**20} MiB limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(flag, path, "not UTF-8 text") from None


def check_output(path: str | os.PathLike[str], flag: str) -> bool:
    """Refuses an output path that could not be written (checked before any work, so a long
    run never ends on an unwritable path). Returns whether the file already exists."""
    path = pathlib.Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise _refuse(flag, path, f"its folder {parent} does not exist") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _refuse(flag, path, f"cannot create files in {parent}") from None
        return False
    except OSError as e:
        raise _refuse(flag, path, f"cannot use it ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise _refuse(flag, path, "is a directory")
    if not stat.S_ISREG(mode):
        raise _refuse(flag, path, "not a regular file")
    if not os.access(path, os.W_OK):
        raise _refuse(flag, path, "not writable")
    return True


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether `a` and `b` are one file: by device and inode, so hard links and symlinks
    count as the same file (comparing resolved paths misses hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False
