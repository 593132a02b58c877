"""vmarc: read, verify, convert and create VM backup archives and disk images.

    import vmarc
    with vmarc.open("backup.xva.gz") as archive:
        print(archive.vm, [d.id for d in archive.disks])
        for disk, offset, data in archive.stream():
            ...  # data is a memoryview valid until the next item

Everything an archive holds is an Archive of Disks (see vmarc.model).
"""

from __future__ import annotations

from .errors import (
    CorruptError,
    FormatError,
    IntegrityError,
    OutputError,
    SalvagedError,
    SourceError,
    TruncatedError,
    UnknownFormatError,
    UnsupportedError,
    UsageError,
    VmarcError,
)
from .formats import open_archive
from .model import Archive, Checks, Damage, Disk

__all__ = [
    "open",
    "Archive",
    "Disk",
    "Damage",
    "Checks",
    "VmarcError",
    "UsageError",
    "SourceError",
    "OutputError",
    "UnknownFormatError",
    "UnsupportedError",
    "CorruptError",
    "FormatError",
    "TruncatedError",
    "IntegrityError",
    "SalvagedError",
]
__version__ = "0.1.0"


def open(src, fmt: str | None = None, **kwargs) -> Archive:  # noqa: A001
    """Open a path, "-" (stdin) or a binary stream as an Archive (formats.open_archive
    says how; keywords: name, parent, no_backing, unsized)."""
    return open_archive(src, fmt, **kwargs)
