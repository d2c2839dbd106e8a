#!/usr/bin/env bash
# Builds the file store's fast paths (native/fileio, N-API, C: reads of cached
# data without the thread pool, batched small writes) into
# native/fileio/build/Release/archipelago_fileio.node, where
# src/blockers/file-addon.ts loads it from. Optional: without it the file
# store reads and writes through the libuv thread pool (slower for 4 KiB I/O).
#
#   scripts/build-fileio.sh [--force]
#
# Needs a C compiler, Node's headers (/usr/include/node) and `npm install`
# done (node-gyp comes from node_modules). Skips the build when the addon is
# newer than every source, unless --force.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/addon-build.sh
source "$HERE/lib/addon-build.sh"

force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-fileio: unknown argument: $arg (usage: $0 [--force])" >&2; exit 2 ;;
  esac
done

build_addon build-fileio native/fileio build/Release/archipelago_fileio.node "$force" node-gyp
