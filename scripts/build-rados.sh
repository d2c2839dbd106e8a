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

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/addon-build.sh
source "$HERE/lib/addon-build.sh"

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

build_addon build-rados native/rados build/Release/archipelago_rados.node "$force" node-gyp node-addon-api
