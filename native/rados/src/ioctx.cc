// IoCtxState lifecycle (open, count operations, close) and the RadosIoCtx class.
#include "ioctx.h"

#include <cerrno>

#include "args.h"
#include "listing.h"
#include "task.h"
#include "watch.h"

namespace arch_rados {

IoCtxState::IoCtxState(std::shared_ptr<ClusterState> cluster_, rados_ioctx_t io, std::string pool_)
    : cluster(std::move(cluster_)), pool(std::move(pool_)), io_(io) {}

IoCtxState::~IoCtxState() {
  // No operation, watch or listing refers to us any more (each holds a
  // shared_ptr), so this cannot race with anything: release the pool unless
  // close() did or the environment is gone.
  if (!destroyed_ && !cluster->abandoned()) {
    rados_aio_flush(io_);
    rados_ioctx_destroy(io_);
  }
}

int IoCtxState::Unavailable() const {
  if (!cluster->open()) return kEShutdown;
  if (closing_ || destroyed_) return kEBadF;
  return 0;
}

std::string IoCtxState::Detail() const {
  if (!cluster->open()) return "the client is shut down";
  if (closing_ || destroyed_) return "pool " + Quote(pool) + " is closed";
  return {};
}

void IoCtxState::Begin(bool blocking) {
  ++inflight_;
  cluster->Begin(blocking);
}

void IoCtxState::End(bool blocking) {
  --inflight_;
  // A pending close may start now; it holds its own count on the cluster, so
  // the cluster cannot finish shutting down in between.
  MaybeStartClose();
  cluster->End(blocking);
}

Napi::Promise IoCtxState::Close(Napi::Env env) {
  auto deferred = Napi::Promise::Deferred::New(env);
  if (destroyed_) {
    deferred.Resolve(env.Undefined());
  } else {
    closeWaiters_.push_back(deferred);
    RequestClose();
  }
  return deferred.Promise();
}

void IoCtxState::RequestClose() {
  if (closing_ || destroyed_) return;
  closing_ = true;
  cluster->Begin(true);  // held until the pool is destroyed
  MaybeStartClose();
}

void IoCtxState::MaybeStartClose() {
  if (!closing_ || closeStarted_ || inflight_ != 0) return;
  closeStarted_ = true;

  // JS thread: nothing of this pool is in flight. Stop watches from
  // delivering, remember their cookies, close listings.
  auto cookies = std::make_shared<std::vector<uint64_t>>();
  for (const auto& watch : watches) {
    if (!watch->closing) {
      watch->Stop();
      cookies->push_back(watch->cookie);
    }
  }
  for (const auto& weak : listings) {
    if (auto listing = weak.lock()) listing->Close();
  }
  listings.clear();

  auto self = shared_from_this();
  Task::Run(
      cluster->Env(), "archipelago:rados:ioctx-close",
      [self, cookies]() {
        for (uint64_t cookie : *cookies) rados_unwatch2(self->io_, cookie);
        if (!cookies->empty()) rados_watch_flush(self->cluster->rados());
        rados_aio_flush(self->io_);
        rados_ioctx_destroy(self->io_);
        return 0;
      },
      [self](Napi::Env env, int) {
        self->destroyed_ = true;
        for (const auto& watch : self->watches) {
          watch->registered = false;
          watch->closed = true;
          for (auto& waiter : watch->closeWaiters) waiter.Resolve(env.Undefined());
          watch->closeWaiters.clear();
        }
        self->watches.clear();
        auto waiters = std::move(self->closeWaiters_);
        self->closeWaiters_.clear();
        for (auto& waiter : waiters) waiter.Resolve(env.Undefined());
        self->cluster->End(true);
      });
}

void IoCtxState::Abandon() {
  destroyed_ = true;
  for (const auto& watch : watches) {
    watch->closing = true;
    watch->channel->Mute();
    watch->channel->Detach();
  }
}

Napi::Value Precheck(Napi::Env env, const IoCtxState& io, const Target& target, const std::string* name) {
  if (name != nullptr && !ValidName(*name)) {
    return Rejected(env, kEInval, target, "names must be non-empty and must not contain NUL");
  }
  if (int err = io.Unavailable()) return Rejected(env, err, target, io.Detail());
  return Napi::Value();
}

Napi::Promise RunIoTask(Napi::Env env, const std::shared_ptr<IoCtxState>& io, const Target& target,
                        std::function<int(rados_ioctx_t)> work,
                        std::function<Napi::Value(Napi::Env, int)> make) {
  auto deferred = Napi::Promise::Deferred::New(env);
  io->Begin(true);
  std::string name = "archipelago:rados:" + target.op;
  Task::Run(
      env, name.c_str(), [io, work = std::move(work)]() { return work(io->io()); },
      [io, deferred, target, make = std::move(make)](Napi::Env env, int rc) {
        try {
          if (rc < 0) {
            Reject(deferred, -rc, target);
          } else {
            deferred.Resolve(make(env, rc));
          }
        } catch (...) {
          io->End(true);
          throw;
        }
        io->End(true);
      });
  return deferred.Promise();
}

// ---- the JS class ----

Napi::Object IoCtx::NewInstance(Napi::Env env, std::shared_ptr<IoCtxState> state) {
  return ConstructSlot<IoCtxState>::New(Data(env).ioctx, std::move(state));
}

IoCtx::IoCtx(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<IoCtx>(info), state_(ConstructSlot<IoCtxState>::Take(info, "RadosIoCtx")) {}

Napi::Function IoCtx::DefineClass(Napi::Env env) {
  return ObjectWrap<IoCtx>::DefineClass(
      env, "RadosIoCtx",
      {
          InstanceAccessor<&IoCtx::Pool>("pool"),
          InstanceMethod<&IoCtx::Read>("read"),
          InstanceMethod<&IoCtx::Write>("write"),
          InstanceMethod<&IoCtx::WriteFull>("writeFull"),
          InstanceMethod<&IoCtx::ReadFull>("readFull"),
          InstanceMethod<&IoCtx::Zero>("zero"),
          InstanceMethod<&IoCtx::Remove>("remove"),
          InstanceMethod<&IoCtx::Stat>("stat"),
          InstanceMethod<&IoCtx::List>("list"),
          InstanceMethod<&IoCtx::LockExclusive>("lockExclusive"),
          InstanceMethod<&IoCtx::Unlock>("unlock"),
          InstanceMethod<&IoCtx::ListLockers>("listLockers"),
          InstanceMethod<&IoCtx::BreakLock>("breakLock"),
          InstanceMethod<&IoCtx::Exec>("exec"),
          InstanceMethod<&IoCtx::Watch>("watch"),
          InstanceMethod<&IoCtx::Notify>("notify"),
          InstanceMethod<&IoCtx::Close>("close"),
      });
}

Napi::Value IoCtx::Pool(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), state_->pool); }

Napi::Value IoCtx::Close(const Napi::CallbackInfo& info) { return state_->Close(info.Env()); }

void InitIoCtx(Napi::Env env, AddonData& data) { data.ioctx = Napi::Persistent(IoCtx::DefineClass(env)); }

}  // namespace arch_rados
