"""A read-only NBD server over the disk views of serve/exports.py (the protocol of NetworkBlockDevice's
doc/proto.md): fixed newstyle handshake, NBD_OPT_GO/INFO/LIST, structured replies and
the base:allocation meta context, one thread per client."""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import struct
import threading

from ..model import ZERO
from ..notices import error

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
CLIENT_NO_ZEROES = 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST = 1, 2, 3
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

# transmission flags: has flags, read only, can serve several connections at once
TRANSMISSION_FLAGS = 1 | 2 | 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
CMD_FLAG_DF, CMD_FLAG_REQ_ONE = 1 << 2, 1 << 3
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR = 5, 2**15 + 1
STATE_HOLE, STATE_ZERO = 1, 2
EPERM, EIO, EINVAL, ENOTSUP = 1, 5, 22, 95

ALLOCATION = "base:allocation"
ALLOCATION_ID = 1
MAX_REQUEST = 32 << 20  # the largest read a client may ask for
MAX_OPTION = 64 << 10  # option payloads are small; refuse anything bigger
MAX_EXTENTS = 4096  # block status descriptors per reply
MAX_CLIENTS = 64  # connections served at once; more are closed at once
# seconds a client may say nothing before it is dropped (the environment may shorten it)
IDLE_TIMEOUT = int(os.environ.get("VMARC_NBD_IDLE_TIMEOUT", "600"))


class _Disconnect(Exception):
    pass


class _Client(socketserver.BaseRequestHandler):
    def handle(self):
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if self.sock.family in (
            socket.AF_INET,
            socket.AF_INET6,
        ) else None
        # a silent client is dropped, not waited on: a receive timeout in the kernel
        # (settimeout would make the socket non-blocking, which sendfile cannot use)
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", IDLE_TIMEOUT, 0)
        )
        self.exports = self.server.exports  # serve/exports.py
        self.structured = False
        self.allocation = False
        with self.server.clients_lock:
            self.server.clients += 1
            full = self.server.clients > MAX_CLIENTS
        try:
            if full:
                return  # over the cap: closed before the handshake
            disk = self._handshake()
            if disk is not None:
                self._transmission(disk)
        except (_Disconnect, ConnectionError, OSError):
            pass  # the client went away (or fell silent): the server carries on
        except Exception as e:  # a bug or a damaged archive: one line, keep serving others
            error(f"client {self.client_address or 'unix'}: {e}", "vmarc serve")
        finally:
            with self.server.clients_lock:
                self.server.clients -= 1

    # -- wire helpers --------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise _Disconnect()
            buf += got
        return bytes(buf)

    def _opt_reply(self, opt: int, kind: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, kind, len(data)) + data)

    # -- handshake -----------------------------------------------------------------------
    def _handshake(self):
        self.sock.sendall(
            NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        (client_flags,) = struct.unpack(">I", self._recv(4))
        no_zeroes = bool(client_flags & CLIENT_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", self._recv(16))
            if magic != IHAVEOPT:
                return None
            if length > MAX_OPTION:
                return None  # hostile: drop the connection
            data = self._recv(length)
            if opt == OPT_EXPORT_NAME:
                disk = self.exports.find(data.decode("utf-8", "replace"))
                if disk is None:
                    return None  # this old option has no way to say "unknown"
                self.sock.sendall(
                    struct.pack(">QH", disk.size, TRANSMISSION_FLAGS)
                    + (b"" if no_zeroes else bytes(124))
                )
                return disk
            if opt == OPT_ABORT:
                self._opt_reply(opt, REP_ACK)
                return None
            if opt == OPT_LIST:
                for name in self.exports.disks:
                    raw = name.encode()
                    self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
                self._opt_reply(opt, REP_ACK)
            elif opt == OPT_STRUCTURED_REPLY:
                self.structured = True
                self._opt_reply(opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                disk = self._info(opt, data)
                if disk is not None and opt == OPT_GO:
                    return disk
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                self._meta_context(opt, data)
            else:
                self._opt_reply(opt, REP_ERR_UNSUP)

    def _info(self, opt: int, data: bytes):
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + nlen].decode("utf-8")
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            self._opt_reply(opt, REP_ERR_INVALID)
            return None
        disk = self.exports.find(name)
        if disk is None:
            msg = f"no export {name!r}; exports: {', '.join(self.exports.disks)}".encode()
            self._opt_reply(opt, REP_ERR_UNKNOWN, msg)
            return None
        self._opt_reply(
            opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, disk.size, TRANSMISSION_FLAGS)
        )
        self._opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self._opt_reply(opt, REP_ACK)
        return disk

    def _meta_context(self, opt: int, data: bytes):
        try:
            (nlen,) = struct.unpack_from(">I", data)
            pos = 4 + nlen
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                queries.append(data[pos + 4 : pos + 4 + qlen].decode("utf-8"))
                pos += 4 + qlen
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            self._opt_reply(opt, REP_ERR_INVALID)
            return
        if opt == OPT_SET_META_CONTEXT and not self.structured:
            self._opt_reply(opt, REP_ERR_INVALID, b"structured replies first")
            return
        wanted = (opt == OPT_LIST_META_CONTEXT and not queries) or any(
            q in (ALLOCATION, "base:") for q in queries
        )
        if opt == OPT_SET_META_CONTEXT:
            self.allocation = wanted
        if wanted:
            self._opt_reply(
                opt, REP_META_CONTEXT, struct.pack(">I", ALLOCATION_ID) + ALLOCATION.encode()
            )
        self._opt_reply(opt, REP_ACK)

    # -- transmission ----------------------------------------------------------------------
    def _transmission(self, disk):
        while True:
            magic, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", self._recv(28))
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_DISC:
                return
            if cmd == CMD_WRITE:
                # the payload follows, up to 4 GiB: rather than read it, say no and close
                self._error(handle, EPERM, "read-only export")
                return
            elif offset + length > disk.size or (cmd == CMD_READ and length > MAX_REQUEST):
                self._error(handle, EINVAL, "request outside the disk or too large")
            elif (
                cmd == CMD_READ
                and self.structured
                and not flags & CMD_FLAG_DF
                and disk.store_fd is not None
            ):
                try:
                    disk.verify(offset, length)  # sendfile bypasses read()'s check
                except Exception as e:
                    self._read_failed(disk, handle, offset, e)
                    continue
                self._read_in_place(disk, handle, offset, length)
            elif cmd == CMD_READ:
                try:
                    data = disk.read_at(offset, length)
                except Exception as e:
                    self._read_failed(disk, handle, offset, e)
                    continue
                self._read_reply(handle, offset, data)
            elif cmd == CMD_FLUSH:
                self._done(handle)
            elif cmd == CMD_BLOCK_STATUS and self.allocation:
                self._block_status(disk, handle, offset, length, flags & CMD_FLAG_REQ_ONE)
            else:
                self._error(handle, ENOTSUP if self.structured else EINVAL, "unsupported")

    def _read_failed(self, disk, handle: int, offset: int, err: Exception):
        """The client gets EIO; the server says why and goes on serving."""
        error(f"{disk.disk.describe()}: read at {offset}: {err}", "vmarc serve")
        self._error(handle, EIO, "read error")

    def _read_in_place(self, disk, handle: int, offset: int, length: int):
        """A read from a plain file: a data chunk per stretch, sent by the kernel straight
        from the archive's page cache (sendfile), and a hole chunk per zero stretch (no
        zeros on the wire). The last chunk carries the DONE flag: no empty final chunk."""
        sock, out = self.sock, self.sock.fileno()
        head = struct.Struct(">IHHQIQ")
        pieces = list(disk.extents(offset, length))  # verify() refused LOST ones
        for i, (start, n, kind, at, *_) in enumerate(pieces):
            flags = REPLY_FLAG_DONE if i == len(pieces) - 1 else 0
            if kind == ZERO:
                sock.sendall(
                    head.pack(
                        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, start
                    )
                    + struct.pack(">I", n)
                )
                continue
            sock.sendall(
                head.pack(
                    STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + n, start
                )
            )
            sent = 0
            while sent < n:
                try:
                    got = os.sendfile(out, disk.store_fd, at + sent, n - sent)
                except OSError as e:  # the archive's read failing mid-reply is worth a line
                    if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                        error(
                            f"{disk.disk.describe()}: read at {start}: "
                            f"{e.strerror}; the reply is cut, the client disconnected",
                            "vmarc serve",
                        )
                    raise ConnectionError(e.strerror) from None
                if got == 0:  # the archive file shrank under us: the reply cannot finish
                    raise ConnectionError("archive file ends inside indexed data")
                sent += got
        if not pieces:
            self._done(handle)

    def _read_reply(self, handle: int, offset: int, data: bytes):
        if self.structured:
            head = struct.pack(
                ">IHHQIQ",
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + len(data),
                offset,
            )
        else:
            head = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle)
        self.sock.sendall(head)
        self.sock.sendall(data)

    def _done(self, handle: int):
        if self.structured:
            self.sock.sendall(
                struct.pack(
                    ">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0
                )
            )
        else:
            self.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))

    def _error(self, handle: int, err: int, msg: str):
        if self.structured:
            text = msg.encode()
            self.sock.sendall(
                struct.pack(
                    ">IHHQIIH",
                    STRUCTURED_REPLY_MAGIC,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    handle,
                    6 + len(text),
                    err,
                    len(text),
                )
                + text
            )
        else:
            self.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, handle))

    def _block_status(self, disk, handle: int, offset: int, length: int, one: bool):
        descs = []
        for e in disk.extents(offset, length):
            n = e.length
            state = STATE_HOLE | STATE_ZERO if e.kind == ZERO else 0  # LOST: data (EIO)
            while n:  # descriptor lengths are 32-bit
                step = min(n, 1 << 31)
                if descs and descs[-1][1] == state and descs[-1][0] + step < 1 << 32:
                    descs[-1][0] += step
                else:
                    descs.append([step, state])
                n -= step
            if one or len(descs) >= MAX_EXTENTS:
                break
        if one:
            descs = descs[:1]
        payload = struct.pack(">I", ALLOCATION_ID) + b"".join(
            struct.pack(">II", n, s) for n, s in descs
        )
        self.sock.sendall(
            struct.pack(
                ">IHHQI",
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                handle,
                len(payload),
            )
            + payload
        )


class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = MAX_CLIENTS


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = MAX_CLIENTS


def make_server(
    exports, *, bind: str = "127.0.0.1", port: int = 10809, unix_socket: str | None = None
):
    if unix_socket:
        server = UnixServer(unix_socket, _Client)
    else:
        TcpServer.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        server = TcpServer((bind, port), _Client)
    server.exports = exports
    server.clients, server.clients_lock = 0, threading.Lock()
    return server


def serve_in_thread(server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="vmarc-nbd", daemon=True)
    t.start()
    return t
