// Task: runs one blocking librados call on the libuv thread pool and finishes
// on the JS thread, so the event loop never waits on the network.
//
//   work: thread pool; returns >= 0 on success or -errno. It must not touch
//         JS values; share results with `done` through captured state.
//   done: JS thread, with work's return value; resolves or rejects.
//
// Both functions (and what they captured) are destroyed on the JS thread.
#pragma once

#include <cerrno>
#include <functional>
#include <utility>

#include "common.h"

namespace arch_rados {

class Task final : public Napi::AsyncWorker {
 public:
  using Work = std::function<int()>;
  using Done = std::function<void(Napi::Env, int)>;

  static void Run(Napi::Env env, const char* name, Work work, Done done) {
    (new Task(env, name, std::move(work), std::move(done)))->Queue();
  }

 private:
  Task(Napi::Env env, const char* name, Work work, Done done)
      : Napi::AsyncWorker(env, name), work_(std::move(work)), done_(std::move(done)) {}

  void Execute() override { rc_ = work_(); }
  void OnOK() override { done_(Env(), rc_); }
  void OnError(const Napi::Error&) override { done_(Env(), -EIO); }

  Work work_;
  Done done_;
  int rc_ = 0;
};

}  // namespace arch_rados
