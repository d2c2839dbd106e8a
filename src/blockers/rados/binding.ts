/**
 * The librados binding: typed view of our native addon (native/rados/) and
 * its loader.
 *
 * The addon is a thin layer over librados' C API (ceph/ceph
 * src/include/rados/librados.h). Every call that can wait on the network runs
 * off the JS thread (aio completions or a worker) and resolves a Promise;
 * nothing here blocks the event loop. Failures reject with a `RadosError`
 * carrying the positive errno librados returned (2 = ENOENT, 16 = EBUSY,
 * 108 = ESHUTDOWN after this client was blocklisted, 110 = ETIMEDOUT …);
 * its message names the op, the object and the errno, e.g.
 * `read "d.1.2.3": No such file or directory (errno 2)`.
 *
 * The addon itself rejects with: 22 EINVAL for a name that is empty or
 * contains NUL (librados is not called); 9 EBADF for an operation on a pool,
 * watch or listing that was closed; 108 ESHUTDOWN for one on a client (or
 * its pools) after `shutdown()`. Wrong argument types throw a TypeError (a
 * bad number a RangeError) synchronously.
 *
 * Lifetime: an operation keeps what it uses alive (its pool, client and the
 * Buffers passed in) until it settles, even if JS drops every reference.
 * While operations are in flight the process stays alive; when none are (and
 * after `shutdown()`) nothing of the binding keeps it alive. Open watches do
 * not keep it alive either.
 *
 * The addon is optional: it is built by scripts/build-rados.sh where
 * librados-dev is installed. `loadRados()` throws a `RadosUnavailableError`
 * naming what to do when it is missing, so file-store users never need it.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** What `connect` needs; everything optional falls back to librados' defaults. */
export interface RadosConnectOptions {
  /** ceph.conf path; absent: librados' search path (CEPH_CONF, /etc/ceph/ceph.conf). */
  conf?: string;
  /** cephx user without the "client." prefix (default "admin"). */
  id?: string;
  /** Extra librados settings applied after the conf file, e.g. { rados_osd_op_timeout: '30' }. */
  config?: Record<string, string>;
}

export interface RadosStat {
  size: number;
  /** Whole seconds (the librados C API has no finer mtime), in ms. */
  mtimeMs: number;
}

export interface RadosLocker {
  /** "client.<instance id>" of the holder. */
  client: string;
  cookie: string;
  /**
   * The holder's address as the OSD recorded it, e.g. "v1:127.0.0.1:0/3291060149":
   * the holder's `addrs()` with a "v1:" prefix. `blocklistAdd` takes either form.
   */
  addr: string;
}

export interface RadosLockInfo {
  exclusive: boolean;
  tag: string;
  lockers: RadosLocker[];
}

export interface RadosNotifyAck {
  /** The watcher's client instance id (`instanceId()` of the acker). */
  notifierId: number;
  cookie: bigint;
  payload: Buffer;
}

export interface RadosNotifyResult {
  acks: RadosNotifyAck[];
  /**
   * Watchers that did not ack before the timeout. A notify that timed out
   * (librados' ETIMEDOUT) still resolves, with these listed.
   */
  timeouts: { notifierId: number; cookie: bigint }[];
}

/**
 * Event a watch delivers on the JS thread. A listener that throws surfaces as
 * an uncaught exception (like an EventEmitter listener).
 */
export type RadosWatchEvent =
  | { type: 'notify'; notifyId: bigint; notifierId: number; payload: Buffer }
  /** The watch broke (e.g. 107 ENOTCONN after a blocklist); rewatch or give up. */
  | { type: 'error'; errno: number };

export interface RadosWatch {
  /** The cookie librados gave this watch (what acks carry). */
  readonly cookie: bigint;
  /**
   * Replies to a notify; `payload` reaches the notifier in its acks. librados
   * only queues the ack (it does not wait for it). Rejects 9 after close().
   */
  ack(notifyId: bigint, payload?: Buffer): Promise<void>;
  /** Milliseconds since the watch was last confirmed; throws a RadosError with the errno when broken (9 after close()). */
  check(): number;
  /**
   * Stops the watch (rados_unwatch2) and waits until no more callbacks can
   * arrive (rados_watch_flush). Idempotent; resolves even when the unwatch
   * itself failed (e.g. after a blocklist): the watch is gone locally either way.
   * Closing the pool or shutting down the client closes its watches too.
   */
  close(): Promise<void>;
}

export interface RadosListing {
  /**
   * Up to `max` more object names (default namespace); [] at the end.
   * Concurrent calls are queued and served in order. Rejects 9 after close().
   */
  next(max: number): Promise<string[]>;
  /** Releases the listing (also done when its pool closes). Idempotent. */
  close(): void;
}

/** One pool, opened. Object names are strings without NUL (the addon rejects NUL: EINVAL). */
export interface RadosIoCtx {
  readonly pool: string;
  /**
   * Reads straight into target[0..length) (no copy; `target` is referenced
   * until the read settles, so do not reuse it meanwhile); resolves with the
   * bytes that exist there: short at the object's end, 0 past it. length must
   * be <= target.length and < 2 GiB; length 0 resolves 0 without a round trip.
   */
  read(oid: string, offset: number, length: number, target: Buffer): Promise<number>;
  write(oid: string, offset: number, data: Buffer): Promise<void>;
  /** Atomically replaces the whole object (librados write_full). */
  writeFull(oid: string, data: Buffer): Promise<void>;
  /**
   * The whole object, read atomically (stat and read in one operation): one
   * round trip up to 64 KiB, two for larger objects (the second reads
   * straight into a Buffer of the object's size).
   */
  readFull(oid: string): Promise<Buffer>;
  /**
   * Zeros [offset, offset+length) of an existing object, atomically (rejects 2
   * when absent, creating nothing). Never shrinks the object, although a
   * plain RADOS zero reaching the object's end truncates it; a range past the
   * end extends the object (with zeros) to offset+length.
   */
  zero(oid: string, offset: number, length: number): Promise<void>;
  remove(oid: string): Promise<void>;
  stat(oid: string): Promise<RadosStat>;
  list(): RadosListing;
  /** cls_lock exclusive lock; durationSec 0 = until unlocked or broken. 16 EBUSY when held by another. */
  lockExclusive(oid: string, lock: string, cookie: string, description: string, durationSec: number): Promise<void>;
  unlock(oid: string, lock: string, cookie: string): Promise<void>;
  listLockers(oid: string, lock: string): Promise<RadosLockInfo>;
  breakLock(oid: string, lock: string, client: string, cookie: string): Promise<void>;
  /**
   * Calls an object class method, e.g. ('lock', 'assert_locked', input);
   * resolves with its output (any size). Runs as a read op, like rados_exec.
   */
  exec(oid: string, cls: string, method: string, input: Buffer): Promise<Buffer>;
  /** rados_watch2; events arrive on `onEvent` until the watch is closed. */
  watch(oid: string, onEvent: (event: RadosWatchEvent) => void): Promise<RadosWatch>;
  /**
   * Notifies the object's watchers; waits up to timeoutMs for their acks.
   * librados counts whole seconds: timeoutMs is rounded up to them (0: the
   * OSD's default, 30 s).
   */
  notify(oid: string, payload: Buffer, timeoutMs: number): Promise<RadosNotifyResult>;
  /**
   * Refuses new operations (9), waits for the ones in flight, closes this
   * pool's watches and listings, flushes and releases the context. Idempotent.
   */
  close(): Promise<void>;
}

export interface RadosCluster {
  /** This client's global instance id (its lock holder name is "client.<id>"). */
  instanceId(): number;
  /** This client's address(es), as librados formats them (what blocklisting takes). */
  addrs(): string;
  openPool(pool: string): Promise<RadosIoCtx>;
  /**
   * Sends a JSON mon command (an object, JSON.stringify'd; a string is sent
   * as is); rejects with the errno and the mon's status text on failure.
   */
  monCommand(command: object, input?: Buffer): Promise<{ output: Buffer; status: string }>;
  /** Blocklists a client address for `seconds` (0: the cluster default). */
  blocklistAdd(addr: string, seconds: number): Promise<void>;
  /**
   * Gets the newest osdmap from the mon (rados_wait_for_latest_osdmap).
   * Requests that only time out never bring one, and an OSD that booted
   * again after being marked down drops requests of older epochs.
   */
  waitForLatestOsdmap(): Promise<void>;
  /**
   * Refuses new operations (108), waits for those in flight (a notify waits
   * up to its timeout; a lock call as long as the cluster takes: set
   * rados_osd_op_timeout), closes every pool, then the connection.
   * Idempotent: every call resolves once the client is down.
   */
  shutdown(): Promise<void>;
}

export interface RadosBinding {
  connect(options: RadosConnectOptions): Promise<RadosCluster>;
  /** librados' library version (rados_version), "major.minor.extra": 3.0.0 for Ceph 16, not the Ceph release. */
  version(): string;
}

/** A librados call failed; `errno` is positive (librados returns -errno). */
export class RadosError extends Error {
  override readonly name = 'RadosError';
  constructor(
    readonly errno: number,
    readonly op: string,
    message: string,
  ) {
    super(message);
  }
}

export class RadosUnavailableError extends Error {
  override readonly name = 'RadosUnavailableError';
  readonly code = 'ARCH_E_NO_RADOS';
}

const ADDON_FILE = 'native/rados/build/Release/archipelago_rados.node';

let loaded: RadosBinding | undefined;

/** The binding; throws RadosUnavailableError when the addon was not built. */
export function loadRados(): RadosBinding {
  if (loaded) return loaded;
  const path = join(packageRoot(), ADDON_FILE);
  if (!existsSync(path)) {
    throw new RadosUnavailableError(
      `the RADOS backend is not built: ${path} is missing. ` +
        'Install librados-dev and run scripts/build-rados.sh (it builds the librados binding against the installed Node headers).',
    );
  }
  const require = createRequire(import.meta.url);
  let addon: NativeAddon;
  try {
    addon = require(path) as NativeAddon;
    // Native code rejects with instances of our RadosError class.
    addon.init({ RadosError });
  } catch (err) {
    throw new RadosUnavailableError(`the RADOS backend could not be loaded from ${path}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  loaded = { connect: (options) => addon.connect(options), version: () => addon.version() };
  return loaded;
}

/** What the addon exports: the binding plus the one-time init the loader calls. */
interface NativeAddon extends RadosBinding {
  init(classes: { RadosError: typeof RadosError }): void;
}

/** The directory holding our package.json (source and build trees differ in depth). */
function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'native'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw new RadosUnavailableError('cannot find the archipelago package root for the RADOS addon');
    dir = up;
  }
}
