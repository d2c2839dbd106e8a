#!/usr/bin/env bash
# Builds the librados binding (native/rados, N-API + node-addon-api, C++17)
# into native/rados/build/Release/archipelago_rados.node, where
# src/blockers/rados/binding.ts loads it from.
#
#   scripts/build-rados.sh [--force]
#
# Needs librados-dev (the C headers and librados.so), a C++17 compiler, and
# `npm install` done (node-gyp and node-addon-api come from node_modules).
# Skips the build when the addon is newer than every source, unless --force.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT/native/rados
OUT=$SRC/build/Release/archipelago_rados.node

force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build-rados: unknown argument: $arg (usage: $0 [--force])" >&2; exit 2 ;;
  esac
done

if [[ ! -f /usr/include/rados/librados.h ]]; then
  echo "build-rados: /usr/include/rados/librados.h is missing: install librados-dev" \
       "(Debian/Ubuntu: apt-get install librados-dev) to build the RADOS backend" >&2
  exit 1
fi

# node-gyp would otherwise download Node's headers from nodejs.org; an N-API
# addon builds against any recent Node's headers, so use the installed ones.
export npm_config_nodedir=/usr
if [[ ! -f $npm_config_nodedir/include/node/node_api.h ]]; then
  echo "build-rados: $npm_config_nodedir/include/node/node_api.h is missing: install Node's headers" \
       "(the nodejs package ships them in /usr/include/node)" >&2
  exit 1
fi
for dep in node-gyp node-addon-api; do
  if [[ ! -d $ROOT/node_modules/$dep ]]; then
    echo "build-rados: node_modules/$dep is missing: run npm install first" >&2
    exit 1
  fi
done

if [[ $force == 0 && -f $OUT ]]; then
  newer=$(find "$SRC/binding.gyp" "$SRC/src" -newer "$OUT" -print -quit)
  if [[ -z $newer ]]; then
    echo "build-rados: up to date: $OUT"
    exit 0
  fi
fi

cd "$ROOT"
# node-gyp straight from node_modules (npx would warn about the nodedir
# setting); it reads npm_config_nodedir from the environment.
node "$ROOT/node_modules/node-gyp/bin/node-gyp.js" rebuild -C native/rados --jobs max
if [[ ! -f $OUT ]]; then
  echo "build-rados: node-gyp finished but $OUT was not produced" >&2
  exit 1
fi
echo "build-rados: built $OUT"
