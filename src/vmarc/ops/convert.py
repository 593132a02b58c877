"""convert: one disk of an archive to a disk image, in one streaming pass."""

from __future__ import annotations

from ..errors import UsageError
from ..formats.raw import RawWriter
from ..model import Archive, Checks
from ..output import OutputFile
from ..progress import Progress

OUTPUT_FORMATS = ("raw",)


def convert(archive: Archive, output: str, out_format: str = "raw", disk: str | None = None,
            verify: bool = True, progress: bool = False, sync: bool = True):
    """Write one disk of archive to output ("-" for stdout). Returns the Disk written."""
    if out_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {out_format!r} (known: {', '.join(OUTPUT_FORMATS)})")
    chosen = archive.select(disk)
    out = OutputFile(output)
    bar = Progress(archive.source, progress, label=chosen.describe())
    try:
        writer = RawWriter(out, chosen.size)
        for _disk, offset, data in archive.stream([chosen], Checks(), verify=verify):
            writer.write(offset, data)
            bar.update()
        writer.finish()
        out.commit(sync=sync)
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
    return chosen
