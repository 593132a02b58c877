"""Unit tests of the pieces with logic of their own (extent maps, disk ordering, cluster
assembly, the zstd frame check, zero detection), each against a plain model of what it
must do, and checks of the code's structure (HACKING.md): no import cycle, no capability
probing, every registered format declares itself."""

import ast
import io
import os
import random

import pytest

from tests.support.helpers import ROOT
from vmarc.access.maps import BAD, DiskMap, merged_ranges, overlaps
from vmarc.access.views import _ExtentList
from vmarc.errors import TruncatedError, VmarcError
from vmarc.formats.clusters import ClusterAssembler
from vmarc.formats.disk_order import ORDERED, DiskSequencer
from vmarc.io.codecs import _ZstdFrameCheck
from vmarc.model import DATA, LOST, RANDOM, SCAN, STREAM, ZERO, Disk, Extent, data_runs, filled

SRC = os.path.join(ROOT, "src", "vmarc")


# -- extent maps ----------------------------------------------------------------------------
def _cover(extents, offset, length):
    """Asserts extents cover [offset, offset + length) in order without gaps."""
    pos = offset
    for e in extents:
        assert e.start == pos and e.length > 0, (e, pos)
        pos += e.length
    assert pos == offset + length


def test_disk_map_sorts_merges_and_covers_with_zeros_and_losses():
    rnd = random.Random(3)
    runs, pos = [], 0
    for _ in range(200):  # stored runs with gaps, some lost
        pos += rnd.choice([0, 0, 512, 4096])
        n = rnd.randint(1, 20) * 512
        runs.append((pos, n, BAD if rnd.random() < 0.1 else 10_000_000 + pos * 2))
        pos += n
    size = pos + 4096
    m = DiskMap()
    for r in rnd.sample(runs, len(runs)):  # VMA gives clusters in any order
        m.add(*r)
    m.finish()
    assert list(m.starts) == sorted(m.starts)
    for _ in range(300):
        a = rnd.randrange(size)
        n = rnd.randint(1, size - a)
        got = list(m.extents(a, n, "f"))
        _cover(got, a, n)
        for e in got:  # every byte's kind and place agree with the runs it came from
            for b in (e.start, e.start + e.length - 1):
                run = next((r for r in runs if r[0] <= b < r[0] + r[1]), None)
                if run is None:
                    assert e.kind == ZERO
                elif run[2] == BAD:
                    assert e.kind == LOST
                else:
                    assert e.kind == DATA and e.file == "f"
                    assert e.at + (b - e.start) == run[2] + (b - run[0])


def test_disk_map_refuses_overlapping_runs():
    m = DiskMap()
    m.add(0, 4096, 0)
    m.add(2048, 4096, 100_000)
    with pytest.raises(VmarcError, match="overlap"):
        m.finish()


def test_merged_ranges_and_overlaps():
    ranges = merged_ranges([(10, 5), (0, 3), (3, 2), (40, 1), (12, 10)])
    assert ranges == [(0, 5), (10, 12), (40, 1)]
    assert overlaps(ranges, 4, 1) and overlaps(ranges, 21, 5) and overlaps(ranges, 35, 6)
    assert not overlaps(ranges, 5, 5) and not overlaps(ranges, 22, 18)


def test_extent_list_merges_neighbours_and_clips():
    parts = [
        Extent(0, 100, DATA, 1000, "a"),
        Extent(100, 50, DATA, 1100, "a"),  # contiguous in a: merged
        Extent(150, 50, DATA, 1150, "b"),  # another file: not merged
        Extent(200, 10, ZERO, None, "a"),
        Extent(210, 30, ZERO, None, "a"),  # merged
        Extent(240, 10, DATA, None, "a", 1),  # compressed, one layer down
    ]
    lst = _ExtentList(parts)
    assert [(e.start, e.length, e.file) for e in lst.cover(0, 250)] == [
        (0, 150, "a"),
        (150, 50, "b"),
        (200, 40, "a"),
        (240, 10, "a"),
    ]
    got = list(lst.cover(120, 100))
    _cover(got, 120, 100)
    assert got[0] == Extent(120, 30, DATA, 1120, "a")
    assert got[-1] == Extent(200, 20, ZERO, None, "a")


def test_filled_puts_zeros_between_and_after():
    got = list(filled([Extent(10, 5, DATA, 0), Extent(20, 5, DATA, 5)], 0, 30, "f", 2))
    _cover(got, 0, 30)
    assert [e.kind for e in got] == [ZERO, DATA, ZERO, DATA, ZERO]
    assert got[0].depth == 2 and got[0].file == "f"


# -- disk ordering (the XVA writer) ---------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_disk_sequencer_gives_each_disk_whole_and_in_order(seed, monkeypatch):
    """Pieces of three disks arrive interleaved and out of order (as a live VMA backup
    gives them), with covered() saying how far each is given; chunks come out disk after
    disk, each once, in order, and put the disks back together."""
    import vmarc.formats.disk_order as order

    monkeypatch.setattr(order, "HOLD_MEMORY", [1 << 30, 20_000, 0][seed % 3])  # memory, file
    rnd = random.Random(seed)
    chunk = 4096
    disks = [Disk(f"d{i}", f"d{i}", rnd.randint(1, 40) * 1000) for i in range(3)]
    data = {d.id: bytearray(rnd.randbytes(d.size)) for d in disks}
    for d in disks:  # zero stretches the source never gives
        for _ in range(3):
            a, k = rnd.randrange(d.size), rnd.randint(0, 9000)
            data[d.id][a : a + k] = bytes(len(data[d.id][a : a + k]))
    pieces = []
    for d in disks:
        pos = 0
        while pos < d.size:
            n = min(rnd.randint(1, 3000), d.size - pos)
            if any(data[d.id][pos : pos + n]):
                pieces.append((d, pos, n))
            pos += n
    rnd.shuffle(pieces)
    given = {d.id: [] for d in disks}  # what the source has given so far, per disk

    def covered(disk):  # the lowest offset not yet given (the rest may still come)
        if seed % 2:
            return ORDERED if disk.id == "never" else _below_missing(disk)
        return _below_missing(disk)

    def _below_missing(disk):
        left = [p for p in pieces[step + 1 :] if p[0] is disk]
        return min((p[1] for p in left), default=disk.size)

    out = {d.id: bytearray(d.size) for d in disks}
    emitted = []

    def emit(i, j, view):
        emitted.append((i, j))
        d = disks[i]
        out[d.id][j * chunk : j * chunk + len(view)] = view

    finished = []
    seq = DiskSequencer(disks, emit, finished.append, covered, chunk=chunk)
    for step, (d, pos, n) in enumerate(pieces):
        given[d.id].append(pos)
        seq.add(d, pos, memoryview(bytes(data[d.id][pos : pos + n])))
    seq.close()
    assert finished == [0, 1, 2]
    assert emitted == sorted(emitted) and len(set(emitted)) == len(emitted)
    for d in disks:
        assert out[d.id] == data[d.id], d.id


def test_disk_sequencer_finish_disk_lets_the_next_disk_through():
    """A source that ends a disk says so: the next disk's pieces then go straight out
    instead of being held."""
    a, b = Disk("a", "a", 10_000), Disk("b", "b", 10_000)
    emitted = []
    seq = DiskSequencer([a, b], lambda i, j, v: emitted.append((i, j)), lambda i: None, chunk=4096)
    seq.add(a, 0, memoryview(b"x" * 100))
    seq.finish_disk(a)
    seq.add(b, 0, memoryview(b"y" * 5000))
    assert seq.memory_bytes == 0 and (1, 0) in emitted
    seq.close()


# -- cluster assembly (VMA and qcow2 writers) -----------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_cluster_assembler_hands_over_whole_clusters_once(seed):
    rnd = random.Random(seed)
    csize, size = 4096, rnd.randint(10, 50) * 1000 + rnd.randint(0, 999)
    disk = rnd.randbytes(size)
    got = {}

    def put(i, view):
        assert i not in got
        assert len(view) == min(csize, size - i * csize)
        got[i] = bytes(view)

    asm = ClusterAssembler(csize, size, put)
    clusters = list(range(-(-size // csize)))
    given = rnd.sample(clusters, len(clusters) * 2 // 3)
    for c in given:  # each cluster's pieces one after another, clusters in any order
        pos, end = c * csize, min((c + 1) * csize, size)
        while pos < end:
            n = min(rnd.randint(1, 3000), end - pos)
            asm.add(pos, memoryview(disk[pos : pos + n]))
            pos += n
    asm.flush()
    assert sorted(got) == sorted(given)
    assert list(asm.missing()) == sorted(set(clusters) - set(given))
    for c, blob in got.items():
        assert blob == disk[c * csize : c * csize + len(blob)]
    with pytest.raises(RuntimeError, match="twice"):
        asm.add(given[0] * csize, memoryview(disk[given[0] * csize : given[0] * csize + 1]))
        asm.flush()


# -- the zstd frame check -------------------------------------------------------------------
def test_zstd_frame_check_tells_a_cut_stream_from_a_whole_one():
    zstandard = pytest.importorskip("zstandard")  # an extra: part of .[all]
    rnd = random.Random(5)
    payload = rnd.randbytes(300_000) + bytes(200_000)
    c = zstandard.ZstdCompressor(write_checksum=True)
    stream = c.compress(payload) + c.compress(b"second frame")

    def read_all(blob):
        check = _ZstdFrameCheck(io.BytesIO(blob), "t.zst")
        out = zstandard.ZstdDecompressor().stream_reader(check, read_across_frames=True)
        return b"".join(iter(lambda: out.read(65536), b""))

    assert read_all(stream) == payload + b"second frame"
    for cut in sorted({1, 3, 4, 5, 17, 1000, len(stream) // 2, len(stream) - 1}):
        with pytest.raises((TruncatedError, VmarcError, zstandard.ZstdError)):
            read_all(stream[:cut])


# -- zero detection ---------------------------------------------------------------------------
def test_data_runs_matches_a_block_by_block_model():
    rnd = random.Random(9)
    for _ in range(200):
        n = rnd.randint(0, 40_000)
        buf = bytearray(rnd.randbytes(n))
        for _ in range(rnd.randint(0, 8)):
            a, k = rnd.randrange(n + 1), rnd.randint(0, 12_000)
            buf[a : a + k] = bytes(len(buf[a : a + k]))
        if rnd.random() < 0.3:  # the partial blocks at either end
            k = rnd.randint(0, 5000)
            buf[:k] = bytes(len(buf[:k]))
        if rnd.random() < 0.3:
            k = rnd.randint(0, 5000)
            buf[len(buf) - k :] = bytes(len(buf[len(buf) - k :]))
        offset = rnd.randrange(1 << 20)
        block = 4096
        want, pos = [], 0
        while pos < n:  # the model: cut at disk block boundaries, keep non-zero blocks
            stop = min(n, pos + block - (offset + pos) % block)
            if any(buf[pos:stop]):
                if want and want[-1][1] == pos:
                    want[-1] = (want[-1][0], stop)
                else:
                    want.append((pos, stop))
            pos = stop
        assert data_runs(memoryview(bytes(buf)), offset, block) == want


# -- structure (HACKING.md) -------------------------------------------------------------------
def _modules():
    for d, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                mod = "vmarc." + os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                yield mod.removesuffix(".__init__"), path


def test_no_import_cycle_even_through_imports_inside_functions():
    mods = dict(_modules())
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(open(path).read())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{name}.{alias.name}"
                    deps.add(full if full in mods else name)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif not state.get(d):
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if not state.get(n):
            visit(n, [])
    assert cycles == []


def test_no_capability_probing():
    """Formats declare what they can do (Archive.access, layered, probe); nothing asks
    an object whether it has an attribute."""
    found = []
    for mod, path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in ("hasattr", "getattr"):
                    found.append(f"{mod}:{node.lineno}")
    assert found == []


def test_every_registered_format_declares_itself():
    from vmarc.formats import MODULES, readers

    found = readers()
    assert set(MODULES) <= set(found)
    for name, cls in found.items():
        assert cls.access in (STREAM, SCAN, RANDOM), name
        assert isinstance(cls.layered, bool) and cls.format != "?", name
        assert not cls.probe(b""), name  # an empty input is nothing
