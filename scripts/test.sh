#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs every test: the command the README
# gives and .ci/run calls. Installs system tools (apt) and npm packages itself.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/check-node.sh
bash scripts/install-deps.sh
npm ci --no-audit --no-fund
# The librados binding (native/rados), against the installed Node headers.
bash scripts/build-rados.sh
npm run build
# tap runs every compiled test file (see "tap" in package.json).
npx tap "$@"
