/*
 * The file store's two fast paths (src/blockers/file-addon.ts,
 * io-batch.ts; why: docs/benchmarks.md).
 *
 * readNowait(fd, buffer, offset, length, position) -> number
 *
 * One preadv2(2) with RWF_NOWAIT, on the calling (JS) thread: it copies what
 * the page cache holds and returns at once, never waiting for the disk. The
 * result is the number of bytes read (possibly short: the rest is not
 * cached, or the file ends), or a negative errno: -EAGAIN when nothing could
 * be read without waiting; -EOPNOTSUPP/-ENOSYS/-EINVAL when the kernel or
 * file system does not support it (the caller then stops trying).
 *
 * Why (docs/benchmarks.md): a read through the libuv thread pool costs a
 * queue hop, a thread wake-up and a completion wake-up of the event loop;
 * for a 4 KiB read served from the page cache that was most of the daemon's
 * CPU per request. Reads that would block still go through the pool.
 *
 * writeBatch(fds, buffers, positions) -> Promise<number[]>
 *
 * Writes every buffer whole at its position in its file (pwrite, repeated
 * on short writes), in order, in ONE job on the libuv thread pool, and
 * resolves with one result per write: 0, or a negative errno. A 4 KiB
 * pwrite into the page cache takes microseconds; queueing each on the pool
 * cost far more (the main thread's wake-ups of the workers), so writes that
 * start in the same event-loop turn go together. The buffers are held
 * (references) until the job completes.
 *
 * Wrong argument types or ranges throw a TypeError/RangeError.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>
#include <node_api.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

static napi_value throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

static napi_value read_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 5) {
    return throw_type(env, "readNowait(fd, buffer, offset, length, position): 5 arguments");
  }
  int32_t fd;
  int64_t offset, length, position;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok) return throw_type(env, "readNowait: fd must be a number");
  bool is_typed = false;
  napi_is_typedarray(env, argv[1], &is_typed);
  if (!is_typed) return throw_type(env, "readNowait: buffer must be a Uint8Array");
  napi_typedarray_type type;
  size_t elements;
  void *data;
  if (napi_get_typedarray_info(env, argv[1], &type, &elements, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    return throw_type(env, "readNowait: buffer must be a Uint8Array");
  }
  if (napi_get_value_int64(env, argv[2], &offset) != napi_ok || napi_get_value_int64(env, argv[3], &length) != napi_ok ||
      napi_get_value_int64(env, argv[4], &position) != napi_ok) {
    return throw_type(env, "readNowait: offset, length and position must be numbers");
  }
  if (fd < 0 || offset < 0 || length < 0 || position < 0 || (uint64_t)offset + (uint64_t)length > elements) {
    napi_throw_range_error(env, NULL, "readNowait: fd, offset, length or position out of range");
    return NULL;
  }
  struct iovec iov = { (char *)data + offset, (size_t)length };
  ssize_t n;
  do {
    n = preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  napi_value result;
  napi_create_int64(env, n < 0 ? -(int64_t)errno : (int64_t)n, &result);
  return result;
}

typedef struct {
  int fd;
  const char *data;
  size_t length;
  int64_t position;
  int64_t result; /* 0 or -errno */
  napi_ref buffer;
} write_op;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  uint32_t count;
  write_op ops[];
} write_batch;

/* Pool thread: every write, in order; nothing here touches JS. */
static void batch_execute(napi_env env, void *arg) {
  (void)env;
  write_batch *b = arg;
  for (uint32_t i = 0; i < b->count; i++) {
    write_op *op = &b->ops[i];
    size_t done = 0;
    op->result = 0;
    while (done < op->length) {
      ssize_t n = pwrite(op->fd, op->data + done, op->length - done, (off_t)(op->position + (int64_t)done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) { op->result = -(int64_t)errno; break; }
      if (n == 0) { op->result = -EIO; break; } /* pwrite wrote nothing */
      done += (size_t)n;
    }
  }
}

/* Main thread: release the buffers, resolve with the results. */
static void batch_complete(napi_env env, napi_status status, void *arg) {
  write_batch *b = arg;
  napi_value results;
  napi_create_array_with_length(env, b->count, &results);
  for (uint32_t i = 0; i < b->count; i++) {
    napi_value r;
    napi_create_int64(env, status == napi_ok ? b->ops[i].result : -ECANCELED, &r);
    napi_set_element(env, results, i, r);
    napi_delete_reference(env, b->ops[i].buffer);
  }
  napi_resolve_deferred(env, b->deferred, results);
  napi_delete_async_work(env, b->work);
  free(b);
}

static napi_value write_batch_fn(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3) {
    return throw_type(env, "writeBatch(fds, buffers, positions): 3 arguments");
  }
  uint32_t count = 0, n2 = 0, n3 = 0;
  bool a1 = false, a2 = false, a3 = false;
  napi_is_array(env, argv[0], &a1);
  napi_is_array(env, argv[1], &a2);
  napi_is_array(env, argv[2], &a3);
  if (!a1 || !a2 || !a3) return throw_type(env, "writeBatch: fds, buffers and positions must be arrays");
  napi_get_array_length(env, argv[0], &count);
  napi_get_array_length(env, argv[1], &n2);
  napi_get_array_length(env, argv[2], &n3);
  if (count == 0 || count != n2 || count != n3) {
    napi_throw_range_error(env, NULL, "writeBatch: the three arrays must have the same, non-zero length");
    return NULL;
  }
  write_batch *b = calloc(1, sizeof(write_batch) + count * sizeof(write_op));
  if (b == NULL) {
    napi_throw_error(env, NULL, "writeBatch: out of memory");
    return NULL;
  }
  uint32_t refs = 0;
  const char *bad = NULL;
  for (uint32_t i = 0; i < count && bad == NULL; i++) {
    napi_value fd, buf, pos;
    napi_get_element(env, argv[0], i, &fd);
    napi_get_element(env, argv[1], i, &buf);
    napi_get_element(env, argv[2], i, &pos);
    write_op *op = &b->ops[i];
    bool is_typed = false;
    napi_is_typedarray(env, buf, &is_typed);
    napi_typedarray_type type;
    size_t elements = 0;
    void *data = NULL;
    if (napi_get_value_int32(env, fd, &op->fd) != napi_ok || op->fd < 0) bad = "writeBatch: fds must be numbers >= 0";
    else if (!is_typed || napi_get_typedarray_info(env, buf, &type, &elements, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) bad = "writeBatch: buffers must be Uint8Arrays";
    else if (napi_get_value_int64(env, pos, &op->position) != napi_ok || op->position < 0) bad = "writeBatch: positions must be numbers >= 0";
    else {
      op->data = data;
      op->length = elements;
      napi_create_reference(env, buf, 1, &op->buffer);
      refs++;
    }
  }
  if (bad != NULL) {
    for (uint32_t i = 0; i < refs; i++) napi_delete_reference(env, b->ops[i].buffer);
    free(b);
    return throw_type(env, bad);
  }
  b->count = count;
  napi_value promise, name;
  napi_create_promise(env, &b->deferred, &promise);
  napi_create_string_utf8(env, "archipelago:writeBatch", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, batch_execute, batch_complete, b, &b->work);
  napi_queue_async_work(env, b->work);
  return promise;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "readNowait", NAPI_AUTO_LENGTH, read_nowait, NULL, &fn);
  napi_set_named_property(env, exports, "readNowait", fn);
  napi_create_function(env, "writeBatch", NAPI_AUTO_LENGTH, write_batch_fn, NULL, &fn);
  napi_set_named_property(env, exports, "writeBatch", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
