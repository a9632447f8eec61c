"""SOURCE_DATE_EPOCH (reproducible-builds.org): the one place imgconv reads it, and how it prints times.

A value that is not a whole number of seconds is a usage error, never silently "now": a build
asked to be reproducible must not quietly stop being so.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from converter.errors import UsageError

# 9999-12-31T23:59:59Z: the last second a timestamp (and a tar or JSON date) can be written as.
_LATEST = 253402300799


def source_date_epoch(default: int | None = None) -> int | None:
    """SOURCE_DATE_EPOCH as seconds, or *default* when it is unset or empty."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return default
    shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if not value.isascii() or not value.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH must be a number of seconds, not {shown}")
    if len(value) > len(str(_LATEST)) or int(value) > _LATEST:  # (int() refuses 4300 digits and more)
        raise UsageError(f"SOURCE_DATE_EPOCH {shown} is after the year 9999")
    return int(value)


def timestamp(epoch: int | None) -> str:
    """*epoch* (now when None) as an RFC 3339 UTC time to the second, as image configs write it."""
    moment = datetime.fromtimestamp(epoch, UTC) if epoch is not None else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
