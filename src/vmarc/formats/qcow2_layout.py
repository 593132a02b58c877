"""qcow2's on-disk records and entry bits, declared once for the reader (qcow2.py), the
writer (qcow2.py) and the consistency check (qcow2check.py). docs/formats/qcow2.md."""

from __future__ import annotations

import struct

MAGIC = b"QFI\xfb"
# an L1/L2 entry: the host offset, and flags (compressed clusters keep sector count and
# offset in the low bits instead, see qcow2.Qcow2Archive._decompress)
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62
COPIED = 1 << 63
ZERO_FLAG = 1
KNOWN_INCOMPATIBLE = 0b11111  # dirty, corrupt, external data, compression type, extended L2
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441  # "DATA": the external data file's name

# version 2's header: magic, version, backing_file_offset, backing_file_size, cluster_bits,
# size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
# refcount_table_clusters, nb_snapshots, snapshots_offset
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# what version 3 adds after it: incompatible, compatible and autoclear features,
# refcount_order, header_length
HEADER_V3 = struct.Struct(">QQQII")
