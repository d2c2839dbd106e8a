// Watch/notify: RadosIoCtx.watch and .notify, and the RadosWatch class.
#include "watch.h"

#include <cerrno>
#include <climits>

#include "aio.h"
#include "args.h"
#include "ioctx.h"
#include "task.h"

namespace arch_rados {

// ---- events ----

void WatchEvent::Deliver(Napi::Env env, Napi::Function onEvent, WatchEvent* raw) {
  std::unique_ptr<WatchEvent> event(raw);
  Napi::Object object = Napi::Object::New(env);
  if (event->kind == Kind::Notify) {
    object.Set("type", "notify");
    object.Set("notifyId", Napi::BigInt::New(env, event->notifyId));
    object.Set("notifierId", Napi::Number::New(env, static_cast<double>(event->notifierId)));
    object.Set("payload", Napi::Buffer<char>::Copy(env, event->payload.data(), event->payload.size()));
  } else {
    object.Set("type", "error");
    object.Set("errno", Napi::Number::New(env, event->err));
  }
  event.reset();
  // A throwing listener surfaces as an uncaught exception, like an
  // EventEmitter listener would.
  onEvent.Call({object});
}

// ---- WatchState ----

WatchState::WatchState(std::shared_ptr<IoCtxState> io_, std::string oid_, std::shared_ptr<WatchChannel> channel_)
    : io(std::move(io_)), oid(std::move(oid_)), channel(std::move(channel_)) {}

WatchState::~WatchState() {
  // JS thread. Either never registered, or unwatched and flushed: no
  // librados callback can post any more.
  channel->Close();
}

void WatchState::Stop() {
  closing = true;
  channel->Mute();
  channel->Close();
}

void WatchState::OnNotify(void* arg, uint64_t notifyId, uint64_t, uint64_t notifierId, void* data, size_t length) {
  auto* state = static_cast<WatchState*>(arg);
  auto* event = new WatchEvent();
  event->kind = WatchEvent::Kind::Notify;
  event->notifyId = notifyId;
  event->notifierId = notifierId;
  if (data != nullptr && length > 0) event->payload.assign(static_cast<const char*>(data), length);
  if (!state->channel->Post(event)) delete event;
}

void WatchState::OnError(void* arg, uint64_t, int err) {
  auto* state = static_cast<WatchState*>(arg);
  auto* event = new WatchEvent();
  event->kind = WatchEvent::Kind::Error;
  event->err = err < 0 ? -err : err;
  if (!state->channel->Post(event)) delete event;
}

// ---- RadosIoCtx.watch / notify ----

Napi::Value IoCtx::Watch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  Napi::Function onEvent = ArgFunction(info, 1, "onEvent");
  Target what = Target::Obj("watch", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;

  auto channel = WatchChannel::Create(env, onEvent, "archipelago:rados:watch");
  auto watch = std::make_shared<WatchState>(state_, oid, channel);
  auto cluster = state_->cluster;
  return RunIoTask(
      env, state_, what,
      [watch, cluster](rados_ioctx_t io) {
        int rc = rados_watch2(io, watch->oid.c_str(), &watch->cookie, &WatchState::OnNotify, &WatchState::OnError,
                              watch.get());
        // On failure make sure no callback still runs with our pointer.
        if (rc < 0) rados_watch_flush(cluster->rados());
        return rc;
      },
      [watch](Napi::Env env, int) -> Napi::Value {
        watch->registered = true;
        watch->io->watches.insert(watch);
        return Watch::NewInstance(env, watch);
      });
  // If rados_watch2 failed, `watch` dies with the task and ~WatchState
  // releases its channel.
}

namespace {

class NotifyOp final : public AioOp {
 public:
  using AioOp::AioOp;
  ~NotifyOp() override {
    if (reply != nullptr) rados_buffer_free(reply);
  }

  void Complete(Napi::Env env, int rc) override {
    // A notify that timed out still reports who acked and who did not.
    if (reply == nullptr || (rc < 0 && rc != -ETIMEDOUT)) {
      if (rc < 0) {
        Fail(rc);
      } else {
        Napi::Object result = Napi::Object::New(env);
        result.Set("acks", Napi::Array::New(env));
        result.Set("timeouts", Napi::Array::New(env));
        deferred.Resolve(result);
      }
      return;
    }
    notify_ack_t* acks = nullptr;
    size_t ackCount = 0;
    notify_timeout_t* timeouts = nullptr;
    size_t timeoutCount = 0;
    int decoded = rados_decode_notify_response(reply, replyLength, &acks, &ackCount, &timeouts, &timeoutCount);
    if (decoded < 0) {
      Fail(rc < 0 ? rc : decoded);
      return;
    }
    Napi::Object result = Napi::Object::New(env);
    Napi::Array ackArray = Napi::Array::New(env, ackCount);
    for (size_t i = 0; i < ackCount; ++i) {
      Napi::Object ack = Napi::Object::New(env);
      ack.Set("notifierId", Napi::Number::New(env, static_cast<double>(acks[i].notifier_id)));
      ack.Set("cookie", Napi::BigInt::New(env, acks[i].cookie));
      ack.Set("payload", Napi::Buffer<char>::Copy(env, acks[i].payload != nullptr ? acks[i].payload : "",
                                                  acks[i].payload != nullptr ? acks[i].payload_len : 0));
      ackArray.Set(static_cast<uint32_t>(i), ack);
    }
    Napi::Array timeoutArray = Napi::Array::New(env, timeoutCount);
    for (size_t i = 0; i < timeoutCount; ++i) {
      Napi::Object timeout = Napi::Object::New(env);
      timeout.Set("notifierId", Napi::Number::New(env, static_cast<double>(timeouts[i].notifier_id)));
      timeout.Set("cookie", Napi::BigInt::New(env, timeouts[i].cookie));
      timeoutArray.Set(static_cast<uint32_t>(i), timeout);
    }
    rados_free_notify_response(acks, ackCount, timeouts);
    result.Set("acks", ackArray);
    result.Set("timeouts", timeoutArray);
    deferred.Resolve(result);
  }

  Napi::Reference<Napi::Buffer<uint8_t>> payload;
  char* reply = nullptr;
  size_t replyLength = 0;
};

const char* const kWatchClosed = "the watch is closed";

}  // namespace

Napi::Value IoCtx::Notify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  Napi::Buffer<uint8_t> payload = ArgBuffer(info, 1, "payload");
  uint64_t timeoutMs = ArgUint(info, 2, "timeoutMs");
  // librados truncates the timeout to whole seconds, and 0 seconds means the
  // OSD's default (30 s): round up, so 1..999 ms waits 1 s, not 30.
  if (timeoutMs > 0) timeoutMs = (timeoutMs + 999) / 1000 * 1000;
  if (payload.Length() > static_cast<size_t>(INT_MAX)) throw Napi::RangeError::New(env, "notify payload too large");
  Target what = Target::Obj("notify", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  auto op = std::make_unique<NotifyOp>(env, state_, std::move(what));
  op->payload = Napi::Persistent(payload);
  char** reply = &op->reply;
  size_t* replyLength = &op->replyLength;
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_notify(io, oid.c_str(), completion, reinterpret_cast<const char*>(payload.Data()),
                            static_cast<int>(payload.Length()), timeoutMs, reply, replyLength);
  });
}

// ---- the RadosWatch class ----

Napi::Object Watch::NewInstance(Napi::Env env, std::shared_ptr<WatchState> state) {
  return ConstructSlot<WatchState>::New(Data(env).watch, std::move(state));
}

Watch::Watch(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<Watch>(info), state_(ConstructSlot<WatchState>::Take(info, "RadosWatch")) {}

Napi::Function Watch::DefineClass(Napi::Env env) {
  return ObjectWrap<Watch>::DefineClass(env, "RadosWatch",
                                        {
                                            InstanceAccessor<&Watch::Cookie>("cookie"),
                                            InstanceMethod<&Watch::Ack>("ack"),
                                            InstanceMethod<&Watch::Check>("check"),
                                            InstanceMethod<&Watch::Close>("close"),
                                        });
}

Napi::Value Watch::Cookie(const Napi::CallbackInfo& info) { return Napi::BigInt::New(info.Env(), state_->cookie); }

Napi::Value Watch::Ack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t notifyId = ArgU64(info, 0, "notifyId");
  std::string payload;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 1, "payload");
    if (buffer.Length() > static_cast<size_t>(INT_MAX)) throw Napi::RangeError::New(env, "ack payload too large");
    payload.assign(reinterpret_cast<const char*>(buffer.Data()), buffer.Length());
  }
  Target what = Target::Obj("ack", state_->oid);
  if (state_->closing) return Rejected(env, kEBadF, what, kWatchClosed);
  if (int err = state_->io->Unavailable()) return Rejected(env, err, what, state_->io->Detail());
  // rados_notify_ack only queues the ack message; it does not wait for it.
  int rc = rados_notify_ack(state_->io->io(), state_->oid.c_str(), notifyId, state_->cookie, payload.data(),
                            static_cast<int>(payload.size()));
  if (rc < 0) return Rejected(env, -rc, what);
  auto deferred = Napi::Promise::Deferred::New(env);
  deferred.Resolve(env.Undefined());
  return deferred.Promise();
}

Napi::Value Watch::Check(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Target what = Target::Obj("check", state_->oid);
  if (state_->closing) ThrowError(env, kEBadF, what, kWatchClosed);
  int rc = rados_watch_check(state_->io->io(), state_->cookie);
  if (rc < 0) ThrowError(env, -rc, what);
  return Napi::Number::New(env, rc);
}

Napi::Value Watch::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto deferred = Napi::Promise::Deferred::New(env);
  if (state_->closed) {
    deferred.Resolve(env.Undefined());
    return deferred.Promise();
  }
  state_->closeWaiters.push_back(deferred);
  if (state_->closing) return deferred.Promise();  // already being unwatched

  state_->Stop();
  auto watch = state_;
  auto io = state_->io;
  io->Begin(true);
  Task::Run(
      env, "archipelago:rados:unwatch",
      [watch, io]() {
        // Errors (e.g. after a blocklist) still leave the watch cancelled
        // locally, which is what close() promises.
        rados_unwatch2(io->io(), watch->cookie);
        rados_watch_flush(io->cluster->rados());
        return 0;
      },
      [watch, io](Napi::Env env, int) {
        watch->registered = false;
        watch->closed = true;
        io->watches.erase(watch);
        auto waiters = std::move(watch->closeWaiters);
        watch->closeWaiters.clear();
        for (auto& waiter : waiters) waiter.Resolve(env.Undefined());
        io->End(true);
      });
  return deferred.Promise();
}

void InitWatch(Napi::Env env, AddonData& data) { data.watch = Napi::Persistent(Watch::DefineClass(env)); }

}  // namespace arch_rados
