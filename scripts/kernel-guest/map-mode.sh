# shellcheck shell=sh
# The guest side of test/integration/kernel-map.test.ts: sourced by init.sh
# (busybox sh) when the kernel command line says guestmode=map, after the
# modules are loaded; it uses init.sh's say/step/finish/net_up/do_umount and
# $MNT, and ends the run itself (finish). build.sh puts it in the initramfs.
#
# It attaches the device with exactly the command line that
# `archipelago map --dry-run` printed on the host, makes an ext4 filesystem,
# mounts it, tells the host it is ready, and keeps writing (with fsync) and
# re-reading (caches dropped) while the host restarts the daemon under it.
# Then it verifies every file, unmounts, fscks and detaches with the command
# `archipelago unmap --dry-run` printed.
#
# Kernel command line parameters:
#   nbdmap=W1,W2,..    the attach command, words separated by commas (none
#                      of its words holds a comma or a space); required
#   nbdunmap=W1,W2,..  the detach command (default: nbd-client -d DEVICE)
#   mapsecs=N          length of the I/O phase in seconds (default 60)
#
# Console lines for the host (besides STEP/RESULT):
#   MAP READY                  mounted, seeded; restart the daemon now
#   MAP IO n=N t=UPTIME        after each completed round
#   MAP LINK EVENT n=N         the kernel logged something about the device
#                              (with the relay it never should)
#   MAP ROUNDS N SLOWEST n=K cs=C   at the end: rounds run, the slowest one
#                              and its length in centiseconds

MAPCMD=""
UNMAPCMD=""
MAPSECS=60
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    nbdmap=*)   MAPCMD="$(echo "${arg#nbdmap=}" | tr ',' ' ')" ;;
    nbdunmap=*) UNMAPCMD="$(echo "${arg#nbdunmap=}" | tr ',' ' ')" ;;
    mapsecs=*)  MAPSECS="${arg#mapsecs=}" ;;
  esac
done

# The device is the command's /dev/nbdN word.
for w in $MAPCMD; do
  case "$w" in /dev/nbd*) DEV="$w" ;; esac
done
NBD="${DEV#/dev/}"
[ -n "$UNMAPCMD" ] || UNMAPCMD="nbd-client -d $DEV"

map_size() { cat "/sys/block/$NBD/size" 2>/dev/null || echo 0; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

map_attach() {
  [ -n "$MAPCMD" ] || { echo "no nbdmap= on the kernel command line"; return 1; }
  echo "$MAPCMD"
  # shellcheck disable=SC2086
  $MAPCMD || return 1
  i=0
  while [ "$(map_size)" = 0 ]; do
    i=$((i + 1)); [ $i -gt 100 ] && { echo "$DEV has no size after 10 s"; return 1; }
    sleep 0.1
  done
  echo "size $(map_size) sectors; pid $(cat "/sys/block/$NBD/pid" 2>/dev/null || echo none)"
}

map_detach() {
  echo "$UNMAPCMD"
  # shellcheck disable=SC2086
  $UNMAPCMD || return 1
  i=0
  while [ "$(map_size)" != 0 ]; do
    i=$((i + 1)); [ $i -gt 100 ] && { echo "$DEV still has a size after 10 s"; return 1; }
    sleep 0.1
  done
}

# Deterministic content of I/O-phase file $1: 4-68 KiB, unlike its neighbours.
gen_io() {
  yes "archipelago map round $1 $(($1 * 7919))" | head -c $(( ($1 * 4099) % 65536 + 4096 ))
}

map_seed() {
  dd if=/dev/urandom of="$MNT/seed.bin" bs=1M count=8 2>/dev/null || return 1
  mkdir -p "$MNT/io" || return 1
  (cd "$MNT" && sha256sum seed.bin) >/tmp/seed.sha256 || return 1
  sync
}

# Kernel messages about our device since boot (the link going down, the
# connection being set up again).
nbd_events() { dmesg | grep -c "$NBD" ; }

# One round: write file n with fsync, drop the page cache, read back file
# n-1 and, every 10th round, the whole seed file (8 MiB of reads).
map_round() {
  n=$1
  gen_io "$n" >/tmp/expect || return 1
  dd if=/tmp/expect of="$MNT/io/f$n" bs=64k conv=fsync 2>/dev/null || { echo "round $n: write failed"; return 1; }
  sync
  echo 3 >/proc/sys/vm/drop_caches
  if [ "$n" -gt 1 ]; then
    gen_io $((n - 1)) >/tmp/expect || return 1
    cmp /tmp/expect "$MNT/io/f$((n - 1))" || { echo "round $n: f$((n - 1)) reads back wrong"; return 1; }
  fi
  if [ $((n % 10)) = 0 ]; then
    (cd "$MNT" && sha256sum -c /tmp/seed.sha256 >/dev/null) || { echo "round $n: seed.bin reads back wrong"; return 1; }
  fi
}

# Centiseconds since boot.
now_cs() { tr -d . </proc/uptime | cut -d' ' -f1; }

# Rounds for $MAPSECS seconds (the host restarts the daemon meanwhile);
# fails on the first failed round. Reports the slowest round (the restart,
# as the guest lived it) and any kernel message about the device.
map_io() {
  base=$(nbd_events)
  start=$(now_cs)
  n=0
  slowest=0
  slowest_n=0
  down_at=""
  while [ $(( $(now_cs) - start )) -lt $((MAPSECS * 100)) ]; do
    n=$((n + 1))
    t0=$(now_cs)
    map_round "$n" || { dmesg | tail -n 15; return 1; }
    took=$(( $(now_cs) - t0 ))
    [ "$took" -gt "$slowest" ] && { slowest=$took; slowest_n=$n; }
    say "MAP IO n=$n t=$(uptime_s)"
    if [ -z "$down_at" ] && [ "$(nbd_events)" != "$base" ]; then
      down_at=$n
      say "MAP LINK EVENT n=$n"
    fi
  done
  echo "$n" >/tmp/rounds
  say "MAP ROUNDS $n SLOWEST n=$slowest_n cs=$slowest"
  if [ -n "$down_at" ]; then
    dmesg | grep "$NBD" | tail -n 12 | sed 's/^/  dmesg| /' >/dev/console
  fi
}

map_verify() {
  (cd "$MNT" && sha256sum -c /tmp/seed.sha256) || return 1
  rounds=$(cat /tmp/rounds)
  i=1
  while [ "$i" -le "$rounds" ]; do
    gen_io "$i" >/tmp/expect
    cmp /tmp/expect "$MNT/io/f$i" || return 1
    i=$((i + 1))
  done
  n=$(ls "$MNT/io" | wc -l)
  [ "$n" = "$rounds" ] || { echo "expected $rounds files, found $n"; return 1; }
}

say "GUEST map mode: $MAPCMD"
step network net_up
step map map_attach
step mkfs /sbin/mke2fs -F -q -t ext4 "$DEV"
step mount mount -t ext4 "$DEV" "$MNT"
step seed map_seed
say "MAP READY"
step io map_io
step verify map_verify
step umount do_umount
step fsck /sbin/e2fsck -f -n "$DEV"
step unmap map_detach
finish PASS
