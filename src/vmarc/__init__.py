"""vmarc: read, verify, convert and create VM backup archives and disk images.

    import vmarc
    with vmarc.open("backup.xva.gz") as archive:
        print(archive.vm, [d.id for d in archive.disks])
        for disk, offset, data in archive.stream():
            ...  # data is a memoryview valid until the next item

Everything an archive holds is an Archive of Disks (see vmarc.model).
"""

from __future__ import annotations

import os

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
from .formats import detect, reader_for
from .io.source import as_file, open_source
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


def open(
    src,
    fmt: str | None = None,
    *,
    name: str | None = None,  # noqa: A001
    parent: str | None = None,
    no_backing: bool = False,
    unsized: bool = False,
) -> Archive:
    """Open a path, "-" (stdin) or a binary stream; the format is found by content
    (raw only by fmt="raw" or a .raw/.img name), compression by magic. parent replaces a
    differencing VHD's parent locators or a qcow2's backing file name (and may then be
    raw); no_backing reads the top layer alone. unsized: the caller (a raw output) takes a
    disk whose size is None until its stream ends (a fixed VHD from a pipe) rather than a
    copy of the input in a temporary file."""
    source = open_source(src, name=name)
    try:
        if fmt is None:
            fmt = detect(source, path_hint=src if isinstance(src, (str, os.PathLike)) else None)
        reader = reader_for(fmt)
        if not source.seekable:
            why = reader.needs_file(source.peek(512), unsized, parent)
            if why:
                source = as_file(source, why)
        layers = {k: v for k, v in (("parent", parent), ("no_backing", no_backing)) if v}
        if layers and reader.format not in ("vhd", "qcow2"):
            raise UsageError(
                f"{source.name}: --parent and --no-backing apply to differencing "
                f"VHDs and qcow2 overlays, this is {reader.format}"
            )
        return reader(source, **layers)
    except BaseException:
        source.close()
        raise
