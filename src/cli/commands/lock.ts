/**
 * Volume locks from the command line (docs/locks.md "Operating"):
 *
 *   lock V / unlock V     the local daemon takes V's lock now and keeps it, refusing
 *                         hand-over requests, until unlock (an operator holding a volume)
 *   open V / close V      the local daemon takes V's lock ahead of the first write and
 *                         keeps V open until close; hand-over requests are still
 *                         honoured (live migration works) — Archipelago's vlmc open/close
 *   break-lock V          offline: fence the holder and break its lock, for a holder
 *                         known dead (RADOS: blocklisted first; files: only once its
 *                         lease has run out, unless the holder answers)
 *
 * lock/unlock/open/close talk to the daemon's admin socket (--admin-socket,
 * $ARCHIPELAGO_ADMIN_SOCKET or the config file's admin-socket); the lock
 * belongs to that daemon, which lives on after this command exits.
 */
import type { CommandModule } from 'yargs';
import { validateVolumeName } from '../../mapper/names.js';
import { volumeIdOf } from '../../daemon/offline-lock.js';
import { askDaemon } from '../admin-client.js';
import { createVolumeLock, defaultIdentity, describeHolder, type LockOwner } from '../../locks/index.js';
import { printJson, usingStore, withJson, withStore, type JsonArgs, type StoreArgs } from '../common.js';

type Args<T> = T & StoreArgs & JsonArgs;
type AdminOp = 'lock' | 'unlock' | 'open' | 'close';

const DESCRIBE: Record<AdminOp, string> = {
  lock: 'make the local daemon take a volume\'s lock now and keep it, refusing hand-overs, until unlock',
  unlock: 'make the local daemon persist and release a volume\'s lock (after lock or open)',
  open: 'make the local daemon take a volume\'s lock ahead of the first write and keep the volume open until close',
  close: 'make the local daemon persist a volume, release its lock and stop keeping it open (after open)',
};

/** The admin socket from the settings (flag > environment > config file), or a usage error. */
export function adminSocketOf(a: StoreArgs, what: string): string {
  const socket = a.settings.values.adminSocket;
  if (!socket) {
    throw Object.assign(new Error(`${what}: needs the daemon's admin socket: --admin-socket PATH, `
      + 'ARCHIPELAGO_ADMIN_SOCKET, or admin-socket in the config file'), { code: 'ARCH_E_USAGE' });
  }
  return socket;
}

function adminCommand(op: AdminOp): CommandModule<object, Args<{ volume: string; 'admin-socket'?: string }>> {
  return {
    command: `${op} <volume>`,
    describe: DESCRIBE[op],
    builder: (y) => withJson(withStore(y
      .positional('volume', { type: 'string', demandOption: true })
      .option('admin-socket', { type: 'string', describe: 'the daemon\'s admin socket; env ARCHIPELAGO_ADMIN_SOCKET; default from the config file' }))) as never,
    handler: async (a) => {
      validateVolumeName(a.volume);
      const reply = await askDaemon(adminSocketOf(a, op), { op, volume: a.volume });
      if (a.json) {
        printJson(reply);
        return;
      }
      const owner = reply.owner as LockOwner | null | undefined;
      const line = op === 'lock' || op === 'open'
        ? `${op === 'lock' ? 'locked' : 'opened'} volume ${a.volume}: held by ${describeHolder(owner ?? null)}`
        : `${op === 'unlock' ? 'unlocked' : 'closed'} volume ${a.volume}${reply.held ? '' : ' (the daemon did not hold its lock)'}`;
      process.stdout.write(line + '\n');
    },
  };
}

export const lock = adminCommand('lock');
export const unlock = adminCommand('unlock');
export const open = adminCommand('open');
export const close = adminCommand('close');

export const breakLock: CommandModule<object, Args<{ volume: string; force: boolean }>> = {
  command: 'break-lock <volume>',
  describe: 'fence the holder of a volume\'s lock and break it (for a holder known dead)',
  builder: (y) => withJson(withStore(y
    .positional('volume', { type: 'string', demandOption: true })
    .option('force', {
      type: 'boolean',
      default: false,
      describe: 'RADOS: fence and break even a holder that still answers (it is blocklisted: its daemon must restart)',
    }))) as never,
  handler: async (a) => {
    validateVolumeName(a.volume);
    await usingStore(a.store, async (s) => {
      const l = createVolumeLock({ maps: s.maps, rados: s.rados }, await volumeIdOf(s, a.volume), { identity: defaultIdentity() });
      let broken: LockOwner | null;
      try {
        broken = await l.breakLock({ force: a.force });
      } finally {
        await l.close();
      }
      if (a.json) printJson({ volume: a.volume, broken });
      else process.stdout.write(broken ? `broke the lock of volume ${a.volume}, held by ${describeHolder(broken)}\n` : `volume ${a.volume}: nobody held its lock\n`);
    });
  },
};
