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

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT/native/fileio
OUT=$SRC/build/Release/archipelago_fileio.node

force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-fileio: unknown argument: $arg (usage: $0 [--force])" >&2; exit 2 ;;
  esac
done

# node-gyp would otherwise download Node's headers from nodejs.org; an N-API
# addon builds against any recent Node's headers, so use the installed ones.
export npm_config_nodedir=/usr
if [[ ! -f $npm_config_nodedir/include/node/node_api.h ]]; then
  echo "build-fileio: $npm_config_nodedir/include/node/node_api.h is missing: install Node's headers" \
       "(the nodejs package ships them in /usr/include/node)" >&2
  exit 1
fi
if [[ ! -d $ROOT/node_modules/node-gyp ]]; then
  echo "build-fileio: node_modules/node-gyp is missing: run npm install first" >&2
  exit 1
fi

if [[ $force == 0 && -f $OUT ]]; then
  newer=$(find "$SRC/binding.gyp" "$SRC/src" -newer "$OUT" -print -quit)
  if [[ -z $newer ]]; then
    echo "build-fileio: up to date: $OUT"
    exit 0
  fi
fi

cd "$ROOT"
node "$ROOT/node_modules/node-gyp/bin/node-gyp.js" rebuild -C native/fileio --jobs max
if [[ ! -f $OUT ]]; then
  echo "build-fileio: node-gyp finished but $OUT was not produced" >&2
  exit 1
fi
echo "build-fileio: built $OUT"
