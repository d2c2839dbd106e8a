// Object listing: RadosIoCtx.list() and the RadosListing class.
#include "listing.h"

#include <cerrno>
#include <string>
#include <vector>

#include "args.h"
#include "ioctx.h"
#include "task.h"

namespace arch_rados {

ListingState::ListingState(std::shared_ptr<IoCtxState> io_, rados_list_ctx_t ctx) : io(std::move(io_)), ctx_(ctx) {}

ListingState::~ListingState() {
  // JS thread; no batch is running (it would hold a reference).
  if (open_ && !io->destroyed() && !io->cluster->abandoned()) rados_nobjects_list_close(ctx_);
}

void ListingState::CloseContext() {
  if (!open_) return;
  open_ = false;
  rados_nobjects_list_close(ctx_);  // local only, no network
}

void ListingState::Close() {
  if (busy_) {
    // The batch in flight closes the context when it finishes.
    closeRequested_ = true;
    return;
  }
  CloseContext();
  Pump(io->cluster->Env());
}

Napi::Promise ListingState::Next(Napi::Env env, uint32_t max) {
  auto deferred = Napi::Promise::Deferred::New(env);
  queue_.emplace_back(deferred, max);
  Pump(env);
  return deferred.Promise();
}

void ListingState::Pump(Napi::Env env) {
  if (busy_) return;
  const Target what = Target::Op("list");
  while (!queue_.empty()) {
    Napi::Promise::Deferred deferred = queue_.front().first;
    uint32_t max = queue_.front().second;
    if (!open_ || closeRequested_) {
      queue_.pop_front();
      Reject(deferred, kEBadF, what, "the listing is closed");
      continue;
    }
    if (int err = io->Unavailable()) {
      queue_.pop_front();
      Reject(deferred, err, what, io->Detail());
      continue;
    }
    if (ended_ || max == 0) {
      queue_.pop_front();
      deferred.Resolve(Napi::Array::New(env));
      continue;
    }
    break;
  }
  if (queue_.empty()) return;

  Napi::Promise::Deferred deferred = queue_.front().first;
  uint32_t max = queue_.front().second;
  queue_.pop_front();
  busy_ = true;
  auto self = shared_from_this();
  auto names = std::make_shared<std::vector<std::string>>();
  auto ended = std::make_shared<bool>(false);
  io->Begin(true);
  Task::Run(
      env, "archipelago:rados:list",
      [self, names, ended, max]() {
        while (names->size() < max) {
          const char* entry = nullptr;
          size_t entrySize = 0;
          int rc = rados_nobjects_list_next2(self->ctx_, &entry, nullptr, nullptr, &entrySize, nullptr, nullptr);
          if (rc == -ENOENT) {
            *ended = true;
            break;
          }
          if (rc < 0) return rc;
          names->emplace_back(entry, entrySize);
        }
        return 0;
      },
      [self, names, ended, deferred, what](Napi::Env env, int rc) {
        self->busy_ = false;
        if (*ended) self->ended_ = true;
        if (rc < 0) {
          Reject(deferred, -rc, what);
        } else {
          Napi::Array out = Napi::Array::New(env, names->size());
          for (size_t i = 0; i < names->size(); ++i) {
            out.Set(static_cast<uint32_t>(i), Napi::String::New(env, (*names)[i]));
          }
          deferred.Resolve(out);
        }
        if (self->closeRequested_) {
          self->closeRequested_ = false;
          self->CloseContext();
        }
        self->Pump(env);
        self->io->End(true);
      });
}

Napi::Value IoCtx::List(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Target what = Target::Op("list");
  if (int err = state_->Unavailable()) ThrowError(env, err, what, state_->Detail());
  rados_list_ctx_t ctx = nullptr;
  int rc = rados_nobjects_list_open(state_->io(), &ctx);  // local only, no network
  if (rc < 0) ThrowError(env, -rc, what);
  auto listing = std::make_shared<ListingState>(state_, ctx);
  state_->listings.push_back(listing);
  return Listing::NewInstance(env, listing);
}

// ---- the RadosListing class ----

Napi::Object Listing::NewInstance(Napi::Env env, std::shared_ptr<ListingState> state) {
  return ConstructSlot<ListingState>::New(Data(env).listing, std::move(state));
}

Listing::Listing(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<Listing>(info), state_(ConstructSlot<ListingState>::Take(info, "RadosListing")) {}

Napi::Function Listing::DefineClass(Napi::Env env) {
  return ObjectWrap<Listing>::DefineClass(env, "RadosListing",
                                          {
                                              InstanceMethod<&Listing::Next>("next"),
                                              InstanceMethod<&Listing::Close>("close"),
                                          });
}

Napi::Value Listing::Next(const Napi::CallbackInfo& info) {
  uint32_t max = static_cast<uint32_t>(ArgUint(info, 0, "max", 1u << 20));
  return state_->Next(info.Env(), max);
}

Napi::Value Listing::Close(const Napi::CallbackInfo& info) {
  state_->Close();
  return info.Env().Undefined();
}

void InitListing(Napi::Env env, AddonData& data) { data.listing = Napi::Persistent(Listing::DefineClass(env)); }

}  // namespace arch_rados
