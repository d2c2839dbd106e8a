#!/usr/bin/env bash
# Sets up and runs the daemon on the embedded default: a file store under
# ./var/store, NBD on 127.0.0.1:10809, with a ready 1 GiB sample volume "disk0".
# Ctrl-C (SIGINT) or SIGTERM stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/check-node.sh
[ -d node_modules ] || npm ci --no-audit --no-fund
npm run build --silent
# The file store's fast paths (native/fileio): optional, the store works without them.
bash scripts/build-fileio.sh >/dev/null || echo "run: the file store's native fast paths were not built; serving without them" >&2
# The libuv thread pool serves file I/O and fsync (docs/benchmarks.md).
export UV_THREADPOOL_SIZE="${UV_THREADPOOL_SIZE:-16}"

STORE="${ARCHIPELAGO_STORE:-file:$PWD/var/store}"
LISTEN="${ARCHIPELAGO_LISTEN:-127.0.0.1:10809}"
cli() { node build/src/cli/main.js "$@"; }

if ! cli info disk0 --store "$STORE" >/dev/null 2>&1; then
  cli create disk0 --size 1G --store "$STORE"
fi
echo "serving $STORE on nbd://$LISTEN/ (volumes: $(cli list --store "$STORE" | tr '\n' ' '))"
exec node build/src/cli/main.js serve --store "$STORE" --listen "$LISTEN" "$@"
