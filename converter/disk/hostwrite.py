"""A full build's files written into the root filesystem on the host by debugfs, not by the appliance's tar.

Under TCG the appliance's GNU tar unpacks a few MB a second (the Debian fixture's 163 MB took 19 s, longer than
the appliance's start); e2fsprogs' ``debugfs`` writes the same files into the same empty filesystem on the host,
as any user may, in a few seconds. The commands are an incremental rebuild's (:mod:`converter.disk.increment`)
with an empty base: every entry of the flattened image, then imgconv's own files, then owners, modes, times,
xattrs and link counts, then each directory's time as the image gives it.

What debugfs cannot be given as a full build's tar gives it (a name with a double quote, a control character or
bytes that are not UTF-8, an xattr name with a space, a time before 1970 or past 2106, a device number past
4095:65535) raises :class:`converter.disk.increment.FullBuild`, and the build unpacks in the appliance as it
always did, saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from converter.boot.kernel import Kernel
from converter.disk.increment import Collect, Delta, FullBuild, check_names, script
from converter.disk.reproducible import debugfs_script
from converter.disk.rootfs import Additions, ApplianceSink, GuestFile, ImageTree, check_tree, imgconv_entries
from converter.errors import ToolError
from converter.oci.flatten import FlatTree, LayerTap, flatten
from converter.oci.image import Image

__all__ = ["Collect", "FullBuild", "collect_image", "collect_imgconv", "write_files"]

# Directories a fresh filesystem from make_ext4 already has.
FRESH_DIRS = frozenset({"", "lost+found"})
# What debugfs says when the filesystem is full (blocks or inodes).
FULL = ("Could not allocate", "No free space", "Ran out of")


def collect_image(image: Image, spool: Path, on_bytes: Callable[[int], None],
                  tap: LayerTap | None) -> tuple[ImageTree, Collect]:
    """The image's layers flattened (one pass: *tap* records tar-split as the appliance's stream does), each
    regular file's contents spooled under *spool* (named by number: nothing of an entry but its bytes)."""
    files = Collect(spool / "image")
    sink = ApplianceSink(files, escape=False)
    tree = flatten(image.layer_inputs(), sink, on_bytes, tap)
    check_tree(tree)
    check_names(entry.info.name.strip("/") for entry in files.entries)
    return ImageTree(tree, sink.kernel_releases()), files


def collect_imgconv(tree: FlatTree, guest_files: list[GuestFile], kernel: Kernel, modules: bool,
                    origin: Callable[[Additions], bytes], spool: Path, epoch: int) -> tuple[Additions, Collect]:
    """imgconv's files (the same entries the appliance's second stream holds, less the directory headers GNU tar
    needs to keep the image's times)."""
    files = Collect(spool / "imgconv")
    added = imgconv_entries(tree, guest_files, kernel, modules, origin, files, epoch)
    check_names(entry.info.name.strip("/") for entry in files.entries)
    return added, files


def write_files(device: str, tree: FlatTree, parts: list[Collect], spool: Path, scratch: Path,
                epoch: int) -> None:
    """Every collected entry into the empty filesystem *device* in one debugfs run."""
    change = Delta(tree, set(FRESH_DIRS), written=[entry for part in parts for entry in part.entries])
    held = spool / "attributes"
    held.mkdir(parents=True, exist_ok=True)
    commands = script(change, held)
    try:
        debugfs_script(device, commands, scratch, epoch, "write the image's files", output=False)
    except ToolError as exc:
        if any(word in str(exc) for word in FULL):
            raise ToolError("the disk is too small for the image's files; pass a larger --size") from exc
        raise
