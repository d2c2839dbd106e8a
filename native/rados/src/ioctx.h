// One open pool (rados_ioctx_t) and the JS `RadosIoCtx` object. The methods
// are spread over files by job: io_ops.cc (aio data operations), locks.cc,
// watch.cc (watch/notify), listing.cc; this file's .cc has the lifecycle.
//
// close() (or the cluster's shutdown) first refuses new operations, then
// waits on the JS thread until every accepted one has settled, then on the
// thread pool: unwatches this pool's watches, rados_watch_flush,
// rados_aio_flush, rados_ioctx_destroy. Listings are closed before that.
#pragma once

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "cluster.h"
#include "common.h"
#include "errors.h"

namespace arch_rados {

class IoCtxState : public std::enable_shared_from_this<IoCtxState> {
 public:
  IoCtxState(std::shared_ptr<ClusterState> cluster, rados_ioctx_t io, std::string pool);
  ~IoCtxState();
  IoCtxState(const IoCtxState&) = delete;
  IoCtxState& operator=(const IoCtxState&) = delete;

  const std::shared_ptr<ClusterState> cluster;
  const std::string pool;

  // Valid while an operation counted by Begin() is in flight.
  rados_ioctx_t io() const { return io_; }

  // 0 when new operations may start; else the errno to reject them with
  // (108 after the client's shutdown, 9 after close()), and Detail() says why.
  int Unavailable() const;
  std::string Detail() const;

  // JS thread. Count an operation in flight on this pool (and its cluster).
  void Begin(bool blocking = false);
  void End(bool blocking = false);

  // JS thread. Idempotent; the promise resolves once the pool is destroyed.
  Napi::Promise Close(Napi::Env env);
  // Starts closing without a promise (the cluster's shutdown).
  void RequestClose();

  // Environment teardown: forget librados handles without calling librados.
  void Abandon();
  bool destroyed() const { return destroyed_; }

  // Registered watches (kept alive here until unwatched: librados holds a
  // raw pointer to each) and open listings (closed before the pool is).
  std::set<std::shared_ptr<WatchState>> watches;
  std::vector<std::weak_ptr<ListingState>> listings;

 private:
  void MaybeStartClose();

  rados_ioctx_t io_;
  size_t inflight_ = 0;
  bool closing_ = false;
  bool closeStarted_ = false;
  bool destroyed_ = false;
  std::vector<Napi::Promise::Deferred> closeWaiters_;
};

// Rejects with EINVAL for an unusable name, or with Unavailable(); returns
// an empty value when the operation may go ahead. `name` may be null.
Napi::Value Precheck(Napi::Env env, const IoCtxState& io, const Target& target, const std::string* name);

// Runs a blocking librados call on the thread pool as an operation of `io`:
// rejects with -rc when work returns < 0, else resolves with make(env, rc).
Napi::Promise RunIoTask(Napi::Env env, const std::shared_ptr<IoCtxState>& io, const Target& target,
                        std::function<int(rados_ioctx_t)> work,
                        std::function<Napi::Value(Napi::Env, int)> make);

class IoCtx : public Napi::ObjectWrap<IoCtx> {
 public:
  static Napi::Object NewInstance(Napi::Env env, std::shared_ptr<IoCtxState> state);
  explicit IoCtx(const Napi::CallbackInfo& info);

  static Napi::Function DefineClass(Napi::Env env);

 private:
  // ioctx.cc
  Napi::Value Pool(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  // io_ops.cc
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value WriteFull(const Napi::CallbackInfo& info);
  Napi::Value ReadFull(const Napi::CallbackInfo& info);
  Napi::Value Zero(const Napi::CallbackInfo& info);
  Napi::Value Remove(const Napi::CallbackInfo& info);
  Napi::Value Stat(const Napi::CallbackInfo& info);
  Napi::Value Exec(const Napi::CallbackInfo& info);
  // locks.cc
  Napi::Value LockExclusive(const Napi::CallbackInfo& info);
  Napi::Value Unlock(const Napi::CallbackInfo& info);
  Napi::Value ListLockers(const Napi::CallbackInfo& info);
  Napi::Value BreakLock(const Napi::CallbackInfo& info);
  // watch.cc
  Napi::Value Watch(const Napi::CallbackInfo& info);
  Napi::Value Notify(const Napi::CallbackInfo& info);
  // listing.cc
  Napi::Value List(const Napi::CallbackInfo& info);

  std::shared_ptr<IoCtxState> state_;
};

}  // namespace arch_rados
