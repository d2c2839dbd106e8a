/**
 * Serving volumes over NBD: the ExportProvider that opens volumes by name,
 * shares one open volume between every connection to it (so FLUSH on one
 * connection covers writes on all: CAN_MULTI_CONN), and closes it when the
 * last connection ends.
 *
 * A writable volume is served through a VolumeSession (volume-session.ts):
 * under its distributed lock, taken on the first write and handed over when
 * another daemon asks. Snapshots and images never change: a plain read-only
 * Volume with its map cached serves them, without a lock.
 */
import { Volume } from '../compose/volume.js';
import type { Export, ExportCapabilities, ExportListing, ExportProvider } from '../nbd/export.js';
import { VolumeMap, listVolumes } from '../mapper/volume-map.js';
import { VolumeNotFoundError } from '../mapper/errors.js';
import { VolumeFlags } from '../mapper/header-format.js';
import { assertComplete } from '../mapper/image-create.js';
import { ExportError } from '../nbd/errors.js';
import { isValidVolumeName } from '../mapper/names.js';
import { VolumeSession } from './volume-session.js';
import type { Store } from './store.js';
import type { Logger } from '../common/log.js';
import { defaultIdentity, type LockBackendOptions, type LockIdentity, type LockLostError, type LockStore } from '../locks/index.js';

/** How long a write waits for a volume's lock by default (hand-over from another daemon included). */
export const DEFAULT_LOCK_WAIT_MS = 30_000;

/** How long one store listing answers NBD_OPT_LIST (list()). */
const LIST_CACHE_MS = 2_000;

const CAPABILITIES: ExportCapabilities = {
  flush: true, fua: true, trim: true, zero: true, fastZero: true, cache: true,
  multiConn: true, blockStatus: true, rotational: false,
};
const BLOCK_SIZE = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

/** Told when a Volume opens and once it has closed (metrics read its stats: metrics.ts). */
export interface VolumeHooks {
  opened?(name: string, volume: Volume): void;
  closed?(name: string, volume: Volume): void;
  /** A session's lock was lost (metrics, and the daemon's reaction to being fenced). */
  lost?(name: string, err: LockLostError): void;
}

/** What serves one open volume: a session (writable) or a plain read-only Volume. */
export type ServedVolume = VolumeSession | Volume;

/** How writable volumes are locked (volume-session.ts). */
export interface LockSettings {
  /** The unwrapped store the locks live on. */
  store: LockStore;
  identity: LockIdentity;
  /** How long a write waits for the lock (hand-over included), ms. */
  waitMs: number;
  backend?: LockBackendOptions;
}

interface OpenVolume {
  opening: Promise<ServedVolume>;
  /** Set once opening resolved. */
  served?: ServedVolume;
  refs: number;
  /** Date.now() at open, for the "closed" log line. */
  since: number;
}

export class VolumeProvider implements ExportProvider {
  private readonly volumes = new Map<string, OpenVolume>();
  private listing: { at: number; names: Promise<ExportListing[]> } | null = null;

  private readonly locks: LockSettings;

  /**
   * `locks` defaults to locks on `store` itself (its blockers must then be
   * the unwrapped ones: tests on a memory store), this process's identity
   * and a 30 s wait.
   */
  constructor(
    private readonly store: Store,
    private readonly log: Logger,
    private readonly hooks: VolumeHooks = {},
    locks?: LockSettings,
  ) {
    this.locks = locks ?? { store, identity: defaultIdentity(), waitMs: DEFAULT_LOCK_WAIT_MS };
  }

  /**
   * The volumes, for NBD_OPT_LIST. Listing a store is costly (the file
   * store walks every fan-out directory: seconds on a large store) and any
   * client may ask, so one listing serves every request arriving within
   * LIST_CACHE_MS of its start: a new volume shows up at most that late.
   */
  list(): Promise<ExportListing[]> {
    const now = performance.now();
    if (this.listing && now - this.listing.at < LIST_CACHE_MS) return this.listing.names;
    const names = listVolumes(this.store.maps).then((all) => all.map((name) => ({ name })));
    const entry = { at: now, names };
    this.listing = entry;
    // A failed listing is not kept: the next request tries again.
    names.catch(() => { if (this.listing === entry) this.listing = null; });
    return names;
  }

  async open(name: string): Promise<Export | null> {
    // Names from the wire are untrusted: anything invalid is simply unknown.
    if (!isValidVolumeName(name)) return null;
    const held = await this.acquire(name);
    return held && new VolumeExport(held.volume, held.release);
  }

  /**
   * The open volume `name` (opened now if no connection has it open), held
   * open until `release` is called: the admin API snapshots and locks
   * through it, so that a client connecting meanwhile shares it. Null when
   * there is no such volume. The name must be valid.
   */
  async acquire(name: string): Promise<{ volume: ServedVolume; release: () => Promise<void> } | null> {
    let v = this.volumes.get(name);
    if (!v) {
      const entry: OpenVolume = { refs: 0, opening: this.openVolume(name), since: Date.now() };
      entry.opening.then((served) => { entry.served = served; }, () => undefined);
      v = entry;
      this.volumes.set(name, v);
    }
    v.refs++;
    let volume: ServedVolume;
    try {
      volume = await v.opening;
    } catch (err) {
      if (--v.refs === 0 && this.volumes.get(name) === v) this.volumes.delete(name);
      if (err instanceof VolumeNotFoundError) return null;
      throw err;
    }
    let released: Promise<void> | null = null;
    return { volume, release: () => (released ??= this.release(name, v!)) };
  }

  /** The volumes open now, with how many holders (NBD connections, admin operations) each has. */
  openVolumes(): { name: string; connections: number }[] {
    return [...this.volumes].map(([name, v]) => ({ name, connections: v.refs }));
  }

  /** The lock state of every open writable volume (metrics). */
  *lockStates(): Iterable<readonly [string, string]> {
    for (const [name, v] of this.volumes) if (v.served instanceof VolumeSession) yield [name, v.served.lockState];
  }

  /** The volume open under `name` now, if it finished opening (for status and lock queries). */
  async peek(name: string): Promise<ServedVolume | null> {
    const v = this.volumes.get(name);
    return v ? v.opening.catch(() => null) : null;
  }

  private async openVolume(name: string): Promise<ServedVolume> {
    // Read-only until the first write (Volume calls map.beginWrites()), so
    // clients that only look never write metadata.
    // Snapshots and images (READONLY/SNAPSHOT) are served read-only: NBD
    // advertises READ_ONLY, and writes fail with EPERM.
    const map = await VolumeMap.open(this.store.maps, name, { forWrite: false });
    // An image still being built (or whose build was interrupted) is not served.
    try {
      assertComplete(name, map.flags, 'volume');
    } catch (err) {
      await map.close();
      throw err;
    }
    const readOnly = (map.flags & (VolumeFlags.READONLY | VolumeFlags.SNAPSHOT)) !== 0;
    this.log.info(`volume ${name} opened${readOnly ? ' read-only' : ''}`, { volume: name, generation: map.generation, size: map.size });
    if (readOnly) {
      const volume = new Volume(map, this.store.data, true);
      this.hooks.opened?.(name, volume);
      return volume;
    }
    const session = await VolumeSession.open({
      name, maps: this.store.maps, data: this.store.data,
      lockStore: this.locks.store, identity: this.locks.identity, lockWaitMs: this.locks.waitMs, lockBackend: this.locks.backend,
      log: this.log, hooks: this.hooks,
    }, map);
    session.on('lost', (err: LockLostError) => this.hooks.lost?.(name, err));
    return session;
  }

  private async closeVolume(name: string, volume: ServedVolume): Promise<void> {
    if (volume instanceof VolumeSession) return volume.close(); // its hooks run inside
    try {
      await volume.close();
    } finally {
      this.hooks.closed?.(name, volume);
    }
  }

  private async release(name: string, v: OpenVolume): Promise<void> {
    if (--v.refs > 0) return;
    if (this.volumes.get(name) === v) this.volumes.delete(name);
    await this.closeVolume(name, await v.opening);
    this.log.info(`volume ${name} closed`, { volume: name, openMs: Date.now() - v.since });
  }

  /** Number of volumes open now. */
  get openCount(): number {
    return this.volumes.size;
  }

  /**
   * Closes every open volume (after the server stopped using them). A volume
   * that fails to flush is logged and the others still close.
   */
  async close(): Promise<void> {
    const all = [...this.volumes];
    this.volumes.clear();
    await Promise.allSettled(all.map(async ([name, v]) => {
      let volume: ServedVolume;
      try {
        volume = await v.opening;
      } catch {
        return; // never opened: its failure was reported to whoever asked
      }
      try {
        await this.closeVolume(name, volume);
        this.log.info(`volume ${name} closed`, { volume: name, openMs: Date.now() - v.since });
      } catch (err) {
        this.log.error(`volume ${name}: close failed: ${(err as Error).message}`, { volume: name, err });
      }
    }));
  }
}

/** One connection's view of a shared volume. */
class VolumeExport implements Export {
  readonly capabilities = CAPABILITIES;
  readonly blockSize = BLOCK_SIZE;
  private closed: Promise<void> | null = null;

  constructor(private readonly volume: ServedVolume, private readonly onClose: () => Promise<void>) {}

  get name(): string { return this.volume.name; }
  get size(): number { return this.volume.size; }
  get readOnly(): boolean { return this.volume.readOnly; }

  read(offset: number, length: number) { return this.volume.read(offset, length); }
  write(offset: number, data: Buffer, fua: boolean) {
    if (this.volume.readOnly) return this.refuse('write');
    return this.volume.write(offset, data, fua);
  }
  flush() { return this.volume.flush(); }
  trim(offset: number, length: number, fua: boolean) {
    if (this.volume.readOnly) return this.refuse('trim');
    return this.volume.trim(offset, length, fua);
  }
  zero(offset: number, length: number, o: { fua: boolean; noHole: boolean; fastZero: boolean }) {
    if (this.volume.readOnly) return this.refuse('write zeroes');
    return this.volume.zero(offset, length, o);
  }
  blockStatus(offset: number, length: number) { return this.volume.blockStatus(offset, length); }
  cache(offset: number, length: number) { return this.volume.cache(offset, length); }
  close(): Promise<void> {
    this.closed ??= this.onClose();
    return this.closed;
  }

  private refuse(what: string): Promise<never> {
    return Promise.reject(new ExportError('EPERM', `volume ${this.name}: ${what} to a read-only volume (snapshot or image)`));
  }
}
