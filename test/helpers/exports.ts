/**
 * Exports for tests and benchmarks of the NBD layer alone (no volumes): a
 * sparse in-memory export and a raw-file export. Not for production use.
 */
import fs from 'node:fs/promises';
import { ExtentFlags, type Export, type ExportCapabilities, type ExportListing, type ExportProvider, type Extent, type ReadPiece, type ZeroOptions } from '../../src/nbd/export.js';
import { ExportError } from '../../src/nbd/errors.js';
import { splitRange } from '../../src/compose/extents.js';

const ALL_CAPS: ExportCapabilities = {
  flush: true, fua: true, trim: true, zero: true, fastZero: true, cache: true,
  multiConn: true, blockStatus: true, rotational: false,
};

const BLOCK_SIZE = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

/** Sparse memory: 64 KiB pages allocated on first write; absent pages are holes. */
export class MemoryStore {
  static readonly PAGE = 64 * 1024;
  readonly pages = new Map<number, Buffer>();
  constructor(readonly size: number) {}

  read(offset: number, length: number): ReadPiece[] {
    const pieces: ReadPiece[] = [];
    for (const e of splitRange(offset, length, MemoryStore.PAGE)) {
      const at = offset + e.requestOffset;
      const buf = this.pages.get(e.index);
      const last = pieces[pieces.length - 1];
      // Copy data out so later writes cannot change a reply being sent.
      if (buf) pieces.push({ offset: at, length: e.length, data: Buffer.from(buf.subarray(e.offset, e.offset + e.length)) });
      else if (last && !last.data) last.length += e.length;
      else pieces.push({ offset: at, length: e.length });
    }
    return pieces;
  }

  /** The bytes of a range, holes as zeros (what a client would read). */
  bytes(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (const p of this.read(offset, length)) if (p.data) p.data.copy(out, p.offset - offset);
    return out;
  }

  write(offset: number, data: Buffer): void {
    for (const e of splitRange(offset, data.length, MemoryStore.PAGE)) {
      let buf = this.pages.get(e.index);
      if (!buf) {
        buf = Buffer.alloc(MemoryStore.PAGE);
        this.pages.set(e.index, buf);
      }
      data.copy(buf, e.offset, e.requestOffset, e.requestOffset + e.length);
    }
  }

  /** Zeros a range; whole pages become holes unless `keep`. */
  zero(offset: number, length: number, keep: boolean): void {
    for (const e of splitRange(offset, length, MemoryStore.PAGE)) {
      const buf = this.pages.get(e.index);
      if (e.whole && !keep) this.pages.delete(e.index);
      else if (buf) buf.fill(0, e.offset, e.offset + e.length);
      else if (keep) this.write(offset + e.requestOffset, Buffer.alloc(e.length));
    }
  }

  extents(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    for (const p of this.read(offset, length)) {
      const flags = p.data ? 0 : ExtentFlags.HOLE | ExtentFlags.ZERO;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += p.length;
      else out.push({ length: p.length, flags });
    }
    return out;
  }
}

export class MemoryExport implements Export {
  readonly capabilities = ALL_CAPS;
  readonly blockSize = BLOCK_SIZE;
  constructor(readonly name: string, readonly store: MemoryStore, readonly readOnly = false, readonly description?: string) {}
  get size(): number { return this.store.size; }
  async read(offset: number, length: number): Promise<ReadPiece[]> { return this.store.read(offset, length); }
  async write(offset: number, data: Buffer): Promise<void> { this.store.write(offset, data); }
  async flush(): Promise<void> {}
  async trim(offset: number, length: number): Promise<void> { this.store.zero(offset, length, false); }
  async zero(offset: number, length: number, o: ZeroOptions): Promise<void> {
    if (o.fastZero && o.noHole) throw new ExportError('ENOTSUP', 'fast zero with NO_HOLE is a write');
    this.store.zero(offset, length, o.noHole);
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> { return this.store.extents(offset, length); }
  async cache(): Promise<void> {}
  async close(): Promise<void> {}
}

/** A raw image file served as is: everything reads as data (no hole detection). */
export class RawFileExport implements Export {
  readonly capabilities: ExportCapabilities = { ...ALL_CAPS, fastZero: false, blockStatus: false, multiConn: true };
  readonly blockSize = BLOCK_SIZE;
  constructor(readonly name: string, private readonly fh: fs.FileHandle, readonly size: number, readonly readOnly = false) {}
  static async open(name: string, path: string, readOnly = false): Promise<RawFileExport> {
    const fh = await fs.open(path, readOnly ? 'r' : 'r+');
    const st = await fh.stat();
    return new RawFileExport(name, fh, st.size, readOnly);
  }
  async read(offset: number, length: number): Promise<ReadPiece[]> {
    const data = Buffer.alloc(length);
    await this.fh.read(data, 0, length, offset);
    return [{ offset, length, data }];
  }
  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    await this.fh.write(data, 0, data.length, offset);
    if (fua) await this.fh.datasync();
  }
  async flush(): Promise<void> { await this.fh.datasync(); }
  async trim(offset: number, length: number, fua: boolean): Promise<void> { await this.zero(offset, length, { fua, noHole: false, fastZero: false }); }
  async zero(offset: number, length: number, o: ZeroOptions): Promise<void> {
    const z = Buffer.alloc(Math.min(length, 1 << 20));
    for (let p = 0; p < length; p += z.length) await this.fh.write(z, 0, Math.min(z.length, length - p), offset + p);
    if (o.fua) await this.fh.datasync();
  }
  async blockStatus(_offset: number, length: number): Promise<Extent[]> { return [{ length, flags: 0 }]; }
  async cache(): Promise<void> {}
  async close(): Promise<void> { await this.fh.close(); }
}

/** Serves a fixed set of exports; file exports are opened per connection. */
export class StaticProvider implements ExportProvider {
  readonly memory = new Map<string, { store: MemoryStore; readOnly: boolean; description?: string }>();
  readonly files = new Map<string, { path: string; readOnly: boolean }>();
  defaultExport?: string;

  addMemory(name: string, size: number, readOnly = false, description?: string): MemoryStore {
    const store = new MemoryStore(size);
    this.memory.set(name, { store, readOnly, description });
    this.defaultExport ??= name;
    return store;
  }
  addFile(name: string, path: string, readOnly = false): void {
    this.files.set(name, { path, readOnly });
    this.defaultExport ??= name;
  }
  async list(): Promise<ExportListing[]> {
    return [...[...this.memory].map(([name, m]) => ({ name, description: m.description })), ...[...this.files.keys()].map((name) => ({ name }))];
  }
  async open(name: string): Promise<Export | null> {
    const m = this.memory.get(name);
    if (m) return new MemoryExport(name, m.store, m.readOnly, m.description);
    const f = this.files.get(name);
    if (f) return RawFileExport.open(name, f.path, f.readOnly);
    return null;
  }
}

/** Parses sizes like 64M, 1G, 4096. */
export function parseSize(s: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(s);
  if (!m) throw new Error(`bad size: ${s}`);
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase()]!;
  return Number(m[1]) * mult;
}
