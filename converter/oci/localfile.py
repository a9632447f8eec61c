"""Opening the files a local transport reads (archives, layout blobs, index.json): regular files only.

An image is untrusted input, and so is where it points: a FIFO in its place would block `open()` until
some writer appeared (for ever, in practice), and a device would stream without end. The file is
therefore opened without blocking and checked through the descriptor it was opened as (no window
between a check and the open), and only then read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


class NotRegularFile(OSError):
    """What should be a regular file is a FIFO, a device or a socket (``strerror`` says which)."""


def open_regular(path: Path) -> BinaryIO:
    """*path* opened for reading, symlinks followed, if it is a regular file.

    Raises what ``open()`` raises (``FileNotFoundError``, ``PermissionError``...), ``IsADirectoryError``
    for a directory, and :class:`NotRegularFile` for anything else that is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode))
            reason = f"it is {kind}, not a regular file" if kind else "it is not a regular file"
            raise NotRegularFile(errno.EINVAL, reason, str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_user_file(path: Path, limit: int, what: str) -> bytes:
    """A small file the user named on the command line (an --env-file, an --ssh-key), read whole up to *limit*
    bytes; a pipe is fine there (``--env-file <(...)``), unlike for an image's files. One-line usage errors."""
    from converter.errors import UsageError

    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes")
    return data
