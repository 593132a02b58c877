"""vmarc command line. Exit codes: 0 done, 1 could not run, 2 damaged input."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import VmarcError

# Subcommand modules, imported on demand: each pulls in its readers and writers, and a
# command's start-up time counts in every benchmark ratio.
COMMANDS = [
    "info",
    "verify",
    "convert",
    "extract",
    "create",
    "map",
    "serve",
    "mount",
    "filesystems",
    "ls",
    "cat",
    "copy-out",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 1: exit 2 always means damaged input
        self.print_usage(sys.stderr)
        self.exit(1, f"vmarc: {message}\n")


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; given argv naming a subcommand, with that subcommand only."""
    import importlib

    from .. import __version__

    parser = _Parser(
        prog="vmarc",
        description="Read, verify, convert and create VM backup "
        "archives (XVA, VMA) and disk images.",
    )
    parser.add_argument("--version", action="version", version=f"vmarc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    args = sys.argv[1:] if argv is None else list(argv)
    chosen = [args[0]] if args and args[0] in COMMANDS else COMMANDS
    for name in chosen:
        importlib.import_module(f"{__package__}.{name.replace('-', '_')}").add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every partial output is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, _frame):
    raise Terminated(signum)


def main(argv=None) -> int:
    # Decompression and SHA-1 run on threads that hand the GIL back and forth with the
    # main thread's write calls; at the default 5 ms switch interval each handoff can
    # stall a syscall's return (bench/: gzip XVA -> raw 2.4 s at 5 ms, 1.7 s at 0.5 ms).
    sys.setswitchinterval(0.0005)
    args = build_parser(argv).parse_args(argv)
    if args.command not in ("serve", "mount"):  # those stop on their own terms (libfuse
        for sig in (signal.SIGTERM, signal.SIGHUP):  # sets its handlers only over SIG_DFL)
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _terminate)
    try:
        return args.run(args) or 0
    except VmarcError as e:
        print(f"vmarc: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vmarc: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:  # 128 + the signal, as a shell reports it
        print(f"vmarc: {signal.Signals(t.signum).name[3:].lower()}: stopped", file=sys.stderr)
        return 128 + t.signum
    except BrokenPipeError:
        # The reader of our stdout went away; say so once, without a traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        print("vmarc: output pipe closed", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
