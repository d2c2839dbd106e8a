/**
 * `archipelago snapshot` and `archipelago clone` (docs/format.md §8).
 *
 * snapshot: with --admin-socket (or $ARCHIPELAGO_ADMIN_SOCKET) it asks the
 * daemon, which quiesces the volume its clients are writing, flushes and
 * snapshots it; a socket where no daemon answers is an error (a mistyped
 * path must not turn into an unsafe offline snapshot). `--offline` works on
 * the store directly, which is only safe when no daemon serves the volume,
 * so it has to be asked for.
 *
 * clone: offline always (it writes one new header and touches nothing the
 * source's readers use).
 */
import type { CommandModule } from 'yargs';
import { snapshotVolume } from '../../mapper/snapshot-create.js';
import { cloneSnapshot, type CloneResult } from '../../mapper/clone-create.js';
import { validateVolumeName } from '../../mapper/names.js';
import { askDaemon } from '../admin-client.js';
import { withVolumeLock } from '../../daemon/offline-lock.js';
import { formatSize, parseSize } from '../sizes.js';
import { printJson, usingStore, withJson, withStore, type JsonArgs, type StoreArgs } from '../common.js';

type Args<T> = T & StoreArgs & JsonArgs;

export const snapshot: CommandModule<object, Args<{ volume: string; name: string; 'admin-socket'?: string; offline: boolean }>> = {
  command: 'snapshot <volume> <name>',
  describe: 'snapshot a volume (read-only, shares its data)',
  builder: (y) => withJson(withStore(y
    .positional('volume', { type: 'string', demandOption: true, describe: 'volume to snapshot' })
    .positional('name', { type: 'string', demandOption: true, describe: 'name of the new snapshot' })
    .option('admin-socket', {
      type: 'string',
      default: process.env.ARCHIPELAGO_ADMIN_SOCKET || undefined,
      describe: 'snapshot through the daemon listening here (safe while clients write); env ARCHIPELAGO_ADMIN_SOCKET. '
        + 'Without it, --offline is required',
    })
    .option('offline', {
      type: 'boolean',
      default: false,
      describe: 'snapshot on the store directly, without a daemon: only safe when no daemon serves the volume',
    })
    .epilogue('A volume a daemon serves must be snapshotted through that daemon (--admin-socket).'))) as never,
  handler: async (a) => {
    validateVolumeName(a.volume);
    validateVolumeName(a.name);
    // Flag, environment or the config file's admin-socket (common.ts resolves them).
    const socket = a.settings.values.adminSocket;
    if (socket && !a.offline) {
      const reply = await askDaemon(socket, { op: 'snapshot', volume: a.volume, name: a.name },
        'is the daemon running? use --offline only when no daemon serves the volume');
      report(a.json, { volume: a.volume, name: a.name, volumeId: reply.volumeId as string, via: 'daemon' });
      return;
    }
    if (!a.offline) {
      throw Object.assign(new Error('snapshot: give --admin-socket PATH of the daemon serving the volume, '
        + 'or --offline when no daemon serves it'), { code: 'ARCH_E_USAGE' });
    }
    const r = await usingStore(a.store, (s) => withVolumeLock(s, a.volume, () => snapshotVolume(s.maps, a.volume, a.name)));
    report(a.json, { volume: a.volume, name: a.name, volumeId: r.volumeId, via: 'offline' });
  },
};

function report(json: boolean, r: { volume: string; name: string; volumeId: string; via: 'daemon' | 'offline' }): void {
  if (json) printJson(r);
  else process.stdout.write(`created snapshot ${r.name} of volume ${r.volume}${r.via === 'daemon' ? ' (through the daemon)' : ''}\n`);
}

/** Clones snapshot `source` as `name` and prints the result; shared by `clone` and `create --from`. */
export async function cloneCommand(a: { store: string; json: boolean }, source: string, name: string, size: string | undefined): Promise<void> {
  validateVolumeName(source);
  validateVolumeName(name);
  const bytes = size === undefined ? undefined : parseSize(size);
  const r: CloneResult = await usingStore(a.store, (s) => cloneSnapshot(s.maps, source, name, { size: bytes }));
  if (a.json) printJson({ name, source, volumeId: r.volumeId, size: r.size, sources: r.sourceCount });
  else process.stdout.write(`created volume ${name}: clone of ${source}, ${formatSize(r.size)}\n`);
}

export const clone: CommandModule<object, Args<{ snapshot: string; new: string; size?: string }>> = {
  command: 'clone <snapshot> <new>',
  describe: 'create a writable volume from a snapshot (or read-only image)',
  builder: (y) => withJson(withStore(y
    .positional('snapshot', { type: 'string', demandOption: true, describe: 'snapshot or image to clone' })
    .positional('new', { type: 'string', demandOption: true, describe: 'name of the new volume' })
    .option('size', { type: 'string', describe: 'size of the clone, e.g. 20G (default: the snapshot\'s; never smaller)' }))) as never,
  handler: (a) => cloneCommand(a, a.snapshot, a.new, a.size),
};
