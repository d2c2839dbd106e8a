/**
 * Opening an object store from its URL:
 *   file:/path   (or a plain path) — the file blocker, maps and data in one store
 *   rados:...    — Ceph RADOS (not in this build yet)
 */
import type { Blocker } from '../blockers/blocker.js';
import { openFileBlocker } from '../blockers/file.js';
import type { Logger } from '../common/log.js';

export interface Store {
  url: string;
  /** Where volume headers and map chunks live. */
  maps: Blocker;
  /** Where data objects live (may be the same blocker). */
  data: Blocker;
  close(): Promise<void>;
}

export const DEFAULT_STORE = 'file:/var/lib/archipelago/store';

export class StoreUrlError extends Error {
  readonly code = 'ARCH_E_USAGE';
}

export async function openStore(url: string, log?: Logger): Promise<Store> {
  if (url.startsWith('rados:')) {
    throw new StoreUrlError(`store ${url}: the RADOS backend is not available in this build yet`);
  }
  const path = url.startsWith('file:') ? url.slice('file:'.length) : url;
  if (path === '' || url.includes('://')) {
    throw new StoreUrlError(`store ${JSON.stringify(url)}: expected file:/absolute/or/relative/path`);
  }
  const blocker = await openFileBlocker(path, { log });
  return { url, maps: blocker, data: blocker, close: () => blocker.close() };
}
