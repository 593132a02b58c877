"""Damaged, truncated and hostile XVAs: one clear line, the right exit code, no output."""

import gzip
import os
import time

import pytest

from tests.support import xvagen as g
from tests.support.helpers import assert_clean_failure, vmarc_peak
from tests.support.helpers import vmarc as run

MiB = g.MiB


def spec1(**kw):
    return g.XvaSpec(disks=[g.XDisk("Ref:1", g.pattern_disk(3 * MiB + 100))], **kw)


def assemble(members, tail=True):
    """An archive from (name, data) members, no checksums added."""
    out = b"".join(g.tar_member(n, d) for n, d in members)
    return out + (bytes(1024) if tail else b"")


def chunk_pairs(spec):
    out = []
    for d in spec.disks:
        for name, data in g.chunk_members(d, spec):
            out.append((name, data))
            out.append((name + ".xxhash", ("%016X" % g.xxhash.xxh64_intdigest(data)).encode()))
    return out


def assert_no_output_left(tmp_path, keep=()):
    left = sorted(p for p in os.listdir(tmp_path) if p not in keep)
    assert left == [], left


def test_flipped_byte_in_each_chunk(tmp_path):
    spec = spec1()
    clean = g.build(spec)
    for name, data in g.chunk_members(spec.disks[0], spec):
        hdr = clean.index(name.encode() + b"\0")
        pos = hdr + 512 + min(777, len(data) - 1)  # a byte inside that chunk's data
        bad = bytearray(clean)
        bad[pos] ^= 0x40
        path = tmp_path / "bad.xva"
        path.write_bytes(bad)
        res = run("verify", path)
        assert res.code == 2, res
        assert f"chunk {name} " in res.text and "checksum mismatch" in res.text, res
        res = run("convert", path, tmp_path / "out.raw")
        assert_clean_failure(res, 2, name, "checksum mismatch")
        assert_no_output_left(tmp_path, keep={"bad.xva"})


def test_verify_names_every_bad_chunk(tmp_path):
    spec = spec1()
    clean = bytearray(g.build(spec))
    for name in ("Ref:1/00000001", "Ref:1/00000003"):
        clean[clean.index(name.encode() + b"\0") + 512 + 5] ^= 1
    (tmp_path / "bad.xva").write_bytes(clean)
    res = run("verify", tmp_path / "bad.xva")
    assert res.code == 2
    assert "Ref:1/00000001" in res.text and "Ref:1/00000003" in res.text


@pytest.mark.parametrize("kind", ["sha1", "xxhash"])
def test_wrong_checksum_text(kind, tmp_path):
    spec = spec1(checksum=kind)
    raw = g.build(spec)
    ext = b".xxhash" if kind == "xxhash" else b".checksum"
    at = raw.index(b"Ref:1/00000001" + ext) + 512
    bad = bytearray(raw)
    bad[at : at + 2] = b"zz"  # not hex any more
    (tmp_path / "bad.xva").write_bytes(bad)
    res = run("verify", tmp_path / "bad.xva")
    assert res.code == 2 and "Ref:1/00000001" in res.text, res
    bad = bytearray(raw)
    bad[at : at + 1] = b"0" if raw[at : at + 1] != b"0" else b"1"  # valid hex, wrong value
    (tmp_path / "bad.xva").write_bytes(bad)
    res = run("verify", tmp_path / "bad.xva")
    assert res.code == 2 and "checksum mismatch" in res.text, res


@pytest.mark.parametrize("how", [None, "gzip", "zstd"])
def test_truncated_anywhere(how, tmp_path):
    spec = spec1()
    raw = g.build(spec)
    for cut in (600, 512 * 7, len(raw) // 2, len(raw) - 1024, len(raw) - 700, len(raw) - 1):
        data = g.compress(raw[:cut], how)
        path = tmp_path / "cut.xva"
        path.write_bytes(data)
        res = run("verify", path)
        assert res.code == 2, (cut, res)
        res = run("convert", path, tmp_path / "out.raw")
        if cut >= len(raw) - 1024:
            # only the end-of-archive blocks are cut: the disk is complete and verified
            assert res.code == 0, (cut, res)
            lines = res.errtext.splitlines()
            assert len(lines) == 1 and "warning" in lines[0] and "damaged" in lines[0], res
            assert (tmp_path / "out.raw").read_bytes() == spec.disks[0].data
            (tmp_path / "out.raw").unlink()
            continue
        assert_clean_failure(res, 2)
        assert_no_output_left(tmp_path, keep={"cut.xva"})


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_truncated_compressed_stream(how, tmp_path):
    data = g.compress(g.build(spec1()), how)
    (tmp_path / "cut.xva").write_bytes(data[: len(data) * 2 // 3])
    res = run("convert", tmp_path / "cut.xva", tmp_path / "out.raw")
    assert_clean_failure(res, 2, "truncated")
    assert_no_output_left(tmp_path, keep={"cut.xva"})


def test_missing_last_chunk(tmp_path):
    spec = spec1()
    pairs = chunk_pairs(spec)[:-2]  # drop the last chunk and its checksum
    (tmp_path / "x.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + pairs))
    res = run("verify", tmp_path / "x.xva")
    assert res.code == 2 and "incomplete" in res.text and "last chunk" in res.text, res
    assert_clean_failure(run("convert", tmp_path / "x.xva", tmp_path / "o.raw"), 2, "incomplete")


def test_missing_checksum_member(tmp_path):
    spec = spec1()
    pairs = chunk_pairs(spec)
    del pairs[3]  # checksum of the second chunk
    (tmp_path / "x.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + pairs))
    assert_clean_failure(
        run("convert", tmp_path / "x.xva", tmp_path / "o.raw"), 2, "expected Ref:1/00000001.xxhash"
    )


def test_suffix_must_increase(tmp_path):
    spec = spec1()
    pairs = chunk_pairs(spec)
    pairs[2:4], pairs[4:6] = pairs[4:6], pairs[2:4]
    (tmp_path / "x.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + pairs))
    res = run("verify", tmp_path / "x.xva")
    assert res.code == 2 and "string order" in res.text, res


def test_chunk_of_unknown_disk_and_disk_order(tmp_path):
    a = g.XDisk("Ref:1", g.pattern_disk(2 * MiB))
    b = g.XDisk("Ref:2", g.pattern_disk(2 * MiB, seed=3), userdevice="1")
    spec = g.XvaSpec(disks=[a, b])
    pairs = chunk_pairs(spec)
    wrong_order = pairs[4:] + pairs[:4]  # Ref:2 before Ref:1
    (tmp_path / "x.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + wrong_order))
    res = run("verify", tmp_path / "x.xva")
    assert res.code == 2 and "incomplete" in res.text, res
    alien = [(n.replace("Ref:2", "Ref:77"), d) for n, d in pairs]
    (tmp_path / "y.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + alien))
    res = run("verify", tmp_path / "y.xva")
    assert res.code == 2 and "Ref:77" in res.text and "not a disk" in res.text, res


def test_chunk_after_disk_complete(tmp_path):
    spec = spec1()
    pairs = chunk_pairs(spec)
    extra = [
        ("Ref:1/00000009", b"x" * 10),
        ("Ref:1/00000009.xxhash", ("%016X" % g.xxhash.xxh64_intdigest(b"x" * 10)).encode()),
    ]
    (tmp_path / "x.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + pairs + extra))
    res = run("verify", tmp_path / "x.xva")
    assert res.code == 2 and "already complete" in res.text, res


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "Ref:1/../../x", "Ref:1/00000001/../00000002"]
)
def test_hostile_member_names(name, tmp_path):
    spec = spec1()
    pairs = chunk_pairs(spec)
    pairs.insert(2, (name, b"hello"))
    (tmp_path / "x.xva").write_bytes(assemble([("ova.xml", g.ova_xml(spec))] + pairs))
    res = run("extract", tmp_path / "x.xva", tmp_path / "out")
    assert_clean_failure(res, 2, "unexpected member")
    assert_no_output_left(tmp_path, keep={"x.xva"})


def test_member_claiming_a_terabyte(tmp_path):
    spec = spec1()
    hdr = bytearray(g.tar_header("Ref:1/00000000", 0))
    hdr[124:136] = b"\x80" + (1 << 40).to_bytes(11, "big")  # GNU base-256 size
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    data = g.tar_member("ova.xml", g.ova_xml(spec)) + bytes(hdr) + b"\0" * 4096
    (tmp_path / "x.xva").write_bytes(data)
    t = time.monotonic()
    res = run("convert", tmp_path / "x.xva", tmp_path / "o.raw")
    assert time.monotonic() - t < 20
    assert_clean_failure(res, 2, "at most 1 MiB")
    hdr2 = bytearray(g.tar_header("ova.xml", 0))
    hdr2[124:136] = b"\x80" + (1 << 40).to_bytes(11, "big")
    hdr2[148:156] = b" " * 8
    hdr2[148:156] = b"%06o\0 " % sum(hdr2)
    (tmp_path / "y.xva").write_bytes(bytes(hdr2) + bytes(4096))
    assert_clean_failure(run("info", tmp_path / "y.xva"), 2, "ova.xml member claims")


def test_bad_tar_header_checksum(tmp_path):
    raw = bytearray(g.build(spec1()))
    at = raw.index(b"Ref:1/00000001\0")
    raw[at + 100] ^= 1  # the mode field: only the header checksum notices
    (tmp_path / "x.xva").write_bytes(raw)
    assert_clean_failure(
        run("convert", tmp_path / "x.xva", tmp_path / "o.raw"), 2, "header checksum mismatch"
    )


@pytest.mark.parametrize(
    "xml",
    [
        b"<value><struct><member>",
        b"not xml at all",
        b"<methodCall/>",
        b"<value><struct></struct></value>",
    ],
)
def test_bad_ova_xml(xml, tmp_path):
    spec = spec1(ova_xml=xml)
    (tmp_path / "x.xva").write_bytes(g.build(spec))
    assert_clean_failure(run("info", tmp_path / "x.xva"), 2, "ova.xml")
    res = run("verify", tmp_path / "x.xva")
    assert res.code == 2 and "ova.xml" in res.text, res


def test_bad_virtual_size(tmp_path):
    xml = g.ova_xml(spec1()).replace(b"<value>3145828</value>", b"<value>lots</value>")
    (tmp_path / "x.xva").write_bytes(g.build(spec1(ova_xml=xml)))
    assert_clean_failure(run("info", tmp_path / "x.xva"), 2, "virtual_size")


def test_junk_empty_missing(tmp_path):
    (tmp_path / "junk.xva").write_bytes(os.urandom(5000))
    assert_clean_failure(run("verify", tmp_path / "junk.xva"), 1, "not an archive")
    assert_clean_failure(
        run("convert", tmp_path / "junk.xva", tmp_path / "o.raw"), 1, "not an archive"
    )
    (tmp_path / "empty.xva").write_bytes(b"")
    assert_clean_failure(run("info", tmp_path / "empty.xva"), 1, "empty")
    (tmp_path / "empty.gz").write_bytes(gzip.compress(b""))
    assert_clean_failure(run("info", tmp_path / "empty.gz"), 1, "empty")
    assert_clean_failure(run("verify", tmp_path / "nope.xva"), 1, "cannot open")
    assert_clean_failure(run("info", tmp_path), 1, "directory")
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b" + os.urandom(100))
    res = run("verify", tmp_path / "junk.gz")
    assert "Traceback" not in res.errtext and res.code in (1, 2), res
    assert_no_output_left(tmp_path, keep={"junk.xva", "empty.xva", "empty.gz", "junk.gz"})


def test_usage_errors_exit_1(tmp_path):
    res = run("convert")
    assert res.code == 1 and "Traceback" not in res.errtext
    res = run("frobnicate")
    assert res.code == 1


def test_data_past_the_virtual_size_is_damage_padding_is_not(tmp_path):
    data = g.pattern_disk(3 * MiB)
    for tail, code in ((bytes(4096), 0), (b"\x01" * 4096, 2)):
        disk = g.XDisk("Ref:1", data[:-4096] + tail, "d", "0")
        spec = g.XvaSpec(disks=[disk])
        xml = g.ova_xml(spec).replace(str(len(data)).encode(), str(len(data) - 4096).encode())
        spec.ova_xml = xml
        path = tmp_path / "v.xva"
        g.write(path, spec)
        res = run("verify", path)
        assert res.code == code, res
        res = run("convert", path, tmp_path / "o.raw")
        if code:
            assert_clean_failure(res, 2, "past the disk's size")
            res = run("convert", path, tmp_path / "o.raw", "--salvage")
            # salvage keeps the tail: the output grows past ova.xml's size to hold it
            assert res.code == 2 and (tmp_path / "o.raw").read_bytes() == data[:-4096] + tail, res
            res = run("convert", path, tmp_path / "o.vhd", "-O", "vpc", "--salvage")
            assert res.code == 2, res  # a VHD keeps ova.xml's size
        else:
            assert res.code == 0 and (tmp_path / "o.raw").read_bytes() == data[:-4096], res
        for p in tmp_path.glob("o.raw*"):
            p.unlink()


def test_a_negative_pax_size_is_one_line(tmp_path):
    spec = spec1()
    blob = g.build(spec)
    first = blob.index(b"Ref:1/00000000\0")  # the first chunk's header
    record = b"11 size=-5\n"
    pax = bytearray(g.tar_header("PaxHeader", len(record)))
    pax[156:157] = b"x"
    pax[148:156] = b" " * 8
    pax[148:156] = b"%06o\0 " % sum(pax)
    bad = blob[:first] + bytes(pax) + record + bytes(-len(record) % 512) + blob[first:]
    (tmp_path / "pax.xva").write_bytes(bad)
    for cmd in ("verify", "convert"):
        args = [cmd, tmp_path / "pax.xva"] + ([tmp_path / "o.raw"] if cmd == "convert" else [])
        res = run(*args)
        assert res.code == 2 and "bad size" in res.errtext + res.text, res
        assert "Traceback" not in res.errtext


def test_an_ova_xml_nested_too_deep_is_one_line(tmp_path):
    spec = spec1()
    deep = b"<value><array><data>" * 2000 + b"<value>x</value>" + b"</data></array></value>" * 2000
    spec.ova_xml = deep
    path = tmp_path / "deep.xva"
    g.write(path, spec)
    assert_clean_failure(run("convert", path, tmp_path / "o.raw"), 2, "deep")


def test_a_zstd_window_over_128_mib_needs_permission(tmp_path):
    import subprocess

    path = tmp_path / "zeros.img.zst"
    with open(path, "wb") as f:  # from a pipe: no content size, the window stays 256 MiB
        zeros = subprocess.Popen(
            ["head", "-c", str(160 << 20), "/dev/zero"], stdout=subprocess.PIPE
        )
        subprocess.run(["zstd", "-q", "--long=28", "-c"], stdin=zeros.stdout, stdout=f, check=True)
        zeros.wait()
    res = run("convert", path, tmp_path / "o.raw", "-f", "raw")
    assert res.code == 1 and "VMARC_ZSTD_LONG=1" in res.errtext, res
    assert "Traceback" not in res.errtext


def test_an_ova_xml_element_bomb_costs_no_memory(tmp_path):
    spec = spec1()
    spec.ova_xml = b"<value><array><data>" + b"<value/>" * 3_000_000 + b"</data></array></value>"
    spec.compress = "gzip"
    path = tmp_path / "bomb.xva.gz"
    g.write(path, spec)
    assert path.stat().st_size < 1 << 20  # small on disk, 24 MB of XML inside
    res, peak = vmarc_peak("info", path)
    assert res.code == 2 and "more than 200,000 elements" in res.errtext, res
    assert peak < 256 * 1024, peak  # KiB


def test_an_object_listed_twice_in_ova_xml_is_refused(tmp_path):
    spec = spec1()
    xml = g.ova_xml(spec)
    start = xml.index(b"<value><struct><member><name>class</name>")
    depth, pos = 0, start
    while True:  # the object's own closing </struct>
        opening, closing = xml.find(b"<struct>", pos), xml.find(b"</struct>", pos)
        if opening != -1 and opening < closing:
            depth, pos = depth + 1, opening + 8
            continue
        depth, pos = depth - 1, closing + 9
        if depth == 0:
            break
    first = xml[start : pos + len(b"</value>")]
    spec.ova_xml = xml.replace(first, first + first, 1)  # the first object, twice
    g.write(tmp_path / "dup.xva", spec)
    assert_clean_failure(
        run("convert", tmp_path / "dup.xva", tmp_path / "o.raw"), 2, "lists object Ref:0 twice"
    )
