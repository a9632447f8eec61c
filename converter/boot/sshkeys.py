"""``imgconv boot --ssh-key FILE [--ssh-user USER]``: a way in to a system-mode guest, given at boot.

The keys go to the guest as the QEMU firmware config file ``opt/imgconv/ssh`` (the user on the first line, then
the ``authorized_keys`` lines), never into the disk: imgconv's init adds them to that user's
``~/.ssh/authorized_keys`` on the run's writable layer before the image's init system starts (``init/system.h``),
so one read-only disk serves every developer, each with their own key. A container-mode guest has no sshd to use
them: its init refuses the option in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UsageError
from converter.oci.localfile import read_user_file

SSH_FW_CFG = "opt/imgconv/ssh"  # read by init/system.h
MAX_KEYS = 256 * 1024  # init/system.h's limit
# An authorized_keys line: optional options, then a key type (ssh-ed25519, ecdsa-sha2-nistp256, sk-..., ssh-rsa...).
_KEY_TYPE = rb"(?:ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)"
_KEY_LINE = re.compile(rb"(?:\S+\s+)?" + _KEY_TYPE + rb"\s+[A-Za-z0-9+/=]+(?:\s.*)?")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10}")


@dataclass(frozen=True)
class SshAccess:
    user: str
    keys: bytes  # authorized_keys lines, each ending with a newline

    def fw_cfg(self) -> bytes:
        return self.user.encode() + b"\n" + self.keys


def read_ssh_access(path: Path, user: str) -> SshAccess:
    """The public keys in *path* for *user*; refused in one line: a private key, no key, a file too large."""
    if not _USER.fullmatch(user):
        raise UsageError(f"--ssh-user {user!r} is not a user name or uid")
    data = read_user_file(path, MAX_KEYS, "--ssh-key")
    if b"PRIVATE KEY" in data:
        raise UsageError(f"--ssh-key {path} is a private key; give the public one ({path}.pub)")
    lines = [line.strip() for line in data.splitlines() if line.strip() and not line.startswith(b"#")]
    if not lines or not all(_KEY_LINE.fullmatch(line) for line in lines):
        raise UsageError(f"--ssh-key {path} holds no public key in authorized_keys form (ssh-ed25519 AAAA...)")
    return SshAccess(user, b"".join(line + b"\n" for line in lines))
