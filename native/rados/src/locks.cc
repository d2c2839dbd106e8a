// cls_lock advisory locks of RadosIoCtx: lockExclusive, unlock, listLockers,
// breakLock. librados' C API has no aio form for most of these, so they run
// on the thread pool (Task) and never block the event loop.
#include <sys/time.h>

#include <cerrno>
#include <cmath>
#include <vector>

#include "args.h"
#include "ioctx.h"

namespace arch_rados {

namespace {

const char* const kBadLockArgs = "lock names must be non-empty; names and cookies must not contain NUL";

// `count` NUL-terminated strings packed in buf[0..length).
std::vector<std::string> SplitNul(const std::vector<char>& buf, size_t length, size_t count) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (out.size() < count && pos < length) {
    size_t end = pos;
    while (end < length && buf[end] != '\0') ++end;
    out.emplace_back(buf.data() + pos, end - pos);
    pos = end + 1;
  }
  while (out.size() < count) out.emplace_back();
  return out;
}

}  // namespace

Napi::Value IoCtx::LockExclusive(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  std::string lock = ArgString(info, 1, "lock");
  std::string cookie = ArgString(info, 2, "cookie");
  std::string description = ArgString(info, 3, "description");
  double seconds = ArgSeconds(info, 4, "durationSec");
  Target what = Target::Obj("lockExclusive", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  if (!ValidName(lock) || !ValidCString(cookie) || !ValidCString(description)) {
    return Rejected(env, kEInval, what, kBadLockArgs);
  }
  return RunIoTask(
      env, state_, what,
      [oid, lock, cookie, description, seconds](rados_ioctx_t io) {
        struct timeval duration = {};
        struct timeval* durationPtr = nullptr;  // 0: until unlocked or broken
        if (seconds > 0) {
          double whole = std::floor(seconds);
          duration.tv_sec = static_cast<time_t>(whole);
          duration.tv_usec = static_cast<suseconds_t>((seconds - whole) * 1e6);
          durationPtr = &duration;
        }
        return rados_lock_exclusive(io, oid.c_str(), lock.c_str(), cookie.c_str(), description.c_str(), durationPtr,
                                    0);
      },
      [](Napi::Env env, int) { return env.Undefined(); });
}

Napi::Value IoCtx::Unlock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  std::string lock = ArgString(info, 1, "lock");
  std::string cookie = ArgString(info, 2, "cookie");
  Target what = Target::Obj("unlock", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  if (!ValidName(lock) || !ValidCString(cookie)) return Rejected(env, kEInval, what, kBadLockArgs);
  return RunIoTask(
      env, state_, what,
      [oid, lock, cookie](rados_ioctx_t io) { return rados_unlock(io, oid.c_str(), lock.c_str(), cookie.c_str()); },
      [](Napi::Env env, int) { return env.Undefined(); });
}

Napi::Value IoCtx::ListLockers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  std::string lock = ArgString(info, 1, "lock");
  Target what = Target::Obj("listLockers", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  if (!ValidName(lock)) return Rejected(env, kEInval, what, kBadLockArgs);

  struct Result {
    int exclusive = 0;
    std::string tag;
    std::vector<std::string> clients;
    std::vector<std::string> cookies;
    std::vector<std::string> addrs;
  };
  auto result = std::make_shared<Result>();
  return RunIoTask(
      env, state_, what,
      [oid, lock, result](rados_ioctx_t io) {
        size_t tagLength = 256;
        size_t clientsLength = 1024;
        size_t cookiesLength = 1024;
        size_t addrsLength = 1024;
        for (int attempt = 0; attempt < 8; ++attempt) {
          // librados writes the sizes it needs on -ERANGE; retry with them.
          std::vector<char> tag(tagLength + 1), clients(clientsLength + 1), cookies(cookiesLength + 1),
              addrs(addrsLength + 1);
          ssize_t count = rados_list_lockers(io, oid.c_str(), lock.c_str(), &result->exclusive, tag.data(),
                                             &tagLength, clients.data(), &clientsLength, cookies.data(),
                                             &cookiesLength, addrs.data(), &addrsLength);
          if (count == -ERANGE) continue;
          if (count < 0) return static_cast<int>(count);
          size_t n = static_cast<size_t>(count);
          result->tag = SplitNul(tag, tagLength, 1)[0];
          result->clients = SplitNul(clients, clientsLength, n);
          result->cookies = SplitNul(cookies, cookiesLength, n);
          result->addrs = SplitNul(addrs, addrsLength, n);
          return 0;
        }
        return -ERANGE;
      },
      [result](Napi::Env env, int) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("exclusive", Napi::Boolean::New(env, result->exclusive != 0));
        out.Set("tag", Napi::String::New(env, result->tag));
        Napi::Array lockers = Napi::Array::New(env, result->clients.size());
        for (size_t i = 0; i < result->clients.size(); ++i) {
          Napi::Object locker = Napi::Object::New(env);
          locker.Set("client", Napi::String::New(env, result->clients[i]));
          locker.Set("cookie", Napi::String::New(env, result->cookies[i]));
          locker.Set("addr", Napi::String::New(env, result->addrs[i]));
          lockers.Set(static_cast<uint32_t>(i), locker);
        }
        out.Set("lockers", lockers);
        return out;
      });
}

Napi::Value IoCtx::BreakLock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  std::string lock = ArgString(info, 1, "lock");
  std::string client = ArgString(info, 2, "client");
  std::string cookie = ArgString(info, 3, "cookie");
  Target what = Target::Obj("breakLock", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  if (!ValidName(lock) || !ValidName(client) || !ValidCString(cookie)) {
    return Rejected(env, kEInval, what, kBadLockArgs);
  }
  return RunIoTask(
      env, state_, what,
      [oid, lock, client, cookie](rados_ioctx_t io) {
        return rados_break_lock(io, oid.c_str(), lock.c_str(), client.c_str(), cookie.c_str());
      },
      [](Napi::Env env, int) { return env.Undefined(); });
}

}  // namespace arch_rados
