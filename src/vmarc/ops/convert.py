"""convert: one disk of an archive or image to a disk image, in one streaming pass."""

from __future__ import annotations

import os
import tempfile

from ..errors import OutputError, UsageError
from ..formats.qcow2 import Qcow2Writer
from ..formats.raw import READ_SIZE, RawWriter
from ..formats.vhd import SECTOR, VhdWriter, allocated_blocks
from ..io.output import OutputFile, pwrite_all, temp_writes, write_all, writing
from ..model import RANDOM, Archive, Checks, Disk
from ..notices import notice
from .damage import checks_for, report_path, summary, warn_elsewhere, write_report
from .progress import Progress

OUTPUT_FORMATS = ("raw", "qcow2", "vhd", "vmdk")

SUBFORMATS = ("dynamic", "fixed")


def parse_options(text: str | None) -> dict[str, str]:
    """qemu-img style -o key=value,key=value."""
    opts = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"-o {item}: expected key=value")
        opts[key.strip()] = value.strip()
    return opts


def _writer(out_format: str, out: OutputFile, size: int, opts: dict, allocated=None):
    if out_format == "raw":
        return RawWriter(out, size)
    if out_format == "qcow2":
        return Qcow2Writer(out, size)
    if out_format == "vmdk":  # streamOptimized: written front to back, to a file or a pipe
        from ..formats.vmdk import VmdkWriter

        name = "disk.vmdk" if out.path == "-" else os.path.basename(out.path)
        at_end = None
        if out.device_size is not None:

            def at_end(tail, written):
                at = out.device_size - len(tail)
                if at == written - len(tail):
                    return  # the image fills the device: its footer is already there
                if at < written:  # the copy would land on the image's own end
                    raise OutputError(
                        f"{out.path}: the device holds {out.device_size} bytes; the VMDK "
                        f"needs {written} and 1.5 KiB more for its footer copy at the end"
                    )
                pwrite_all(out.fd, tail, at)

        return VmdkWriter(lambda data: write_all(out.fd, data), size, name, at_end=at_end)
    sub = opts.get("subformat", "dynamic")
    if sub not in SUBFORMATS:
        raise UsageError(f"-o subformat={sub}: VHD subformats are {', '.join(SUBFORMATS)}")
    return VhdWriter(out, -(-size // SECTOR) * SECTOR, sub, allocated)


def needs_order(out_format: str, opts: dict, to_stdout: bool) -> bool:
    """Writers that need each disk's pieces in ascending order."""
    if out_format == "vhd":
        return to_stdout or opts.get("subformat", "dynamic") == "dynamic"
    return to_stdout or out_format == "vmdk"


def spooled(pieces, disk: Disk):
    """Pieces that came out of order, written to a sparse temporary file and read back in
    order (said on stderr: it costs disk space up to the data's size)."""
    notice(
        f"{disk.describe()}: the source is not in disk order; spooling it to a "
        f"temporary file in {tempfile.gettempdir()}"
    )
    with temp_writes():
        tmp = tempfile.TemporaryFile(prefix="vmarc-spool-")
    with tmp:
        fd = tmp.fileno()
        for _d, offset, data in pieces:
            with temp_writes():
                pwrite_all(fd, data, offset)
        with temp_writes():
            os.ftruncate(fd, disk.size)
        buf = memoryview(bytearray(READ_SIZE))
        pos = 0
        while pos < disk.size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                return  # nothing but holes left
            while pos < hole:
                n = os.preadv(fd, [buf[: min(READ_SIZE, hole - pos)]], pos)
                yield disk, pos, buf[:n]
                pos += n


def _first_pass(archive: Archive, disk: Disk, verify: bool):
    """The disk's pieces for a writer's first pass: through the image's own tables when
    the format has them, reading only what they call data; else a streaming pass."""
    if archive.access != RANDOM or not archive.source.seekable or archive.compression:
        yield from archive.stream([disk], Checks(), verify=verify)
        return
    from ..access.views import ImageView  # only for this first pass

    yield from ImageView(disk, archive).stream(READ_SIZE)


def convert(
    archive: Archive,
    output: str,
    out_format: str = "raw",
    disk: str | None = None,
    verify: bool = True,
    progress: bool = False,
    sync: bool = True,
    options: dict | None = None,
    reopen=None,
    no_create: bool = False,
    target_is_zero: bool = False,
    salvage: bool = False,
    report: str | None = None,
    stats: dict | None = None,
):
    """Write one disk of archive to output ("-" for stdout; a device or an existing file
    is written in place: output.OutputFile). Returns the Disk written.

    Damage elsewhere in the archive leaves the disk intact (a warning); salvage writes
    what can be read of a damaged disk, a report, and raises SalvagedError (ops/damage).
    stats, if given, gets the data bytes written and the Checks (for --output json).

    reopen() gives a fresh Archive of the same source: a dynamic VHD streamed to stdout
    needs a first pass to know its allocated blocks.
    """
    if out_format not in OUTPUT_FORMATS:
        raise UsageError(
            f"unknown output format {out_format!r} (known: {', '.join(OUTPUT_FORMATS)})"
        )
    opts = options or {}
    known = {"vhd": {"subformat"}}.get(out_format, set())
    for key in opts:
        if key not in known:
            raise UsageError(f"-o {key}: not an option of {out_format} output")
    chosen = archive.select(disk)
    with writing(OutputFile(output, no_create=no_create, target_is_zero=target_is_zero)) as out:
        allocated = None
        if out_format == "vhd" and out.is_stream and opts.get("subformat", "dynamic") == "dynamic":
            if reopen is None or archive.source.path is None:
                raise UsageError(
                    "a dynamic VHD on a stream needs its allocated blocks first: "
                    "give the input as a file (it is read twice), or write a file"
                )
            with reopen() as first:
                allocated = allocated_blocks(_first_pass(first, first.select(disk), verify))
        writer = _writer(out_format, out, chosen.size, opts, allocated)
        checks = checks_for([chosen], salvage)
        pieces = archive.stream([chosen], checks, verify=verify)
        if needs_order(out_format, opts, out.is_stream) and not archive.ordered:
            pieces = spooled(pieces, chosen)
        written = 0
        with Progress(archive.source, progress, label=chosen.describe()) as bar:
            for _disk, offset, data in pieces:
                if (
                    chosen.size is not None
                    and offset + len(data) > chosen.size
                    and not isinstance(writer, RawWriter)
                ):
                    # a salvaged tail past the disk's size (an XVA holding more than its
                    # ova.xml says): raw grows to keep it, the other formats cannot
                    data = data[: max(0, chosen.size - offset)]
                writer.write(offset, data)
                written += len(data)
                bar.update()
        if stats is not None:
            stats.update(data_bytes=written, checks=checks)
        if writer.size is None:  # known once its stream ended (a fixed VHD from a pipe)
            writer.size = chosen.size
        writer.finish()
        if salvage and checks.seen:
            report = report_path(output, report)
            write_report(report, archive.source.name, {chosen.id: output}, checks)
        out.commit(sync=sync)
    warn_elsewhere(checks, [chosen])
    if checks.damage:
        raise summary(checks, report)
    return chosen
