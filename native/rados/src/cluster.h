// One librados client (rados_t): its lifetime, the channel that carries aio
// completions to the JS thread, and the JS `RadosCluster` object.
//
// Lifetime rules (all bookkeeping happens on the JS thread):
// - Every operation, aio or blocking, is counted from submission until its
//   promise settles (Begin/End). While any is in flight the aio channel is
//   ref'd, so the process waits for it; when none is, the channel is unref'd
//   and the process can exit.
// - shutdown(): new operations reject with ESHUTDOWN (108); every pool is
//   closed (each waits for its own operations, unwatches, flushes, destroys),
//   then rados_shutdown runs on the thread pool and the channel is released.
// - Operations hold shared_ptrs to their IoCtxState, which holds the
//   ClusterState, so nothing an operation uses can be freed under it even if
//   JS drops every reference.
// - If the environment is torn down without shutdown(), a cleanup hook stops
//   librados (unless a thread-pool call is still inside it) and detaches
//   every channel so no librados thread calls into a dead environment.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "channel.h"
#include "common.h"

namespace arch_rados {

class AioOp;
using AioChannel = Channel<AioOp>;

class ClusterState : public std::enable_shared_from_this<ClusterState> {
 public:
  enum class Phase { Open, ShuttingDown, Down };

  ClusterState(Napi::Env env, rados_t rados);
  ~ClusterState();
  ClusterState(const ClusterState&) = delete;
  ClusterState& operator=(const ClusterState&) = delete;

  rados_t rados() const { return rados_; }
  Napi::Env Env() const { return Napi::Env(env_); }
  bool open() const { return phase_ == Phase::Open; }
  // The environment was torn down: make no librados or N-API calls.
  bool abandoned() const { return abandoned_; }
  // Defined in cluster.cc, where AioOp is complete.
  AioChannel& aio();

  // JS thread. `blocking`: a Task that runs librados code on the thread pool.
  void Begin(bool blocking);
  void End(bool blocking);

  void Track(const std::shared_ptr<IoCtxState>& io);

  // Idempotent; every call's promise resolves when the client is down.
  Napi::Promise Shutdown(Napi::Env env);

 private:
  void MaybeFinishShutdown();
  void RemoveTeardownHook();
  static void OnTeardown(void* arg);

  napi_env env_;
  rados_t rados_;
  Phase phase_ = Phase::Open;
  bool abandoned_ = false;
  bool shutdownStarted_ = false;
  bool hook_ = false;
  size_t inflight_ = 0;
  size_t blocking_ = 0;
  std::shared_ptr<AioChannel> aio_;
  std::vector<std::weak_ptr<IoCtxState>> ioctxs_;
  std::vector<Napi::Promise::Deferred> shutdownWaiters_;
};

// JS: connect(options) -> Promise<RadosCluster>
Napi::Value Connect(const Napi::CallbackInfo& info);

class Cluster : public Napi::ObjectWrap<Cluster> {
 public:
  static Napi::Object NewInstance(Napi::Env env, std::shared_ptr<ClusterState> state);
  explicit Cluster(const Napi::CallbackInfo& info);

  static Napi::Function DefineClass(Napi::Env env);

 private:
  Napi::Value InstanceId(const Napi::CallbackInfo& info);
  Napi::Value Addrs(const Napi::CallbackInfo& info);
  Napi::Value OpenPool(const Napi::CallbackInfo& info);
  Napi::Value MonCommand(const Napi::CallbackInfo& info);
  Napi::Value BlocklistAdd(const Napi::CallbackInfo& info);
  Napi::Value WaitForLatestOsdmap(const Napi::CallbackInfo& info);
  Napi::Value Shutdown(const Napi::CallbackInfo& info);

  std::shared_ptr<ClusterState> state_;
};

}  // namespace arch_rados
