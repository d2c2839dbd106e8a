/**
 * The daemon's admin API: a Unix socket (`serve --admin-socket PATH`, mode
 * 0600: its owner only) speaking newline-delimited JSON, one reply line per
 * request line, in order:
 *
 *   {"op":"snapshot","volume":V,"name":S}
 *       → {"ok":true,"op":"snapshot","volume":V,"name":S,"volumeId":..,"originGeneration":..,"online":bool}
 *   {"op":"lock"|"open","volume":V}
 *       → {"ok":true,"op":..,"volume":V,"owner":OWNER}   takes V's lock now (asking its holder to
 *          hand over) and keeps V open until unlock/close; "lock" refuses hand-over requests
 *          meanwhile, "open" honours them (vlmc's open: the lock ahead of the first write)
 *   {"op":"unlock"|"close","volume":V}
 *       → {"ok":true,"op":..,"volume":V,"held":bool}    persists V's map, releases the lock, ends the pin
 *   {"op":"status"}
 *       → {"ok":true,"op":"status","volumes":[{"name":..,"connections":n,"mode":"owner"|"reader"|"read-only",
 *          "lock":STATE,"pinned":"lock"|"open"|null}],
 *          "backend":{"timeoutMs":..,"timedOut":{op:n},"late":n,"fencedObjects":n,..,"faultInjection":bool}}
 *   {"op":"faults","action":"show"}                     (only under serve --fault-injection)
 *   {"op":"faults","action":"set","rules":[RULE,…]}     replaces every rule
 *   {"op":"faults","action":"add","rule":RULE}          → also "id"
 *   {"op":"faults","action":"clear"[,"release":"run"|"fail"][,"ids":[n,…]]}
 *       → {"ok":true,"op":"faults","rules":[RULE + {id,matched,injected,hanging}],
 *          "injectedTotal":n,"hanging":n,"backend":{…}[,"released":n]}
 *       RULE = {"ops":["write",…],"prefix":"d.","rate":0.5,"limit":n,"seed":n,
 *               and one of "fail":"EIO"|"ENOSPC"|…, "delayMs":n, "hang":true}
 *       (blockers/faulty.ts; docs/reliability.md "Backend faults")
 *   anything else, or a failure
 *       → {"ok":false,"code":"ARCH_E_…","message":"…"}
 *
 * A snapshot goes through the daemon's own open volume (VolumeProvider.acquire:
 * the one its clients share, opened for the occasion if none has it), so a
 * client connecting meanwhile cannot write behind it, and under the volume's
 * lock (a hand-over when another daemon writes it):
 *
 *   acquire V ──▶ lock (VolumeSession.exclusive) ──▶ quiesce V (writes wait, in flight drain,
 *      flush) ──▶ open map for writing (if still read-only) ──▶ createSnapshot ──▶ let the
 *      writes in ──▶ release V
 *
 * `online` says whether a client had V open. Snapshots are taken one at a
 * time (the store has no exclusive create to keep two same-named ones apart).
 * A line longer than MAX_LINE closes the connection.
 */
import fs from 'node:fs/promises';
import net from 'node:net';
import { checkNameFree, createSnapshot } from '../mapper/snapshot-create.js';
import { validateVolumeName } from '../mapper/names.js';
import { UsageError, VolumeNotFoundError } from '../mapper/errors.js';
import type { Store } from './store.js';
import type { GuardedStore } from './backend.js';
import type { VolumeProvider } from './volume-export.js';
import { VolumeSession } from './volume-session.js';
import type { Logger } from '../common/log.js';

export const MAX_LINE = 64 * 1024;

type Reply = { ok: true; [key: string]: unknown } | { ok: false; code: string; message: string };

export class AdminServer {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  /** Snapshots one at a time. */
  private serial: Promise<unknown> = Promise.resolve();
  /** Volumes held open by lock/open, until unlock/close: their release and which op pinned them. */
  private readonly pins = new Map<string, { kind: 'lock' | 'open'; release: () => Promise<void> }>();
  private path: string | null = null;

  constructor(
    private readonly store: Store,
    private readonly provider: VolumeProvider,
    private readonly log: Logger,
    /** Backend timeouts and the fault injector (backend.ts), when the daemon has them. */
    private readonly backend: Pick<GuardedStore, 'faults' | 'status'> | null = null,
  ) {
    this.server = net.createServer((socket) => this.accept(socket));
    this.server.on('error', (err) => this.log.error(`admin listener: ${err.message}`, { err }));
  }

  /** Listens on `path` (a stale socket file is replaced), owner-only. */
  async listen(path: string): Promise<void> {
    await fs.rm(path, { force: true });
    // The socket file is created by bind, inside listen(): with this umask it
    // never exists with wider permissions, even for an instant.
    const old = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        this.server.once('error', reject);
        this.server.listen({ path }, () => { this.server.off('error', reject); resolve(); });
      });
    } finally {
      process.umask(old);
    }
    await fs.chmod(path, 0o600);
    this.path = path;
    this.log.info(`admin API on unix:${path}`);
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    if (this.server.listening) await closed;
    if (this.path) await fs.rm(this.path, { force: true });
    // Let a snapshot under way finish before the volumes are closed.
    await this.serial.catch(() => {});
    // Pins end with the admin API (shutdown): a pinned volume then closes like
    // any other, persisting its map and releasing its lock, once unused.
    const pins = [...this.pins.values()];
    this.pins.clear();
    await Promise.allSettled(pins.map((p) => p.release()));
  }

  private accept(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => {});
    socket.setEncoding('utf8');
    let buffered = '';
    let queue = Promise.resolve();
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.length > MAX_LINE) { socket.destroy(); return; }
        if (line.trim() === '') continue;
        queue = queue.then(async () => {
          const reply = await this.handle(line);
          if (!socket.destroyed) socket.write(JSON.stringify(reply) + '\n');
        });
      }
      if (buffered.length > MAX_LINE) socket.destroy();
    });
  }

  /** One request line to its reply; never throws. */
  async handle(line: string): Promise<Reply> {
    try {
      let req: unknown;
      try {
        req = JSON.parse(line);
      } catch {
        throw new UsageError('request is not JSON');
      }
      if (typeof req !== 'object' || req === null || Array.isArray(req)) throw new UsageError('request is not a JSON object');
      const r = req as Record<string, unknown>;
      switch (r.op) {
        case 'status':
          return { ok: true, op: 'status', volumes: await this.status(), ...(this.backend ? { backend: this.backend.status() } : {}) };
        case 'faults':
          return this.faults(r);
        case 'snapshot': {
          const volume = stringField(r, 'volume');
          const name = stringField(r, 'name');
          validateVolumeName(volume);
          validateVolumeName(name);
          const run = this.serial.catch(() => {}).then(() => this.snapshot(volume, name));
          this.serial = run;
          return { ok: true, op: 'snapshot', volume, name, ...(await run) };
        }
        case 'lock':
        case 'open':
        case 'unlock':
        case 'close': {
          const volume = stringField(r, 'volume');
          validateVolumeName(volume);
          const op = r.op;
          return { ok: true, op, volume, ...(op === 'lock' || op === 'open' ? await this.pin(volume, op) : await this.unpin(volume, op)) };
        }
        default:
          throw new UsageError(`unknown op ${JSON.stringify(r.op)} `
            + '(expected "snapshot", "lock", "unlock", "open", "close", "status" or "faults")');
      }
    } catch (err) {
      const e = err as Error & { code?: unknown };
      const code = typeof e.code === 'string' && e.code.startsWith('ARCH_E_') ? e.code : 'ARCH_E_INTERNAL';
      if (code === 'ARCH_E_INTERNAL') this.log.error(`admin request failed: ${e.message}`, { err });
      return { ok: false, code, message: e.message ?? String(err) };
    }
  }

  /** The `faults` op (file comment); refused unless the daemon runs with --fault-injection. */
  private faults(r: Record<string, unknown>): Reply {
    const faults = this.backend?.faults;
    if (!faults) throw new UsageError('fault injection is off: start the daemon with serve --fault-injection (tests and drills only)');
    const extra: Record<string, unknown> = {};
    switch (r.action) {
      case 'show':
        break;
      case 'set':
        if (!Array.isArray(r.rules)) throw new UsageError('faults set: "rules" must be a list of rules');
        extra.ids = faults.setRules(r.rules);
        break;
      case 'add':
        extra.id = faults.addRule(r.rule);
        break;
      case 'clear': {
        const release = r.release ?? 'run';
        if (release !== 'run' && release !== 'fail') throw new UsageError('faults clear: "release" must be "run" or "fail"');
        const ids = r.ids;
        if (ids !== undefined && !(Array.isArray(ids) && ids.every((i) => Number.isSafeInteger(i)))) {
          throw new UsageError('faults clear: "ids" must be a list of rule ids');
        }
        extra.released = faults.clear({ release, ids: ids as number[] | undefined });
        break;
      }
      default:
        throw new UsageError(`faults: unknown action ${JSON.stringify(r.action)} (expected "show", "set", "add" or "clear")`);
    }
    if (r.action !== 'show') this.log.warn(`fault injection: ${String(r.action)}`, { request: r, ...extra });
    return { ok: true, op: 'faults', ...faults.stats(), backend: this.backend!.status(), ...extra };
  }

  private async status(): Promise<{ name: string; connections: number; mode: string; lock: string | null; pinned: string | null }[]> {
    return Promise.all(this.provider.openVolumes().map(async (v) => {
      const served = await this.provider.peek(v.name);
      const session = served instanceof VolumeSession ? served : null;
      return {
        ...v,
        mode: session ? session.mode : 'read-only',
        lock: session ? session.lockState : null,
        pinned: this.pins.get(v.name)?.kind ?? null,
      };
    }));
  }

  /** lock/open: take the volume's lock now and keep the volume open (file comment). */
  private async pin(name: string, kind: 'lock' | 'open'): Promise<{ owner: unknown }> {
    const held = await this.provider.acquire(name);
    if (!held) throw new VolumeNotFoundError(name);
    try {
      if (!(held.volume instanceof VolumeSession)) {
        throw new UsageError(`${kind} "${name}": it is read-only (a snapshot or an image): nothing to lock`);
      }
      await held.volume.takeLock(kind === 'lock');
      const previous = this.pins.get(name);
      this.pins.set(name, { kind, release: held.release });
      // Pinned already: keep one hold (the new kind wins).
      if (previous) await previous.release();
      this.log.info(`volume ${name}: ${kind === 'lock' ? 'locked' : 'opened'} by the admin API`);
      return { owner: await held.volume.owner() };
    } catch (err) {
      if (this.pins.get(name)?.release !== held.release) await held.release();
      throw err;
    }
  }

  /** unlock/close: persist, release the lock, end the pin (a volume not pinned: released if we hold it). */
  private async unpin(name: string, kind: 'unlock' | 'close'): Promise<{ held: boolean }> {
    const pin = this.pins.get(name);
    this.pins.delete(name);
    const served = await this.provider.peek(name);
    let held = false;
    try {
      if (served instanceof VolumeSession) {
        held = served.mode === 'owner';
        await served.dropLock();
      }
    } finally {
      await pin?.release();
    }
    this.log.info(`volume ${name}: ${kind === 'unlock' ? 'unlocked' : 'closed'} by the admin API`, { held });
    return { held };
  }

  private async snapshot(volumeName: string, snapName: string): Promise<{ volumeId: string; originGeneration: number; online: boolean }> {
    // Before anything writes (opening for writing bumps the generation).
    await checkNameFree(this.store.maps, snapName);
    const online = this.provider.openVolumes().some((v) => v.name === volumeName);
    const held = await this.provider.acquire(volumeName);
    if (!held) throw new VolumeNotFoundError(volumeName);
    try {
      const { volume } = held;
      if (!(volume instanceof VolumeSession)) {
        throw new UsageError(`snapshot of "${volumeName}": it is read-only (a snapshot or an image); clone it instead`);
      }
      const r = await volume.exclusive((v) => createSnapshot(this.store.maps, v.map, snapName));
      this.log.info(`snapshot ${snapName} of volume ${volumeName}`, { online, originGeneration: r.originGeneration });
      return { ...r, online };
    } finally {
      await held.release();
    }
  }
}

function stringField(r: Record<string, unknown>, key: string): string {
  const v = r[key];
  if (typeof v !== 'string') throw new UsageError(`request field "${key}" must be a string`);
  return v;
}

/**
 * Sends one request to the admin socket at `path` and resolves with the reply.
 * Rejects with the socket error (ENOENT, ECONNREFUSED: no daemon there).
 */
export function adminRequest(path: string, request: object, timeoutMs = 60_000): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path });
    let buffered = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(Object.assign(new Error(`admin socket ${path}: no reply within ${timeoutMs} ms`), { code: 'ETIMEDOUT' }));
    }, timeoutMs);
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(JSON.stringify(request) + '\n'));
    socket.on('data', (s: string) => {
      buffered += s;
      const nl = buffered.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      socket.end();
      try {
        resolve(JSON.parse(buffered.slice(0, nl)) as Reply);
      } catch (err) {
        reject(err);
      }
    });
    socket.on('error', (err) => { clearTimeout(timer); reject(err); });
    socket.on('close', () => {
      clearTimeout(timer);
      reject(new Error(`admin socket ${path}: closed without a reply`));
    });
  });
}
