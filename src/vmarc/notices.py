"""The one channel for what library code tells the user besides its result: warnings
(damage that spares the disk asked for), notices (a spool it has to make, the files a
chain reads through, an index it could not save) and errors it carries on after (a
server's failed read for one client).

Each goes to one handler, handler(who, kind, text). The default writes one line on
stderr: "vmarc: ...", "vmarc serve: ...", with "warning: " before warnings, which is
what the command line shows. A program using the API may set its own (set_handler), to
collect, log or silence them. (Not the logging module: importing it costs every command
more start-up time than most of vmarc's own modules.)
"""

from __future__ import annotations

import sys

WARNING, NOTICE, ERROR = "warning", "notice", "error"


def stderr_lines(who: str, kind: str, text: str) -> None:
    """The default handler: one line on the stderr of the moment (tests and the mount's
    log file replace sys.stderr)."""
    try:
        sys.stderr.write(f"{who}: {'warning: ' if kind == WARNING else ''}{text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr gone: nothing to tell it to


_handler = stderr_lines


def set_handler(handler) -> object:
    """Route every notice to handler(who, kind, text) (None: back to stderr lines);
    returns the previous handler."""
    global _handler
    previous, _handler = _handler, handler or stderr_lines
    return previous


def warn(text: str, who: str = "vmarc") -> None:
    _handler(who, WARNING, text)


def notice(text: str, who: str = "vmarc") -> None:
    _handler(who, NOTICE, text)


def error(text: str, who: str = "vmarc") -> None:
    """Something failed and the program goes on."""
    _handler(who, ERROR, text)
