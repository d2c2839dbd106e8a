/**
 * Content-addressed images (docs/format.md §4, src/mapper/image-create.ts):
 *
 *   import <file|-> <name>     raw image → read-only image of `sha256-` objects
 *   export <name> <file|->     any volume, snapshot or image → raw (sparse to a file)
 *   hash <snapshot> [image]    snapshot → image (default name <snapshot>.img)
 *
 * Every object is hashed (SHA-256); all-zero objects stay absent and cost
 * nothing, an object whose content is already in the store (from any image)
 * is stored once. They work on the store directly: an image is new, and the
 * sources of export and hash are read only (export of a volume a daemon is
 * writing gives a torn copy: export a snapshot of it instead).
 *
 * Progress goes to stderr when it is a terminal, or with --progress.
 */
import fs from 'node:fs';
import { once } from 'node:events';
import type { Readable } from 'node:stream';
import type { CommandModule } from 'yargs';
import { VolumeMap, DEFAULT_OBJECT_SIZE } from '../../mapper/volume-map.js';
import { ENTRY_ABSENT } from '../../mapper/entry.js';
import { UsageError } from '../../mapper/errors.js';
import { VolumeFlags } from '../../mapper/header-format.js';
import { ImageBuilder, assertComplete, type ImageStats } from '../../mapper/image-create.js';
import { validateVolumeName } from '../../mapper/names.js';
import type { Blocker } from '../../blockers/blocker.js';
import { formatSize, parseSize } from '../sizes.js';
import { printJson, usingStore, withJson, withStore, type JsonArgs, type StoreArgs } from '../common.js';

type Args<T> = T & StoreArgs & JsonArgs & { progress: boolean };

/** Progress on stderr, at most 4 lines a second, overwritten in place. */
class Progress {
  #last = 0;
  #shown = false;
  constructor(private readonly on: boolean, private readonly what: string, private readonly total: number | null) {}

  update(done: number, extra = ''): void {
    if (!this.on) return;
    const now = Date.now();
    if (now - this.#last < 250) return;
    this.#last = now;
    this.#shown = true;
    const of = this.total ? ` of ${formatSize(this.total)} (${Math.floor((100 * done) / this.total)}%)` : '';
    process.stderr.write(`\r${this.what}: ${mib(done)}${of}${extra}   `);
  }

  end(): void {
    if (this.#shown) process.stderr.write('\n');
  }
}

function mib(n: number): string {
  return `${(n / 2 ** 20).toFixed(1)} MiB`;
}

function withProgress<T>(y: import('yargs').Argv<T>): import('yargs').Argv<T & { progress: boolean }> {
  return y.option('progress', {
    type: 'boolean',
    default: Boolean(process.stderr.isTTY),
    describe: 'show progress on stderr (default: when stderr is a terminal)',
  }) as never;
}

/** The image's numbers, as printed and as JSON. */
function summary(name: string, objectSize: number, s: ImageStats): Record<string, unknown> {
  const data = s.bytesRead - s.bytesZero;
  return {
    name,
    objectSize,
    size: s.bytesRead,
    objects: s.objects,
    zeroObjects: s.zero,
    storedObjects: s.stored,
    deduplicatedObjects: s.deduplicated,
    bytesRead: s.bytesRead,
    bytesZero: s.bytesZero,
    bytesStored: s.bytesStored,
    // Non-zero bytes per byte stored; null when nothing was stored.
    dedupRatio: s.bytesStored > 0 ? Number((data / s.bytesStored).toFixed(3)) : null,
  };
}

function printSummary(json: boolean, verb: string, r: Record<string, unknown>): void {
  if (json) {
    printJson(r);
    return;
  }
  process.stdout.write(`${verb} image ${String(r.name)}: ${String(r.objects)} objects of ${formatSize(r.objectSize as number)}, `
    + `${String(r.bytesRead)} bytes read; ${String(r.storedObjects)} stored (${String(r.bytesStored)} bytes), `
    + `${String(r.deduplicatedObjects)} deduplicated, ${String(r.zeroObjects)} zero; `
    + `dedup ratio ${r.dedupRatio === null ? '-' : String(r.dedupRatio)}\n`);
}

/** Object-sized buffers from a stream (the last one may be shorter). */
async function* objectsOf(stream: Readable, objectSize: number): AsyncGenerator<Buffer> {
  let buf = Buffer.allocUnsafe(objectSize);
  let fill = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    let off = 0;
    while (off < chunk.length) {
      const n = Math.min(objectSize - fill, chunk.length - off);
      chunk.copy(buf, fill, off, off + n);
      fill += n;
      off += n;
      if (fill === objectSize) {
        yield buf;
        buf = Buffer.allocUnsafe(objectSize);
        fill = 0;
      }
    }
  }
  if (fill > 0) yield buf.subarray(0, fill);
}

/** Runs `fill` on a new image; on failure the image stays INCOMPLETE and the error says so. */
async function build(builder: ImageBuilder, name: string, fill: () => Promise<void>): Promise<void> {
  try {
    await fill();
    await builder.finish();
  } catch (err) {
    await builder.abort();
    const e = err as Error;
    e.message = `${e.message} (image "${name}" is left incomplete: remove it)`;
    throw e;
  }
}

export const importImage: CommandModule<object, Args<{ file: string; name: string; 'object-size'?: string }>> = {
  command: 'import <file> <name>',
  describe: 'import a raw disk image (- = stdin) as a read-only, deduplicated image',
  builder: (y) => withProgress(withJson(withStore(y
    .positional('file', { type: 'string', demandOption: true, describe: 'raw image file, or - for stdin' })
    .positional('name', { type: 'string', demandOption: true, describe: 'name of the new image' })
    .option('object-size', { type: 'string', describe: `object size, a power of two from 64K to 64M (default ${formatSize(DEFAULT_OBJECT_SIZE)})` })))) as never,
  handler: async (a) => {
    validateVolumeName(a.name);
    const objectSize = parseSize(a['object-size'] ?? formatSize(DEFAULT_OBJECT_SIZE));
    const stdin = isStdio(a.file);
    let size = 0;
    if (!stdin) {
      const st = await fs.promises.stat(a.file);
      if (!st.isFile() && !st.isBlockDevice()) throw new UsageError(`import: ${a.file} is not a file`);
      size = st.size;
    }
    await usingStore(a.store, async (s) => {
      const builder = await ImageBuilder.begin(s.maps, s.data, a.name, { size, objectSize });
      const progress = new Progress(a.progress, `import ${a.name}`, stdin ? null : size);
      const input: Readable = stdin ? process.stdin : fs.createReadStream(a.file, { highWaterMark: Math.min(objectSize, 1 << 20) });
      await build(builder, a.name, async () => {
        let index = 0;
        for await (const obj of objectsOf(input, objectSize)) {
          await builder.put(index++, obj);
          progress.update(builder.stats.bytesRead, `, ${mib(builder.stats.bytesStored)} stored`);
        }
      });
      progress.end();
      printSummary(a.json, 'imported', summary(a.name, objectSize, builder.stats));
    });
  },
};

export const hashImage: CommandModule<object, Args<{ snapshot: string; image?: string }>> = {
  command: 'hash <snapshot> [image]',
  describe: 'make a deduplicated, read-only image of a snapshot (default name SNAPSHOT.img)',
  builder: (y) => withProgress(withJson(withStore(y
    .positional('snapshot', { type: 'string', demandOption: true, describe: 'snapshot (or image) to hash' })
    .positional('image', { type: 'string', describe: 'name of the new image (default: SNAPSHOT.img)' })))) as never,
  handler: async (a) => {
    validateVolumeName(a.snapshot);
    const name = a.image ?? `${a.snapshot}.img`;
    validateVolumeName(name);
    await usingStore(a.store, async (s) => {
      const source = await VolumeMap.open(s.maps, a.snapshot, { forWrite: false });
      try {
        if ((source.flags & (VolumeFlags.SNAPSHOT | VolumeFlags.READONLY)) === 0) {
          throw new UsageError(`hash "${a.snapshot}": a writable volume changes while it is read; snapshot it and hash the snapshot`);
        }
        assertComplete(a.snapshot, source.flags, 'hash');
        const builder = await ImageBuilder.begin(s.maps, s.data, name, { size: source.size, objectSize: source.objectSize });
        const progress = new Progress(a.progress, `hash ${a.snapshot}`, source.size);
        await build(builder, name, async () => {
          for (let index = 0; index < source.objectCount; index++) {
            const length = Math.min(source.objectSize, source.size - index * source.objectSize);
            const bytes = await readObject(source, s.data, index, length);
            if (bytes === null) builder.putZero(length);
            else await builder.put(index, bytes);
            progress.update(builder.stats.bytesRead);
          }
        });
        progress.end();
        printSummary(a.json, 'hashed', { ...summary(name, source.objectSize, builder.stats), source: a.snapshot });
      } finally {
        await source.close();
      }
    });
  },
};

export const exportImage: CommandModule<object, Args<{ name: string; file: string }>> = {
  command: 'export <name> <file>',
  describe: 'write a volume, snapshot or image out as a raw image (- = stdout; a file is sparse)',
  builder: (y) => withProgress(withJson(withStore(y
    .positional('name', { type: 'string', demandOption: true, describe: 'volume, snapshot or image' })
    .positional('file', { type: 'string', demandOption: true, describe: 'raw image file to write, or - for stdout' })))) as never,
  handler: async (a) => {
    validateVolumeName(a.name);
    const stdout = isStdio(a.file);
    if (stdout && a.json) throw new UsageError('export: --json needs a file (stdout carries the image)');
    await usingStore(a.store, async (s) => {
      const map = await VolumeMap.open(s.maps, a.name, { forWrite: false });
      let written = 0;
      let holes = 0;
      try {
        assertComplete(a.name, map.flags, 'export');
        const progress = new Progress(a.progress, `export ${a.name}`, map.size);
        const fd = stdout ? null : await fs.promises.open(a.file, 'w');
        try {
          if (fd) await fd.truncate(map.size);
          for (let index = 0; index < map.objectCount; index++) {
            const at = index * map.objectSize;
            const length = Math.min(map.objectSize, map.size - at);
            const bytes = await readObject(map, s.data, index, length);
            if (bytes === null) holes++;
            else written += length;
            if (fd) {
              if (bytes !== null) await fd.write(bytes, 0, length, at);
            } else if (!process.stdout.write(bytes ?? Buffer.alloc(length))) {
              await once(process.stdout, 'drain');
            }
            progress.update(at + length);
          }
          if (fd) await fd.sync();
        } finally {
          await fd?.close();
        }
        progress.end();
      } finally {
        await map.close();
      }
      const r = { name: a.name, file: a.file, size: map.size, objectSize: map.objectSize, bytesWritten: written, holeObjects: holes };
      if (a.json) printJson(r);
      else if (!stdout) process.stdout.write(`exported ${a.name} to ${a.file}: ${formatSize(map.size)}, ${written} bytes of data, ${holes} holes\n`);
    });
  },
};

/** Object `index` of `map` (`length` bytes, zero-filled past the object's end), or null when it is absent. */
async function readObject(map: VolumeMap, data: Blocker, index: number, length: number): Promise<Buffer | null> {
  const entry = await map.lookupAsync(index);
  if (entry === ENTRY_ABSENT) return null;
  const name = map.objectName(entry, index);
  const buf = Buffer.allocUnsafe(length);
  const n = await data.read(name, 0, length, buf);
  if (n < length) buf.fill(0, n);
  return buf;
}

/** "-" (yargs hands a lone "-" positional over as ""). */
function isStdio(file: string): boolean {
  return file === '-' || file === '';
}
