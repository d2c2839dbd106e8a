/**
 * How many object files the file blocker keeps open: its fd cache is sized
 * from the process's open-file limit, so that a large store is served
 * without reopening files on every request, and sockets, map files and
 * librados always have descriptors left.
 *
 * Why it matters: an object whose fd was evicted costs an open(2) (and a
 * close) on its next request, each a thread-pool hop. 64 volumes of 1 GiB
 * with 4 MiB objects are 16,384 objects; with the old fixed 1024 a random
 * load over them reopened a file for most requests.
 */
import fs from 'node:fs';

/** Never fewer than this (a tiny limit still gets a working cache). */
const MIN_CACHED = 64;
/** Never more: beyond this the kernel's per-fd memory matters more than the reopen cost. */
const MAX_CACHED = 16_384;

/**
 * Half the soft RLIMIT_NOFILE (Node raises the soft limit to the hard one at
 * start), between 64 and 16,384; 1024 when the limit cannot be read.
 * `limitsText` is /proc/self/limits (a parameter for tests).
 */
export function defaultMaxOpenFiles(limitsText?: string): number {
  let text = limitsText;
  if (text === undefined) {
    try {
      text = fs.readFileSync('/proc/self/limits', 'utf8');
    } catch {
      return 1024;
    }
  }
  const m = /^Max open files\s+(\d+|unlimited)/m.exec(text);
  if (!m) return 1024;
  const soft = m[1] === 'unlimited' ? Infinity : Number(m[1]);
  return Math.max(MIN_CACHED, Math.min(MAX_CACHED, Math.floor(soft / 2)));
}
