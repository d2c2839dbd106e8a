/**
 * Opening an object store from its URL:
 *
 *   file:/path   (or a plain path) — the file blocker, maps and data in one store
 *   rados:DATA_POOL[?maps=MAP_POOL][&conf=/etc/ceph/ceph.conf][&id=archipelago][&op_timeout=30]
 *                — Ceph RADOS: data objects in DATA_POOL, map headers and
 *                  chunks in MAP_POOL (default: DATA_POOL), connecting as
 *                  client.ID with the cluster named by the conf file; every
 *                  RADOS operation fails ETIMEDOUT after op_timeout seconds
 *                  (0: wait forever, librados' default — not recommended).
 */
import type { Blocker } from '../blockers/blocker.js';
import { openFileBlocker } from '../blockers/file.js';
import { RadosBlocker } from '../blockers/rados/blocker.js';
import { loadRados, RadosError, type RadosCluster } from '../blockers/rados/binding.js';
import type { Logger } from '../common/log.js';

export interface Store {
  url: string;
  /** Where volume headers and map chunks live. */
  maps: Blocker;
  /** Where data objects live (may be the same blocker). */
  data: Blocker;
  /** The RADOS connection, for locks and fencing (null on a file store). */
  rados?: RadosCluster | null;
  close(): Promise<void>;
}

export const DEFAULT_STORE = 'file:/var/lib/archipelago/store';

/** Default bound on any one RADOS operation, in seconds. */
export const DEFAULT_RADOS_OP_TIMEOUT = 30;

export class StoreUrlError extends Error {
  readonly code = 'ARCH_E_USAGE';
}

export interface RadosStoreUrl {
  dataPool: string;
  mapPool: string;
  conf?: string;
  id?: string;
  opTimeoutSec: number;
}

export async function openStore(url: string, log?: Logger): Promise<Store> {
  if (url.startsWith('rados:')) return openRadosStore(url, parseRadosUrl(url), log);
  const path = url.startsWith('file:') ? url.slice('file:'.length) : url;
  if (path === '' || url.includes('://')) {
    throw new StoreUrlError(
      `store ${JSON.stringify(url)}: expected file:/path/to/store or rados:DATA_POOL?maps=MAP_POOL&conf=CEPH_CONF&id=USER`,
    );
  }
  const blocker = await openFileBlocker(path, { log });
  return { url, maps: blocker, data: blocker, rados: null, close: () => blocker.close() };
}

const RADOS_PARAMS = new Set(['maps', 'conf', 'id', 'op_timeout']);
/** Ceph pool names: anything printable; we refuse only what would break the URL or librados. */
const POOL_NAME = /^[^\0/?&=\s]{1,255}$/;

/** Parses a rados: store URL; throws StoreUrlError naming what is wrong. */
export function parseRadosUrl(url: string): RadosStoreUrl {
  const body = url.slice('rados:'.length);
  const q = body.indexOf('?');
  const dataPool = decodeURIComponent(q < 0 ? body : body.slice(0, q));
  const params = new URLSearchParams(q < 0 ? '' : body.slice(q + 1));
  const bad = (why: string) => new StoreUrlError(`store ${JSON.stringify(url)}: ${why}`);
  if (!POOL_NAME.test(dataPool)) throw bad('expected rados:DATA_POOL[?maps=MAP_POOL&conf=CEPH_CONF&id=USER&op_timeout=SECONDS]');
  for (const key of params.keys()) {
    if (!RADOS_PARAMS.has(key)) throw bad(`unknown parameter ${JSON.stringify(key)} (known: ${[...RADOS_PARAMS].join(', ')})`);
  }
  const mapPool = params.get('maps') ?? dataPool;
  if (!POOL_NAME.test(mapPool)) throw bad(`maps=${JSON.stringify(mapPool)} is not a pool name`);
  const id = params.get('id') ?? undefined;
  if (id !== undefined && (!/^[A-Za-z0-9._-]{1,64}$/.test(id) || id.startsWith('client.'))) throw bad(`id=${JSON.stringify(id)}: expected a cephx user name without "client."`);
  const timeout = params.get('op_timeout');
  const opTimeoutSec = timeout === null ? DEFAULT_RADOS_OP_TIMEOUT : Number(timeout);
  if (!Number.isInteger(opTimeoutSec) || opTimeoutSec < 0) throw bad(`op_timeout=${JSON.stringify(timeout)}: expected whole seconds ≥ 0`);
  return { dataPool, mapPool, conf: params.get('conf') ?? undefined, id, opTimeoutSec };
}

async function openRadosStore(url: string, u: RadosStoreUrl, log?: Logger): Promise<Store> {
  const rados = loadRados();
  const timeout = String(u.opTimeoutSec);
  // Bound connecting too (librados waits 300 s by default).
  const config: Record<string, string> =
    u.opTimeoutSec > 0 ? { rados_osd_op_timeout: timeout, rados_mon_op_timeout: timeout, client_mount_timeout: timeout } : {};
  let cluster: RadosCluster;
  try {
    cluster = await rados.connect({ conf: u.conf, id: u.id, config });
  } catch (err) {
    throw new Error(`store ${url}: cannot connect to the Ceph cluster${u.conf ? ` of ${u.conf}` : ''}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  const opened: RadosBlocker[] = [];
  try {
    for (const pool of new Set([u.dataPool, u.mapPool])) {
      try {
        opened.push(new RadosBlocker(await cluster.openPool(pool), cluster));
      } catch (err) {
        const missing = err instanceof RadosError && err.errno === 2;
        throw new Error(`store ${url}: ${missing ? `pool ${JSON.stringify(pool)} does not exist` : (err as Error).message}`, {
          cause: err,
        });
      }
    }
  } catch (err) {
    await Promise.allSettled(opened.map((b) => b.close()));
    await cluster.shutdown();
    throw err;
  }
  const data = opened[0]!;
  const maps = opened.find((b) => b.pool === u.mapPool)!;
  log?.info(`connected to RADOS as client.${cluster.instanceId()}: data pool ${u.dataPool}, map pool ${u.mapPool}`);
  let closing: Promise<void> | undefined;
  return {
    url,
    maps,
    data,
    rados: cluster,
    close: () =>
      (closing ??= (async () => {
        await Promise.allSettled(opened.map((b) => b.close()));
        await cluster.shutdown();
      })()),
  };
}
