"""Sources at a URL, read in place by range requests: nginx for HTTP (bytes counted at the
server), moto's S3 emulator, a server without ranges, and a server that dies mid-read."""

import os
import subprocess

import pytest

from tests.support import servers, vmagen
from tests.support import xvagen as g
from tests.support.helpers import assert_clean_failure, need
from tests.support.helpers import vmarc as run

MiB = 1 << 20


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def files(tmp_path):
    """An XVA (plain and gzip), a VMA (zstd) and a qcow2 of known disks."""
    need("qemu-img")
    d = tmp_path / "srv"
    d.mkdir()
    disk = g.pattern_disk(24 * MiB, zero_chunks={3, 4, 5, 9}, seed=4)
    for name, how in (("vm.xva", None), ("vm.xva.gz", "gzip")):
        g.write(d / name, g.XvaSpec(disks=[g.XDisk("Ref:1", disk, "d", "0")], compress=how))
    vma_disk = vmagen.disk_bytes(16 * MiB, seed=2)
    plain = vmagen.build([("drive-scsi0", vma_disk)])
    (d / "vm.vma").write_bytes(plain)
    subprocess.run(["zstd", "-q", "-f", d / "vm.vma", "-o", d / "vm.vma.zst"], check=True)
    os.unlink(d / "vm.vma")
    raw = tmp_path / "src.raw"
    raw.write_bytes(vma_disk)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, d / "disk.qcow2"], check=True
    )
    return d, {"xva": disk, "vma": vma_disk, "qcow2": vma_disk}


def _disk(res_path):
    return open(res_path, "rb").read()


def test_info_verify_convert_over_http(files, tmp_path):
    d, want = files
    with servers.nginx(d, tmp_path) as srv:
        for name, key, extra in (
            ("vm.xva", "xva", []),
            ("vm.xva.gz", "xva", []),
            ("vm.vma.zst", "vma", []),
            ("disk.qcow2", "qcow2", []),
        ):
            url = srv.url(name)
            assert run("info", url).code == 0
            res = run("verify", url)
            assert res.code == 0, (name, res)
            out = tmp_path / f"{name}.raw"
            res = run("convert", url, out, *extra)
            assert res.code == 0, (name, res)
            assert out.read_bytes() == want[key], name


def test_one_random_read_fetches_megabytes_not_the_archive(files, tmp_path):
    """After the first open (the index, gzip checkpoints or spool are saved), a read of
    64 KiB through serve moves a few MiB at most."""
    need("qemu-io")
    d, want = files
    with servers.nginx(d, tmp_path) as srv:
        for name, disk in (("vm.xva", "xvda"), ("vm.xva.gz", "xvda"), ("vm.vma.zst", "scsi0")):
            url = srv.url(name)
            assert run("map", url, "--disk", disk).code == 0  # builds and saves the index
            before = srv.sent()
            sock = tmp_path / f"{name}.sock"
            proc = subprocess.Popen(
                [*run_args(), "serve", url, "--socket", sock], stderr=subprocess.PIPE
            )
            try:
                servers._wait_sock(sock, proc)
                key = "xva" if name.startswith("vm.xva") else "vma"
                at = 13 * MiB + 4096
                got = subprocess.run(
                    [
                        "qemu-io",
                        "-r",
                        "-f",
                        "raw",
                        "-c",
                        f"read -v {at} 512",
                        f"nbd+unix:///{disk}?socket={sock}",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                assert (
                    bytes.fromhex("".join(got.split("\n")[0].split(":")[1].split()[:16]))
                    == want[key][at : at + 16]
                )
            finally:
                proc.terminate()
                proc.wait(timeout=20)
                proc.stderr.close()
            moved = srv.sent() - before
            assert moved < 4 * MiB, (name, moved)
            assert moved < os.path.getsize(d / name) or os.path.getsize(d / name) < 4 * MiB


def run_args():
    import sys

    return [sys.executable, "-m", "vmarc"]


def test_s3_through_an_s3_compatible_server(files, tmp_path, monkeypatch):
    d, want = files
    with servers.moto_s3(
        tmp_path, {"b/vm.xva": d / "vm.xva", "b/disk.qcow2": d / "disk.qcow2"}
    ) as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert run("info", "s3://backups/b/vm.xva").code == 0
        assert run("verify", "s3://backups/b/disk.qcow2").code == 0
        out = tmp_path / "s3.raw"
        res = run("convert", "s3://backups/b/disk.qcow2", out)
        assert res.code == 0, res
        assert out.read_bytes() == want["qcow2"]
        assert_clean_failure(run("info", "s3://backups/b/nope.xva"), 1, "not found")


def test_a_server_without_ranges_is_read_as_a_stream(files, tmp_path):
    d, want = files
    with servers.nginx(d, tmp_path, ranges=False) as srv:
        out = tmp_path / "o.raw"
        res = run("convert", srv.url("vm.xva"), out)
        assert res.code == 0, res
        assert res.errtext.count("does not serve byte ranges") == 1
        assert out.read_bytes() == want["xva"]


def test_a_server_killed_mid_read_is_one_line_and_no_output(files, tmp_path):
    d, _ = files
    with servers.dying_server(d / "vm.xva", die_after=6) as url:
        out = tmp_path / "o.raw"
        res = run("convert", url, out)
        assert_clean_failure(res, 1, url)
        assert not out.exists()
