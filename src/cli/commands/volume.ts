/**
 * Offline volume commands on a store: create, list, info, remove, rename,
 * resize. They work on the maps directly (the daemon serves what they make at
 * once; it opens volumes on demand).
 */
import type { CommandModule } from 'yargs';
import { VolumeMap, listVolumes, removeVolume, renameVolume, DEFAULT_OBJECT_SIZE } from '../../mapper/volume-map.js';
import { validateVolumeName } from '../../mapper/names.js';
import { VolumeFlags } from '../../mapper/header-format.js';
import { UsageError } from '../../mapper/errors.js';
import { allocatedUsage, volumeUsage } from '../../mapper/volume-usage.js';
import { MapFormatError } from '../../mapper/errors.js';
import { cloneCommand } from './snapshot.js';
import { lockOwnerOf, withVolumeLock } from '../../daemon/offline-lock.js';
import { describeHolder } from '../../locks/index.js';
import { formatSize, parseSize } from '../sizes.js';
import { printJson, usingStore, withJson, withStore, type JsonArgs, type StoreArgs } from '../common.js';

type Args<T> = T & StoreArgs & JsonArgs;

export const create: CommandModule<object, Args<{ name: string; size?: string; 'object-size'?: string; from?: string }>> = {
  command: 'create <name>',
  describe: 'create an empty volume, or a clone of a snapshot (--from)',
  builder: (y) => withJson(withStore(y
    .positional('name', { type: 'string', demandOption: true, describe: 'volume name' })
    .option('size', { type: 'string', describe: 'size, e.g. 10G (required unless --from)' })
    .option('object-size', { type: 'string', describe: `object size, a power of two from 64K to 64M (default ${formatSize(DEFAULT_OBJECT_SIZE)})` })
    .option('from', { type: 'string', describe: 'clone this snapshot (same as `clone SNAPSHOT NAME`)' }))) as never,
  handler: async (a) => {
    if (a.from !== undefined) {
      if (a['object-size'] !== undefined) throw new UsageError('create --from: a clone keeps its snapshot\'s object size (drop --object-size)');
      await cloneCommand(a, a.from, a.name, a.size);
      return;
    }
    validateVolumeName(a.name);
    if (a.size === undefined) throw new UsageError('create: --size is required (or --from SNAPSHOT)');
    const size = parseSize(a.size);
    const objectSize = parseSize(a['object-size'] ?? formatSize(DEFAULT_OBJECT_SIZE));
    await usingStore(a.store, async (s) => {
      const map = await VolumeMap.create(s.maps, a.name, { size, objectSize });
      const info = describe(map);
      await map.close();
      if (a.json) printJson(info);
      else process.stdout.write(`created volume ${a.name}: ${formatSize(size)}, objects of ${formatSize(objectSize)}\n`);
    });
  },
};

export const list: CommandModule<object, Args<object>> = {
  command: 'list',
  describe: 'list volumes (--json adds allocatedBytes, an upper bound; not exclusiveBytes, which needs '
    + 'reading every related volume\'s map: see `info`)',
  builder: (y) => withJson(withStore(y)) as never,
  handler: async (a) => {
    await usingStore(a.store, async (s) => {
      const names = await listVolumes(s.maps);
      if (a.json) {
        const rows = [];
        for (const name of names) {
          rows.push({ ...await infoOf(s.maps, name), ...await allocatedUsage(s.maps, name) });
        }
        printJson(rows);
      } else {
        for (const name of names) process.stdout.write(`${name}\n`);
      }
    });
  },
};

/**
 * Usage for `info`: damaged metadata must not hide what the header says.
 * A corrupt map of another volume makes exclusive bytes unknown (that
 * volume might share our objects); a corrupt chunk of our own makes all
 * usage unknown. The reason is shown instead.
 */
async function usageOf(maps: Parameters<typeof volumeUsage>[0], name: string) {
  const unknown = (err: MapFormatError) => `unreadable map: ${err.message}`;
  try {
    return { ...await volumeUsage(maps, name), usageUnknownBecause: null as string | null };
  } catch (err) {
    if (!(err instanceof MapFormatError) || err.objectName === `vol.${name}`) throw err;
    try {
      return { ...await allocatedUsage(maps, name), exclusiveObjects: null, exclusiveBytes: null, usageUnknownBecause: unknown(err) };
    } catch (err2) {
      if (!(err2 instanceof MapFormatError)) throw err2;
      return { allocatedObjects: null, allocatedBytes: null, exclusiveObjects: null, exclusiveBytes: null, usageUnknownBecause: unknown(err2) };
    }
  }
}

export const info: CommandModule<object, Args<{ name: string }>> = {
  command: 'info <name>',
  describe: 'show a volume, with its allocated bytes and the bytes no other volume shares (exclusive; '
    + 'both count whole objects, an upper bound); reads the maps of its snapshots, clones and origins',
  builder: (y) => withJson(withStore(y.positional('name', { type: 'string', demandOption: true }))) as never,
  handler: async (a) => {
    validateVolumeName(a.name);
    await usingStore(a.store, async (s) => {
      const base = await infoOf(s.maps, a.name);
      const i = { ...base, ...await usageOf(s.maps, a.name), lock: await lockOwnerOf(s, base.id) };
      if (a.json) printJson(i);
      else {
        process.stdout.write([
          `name:         ${i.name}`,
          `id:           ${i.id}`,
          `size:         ${formatSize(i.size)} (${i.size} bytes)`,
          `object size:  ${formatSize(i.objectSize)}`,
          `generation:   ${i.generation}`,
          `map chunks:   ${i.mapChunks}`,
          i.allocatedBytes === null
            ? `allocated:    unknown (${i.usageUnknownBecause})`
            : `allocated:    ${formatSize(i.allocatedBytes)} (${i.allocatedObjects} objects, at most ${i.allocatedBytes} bytes)`,
          i.exclusiveBytes === null
            ? `exclusive:    unknown (${i.usageUnknownBecause})`
            : `exclusive:    ${formatSize(i.exclusiveBytes)} (${i.exclusiveObjects} objects no other volume shares)`,
          `kind:         ${i.kind}`,
          `created:      ${i.created}`,
          ...(i.parent ? [`parent:       ${i.parent}`] : []),
          `lock:         ${i.lock ? `held by ${describeHolder(i.lock)} since ${new Date(i.lock.since).toISOString()}` : 'not held'}`,
        ].join('\n') + '\n');
      }
    });
  },
};

export const remove: CommandModule<object, Args<{ name: string }>> = {
  command: 'remove <name>',
  aliases: ['rm'],
  describe: 'remove a volume and the objects only it uses',
  builder: (y) => withJson(withStore(y.positional('name', { type: 'string', demandOption: true }))) as never,
  handler: async (a) => {
    validateVolumeName(a.name);
    await usingStore(a.store, async (s) => {
      const r = await withVolumeLock(s, a.name, () => removeVolume(s.maps, a.name), { removesVolume: true });
      if (a.json) printJson({ name: a.name, ...r });
      else process.stdout.write(`removed volume ${a.name} (${r.removedObjects} objects deleted${r.objectsKeptBecause ? `; objects kept: ${r.objectsKeptBecause}` : ''})\n`);
    });
  },
};

export const rename: CommandModule<object, Args<{ old: string; new: string }>> = {
  command: 'rename <old> <new>',
  describe: 'rename a volume',
  builder: (y) => withStore(y.positional('old', { type: 'string', demandOption: true }).positional('new', { type: 'string', demandOption: true })) as never,
  handler: async (a) => {
    validateVolumeName(a.old);
    validateVolumeName(a.new);
    await usingStore(a.store, (s) => withVolumeLock(s, a.old, () => renameVolume(s.maps, a.old, a.new)));
    process.stdout.write(`renamed volume ${a.old} to ${a.new}\n`);
  },
};

export const resize: CommandModule<object, Args<{ name: string; size: string }>> = {
  command: 'resize <name>',
  describe: 'grow a volume',
  builder: (y) => withStore(y.positional('name', { type: 'string', demandOption: true }).option('size', { type: 'string', demandOption: true, describe: 'new size, e.g. 20G' })) as never,
  handler: async (a) => {
    validateVolumeName(a.name);
    const size = parseSize(a.size);
    await usingStore(a.store, (s) => withVolumeLock(s, a.name, async () => {
      const map = await VolumeMap.open(s.maps, a.name, { forWrite: true });
      try {
        await map.resize(size);
      } finally {
        await map.close();
      }
    }));
    process.stdout.write(`resized volume ${a.name} to ${formatSize(size)}\n`);
  },
};

interface VolumeInfo {
  name: string;
  /** From the header flags: SNAPSHOT → snapshot, READONLY or IMAGE → image, else volume. */
  kind: 'volume' | 'snapshot' | 'image';
  id: string;
  size: number;
  objectSize: number;
  generation: number;
  mapChunks: number;
  created: string;
  parent: string | null;
}

function describe(map: VolumeMap): VolumeInfo {
  return {
    name: map.name,
    kind: (map.flags & VolumeFlags.SNAPSHOT) !== 0 ? 'snapshot'
      : (map.flags & (VolumeFlags.READONLY | VolumeFlags.IMAGE)) !== 0 ? 'image' : 'volume',
    id: map.id,
    size: map.size,
    objectSize: map.objectSize,
    generation: map.generation,
    mapChunks: map.chunkCount,
    created: map.createdAt.toISOString(),
    parent: map.parent ? map.parent.name : null,
  };
}

async function infoOf(maps: Parameters<typeof VolumeMap.open>[0], name: string): Promise<VolumeInfo> {
  const map = await VolumeMap.open(maps, name, { forWrite: false });
  try {
    return describe(map);
  } finally {
    await map.close();
  }
}
