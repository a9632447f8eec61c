"""``store:NAME[:TAG]`` and ``store:NAME@sha256:HEX``: which version of the store a command means.

NAME and TAG follow Docker's grammar for a repository path and a tag (distribution/reference), without a
registry host: a user who knows ``docker tag`` knows what is allowed, and every name maps to a file name in the
store without escaping (no ``:``, ``+``, uppercase or leading ``.`` can occur in one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from converter.errors import ReferenceError_

PREFIX = "store:"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
MAX_NAME = 255  # Docker's limit for a repository name

FORMS = "store:NAME[:TAG] or store:NAME@sha256:DIGEST"


@dataclass(frozen=True)
class StoreRef:
    """A tag of the store (``digest`` None), or one version of NAME by its sha256."""

    name: str
    tag: str = DEFAULT_TAG
    digest: str | None = None  # "sha256:HEX": a version rather than what a tag points at

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}@{self.digest}" if self.digest else f"{PREFIX}{self.name}:{self.tag}"


def is_store_ref(text: str) -> bool:
    """True if *text* names the store (a disk file called that is given as ./store:...)."""
    return text.startswith(PREFIX)


def parse_store_ref(text: str, *, prefixed: bool = True, digest_ok: bool = True) -> StoreRef:
    """*text* as a store reference; with *prefixed* False the ``store:`` is optional (the ``store`` commands).
    Raise ReferenceError_ (exit 2) naming what is wrong."""
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    if prefixed and not text.startswith(PREFIX):
        raise ReferenceError_(f"{_short(text)} is not a store reference ({FORMS})")
    if not body:
        raise ReferenceError_(f"store reference {_short(text)} has no name ({FORMS})")
    name, at, digest = body.partition("@")
    if at:
        if not digest_ok:
            raise ReferenceError_(f"store reference {_short(text)}: a version by digest cannot be written; "
                                  "give a TAG")
        if not DIGEST_RE.fullmatch(digest):
            raise ReferenceError_(f"store reference {_short(text)}: the digest must be sha256: and 64 lowercase "
                                  "hex digits")
        return StoreRef(_check_name(name, text), DEFAULT_TAG, digest)
    name, colon, tag = name.partition(":")
    if colon and not TAG_RE.fullmatch(tag):
        raise ReferenceError_(f"store reference {_short(text)}: invalid tag {_short(tag)} (letters, digits, '_', "
                              "'.', '-', at most 128, not starting with '.' or '-')")
    return StoreRef(_check_name(name, text), tag if colon else DEFAULT_TAG)


def _short(text: str) -> str:
    """Quoted, and cut so that the whole message stays one readable line."""
    return repr(text if len(text) <= 80 else text[:60] + "...")


def _check_name(name: str, text: str) -> str:
    if not name:
        raise ReferenceError_(f"store reference {_short(text)} has no name ({FORMS})")
    if len(name) > MAX_NAME:
        raise ReferenceError_(f"store reference {_short(text)}: invalid name, {len(name)} characters long "
                              f"(at most {MAX_NAME})")
    if not NAME_RE.fullmatch(name):
        raise ReferenceError_(f"store reference {_short(text)}: invalid name {_short(name)} (lowercase letters "
                              "and digits, separated by '.', '_', '__', '-' or '/', as a Docker repository)")
    return name
