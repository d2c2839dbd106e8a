// Data operations of RadosIoCtx, all asynchronous (librados aio):
// read, write, writeFull, readFull, zero, remove, stat, exec.
#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>

#include "aio.h"
#include "args.h"
#include "ioctx.h"

namespace arch_rados {

namespace {

// Resolves with undefined. Keeps the data Buffer referenced until librados
// is done with it, and owns an optional write op.
class VoidOp final : public AioOp {
 public:
  using AioOp::AioOp;
  ~VoidOp() override {
    if (writeOp != nullptr) rados_release_write_op(writeOp);
  }

  void Complete(Napi::Env env, int rc) override {
    if (rc < 0) {
      Fail(rc);
    } else {
      deferred.Resolve(env.Undefined());
    }
  }

  Napi::Reference<Napi::Buffer<uint8_t>> data;
  rados_write_op_t writeOp = nullptr;
};

// Reads straight into the caller's Buffer, referenced until completion.
class ReadOp final : public AioOp {
 public:
  using AioOp::AioOp;

  void Complete(Napi::Env env, int rc) override {
    if (rc < 0) {
      Fail(rc);
    } else {
      deferred.Resolve(Napi::Number::New(env, rc));
    }
  }

  Napi::Reference<Napi::Buffer<uint8_t>> target;
};

class StatOp final : public AioOp {
 public:
  using AioOp::AioOp;

  void Complete(Napi::Env env, int rc) override {
    if (rc < 0) {
      Fail(rc);
      return;
    }
    Napi::Object stat = Napi::Object::New(env);
    stat.Set("size", Napi::Number::New(env, static_cast<double>(size)));
    stat.Set("mtimeMs", Napi::Number::New(env, static_cast<double>(mtime) * 1000.0));
    deferred.Resolve(stat);
  }

  uint64_t size = 0;
  time_t mtime = 0;
};

// Guess for readFull's first round; larger objects take a second round.
constexpr size_t kReadFullGuess = 64 * 1024;

Napi::Promise StartReadFull(Napi::Env env, const Napi::Promise::Deferred* existing,
                            const std::shared_ptr<IoCtxState>& io, const Target& target, size_t capacity);

// One atomic read op: stat + read of [0, capacity). If the object turns out
// larger than capacity, it goes again with the object's size, into a JS
// Buffer of exactly that size (no copy).
class ReadFullOp final : public AioOp {
 public:
  using AioOp::AioOp;
  ~ReadFullOp() override {
    if (readOp != nullptr) rados_release_read_op(readOp);
  }

  void Complete(Napi::Env env, int rc) override {
    if (rc >= 0 && statRval < 0) rc = statRval;
    if (rc >= 0 && readRval < 0) rc = readRval;
    if (rc < 0) {
      Fail(rc);
      return;
    }
    if (size > capacity) {
      if (size > static_cast<uint64_t>(INT_MAX)) {
        Reject(deferred, EFBIG, target, "the object is too large to read at once");
        return;
      }
      StartReadFull(env, &deferred, io, target, static_cast<size_t>(size));
      return;
    }
    if (!into.IsEmpty() && bytesRead == capacity) {
      deferred.Resolve(into.Value());
    } else {
      deferred.Resolve(Napi::Buffer<char>::Copy(env, data, bytesRead));
    }
  }

  rados_read_op_t readOp = nullptr;
  uint64_t size = 0;
  time_t mtime = 0;
  int statRval = 0;
  size_t bytesRead = 0;
  int readRval = 0;
  size_t capacity = 0;
  char* data = nullptr;
  std::unique_ptr<char[]> scratch;
  Napi::Reference<Napi::Buffer<uint8_t>> into;
};

Napi::Promise StartReadFull(Napi::Env env, const Napi::Promise::Deferred* existing,
                            const std::shared_ptr<IoCtxState>& io, const Target& target, size_t capacity) {
  std::unique_ptr<ReadFullOp> op = existing != nullptr ? std::make_unique<ReadFullOp>(*existing, io, target)
                                                       : std::make_unique<ReadFullOp>(env, io, target);
  op->capacity = capacity;
  if (existing == nullptr) {
    op->scratch.reset(new char[capacity]);
    op->data = op->scratch.get();
  } else {
    Napi::Buffer<uint8_t> buffer = Napi::Buffer<uint8_t>::New(env, capacity);
    op->into = Napi::Persistent(buffer);
    op->data = reinterpret_cast<char*>(buffer.Data());
  }
  op->readOp = rados_create_read_op();
  if (op->readOp == nullptr) {
    op->Fail(-ENOMEM);
    return op->deferred.Promise();
  }
  rados_read_op_stat(op->readOp, &op->size, &op->mtime, &op->statRval);
  rados_read_op_read(op->readOp, 0, capacity, op->data, &op->bytesRead, &op->readRval);
  rados_read_op_t readOp = op->readOp;
  const std::string& oid = target.oid;
  return SubmitAio(std::move(op), [&](rados_ioctx_t ioctx, rados_completion_t completion) {
    return rados_aio_read_op_operate(readOp, ioctx, completion, oid.c_str(), LIBRADOS_OPERATION_NOFLAG);
  });
}

class ExecOp final : public AioOp {
 public:
  using AioOp::AioOp;
  ~ExecOp() override {
    if (readOp != nullptr) rados_release_read_op(readOp);
    if (out != nullptr) rados_buffer_free(out);
  }

  void Complete(Napi::Env env, int rc) override {
    if (rc >= 0 && rval < 0) rc = rval;
    if (rc < 0) {
      Fail(rc);
      return;
    }
    deferred.Resolve(Napi::Buffer<char>::Copy(env, out != nullptr ? out : "", out != nullptr ? outLength : 0));
  }

  Napi::Reference<Napi::Buffer<uint8_t>> input;
  rados_read_op_t readOp = nullptr;
  char* out = nullptr;
  size_t outLength = 0;
  int rval = 0;
};

}  // namespace

Napi::Value IoCtx::Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  uint64_t offset = ArgUint(info, 1, "offset");
  uint64_t length = ArgUint(info, 2, "length", INT_MAX);
  Napi::Buffer<uint8_t> target = ArgBuffer(info, 3, "target");
  if (length > target.Length()) throw Napi::RangeError::New(env, "read length is larger than the target Buffer");
  Target what = Target::Obj("read", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  if (length == 0) {
    auto deferred = Napi::Promise::Deferred::New(env);
    deferred.Resolve(Napi::Number::New(env, 0));
    return deferred.Promise();
  }
  auto op = std::make_unique<ReadOp>(env, state_, std::move(what));
  op->target = Napi::Persistent(target);
  char* into = reinterpret_cast<char*>(target.Data());
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_read(io, oid.c_str(), completion, into, length, offset);
  });
}

Napi::Value IoCtx::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  uint64_t offset = ArgUint(info, 1, "offset");
  Napi::Buffer<uint8_t> data = ArgBuffer(info, 2, "data");
  Target what = Target::Obj("write", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  auto op = std::make_unique<VoidOp>(env, state_, std::move(what));
  op->data = Napi::Persistent(data);
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_write(io, oid.c_str(), completion, reinterpret_cast<const char*>(data.Data()), data.Length(),
                           offset);
  });
}

Napi::Value IoCtx::WriteFull(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  Napi::Buffer<uint8_t> data = ArgBuffer(info, 1, "data");
  Target what = Target::Obj("writeFull", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  auto op = std::make_unique<VoidOp>(env, state_, std::move(what));
  op->data = Napi::Persistent(data);
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_write_full(io, oid.c_str(), completion, reinterpret_cast<const char*>(data.Data()),
                                data.Length());
  });
}

Napi::Value IoCtx::ReadFull(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  Target what = Target::Obj("readFull", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  return StartReadFull(env, nullptr, state_, what, kReadFullGuess);
}

Napi::Value IoCtx::Zero(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  uint64_t offset = ArgUint(info, 1, "offset");
  uint64_t length = ArgUint(info, 2, "length");
  Target what = Target::Obj("zero", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  auto op = std::make_unique<VoidOp>(env, state_, std::move(what));
  op->writeOp = rados_create_write_op();
  if (op->writeOp == nullptr) {
    op->Fail(-ENOMEM);
    return op->deferred.Promise();
  }
  // The OSD turns a zero that reaches the object's end into a truncate to
  // `offset`, so a plain zero op can shrink the object. Writing the range's
  // last byte first (a zero byte) makes the object reach offset+length, and
  // zeroing the rest then never touches the end: one atomic op, and the
  // object is never shrunk (a range past the end extends it, with zeros).
  rados_write_op_assert_exists(op->writeOp);
  if (length > 0) {
    static const char kZeroByte = 0;
    rados_write_op_write(op->writeOp, &kZeroByte, 1, offset + length - 1);
    if (length > 1) rados_write_op_zero(op->writeOp, offset, length - 1);
  }
  rados_write_op_t writeOp = op->writeOp;
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_write_op_operate(writeOp, io, completion, oid.c_str(), nullptr, LIBRADOS_OPERATION_NOFLAG);
  });
}

Napi::Value IoCtx::Remove(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  Target what = Target::Obj("remove", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  auto op = std::make_unique<VoidOp>(env, state_, std::move(what));
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_remove(io, oid.c_str(), completion);
  });
}

Napi::Value IoCtx::Stat(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  Target what = Target::Obj("stat", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  auto op = std::make_unique<StatOp>(env, state_, std::move(what));
  uint64_t* size = &op->size;
  time_t* mtime = &op->mtime;
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_stat(io, oid.c_str(), completion, size, mtime);
  });
}

Napi::Value IoCtx::Exec(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string oid = ArgString(info, 0, "oid");
  std::string cls = ArgString(info, 1, "cls");
  std::string method = ArgString(info, 2, "method");
  Napi::Buffer<uint8_t> input = ArgBuffer(info, 3, "input");
  Target what = Target::Obj("exec", oid);
  Napi::Value rejected = Precheck(env, *state_, what, &oid);
  if (!rejected.IsEmpty()) return rejected;
  if (!ValidName(cls) || !ValidName(method)) {
    return Rejected(env, kEInval, what, "class and method names must be non-empty and must not contain NUL");
  }
  auto op = std::make_unique<ExecOp>(env, state_, std::move(what));
  op->input = Napi::Persistent(input);
  op->readOp = rados_create_read_op();
  if (op->readOp == nullptr) {
    op->Fail(-ENOMEM);
    return op->deferred.Promise();
  }
  // Output of any size: librados allocates it (freed with rados_buffer_free).
  rados_read_op_exec(op->readOp, cls.c_str(), method.c_str(), reinterpret_cast<const char*>(input.Data()),
                     input.Length(), &op->out, &op->outLength, &op->rval);
  rados_read_op_t readOp = op->readOp;
  return SubmitAio(std::move(op), [&](rados_ioctx_t io, rados_completion_t completion) {
    return rados_aio_read_op_operate(readOp, io, completion, oid.c_str(), LIBRADOS_OPERATION_NOFLAG);
  });
}

}  // namespace arch_rados
