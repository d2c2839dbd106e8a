#!/usr/bin/env bash
# Installs what the test suite and the benchmarks need on a fresh Debian machine.
# Idempotent: a tool already present is not reinstalled. Runs as root (CI, dev VMs).
set -euo pipefail

pkgs=(
  qemu-utils qemu-system-x86 nbdkit libnbd-bin python3-libnbd nbd-client
  fio socat busybox-static cpio e2fsprogs
  # RADOS: a single-host cluster (scripts/ceph-dev.sh), the C headers our
  # librados binding builds against, and QEMU's rbd driver (benchmark peer).
  ceph-mon ceph-osd ceph-common librados-dev qemu-block-extra
  # systemd-analyze verify of our units; systemd-notify for Type=notify.
  systemd
  # Metrics: a real Prometheus scrapes the daemon; promtool checks the format.
  prometheus
  # NBD TLS tests: certtool and psktool make certificates and pre-shared keys.
  gnutls-bin
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: ok"
