"""imgconv: convert OCI container images to bootable VM disks, and VM disks back to OCI images."""

__version__ = "0.1.0"
