#!/usr/bin/env bash
# Linux kernel NBD client smoke test: boots a QEMU (TCG) guest whose
# /dev/nbd0 connects to the NBD server at 127.0.0.1:PORT, then makes an ext4
# filesystem, writes files, fscks, reconnects and verifies
# (see scripts/kernel-guest/init.sh).
#
# Usage: scripts/kernel-nbd-smoke.sh PORT EXPORT
#
# Env:
#   WORK             build/cache directory (default /tmp/archipelago-kernel-guest)
#   GUEST_TIMEOUT    seconds before the guest is killed (default 180)
#   NBD_CLIENT_OPTS  extra nbd-client options, e.g. "-C 2"
#   SMP              guest vCPUs (default 1)
#   NBD_MODE         full (default) | write | verify; see init.sh
#   GUEST_LOG        serial log path (default: a new file under $WORK/runs/)
#   GUEST_APPEND     more kernel command line words (e.g. guestmode=map …;
#                    scripts/kernel-guest/map-mode.sh)
#   GUEST_NBD_PORT   the relay's port inside the guest (default 10809)
#
# Prints the guest's STEP/RESULT lines; exits 0 only on "RESULT PASS".
# The guest has user-mode networking with restrict=on; its only way out is
# the guestfwd relay 10.0.2.100:10809 -> socat -> 127.0.0.1:PORT. (socat logs
# to /dev/null: QEMU hands the command's stderr the guest's socket too, so an
# error message would land in the NBD stream.)
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 PORT EXPORT" >&2
  exit 2
fi
PORT="$1"
EXPORT="${2-}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-/tmp/archipelago-kernel-guest}"
GUEST_TIMEOUT="${GUEST_TIMEOUT:-180}"
SMP="${SMP:-1}"
NBD_CLIENT_OPTS="${NBD_CLIENT_OPTS:-}"
NBD_MODE="${NBD_MODE:-full}"

log() { echo "kernel-nbd-smoke: $*" >&2; }

case "$PORT" in ''|*[!0-9]*) log "bad port: $PORT"; exit 2 ;; esac
case "$EXPORT" in *[[:space:]\"\'\\]*) log "export name must not contain spaces, quotes or backslashes"; exit 2 ;; esac
case "$NBD_CLIENT_OPTS" in *,*) log "NBD_CLIENT_OPTS must not contain commas"; exit 2 ;; esac

# Host tools (the guest's own are installed by build.sh).
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v socat >/dev/null || missing+=(socat)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then log "need root to install: ${missing[*]}"; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

t0=$(date +%s.%N)
bash "$HERE/kernel-guest/build.sh" "$WORK"
t_built=$(date +%s.%N)

if [ -n "${GUEST_LOG:-}" ]; then
  LOG="$GUEST_LOG"
  mkdir -p "$(dirname "$LOG")"
else
  mkdir -p "$WORK/runs"
  find "$WORK/runs" -type f -mtime +1 -delete 2>/dev/null || true
  LOG="$(mktemp "$WORK/runs/serial.XXXXXX.log")"
fi
: >"$LOG"

append="console=ttyS0 panic=-1 quiet rdinit=/init nbdmode=$NBD_MODE"
[ -n "$EXPORT" ] && append+=" nbdexport=$EXPORT"
opts="$(echo "$NBD_CLIENT_OPTS" | xargs | tr ' ' ',')"
[ -n "$opts" ] && append+=" nbdopts=$opts"
[ -n "${GUEST_APPEND:-}" ] && append+=" $GUEST_APPEND"

QPID=""
cleanup() {
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
    kill -TERM "$QPID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$QPID" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
  fi
  QPID=""
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "booting guest (smp=$SMP, mode=$NBD_MODE, port=$PORT, export=${EXPORT:-<default>}, opts=${NBD_CLIENT_OPTS:-none}), log $LOG"
qemu-system-x86_64 \
  -accel tcg -cpu max -smp "$SMP" -m 512 \
  -nodefaults -no-reboot -display none \
  -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
  -append "$append" \
  -netdev "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:${GUEST_NBD_PORT:-10809}-cmd:socat -lf /dev/null STDIO TCP:127.0.0.1:$PORT" \
  -device e1000,netdev=n0 \
  -serial "file:$LOG" \
  </dev/null >"$LOG.qemu" 2>&1 &
QPID=$!

timed_out=0
deadline=$(( $(date +%s) + GUEST_TIMEOUT ))
result_seen_at=""
while kill -0 "$QPID" 2>/dev/null; do
  now=$(date +%s)
  if [ "$now" -ge "$deadline" ]; then
    timed_out=1
    break
  fi
  # The guest powers off right after RESULT; do not wait forever if it hangs there.
  if [ -z "$result_seen_at" ] && grep -aq '^RESULT ' "$LOG" 2>/dev/null; then
    result_seen_at=$now
  fi
  if [ -n "$result_seen_at" ] && [ $((now - result_seen_at)) -ge 10 ]; then
    break
  fi
  sleep 0.2
done
if [ "$timed_out" -eq 0 ] && ! kill -0 "$QPID" 2>/dev/null; then
  qrc=0
  wait "$QPID" || qrc=$?
  QPID=""
  [ "$qrc" -eq 0 ] || log "qemu exited with status $qrc"
fi
cleanup
t_end=$(date +%s.%N)

tr -d '\r' <"$LOG" | grep -aE '^(STEP |RESULT |GUEST |  \| |  dmesg\| )' || true
if [ -s "$LOG.qemu" ]; then
  sed 's/^/qemu: /' "$LOG.qemu" >&2
fi
awk -v a="$t0" -v b="$t_built" -v c="$t_end" \
  'BEGIN { printf "kernel-nbd-smoke: build %.1fs, guest %.1fs, total %.1fs\n", b-a, c-b, c-a }' >&2

if [ "$timed_out" -eq 1 ]; then
  log "guest timed out after ${GUEST_TIMEOUT}s; serial log tail:"
  tr -d '\r' <"$LOG" | tail -n 30 >&2
  echo "RESULT FAIL (timeout)"
  exit 1
fi
if tr -d '\r' <"$LOG" | grep -aq '^RESULT PASS$'; then
  exit 0
fi
if ! tr -d '\r' <"$LOG" | grep -aq '^RESULT '; then
  log "no RESULT line from the guest; serial log tail:"
  tr -d '\r' <"$LOG" | tail -n 30 >&2
fi
exit 1
