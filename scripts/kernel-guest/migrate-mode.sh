# shellcheck shell=sh
# The guest side of the QEMU live-migration test
# (test/integration/live-migration.test.ts). Sourced by init.sh (busybox sh)
# when the kernel command line says guestmode=migrate, after the modules are
# loaded; it ends the run itself (finish, from init.sh).
#
# Here QEMU is the NBD client: the disk is a virtio-blk device (/dev/vda) whose
# backend is nbd://… on the host, and the host migrates the running guest from
# one QEMU to another. This guest writes a sequence of records to the disk and
# makes each durable before the next, so that the host can check afterwards
# that every record it was told about is on the volume, in order, intact.
#
# Kernel command line:
#   migcount=N   write at most N records (default: as many as fit on the disk)
#
# Record seq=S (S = 1, 2, 3, …) fills the 4 KiB slot at byte offset S*4096
# (slot 0 is left alone):
#   bytes    0..4007  "archipelago live migration seq=SSSSSSSS\n" (40 bytes)
#                     repeated, cut at 4008 bytes (SSSSSSSS: S in 8 digits)
#   bytes 4008..4095  "\n" + "seq=SSSSSSSS sha256=" + the sha256 (hex) of
#                     bytes 0..4007, padded with spaces to 86 bytes, + "\n"
# Each record is written with O_DIRECT and fsync (dd oflag=direct
# conv=fsync): the fsync is a virtio-blk FLUSH, which QEMU sends as NBD FLUSH.
#
# Console: "MIG ready dev=/dev/vda bytes=B max=N", then "MIG fsynced seq=S
# up=SECONDS" once record S is durable, "MIG stop requested" when the host
# asked to stop, "MIG done last=S" (the last record written), then init.sh's
# "RESULT PASS|FAIL" and power-off. "MIG error seq=S …" on a failed write.
#
# Stop: the host writes a line "stop" to the serial port (the console's
# input); a background reader turns it into /tmp/migstop, which the writer
# checks between records.

MIGDEV=/dev/vda
MIGCOUNT=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    migcount=*) MIGCOUNT="${arg#migcount=}" ;;
  esac
done

# The device appears asynchronously once virtio_blk has probed.
mig_wait_disk() {
  i=0
  while [ ! -b "$MIGDEV" ] || [ "$(cat /sys/block/vda/size 2>/dev/null || echo 0)" = 0 ]; do
    i=$((i + 1)); [ $i -gt 100 ] && return 1
    sleep 0.1
  done
}

# Writes record $1 to its slot and makes it durable.
mig_write() {
  s8=$(printf %08d "$1")
  yes "archipelago live migration seq=$s8" | head -c 4008 >/tmp/rec || return 1
  sum=$(sha256sum /tmp/rec) || return 1
  printf '\n%-86s\n' "seq=$s8 sha256=${sum%% *}" >>/tmp/rec || return 1
  dd if=/tmp/rec of="$MIGDEV" bs=4096 seek="$1" count=1 oflag=direct conv=fsync,notrunc status=none
}

step disk mig_wait_disk
bytes=$(( $(cat /sys/block/vda/size) * 512 ))
max=$(( bytes / 4096 - 1 ))
[ -n "$MIGCOUNT" ] && [ "$MIGCOUNT" -lt "$max" ] && max=$MIGCOUNT
say "MIG ready dev=$MIGDEV bytes=$bytes max=$max"

rm -f /tmp/migstop
( while read -r line; do
    case "$line" in *stop*) : >/tmp/migstop ;; esac
  done </dev/console ) &

seq=0
while [ $seq -lt "$max" ] && [ ! -e /tmp/migstop ]; do
  next=$((seq + 1))
  if ! mig_write $next 2>/tmp/dd.err; then
    say "MIG error seq=$next $(head -c 200 /tmp/dd.err)"
    dmesg | tail -n 10 | sed 's/^/  dmesg| /' >/dev/console
    say "MIG done last=$seq"
    finish FAIL
  fi
  seq=$next
  read -r up _ </proc/uptime
  say "MIG fsynced seq=$seq up=$up"
done
[ -e /tmp/migstop ] && say "MIG stop requested"
say "MIG done last=$seq"
finish PASS
