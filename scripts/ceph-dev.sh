#!/usr/bin/env bash
# A real single-host Ceph cluster (one mon, N OSDs, no mgr) for tests and for
# trying Archipelago against RADOS, without systemd and without root.
# Everything lives in DIR: config, keyring, mon and OSD data, logs, pid files.
#
#   scripts/ceph-dev.sh start DIR    create DIR if new (else restart its stopped
#                                    daemons); wait until a write round-trips
#   scripts/ceph-dev.sh stop DIR     SIGTERM the PIDs in DIR/run/*.pid, wait
#                                    (SIGKILL after CEPH_DEV_STOP_TIMEOUT s)
#   scripts/ceph-dev.sh status DIR   one line per daemon; exit 0 all running,
#                                    3 all stopped, 1 partly running
#   scripts/ceph-dev.sh env DIR      prints export CEPH_CONF=… and the pools
#   scripts/ceph-dev.sh purge DIR    stop, then rm -rf DIR
#
#   eval "$(scripts/ceph-dev.sh env /tmp/ceph)"; rados -p archipelago ls
#
# Settings, read from the environment when DIR is created (kept in
# DIR/ceph-dev.env; a restart ignores the environment):
#   CEPH_DEV_PORT=40100     mon v2 PORT, v1 PORT+1; daemons bind in PORT+10..PORT+99
#   CEPH_DEV_OSDS=1         number of OSDs (at most 11: 8 ports each)
#   CEPH_DEV_STORE=memstore memstore (RAM, saved to DIR on a clean stop) | bluestore
#                           (sparse file DIR/osd/ceph-N/block)
#   CEPH_DEV_OSD_BYTES=1G   memstore capacity / bluestore block size (K/M/G/T suffixes)
#   CEPH_DEV_AUTH=none      none | cephx: DIR/keyring holds mon., client.admin, osd.N
#                           and client.archipelago, the user the daemon needs:
#                             mon 'allow r, allow command "osd blocklist"'
#                             osd 'allow rwx pool=P1, allow rwx pool=P2 …'
#   CEPH_DEV_POOLS="archipelago archipelago-maps"
#                           pools to create (size 1, application rados)
#   CEPH_DEV_RBD=0          1: also pool "rbd", initialised with `rbd pool init`
#   CEPH_DEV_PG=8           placement groups per pool
# At any time:
#   CEPH_DEV_STOP_TIMEOUT=30  seconds before stop SIGKILLs what is still running
#   CEPH_DEV_START_TIMEOUT=60 seconds start waits for the OSDs and the first write
#
# Exit codes: 0 ok; 1 failure (reason and log tail on stderr); 2 usage;
# 3 status: stopped; 4 start failed because a port is already taken (pick
# another CEPH_DEV_PORT; nothing is left running).
#
# Pitfalls handled here (see the single-host Ceph notes): daemons' admin socket
# and log settings only in daemon sections (else concurrent clients clash on
# client.admin.asok); reporter and beacon settings so a stopped OSD on this
# one host is marked down (~9 s when other OSDs report it, 10-25 s for a lone
# OSD); every OSD placed in CRUSH before the pools exist (else PGs remapped
# while OSDs booted one by one could stay stuck peering); a dead daemon may
# stay a zombie for ~2 s until PID 1 reaps it, so "alive" means /proc/PID/stat
# exists and its state is not Z; the ceph CLI is run by its own python3
# shebang, never as `python3 /usr/bin/ceph`.
set -euo pipefail

readonly CEPH=/usr/bin/ceph
readonly PROG=ceph-dev

# ---------------------------------------------------------------- helpers

now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
T0=$(now_ms)
secs() { local d=$(($(now_ms) - ${1:-$T0})); printf '%d.%02d' $((d / 1000)) $((d % 1000 / 10)); }
say() { echo "$PROG: $*" >&2; }
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Prints the last lines of each readable file given, under a header.
tail_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 25 "$f" >&2
  done
}

# The state letter of a process (R, S, D, T, Z …), empty if it does not exist.
proc_state() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  echo "${stat:0:1}"
}

# True when PID is a live (not zombie) process started with our ceph.conf.
# Guards against signalling a recycled PID from a stale pid file.
is_ours() {
  local pid=$1 st cmd
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  st=$(proc_state "$pid")
  [[ -n $st && $st != Z && $st != X ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ " $cmd " == *" $CONF "* ]]
}

# PID of daemon NAME (mon.a, osd.0) if it runs, else nothing (exit 1).
daemon_pid() {
  local f=$DIR/run/$1.pid pid
  [[ -r $f ]] || return 1
  pid=$(<"$f") || return 1
  pid=${pid//[^0-9]/}
  is_ours "$pid" || return 1
  echo "$pid"
}

# Waits until none of the PIDs is alive (zombies count as gone); returns 1 on timeout.
wait_gone() {
  local timeout_ms=$1; shift
  local deadline=$(($(now_ms) + timeout_ms)) p left
  while :; do
    left=0
    for p in "$@"; do is_ours "$p" && left=1; done
    ((left)) || return 0
    (($(now_ms) < deadline)) || return 1
    sleep 0.05
  done
}

# SIGTERM the PIDs, wait, SIGKILL what is left. Only PIDs that pass is_ours.
stop_pids() {
  local timeout_s=${CEPH_DEV_STOP_TIMEOUT:-30} p live=()
  for p in "$@"; do is_ours "$p" && live+=("$p"); done
  ((${#live[@]})) || return 0
  kill -TERM "${live[@]}" 2>/dev/null || true
  # A SIGSTOPped daemon cannot act on SIGTERM until it is continued.
  kill -CONT "${live[@]}" 2>/dev/null || true
  if ! wait_gone $((timeout_s * 1000)) "${live[@]}"; then
    say "still running after ${timeout_s}s, sending SIGKILL: $(for p in "${live[@]}"; do is_ours "$p" && printf '%s ' "$p"; done)"
    for p in "${live[@]}"; do is_ours "$p" && kill -KILL "$p" 2>/dev/null || true; done
    wait_gone 10000 "${live[@]}" || say "warning: some PIDs did not die after SIGKILL"
  fi
}

# Names of the daemons that have pid files: OSDs first, then the mon.
pidfile_names() {
  local f names=()
  for f in "$DIR"/run/osd.*.pid "$DIR"/run/*.pid; do
    [[ -e $f ]] || continue
    f=${f##*/}; f=${f%.pid}
    [[ " ${names[*]-} " == *" $f "* ]] || names+=("$f")
  done
  echo "${names[@]-}"
}

# Stops every daemon of DIR: OSDs first (a clean OSD shutdown tells the mon and
# saves memstore data), then the rest.
stop_all() {
  local name pid osds=() rest=()
  for name in $(pidfile_names); do
    pid=$(daemon_pid "$name") || { rm -f "$DIR/run/$name.pid"; continue; }
    if [[ $name == osd.* ]]; then osds+=("$pid"); else rest+=("$pid"); fi
  done
  ((${#osds[@]})) && stop_pids "${osds[@]}"
  ((${#rest[@]})) && stop_pids "${rest[@]}"
  for name in $(pidfile_names); do daemon_pid "$name" >/dev/null || rm -f "$DIR/run/$name.pid"; done
  return 0
}

# `ceph` with a deadline; commands may also come on stdin (one per line: a
# single python start-up for many commands; errors then only show on stderr).
ceph_cmd() {
  timeout 60 "$CEPH" --conf "$CONF" --connect-timeout 30 "$@"
}

load_settings() {
  # shellcheck source=/dev/null
  source "$DIR/ceph-dev.env"
}

lock_dir() {
  exec 9>"$DIR/.lock"
  flock -w 120 9 || { say "another ceph-dev.sh holds $DIR/.lock"; exit 1; }
}

# ---------------------------------------------------------------- start

FAIL_LOGS=()
STARTED=()      # PIDs started by this run, stopped again if start fails
START_OK=0

on_start_exit() {
  local rc=$?
  ((START_OK)) && return 0
  ((rc)) || rc=1
  if ((${#STARTED[@]})); then
    say "stopping the ${#STARTED[@]} daemon(s) this run started: ${STARTED[*]}"
    stop_pids "${STARTED[@]}"
    local name
    for name in $(pidfile_names); do daemon_pid "$name" >/dev/null || rm -f "$DIR/run/$name.pid"; done
  fi
  say "start failed after $(secs)s: ${FAIL_REASON:-interrupted}"
  exit "$rc"
}

# Records the reason, prints the log tails, exits with CODE (cleanup runs in the EXIT trap).
fail() {
  local code=$1; shift
  FAIL_REASON=$*
  say "error: $*"
  tail_logs "${FAIL_LOGS[@]-}"
  exit "$code"
}

# Waits for DIR/run/NAME.pid to name a live daemon and records it as started.
await_pidfile() {
  local name=$1 deadline=$(($(now_ms) + 10000)) pid
  while ! pid=$(daemon_pid "$name"); do
    (($(now_ms) < deadline)) || return 1
    sleep 0.02
  done
  STARTED+=("$pid")
}

size_bytes() {
  local v=$1
  [[ $v =~ ^[0-9]+[KMGTkmgt]?$ ]] || { say "CEPH_DEV_OSD_BYTES=$v: expected a number with an optional K/M/G/T suffix"; exit 2; }
  numfmt --from=iec "${v^^}"
}

check_settings() {
  local p
  [[ $PORT =~ ^[0-9]+$ ]] && ((PORT >= 1024 && PORT <= 65436)) || { say "CEPH_DEV_PORT=$PORT: expected 1024..65436"; exit 2; }
  [[ $OSDS =~ ^[0-9]+$ ]] && ((OSDS >= 1 && OSDS <= 11)) || { say "CEPH_DEV_OSDS=$OSDS: expected 1..11"; exit 2; }
  [[ $STORE == memstore || $STORE == bluestore ]] || { say "CEPH_DEV_STORE=$STORE: expected memstore or bluestore"; exit 2; }
  [[ $AUTH == none || $AUTH == cephx ]] || { say "CEPH_DEV_AUTH=$AUTH: expected none or cephx"; exit 2; }
  [[ $RBD == 0 || $RBD == 1 ]] || { say "CEPH_DEV_RBD=$RBD: expected 0 or 1"; exit 2; }
  [[ $PG =~ ^[0-9]+$ ]] && ((PG >= 1 && PG <= 4096)) || { say "CEPH_DEV_PG=$PG: expected 1..4096"; exit 2; }
  for p in $POOLS; do
    [[ $p =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { say "CEPH_DEV_POOLS: bad pool name '$p'"; exit 2; }
  done
}

# Fails with exit 4 if something listens on the mon's ports (a clear message
# instead of the mon's bind error; the mon's own failure is caught too).
check_ports() {
  command -v ss >/dev/null || return 0
  local p
  FAIL_LOGS=()
  for p in "$PORT" $((PORT + 1)); do
    if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
      fail 4 "port $p (mon) is already in use on this host: $(ss -Hltnp "sport = :$p" 2>/dev/null | awk '{print $4, $6}' | head -n1)"
    fi
  done
}

write_conf() {
  local keyring_line='' auth=none
  if [[ $AUTH == cephx ]]; then
    keyring_line="keyring = $DIR/keyring"
    auth=cephx
  fi
  cat >"$CONF" <<EOF
# Written by scripts/ceph-dev.sh for a throwaway single-host test cluster.
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$PORT,v1:127.0.0.1:$((PORT + 1))]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind port min = $((PORT + 10))
ms bind port max = $((PORT + 99))
# fail at once when a port is taken (default: 3 tries 5 s apart)
ms bind retry count = 1
ms bind retry delay = 1
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
$keyring_line
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon warn on insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $PG
osd pool default pgp num = $PG
osd pool default pg autoscale mode = off
# replicas across the OSDs of this one host
osd crush chooseleaf type = 0
# default 1 s: every map change (OSD boot, pool create) waited ~1 s
paxos propose interval = 0.1
# so that a stopped OSD on this single host is marked down (~9 s)
mon osd reporter subtree level = osd
mon osd min down reporters = 1
mon osd adjust heartbeat grace = false
osd heartbeat interval = 1
osd heartbeat grace = 5
# a lone OSD has no peer to report it: the mon marks it down when its beacons
# stop (defaults: a beacon every 300 s, down after 900 s without one)
osd beacon report interval = 1
mon osd report timeout = 10
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# no "no active mgr" warning: this cluster runs without ceph-mgr
mon mgr mkfs grace = 315360000
mon osd full ratio = .97
mon osd backfillfull ratio = .95
mon osd nearfull ratio = .93
mon data avail warn = 1
mon data avail crit = 0
run dir = $DIR/run
crash dir = $DIR/crash

[client]
# a wedged cluster fails operations (ETIMEDOUT) instead of hanging callers
rados osd op timeout = 30
rados mon op timeout = 30
client mount timeout = 30

[mon]
mon cluster log file = $DIR/log/ceph.\$channel.log
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon data = $DIR/mon/ceph-\$id

[osd]
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
osd data = $DIR/osd/ceph-\$id
osd objectstore = $STORE
# memstore saves its data to DIR on a clean stop, so a restart keeps objects
osd fast shutdown = false
# placed in CRUSH at creation (host "ceph-dev"), not by each OSD at boot
osd crush update on start = false
memstore device bytes = $OSD_BYTES
# bluestore: sparse file \$osd_data/block (do not set bluestore block path)
bluestore block create = true
bluestore block size = $OSD_BYTES
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
EOF
}

make_keyring() {
  local kr=$DIR/keyring i p osdcap=''
  (umask 077 && : >"$kr")
  ceph-authtool "$kr" --gen-key -n mon. --cap mon 'allow *'
  ceph-authtool "$kr" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
  for ((i = 0; i < OSDS; i++)); do
    ceph-authtool "$kr" --gen-key -n "osd.$i" \
      --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
  done
  for p in $POOLS; do osdcap+="${osdcap:+, }allow rwx pool=$p"; done
  ceph-authtool "$kr" --gen-key -n client.archipelago \
    --cap mon 'allow r, allow command "osd blocklist"' --cap osd "${osdcap:-allow rwx pool=archipelago}"
} >/dev/null

# Starts the mon unless it runs.
start_mon() {
  daemon_pid mon.a >/dev/null && return 0
  local t=$(now_ms)
  FAIL_LOGS=("$DIR/log/mon.a.out" "$DIR/log/mon.a.log")
  rm -f "$DIR/run/mon.a.pid"
  if ! ceph-mon -c "$CONF" -i a </dev/null >"$DIR/log/mon.a.out" 2>&1 9>&-; then
    if grep -qs 'Address already in use' "$DIR/log/mon.a.out"; then
      fail 4 "ceph-mon could not bind 127.0.0.1:$PORT/$((PORT + 1)): address already in use"
    fi
    fail 1 "ceph-mon failed to start"
  fi
  await_pidfile mon.a || fail 1 "ceph-mon exited right after starting"
  say "mon.a started (pid ${STARTED[-1]}) in $(secs "$t")s"
}

# Starts (in parallel) the OSDs that do not run.
start_osds() {
  local d id t=$(now_ms) pids=() ids=() i rc
  for d in "$DIR"/osd/ceph-*; do
    [[ -d $d ]] || continue
    id=${d##*/ceph-}
    daemon_pid "osd.$id" >/dev/null && continue
    rm -f "$DIR/run/osd.$id.pid"
    # The parent returns once the OSD has initialised (~1-2 s): start them together.
    ceph-osd -c "$CONF" -i "$id" </dev/null >"$DIR/log/osd.$id.out" 2>&1 9>&- &
    pids+=($!); ids+=("$id")
  done
  ((${#ids[@]})) || return 0
  for i in "${!pids[@]}"; do
    rc=0; wait "${pids[$i]}" || rc=$?
    id=${ids[$i]}
    # Record it even if another OSD failed, so that the cleanup stops it.
    if ((rc == 0)) && await_pidfile "osd.$id"; then continue; fi
    FAIL_LOGS=("$DIR/log/osd.$id.out" "$DIR/log/osd.$id.log")
    for ((i = i + 1; i < ${#pids[@]}; i++)); do wait "${pids[$i]}" || true; await_pidfile "osd.${ids[$i]}" || true; done
    # The daemonized child may write its last words after the parent exited.
    local k
    for ((k = 0; k < 20; k++)); do
      if grep -qs 'unable to bind.*Address already in use' "$DIR/log/osd.$id.out"; then
        fail 4 "ceph-osd -i $id found no free port in 127.0.0.1:$((PORT + 10))-$((PORT + 99))"
      fi
      sleep 0.1
    done
    fail 1 "ceph-osd -i $id failed to start (exit $rc)"
  done
  say "osd.${ids[*]} started in $(secs "$t")s"
}

# All daemons of DIR that should run; fails naming the first that died.
check_alive() {
  local d id
  daemon_pid mon.a >/dev/null || { FAIL_LOGS=("$DIR/log/mon.a.log"); fail 1 "ceph-mon died"; }
  for d in "$DIR"/osd/ceph-*; do
    id=${d##*/ceph-}
    daemon_pid "osd.$id" >/dev/null || { FAIL_LOGS=("$DIR/log/osd.$id.log"); fail 1 "ceph-osd -i $id died"; }
  done
}

# Waits until every OSD is up in the osdmap, then until a write round-trips
# through every pool (a put blocks until the pool's PGs are active).
wait_ready() {
  local t=$(now_ms) deadline=$(($(now_ms) + ${CEPH_DEV_START_TIMEOUT:-60} * 1000)) n want out
  want=$(find "$DIR/osd" -mindepth 1 -maxdepth 1 -name 'ceph-*' -type d | wc -l)
  FAIL_LOGS=("$DIR/log/mon.a.log" "$DIR"/log/osd.*.log)
  while :; do
    check_alive
    out=$(ceph_cmd osd stat -f json 2>&1) || out=''
    n=$(sed -n 's/.*"num_up_osds":\([0-9]*\).*/\1/p' <<<"$out")
    [[ $n == "$want" ]] && break
    (($(now_ms) < deadline)) || fail 1 "only ${n:-?} of $want OSDs up after ${CEPH_DEV_START_TIMEOUT:-60}s ($out)"
    sleep 0.2
  done
  say "$want OSD(s) up after $(secs "$t")s"
  t=$(now_ms)
  local p obj=__ceph_dev_ready.$$ payload got pids=() rc
  payload="ceph-dev $$ $EPOCHREALTIME"
  local ready_pools=$POOLS
  ((RBD)) && ready_pools+=" rbd"
  [[ -n ${ready_pools// /} ]] || ready_pools=''
  if [[ -z $ready_pools ]]; then
    # No pools: create a scratch one just for the check.
    ceph_cmd osd pool create __ceph_dev_ready 1 1 >/dev/null 2>&1 || fail 1 "cannot create a pool for the ready check"
    ready_pools=__ceph_dev_ready
  fi
  local left=$(((deadline - $(now_ms)) / 1000)); ((left > 5)) || left=5
  for p in $ready_pools; do
    (
      printf '%s' "$payload" | timeout "$left" rados --conf "$CONF" -p "$p" put "$obj" - &&
        got=$(timeout "$left" rados --conf "$CONF" -p "$p" get "$obj" -) &&
        [[ $got == "$payload" ]] &&
        timeout "$left" rados --conf "$CONF" -p "$p" rm "$obj"
    ) 9>&- &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  if [[ $ready_pools == __ceph_dev_ready ]]; then
    ceph_cmd osd pool delete __ceph_dev_ready __ceph_dev_ready --yes-i-really-really-mean-it >/dev/null 2>&1 || true
  fi
  ((rc == 0)) || { check_alive; fail 1 "a rados put/get round trip failed or timed out (pools: $ready_pools)"; }
  say "write round trip OK in $(secs "$t")s (pools: $ready_pools)"
}

create_cluster() {
  local t i out uuids=() ids=() pids=() rc
  say "creating a $STORE cluster in $DIR: $OSDS OSD(s) of $OSD_BYTES bytes, auth $AUTH, mon 127.0.0.1:$PORT, pools: ${POOLS:-none}$( ((RBD)) && echo ' rbd')"
  mkdir -p "$DIR"/{run,log,mon,osd,crash}
  FSID=$(uuidgen)
  write_conf
  [[ $AUTH == cephx ]] && make_keyring
  check_ports

  t=$(now_ms)
  FAIL_LOGS=("$DIR/log/mon.a.mkfs")
  monmaptool --create --addv a "[v2:127.0.0.1:$PORT,v1:127.0.0.1:$((PORT + 1))]" --fsid "$FSID" "$DIR/monmap" >"$DIR/log/mon.a.mkfs" 2>&1 ||
    fail 1 "monmaptool failed"
  local keyring=()
  [[ $AUTH == cephx ]] && keyring=(--keyring "$DIR/keyring")
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" "${keyring[@]}" </dev/null >>"$DIR/log/mon.a.mkfs" 2>&1 ||
    fail 1 "ceph-mon --mkfs failed"
  say "mon mkfs in $(secs "$t")s"
  start_mon

  # One ceph invocation for every map change (python start-up is ~0.3 s each).
  t=$(now_ms)
  local cmds='' p
  for ((i = 0; i < OSDS; i++)); do
    uuids+=("$(uuidgen)")
    cmds+="osd new ${uuids[$i]}"$'\n'
  done
  # Every OSD in CRUSH (equal weights; "osd new" marks it in) before any pool exists: the
  # PGs map to their final OSDs from the start. Letting each OSD add itself at
  # boot remapped PGs several times while the OSDs came up one by one, and a
  # PG could stay stuck peering (a write then hung; seen with 3 bluestore OSDs).
  for ((i = 0; i < OSDS; i++)); do
    cmds+="osd crush add osd.$i 1.0 host=ceph-dev root=default"$'\n'
  done
  for p in $POOLS; do
    cmds+="osd pool create $p $PG $PG replicated"$'\n'
    cmds+="osd pool application enable $p rados"$'\n'
  done
  ((RBD)) && cmds+="osd pool create rbd $PG $PG replicated"$'\n'
  FAIL_LOGS=("$DIR/log/ceph-cli.err" "$DIR/log/mon.a.log")
  out=$(ceph_cmd <<<"$cmds" 2>"$DIR/log/ceph-cli.err") || fail 1 "ceph CLI failed (exit $?)"
  grep -q '^Error' "$DIR/log/ceph-cli.err" && fail 1 "a ceph command failed"
  mapfile -t ids < <(grep -E '^[0-9]+$' <<<"$out")
  [[ ${ids[*]-} == "$(seq -s ' ' 0 $((OSDS - 1)))" ]] || fail 1 "expected OSD ids 0..$((OSDS - 1)) from 'ceph osd new', got: $out"
  say "OSD ids and pools created in $(secs "$t")s"

  t=$(now_ms)
  for ((i = 0; i < OSDS; i++)); do
    mkdir -p "$DIR/osd/ceph-${ids[$i]}"
    ceph-osd -c "$CONF" -i "${ids[$i]}" --mkfs --osd-uuid "${uuids[$i]}" </dev/null >"$DIR/log/osd.${ids[$i]}.mkfs" 2>&1 9>&- &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    rc=0; wait "${pids[$i]}" || rc=$?
    if ((rc)); then
      FAIL_LOGS=("$DIR/log/osd.${ids[$i]}.mkfs" "$DIR/log/osd.${ids[$i]}.log")
      wait || true
      fail 1 "ceph-osd -i ${ids[$i]} --mkfs failed (exit $rc)"
    fi
  done
  say "OSD mkfs in $(secs "$t")s"
  start_osds
  wait_ready
  if ((RBD)); then
    t=$(now_ms)
    FAIL_LOGS=("$DIR/log/rbd-init.err")
    timeout 60 rbd --conf "$CONF" pool init rbd 2>"$DIR/log/rbd-init.err" 9>&- || fail 1 "rbd pool init failed"
    say "rbd pool init in $(secs "$t")s"
  fi
  touch "$DIR/.created"
}

cmd_start() {
  if [[ -e $DIR && ! -d $DIR ]]; then say "$DIR is not a directory"; exit 1; fi
  local fresh=0
  if [[ ! -e $DIR/ceph-dev.env ]]; then
    if [[ -d $DIR && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
      say "$DIR is not empty and is not a ceph-dev cluster (no ceph-dev.env); refusing to use it"
      exit 1
    fi
    fresh=1
    mkdir -p "$DIR"
  elif [[ ! -e $DIR/.created ]]; then
    say "creating the cluster in $DIR failed earlier; remove it first: $0 purge $DIR"
    exit 1
  fi
  lock_dir
  trap on_start_exit EXIT
  set -E
  trap 'FAIL_REASON=${FAIL_REASON:-"command failed (exit $?, line $LINENO): $BASH_COMMAND"}' ERR
  trap 'exit 130' INT TERM HUP
  if ((fresh)); then
    PORT=${CEPH_DEV_PORT:-40100}
    OSDS=${CEPH_DEV_OSDS:-1}
    STORE=${CEPH_DEV_STORE:-memstore}
    OSD_BYTES=$(size_bytes "${CEPH_DEV_OSD_BYTES:-1G}")
    AUTH=${CEPH_DEV_AUTH:-none}
    POOLS=${CEPH_DEV_POOLS-archipelago archipelago-maps}
    RBD=${CEPH_DEV_RBD:-0}
    PG=${CEPH_DEV_PG:-8}
    check_settings
    {
      printf 'PORT=%q\nOSDS=%q\nSTORE=%q\nOSD_BYTES=%q\n' "$PORT" "$OSDS" "$STORE" "$OSD_BYTES"
      printf 'AUTH=%q\nPOOLS=%q\nRBD=%q\nPG=%q\n' "$AUTH" "$POOLS" "$RBD" "$PG"
    } >"$DIR/ceph-dev.env"
    create_cluster
  else
    load_settings
    say "restarting the cluster in $DIR (mon 127.0.0.1:$PORT)"
    daemon_pid mon.a >/dev/null || check_ports
    start_mon
    start_osds
    wait_ready
  fi
  START_OK=1
  say "ready in $(secs)s: export CEPH_CONF=$CONF"
}

# ---------------------------------------------------------------- other commands

cmd_stop() {
  [[ -d $DIR/run ]] || { say "$DIR: no cluster here (nothing to stop)"; return 0; }
  lock_dir
  stop_all
  say "stopped in $(secs)s"
}

cmd_status() {
  [[ -e $DIR/ceph-dev.env ]] || { say "$DIR: no ceph-dev cluster here"; exit 1; }
  load_settings
  local d names=(mon.a) name pid up=0 down=0
  for d in "$DIR"/osd/ceph-*; do [[ -d $d ]] && names+=("osd.${d##*/ceph-}"); done
  for name in "${names[@]}"; do
    if pid=$(daemon_pid "$name"); then
      if [[ $(proc_state "$pid") == T ]]; then
        echo "$name running pid $pid (stopped by a signal: SIGSTOP)"
      else
        echo "$name running pid $pid"
      fi
      up=$((up + 1))
    else
      echo "$name down"
      down=$((down + 1))
    fi
  done
  if ((down == 0)); then
    echo "cluster running (mon 127.0.0.1:$PORT, $STORE, auth $AUTH, pools: $POOLS$( ((RBD)) && echo ' rbd'))"
    ceph_cmd <<<$'health\nosd stat' 2>&1 | grep -v '^\s*$' | sed 's/^/  /' || true
    return 0
  elif ((up == 0)); then
    echo "cluster down"
    exit 3
  fi
  echo "cluster partly running ($up of ${#names[@]} daemons)"
  exit 1
}

cmd_env() {
  [[ -e $DIR/ceph-dev.env ]] || { say "$DIR: no ceph-dev cluster here"; exit 1; }
  load_settings
  local pools=($POOLS)
  echo "export CEPH_CONF=$CONF"
  echo "export CEPH_DEV_POOLS='$POOLS'"
  if ((${#pools[@]})); then
    local url="rados:${pools[0]}?maps=${pools[1]:-${pools[0]}}&conf=$CONF"
    [[ $AUTH == cephx ]] && url+="&id=archipelago"
    echo "export ARCHIPELAGO_STORE='$url'"
  fi
  if [[ $AUTH == cephx ]]; then
    echo "# cephx: keyring $DIR/keyring; the daemon's user is client.archipelago (rados --id archipelago …)"
  fi
}

cmd_purge() {
  if [[ -e $DIR && ! -e $DIR/ceph-dev.env && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
    say "$DIR is not a ceph-dev cluster (no ceph-dev.env); refusing to delete it"
    exit 1
  fi
  [[ -d $DIR/run ]] && { lock_dir; stop_all; }
  rm -rf "$DIR"
  say "purged $DIR in $(secs)s"
}

# ---------------------------------------------------------------- main

(($# == 2)) || usage
DIR=$(realpath -m -- "$2")
# The path goes into ceph.conf, shell exports and a rados: URL unquoted.
[[ $DIR =~ ^[A-Za-z0-9/._+@:,~-]+$ ]] || { say "DIR '$DIR': use only letters, digits and / . _ + @ : , ~ -"; exit 2; }
CONF=$DIR/ceph.conf
case $1 in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  purge) cmd_purge ;;
  *) usage ;;
esac
