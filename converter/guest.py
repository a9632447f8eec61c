"""Where things live inside a guest disk: one set of names for the verbs that write disks and those that read them.

oci-to-qcow2 puts everything of its own under :data:`RESERVED` (and records each added path in
:data:`ORIGIN`), vm-to-oci takes exactly that out again; both agree on which directories a running system
fills itself.
"""

from __future__ import annotations

RESERVED = ".imgconv"  # imgconv's own files in a disk it made; an image may not contain it
BOOT_DIR = f"{RESERVED}/boot"  # kernel, initramfs and bootloader configuration
ORIGIN = f"{RESERVED}/origin.json"  # where the disk came from and what imgconv added
ROOT_LABEL = "imgconv-root"

# imgconv's guest init mounts devtmpfs, proc and sysfs here: they must be directories of the image.
MOUNTED_BY_INIT = ("dev", "proc", "sys")
# What a running system fills by itself: a foreign disk's copies are left out of an exported image
# (the directories themselves are kept, empty).
RUNTIME_DIRS = (*MOUNTED_BY_INIT, "run", "tmp")
# A VM's kernel, initramfs and modules: left out of an exported image unless --keep-boot.
BOOT_TREES = ("boot", "lib/modules", "usr/lib/modules")
