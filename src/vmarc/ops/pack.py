"""Writing a VMA or XVA archive: the one path `create` and the whole-VM `convert` share.

Both writers take the same calls (formats/xva_writer.py, formats/vma_writer.py):
add(disk, offset, data) in source order, finish_disk(disk), close(). Here, once for both
commands: the -o options and the compression are checked against the output format and
name (Proxmox picks the decompressor and the VM id from the name), the output is opened,
and the sources' pieces are fed to the writer.
"""

from __future__ import annotations

import os
import re
import time

from ..errors import UsageError
from ..io.codecs import compression_for
from ..io.output import StreamOutput, writing

ARCHIVE_FORMATS = ("vma", "xva", "ova")
OPTIONS = {"xva": ("checksum", "header", "compress"), "vma": ("compress",), "ova": ()}
COMPRESSIONS = {"xva": ("gzip", "zstd"), "vma": ("gzip", "zstd", "lzop"), "ova": ()}
VZDUMP_NAME = re.compile(r"vzdump-qemu-(\d+)-")


class Target:
    """What was decided about an archive output. (A plain class: this module is imported
    by every `convert`, and dataclasses cost more start-up than a whole small job.)"""

    def __init__(
        self, path: str, out_format: str, compression: str | None, vmid: int, options: dict
    ):
        self.path = path  # the file to write ("-": stdout)
        self.out_format = out_format  # vma or xva
        self.compression = compression
        self.vmid = vmid  # VMA: the VM id its config names (the name's, when it has one)
        self.options = options

    def writer(
        self,
        out,
        disks,
        *,
        ova_xml: bytes = b"",
        configs=None,
        covered=None,
        ordered: bool = False,
        ovf: tuple[str, bytes] | None = None,
    ):
        """The format's writer into out. disks: (ref, device or file name, Disk) in the
        order the archive stores them; XVA: ova_xml and covered (XvaWriter); VMA: configs
        and ordered (VmaWriter); OVA: ovf (its name and text) and covered (OvaWriter)."""
        from ..formats.vma_writer import VmaWriter  # only when writing an archive
        from ..formats.xva_writer import XvaWriter

        if self.out_format == "ova":
            from ..formats.ova import OvaWriter

            return OvaWriter(out, disks, ovf[1], ovf[0], covered=covered)
        if self.out_format == "xva":
            return XvaWriter(
                out,
                ova_xml,
                disks,
                checksum=self.options.get("checksum", "xxhash"),
                header=self.options.get("header", "v7"),
                covered=covered,
            )
        return VmaWriter(out, disks, configs or {}, ordered=ordered)


def plan(
    output: str,
    out_format: str,
    options: dict | None = None,
    *,
    compression: str | None = "auto",
    vmid: int | None = None,
    vm_name: str = "vm",
    name_in_directory: bool = False,
) -> Target:
    """Check -o options and compression ("auto": from the output's name; -o compress
    overrides) for out_format; VMA: the vmid against the name. name_in_directory: an
    existing directory gets the file name Proxmox or XenServer would give (convert)."""
    if out_format not in ARCHIVE_FORMATS:
        raise UsageError(
            f"unknown archive format {out_format!r} (known: {', '.join(ARCHIVE_FORMATS)})"
        )
    opts = dict(options or {})
    allowed = OPTIONS[out_format]
    for key in opts:
        if key not in allowed:
            raise UsageError(
                f"-o {key}: not an option of {out_format} output "
                f"(known: {', '.join(sorted(allowed))})"
            )
    if "compress" in opts:
        compression = opts["compress"]
    directory = name_in_directory and output != "-" and os.path.isdir(output)
    if compression in ("none", ""):
        compression = None
    elif compression == "auto":
        compression = (
            None
            if output == "-"
            else ("zstd" if out_format == "vma" else None)
            if directory
            else compression_for(output)
        )
    if compression is not None and compression not in COMPRESSIONS[out_format]:
        known = ", ".join(COMPRESSIONS[out_format])
        raise UsageError(
            f"-o compress={compression}: {out_format} output takes {known} or "
            "none" + (" (XAPI reads no other)" if out_format == "xva" else "")
        )
    if out_format == "vma":
        vmid = vma_name_rules(output, compression, vmid)
    vmid = 100 if vmid is None else vmid
    path = output_name(output, out_format, vm_name, vmid, compression) if directory else output
    return Target(path, out_format, compression, vmid, opts)


def write_archive(target: Target, make_writer, feeds, sync: bool = True) -> int:
    """Open the output, make_writer(out), then for each feed (pieces, disks it completes,
    progress bar) give the writer every piece and finish those disks; returns the data
    bytes given. Nothing is left behind on failure (io/output.writing)."""
    copied = 0
    with writing(StreamOutput(target.path, target.compression)) as out:
        writer = make_writer(out)
        for pieces, done, bar in feeds:
            with bar:
                for disk, offset, data in pieces:
                    writer.add(disk, offset, data)
                    copied += len(data)
                    bar.update()
            for disk in done:
                writer.finish_disk(disk)
        writer.close()
        out.commit(sync=sync)
    return copied


def output_name(
    output: str, out_format: str, vm_name: str, vmid: int, compression: str | None
) -> str:
    """A directory gets the file name Proxmox (vzdump-qemu-<vmid>-<time>.vma.zst) or
    XenServer (<name>.xva) would give it."""
    if out_format == "vma":
        ext = {"zstd": ".zst", "gzip": ".gz", "lzop": ".lzo", None: ""}[compression]
        stamp = time.strftime("%Y_%m_%d-%H_%M_%S")
        return os.path.join(output, f"vzdump-qemu-{vmid}-{stamp}.vma{ext}")
    return os.path.join(output, f"{file_stem(vm_name)}.{out_format}")


def file_stem(vm_name: str) -> str:
    """A VM's name made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", vm_name).strip(".-") or "vm"


def vma_name_rules(output: str, compression: str | None, vmid: int | None) -> int:
    """The vmid to write, after checking the output name against what Proxmox reads from
    it: the decompressor (by suffix) and the VM id (vzdump-qemu-<vmid>-...)."""
    if output == "-" or os.path.isdir(output):
        return 100 if vmid is None else vmid
    named = compression_for(output)
    if compression != named:
        raise UsageError(
            f"{output}: the name says {named or 'no'} compression but "
            f"{compression or 'none'} was asked for; Proxmox picks the "
            "decompressor by the name (.vma, .vma.zst, .vma.gz, .vma.lzo)"
        )
    m = VZDUMP_NAME.search(os.path.basename(output))
    if m and vmid is not None and int(m[1]) != vmid:
        raise UsageError(
            f"{output}: the name says VM {int(m[1])} but --vmid is {vmid}; "
            "the restored config would name another VM's volumes"
        )
    return int(m[1]) if m else (100 if vmid is None else vmid)
