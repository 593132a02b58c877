"""One module per format. This one finds which reader an input needs."""

from __future__ import annotations

import os

from ..errors import UnknownFormatError, UsageError

RAW_SUFFIXES = (".raw", ".img")


def _readers():
    from . import qcow2, raw, vhd, vma, xva

    return {
        "xva": xva.XvaArchive,
        "vma": vma.VmaArchive,
        "raw": raw.RawArchive,
        "vhd": vhd.VhdArchive,
        "qcow2": qcow2.Qcow2Archive,
        "vhd-tar": vhd.VhdTarArchive,
    }


ALIASES = {"vpc": "vhd"}  # qemu-img's name for VHD


def reader_for(fmt: str):
    readers = _readers()
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in readers:
        raise UsageError(f"unknown input format {fmt!r} (known: {', '.join(sorted(readers))})")
    return readers[fmt]


def detect(source, path_hint=None) -> str:
    """The format of a source from its first bytes (never guesses raw from content)."""
    from . import qcow2, vhd, vma, xva

    head = source.peek(4096)
    if xva.probe(head):
        return "xva"
    if vma.probe(head):
        return "vma"
    if qcow2.probe(head):
        return "qcow2"
    if vhd.probe(head):
        return "vhd"
    if vhd.probe_tar(head):
        return "vhd-tar"
    if source.seekable and source.file_size >= vhd.FOOTER - 1:  # fixed VHD: footer at the end
        tail = source.pread(vhd.FOOTER, max(0, source.file_size - vhd.FOOTER), "VHD footer")
        if vhd.probe_tail(tail):
            return "vhd"
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
