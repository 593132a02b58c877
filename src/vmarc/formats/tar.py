"""A streaming tar reader for archive formats built on tar (XVA).

Written for one sequential pass over a Source: no seeking back, no member kept in
memory, every header checked (checksum, size field, type, name) before its data is
touched. XAPI writes old V7 headers (no magic), Xen Orchestra and Python write ustar;
both are read. pax 'x' and GNU 'L' long-name records are honoured for the next member.
"""

from __future__ import annotations

from ..errors import FormatError, TruncatedError, UsageError
from ..io.source import Source

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_META = 1 << 16  # largest pax / GNU long-name record we accept

# -- the header's fields (POSIX ustar; V7 has the same up to the type flag), read by
# parse_header and written by make_header (docs/formats/xva.md)
NAME = slice(0, 100)
MODE = slice(100, 108)
UID = slice(108, 116)
GID = slice(116, 124)
SIZE = slice(124, 136)
MTIME = slice(136, 148)
CHKSUM = slice(148, 156)
TYPEFLAG = slice(156, 157)
MAGIC = slice(257, 262)  # "ustar" (then a NUL or a space, and the version)
MAGIC_VERSION = slice(257, 265)
UNAME = slice(265, 297)
GNAME = slice(297, 329)
PREFIX = slice(345, 500)


class Member:
    __slots__ = ("name", "size", "offset", "data_offset", "typeflag")

    def __init__(self, name: str, size: int, offset: int, data_offset: int, typeflag: bytes):
        self.name = name
        self.size = size
        self.offset = offset  # offset of the member's header in the tar stream
        self.data_offset = data_offset  # offset of its first data byte
        self.typeflag = typeflag


def _octal(field: bytes, what: str, where: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        if field[0] & 0x40:
            raise FormatError(f"{where}: negative {what}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError(f"{where}: {what} field is not octal: {field!r}") from None


def parse_header(block: bytes, where: str) -> tuple[str, int, bytes]:
    """Validate one 512-byte header; returns (name, size, typeflag). `where` names the
    header in messages ("backup.xva: tar header at offset 1536")."""
    stored = _octal(block[CHKSUM], "checksum", where)
    before, after = block[: CHKSUM.start], block[CHKSUM.stop :]
    unsigned = sum(before) + 8 * 32 + sum(after)  # the checksum field counts as spaces
    if stored != unsigned:
        signed = sum(b - 256 if b > 127 else b for b in before + after) + 256
        if stored != signed:
            raise FormatError(
                f"{where}: header checksum mismatch (stored {stored}, computed {unsigned})"
            )
    name = block[NAME].split(b"\0", 1)[0]
    if block[MAGIC] == b"ustar":
        prefix = block[PREFIX].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size = _octal(block[SIZE], "size", where)
    return _decode_name(name, where), size, block[TYPEFLAG]


def make_header(name: str, size: int, style: str = "v7", mtime: int = 0) -> bytes:
    """One 512-byte header: XAPI's V7 form (no magic, type flag NUL, mode 0400) or ustar."""
    raw = name.encode()
    if len(raw) > NAME.stop:
        raise UsageError(f"tar member name {name!r} is longer than {NAME.stop} bytes")
    h = bytearray(BLOCK)
    h[NAME.start : len(raw)] = raw
    h[MODE] = b"0000400\0"
    h[UID] = b"0000000\0"
    h[GID] = b"0000000\0"
    h[SIZE] = b"%011o\0" % size
    h[MTIME] = b"%011o\0" % mtime
    if style == "ustar":
        h[TYPEFLAG] = b"0"
        h[MAGIC_VERSION] = b"ustar\x0000"
        h[UNAME.start : UNAME.start + 4] = b"root"
        h[GNAME.start : GNAME.start + 4] = b"root"
    h[CHKSUM] = b"        "
    h[CHKSUM] = b"%06o\0 " % sum(h)
    return bytes(h)


def _decode_name(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: member name is not UTF-8: {raw[:60]!r}") from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    out = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise FormatError(f"{where}: pax record: bad record length") from None
        if sp < 0 or length <= 0 or pos + length > len(data):
            raise FormatError(f"{where}: pax record: bad record length")
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


class TarReader:
    """Yields members one at a time; the caller reads or skips each member's data."""

    def __init__(self, src: Source):
        self.src = src
        self._left = 0  # data bytes of the current member not consumed yet
        self._pad = 0  # padding after the current member's data
        self.ended = False

    def _finish_member(self):
        self.src.skip(self._left + self._pad, "tar member data")
        self._left = self._pad = 0

    def next(self) -> Member | None:
        """The next regular-file member, or None at the end-of-archive blocks."""
        self._finish_member()
        long_name = None
        pax: dict[str, str] = {}
        while True:
            where = self.src.offset
            block = self.src.read_upto(BLOCK)
            if len(block) < BLOCK:
                raise TruncatedError(
                    f"{self.src.name}: tar archive truncated at offset {where}"
                    + (
                        " (no end-of-archive blocks)"
                        if not block
                        else f" (partial header of {len(block)} bytes)"
                    )
                )
            if block == ZERO_BLOCK:
                second = self.src.read_upto(BLOCK)
                if second != ZERO_BLOCK:
                    raise TruncatedError(
                        f"{self.src.name}: tar archive truncated at offset "
                        f"{where + BLOCK}: second end-of-archive block missing"
                    )
                self.ended = True
                return None
            name, size, typeflag = parse_header(
                block, f"{self.src.name}: tar header at offset {where}"
            )
            if typeflag in (b"x", b"L"):
                if size > MAX_META:
                    raise FormatError(
                        f"{self.src.name}: tar header at offset {where}: {size}-byte extended "
                        f"header record is implausibly large"
                    )
                data = self.src.read_exact(size, "tar extended header")
                self.src.skip(-size % BLOCK, "tar padding")
                if typeflag == b"L":
                    long_name = _decode_name(
                        data.split(b"\0", 1)[0], f"{self.src.name}: offset {where}"
                    )
                else:
                    pax.update(_pax_records(data, f"{self.src.name}: offset {where}"))
                continue
            if typeflag == b"g":  # global pax header: nothing we use
                self.src.skip(size + (-size % BLOCK), "tar global header")
                continue
            if typeflag == b"5":  # directory entries carry no data
                continue
            if typeflag not in (b"0", b"\0", b"7"):
                raise FormatError(
                    f"{self.src.name}: tar member {name!r} at offset {where}: unsupported type "
                    f"{typeflag!r} (only regular files belong in this archive)"
                )
            if "path" in pax:
                name = pax["path"]
            elif long_name:
                name = long_name
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    size = -1
                if size < 0:
                    raise FormatError(
                        f"{self.src.name}: tar pax header at offset {where}: "
                        f"bad size {pax['size'][:20]!r}"
                    )
            self._left = size
            self._pad = -size % BLOCK
            return Member(name, size, where, self.src.offset, typeflag)

    def next_offset(self) -> int:
        """Where the next member's header starts (past the current member's data)."""
        return self.src.offset + self._left + self._pad

    def readinto(self, view: memoryview, member: Member) -> None:
        """Read exactly len(view) bytes of the current member's data."""
        if len(view) > self._left:
            raise ValueError("read past the member's data")
        self.src.readinto_exact(view, f"tar member {member.name}")
        self._left -= len(view)

    def view(self, member: Member) -> memoryview | None:
        """All of the current member's data without a copy (Source.take_view), or None:
        then readinto()."""
        view = self.src.take_view(self._left)
        if view is not None:
            self._left = 0
        return view

    def read(self, member: Member) -> bytes:
        buf = bytearray(self._left)
        self.readinto(memoryview(buf), member)
        return bytes(buf)
