"""The one channel for what library code tells the user besides its result: warnings
(damage that spares the disk asked for, an index that could not be saved) and notices
(a spool it has to make, the files a chain reads through, a server's failed read).

It is the `vmarc` logger (`vmarc.serve`, `vmarc.mount` for the servers). The command
line prints each record as one line on stderr: "vmarc: ...", "vmarc serve: ...", with
"warning: " before warnings. A program using the API configures logging as it likes;
left alone, Python prints the warnings and errors and drops the notices.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("vmarc")


def warn(text: str, who: str = "vmarc") -> None:
    logging.getLogger(who).warning(text)


def notice(text: str, who: str = "vmarc") -> None:
    logging.getLogger(who).info(text)


def error(text: str, who: str = "vmarc") -> None:
    """Something failed and the program goes on (a server's read for one client)."""
    logging.getLogger(who).error(text)


class StderrLines(logging.Handler):
    """How the command line shows records: one line each on the stderr of the moment
    (tests and the mount's log file replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        who = record.name.replace(".", " ")
        kind = "warning: " if record.levelno == logging.WARNING else ""
        try:
            sys.stderr.write(f"{who}: {kind}{record.getMessage()}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nothing to tell it to


def to_stderr() -> None:
    """Show every notice on stderr (the command line)."""
    if not any(isinstance(h, StderrLines) for h in log.handlers):
        log.addHandler(StderrLines())
    log.setLevel(logging.INFO)
    log.propagate = False
