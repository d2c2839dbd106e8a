/**
 * The file store's optional native addon (native/fileio, built by
 * scripts/build-fileio.sh) and its loader. Two fast paths, measured in
 * docs/benchmarks.md:
 *
 * - readNowait: preadv2 with RWF_NOWAIT on the event-loop thread. A profile
 *   of 4 KiB random reads spent about 40 % of the main thread submitting
 *   fs.read to the libuv thread pool (queue, wake a worker, wake the loop for
 *   the completion) for a copy that takes a microsecond when the page is
 *   cached. RWF_NOWAIT copies only what is cached and never waits for the
 *   disk, so the loop is never blocked by I/O; what is not cached (EAGAIN,
 *   or the rest of a short read) still goes through the pool.
 * - writeBatch: the writes that start in one event-loop turn, as ONE job on
 *   the thread pool (io-batch.ts). A profile of 4 KiB random writes spent
 *   about 60 % of the main thread submitting fs.write jobs. Buffered writes
 *   cannot use RWF_NOWAIT on ext4 (EOPNOTSUPP), and a plain pwrite on the
 *   loop could stall it on dirty-page throttling, so writes stay on the pool.
 *
 * Optional: without the addon (not built) or without kernel support the
 * file blocker reads and writes through fs as before.
 * ARCHIPELAGO_FILE_ADDON=0 turns it off (comparisons, bisecting).
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface FileAddon {
  /** Bytes read (possibly short: the rest is not cached or the file ends), or a negative errno (-11 EAGAIN: nothing cached). */
  readNowait(fd: number, buffer: Buffer, offset: number, length: number, position: number): number;
  /** pwrite of each whole buffer at its position, in order, in one pool job; per write 0 or a negative errno. */
  writeBatch(fds: number[], buffers: Buffer[], positions: number[]): Promise<number[]>;
}

const ADDON_FILE = 'native/fileio/build/Release/archipelago_fileio.node';

/** Errnos of readNowait that mean "not supported here": stop trying for the whole process. */
const UNSUPPORTED = new Set([-95 /* EOPNOTSUPP */, -38 /* ENOSYS */, -22 /* EINVAL */]);

let addon: FileAddon | null | undefined;
let nowaitOff = false;

/** The addon, or null when it is not built or turned off. */
export function loadFileAddon(): FileAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  if (process.env.ARCHIPELAGO_FILE_ADDON === '0') return null;
  const root = packageRoot();
  if (root === null || !existsSync(join(root, ADDON_FILE))) return null;
  try {
    const a = createRequire(import.meta.url)(join(root, ADDON_FILE)) as Partial<FileAddon>;
    if (typeof a.readNowait === 'function' && typeof a.writeBatch === 'function') addon = a as FileAddon;
  } catch {
    addon = null; // a stale or foreign build: use fs
  }
  return addon;
}

/** readNowait, unless the addon is missing or the kernel refused RWF_NOWAIT. */
export function readNowaitOf(a: FileAddon | null): FileAddon['readNowait'] | null {
  return a !== null && !nowaitOff ? a.readNowait : null;
}

/** Tells that readNowait failed with `errno` (negative); true when RWF_NOWAIT is now off for the process. */
export function noteNowaitFailure(errno: number): boolean {
  if (!UNSUPPORTED.has(errno)) return false;
  nowaitOff = true;
  return true;
}

function packageRoot(): string | null {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'native'))) return dir;
    const up = dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}
