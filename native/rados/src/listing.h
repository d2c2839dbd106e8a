// Object listing of a pool's default namespace (rados_nobjects_list_*).
// next(max) runs one batch of rados_nobjects_list_next2 calls on the thread
// pool; calls on one listing are queued and run one at a time (the list
// context is not thread-safe). The pool's close() closes open listings.
#pragma once

#include <deque>
#include <memory>
#include <utility>

#include "common.h"

namespace arch_rados {

class ListingState : public std::enable_shared_from_this<ListingState> {
 public:
  ListingState(std::shared_ptr<IoCtxState> io, rados_list_ctx_t ctx);
  ~ListingState();
  ListingState(const ListingState&) = delete;
  ListingState& operator=(const ListingState&) = delete;

  const std::shared_ptr<IoCtxState> io;

  Napi::Promise Next(Napi::Env env, uint32_t max);
  // JS thread. Closes now, or as soon as the running batch finishes.
  void Close();

 private:
  void Pump(Napi::Env env);
  void CloseContext();

  rados_list_ctx_t ctx_;
  bool open_ = true;
  bool busy_ = false;
  bool ended_ = false;
  bool closeRequested_ = false;
  std::deque<std::pair<Napi::Promise::Deferred, uint32_t>> queue_;
};

class Listing : public Napi::ObjectWrap<Listing> {
 public:
  static Napi::Object NewInstance(Napi::Env env, std::shared_ptr<ListingState> state);
  explicit Listing(const Napi::CallbackInfo& info);

  static Napi::Function DefineClass(Napi::Env env);

 private:
  Napi::Value Next(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  std::shared_ptr<ListingState> state_;
};

}  // namespace arch_rados
