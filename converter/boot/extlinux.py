"""BIOS boot with extlinux: the typed boot entry, its configuration text, and its installation in a disk.

The entry (kernel, initramfs, command line) is recorded in the sidecar, so tools that boot the same kernel
directly (``make bench``) read it instead of parsing the configuration back.
"""

from __future__ import annotations

import re
from pathlib import Path

from converter.disk.appliance import Appliance
from converter.errors import ImageError
from converter.guest import BOOT_DIR, RESERVED
from converter.records import BootEntry

DEVICE = "/dev/sda"
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MBR_CODE_BYTES = 440  # the rest of the first sector is the partition table

# Anything written into a bootloader configuration or a kernel command line: no whitespace (it would
# start another parameter) and no control characters (another line of the configuration).
_SAFE_WORD = re.compile(r"[^\s\x00-\x1f\x7f]+")


def boot_word(value: str, what: str) -> str:
    """*value* as one word of a bootloader configuration; refused if it could be read as more."""
    if not _SAFE_WORD.fullmatch(value):
        raise ImageError(f"{what} {value!r} cannot be written into a boot configuration "
                         "(whitespace or control characters)")
    return value


def boot_entry(kernel_path: str, initrd_path: str, uuid: str) -> BootEntry:
    # quiet + loglevel=1: only the workload's own output and panics reach the console. no_timer_check: under
    # TCG on a busy host the kernel's check of the IO-APIC timer can miss its ticks and panic
    # ("setup_IO_APIC"); a VM's timer is emulated and needs no check (cloud images pass it too).
    cmdline = (f"root=UUID={boot_word(uuid, 'the filesystem UUID')} rw console=tty0 console=ttyS0 "
               f"init=/{RESERVED}/init quiet loglevel=1 panic=5 no_timer_check")
    return BootEntry(f"/{boot_word(kernel_path, 'the kernel path')}",
                     f"/{boot_word(initrd_path, 'the initramfs path')}", cmdline)


def extlinux_conf(entry: BootEntry) -> str:
    return (
        "# Written by imgconv: boots the container's entrypoint.\n"
        "DEFAULT imgconv\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL imgconv\n  LINUX {entry.kernel}\n  INITRD {entry.initrd}\n  APPEND {entry.cmdline}\n"
    )


def install_extlinux(app: Appliance) -> None:
    """extlinux's boot sector in the partition and ldlinux.sys beside where its configuration will be: the one
    thing that needs the filesystem mounted (extlinux records where ldlinux.sys's blocks are). The configuration,
    the kernel and the MBR code are written on the host afterwards (:func:`extlinux_files`)."""
    app.call("install extlinux", app.g.extlinux, f"/{BOOT_DIR}")


def extlinux_files(entry: BootEntry, scratch: Path) -> tuple[str, Path]:
    """The configuration file, as (guest path, host file)."""
    conf = scratch / "extlinux.conf"
    conf.write_text(extlinux_conf(entry))
    return f"{BOOT_DIR}/extlinux.conf", conf
