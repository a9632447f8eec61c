"""Everything that runs inside the guest, or runs the guest: init, initramfs, qemu, console."""
