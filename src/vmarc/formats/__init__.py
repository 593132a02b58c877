"""The format registry: one line per format module, nothing else to edit to add one
(qemu's BlockDriver list, in short). Each module's READERS maps the names it answers
to (-f NAME) to its Archive classes, and each class declares what it is: probe() and
probe_tail() (detection), access (STREAM, SCAN, RANDOM), layered, needs_file().

Modules are imported by name when first needed, so that the registry imports none of
them and a format module may use the registry (a qcow2 opens its backing file here).
"""

from __future__ import annotations

import importlib
import os

from ..errors import UnknownFormatError, UsageError
from ..io.source import as_file, open_source
from ..model import Archive

# detection tries the formats in this order; raw is never found by content
MODULES = ("xva", "vma", "ova", "qcow2", "vhd", "vmdk", "vhdx", "vhddir", "xo", "raw")

RAW_SUFFIXES = (".raw", ".img")
ALIASES = {"vpc": "vhd"}  # qemu-img's name for VHD
_READERS: dict[str, type[Archive]] = {}


def readers() -> dict[str, type[Archive]]:
    """Every reader by name, in detection order."""
    if not _READERS:
        for name in MODULES:
            _READERS.update(importlib.import_module(f".{name}", __name__).READERS)
    return _READERS


def reader_for(fmt: str) -> type[Archive]:
    found = readers()
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in found:
        raise UsageError(f"unknown input format {fmt!r} (known: {', '.join(sorted(found))})")
    return found[fmt]


def name_of(archive: Archive) -> str:
    """The registry name an opened archive was read with (-f NAME opens it again)."""
    return next(k for k, cls in readers().items() if type(archive) is cls)


def detect(source, path_hint=None) -> str:
    """The format of a source from its first bytes (never guesses raw from content)."""
    head = source.peek(4096)
    found = readers()
    for name, cls in found.items():
        if cls.probe(head):
            return name
    if source.seekable and source.file_size >= 511:  # a footer at the end (fixed VHD)
        tail = source.pread(512, max(0, source.file_size - 512), "the input's last sector")
        for name, cls in found.items():
            if cls.probe_tail(tail):
                return name
    if (
        path_hint is not None
        and os.fspath(path_hint).lower().endswith(RAW_SUFFIXES)
        and source.compression is None
    ):
        return "raw"
    if not head:
        raise UnknownFormatError(
            f"{source.name}: empty input"
            + (f" after {source.compression} decompression" if source.compression else "")
        )
    shown = head[:16].hex(" ")
    comp = f" ({source.compression}-compressed)" if source.compression else ""
    raise UnknownFormatError(
        f"{source.name}{comp}: not an archive or disk image vmarc knows "
        f"(first bytes: {shown}); raw disks need -f raw"
    )


def open_archive(
    src,
    fmt: str | None = None,
    *,
    name: str | None = None,  # noqa: A001
    parent: str | None = None,
    no_backing: bool = False,
    unsized: bool = False,
) -> Archive:
    """Open a path, a URL, "-" (stdin) or a binary stream; the format is found by content
    (raw only by fmt="raw" or a .raw/.img name), compression by magic. Two things are
    known by what they are instead: a directory is a Xen Orchestra VHD directory, and a
    .json file is Xen Orchestra's backup metadata (encrypted, it has no telling bytes). parent replaces a
    differencing VHD's parent locators or a qcow2's backing file name (and may then be
    raw); no_backing reads the top layer alone. unsized: the caller (a raw output) takes a
    disk whose size is None until its stream ends (a fixed VHD from a pipe) rather than a
    copy of the input in a temporary file."""
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):  # Xen Orchestra's VHD
        if fmt not in (None, "vhd", "vhddir"):
            raise UsageError(f"{src}: a directory is read only as a VHD directory")
        layer = reader_for("vhddir")
        return layer.open_path(os.fspath(src), parent=parent, no_backing=no_backing)
    if fmt is None and isinstance(src, (str, os.PathLike)) and os.fspath(src).endswith(".json"):
        fmt = "xo"  # the only JSON vmarc reads (and encrypted, it has no telling first bytes)
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
        if layers and not reader.layered:
            raise UsageError(
                f"{source.name}: --parent and --no-backing apply to differencing "
                f"VHDs and qcow2 overlays, this is {reader.format}"
            )
        return reader(source, **layers)
    except BaseException:
        source.close()
        raise
