# Our librados binding (N-API, C++17). Built by scripts/build-rados.sh; the
# loader in src/blockers/rados/binding.ts expects
# build/Release/archipelago_rados.node.
{
  "targets": [
    {
      "target_name": "archipelago_rados",
      "sources": [
        "src/addon.cc",
        "src/args.cc",
        "src/errors.cc",
        "src/cluster.cc",
        "src/ioctx.cc",
        "src/aio.cc",
        "src/io_ops.cc",
        "src/locks.cc",
        "src/watch.cc",
        "src/listing.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")"
      ],
      "dependencies": [
        "<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_DISABLE_DEPRECATED"
      ],
      "libraries": ["-lrados"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-Wunused-parameter", "-Werror=return-type"],
      "cflags_cc!": ["-std=gnu++17", "-std=gnu++1y"]
    }
  ]
}
