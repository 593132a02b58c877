"""Xen Orchestra's VHD directories: a VHD whose parts are files (docs/formats/xo.md; XO's
vhd-lib `Vhd/VhdDirectory.js`), the `.alias.vhd` text files that name them, and the
encryption of an encrypted remote.

    <uuid>.vhd/  header  footer  bat (a bit per block)  chunk-filters.json
                 blocks/<id div 1000>/<id mod 1000>  (the block's sector bitmap and data)

Every part may be compressed as chunk-filters.json says (gzip or brotli), and on an
encrypted remote every file is IV + ciphertext + tag (chacha20-poly1305, or aes-256-gcm
on older remotes, as the remote's encryption.json says). The layer reads like any VHD
(VhdArchive): it takes part in chains with VHD files, and a damaged or missing block file
is reported with the block, the file and the disk offset.
"""

from __future__ import annotations

import json
import os
import zlib
from array import array

from ..errors import FormatError, IntegrityError, SourceError, UnsupportedError, UsageError
from ..model import Checks, Damage
from .vhd import (
    ALIAS_SUFFIX,
    FOOTER,
    HEADER,
    SECTOR,
    UNALLOCATED,
    DynamicHeader,
    Footer,
    VhdArchive,
)

MAX_ALIAS = 1024  # an alias holds one relative path
ENCRYPTION_FILE = "encryption.json"
CIPHERS = {"chacha20-poly1305": 12, "aes-256-gcm": 12}  # IV length
TAG = 16
_KEYS: dict[str, bytes] = {}  # "*" -> the key --key-file gave (one remote a command)


def set_key_file(path: str) -> None:
    """The key of an encrypted remote (--key-file): 32 bytes, raw or as 64 hex digits."""
    try:
        with open(path, "rb") as f:
            raw = f.read(256).strip()
    except OSError as e:
        raise SourceError(f"{path}: cannot read the key file: {e.strerror}") from None
    if len(raw) == 64:
        try:
            raw = bytes.fromhex(raw.decode())
        except ValueError:
            pass
    if len(raw) != 32:
        raise UsageError(f"{path}: a remote's key is 32 bytes (or 64 hex digits), not {len(raw)}")
    _KEYS["*"] = raw


def remote_cipher(path: str) -> tuple[str, bytes] | None:
    """(algorithm, key) of the encrypted remote holding path, or None: the nearest
    encryption.json above it names the algorithm ("none": not encrypted)."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        desc = os.path.join(d, ENCRYPTION_FILE)
        if os.path.isfile(desc):
            try:
                with open(desc, "rb") as f:
                    alg = json.loads(f.read(4096)).get("algorithm", "none")
            except (OSError, ValueError, AttributeError):
                raise FormatError(f"{desc}: not the JSON Xen Orchestra writes") from None
            if alg == "none":
                return None
            if alg not in CIPHERS:
                raise UnsupportedError(f"{desc}: encryption algorithm {alg!r}")
            if "*" not in _KEYS:
                raise UsageError(f"{d}: an encrypted remote ({alg}); give its key with --key-file")
            return alg, _KEYS["*"]
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up


def read_remote_file(path: str, cipher, limit: int | None = None) -> bytes:
    """A file of the remote, decrypted (its tag checked) when the remote is encrypted."""
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    if limit is not None and len(data) > limit + (0 if cipher is None else 12 + TAG):
        raise FormatError(f"{path}: {len(data)} bytes is too large for what it holds")
    if cipher is None:
        return data
    alg, key = cipher
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError:
        raise UnsupportedError(
            "an encrypted remote needs the cryptography package (pip install 'vmarc[xo]')"
        ) from None
    iv = CIPHERS[alg]
    if len(data) < iv + TAG:
        raise IntegrityError(f"{path}: {len(data)} bytes is too short for an encrypted file")
    aead = ChaCha20Poly1305(key) if alg == "chacha20-poly1305" else AESGCM(key)
    try:
        return aead.decrypt(data[:iv], data[iv:], None)
    except InvalidTag:
        raise IntegrityError(
            f"{path}: the {alg} tag does not match: the file is damaged, or the key is not "
            "this remote's"
        ) from None


def resolve_alias(path: str, cipher=None) -> str:
    """The VHD directory (or file) an .alias.vhd names, relative to the alias."""
    text = read_remote_file(path, cipher, MAX_ALIAS).decode("utf-8", "replace").strip()
    if not text or "\0" in text:
        raise FormatError(f"{path}: an alias file holds no path")
    if text.endswith(ALIAS_SUFFIX):
        raise FormatError(f"{path}: an alias naming another alias ({text}) is refused")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), text))


def _brotli():
    try:
        import brotli
    except ImportError:
        raise UnsupportedError(
            "brotli-compressed VHD directories need the brotli package (pip install 'vmarc[xo]')"
        ) from None
    return brotli


class _DirectorySource:
    """A VHD directory where a Source would be: its name and path; bytes come from its
    part files."""

    seekable = True
    compression = None
    file_size = 0
    offset = 0
    pread_bytes = 0
    _raw_file = None  # (progress: nothing to follow)
    remote = None

    def __init__(self, path: str, name: str):
        self.path = path
        self.name = name

    def peek(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


class VhdDirectoryArchive(VhdArchive):
    """A Xen Orchestra VHD directory, opened by its path or by an alias naming it."""

    format = "vhd"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """An alias: one short line, a relative path ending in .vhd."""
        text = head.strip()
        return (
            0 < len(text) < MAX_ALIAS
            and text.endswith(b".vhd")
            and b"\n" not in text
            and all(32 <= c < 127 for c in text)
        )

    @classmethod
    def needs_file(cls, head: bytes, unsized: bool = False, parent: str | None = None):
        return "an alias names a VHD directory beside it"

    @classmethod
    def open_path(
        cls, path: str, parent: str | None = None, no_backing: bool = False, _children: tuple = ()
    ):
        """A directory or an alias file by its path (chains open their parents so)."""
        return cls(None, parent, no_backing, _children, path=path)

    def __init__(
        self,
        source,
        parent: str | None = None,
        no_backing: bool = False,
        _children: tuple = (),
        path: str | None = None,
    ):
        path = path or source.path
        if source is not None:
            source.close()  # an alias: only its path is needed
        if path is None:
            raise UsageError("an alias read from a pipe cannot name a directory beside it")
        self.cipher = remote_cipher(path)
        target = path
        if not os.path.isdir(path):
            target = resolve_alias(path, self.cipher)
            if not os.path.isdir(target):
                raise SourceError(f"{path}: names {target}, which is not a VHD directory")
        if not all(os.path.isfile(os.path.join(target, p)) for p in ("header", "footer")):
            raise SourceError(
                f"{target}: a directory, and not a VHD directory (no header and footer files)"
            )
        self.alias = path if target != path else None
        self.directory = target
        self.filters = self._filters()
        super().__init__(_DirectorySource(path, path), parent, no_backing, _children)

    # -- parts ---------------------------------------------------------------------------
    def _filters(self) -> list[str]:
        spec = os.path.join(self.directory, "chunk-filters.json")
        if not os.path.exists(spec):
            return []
        try:
            filters = json.loads(read_remote_file(spec, self.cipher, 4096))
        except ValueError:
            raise FormatError(f"{spec}: not a JSON list of filters") from None
        if not isinstance(filters, list) or any(f not in ("gzip", "brotli") for f in filters):
            raise UnsupportedError(f"{spec}: chunk filters {filters!r} (gzip and brotli are read)")
        return filters

    def part(self, name: str, limit: int | None = None) -> bytes:
        """One part file, decrypted and unfiltered (filters undone in reverse order)."""
        path = os.path.join(self.directory, name)
        # (limit is what the part holds; a compressed part may be a little larger)
        data = read_remote_file(path, self.cipher, None if limit is None else 2 * limit + 4096)
        for f in reversed(self.filters):
            try:
                data = zlib.decompress(data, 31) if f == "gzip" else _brotli().decompress(data)
            except UnsupportedError:
                raise
            except Exception as e:  # zlib.error, brotli.error
                raise IntegrityError(f"{path}: {f} data does not decompress: {e}") from None
        return data

    def block_path(self, index: int) -> str:
        return os.path.join(self.directory, "blocks", str(index // 1000), str(index % 1000))

    # -- what VhdArchive reads through ---------------------------------------------------
    def _open_file(self):
        name = self.source.name
        self.footer = Footer(self.part("footer", FOOTER)[:FOOTER], f"{name}: footer")
        self.head_footer = self.footer
        self.footer_at = None
        self.file_size = None
        raw = self.part("header", HEADER)
        if len(raw) < HEADER:
            raise FormatError(f"{name}: header part of {len(raw)} bytes, not {HEADER}")
        self.header = h = DynamicHeader(raw[:HEADER], f"{name}: header")
        if not (SECTOR <= h.block_size <= 1 << 28) or h.block_size & (h.block_size - 1):
            raise FormatError(f"{name}: block size {h.block_size} is not a power of two")
        if h.max_table_entries * h.block_size < self.footer.size:
            raise FormatError(
                f"{name}: {h.max_table_entries} blocks of {h.block_size} bytes cannot hold a "
                f"disk of {self.footer.size} bytes"
            )
        bits = self.part("bat", (h.max_table_entries + 7) // 8)
        if len(bits) * 8 < h.max_table_entries:
            raise FormatError(
                f"{name}: the bat part holds {len(bits) * 8} of {h.max_table_entries} bits"
            )
        self.bat = array("I", [UNALLOCATED]) * h.max_table_entries
        for i in range(h.max_table_entries):
            if bits[i >> 3] & (0x80 >> (i & 7)):  # the first block is the highest bit
                self.bat[i] = i
        self.bitmap_size = -(-(h.block_size // SECTOR) // 8 // SECTOR) * SECTOR
        self.sectors_per_block = h.block_size // SECTOR
        self.meta_end = 0

    def block_layers(self, index: int, bs: int, buf: bytearray | None = None):
        if index >= len(self.bat) or self.bat[index] == UNALLOCATED:
            return None
        path = self.block_path(index)
        where = f"block {index} (disk offset {index * bs})"
        try:
            raw = self.part(os.path.join("blocks", str(index // 1000), str(index % 1000)))
        except FormatError as e:
            raise type(e)(f"{self.source.name}: {where}: {e}") from None
        want = self.bitmap_size + self.header.block_size
        if len(raw) != want:
            raise FormatError(
                f"{self.source.name}: {where}: {path} holds {len(raw)} bytes, not {want}"
            )
        return raw[: self.bitmap_size], memoryview(raw)[self.bitmap_size :]

    def block_where(self, index: int) -> dict:
        return {"file": self.block_path(index)}

    def block_at(self, index: int, within: int):
        return None, self.block_path(index)

    def _cut_block(self, index: int, buf: bytearray):
        base = index * self.header.block_size
        return [], [(base, min(self.header.block_size, self.size - base))]

    def _parent_candidates(self):
        h = self.header
        if h.parent_name:  # chainVhd: relative to the child's own path (the alias)
            base = os.path.dirname(os.path.abspath(self.source.path))
            rel = h.parent_name.replace("\\", "/")
            yield "parent name", os.path.normpath(os.path.join(base, rel))

    def check_blocks(self, checks: Checks, block) -> None:
        """Each block the bat marks present has its file."""
        name = self.source.name
        for i, entry in enumerate(self.bat):
            if entry != UNALLOCATED and not os.path.isfile(self.block_path(i)):
                checks.fail(
                    FormatError(
                        f"{name}: block {i} (disk offset {i * self.header.block_size}): "
                        f"{self.block_path(i)} is missing",
                        [
                            Damage(
                                self.disks[0],
                                i * self.header.block_size,
                                min(self.header.block_size, self.size - i * self.header.block_size),
                                "missing",
                                block=i,
                                file=self.block_path(i),
                            )
                        ],
                    )
                )

    def details(self) -> dict:
        d = super().details()
        d["directory"] = self.directory
        if self.alias:
            d["alias"] = self.alias
        if self.filters:
            d["chunk_filters"] = self.filters
        if self.cipher:
            d["encryption"] = self.cipher[0]
        return d

    def checked(self):
        out = super().checked()
        for v in out.values():
            v["checked"] = [
                c.replace("inside the file, none overlapping", "each with its block file").replace(
                    " (and its copy at offset 0)", ""
                )
                for c in v["checked"]
            ]
            if self.cipher:
                v["checked"].append(f"every part's {self.cipher[0]} tag")
        return out


READERS = {"vhddir": VhdDirectoryArchive}
