// Module entry: exports init({ RadosError }), connect(options), version().
#include <string>

#include "cluster.h"
#include "common.h"
#include "ioctx.h"
#include "listing.h"
#include "watch.h"

namespace arch_rados {

AddonData& Data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

namespace {

// init({ RadosError }): the class native code instantiates for failures.
// The loader calls it right after require(); until then failures are plain
// Errors with the same errno/op fields.
Napi::Value Init(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) {
    throw Napi::TypeError::New(env, "init expects { RadosError }");
  }
  Napi::Value ctor = info[0].As<Napi::Object>().Get("RadosError");
  if (!ctor.IsFunction()) throw Napi::TypeError::New(env, "init expects { RadosError } to be a class");
  Data(env).radosError = Napi::Persistent(ctor.As<Napi::Function>());
  return env.Undefined();
}

Napi::Value Version(const Napi::CallbackInfo& info) {
  int major = 0;
  int minor = 0;
  int extra = 0;
  rados_version(&major, &minor, &extra);
  return Napi::String::New(info.Env(),
                           std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(extra));
}

}  // namespace

Napi::Object Module(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData(data);  // deleted with the environment
  InitCluster(env, *data);
  InitIoCtx(env, *data);
  InitWatch(env, *data);
  InitListing(env, *data);
  exports.Set("init", Napi::Function::New<Init>(env, "init"));
  exports.Set("connect", Napi::Function::New<Connect>(env, "connect"));
  exports.Set("version", Napi::Function::New<Version>(env, "version"));
  return exports;
}

}  // namespace arch_rados

static Napi::Object InitArchipelagoRados(Napi::Env env, Napi::Object exports) {
  return arch_rados::Module(env, exports);
}

NODE_API_MODULE(archipelago_rados, InitArchipelagoRados)
