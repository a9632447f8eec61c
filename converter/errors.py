"""The one exception family imgconv raises, and the exit codes the CLI maps it to.

Only ``cli.py`` prints errors and exits; everything else raises an ``ImgconvError``
subclass whose message is one line a user can act on.
"""

from __future__ import annotations

# Exit codes, documented in the README. ``imgconv boot`` returns the workload's own code instead.
EXIT_OK = 0
EXIT_USAGE = 2  # bad input: a malformed reference, a missing file, an image that is not what it claims
EXIT_FAILED = 3  # the conversion itself failed (a tool failed, the disk filled up, the appliance died)
EXIT_MISSING_TOOL = 4  # a required program or package is not installed
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: nothing was left at the output


def one_line(text: str, limit: int = 400) -> str:
    """Collapse a possibly multi-line message (a tool's stderr, say) into one readable line."""
    flat = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(flat) <= limit:
        return flat
    # Keep both ends: what was being done comes first, and a tool's reason ("File name too long") last.
    half = (limit - 5) // 2
    return f"{flat[:half]} ... {flat[-half:]}"


class ImgconvError(Exception):
    """Root of every error imgconv reports to a user."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(ImgconvError):
    """The user asked for something that cannot work as asked (bad option, existing output...)."""

    exit_code = EXIT_USAGE


class ReferenceError_(UsageError):
    """An image reference that is not in any accepted form."""


class ImageError(UsageError):
    """The image itself is bad: malformed JSON, unknown media type, no matching platform..."""


class BlobError(ImageError):
    """A blob failed verification: wrong digest, wrong size, truncated, or missing."""


class LayerError(ImageError):
    """A layer's tar stream is unsafe or malformed (a path escaping the root, a bad header...)."""


class DiskError(UsageError):
    """A disk image that cannot be used as input (backing file, truncated, no operating system...)."""


class ToolError(ImgconvError):
    """An external program or library failed while doing its part of a conversion."""


class MissingToolError(ImgconvError):
    """A required program is not installed."""

    exit_code = EXIT_MISSING_TOOL


class Interrupted(ImgconvError):
    """The run was interrupted; raised so cleanup runs and the CLI exits with 130."""

    exit_code = EXIT_INTERRUPTED
