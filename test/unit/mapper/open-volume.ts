/**
 * Test fixture: a volume opened through compose on a MemoryBlocker, with the
 * bytes it should hold (its model). Shared by the snapshot/clone and gc tests.
 */
import type { Test } from 'tap';
import type { MemoryBlocker } from '../../../src/blockers/memory.js';
import { Volume } from '../../../src/compose/volume.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

export const KiB = 1024;
export const OBJ = 64 * KiB;
export const OBJECTS = 16;
export const SIZE = OBJECTS * OBJ;

/** Byte i is a function of (seed, absolute position); never 0. */
export function pattern(seed: number, at: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((at + i) * 31 + seed * 97 + ((at + i) >>> 9)) & 0xff || 1;
  return b;
}

export class Open {
  constructor(readonly map: VolumeMap, readonly vol: Volume, readonly model: Buffer) {}

  static async create(b: MemoryBlocker, name: string, size = SIZE): Promise<Open> {
    const map = await VolumeMap.create(b, name, { size, objectSize: OBJ });
    return new Open(map, new Volume(map, b, false), Buffer.alloc(size));
  }

  /** Opens `name`; `model` is what it should read. */
  static async open(b: MemoryBlocker, name: string, forWrite: boolean, model: Buffer): Promise<Open> {
    const map = await VolumeMap.open(b, name, { forWrite });
    return new Open(map, new Volume(map, b, !forWrite), Buffer.from(model));
  }

  get id(): string { return this.map.id; }

  async write(seed: number, at: number, length: number): Promise<void> {
    const data = pattern(seed, at, length);
    await this.vol.write(at, data, false);
    data.copy(this.model, at);
  }

  async readAll(): Promise<Buffer> {
    const out = Buffer.alloc(this.vol.size);
    for (const p of await this.vol.read(0, this.vol.size)) if (p.data) p.data.copy(out, p.offset);
    return out;
  }

  async check(t: Test, what: string): Promise<void> {
    const got = await this.readAll();
    t.ok(got.equals(this.model), `${what} reads what was written`);
  }

  close(): Promise<void> {
    return this.vol.close();
  }
}
