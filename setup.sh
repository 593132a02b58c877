#!/usr/bin/env bash
# Sets up everything vmarc and its tests need on a fresh Debian machine (as root):
# the system tools the tests compare against, then a virtualenv in .venv with every extra.
set -euo pipefail
cd "$(dirname "$0")"

# the file systems' own tools build the guest disks of the file tests, and read them back
PKGS="qemu-utils libnbd-bin nbdkit fuse3 zstd lzop gzip libvhdi-utils
      e2fsprogs xfsprogs btrfs-progs ntfs-3g dosfstools mtools fdisk lvm2 nginx-light
      exfatprogs exfat-fuse"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing system packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends $missing >&2
  else
    echo "setup: missing system packages:$missing (run as root, or install them)" >&2
  fi
fi

# Node.js runs the writers of other projects that the tests use as oracles (Xen
# Orchestra's vhd-lib and @xen-orchestra/fs), installed from the npm registry into
# tests/oracles (its package.json says why two stand-in packages sit in stubs/).
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing nodejs and npm" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends nodejs npm >&2
  else
    echo "setup: npm is missing (the tests' oracles need it)" >&2
  fi
fi
if command -v npm >/dev/null 2>&1 && [ ! -d tests/oracles/node_modules/vhd-lib-4 ]; then
  (cd tests/oracles && npm ci --no-audit --no-fund --loglevel=error >&2)
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv >&2
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[all,test]' >&2
