// Watch/notify. A watch is registered with rados_watch2; librados calls our
// C callbacks on its own threads, which copy the notify (id, notifier,
// payload) or the error into a WatchEvent and post it to the JS thread over a
// per-watch channel that calls the user's onEvent. The user acks with
// watch.ack() (rados_notify_ack; librados only queues the message).
//
// librados keeps a raw pointer to the WatchState until unwatched, so the
// pool's registry owns it until close() (or the pool's close) has run
// rados_unwatch2 + rados_watch_flush; after that no callback can arrive.
// The cookie is a librados handle: after close it is never passed to librados
// again (ack/check reject with EBADF).
//
// The per-watch channel is unref'd: an open watch alone does not keep the
// process alive.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "channel.h"
#include "common.h"

namespace arch_rados {

struct WatchEvent {
  enum class Kind { Notify, Error };
  Kind kind = Kind::Notify;
  uint64_t notifyId = 0;
  uint64_t notifierId = 0;
  int err = 0;  // positive
  std::string payload;

  static void Deliver(Napi::Env env, Napi::Function onEvent, WatchEvent* event);
  static void Abandon(WatchEvent* event) { delete event; }
};

using WatchChannel = Channel<WatchEvent>;

class WatchState {
 public:
  WatchState(std::shared_ptr<IoCtxState> io, std::string oid, std::shared_ptr<WatchChannel> channel);
  ~WatchState();
  WatchState(const WatchState&) = delete;
  WatchState& operator=(const WatchState&) = delete;

  const std::shared_ptr<IoCtxState> io;
  const std::string oid;
  const std::shared_ptr<WatchChannel> channel;

  // Written by rados_watch2 on the thread pool before registration is
  // published to the JS thread; read-only afterwards.
  uint64_t cookie = 0;
  bool registered = false;  // in io->watches, awaiting unwatch
  bool closing = false;     // no more events, acks or checks
  bool closed = false;      // unwatched and flushed
  std::vector<Napi::Promise::Deferred> closeWaiters;

  // JS thread: stop delivering events (closing starts).
  void Stop();

  // librados callbacks (librados threads).
  static void OnNotify(void* arg, uint64_t notifyId, uint64_t handle, uint64_t notifierId, void* data,
                       size_t length);
  static void OnError(void* arg, uint64_t cookie, int err);
};

class Watch : public Napi::ObjectWrap<Watch> {
 public:
  static Napi::Object NewInstance(Napi::Env env, std::shared_ptr<WatchState> state);
  explicit Watch(const Napi::CallbackInfo& info);

  static Napi::Function DefineClass(Napi::Env env);

 private:
  Napi::Value Cookie(const Napi::CallbackInfo& info);
  Napi::Value Ack(const Napi::CallbackInfo& info);
  Napi::Value Check(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  std::shared_ptr<WatchState> state_;
};

}  // namespace arch_rados
