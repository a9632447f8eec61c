"""Small programs `bench/run.py` times as subprocesses, so they pay the same Python start-up as the CLI.

    python bench/helpers.py flatten REF
        imgconv's flattener over every layer of REF, written to /dev/null; prints entries and bytes as JSON.
    python bench/helpers.py direct-boot DISK KERNEL INITRD APPEND
        converter.boot.qemu.boot with direct_kernel=(KERNEL, INITRD, APPEND): no firmware, no bootloader;
        exits with the workload's status, like `imgconv boot`.
    python bench/helpers.py firmware-boot DISK bios|uefi
        converter.boot.qemu.boot with firmware= SeaBIOS or OVMF, whatever the disk's partition table says (a
        `--firmware both` disk boots under either); exits with the workload's status.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def flatten_to_null(reference: str) -> int:
    from converter.oci.flatten import flatten
    from converter.oci.reference import parse_reference
    from converter.oci.tarutil import open_output
    from converter.oci.transport import open_image

    with open_image(parse_reference(reference)) as image, open(os.devnull, "wb") as sink:
        tar = open_output(sink)
        tree = flatten(image.layer_inputs(), tar)
        tar.close()
    print(json.dumps({"entries": tree.entries, "content_bytes": tree.content_bytes}))
    return 0


def direct_boot(disk: str, kernel: str, initrd: str, append: str) -> int:
    from converter.boot.qemu import boot

    result = boot(Path(disk), timeout=math.inf, verbose=False, stdout=sys.stdout.buffer, stderr=sys.stderr,
                  direct_kernel=(Path(kernel), Path(initrd), append))
    if result.message:
        print(result.message, file=sys.stderr)
    return result.status


def firmware_boot(disk: str, firmware: str) -> int:
    """`imgconv boot DISK` with the firmware forced (the CLI takes it from the disk): a `--firmware both` disk
    boots the same kernel, initramfs and command line under either, so the two runs differ by the firmware only."""
    from converter.boot.qemu import boot
    from converter.disk.uefi import Firmware

    result = boot(Path(disk), timeout=math.inf, verbose=False, stdout=sys.stdout.buffer, stderr=sys.stderr,
                  firmware=Firmware(firmware))
    if result.message:
        print(result.message, file=sys.stderr)
    return result.status


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "flatten":
        return flatten_to_null(argv[1])
    if len(argv) == 5 and argv[0] == "direct-boot":
        return direct_boot(*argv[1:])
    if len(argv) == 3 and argv[0] == "firmware-boot" and argv[2] in ("bios", "uefi"):
        return firmware_boot(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
