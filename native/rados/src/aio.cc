#include "aio.h"

#include "ioctx.h"

namespace arch_rados {

AioOp::AioOp(Napi::Env env, std::shared_ptr<IoCtxState> io_, Target target_)
    : io(std::move(io_)), target(std::move(target_)), deferred(Napi::Promise::Deferred::New(env)) {}

AioOp::AioOp(Napi::Promise::Deferred deferred_, std::shared_ptr<IoCtxState> io_, Target target_)
    : io(std::move(io_)), target(std::move(target_)), deferred(std::move(deferred_)) {}

AioOp::~AioOp() {
  if (completion != nullptr) rados_aio_release(completion);
}

void AioOp::OnComplete(rados_completion_t, void* arg) {
  auto* op = static_cast<AioOp*>(arg);
  // The op keeps its pool, and so the cluster and its channel, alive. If the
  // environment is gone the op is leaked on purpose: nothing may touch N-API.
  op->io->cluster->aio().Post(op);
}

void AioOp::Deliver(Napi::Env env, Napi::Function, AioOp* raw) {
  std::unique_ptr<AioOp> op(raw);
  std::shared_ptr<IoCtxState> io = op->io;
  int rc = rados_aio_get_return_value(op->completion);
  rados_aio_release(op->completion);
  op->completion = nullptr;
  try {
    op->Complete(env, rc);
  } catch (...) {
    op.reset();
    io->End();
    throw;
  }
  op.reset();  // drop Buffer references and librados op handles first
  io->End();
}

void AioOp::Abandon(AioOp*) {
  // Environment teardown: the promise, references and completion cannot be
  // released safely any more; the process is going away.
}

std::shared_ptr<AioChannel> MakeAioChannel(Napi::Env env) {
  return AioChannel::Create(env, Napi::Function(), "archipelago:rados:aio");
}

Napi::Promise SubmitAio(std::unique_ptr<AioOp> op,
                        const std::function<int(rados_ioctx_t, rados_completion_t)>& start) {
  Napi::Promise promise = op->deferred.Promise();
  std::shared_ptr<IoCtxState> io = op->io;
  int rc = rados_aio_create_completion2(op.get(), &AioOp::OnComplete, &op->completion);
  if (rc < 0) {
    op->completion = nullptr;
    op->Fail(rc);
    return promise;
  }
  io->Begin();
  rc = start(io->io(), op->completion);
  if (rc < 0) {
    // Not queued: librados will not call back.
    op->Fail(rc);
    op.reset();
    io->End();
    return promise;
  }
  op.release();  // owned by librados until OnComplete posts it back
  return promise;
}

}  // namespace arch_rados
