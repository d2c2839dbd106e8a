// Asynchronous librados operations: an AioOp owns everything one operation
// needs until it completes (the promise, a shared_ptr to its pool, references
// to the caller's Buffers, librados op handles and output slots).
//
// Flow: SubmitAio creates a completion (rados_aio_create_completion2) whose
// C callback runs on a librados thread and only posts the op to the
// cluster's aio channel (NonBlockingCall, never blocks). On the JS thread,
// Deliver reads the return value, releases the completion, lets the op
// settle its promise, deletes the op and ends its count on the pool.
#pragma once

#include <functional>
#include <memory>

#include "cluster.h"
#include "common.h"
#include "errors.h"

namespace arch_rados {

class AioOp {
 public:
  AioOp(Napi::Env env, std::shared_ptr<IoCtxState> io, Target target);
  // Continues an operation whose promise already exists (readFull's retry).
  AioOp(Napi::Promise::Deferred deferred, std::shared_ptr<IoCtxState> io, Target target);
  virtual ~AioOp();
  AioOp(const AioOp&) = delete;
  AioOp& operator=(const AioOp&) = delete;

  // JS thread: settle `deferred` from the completion's return value.
  virtual void Complete(Napi::Env env, int rc) = 0;

  void Fail(int rc) { Reject(deferred, -rc, target); }

  const std::shared_ptr<IoCtxState> io;
  const Target target;
  const Napi::Promise::Deferred deferred;
  rados_completion_t completion = nullptr;

  // Channel<AioOp> interface.
  static void Deliver(Napi::Env env, Napi::Function unused, AioOp* op);
  static void Abandon(AioOp* op);

  // rados_callback_t.
  static void OnComplete(rados_completion_t completion, void* arg);
};

std::shared_ptr<AioChannel> MakeAioChannel(Napi::Env env);

// Starts `op`: `start` issues the rados_aio_* call with the op's completion
// and returns its result. The caller checked that the pool is usable (or is
// continuing an operation that is still counted). Returns the op's promise.
Napi::Promise SubmitAio(std::unique_ptr<AioOp> op, const std::function<int(rados_ioctx_t, rados_completion_t)>& start);

}  // namespace arch_rados
