// librados failures (negative errno) turned into instances of the JS
// RadosError class: new RadosError(errno, op, message), where message reads
//   read "d.1.2.3": No such file or directory (errno 2)
// with an optional ": detail" after it.
#pragma once

#include <string>

#include "common.h"

namespace arch_rados {

// Errors the binding reports itself, without asking librados.
constexpr int kEShutdown = 108;  // ESHUTDOWN: the client was shut down
constexpr int kEBadF = 9;        // EBADF: the pool, watch or listing was closed
constexpr int kEInval = 22;      // EINVAL: a name with NUL, or empty

// What failed: the operation's name and, when it has one, the object.
struct Target {
  std::string op;
  std::string oid;
  bool hasOid = false;

  static Target Op(std::string op) { return Target{std::move(op), {}, false}; }
  static Target Obj(std::string op, std::string oid) { return Target{std::move(op), std::move(oid), true}; }
};

// strerror, thread-safe.
std::string ErrnoText(int err);

// A name as it appears in messages: in double quotes, control bytes escaped.
std::string Quote(const std::string& s);

// A RadosError (or, before init(), an Error with errno and op properties).
// `err` is positive.
Napi::Value MakeError(Napi::Env env, int err, const Target& target, const std::string& detail = {});

void Reject(const Napi::Promise::Deferred& deferred, int err, const Target& target, const std::string& detail = {});

// A promise already rejected with MakeError(...).
Napi::Promise Rejected(Napi::Env env, int err, const Target& target, const std::string& detail = {});

// Throws MakeError(...) as a C++ Napi::Error (becomes a JS exception).
[[noreturn]] void ThrowError(Napi::Env env, int err, const Target& target, const std::string& detail = {});

}  // namespace arch_rados
