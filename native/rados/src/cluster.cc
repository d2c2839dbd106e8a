// ClusterState (client lifetime), connect(), and the RadosCluster class:
// instanceId, addrs, openPool, monCommand, blocklistAdd, shutdown.
#include "cluster.h"

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <utility>

#include "aio.h"
#include "args.h"
#include "errors.h"
#include "ioctx.h"
#include "task.h"

namespace arch_rados {

// ---- ClusterState ----

ClusterState::ClusterState(Napi::Env env, rados_t rados) : env_(env), rados_(rados) {
  aio_ = MakeAioChannel(env);
  hook_ = napi_add_env_cleanup_hook(env, &ClusterState::OnTeardown, this) == napi_ok;
}

ClusterState::~ClusterState() {
  if (abandoned_) return;  // the teardown hook did what could safely be done
  RemoveTeardownHook();
  if (phase_ != Phase::Down) {
    // Dropped by JS without shutdown(). Every pool and operation held a
    // reference to us, so all pools are destroyed and nothing is in flight.
    aio_->Close();
    rados_shutdown(rados_);
  }
}

AioChannel& ClusterState::aio() { return *aio_; }

void ClusterState::RemoveTeardownHook() {
  if (!hook_) return;
  hook_ = false;
  napi_remove_env_cleanup_hook(env_, &ClusterState::OnTeardown, this);
}

void ClusterState::OnTeardown(void* arg) {
  // The environment is going away (process exit or worker termination)
  // without shutdown(). No JS can run any more; make sure no librados thread
  // calls into the dying environment, then stop librados if no thread-pool
  // call is inside it (otherwise leave it: the process is ending).
  auto* self = static_cast<ClusterState*>(arg);
  self->hook_ = false;
  self->abandoned_ = true;
  self->aio_->Detach();
  for (const auto& weak : self->ioctxs_) {
    if (auto io = weak.lock()) io->Abandon();
  }
  if (self->phase_ != Phase::Down && self->blocking_ == 0 && !self->shutdownStarted_) {
    rados_shutdown(self->rados_);
  }
  self->phase_ = Phase::Down;
}

void ClusterState::Begin(bool blocking) {
  if (inflight_++ == 0) aio_->Ref(Env());
  if (blocking) ++blocking_;
}

void ClusterState::End(bool blocking) {
  if (blocking) --blocking_;
  if (--inflight_ == 0) {
    aio_->Unref(Env());
    MaybeFinishShutdown();
  }
}

void ClusterState::Track(const std::shared_ptr<IoCtxState>& io) {
  std::vector<std::weak_ptr<IoCtxState>> live;
  for (auto& weak : ioctxs_) {
    if (!weak.expired()) live.push_back(std::move(weak));
  }
  live.push_back(io);
  ioctxs_ = std::move(live);
}

Napi::Promise ClusterState::Shutdown(Napi::Env env) {
  auto deferred = Napi::Promise::Deferred::New(env);
  if (phase_ == Phase::Down) {
    deferred.Resolve(env.Undefined());
    return deferred.Promise();
  }
  shutdownWaiters_.push_back(deferred);
  if (phase_ == Phase::Open) {
    phase_ = Phase::ShuttingDown;
    // Keep ourselves counted while asking the pools to close, so that the
    // last one closing synchronously cannot finish the shutdown under us.
    Begin(false);
    for (const auto& weak : ioctxs_) {
      if (auto io = weak.lock()) io->RequestClose();
    }
    End(false);
  }
  return deferred.Promise();
}

void ClusterState::MaybeFinishShutdown() {
  if (phase_ != Phase::ShuttingDown || inflight_ != 0 || shutdownStarted_) return;
  shutdownStarted_ = true;
  auto self = shared_from_this();
  Task::Run(
      Env(), "archipelago:rados:shutdown",
      [self]() {
        rados_shutdown(self->rados_);
        return 0;
      },
      [self](Napi::Env env, int) {
        self->phase_ = Phase::Down;
        self->aio_->Close();
        self->RemoveTeardownHook();
        auto waiters = std::move(self->shutdownWaiters_);
        self->shutdownWaiters_.clear();
        for (auto& waiter : waiters) waiter.Resolve(env.Undefined());
      });
}

// ---- connect ----

namespace {

std::string OptionalString(Napi::Object options, const char* key, bool* present) {
  Napi::Value value = options.Get(key);
  *present = !value.IsUndefined();
  if (!*present) return {};
  if (!value.IsString()) {
    throw Napi::TypeError::New(options.Env(), std::string("options.") + key + " must be a string");
  }
  return value.As<Napi::String>().Utf8Value();
}

const char* const kShutDown = "the client is shut down";

}  // namespace

Napi::Value Connect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool hasConf = false;
  bool hasId = false;
  std::string conf;
  std::string id;
  std::vector<std::pair<std::string, std::string>> config;
  if (info.Length() > 0 && !info[0].IsUndefined()) {
    if (!info[0].IsObject()) throw Napi::TypeError::New(env, "The \"options\" argument must be an object");
    Napi::Object options = info[0].As<Napi::Object>();
    conf = OptionalString(options, "conf", &hasConf);
    id = OptionalString(options, "id", &hasId);
    Napi::Value settings = options.Get("config");
    if (!settings.IsUndefined()) {
      if (!settings.IsObject()) throw Napi::TypeError::New(env, "options.config must be an object");
      Napi::Object object = settings.As<Napi::Object>();
      Napi::Array keys = object.GetPropertyNames();
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        Napi::Value key = keys.Get(i);
        Napi::Value value = object.Get(key);
        if (!value.IsString()) throw Napi::TypeError::New(env, "options.config values must be strings");
        config.emplace_back(key.ToString().Utf8Value(), value.As<Napi::String>().Utf8Value());
      }
    }
  }

  const Target target = Target::Op("connect");
  bool valid = ValidCString(conf) && ValidCString(id) && (!hasId || !id.empty());
  for (const auto& entry : config) valid = valid && ValidName(entry.first) && ValidCString(entry.second);
  if (!valid) return Rejected(env, kEInval, target, "options must not contain NUL (or an empty id)");

  struct Result {
    rados_t rados = nullptr;
    std::string step;
  };
  auto result = std::make_shared<Result>();
  auto deferred = Napi::Promise::Deferred::New(env);
  Task::Run(
      env, "archipelago:rados:connect",
      [result, hasConf, conf, hasId, id, config]() {
        rados_t rados = nullptr;
        int rc = rados_create(&rados, hasId ? id.c_str() : nullptr);
        if (rc < 0) {
          result->step = "creating the client";
          return rc;
        }
        rc = rados_conf_read_file(rados, hasConf ? conf.c_str() : nullptr);
        // Without an explicit path, finding no ceph.conf is fine: the
        // config entries may carry everything (mon_host, keyring …).
        if (rc < 0 && (hasConf || rc != -ENOENT)) {
          result->step = hasConf ? "reading " + Quote(conf) : "reading the default ceph.conf";
          rados_shutdown(rados);
          return rc;
        }
        for (const auto& entry : config) {
          rc = rados_conf_set(rados, entry.first.c_str(), entry.second.c_str());
          if (rc < 0) {
            result->step = "setting " + entry.first;
            rados_shutdown(rados);
            return rc;
          }
        }
        rc = rados_connect(rados);
        if (rc < 0) {
          result->step = "connecting to the cluster";
          rados_shutdown(rados);
          return rc;
        }
        result->rados = rados;
        return 0;
      },
      [result, deferred, target](Napi::Env env, int rc) {
        if (rc < 0) {
          Reject(deferred, -rc, target, result->step);
          return;
        }
        auto state = std::make_shared<ClusterState>(env, result->rados);
        deferred.Resolve(Cluster::NewInstance(env, std::move(state)));
      });
  return deferred.Promise();
}

// ---- the JS class ----

Napi::Object Cluster::NewInstance(Napi::Env env, std::shared_ptr<ClusterState> state) {
  return ConstructSlot<ClusterState>::New(Data(env).cluster, std::move(state));
}

Cluster::Cluster(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<Cluster>(info), state_(ConstructSlot<ClusterState>::Take(info, "RadosCluster")) {}

Napi::Function Cluster::DefineClass(Napi::Env env) {
  return ObjectWrap<Cluster>::DefineClass(env, "RadosCluster",
                                          {
                                              InstanceMethod<&Cluster::InstanceId>("instanceId"),
                                              InstanceMethod<&Cluster::Addrs>("addrs"),
                                              InstanceMethod<&Cluster::OpenPool>("openPool"),
                                              InstanceMethod<&Cluster::MonCommand>("monCommand"),
                                              InstanceMethod<&Cluster::BlocklistAdd>("blocklistAdd"),
                                              InstanceMethod<&Cluster::WaitForLatestOsdmap>("waitForLatestOsdmap"),
                                              InstanceMethod<&Cluster::Shutdown>("shutdown"),
                                          });
}

Napi::Value Cluster::InstanceId(const Napi::CallbackInfo& info) {
  if (!state_->open()) ThrowError(info.Env(), kEShutdown, Target::Op("instanceId"), kShutDown);
  return Napi::Number::New(info.Env(), static_cast<double>(rados_get_instance_id(state_->rados())));
}

Napi::Value Cluster::Addrs(const Napi::CallbackInfo& info) {
  const Target target = Target::Op("addrs");
  if (!state_->open()) ThrowError(info.Env(), kEShutdown, target, kShutDown);
  char* addrs = nullptr;
  int rc = rados_getaddrs(state_->rados(), &addrs);
  if (rc < 0) ThrowError(info.Env(), -rc, target);
  std::string value = addrs != nullptr ? addrs : "";
  std::free(addrs);  // librados strdup()s it
  return Napi::String::New(info.Env(), value);
}

Napi::Value Cluster::OpenPool(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string pool = ArgString(info, 0, "pool");
  const Target target = Target::Obj("openPool", pool);
  if (!ValidName(pool)) return Rejected(env, kEInval, target, "names must be non-empty and must not contain NUL");
  if (!state_->open()) return Rejected(env, kEShutdown, target, kShutDown);

  auto state = state_;
  auto io = std::make_shared<rados_ioctx_t>(nullptr);
  auto deferred = Napi::Promise::Deferred::New(env);
  state->Begin(true);
  Task::Run(
      env, "archipelago:rados:openPool",
      [state, io, pool]() { return rados_ioctx_create(state->rados(), pool.c_str(), io.get()); },
      [state, io, pool, deferred, target](Napi::Env env, int rc) {
        try {
          if (rc < 0) {
            Reject(deferred, -rc, target);
          } else if (!state->open()) {
            // shutdown() began while the pool was opening.
            rados_ioctx_destroy(*io);
            Reject(deferred, kEShutdown, target, kShutDown);
          } else {
            auto ioState = std::make_shared<IoCtxState>(state, *io, pool);
            state->Track(ioState);
            deferred.Resolve(IoCtx::NewInstance(env, std::move(ioState)));
          }
        } catch (...) {
          state->End(true);
          throw;
        }
        state->End(true);
      });
  return deferred.Promise();
}

Napi::Value Cluster::MonCommand(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string command;
  if (info.Length() > 0 && info[0].IsString()) {
    command = info[0].As<Napi::String>().Utf8Value();
  } else if (info.Length() > 0 && info[0].IsObject()) {
    Napi::Object json = env.Global().Get("JSON").As<Napi::Object>();
    Napi::Value text = json.Get("stringify").As<Napi::Function>().Call(json, {info[0]});
    if (!text.IsString()) throw Napi::TypeError::New(env, "The \"command\" argument must be JSON-serializable");
    command = text.As<Napi::String>().Utf8Value();
  } else {
    throw Napi::TypeError::New(env, "The \"command\" argument must be an object");
  }
  std::string input;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 1, "input");
    input.assign(reinterpret_cast<const char*>(buffer.Data()), buffer.Length());
  }
  const Target target = Target::Op("monCommand");
  if (!ValidCString(command)) return Rejected(env, kEInval, target, "the command must not contain NUL");
  if (!state_->open()) return Rejected(env, kEShutdown, target, kShutDown);

  struct Result {
    std::string output;
    std::string status;
  };
  auto result = std::make_shared<Result>();
  auto state = state_;
  auto deferred = Napi::Promise::Deferred::New(env);
  state->Begin(true);
  Task::Run(
      env, "archipelago:rados:monCommand",
      [state, result, command, input]() {
        const char* commands[1] = {command.c_str()};
        char* out = nullptr;
        size_t outLength = 0;
        char* status = nullptr;
        size_t statusLength = 0;
        int rc = rados_mon_command(state->rados(), commands, 1, input.data(), input.size(), &out, &outLength,
                                   &status, &statusLength);
        if (out != nullptr) {
          result->output.assign(out, outLength);
          rados_buffer_free(out);
        }
        if (status != nullptr) {
          result->status.assign(status, statusLength);
          rados_buffer_free(status);
        }
        return rc;
      },
      [state, result, deferred, target](Napi::Env env, int rc) {
        try {
          if (rc < 0) {
            Reject(deferred, -rc, target, result->status);
          } else {
            Napi::Object value = Napi::Object::New(env);
            value.Set("output", Napi::Buffer<char>::Copy(env, result->output.data(), result->output.size()));
            value.Set("status", Napi::String::New(env, result->status));
            deferred.Resolve(value);
          }
        } catch (...) {
          state->End(true);
          throw;
        }
        state->End(true);
      });
  return deferred.Promise();
}

namespace {

// Runs `call` (a librados call on this cluster returning 0 or -errno) on the
// thread pool; the promise resolves to undefined or rejects with the errno.
template <typename Call>
Napi::Value RunVoid(Napi::Env env, const std::shared_ptr<ClusterState>& state, const char* resource,
                    const Target& target, Call call) {
  auto deferred = Napi::Promise::Deferred::New(env);
  state->Begin(true);
  Task::Run(
      env, resource, [state, call]() mutable { return call(state->rados()); },
      [state, deferred, target](Napi::Env env, int rc) {
        if (rc < 0) {
          Reject(deferred, -rc, target);
        } else {
          deferred.Resolve(env.Undefined());
        }
        state->End(true);
      });
  return deferred.Promise();
}

}  // namespace

Napi::Value Cluster::BlocklistAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string addr = ArgString(info, 0, "addr");
  uint32_t seconds = static_cast<uint32_t>(ArgUint(info, 1, "seconds", UINT32_MAX));
  const Target target = Target::Obj("blocklistAdd", addr);
  if (!ValidName(addr)) return Rejected(env, kEInval, target, "names must be non-empty and must not contain NUL");
  if (!state_->open()) return Rejected(env, kEShutdown, target, kShutDown);
  return RunVoid(env, state_, "archipelago:rados:blocklistAdd", target,
                 [addr, seconds](rados_t rados) mutable { return rados_blocklist_add(rados, &addr[0], seconds); });
}

// Asks the mon for the newest osdmap and waits until this client has it.
// Why: a client whose requests only time out (op timeout) may not learn of
// a new map, and an OSD that was marked down and booted again drops requests
// carrying an epoch from before its boot (src/blockers/rados/osdmap.ts).
Napi::Value Cluster::WaitForLatestOsdmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Target target = Target::Obj("waitForLatestOsdmap", "");
  if (!state_->open()) return Rejected(env, kEShutdown, target, kShutDown);
  return RunVoid(env, state_, "archipelago:rados:waitForLatestOsdmap", target,
                 [](rados_t rados) { return rados_wait_for_latest_osdmap(rados); });
}

Napi::Value Cluster::Shutdown(const Napi::CallbackInfo& info) { return state_->Shutdown(info.Env()); }

void InitCluster(Napi::Env env, AddonData& data) { data.cluster = Napi::Persistent(Cluster::DefineClass(env)); }

}  // namespace arch_rados
