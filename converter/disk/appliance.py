"""The one module that talks to libguestfs.

libguestfs raises a bare ``RuntimeError`` carrying the daemon's message; every call goes
through :class:`Appliance`, which turns that into a :class:`ToolError` that says what imgconv
was doing. The appliance runs with no network, and is launched once per conversion.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from converter.disk.safety import backing_free_overlay
from converter.errors import MissingToolError, ToolError, one_line

log = logging.getLogger("imgconv.appliance")

T = TypeVar("T")


def _guestfs_module() -> Any:
    try:
        import guestfs
    except ImportError as exc:
        raise MissingToolError(
            "the libguestfs Python bindings are required to read and write disk images "
            "(Debian package: python3-guestfs; a virtualenv needs --system-site-packages)"
        ) from exc
    return guestfs


@dataclass(frozen=True)
class Drive:
    """A disk to attach, its format always explicit. A read-only drive is untrusted: *identity* (st_dev, st_ino
    of the file :func:`~converter.disk.safety.open_disk` checked) makes sure the appliance gets that very file."""

    path: Path
    format: str
    readonly: bool
    identity: tuple[int, int] | None = None


class Appliance:
    """A launched libguestfs handle. Use :func:`launch`; every method names the work it does."""

    def __init__(self, handle: Any) -> None:
        self.g = handle

    def call(self, doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise ToolError(f"libguestfs failed to {doing}: {one_line(str(exc), 300)}") from exc

    def attach(self, drive: Drive, pins: ExitStack) -> None:
        """Add a drive before launch; a read-only one through a backing-free overlay held open by *pins*."""
        attached, attached_fmt = drive.path, drive.format
        if drive.readonly:
            scratch = Path(pins.enter_context(tempfile.TemporaryDirectory(prefix="imgconv-attach-")))
            overlay = backing_free_overlay(drive.path, drive.format, scratch, drive.identity)
            attached, attached_fmt = pins.enter_context(overlay), "qcow2"
        self.call(f"attach {drive.path}", self.g.add_drive_opts, str(attached), format=attached_fmt,
                  readonly=drive.readonly, cachemode="unsafe" if not drive.readonly else "writeback")

    def shutdown(self) -> None:
        """Flush and stop the appliance; its failure means the disk may be incomplete."""
        try:
            self.g.shutdown()
        except RuntimeError as exc:
            raise ToolError(f"the appliance failed to shut down cleanly; the disk may be incomplete: {exc}") from exc
        finally:
            self.g.close()


def _configure_accel(handle: Any) -> None:
    """KVM when it really works here, TCG otherwise (qemu aborts under KVM on some hosts)."""
    from converter.boot.accel import configure_guestfs

    configure_guestfs(handle)


@contextmanager
def launch(
    drives: list[Drive],
    *,
    memory_mib: int = 768,
) -> Iterator[Appliance]:
    """Launch one appliance with *drives* (path, format, readonly) attached, formats always explicit.

    A read-only drive is an untrusted disk: it is attached through
    :func:`~converter.disk.safety.backing_free_overlay`, so that the appliance's qemu opens that file in that
    format and nothing it names, even if it was rewritten since it was checked.

    On leaving the block normally the appliance is shut down and its errors are raised; on an
    error it is killed without waiting (the output is thrown away anyway).
    """
    guestfs = _guestfs_module()
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    with ExitStack() as pins:  # released after the appliance is gone
        handle = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        appliance = Appliance(handle)
        try:
            _configure_accel(handle)
            appliance.call("set the appliance memory", handle.set_memsize, memory_mib)
            appliance.call("disable the appliance network", handle.set_network, False)
            for drive in drives:
                appliance.attach(drive, pins)
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
