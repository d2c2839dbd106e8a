#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs every test: the command the README
# gives and .ci/run calls. Installs system tools (apt) and npm packages itself.
#
#   bash scripts/test.sh              everything: all tests on the file store,
#                                     then the volume tests again on RADOS
#   bash scripts/test.sh FILES...     only these compiled test files (file store)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/check-node.sh
bash scripts/install-deps.sh
npm ci --no-audit --no-fund
# The librados binding (native/rados), against the installed Node headers.
bash scripts/build-rados.sh
# The file store's fast paths (native/fileio; optional at run time, tested here).
bash scripts/build-fileio.sh
npm run build

if [ "$#" -gt 0 ]; then
  exec npx tap "$@"
fi

# One Ceph cluster shared by the tests that need RADOS (each gets fresh pools;
# tests that stop OSDs start their own). Stopped by its PIDs on exit.
ceph_dir=$(mktemp -d /tmp/archipelago-test-ceph.XXXXXX)
trap 'bash scripts/ceph-dev.sh purge "$ceph_dir" >/dev/null 2>&1 || true' EXIT
for port in 40300 40400 40500 40600 40700; do
  rc=0
  CEPH_DEV_PORT=$port CEPH_DEV_OSD_BYTES=4G bash scripts/ceph-dev.sh start "$ceph_dir" || rc=$?
  [ "$rc" -eq 0 ] && break
  [ "$rc" -eq 4 ] || exit "$rc" # 4: port taken, try the next range
  rm -rf "$ceph_dir" && mkdir "$ceph_dir"
done
[ "$rc" -eq 0 ] || { echo "test.sh: no free port range for the test Ceph cluster" >&2; exit 1; }
export ARCHIPELAGO_TEST_CEPH=$ceph_dir
# The crash tests SIGKILL daemons that hold volume locks; the restarted daemon
# fences the dead holder once its watch is gone, after osd_client_watch_timeout
# (30 s by default, as for RBD): 5 s here, with clients pinging every second.
ceph --conf "$ceph_dir/ceph.conf" config set osd osd_client_watch_timeout 5
ceph --conf "$ceph_dir/ceph.conf" config set client objecter_tick_interval 1

# tap runs every compiled test file (see "tap" in package.json).
npx tap

# The volume tests again, on RADOS: daemon, CLI, real clients, snapshots and
# clones, images, the crash model and the crash loop, lock hand-overs and
# fencing between daemons, QEMU live migration.
ARCHIPELAGO_TEST_BACKEND=rados npx tap \
  build/test/integration/volume-cli.test.js \
  build/test/integration/volume-clients.test.js \
  build/test/integration/volume-crash.test.js \
  build/test/integration/crash-loop.test.js \
  build/test/integration/snapshot-clone.test.js \
  build/test/integration/image.test.js \
  build/test/integration/volume-handover.test.js \
  build/test/integration/volume-fencing.test.js \
  build/test/integration/live-migration.test.js
