/**
 * Promise wrappers over the raw-fd callback fs API (file.ts explains why raw
 * fds), plus whole-buffer reads and writes (the hot path), zero fill and
 * directory fsync.
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
export function fdSync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}
/**
 * fdatasync: the data and what is needed to read it back (size, block
 * allocation), not timestamps — so overwriting allocated blocks needs no
 * journal commit (ext4). What qemu-nbd and nbdkit call on FLUSH.
 */
export function fdDataSync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
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

/**
 * pwrite until all of `data` is written (short writes happen near ENOSPC).
 * One promise per call, the loop runs in the callbacks: this is the hot path.
 */
export function writeAll(fd: number, data: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (err: NodeJS.ErrnoException | null, n: number) => {
      if (err) return reject(err);
      if (n <= 0) return reject(Object.assign(new Error('pwrite wrote nothing'), { code: 'EIO' }));
      done += n;
      if (done < data.length) fs.write(fd, data, done, data.length - done, position + done, step);
      else resolve();
    };
    if (data.length === 0) resolve();
    else fs.write(fd, data, 0, data.length, position, step);
  });
}

/**
 * pread until `length` bytes are in `target` or the file ends; resolves with
 * the bytes read. One promise per call, like writeAll.
 */
export function readAll(fd: number, target: Buffer, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (err: NodeJS.ErrnoException | null, n: number) => {
      if (err) return reject(err);
      done += n;
      if (n > 0 && done < length) fs.read(fd, target, done, length - done, position + done, step);
      else resolve(done);
    };
    if (length === 0) resolve(0);
    else fs.read(fd, target, 0, length, position, step);
  });
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

