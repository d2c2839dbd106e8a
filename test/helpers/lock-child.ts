/**
 * A second "node" for the lock tests: a process that takes a volume lock and
 * holds it, writing a heartbeat while it is the owner, so that a test can
 * SIGKILL it, SIGSTOP/SIGCONT it, or hand the lock over to/from it.
 *
 *   node build/test/helpers/lock-child.js '<ChildConfig as JSON>'
 *
 * It prints one JSON object per line on stdout:
 *   {"event":"ready", pid, client?, addr?}       connected (RADOS: its client and address)
 *   {"event":"state", "to":…, "reason":…}         every state change
 *   {"event":"owner", since}                       acquired
 *   {"event":"release-requested", from}            a handover request reached it
 *   {"event":"resumed", gapMs, held, state}        its 20 ms ticker saw a gap (it was paused);
 *                                                   `held` is checkHeld() as the very first thing
 *   {"event":"late-write", ok, code?, errno?}      after a resume: one write to its heartbeat
 *                                                   object regardless of the lock (RADOS: the OSD
 *                                                   must refuse it, 108) — files: only if held
 *   {"event":"beat", n}                            every 10th heartbeat written
 *   {"event":"error", message}
 * and reads commands on stdin, one per line: "release", "acquire", "exit".
 *
 * The heartbeat (while checkHeld()): RADOS, a write of "<instance> <n>" to
 * data object `hb.<volumeId>` through its own RadosBlocker; files, the same
 * into <root>/hb.<volumeId>.
 */
import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import { loadRados } from '../../src/blockers/rados/binding.js';
import { RadosBlocker } from '../../src/blockers/rados/blocker.js';
import { FileLockBackend, type FileLockOptions } from '../../src/locks/file-backend.js';
import { RadosLockBackend, type RadosLockOptions } from '../../src/locks/rados-backend.js';
import type { LockBackend, LockStateChange } from '../../src/locks/index.js';
import { VolumeLock } from '../../src/locks/volume-lock.js';

export interface ChildConfig {
  backend: 'file' | 'rados';
  volumeId: string;
  node: string;
  instance: string;
  /** Ask the holder to hand over when acquiring (default true). */
  requestHandover?: boolean;
  /** On a handover request: release (default) or ignore it. */
  onRequest?: 'release' | 'ignore';
  file?: FileLockOptions & { root: string };
  rados?: RadosLockOptions & { conf: string; mapsPool: string; dataPool: string };
}

const out = (o: object) => process.stdout.write(JSON.stringify(o) + '\n');
const config = JSON.parse(process.argv[2] ?? '{}') as ChildConfig;

let backend: LockBackend;
let write: (data: Buffer) => Promise<void>;
let shutdown: () => Promise<void> = async () => {};

if (config.backend === 'rados') {
  const r = config.rados!;
  // objecter_tick_interval 1: watch pings every second, so a short osd_client_watch_timeout in tests is safe.
  const cluster = await loadRados().connect({
    conf: r.conf, config: { rados_osd_op_timeout: '30', rados_mon_op_timeout: '30', objecter_tick_interval: '1' },
  });
  const maps = await cluster.openPool(r.mapsPool);
  const data = new RadosBlocker(await cluster.openPool(r.dataPool));
  backend = new RadosLockBackend(maps, cluster, config.volumeId, r);
  write = (buf) => data.write(`hb.${config.volumeId}`, 0, buf);
  shutdown = async () => {
    await data.close().catch(() => undefined);
    await cluster.shutdown();
  };
  out({ event: 'ready', pid: process.pid, client: `client.${cluster.instanceId()}`, addr: cluster.addrs() });
} else {
  const f = config.file!;
  backend = new FileLockBackend(f.root, config.volumeId, f);
  // Like the file blocker: one pwrite on an open descriptor per write, the
  // lock checked right before it (a multi-step writeFile would go on after
  // a pause with its check long past).
  const hb = await fs.open(path.join(f.root, `hb.${config.volumeId}`), fsConstants.O_RDWR | fsConstants.O_CREAT);
  write = async (buf) => void (await hb.write(buf, 0, buf.length, 0));
  shutdown = () => hb.close();
  out({ event: 'ready', pid: process.pid });
}

const lock = new VolumeLock(backend, {
  identity: { node: config.node, instance: config.instance },
  onReleaseRequested: config.onRequest === 'ignore' ? undefined : () => undefined,
});
lock.on('state', (c: LockStateChange) => out({ event: 'state', to: c.to, reason: c.reason }));
lock.on('releaseRequested', (r: { from: unknown }) => out({ event: 'release-requested', from: r.from }));

let beats = 0;
let writing = false;
let last = performance.now();
setInterval(() => {
  const now = performance.now();
  const gap = now - last;
  last = now;
  if (gap > 400) {
    // First thing after a pause: may we write?
    const held = lock.checkHeld();
    out({ event: 'resumed', gapMs: Math.round(gap), held, state: lock.state });
    void (async () => {
      if (config.backend === 'file' && !held) return out({ event: 'late-write', ok: false, code: 'NOT_HELD' });
      try {
        await write(Buffer.from(`${config.instance} late`));
        out({ event: 'late-write', ok: true });
      } catch (err) {
        const e = err as { code?: string; cause?: { errno?: number } };
        out({ event: 'late-write', ok: false, code: e.code, errno: e.cause?.errno });
        if (e.code === 'EFENCED') lock.reportFenced(err);
      }
    })();
    return;
  }
  if (writing || !lock.checkHeld()) return;
  writing = true;
  const n = ++beats;
  write(Buffer.from(`${config.instance} ${n}`))
    .then(() => { if (n % 10 === 0) out({ event: 'beat', n }); })
    .catch((err: unknown) => {
      const e = err as { code?: string };
      if (e.code === 'EFENCED') lock.reportFenced(err);
      out({ event: 'error', message: `heartbeat: ${(err as Error).message}` });
    })
    .finally(() => { writing = false; });
}, 20);

async function acquire(): Promise<void> {
  try {
    await lock.acquire({ wait: true, requestHandover: config.requestHandover ?? true });
    out({ event: 'owner', since: lock.acquisition?.since });
  } catch (err) {
    out({ event: 'error', message: `acquire: ${(err as Error).message}` });
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = line.trim();
  if (cmd === 'release') void lock.release().catch((err: unknown) => out({ event: 'error', message: `release: ${(err as Error).message}` }));
  else if (cmd === 'acquire') void acquire();
  else if (cmd === 'exit') {
    void (async () => {
      await lock.close().catch(() => undefined);
      await shutdown().catch(() => undefined);
      process.exit(0);
    })();
  }
});

await acquire();
