#!/bin/sh
# /init of the kernel-client test guest (busybox sh). Built into the
# initramfs by build.sh. Talks to an NBD server through the QEMU guestfwd
# relay at 10.0.2.100:10809 with the Linux kernel NBD client.
#
# Kernel command line parameters (all optional):
#   nbdexport=NAME   export name (default: empty, nbd-client's default)
#   nbdhost=IP       server address as seen by the guest (default 10.0.2.100)
#   nbdport=N        server port as seen by the guest (default 10809)
#   nbdopts=A,B,..   extra nbd-client options; commas become spaces
#                    (e.g. nbdopts=-C,2 for two connections)
#   nbdmode=MODE     full   (default) write phase, then reconnect and verify
#                    write  mkfs, write files + on-disk manifest, fsck, disconnect
#                    verify connect, fsck, mount ro, check the on-disk manifest
#   nbdfiles=N       number of small files (default 200)
#   nbdbigmb=N       size of the random file in MiB (default 16)
#   guestmode=NAME   after loading the modules, run /NAME-mode.sh instead
#                    (scripts/kernel-guest/NAME-mode.sh; it documents itself)
#
# Output on the console: "STEP name OK|FAIL" lines, then "RESULT PASS|FAIL",
# then the guest powers off.

export PATH=/sbin:/bin
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox --install -s /bin 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

EXPORT=""
HOST=10.0.2.100
PORT=10809
OPTS=""
MODE=full
NFILES=200
BIGMB=16
DEV=/dev/nbd0
MNT=/mnt

for arg in $(cat /proc/cmdline); do
  case "$arg" in
    nbdexport=*) EXPORT="${arg#nbdexport=}" ;;
    nbdhost=*)   HOST="${arg#nbdhost=}" ;;
    nbdport=*)   PORT="${arg#nbdport=}" ;;
    nbdopts=*)   OPTS="$(echo "${arg#nbdopts=}" | tr ',' ' ')" ;;
    nbdmode=*)   MODE="${arg#nbdmode=}" ;;
    nbdfiles=*)  NFILES="${arg#nbdfiles=}" ;;
    nbdbigmb=*)  BIGMB="${arg#nbdbigmb=}" ;;
    guestmode=*) GUESTMODE="${arg#guestmode=}" ;;
  esac
done

say() { echo "$*" >/dev/console 2>/dev/null || echo "$*"; }

finish() {
  if [ "$1" = PASS ]; then say "RESULT PASS"; else say "RESULT FAIL"; fi
  say "GUEST uptime $(cut -d' ' -f1 /proc/uptime)s"
  sync
  poweroff -f
  sleep 5
  exit 1
}

# step NAME CMD...: runs CMD, prints STEP NAME OK|FAIL; on failure prints the
# command output and the kernel log tail and ends the run.
step() {
  name="$1"
  shift
  if "$@" >/tmp/step.log 2>&1; then
    say "STEP $name OK"
  else
    rc=$?
    say "STEP $name FAIL (rc=$rc)"
    tail -n 30 /tmp/step.log | sed 's/^/  | /' >/dev/console
    dmesg | tail -n 20 | sed 's/^/  dmesg| /' >/dev/console
    umount "$MNT" 2>/dev/null
    nbd-client -d "$DEV" >/dev/null 2>&1
    finish FAIL
  fi
}

# ------------------------------------------------------------------ steps ----
load_modules() {
  for m in $(cat /modules/order); do
    [ -f "/modules/$m.ko" ] || continue   # built in
    grep -q "^$m " /proc/modules && continue
    insmod "/modules/$m.ko" || return 1
  done
  [ -e /sys/module/nbd ] || return 1
}

net_up() {
  i=0
  while [ ! -e /sys/class/net/eth0 ]; do
    i=$((i + 1)); [ $i -gt 50 ] && return 1
    sleep 0.1
  done
  ip link set lo up
  ip link set eth0 up || return 1
  ip addr add 10.0.2.15/24 dev eth0 || return 1
}

dev_size() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }

nbd_connect() {
  # shellcheck disable=SC2086
  if [ -n "$EXPORT" ]; then
    set -- -N "$EXPORT" $OPTS "$HOST" "$PORT" "$DEV"
  else
    set -- $OPTS "$HOST" "$PORT" "$DEV"
  fi
  tries=0
  while :; do
    echo "nbd-client $*"
    /sbin/nbd-client "$@" && break
    tries=$((tries + 1)); [ $tries -ge 5 ] && return 1
    sleep 1
  done
  i=0
  while [ "$(dev_size)" = 0 ]; do
    i=$((i + 1)); [ $i -gt 50 ] && return 1
    sleep 0.1
  done
  echo "size $(dev_size) sectors"
}

nbd_disconnect() {
  /sbin/nbd-client -d "$DEV" || return 1
  i=0
  while [ "$(dev_size)" != 0 ]; do
    i=$((i + 1)); [ $i -gt 100 ] && return 1
    sleep 0.1
  done
}

# Deterministic content of small file number $1 (sizes 1..8192 bytes).
gen_small() {
  yes "archipelago kernel-client small file $1" | head -c $(( ($1 * 397) % 8192 + 1 ))
}

write_files() {
  dd if=/dev/urandom of="$MNT/big.bin" bs=1M count="$BIGMB" 2>/dev/null || return 1
  [ "$(stat -c %s "$MNT/big.bin")" = $((BIGMB * 1048576)) ] || return 1
  mkdir -p "$MNT/small" || return 1
  i=1
  while [ $i -le "$NFILES" ]; do
    gen_small $i >"$MNT/small/f$i" || return 1
    i=$((i + 1))
  done
  (cd "$MNT" && find . -type f ! -name MANIFEST.sha256 | sort | xargs sha256sum) >/tmp/manifest || return 1
  cp /tmp/manifest "$MNT/MANIFEST.sha256" || return 1
  sha256sum "$MNT/big.bin"
}

verify_files() {
  # Checksums against the on-disk manifest, and (in full mode) that manifest
  # against the one kept in guest RAM.
  if [ -f /tmp/manifest ]; then
    cmp /tmp/manifest "$MNT/MANIFEST.sha256" || return 1
  fi
  (cd "$MNT" && sha256sum -c MANIFEST.sha256) || return 1
  n=$(ls "$MNT/small" | wc -l)
  [ "$n" = "$NFILES" ] || { echo "expected $NFILES small files, found $n"; return 1; }
  i=1
  while [ $i -le "$NFILES" ]; do
    gen_small $i >/tmp/expect
    cmp /tmp/expect "$MNT/small/f$i" || return 1
    i=$((i + 1))
  done
  [ "$(stat -c %s "$MNT/big.bin")" = $((BIGMB * 1048576)) ] || return 1
}

do_umount() { sync && umount "$MNT"; }

# ------------------------------------------------------------------- main ----
say "GUEST init mode=$MODE export=$EXPORT opts=$OPTS uptime $(cut -d' ' -f1 /proc/uptime)s"

step modules load_modules
# Another guest program takes over (it ends the run with finish).
[ -n "${GUESTMODE:-}" ] && . "/$GUESTMODE-mode.sh"
step network net_up

case "$MODE" in
  full|write)
    step connect nbd_connect
    step mkfs /sbin/mke2fs -F -q -t ext4 "$DEV"
    step mount mount -t ext4 "$DEV" "$MNT"
    step write write_files
    step umount do_umount
    step fsck /sbin/e2fsck -f -n "$DEV"
    step disconnect nbd_disconnect
    if [ "$MODE" = full ]; then
      step reconnect nbd_connect
      step mount-ro mount -t ext4 -o ro "$DEV" "$MNT"
      step verify verify_files
      step umount-ro umount "$MNT"
      step disconnect-final nbd_disconnect
    fi
    ;;
  verify)
    step connect nbd_connect
    step fsck /sbin/e2fsck -f -n "$DEV"
    step mount-ro mount -t ext4 -o ro "$DEV" "$MNT"
    step verify verify_files
    step umount-ro umount "$MNT"
    step disconnect nbd_disconnect
    ;;
  *)
    say "STEP mode FAIL (unknown nbdmode=$MODE)"
    finish FAIL
    ;;
esac

finish PASS
