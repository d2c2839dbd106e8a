/**
 * An independent encoder of format v1 for tests (STYLE.md habit 13): written
 * from docs/format.md, not from src/mapper/, with BigInt u64s and explicit
 * offsets, so a mistake in the real encoder does not hide in its own fixtures.
 * Also a tiny seeded PRNG and random valid headers for round trips.
 */
import { crc32 } from 'node:zlib';
import type { VolumeHeader } from '../../../src/mapper/header-format.js';
import { mulberry32 } from '../../../src/common/prng.js';

export interface FixtureHeader {
  flags?: number;
  id: string;
  size: bigint;
  objLog2?: number;
  gen?: number;
  writableSince?: number;
  created?: bigint;
  sources?: string[];
  writer?: number;
  parent?: { name: string; id: string };
  renameTo?: string;
  renamedFrom?: string;
  refs?: [chunk: number, gen: number, source: number][];
}

export function fixtureHeader(f: FixtureHeader): Buffer {
  const sources = f.sources ?? [f.id];
  const refs = f.refs ?? [];
  const names = Buffer.from((f.parent?.name ?? '') + (f.renameTo ?? '') + (f.renamedFrom ?? ''), 'ascii');
  const total = 80 + 8 * sources.length + 12 * refs.length + names.length + 4;
  const b = Buffer.alloc(total);
  b.write('ARCHVHDR', 0, 'ascii');
  b.writeUInt16LE(1, 8);
  b.writeUInt16LE(80, 10);
  b.writeUInt32LE(total, 12);
  b.writeUInt32LE(f.flags ?? 0, 16);
  b[20] = f.objLog2 ?? 22;
  b[21] = 12;
  b.writeUInt16LE(sources.length, 22);
  b.writeUInt16LE(f.writer ?? 0, 24);
  b.writeUInt16LE(f.parent?.name.length ?? 0, 26);
  b.writeUInt16LE(f.renameTo?.length ?? 0, 28);
  b.writeUInt16LE(f.renamedFrom?.length ?? 0, 30);
  Buffer.from(f.id, 'hex').copy(b, 32);
  b.writeBigUInt64LE(f.size, 40);
  b.writeUInt32LE(f.gen ?? 1, 48);
  b.writeUInt32LE(f.writableSince ?? 1, 52);
  b.writeBigUInt64LE(f.created ?? 0n, 56);
  if (f.parent) Buffer.from(f.parent.id, 'hex').copy(b, 64);
  b.writeUInt32LE(refs.length, 72);
  let off = 80;
  for (const s of sources) { Buffer.from(s, 'hex').copy(b, off); off += 8; }
  for (const [chunk, gen, source] of refs) {
    b.writeUInt32LE(chunk, off);
    b.writeUInt32LE(gen, off + 4);
    b.writeUInt16LE(source, off + 8);
    off += 12;
  }
  names.copy(b, off);
  off += names.length;
  b.writeUInt32LE(crc32(b.subarray(0, off)), off);
  return b;
}

/** Entry as the docs define it: kind << 48 | source << 32 | generation. */
export function fixtureEntry(kind: number, source: number, gen: number): bigint {
  return (BigInt(kind) << 48n) | (BigInt(source) << 32n) | BigInt(gen);
}

export function fixtureChunk(id: string, gen: number, chunk: number, entries: Map<number, bigint>): Buffer {
  const present = [...entries.keys()].filter((i) => entries.get(i) !== 0n).sort((a, b) => a - b);
  const first = present.length ? present[0]! : 0;
  const count = present.length ? present[present.length - 1]! - first + 1 : 0;
  const b = Buffer.alloc(32 + count * 8 + 4);
  b.write('ARCHVMCK', 0, 'ascii');
  b.writeUInt16LE(1, 8);
  b.writeUInt16LE(32, 10);
  b.writeUInt16LE(first, 12);
  b.writeUInt16LE(count, 14);
  Buffer.from(id, 'hex').copy(b, 16);
  b.writeUInt32LE(gen, 24);
  b.writeUInt32LE(chunk, 28);
  for (const i of present) b.writeBigUInt64LE(entries.get(i)!, 32 + 8 * (i - first));
  b.writeUInt32LE(crc32(b.subarray(0, 32 + count * 8)), 32 + count * 8);
  return b;
}

/** Recomputes the trailing CRC after a test edits a field. */
export function fixCrc(b: Buffer): Buffer {
  b.writeUInt32LE(crc32(b.subarray(0, b.length - 4)), b.length - 4);
  return b;
}


export function randomId(rand: () => number): string {
  let id = '';
  while (id.length < 16) id += Math.floor(rand() * 16).toString(16);
  return id === '0000000000000000' ? '0000000000000001' : id;
}

function randomName(rand: () => number): string {
  const chars = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
  const len = 1 + Math.floor(rand() * 80);
  let s = '';
  for (let i = 0; i < len; i++) s += chars[Math.floor(rand() * chars.length)];
  return s;
}

/** A random valid header (sources distinct, refs sorted and in range). */
export function randomHeader(rand: () => number): VolumeHeader {
  const objectSizeLog2 = 16 + Math.floor(rand() * 11);
  const size = rand() < 0.2 ? Number.MAX_SAFE_INTEGER - Math.floor(rand() * 1000) : Math.floor(rand() * 2 ** (30 + rand() * 20));
  const nSources = 1 + Math.floor(rand() * (rand() < 0.5 ? 1 : 6));
  const sources = new Set<string>();
  while (sources.size < nSources) sources.add(randomId(rand));
  const list = [...sources];
  const writerSource = Math.floor(rand() * nSources);
  const generation = 1 + Math.floor(rand() * 0xfffffffe);
  const writableSince = 1 + Math.floor(rand() * generation);
  const chunks = Math.ceil(Math.ceil(size / 2 ** objectSizeLog2) / 4096);
  const chunkRefs = [];
  let c = Math.floor(rand() * 3);
  for (let i = 0; i < Math.floor(rand() * 40) && c < chunks; i++) {
    const source = Math.floor(rand() * nSources);
    const gen = source === writerSource ? 1 + Math.floor(rand() * generation) : 1 + Math.floor(rand() * 0xffffffff);
    chunkRefs.push({ chunkIndex: c, source, generation: gen });
    c += 1 + Math.floor(rand() * (rand() < 0.5 ? 2 : 100000));
  }
  const hasParent = rand() < 0.5;
  return {
    flags: Math.floor(rand() * 8) & ~2, // SNAPSHOT relaxes a rule; tested separately
    volumeId: list[writerSource]!,
    size,
    objectSizeLog2,
    generation,
    writableSince,
    createdAt: Math.floor(rand() * 2 ** 45),
    sources: list,
    writerSource,
    parent: hasParent ? { name: randomName(rand), volumeId: randomId(rand) } : null,
    renameTo: rand() < 0.3 ? randomName(rand) : null,
    renamedFrom: rand() < 0.3 ? randomName(rand) : null,
    chunkRefs,
  };
}

/** A small seeded PRNG, uniform in [0, 1). */
export const prng = mulberry32;
