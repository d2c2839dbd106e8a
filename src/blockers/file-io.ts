/**
 * Promise wrappers over the raw-fd callback fs API (file.ts explains why raw
 * fds), plus whole-buffer writes, zero fill and directory fsync.
 */
import fs from 'node:fs';

/** Bytes per write when zero-filling. */
const ZERO_PIECE = 1024 * 1024;
let zeros: Buffer | undefined;

export function fdOpen(file: string, flags: number, mode = 0o644): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))));
}
export function fdRead(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
export function fdWrite(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
export function fdSync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}
export function fdTruncate(fd: number, len: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, len, (err) => (err ? reject(err) : resolve())));
}
export function fdSize(fd: number): Promise<number> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st.size))));
}
export function fdClose(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** pwrite until all of `data` is written (short writes happen near ENOSPC). */
export async function writeAll(fd: number, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const n = await fdWrite(fd, data, done, data.length - done, position + done);
    if (n <= 0) throw Object.assign(new Error('pwrite wrote nothing'), { code: 'EIO' });
    done += n;
  }
}

/** Writes zeros over [start, end) in ZERO_PIECE pieces from one shared buffer. */
export async function zeroRange(fd: number, start: number, end: number): Promise<void> {
  zeros ??= Buffer.alloc(ZERO_PIECE);
  for (let pos = start; pos < end; pos += ZERO_PIECE) {
    await writeAll(fd, zeros.subarray(0, Math.min(ZERO_PIECE, end - pos)), pos);
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const fd = await fdOpen(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fdSync(fd);
  } finally {
    await fdClose(fd);
  }
}

