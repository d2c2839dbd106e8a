# Shared by scripts/build-fileio.sh and scripts/build-rados.sh: builds one
# N-API addon under native/ with node-gyp from node_modules, against the
# installed Node headers. Sourced, not run.
#
#   build_addon PROG DIR OUT FORCE DEP...
#     PROG   name for messages (build-fileio)
#     DIR    the addon's folder under the repository (native/fileio)
#     OUT    the .node file node-gyp produces, relative to DIR
#     FORCE  1: rebuild even when OUT is newer than every source
#     DEP    packages that must be in node_modules (node-gyp, node-addon-api)
#
# Exits 1 with the reason on stderr when something it needs is missing.

build_addon() {
  local prog=$1 dir=$2 out=$3 force=$4
  shift 4
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  local src=$root/$dir
  out=$src/$out

  # node-gyp would otherwise download Node's headers from nodejs.org; an N-API
  # addon builds against any recent Node's headers, so use the installed ones.
  export npm_config_nodedir=/usr
  if [[ ! -f $npm_config_nodedir/include/node/node_api.h ]]; then
    echo "$prog: $npm_config_nodedir/include/node/node_api.h is missing: install Node's headers" \
         "(the nodejs package ships them in /usr/include/node)" >&2
    exit 1
  fi
  local dep
  for dep in "$@"; do
    if [[ ! -d $root/node_modules/$dep ]]; then
      echo "$prog: node_modules/$dep is missing: run npm install first" >&2
      exit 1
    fi
  done

  if [[ $force == 0 && -f $out ]]; then
    local newer
    newer=$(find "$src/binding.gyp" "$src/src" -newer "$out" -print -quit)
    if [[ -z $newer ]]; then
      echo "$prog: up to date: $out"
      return 0
    fi
  fi

  # node-gyp straight from node_modules (npx would warn about the nodedir
  # setting); it reads npm_config_nodedir from the environment.
  (cd "$root" && node "$root/node_modules/node-gyp/bin/node-gyp.js" rebuild -C "$dir" --jobs max)
  if [[ ! -f $out ]]; then
    echo "$prog: node-gyp finished but $out was not produced" >&2
    exit 1
  fi
  echo "$prog: built $out"
}
