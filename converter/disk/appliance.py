"""The one module that talks to libguestfs.

libguestfs raises a bare ``RuntimeError`` carrying the daemon's message; every call goes
through :class:`Appliance`, which turns that into a :class:`ToolError` that says what imgconv
was doing. The appliance runs with no network, and is launched once per conversion.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from converter.errors import MissingToolError, ToolError, one_line

log = logging.getLogger("imgconv.appliance")

T = TypeVar("T")


def _guestfs_module() -> Any:
    try:
        import guestfs
    except ImportError:
        raise MissingToolError(
            "the libguestfs Python bindings are required to read and write disk images "
            "(Debian package: python3-guestfs; a virtualenv needs --system-site-packages)"
        ) from None
    return guestfs


class Appliance:
    """A launched libguestfs handle. Use :func:`launch`; every method names the work it does."""

    def __init__(self, handle: Any) -> None:
        self.g = handle

    def call(self, doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise ToolError(f"libguestfs failed to {doing}: {one_line(str(exc), 300)}") from None

    def shutdown(self) -> None:
        """Flush and stop the appliance; its failure means the disk may be incomplete."""
        try:
            self.g.shutdown()
        except RuntimeError as exc:
            raise ToolError(f"the appliance failed to shut down cleanly; the disk may be incomplete: {exc}") from None
        finally:
            self.g.close()


def _configure_accel(handle: Any) -> None:
    """KVM when it really works here, TCG otherwise (qemu aborts under KVM on some hosts)."""
    from converter.boot.accel import configure_guestfs

    configure_guestfs(handle)


@contextmanager
def launch(
    drives: list[tuple[Path, str, bool]],
    *,
    memory_mib: int = 768,
) -> Iterator[Appliance]:
    """Launch one appliance with *drives* (path, format, readonly) attached, formats always explicit.

    On leaving the block normally the appliance is shut down and its errors are raised; on an
    error it is killed without waiting (the output is thrown away anyway).
    """
    guestfs = _guestfs_module()
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    handle = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    appliance = Appliance(handle)
    try:
        _configure_accel(handle)
        appliance.call("set the appliance memory", handle.set_memsize, memory_mib)
        appliance.call("disable the appliance network", handle.set_network, False)
        for path, fmt, readonly in drives:
            appliance.call(
                f"attach {path}", handle.add_drive_opts, str(path), format=fmt, readonly=readonly,
                cachemode="unsafe" if not readonly else "writeback",
            )
        appliance.call("launch the appliance (qemu)", handle.launch)
    except BaseException:
        handle.close()
        raise
    try:
        yield appliance
    except BaseException:
        with suppress(RuntimeError):
            handle.close()
        raise
    appliance.shutdown()
