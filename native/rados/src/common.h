// Shared declarations of the librados binding: the per-environment data and
// the forward declarations every file needs.
#pragma once

#include <napi.h>
#include <rados/librados.h>

#include <memory>

namespace arch_rados {

class ClusterState;
class IoCtxState;
class WatchState;
class ListingState;

// Per Node environment (main thread or a worker_thread): the RadosError class
// handed to init(), and the constructors of our wrapped classes.
struct AddonData {
  Napi::FunctionReference radosError;  // empty until init() is called
  Napi::FunctionReference cluster;
  Napi::FunctionReference ioctx;
  Napi::FunctionReference watch;
  Napi::FunctionReference listing;
};

AddonData& Data(Napi::Env env);

// Class registration, one per file that defines a wrapped class.
void InitCluster(Napi::Env env, AddonData& data);
void InitIoCtx(Napi::Env env, AddonData& data);
void InitWatch(Napi::Env env, AddonData& data);
void InitListing(Napi::Env env, AddonData& data);

// Our wrapped classes are created only from C++: NewInstance parks the state
// in this slot and the constructor takes it. A `new` from JS finds the slot
// empty and throws.
template <typename State>
struct ConstructSlot {
  static thread_local std::shared_ptr<State>* pending;

  static Napi::Object New(const Napi::FunctionReference& ctor, std::shared_ptr<State> state) {
    pending = &state;
    try {
      Napi::Object object = ctor.New({});
      pending = nullptr;
      return object;
    } catch (...) {
      pending = nullptr;
      throw;
    }
  }

  static std::shared_ptr<State> Take(const Napi::CallbackInfo& info, const char* cls) {
    if (pending == nullptr) {
      throw Napi::TypeError::New(info.Env(), std::string(cls) + " cannot be constructed directly");
    }
    std::shared_ptr<State> state = std::move(*pending);
    pending = nullptr;
    return state;
  }
};

template <typename State>
thread_local std::shared_ptr<State>* ConstructSlot<State>::pending = nullptr;

}  // namespace arch_rados
