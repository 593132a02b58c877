"""verify says what it checked and what the format keeps no way to check."""

import json

from tests.support import vmagen
from tests.support import xvagen as g
from tests.support.helpers import vmarc as run

MiB = g.MiB


def test_xva_counts_its_chunk_checksums(tmp_path):
    d = g.pattern_disk(3 * MiB, zero_chunks={1})
    path = tmp_path / "vm.xva"
    g.write(path, g.XvaSpec(disks=[g.XDisk("Ref:1", d, "d", "0")], checksum="sha1"))
    res = run("verify", path)
    assert res.code == 0 and "xvda: SHA-1 of 2 chunks" in res.text, res  # chunk 1 is zero
    doc = json.loads(run("verify", path, "--output", "json").out)
    assert doc["checked"]["disks"]["Ref:1"]["checked"][0] == "SHA-1 of 2 chunks"


def test_vma_says_its_data_is_not_checked(tmp_path):
    path = tmp_path / "a.vma"
    path.write_bytes(vmagen.build([("drive-scsi0", vmagen.disk_bytes(MiB, seed=3))]))
    res = run("verify", path)
    assert res.code == 0, res
    assert "scsi0: not checked: the disk's data: VMA keeps no checksum of it" in res.text
    assert "every one of its 16 clusters present exactly once" in res.text
    assert "md5 of the header and of 2 extent headers" in res.text


def test_raw_has_nothing_to_verify(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    res = run("verify", path)
    assert res.code == 0 and "nothing to verify" in res.text, res
    doc = json.loads(run("verify", path, "--output", "json").out)
    assert doc["checked"]["disks"]["disk"] == {
        "checked": [],
        "unchecked": ["nothing to verify: a raw image has no metadata and no checksums"],
    }
