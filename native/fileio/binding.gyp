# The file store's fast paths (N-API, C). Built by scripts/build-fileio.sh;
# src/blockers/file-addon.ts loads build/Release/archipelago_fileio.node when
# it exists and falls back to the libuv thread pool when it does not.
{
  "targets": [
    {
      "target_name": "archipelago_fileio",
      "sources": ["src/fileio.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "cflags": ["-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
    }
  ]
}
