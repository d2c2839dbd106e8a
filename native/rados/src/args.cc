#include "args.h"

#include <cmath>

namespace arch_rados {

namespace {

[[noreturn]] void TypeError(Napi::Env env, const char* name, const char* expected) {
  throw Napi::TypeError::New(env, std::string("The \"") + name + "\" argument must be " + expected);
}

[[noreturn]] void RangeError(Napi::Env env, const char* name, const std::string& what) {
  throw Napi::RangeError::New(env, std::string("The \"") + name + "\" argument " + what);
}

}  // namespace

std::string ArgString(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (index >= info.Length() || !info[index].IsString()) TypeError(info.Env(), name, "a string");
  return info[index].As<Napi::String>().Utf8Value();
}

uint64_t ArgUint(const Napi::CallbackInfo& info, size_t index, const char* name, uint64_t max) {
  if (index >= info.Length() || !info[index].IsNumber()) TypeError(info.Env(), name, "a number");
  double value = info[index].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(value) || value != std::floor(value)) RangeError(info.Env(), name, "must be an integer");
  if (value < 0 || value > static_cast<double>(max)) {
    RangeError(info.Env(), name, "must be >= 0 and <= " + std::to_string(max));
  }
  return static_cast<uint64_t>(value);
}

double ArgSeconds(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (index >= info.Length() || !info[index].IsNumber()) TypeError(info.Env(), name, "a number");
  double value = info[index].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(value) || value < 0 || value > 4294967295.0) {
    RangeError(info.Env(), name, "must be a finite number of seconds >= 0");
  }
  return value;
}

Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (index >= info.Length() || !info[index].IsBuffer()) TypeError(info.Env(), name, "a Buffer");
  return info[index].As<Napi::Buffer<uint8_t>>();
}

uint64_t ArgU64(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (index < info.Length() && info[index].IsBigInt()) {
    bool lossless = false;
    uint64_t value = info[index].As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) RangeError(info.Env(), name, "must fit in an unsigned 64-bit integer");
    return value;
  }
  if (index < info.Length() && info[index].IsNumber()) return ArgUint(info, index, name);
  TypeError(info.Env(), name, "a bigint");
}

Napi::Function ArgFunction(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (index >= info.Length() || !info[index].IsFunction()) TypeError(info.Env(), name, "a function");
  return info[index].As<Napi::Function>();
}

bool ValidName(const std::string& name) { return !name.empty() && ValidCString(name); }

bool ValidCString(const std::string& s) { return s.find('\0') == std::string::npos; }

}  // namespace arch_rados
