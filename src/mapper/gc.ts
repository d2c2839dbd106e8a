/**
 * Garbage collection (STYLE.md habit 8: one file per verb, the machine drawn):
 * a mark-and-sweep over every map in the store, safe while daemons write
 * (docs/format.md §12). Names are unique forever (DESIGN.md §3), so an object
 * that no map reaches, and that no writer can still be about to map, is
 * garbage for good.
 *
 *   list vol.* (1st) ──▶ mark: read every header, ──▶ list m.*, d.* ──▶ list vol.* (2nd) ──▶ sweep ──▶ result
 *                        its chunks one at a time,     (candidates:       read every header   (bounded
 *                        every entry's object          not marked)        again              concurrency)
 *                          *                                                *
 *                          * a header or chunk is corrupt or unreadable      * corrupt
 *                          ▼                                                ▼
 *                        abort: MapFormatError, nothing deleted           abort, nothing deleted
 *
 * An unmarked `m.<X>.<g>.*` or `d.<X>.<g>.*` is deleted only when
 *
 *   - X is not an id (own or source) of a header that the second listing
 *     shows and the mark did not read (created, cloned, snapshotted or renamed
 *     while we ran: we did not mark what it reaches, so we keep all of it), and
 *   - X has no writer among the marked headers (a removed volume), or g is
 *     older than G, the generation X's writer header had when it was marked.
 *     A writer names new objects and chunks with its current generation and
 *     writes them BEFORE the map that points at them, so objects of
 *     generation G (and later) may be in flight. Generations are persisted
 *     before use, so a writer never names anything older than the stored
 *     header's generation, with one exception: VolumeMap.markShared lets a
 *     write that named its object just before a snapshot's bump commit just
 *     after it. That happens only if the snapshot's caller did not quiesce
 *     the volume's I/O, which docs/format.md §8 already requires (without it
 *     the snapshot itself could change under an in-place write).
 *
 * Content objects `sha256-<hex>` (images, image-create.ts) are marked through
 * the kind-2 entries of every chunk read, and an unreferenced one is deleted
 * only when no header of either listing is INCOMPLETE (an image being built
 * may have just found it and not yet mapped it) and the second listing found
 * no header the mark missed. They have no generation to tell in-flight from
 * garbage, so the whole class waits for a quiet run.
 *
 * The writer of X is the header whose volume id is X (never a snapshot: a
 * snapshot has its own id and creates nothing). During a rename two headers
 * share the id; the larger generation counts.
 *
 * Memory: the names of every referenced object, plus the unreferenced names
 * listed, plus one decoded chunk per header being marked (HEADER_SCAN_CONCURRENCY).
 * A store with 10^8 referenced objects needs several GiB; a later version can
 * mark into a Bloom filter or an on-disk sorted set.
 */
import type { Blocker } from '../blockers/blocker.js';
import type { Logger } from '../common/log.js';
import { CHUNK_ENTRIES, decodeChunkTable } from './chunk-format.js';
import { EntryKind, entryGeneration, entryHashIndex, entryKind, entrySource } from './entry.js';
import { MapFormatError, VolumeNotFoundError } from './errors.js';
import { MAX_GENERATION, VolumeFlags, type VolumeHeader } from './header-format.js';
import { isNotFound, readHeader, tryReadHeader } from './header-store.js';
import {
  CAS_PREFIX, CHUNK_PREFIX, DATA_PREFIX, chunkObjectName, dataObjectName,
  parseChunkObjectName, parseDataObjectName,
} from './names.js';
import { HEADER_SCAN_CONCURRENCY, listHeaderNames, mapLimit } from './volume-list.js';

const CAS_NAME = /^sha256-[0-9a-f]{64}$/;

/** Deletions (and their stats) in flight at once. */
export const SWEEP_CONCURRENCY = 32;

export interface GcOptions {
  /** Report what would be freed, delete nothing. */
  dryRun: boolean;
  log?: Logger;
  /** Where data objects live, when not in `blocker` (Store.data). */
  data?: Blocker;
}

export interface GcResult {
  /** Headers marked (the first listing, minus those removed while we ran). */
  scannedHeaders: number;
  /** Distinct chunks and data objects the marked headers reach. */
  referencedObjects: number;
  /**
   * Why no `sha256-` object was swept this run (an image being built, or a
   * header GC did not mark), or null when unreferenced ones were.
   */
  contentKeptBecause: string | null;
  /** Objects deleted (dry run: that would be deleted). */
  sweptObjects: number;
  sweptBytes: number;
  /** Unreferenced objects kept because a writer may still be about to map them (generation ≥ G). */
  keptYoung: number;
  /** Unreferenced objects kept because their volume id belongs to a header created while GC ran. */
  keptNew: number;
  /** Deletions that failed (the objects stay for the next run). */
  errors: string[];
}

interface Mark {
  /** `<name>/<volume id>` of every header marked completely. */
  marked: Set<string>;
  /** Writer volume id → its header's generation when marked (max over headers with that id). */
  writerGeneration: Map<string, number>;
  /** Names of every chunk and data object reached. */
  referenced: Set<string>;
  /** Chunks already read and marked (a snapshot shares its origin's). */
  loadedChunks: Set<string>;
  /** Names of headers with the INCOMPLETE flag (an image being built). */
  incomplete: string[];
}

interface Candidate {
  name: string;
  volumeId: string;
  generation: number;
  blocker: Blocker;
}

/** Runs one collection over the store; see the file comment. Rejects, deleting nothing, when the mark is incomplete. */
export async function collectGarbage(blocker: Blocker, options: GcOptions): Promise<GcResult> {
  const data = options.data ?? blocker;
  const log = options.log;
  const mark: Mark = {
    marked: new Set(), writerGeneration: new Map(), referenced: new Set(), loadedChunks: new Set(), incomplete: [],
  };

  const first = await listHeaderNames(blocker);
  await mapLimit(first, HEADER_SCAN_CONCURRENCY, (name) => markHeader(blocker, name, mark));
  log?.debug('gc: marked', { headers: mark.marked.size, referenced: mark.referenced.size });

  const candidates: Candidate[] = [];
  await listCandidates(blocker, CHUNK_PREFIX, (n) => parseChunkObjectName(n), mark, candidates);
  await listCandidates(data, DATA_PREFIX, (n) => parseDataObjectName(n), mark, candidates);
  const content: string[] = [];
  for await (const name of data.list(CAS_PREFIX)) {
    if (!mark.referenced.has(name) && CAS_NAME.test(name)) content.push(name);
  }

  const newIds = await idsOfUnmarkedHeaders(blocker, mark);
  // Content objects carry no volume id or generation: an image being built
  // may be about to reference any of them (it stats one, finds it, and maps
  // it), so none is swept while any header is INCOMPLETE, nor when a header
  // appeared that the mark did not read.
  const contentKeptBecause = mark.incomplete.length > 0
    ? `image${mark.incomplete.length > 1 ? 's' : ''} being built: ${mark.incomplete.join(', ')}`
    : newIds.size > 0 ? 'volumes created while gc ran' : null;

  const result: GcResult = {
    scannedHeaders: mark.marked.size,
    referencedObjects: mark.referenced.size,
    sweptObjects: 0,
    sweptBytes: 0,
    keptYoung: 0,
    keptNew: 0,
    contentKeptBecause,
    errors: [],
  };
  const doomed: Candidate[] = [];
  for (const c of candidates) {
    if (newIds.has(c.volumeId)) {
      result.keptNew++;
      continue;
    }
    const g = mark.writerGeneration.get(c.volumeId);
    if (g !== undefined && c.generation >= g) {
      result.keptYoung++;
      continue;
    }
    doomed.push(c);
  }
  if (contentKeptBecause === null) {
    for (const name of content) doomed.push({ name, volumeId: '', generation: 0, blocker: data });
  }

  await mapLimit(doomed, SWEEP_CONCURRENCY, async (c) => {
    try {
      const { size } = await c.blocker.stat(c.name);
      if (!options.dryRun) await c.blocker.remove(c.name);
      result.sweptObjects++;
      result.sweptBytes += size;
    } catch (err) {
      if (isNotFound(err)) return; // deleted by someone else meanwhile (a volume removal)
      result.errors.push(`${c.name}: ${(err as Error).message}`);
    }
  });
  log?.info(options.dryRun ? 'gc: dry run' : 'gc: done', { ...result, errors: result.errors.length });
  return result;
}

/** Marks header `name` and everything it reaches; a header removed meanwhile is skipped. */
async function markHeader(blocker: Blocker, name: string, mark: Mark): Promise<void> {
  const h = await headerOrGone(blocker, name);
  if (h === null) return;
  const limits = { sourceCount: h.sources.length, writerSource: h.writerSource, generation: MAX_GENERATION };
  for (const ref of h.chunkRefs) {
    const volumeId = h.sources[ref.source]!;
    const chunkName = chunkObjectName(volumeId, ref.generation, ref.chunkIndex);
    mark.referenced.add(chunkName);
    if (mark.loadedChunks.has(chunkName)) continue;
    let buf: Buffer;
    try {
      buf = await blocker.readFull(chunkName);
    } catch (err) {
      if (!isNotFound(err)) throw aborted(err);
      // Only a removal deletes chunks, and only after the header is gone.
      const now = await tryReadHeader(blocker, name).catch((e: unknown) => { throw aborted(e); });
      if (now === null || now.volumeId !== h.volumeId) return; // removed (or renamed): the 2nd listing decides
      throw aborted(new MapFormatError(chunkName, `missing, but "${name}" references it`));
    }
    let entries: Float64Array;
    let hashes: string[];
    try {
      ({ entries, hashes } = decodeChunkTable(buf, chunkName, { volumeId, generation: ref.generation, chunkIndex: ref.chunkIndex }, limits));
    } catch (err) {
      throw aborted(err);
    }
    const base = ref.chunkIndex * CHUNK_ENTRIES;
    for (let i = 0; i < CHUNK_ENTRIES; i++) {
      const e = entries[i]!;
      if (e === 0) continue;
      if (entryKind(e) === EntryKind.CONTENT) {
        mark.referenced.add(CAS_PREFIX + hashes[entryHashIndex(e)]!);
        continue;
      }
      mark.referenced.add(dataObjectName(h.sources[entrySource(e)]!, entryGeneration(e), base + i));
    }
    mark.loadedChunks.add(chunkName);
  }
  mark.marked.add(`${name}/${h.volumeId}`);
  if ((h.flags & VolumeFlags.INCOMPLETE) !== 0) mark.incomplete.push(name);
  if ((h.flags & VolumeFlags.SNAPSHOT) === 0) {
    const g = mark.writerGeneration.get(h.volumeId) ?? 0;
    mark.writerGeneration.set(h.volumeId, Math.max(g, h.generation));
  }
}

/** Adds every object under `prefix` that the mark did not reach; names that do not parse are never touched. */
async function listCandidates(
  blocker: Blocker, prefix: string, parse: (name: string) => { volumeId: string; generation: number } | null,
  mark: Mark, out: Candidate[],
): Promise<void> {
  for await (const name of blocker.list(prefix)) {
    if (mark.referenced.has(name)) continue;
    const parts = parse(name);
    if (parts === null) continue;
    out.push({ name, volumeId: parts.volumeId, generation: parts.generation, blocker });
  }
}

/**
 * The second listing: every volume id (own and sources) of a header that the
 * mark did not read completely. It runs after the objects were listed, so any
 * header that could have created or shared a listed object we did not mark is
 * in it.
 */
async function idsOfUnmarkedHeaders(blocker: Blocker, mark: Mark): Promise<Set<string>> {
  const ids = new Set<string>();
  const names = await listHeaderNames(blocker);
  await mapLimit(names, HEADER_SCAN_CONCURRENCY, async (name) => {
    const h = await headerOrGone(blocker, name);
    if (h === null) return;
    if ((h.flags & VolumeFlags.INCOMPLETE) !== 0 && !mark.incomplete.includes(name)) mark.incomplete.push(name);
    if (mark.marked.has(`${name}/${h.volumeId}`)) return;
    ids.add(h.volumeId);
    for (const id of h.sources) ids.add(id);
  });
  return ids;
}

/** The error that stops a collection before anything is deleted. */
/** Header `name`, or null when it was removed meanwhile; anything unreadable aborts the run. */
async function headerOrGone(blocker: Blocker, name: string): Promise<VolumeHeader | null> {
  try {
    return await readHeader(blocker, name);
  } catch (err) {
    if (err instanceof VolumeNotFoundError) return null;
    throw aborted(err);
  }
}

function aborted(err: unknown): Error {
  if (err instanceof MapFormatError) {
    return new MapFormatError(err.objectName, `${err.message.replace(/^map object "[^"]*": /, '')} `
      + '(garbage collection aborted, nothing deleted)', { cause: err });
  }
  return err as Error;
}
