"""Errors vmarc reports, each carrying the exit code the CLI returns for it.

Exit codes follow `qemu-img check`: 0 clean, 1 could not run (bad usage, unreadable or
unknown input), 2 the input is damaged (corrupt, truncated, checksum mismatch).
Every message names what and where: file offset, disk, chunk/cluster/block.
"""


class VmarcError(Exception):
    """vmarc could not do what was asked."""

    exit_code = 1


class UsageError(VmarcError):
    """The command line or API call asks for something that does not make sense."""


class SourceError(VmarcError):
    """The input cannot be opened or read (missing file, permission, I/O error)."""


class OutputError(VmarcError):
    """The output cannot be created or written (disk full, read-only, permission)."""


class UnknownFormatError(VmarcError):
    """The input is not an archive or image vmarc knows."""


class UnsupportedError(VmarcError):
    """A valid input uses a feature vmarc does not implement."""


class CorruptError(VmarcError):
    """The input is a known format but damaged. damage: the model.Damage stretches of
    disks it spoils, when the reader can tell (empty: the archive as a whole)."""

    exit_code = 2

    def __init__(self, message: str, damage=()):
        super().__init__(message)
        self.damage = list(damage)


class FormatError(CorruptError):
    """A structure breaks the format's rules."""


class TruncatedError(CorruptError):
    """The input ends before the format says it may."""


class IntegrityError(CorruptError):
    """Stored data does not match its checksum."""


class SalvagedError(CorruptError):
    """--salvage wrote the output, but parts of it are damaged (listed in its report)."""
