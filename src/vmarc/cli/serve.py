"""vmarc serve: every disk of an archive or image as a read-only NBD export."""

from __future__ import annotations

import os
import signal
import sys
import threading

from ..access import open_disks
from ..errors import SourceError
from ..serve.exports import Exports
from ..serve.nbd import make_server
from .common import add_random_access_args, add_verify_arg, human_size, layers


def add_parser(sub):
    p = sub.add_parser(
        "serve",
        help="serve the disks read-only over NBD (export name = "
        "disk id; the default export is --disk or the first disk)",
    )
    add_random_access_args(p)
    p.add_argument("--disk", help="the default export (id, name, device or index)")
    p.add_argument(
        "--bind", default="127.0.0.1", help="address to listen on (default loopback only)"
    )
    p.add_argument("--port", type=int, default=10809)
    p.add_argument("--socket", help="listen on this Unix socket instead of TCP")
    add_verify_arg(p, "each XVA chunk's checksum the first time a read touches it")
    p.set_defaults(run=run)


def run(args) -> int:
    with open_disks(
        args.source, args.fmt, index=args.index, **layers(args), verify=args.verify
    ) as opened:
        exports = Exports(opened, args.disk)
        try:
            server = make_server(exports, bind=args.bind, port=args.port, unix_socket=args.socket)
        except OSError as e:
            where = args.socket or f"{args.bind}:{args.port}"
            raise SourceError(f"cannot listen on {where}: {e.strerror}") from None
        # SIGTERM and SIGINT end serve_forever from another thread (it cannot be
        # stopped from its own), then everything is closed in order.
        stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        url = (
            f"nbd+unix:///{{name}}?socket={args.socket}"
            if args.socket
            else f"nbd://{args.bind if ':' not in args.bind else '[' + args.bind + ']'}:{args.port}/{{name}}"
        )
        for d in opened.disks:
            print(
                f"vmarc: serving {d.disk.describe()} ({human_size(d.size)}) at "
                f"{url.format(name=d.disk.id)}",
                file=sys.stderr,
            )
        sys.stderr.flush()
        try:
            server.serve_forever()
        finally:
            server.server_close()
            if args.socket:
                try:
                    os.unlink(args.socket)
                except OSError:
                    pass
    return 0
