"""What convert and extract do about damage in the source.

The disks being written are kept (model.Checks keep): damage that spoils only other
disks, or that comes after the kept disks are complete and verified, leaves them intact:
the command succeeds with one warning line naming where the damage starts. With
--salvage nothing stops the pass: the output is written with the bytes of a bad chunk as
read and zeros for what is missing, a JSON report lists every damaged stretch, and the
command ends with exit 2 (SalvagedError) when the output holds damage.
"""

from __future__ import annotations

import json
import os

from ..errors import SalvagedError
from ..io.output import OutputFile, write_all, writing
from ..model import Checks, Disk
from ..notices import notice, warn


def checks_for(disks: list[Disk], salvage: bool) -> Checks:
    return Checks(keep={d.id for d in disks}, salvage=salvage)


def report_path(output: str, given: str | None) -> str:
    """--report, else beside a file or directory output; a device's, stdout's or a
    FIFO's report goes to the current directory."""
    if given:
        return given
    if output != "-" and (
        not os.path.exists(output) or os.path.isfile(output) or os.path.isdir(output)
    ):
        return f"{output.rstrip('/')}.damage.json"
    return f"{os.path.basename(output) if output != '-' else 'stdout'}.damage.json"


def write_report(path: str, source: str, outputs: dict[str, str], checks: Checks) -> None:
    """The damage report: each damaged stretch with disk, offset, length, cause and its
    place in the source; problems that spoil no output disk are listed apart."""
    doc = {
        "source": source,
        "outputs": outputs,
        "damage": [d.as_dict() for d in checks.damage],
        "damaged_bytes": sum(d.length for d in checks.damage),
        "problems": [str(e) for e in checks.problems],
        "elsewhere": [str(e) for e in checks.elsewhere],
        "stopped_by": str(checks.stopped_by) if checks.stopped_by else None,
    }
    with writing(OutputFile(path)) as out:
        write_all(out.fd, (json.dumps(doc, indent=2) + "\n").encode())
        out.commit()


def elsewhere(checks: Checks, disks: list[Disk]) -> str | None:
    """The warning when the written disks are intact but the archive is damaged."""
    if checks.damage or not checks.seen:
        return None
    what = ", ".join(d.device or d.id for d in disks)
    return f"{what} complete and verified, but the archive is damaged: {checks.seen[0]}"


def warn_elsewhere(checks: Checks, disks: list[Disk]) -> None:
    text = elsewhere(checks, disks)
    if text:
        warn(text)


CAUSES = {
    "checksum": "with a bad checksum (written as read)",
    "unverified": "unverified (the input broke off before the checksum)",
    "missing": "missing (written as zeros)",
    "structure": "under broken metadata (read where it points)",
}


def summary(checks: Checks, report: str) -> SalvagedError:
    """The lines for a salvaged output: one per damaged disk, then the error to exit with."""
    per_disk: dict[str, dict[str, int]] = {}
    for d in checks.damage:
        causes = per_disk.setdefault(d.disk.device or d.disk.id, {})
        causes[d.cause] = causes.get(d.cause, 0) + (d.length if d.cause != "metadata" else 1)
    for disk, causes in per_disk.items():
        parts = [f"{n} bytes {CAUSES[c]}" for c, n in sorted(causes.items()) if c in CAUSES]
        if causes.get("metadata"):
            parts.append(
                f"{causes['metadata']} metadata problem(s) (the data is read as the "
                "metadata places it)"
            )
        notice(f"{disk}: {'; '.join(parts)}")
    stretches = [d for d in checks.damage if d.cause != "metadata"]
    meta = len(checks.damage) - len(stretches)
    return SalvagedError(
        f"salvaged with {len(stretches)} damaged stretch{'es' if len(stretches) != 1 else ''}"
        f" ({sum(d.length for d in stretches)} bytes)"
        + (f" and {meta} metadata problem(s)" if meta else "")
        + f"; report: {report}"
    )
