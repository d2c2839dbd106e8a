# shellcheck shell=sh
# Shared by the Archipelago ExtStorage provider's scripts (docs/ganeti.md).
# Ganeti runs each script with the provider directory as its working
# directory and its input in the environment (ganeti-extstorage-interface(7)):
#   VOL_NAME            the volume ("UUID.ext.diskN"), every script
#   VOL_SIZE            MiB: create (new size), grow (current size)
#   VOL_NEW_SIZE        MiB: grow
#   VOL_METADATA        setinfo
#   VOL_SNAPSHOT_NAME   snapshot (Ganeti uses VOL_NAME.snap)
#   VOL_SNAPSHOT_SIZE   snapshot (MiB; a snapshot has its volume's size)
#   VOL_OPEN_EXCLUSIVE  open: True, or False during a live migration
#   EXTP_<PARAM>        the disk's parameters of parameters.list, upper-cased
# Errors go to stderr (Ganeti keeps them in its per-volume log) and end the
# script with a non-zero status.
set -eu

# Ganeti may run us with a bare environment.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}
export PATH

SCRIPT=$(basename "$0")

die() {
  echo "archipelago extstorage $SCRIPT: $*" >&2
  exit 1
}

# The CLI: $ARCHIPELAGO (a command line) if set, else `archipelago` on PATH,
# else the build next to these scripts (the repository or /opt/archipelago,
# also through a symlink such as /usr/share/ganeti/extstorage/archipelago).
if [ -z "${ARCHIPELAGO:-}" ]; then
  if command -v archipelago >/dev/null 2>&1; then
    ARCHIPELAGO=archipelago
  else
    here=$(dirname "$(readlink -f "$0")")
    cli="$here/../../build/src/cli/main.js"
    [ -f "$cli" ] || die "cannot find the archipelago CLI (looked on PATH and at $cli); set ARCHIPELAGO"
    ARCHIPELAGO="node $cli"
  fi
fi

# Parameters that choose the store: they become the CLI's own environment
# (flag > environment > config file > default), so every command agrees.
if [ -n "${EXTP_CONFIG:-}" ]; then
  ARCHIPELAGO_CONFIG=$EXTP_CONFIG
  export ARCHIPELAGO_CONFIG
fi
if [ -n "${EXTP_STORE:-}" ]; then
  ARCHIPELAGO_STORE=$EXTP_STORE
  export ARCHIPELAGO_STORE
fi

# archipelago ARGS...: the CLI (word-split $ARCHIPELAGO on purpose).
archipelago() {
  # shellcheck disable=SC2086
  $ARCHIPELAGO "$@"
}

need_volume() {
  [ -n "${VOL_NAME:-}" ] || die "VOL_NAME is not set (run by Ganeti?)"
}

# A whole number of MiB from the named variable.
mib() {
  eval "v=\${$1:-}"
  case "$v" in
    ''|*[!0-9]*) die "$1=${v:-<unset>}: expected a size in MiB" ;;
  esac
  echo "$v"
}

# The daemon's admin socket: EXTP_ADMIN_SOCKET, else the effective settings
# ($ARCHIPELAGO_ADMIN_SOCKET or the config file's admin-socket), or nothing.
admin_socket() {
  if [ -n "${EXTP_ADMIN_SOCKET:-}" ]; then
    echo "$EXTP_ADMIN_SOCKET"
    return
  fi
  s=$(archipelago serve --print-config | sed -n 's/^admin-socket = //p')
  [ "$s" = '""' ] && s=""
  echo "$s"
}

usage_if_asked() {
  case "${1:-}" in
    -h|--help)
      echo "usage: $SCRIPT (no arguments; input from the environment, see ganeti-extstorage-interface(7) and docs/ganeti.md)"
      exit 0 ;;
  esac
}
