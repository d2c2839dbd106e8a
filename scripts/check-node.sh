#!/usr/bin/env bash
# Archipelago needs Node.js 20.19 or newer (yargs 18, zlib.crc32). Debian 12's
# own nodejs package is 18, too old: install Node 20 (e.g. NodeSource) first.
set -euo pipefail
if ! command -v node >/dev/null 2>&1; then
  echo "archipelago: Node.js >= 20.19 is required and none is installed" >&2
  exit 1
fi
node -e '
const [maj, min] = process.versions.node.split(".").map(Number);
if (maj < 20 || (maj === 20 && min < 19)) {
  console.error(`archipelago: Node.js >= 20.19 is required, found ${process.versions.node}`);
  process.exit(1);
}'
