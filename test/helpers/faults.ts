/**
 * What the backend-fault integration tests share: a daemon started with
 * `--fault-injection` and an admin socket, the `faults` admin requests, and a
 * per-sector model of what a volume may hold when some requests failed.
 *
 *   const d = await startFaultDaemon(t, store, { backendTimeoutSec: 1.5 });
 *   await d.faults({ action: 'add', rule: { ops: ['write'], prefix: `d.${id}.`, fail: 'EIO' } });
 *
 * The model (FailureModel): per 512-byte sector, the set of values a read may
 * return. An acknowledged write applies its bytes to every candidate; a
 * failed one may or may not have happened (NBD: the range of a failed write
 * is undefined — here narrowed to "old or new", which is what our volumes
 * promise), so it adds the new value beside each old one. Sets above the cap
 * become "anything" (counted). Tests flush before they kill the daemon, so
 * crash candidates (unflushed writes) are not modelled here: see crash-model.ts.
 */
import path from 'node:path';
import type { Test } from 'tap';
import { adminRequest } from '../../src/daemon/admin.js';
import { cli, startDaemon, type Daemon } from './daemon.js';
import { tempDir } from './run.js';
import { NbdDriver, SECTOR, sectorPart } from './crash-model.js';

interface Teardown { teardown(fn: () => unknown): void }

export { SECTOR };

/** `length` bytes of a pattern that differs per seed and never holds a zero byte. */
export function pattern(seed: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 97 + (i >>> 9)) & 0xff || 1;
  return b;
}

/** A libnbd driver (crash-model.ts) connected to `volume` of the daemon; closed with the test. */
export async function connect(t: Test, d: Daemon, volume: string): Promise<NbdDriver> {
  const drv = new NbdDriver(t);
  const r = await drv.request({ op: 'connect', uri: d.uri(volume) });
  if (!r.ok) throw new Error(`connect ${volume}: ${r.error}`);
  return drv;
}

export interface FaultDaemon extends Daemon {
  admin: string;
  /** One `faults` admin request; rejects when the reply is not ok. */
  faults(req: Record<string, unknown>): Promise<Record<string, unknown>>;
  /** The admin `status` reply's backend counters. */
  backend(): Promise<{ timeoutMs: number; timedOut: Record<string, number>; late: number; fencedObjects: number; faultInjection: boolean }>;
}

export async function startFaultDaemon(
  t: Teardown, store: string, o: { backendTimeoutSec?: number; faultInjection?: boolean; extraArgs?: string[] } = {},
): Promise<FaultDaemon> {
  const admin = path.join(await tempDir(t, 'archipelago-faults-'), 'admin.sock');
  const args = ['--admin-socket', admin, ...(o.faultInjection === false ? [] : ['--fault-injection'])];
  if (o.backendTimeoutSec !== undefined) args.push('--backend-timeout', String(o.backendTimeoutSec));
  const d = await startDaemon(t, { store, extraArgs: [...args, ...(o.extraArgs ?? [])] });
  const fd = d as FaultDaemon;
  fd.admin = admin;
  fd.faults = async (req) => {
    const reply = await adminRequest(admin, { op: 'faults', ...req });
    if (!reply.ok) throw Object.assign(new Error(`faults ${JSON.stringify(req)}: ${reply.message}`), { code: reply.code });
    return reply;
  };
  fd.backend = async () => {
    const reply = await adminRequest(admin, { op: 'status' });
    if (!reply.ok) throw new Error(reply.message);
    return reply.backend as Awaited<ReturnType<FaultDaemon['backend']>>;
  };
  return fd;
}

/** Creates a volume (64 KiB objects unless said) and returns its id: its data objects are d.<id>.*. */
export async function createVolume(store: string, name: string, size: string, objectSize = '64K'): Promise<string> {
  const r = await cli(['create', name, '--size', size, '--object-size', objectSize, '--store', store, '--json']);
  if (r.code !== 0) throw new Error(`create ${name}: ${r.stderr}`);
  return (JSON.parse(r.stdout) as { id: string }).id;
}

/** libnbd's errno of a failed request as a name (driver.py reports a name or a number). */
export function errnoName(errno: string | number | null | undefined): string | null {
  if (typeof errno === 'number') return ({ 5: 'EIO', 28: 'ENOSPC', 1: 'EPERM', 22: 'EINVAL', 110: 'ETIMEDOUT' } as Record<number, string>)[errno] ?? String(errno);
  return errno ?? null;
}

export class FailureModel {
  /** Sector → allowed values (latin1), or null: anything. */
  readonly sets: (Set<string> | null)[];
  capHits = 0;

  constructor(readonly size: number, readonly cap = 16) {
    const zero = Buffer.alloc(SECTOR).toString('latin1');
    this.sets = Array.from({ length: size / SECTOR }, () => new Set([zero]));
  }

  /** A write (data null: zeros) that was acknowledged (ok) or failed. */
  apply(off: number, len: number, data: Buffer | null, ok: boolean): void {
    for (let s = Math.floor(off / SECTOR); s <= Math.floor((off + len - 1) / SECTOR); s++) {
      const set = this.sets[s]!;
      if (set === null) continue;
      const { overlay } = sectorPart(s, off, len, data);
      const next = new Set([...set].map(overlay));
      if (!ok) for (const v of set) next.add(v);
      if (next.size > this.cap) {
        this.sets[s] = null;
        this.capHits++;
      } else {
        this.sets[s] = next;
      }
    }
  }

  /** Sectors of `actual` (starting at byte `off`) that no allowed value explains. */
  check(actual: Buffer, off = 0): number[] {
    const bad: number[] = [];
    for (let i = 0; i < actual.length; i += SECTOR) {
      const set = this.sets[(off + i) / SECTOR];
      if (set === null) continue;
      if (!set!.has(actual.toString('latin1', i, i + SECTOR))) bad.push((off + i) / SECTOR);
    }
    return bad;
  }

  /** After reading the whole volume back (`actual`) with nothing in doubt: each sector holds that value only. */
  settle(actual: Buffer): void {
    for (let s = 0; s < this.sets.length; s++) this.sets[s] = new Set([actual.toString('latin1', s * SECTOR, (s + 1) * SECTOR)]);
  }
}
