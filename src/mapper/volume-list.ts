/**
 * Listing volumes: every `vol.<name>` header that is the live header of its
 * volume. A header left behind by a committed but unfinished rename (see
 * volume-rename.ts) is not listed; a header that cannot be decoded IS listed,
 * so the operator sees it (opening or `info` then reports the corruption).
 *
 * Read-only: listing never writes or removes anything. Imports the blocker
 * contract and the mapper's own modules; nothing above.
 */
import type { Blocker } from '../blockers/blocker.js';
import { MapFormatError, VolumeNotFoundError } from './errors.js';
import { loadLiveHeader } from './header-store.js';
import { HEADER_PREFIX, parseHeaderObjectName } from './names.js';

/** Header reads in flight at once while listing or scanning. */
export const HEADER_SCAN_CONCURRENCY = 16;

/** Names of all volumes, sorted. */
export async function listVolumes(blocker: Blocker): Promise<string[]> {
  const names = await listHeaderNames(blocker);
  const live = await mapLimit(names, HEADER_SCAN_CONCURRENCY, async (name) => {
    try {
      await loadLiveHeader(blocker, name, { repair: false });
      return name;
    } catch (err) {
      if (err instanceof VolumeNotFoundError) return null;
      if (err instanceof MapFormatError) return name;
      throw err;
    }
  });
  return live.filter((n): n is string => n !== null).sort();
}

/** Every name with a `vol.` object, live or not, unsorted. Objects with invalid names are skipped. */
export async function listHeaderNames(blocker: Blocker): Promise<string[]> {
  const names: string[] = [];
  for await (const objectName of blocker.list(HEADER_PREFIX)) {
    const name = parseHeaderObjectName(objectName);
    if (name !== null) names.push(name);
  }
  return names;
}

/** Runs `fn` over `items` with at most `limit` calls in flight; results in input order; first error wins. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}
