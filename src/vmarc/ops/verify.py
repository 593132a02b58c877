"""verify: read everything once and check every checksum and structural rule."""

from __future__ import annotations

from ..errors import CorruptError
from ..model import Archive, Checks
from .progress import Progress


def verify(archive: Archive, progress: bool = False) -> Checks:
    """Returns the Checks with every problem found in checks.problems, in the order met;
    checks.stopped is True when the pass could not go on past one of them (what each
    disk misses from there is listed after it)."""
    checks = Checks(collect=True)
    bar = Progress(archive.source, progress)
    try:
        for _ in archive.stream(None, checks, verify=True):
            bar.update()
        if checks.stopped_by is None:
            archive.check_more(checks)  # qcow2: refcounts and leaks, as qemu-img check
    except CorruptError as e:  # a reader that cannot go on past its damage
        checks.seen.append(e)
        checks.stopped_by = e
    finally:
        bar.close()
    checks.problems = list(checks.seen)
    checks.stopped = checks.stopped_by is not None
    return checks
