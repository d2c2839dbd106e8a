#include "errors.h"

#include <cstdio>
#include <cstring>

namespace arch_rados {

namespace {

// strerror_r comes in two flavours (GNU returns char*, XSI returns int).
[[maybe_unused]] std::string FromStrerror(const char* result, const char*) { return result; }
[[maybe_unused]] std::string FromStrerror(int result, const char* buf) {
  return result == 0 ? std::string(buf) : std::string("Unknown error");
}

}  // namespace

std::string ErrnoText(int err) {
  char buf[256];
  buf[0] = '\0';
  return FromStrerror(strerror_r(err, buf, sizeof buf), buf);
}

std::string Quote(const std::string& s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('"');
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c < 0x20 || c == 0x7f) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\x%02x", c);
      out += esc;
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  out.push_back('"');
  return out;
}

Napi::Value MakeError(Napi::Env env, int err, const Target& target, const std::string& detail) {
  std::string message = target.op;
  if (target.hasOid) message += " " + Quote(target.oid);
  message += ": " + ErrnoText(err) + " (errno " + std::to_string(err) + ")";
  if (!detail.empty()) message += ": " + detail;

  AddonData& data = Data(env);
  if (!data.radosError.IsEmpty()) {
    return data.radosError.New({Napi::Number::New(env, err), Napi::String::New(env, target.op),
                                Napi::String::New(env, message)});
  }
  // init() was not called: a plain Error with the same fields.
  Napi::Object error = Napi::Error::New(env, message).Value();
  error.Set("name", "RadosError");
  error.Set("errno", Napi::Number::New(env, err));
  error.Set("op", target.op);
  return error;
}

void Reject(const Napi::Promise::Deferred& deferred, int err, const Target& target, const std::string& detail) {
  deferred.Reject(MakeError(deferred.Env(), err, target, detail));
}

Napi::Promise Rejected(Napi::Env env, int err, const Target& target, const std::string& detail) {
  auto deferred = Napi::Promise::Deferred::New(env);
  Reject(deferred, err, target, detail);
  return deferred.Promise();
}

void ThrowError(Napi::Env env, int err, const Target& target, const std::string& detail) {
  throw Napi::Error(env, MakeError(env, err, target, detail));
}

}  // namespace arch_rados
