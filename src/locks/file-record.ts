/**
 * The records of the file lock (docs/format.md §13.2), as pure functions over
 * Buffers: no I/O here (file-backend.ts does it).
 *
 * An entry `e.<seq>` is one fixed-size record: a JSON object padded with
 * spaces to RECORD_SIZE − 1 bytes, then "\n" (so `cat` shows it). Fixed size,
 * because the owner renews its entry in place with one pwrite: a reader sees
 * the old bytes, the new bytes, or (rarely, mid-write) a mix that fails to
 * parse, which only ever makes the holder look alive.
 *
 * A request `r.<seq>.<token>` is a small JSON object: who asks the holder of
 * entry `seq` to hand over.
 */

export const RECORD_FORMAT = 'archipelago-lock';
export const REQUEST_FORMAT = 'archipelago-lock-request';
export const RECORD_VERSION = 1;
export const RECORD_SIZE = 512;

const TOKEN = /^[0-9a-f]{16}$/;

export interface FileLockRecord {
  format: typeof RECORD_FORMAT;
  version: typeof RECORD_VERSION;
  /** The volume id. */
  volume: string;
  /** = the `<seq>` of the entry's name. */
  seq: number;
  /** held: the lock is taken by this record's owner; free: nobody holds it. */
  state: 'held' | 'free';
  /** Random per entry (the acquisition's token for held entries): no two entries ever have the same bytes. */
  token: string;
  node: string;
  instance: string;
  pid: number;
  /** Wall-clock ms, the writer's own clock: when it took (held) or gave up (free) the lock. Informational. */
  since: number;
  /** Held: the lease the owner honours, its margin and renewal interval, ms. */
  leaseMs: number;
  marginMs: number;
  renewMs: number;
  /** Held: renewals so far (the in-place rewrite changes this). Free: 0. */
  renewal: number;
  /** Free: 'initial' (first entry), 'released', 'broken' (an operator broke a dead holder's lease). */
  reason: '' | 'initial' | 'released' | 'broken';
}

export type DecodedRecord =
  | { ok: true; record: FileLockRecord }
  /** Written by a newer format: never judged stale (its rules may differ). */
  | { ok: false; newerVersion: number; why: string }
  /** Torn or damaged. */
  | { ok: false; newerVersion: 0; why: string };

/** The record as RECORD_SIZE bytes. Fields are written in a fixed order. */
export function encodeRecord(r: FileLockRecord): Buffer {
  const ordered: FileLockRecord = {
    format: RECORD_FORMAT, version: RECORD_VERSION, volume: r.volume, seq: r.seq, state: r.state, token: r.token,
    node: r.node, instance: r.instance, pid: r.pid, since: r.since, leaseMs: r.leaseMs, marginMs: r.marginMs,
    renewMs: r.renewMs, renewal: r.renewal, reason: r.reason,
  };
  const json = Buffer.from(JSON.stringify(ordered), 'utf8');
  if (json.length > RECORD_SIZE - 1) throw new RangeError(`lock record is ${json.length} bytes, over ${RECORD_SIZE - 1}`);
  const out = Buffer.alloc(RECORD_SIZE, 0x20);
  json.copy(out);
  out[RECORD_SIZE - 1] = 0x0a;
  return out;
}

/** Decodes an entry's bytes; `volume` and `seq` are what its name says. */
export function decodeRecord(bytes: Buffer, volume: string, seq: number): DecodedRecord {
  const bad = (why: string): DecodedRecord => ({ ok: false, newerVersion: 0, why });
  let obj: Record<string, unknown>;
  try {
    obj = JSON.parse(bytes.toString('utf8')) as Record<string, unknown>;
  } catch {
    return bad(`${bytes.length} bytes that are not a JSON record (torn or damaged)`);
  }
  if (obj === null || typeof obj !== 'object' || obj.format !== RECORD_FORMAT) return bad(`not an ${RECORD_FORMAT} record`);
  if (typeof obj.version === 'number' && Number.isInteger(obj.version) && obj.version > RECORD_VERSION) {
    return { ok: false, newerVersion: obj.version, why: `lock record version ${obj.version}, this build reads ${RECORD_VERSION}` };
  }
  if (obj.version !== RECORD_VERSION) return bad(`unsupported lock record version ${String(obj.version)}`);
  if (bytes.length !== RECORD_SIZE || bytes[RECORD_SIZE - 1] !== 0x0a) return bad(`record is ${bytes.length} bytes, expected ${RECORD_SIZE}`);
  if (obj.volume !== volume) return bad(`record of volume ${String(obj.volume)} under the lock of ${volume}`);
  if (obj.seq !== seq) return bad(`record says seq ${String(obj.seq)}, its name ${seq}`);
  if (obj.state !== 'held' && obj.state !== 'free') return bad(`state ${String(obj.state)}`);
  if (typeof obj.token !== 'string' || !TOKEN.test(obj.token)) return bad('bad token');
  if (typeof obj.node !== 'string' || typeof obj.instance !== 'string') return bad('bad identity');
  for (const k of ['pid', 'since', 'leaseMs', 'marginMs', 'renewMs', 'renewal'] as const) {
    const v = obj[k];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) return bad(`bad ${k}`);
  }
  if (!['', 'initial', 'released', 'broken'].includes(obj.reason as string)) return bad(`bad reason ${String(obj.reason)}`);
  if (obj.state === 'held' && !((obj.leaseMs as number) > (obj.marginMs as number) && (obj.marginMs as number) > 0)) {
    return bad('held record without a sane lease');
  }
  return { ok: true, record: obj as unknown as FileLockRecord };
}

export interface FileLockRequest {
  format: typeof REQUEST_FORMAT;
  version: typeof RECORD_VERSION;
  volume: string;
  /** The entry whose holder is asked. */
  seq: number;
  token: string;
  node: string;
  instance: string;
  pid: number;
}

export function encodeRequest(r: Omit<FileLockRequest, 'format' | 'version'>): Buffer {
  const ordered: FileLockRequest = {
    format: REQUEST_FORMAT, version: RECORD_VERSION, volume: r.volume, seq: r.seq, token: r.token,
    node: r.node, instance: r.instance, pid: r.pid,
  };
  return Buffer.from(JSON.stringify(ordered) + '\n', 'utf8');
}

/** Null for anything but a complete request of this volume and entry (it may be half written). */
export function decodeRequest(bytes: Buffer, volume: string, seq: number): FileLockRequest | null {
  try {
    const obj = JSON.parse(bytes.toString('utf8')) as Record<string, unknown>;
    if (obj?.format !== REQUEST_FORMAT || obj.version !== RECORD_VERSION || obj.volume !== volume || obj.seq !== seq) return null;
    if (typeof obj.token !== 'string' || typeof obj.node !== 'string' || typeof obj.instance !== 'string' || typeof obj.pid !== 'number') return null;
    return obj as unknown as FileLockRequest;
  } catch {
    return null;
  }
}
