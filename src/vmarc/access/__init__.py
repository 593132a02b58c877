"""Random access to the disks of archives and images (see open.py for the strategy)."""

from .chunks import ChunkChecks
from .index import cache_dir
from .maps import BAD, DiskMap
from .open import Opened, open_disks
from .views import ImageView, MappedDisk

__all__ = [
    "BAD",
    "ChunkChecks",
    "DiskMap",
    "ImageView",
    "MappedDisk",
    "Opened",
    "cache_dir",
    "open_disks",
]
