"""XVA reading: every quirk of docs/formats/xva.md converts to the exact bytes of the disk."""

import json
import os

import pytest

import vmarc
from tests.support import xvagen as g
from tests.support.helpers import assert_clean_failure
from tests.support.helpers import vmarc as run

MiB = g.MiB


def two_disk_spec(**kw):
    d1 = g.pattern_disk(5 * MiB + 1234, zero_chunks={2})
    d2 = g.pattern_disk(3 * MiB, zero_chunks={1}, seed=2)
    # Ref:10 sorts before Ref:9: disks arrive in string order of their ids.
    disks = [g.XDisk("Ref:10", d1, "root disk", "0"), g.XDisk("Ref:9", d2, "data disk", "1")]
    return g.XvaSpec(disks=disks, **kw)


def convert_bytes(path, disk, tmp_path, *extra):
    out = tmp_path / f"out-{disk}.raw"
    res = run("convert", path, out, "--disk", disk, *extra)
    assert res.code == 0, res
    return out.read_bytes()


QUIRKS = {
    "xapi-v7-xxhash": {},
    "ustar-headers": {"header": "ustar"},
    "sha1-checksums": {"checksum": "sha1"},
    "keepalives": {"keepalives": {"Ref:10": {1, 3}, "Ref:9": {1}}},
    "zero-chunks-written": {"write_zero_chunks": True},
    "xo-padded-last-chunk": {"xo_style": True, "header": "ustar"},
    "keepalive-and-sha1-ustar": {
        "keepalives": {"Ref:10": {2}},
        "checksum": "sha1",
        "header": "ustar",
    },
}


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_quirks_convert_exactly(quirk, tmp_path):
    spec = two_disk_spec(**QUIRKS[quirk])
    path = tmp_path / "vm.xva"
    g.write(path, spec)
    assert run("verify", path).code == 0
    assert convert_bytes(path, "xvda", tmp_path) == spec.disks[0].data
    assert convert_bytes(path, "Ref:9", tmp_path) == spec.disks[1].data


def test_keepalive_shifts_numbering(tmp_path):
    """A keepalive takes chunk number 1, so chunk 00000002 holds disk offset 1 MiB.
    Placing chunk N at N MiB (the device-mapper script's way) would corrupt this disk."""
    data = g.pattern_disk(4 * MiB)
    spec = g.XvaSpec(disks=[g.XDisk("Ref:1", data)], keepalives={"Ref:1": {1}})
    names = [n for n, _ in g.chunk_members(spec.disks[0], spec)]
    assert names == [
        "Ref:1/00000000",
        "Ref:1/00000001",
        "Ref:1/00000002",
        "Ref:1/00000003",
        "Ref:1/00000004",
    ]
    g.write(tmp_path / "k.xva", spec)
    assert convert_bytes(tmp_path / "k.xva", "0", tmp_path) == data


def test_keepalive_then_skipped_zero_chunks(tmp_path):
    data = g.pattern_disk(8 * MiB, zero_chunks={3, 4, 5})
    spec = g.XvaSpec(disks=[g.XDisk("Ref:1", data)], keepalives={"Ref:1": {2}})
    g.write(tmp_path / "k.xva", spec)
    assert convert_bytes(tmp_path / "k.xva", "xvda", tmp_path) == data


def test_xo_zero_last_chunk_with_unpadded_name(tmp_path):
    """Xen Orchestra names a zero last chunk by the chunk count without padding."""
    data = g.pattern_disk(3 * MiB + 4096, zero_chunks={1, 2, 3})
    spec = g.XvaSpec(disks=[g.XDisk("Ref:1", data)], xo_style=True, header="ustar")
    names = [n for n, _ in g.chunk_members(spec.disks[0], spec)]
    assert names[-1] == "Ref:1/4"
    g.write(tmp_path / "xo.xva", spec)
    assert run("verify", tmp_path / "xo.xva").code == 0
    assert convert_bytes(tmp_path / "xo.xva", "xvda", tmp_path) == data


@pytest.mark.parametrize("size", [1, 4096, MiB - 1, MiB, MiB + 1, 3 * MiB])
def test_small_and_boundary_sizes(size, tmp_path):
    data = g.pattern_disk(size)
    g.write(tmp_path / "s.xva", g.XvaSpec(disks=[g.XDisk("Ref:3", data)]))
    assert convert_bytes(tmp_path / "s.xva", "xvda", tmp_path) == data


def test_last_chunk_zero_is_still_written_and_read(tmp_path):
    data = g.pattern_disk(4 * MiB, zero_chunks={1, 2, 3})
    spec = g.XvaSpec(disks=[g.XDisk("Ref:3", data)])
    names = [n for n, _ in g.chunk_members(spec.disks[0], spec)]
    assert names == ["Ref:3/00000000", "Ref:3/00000003"]
    g.write(tmp_path / "z.xva", spec)
    assert convert_bytes(tmp_path / "z.xva", "xvda", tmp_path) == data


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_compressed_detected_by_magic(how, tmp_path):
    spec = two_disk_spec(compress=how, keepalives={"Ref:10": {3}})
    path = tmp_path / "vm.xva"  # the name says nothing of the compression
    g.write(path, spec)
    info = json.loads(run("info", path, "--output", "json").out)
    assert info["compression"] == how
    assert convert_bytes(path, "xvdb", tmp_path) == spec.disks[1].data
    assert run("verify", path).code == 0


@pytest.mark.parametrize("how", [None, "gzip", "zstd"])
def test_from_stdin(how, tmp_path):
    spec = two_disk_spec(compress=how)
    path = tmp_path / "vm.xva"
    g.write(path, spec)
    with open(path, "rb") as f:
        res = run("convert", "-", tmp_path / "o.raw", "--disk", "xvda", stdin=f)
    assert res.code == 0, res
    assert (tmp_path / "o.raw").read_bytes() == spec.disks[0].data
    with open(path, "rb") as f:
        assert run("verify", "-", stdin=f).code == 0


def test_convert_to_stdout(tmp_path):
    spec = two_disk_spec(keepalives={"Ref:9": {1}})
    g.write(tmp_path / "vm.xva", spec)
    res = run("convert", tmp_path / "vm.xva", "-", "--disk", "xvdb")
    assert res.code == 0, res
    assert res.out == spec.disks[1].data


def test_info_json(tmp_path):
    spec = two_disk_spec()
    g.write(tmp_path / "vm.xva", spec)
    info = json.loads(run("info", tmp_path / "vm.xva", "--output", "json").out)
    assert info["format"] == "xva"
    assert info["compression"] is None
    assert info["vm"]["name"] == "test-vm"
    assert info["vm"]["memory"] == 2 * 1024 * MiB
    assert info["vm"]["vcpus"] == 2
    disks = {d["id"]: d for d in info["disks"]}
    assert set(disks) == {"Ref:10", "Ref:9"}  # the CD drive is not a disk
    assert disks["Ref:10"] == {
        **disks["Ref:10"],
        "name": "root disk",
        "size": 5 * MiB + 1234,
        "device": "xvda",
    }
    assert disks["Ref:9"]["device"] == "xvdb"
    assert [c["name"] for c in info["configs"]] == ["ova.xml"]
    assert info["configs"][0]["size"] > 0 and "content" not in info["configs"][0]


def test_selection_errors(tmp_path):
    g.write(tmp_path / "vm.xva", two_disk_spec())
    res = run("convert", tmp_path / "vm.xva", tmp_path / "o.raw")
    assert_clean_failure(res, 1, "2 disks", "--disk")
    res = run("convert", tmp_path / "vm.xva", tmp_path / "o.raw", "--disk", "xvdq")
    assert_clean_failure(res, 1, "no disk matches")
    assert not os.path.exists(tmp_path / "o.raw")


def test_sparse_output_of_large_disk(tmp_path):
    """A 64 GiB disk holding 3 MiB of data allocates about 3 MiB."""
    size = 64 << 30
    sparse = {
        0: g.pattern_disk(MiB, seed=5),
        40000: g.pattern_disk(MiB, seed=6),
        size // MiB - 1: g.pattern_disk(MiB, seed=7),
    }
    spec = g.XvaSpec(disks=[g.XDisk("Ref:1", None, size=size, sparse=sparse)])
    g.write(tmp_path / "big.xva", spec)
    out = tmp_path / "big.raw"
    res = run("convert", tmp_path / "big.xva", out)
    assert res.code == 0, res
    st = os.stat(out)
    assert st.st_size == size
    assert st.st_blocks * 512 < 8 * MiB, st.st_blocks * 512
    with open(out, "rb") as f:
        for chunk, data in sparse.items():
            f.seek(chunk * MiB)
            assert f.read(MiB) == data
        f.seek(20000 * MiB)
        assert f.read(MiB) == bytes(MiB)


def test_extract_all_disks_and_metadata(tmp_path):
    spec = two_disk_spec(compress="gzip")
    g.write(tmp_path / "vm.xva.gz", spec)
    dest = tmp_path / "out"
    res = run("extract", tmp_path / "vm.xva.gz", dest)
    assert res.code == 0, res
    assert sorted(os.listdir(dest)) == ["ova.xml", "xvda.raw", "xvdb.raw"]
    assert (dest / "xvda.raw").read_bytes() == spec.disks[0].data
    assert (dest / "xvdb.raw").read_bytes() == spec.disks[1].data
    assert (dest / "ova.xml").read_bytes() == g.ova_xml(spec)
    # the directory must not exist yet
    assert_clean_failure(run("extract", tmp_path / "vm.xva.gz", dest), 1, "already exists")


def test_extract_one_disk(tmp_path):
    spec = two_disk_spec()
    g.write(tmp_path / "vm.xva", spec)
    res = run("extract", tmp_path / "vm.xva", tmp_path / "one", "--disk", "xvdb")
    assert res.code == 0, res
    assert sorted(os.listdir(tmp_path / "one")) == ["ova.xml", "xvdb.raw"]


def test_python_api_stream(tmp_path):
    spec = two_disk_spec(keepalives={"Ref:10": {4}})
    g.write(tmp_path / "vm.xva", spec)
    with vmarc.open(tmp_path / "vm.xva") as archive:
        assert [d.id for d in archive.disks] == ["Ref:10", "Ref:9"]
        rebuilt = {d.id: bytearray(d.size) for d in archive.disks}
        for disk, offset, data in archive.stream():
            rebuilt[disk.id][offset : offset + len(data)] = data
    assert bytes(rebuilt["Ref:10"]) == spec.disks[0].data
    assert bytes(rebuilt["Ref:9"]) == spec.disks[1].data


@pytest.mark.parametrize("tool", [True, False])
def test_zstd_with_and_without_the_zstd_tool(tool, tmp_path, monkeypatch):
    """The zstd tool (a separate process) and python-zstandard (fallback) read alike,
    and both refuse a stream cut in the middle of a frame."""
    import shutil

    import vmarc.io.codecs

    if not tool:
        real = shutil.which
        monkeypatch.setattr(
            vmarc.io.codecs.shutil, "which", lambda name: None if name == "zstd" else real(name)
        )
    spec = two_disk_spec(compress="zstd")
    data = g.build(spec)
    (tmp_path / "vm.xva").write_bytes(data)
    from vmarc.ops.convert import convert

    with vmarc.open(tmp_path / "vm.xva") as a:
        convert(a, str(tmp_path / "o.raw"), disk="xvdb")
    assert (tmp_path / "o.raw").read_bytes() == spec.disks[1].data
    (tmp_path / "cut.xva").write_bytes(data[: len(data) // 2])
    with pytest.raises(vmarc.TruncatedError):
        with vmarc.open(tmp_path / "cut.xva") as a:
            convert(a, str(tmp_path / "o2.raw"), disk="xvdb")
    assert not (tmp_path / "o2.raw").exists()
    # from a pipe (the tool gets the sniffed bytes replayed)
    with open(tmp_path / "vm.xva", "rb") as f:
        res = run("convert", "-", tmp_path / "o3.raw", "--disk", "xvda", stdin=f)
    assert res.code == 0, res
    assert (tmp_path / "o3.raw").read_bytes() == spec.disks[0].data
