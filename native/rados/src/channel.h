// Channel<T>: hands items from librados' threads to the JS thread, over a
// Napi::TypedThreadSafeFunction, and makes the hand-over safe to race with
// closing and with environment teardown.
//
// T provides (all static):
//   void Deliver(Napi::Env, Napi::Function fn, T* item)  JS thread; owns item
//   void Abandon(T* item)   the environment is going away (no JS, no N-API);
//                           owns item
//
// Post() may be called from any thread and returns false once the channel is
// closed or its environment is gone; the caller then still owns the item.
// A mutex around the open flag guarantees no thread calls into the
// thread-safe function after Close() or after Node finalized it.
//
// The channel starts unref'd: by itself it never keeps the process alive.
// Owners Ref() it while they wait for items they must deliver.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>

#include "common.h"

namespace arch_rados {

template <typename T>
class Channel {
 public:
  // `fn` may be empty: items are then delivered with an empty Function.
  static std::shared_ptr<Channel> Create(Napi::Env env, Napi::Function fn, const char* name) {
    std::shared_ptr<Channel> channel(new Channel());
    // The finalizer owns one reference, so the channel outlives the last
    // delivery and the finalizer itself, whoever else lets go first.
    auto* keep = new std::shared_ptr<Channel>(channel);
    try {
      if (fn.IsEmpty()) {
        channel->tsfn_ = Tsfn::New(env, name, 0, 1, channel.get(), &Channel::Finalize, keep);
      } else {
        channel->tsfn_ = Tsfn::New(env, fn, name, 0, 1, channel.get(), &Channel::Finalize, keep);
      }
    } catch (...) {
      delete keep;
      throw;
    }
    channel->open_ = true;
    channel->tsfn_.Unref(env);
    return channel;
  }

  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Any thread.
  bool Post(T* item) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!open_) return false;
    return tsfn_.NonBlockingCall(item) == napi_ok;
  }

  // JS thread. Items queued from now on are deleted instead of delivered.
  void Mute() { muted_ = true; }

  // JS thread: while referenced, the event loop stays alive.
  void Ref(Napi::Env env) {
    std::lock_guard<std::mutex> lock(mu_);
    if (open_) tsfn_.Ref(env);
  }
  void Unref(Napi::Env env) {
    std::lock_guard<std::mutex> lock(mu_);
    if (open_) tsfn_.Unref(env);
  }

  // Environment teardown: stop posting, but leave the thread-safe function
  // to Node, which is finalizing it anyway.
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }

  // JS thread, idempotent. Items already queued are still handed to
  // Deliver (or deleted when muted); nothing new can be posted.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!open_) return;
      open_ = false;
    }
    tsfn_.Release();
  }

 private:
  Channel() = default;

  static void CallJs(Napi::Env env, Napi::Function fn, Channel* self, T* item) {
    if (item == nullptr) return;
    if (env == nullptr) {
      T::Abandon(item);
    } else if (self->muted_) {
      delete item;
    } else {
      T::Deliver(env, fn, item);
    }
  }

  static void Finalize(Napi::Env, std::shared_ptr<Channel>* keep, Channel* self) {
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      self->open_ = false;
    }
    delete keep;
  }

  using Tsfn = Napi::TypedThreadSafeFunction<Channel, T, &Channel::CallJs>;

  std::mutex mu_;
  bool open_ = false;
  std::atomic<bool> muted_{false};
  Tsfn tsfn_;
};

}  // namespace arch_rados
