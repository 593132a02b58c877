#!/usr/bin/env bash
# The main job on the built-in example: a gzip-compressed two-disk XVA (with a keepalive
# member that shifts the chunk numbering). Shows it, verifies it, extracts it, and checks
# the disks against their known SHA-256.
set -euo pipefail
cd "$(dirname "$0")"
V=../.venv/bin/vmarc
out=$(mktemp -d)/demo
$V info demo.xva
$V verify demo.xva
$V extract demo.xva "$out"
(cd "$out" && sha256sum -c "$OLDPWD/demo.sha256")
echo "demo: disks extracted to $out"
