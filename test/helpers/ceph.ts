/**
 * A real Ceph cluster (one mon, N OSDs, memstore by default) for tap tests,
 * run by scripts/ceph-dev.sh:
 *
 *   const ceph = await startCeph(t);                 // ~1.5 s, torn down with t
 *   const url = ceph.url();                          // rados:archipelago?maps=archipelago-maps&conf=DIR/ceph.conf
 *   await cli(['create', 'v', '--size', '64M', '--store', url]);
 *   const r = await ceph.rados(['-p', ceph.pools.data, 'ls']);
 *   await ceph.stopOsd(0, 'pause');                  // SIGSTOP: marked down after ~9-25 s
 *   await ceph.startOsd(0);                          // SIGCONT (or restart after 'term'/'kill')
 *
 * API (kept stable; other helpers and tests build on it):
 *
 *   startCeph(t, opts?: CephOptions): Promise<CephCluster>
 *     opts.osds (1), opts.store ('memstore' | 'bluestore'), opts.osdBytes ('1G'),
 *     opts.auth ('none' | 'cephx'), opts.rbd (false), opts.pg (8): the
 *     CEPH_DEV_* settings of the cluster; opts.exclusive: the test stops or
 *     restarts daemons, so it must not share a cluster; opts.startTimeoutMs (120 s).
 *
 *   CephCluster:
 *     dir, conf               DIR and DIR/ceph.conf (pass conf to librados / --conf)
 *     pools: { data, maps }   two pools of size 1, empty, for this test only
 *     auth                    'none' | 'cephx' (cephx: client.admin is the default
 *                             user; client.archipelago has only what the daemon
 *                             needs: url({ id: 'archipelago' }), rados --id archipelago)
 *     shared                  true when this is the ARCHIPELAGO_TEST_CEPH cluster
 *     url(params?)            rados:DATA?maps=MAPS&conf=CONF[&k=v…] (the daemon's store URL)
 *     env                     the environment for child processes: childEnv()
 *                             (no NODE_OPTIONS) plus CEPH_CONF
 *     rados(args, o?) / ceph(args, o?)   run `rados`/`ceph --conf CONF ARGS`
 *                             (never reject for a non-zero exit; see RunResult)
 *     osdPid(id = 0)          PID from DIR/run/osd.ID.pid if that OSD runs, else null
 *     stopOsd(id = 0, how = 'term')
 *                             'term': SIGTERM and wait until gone (clean: memstore
 *                             keeps its data, the mon marks it down at once);
 *                             'kill': SIGKILL and wait (memstore loses its data);
 *                             'pause': SIGSTOP (the mon marks it down: ~9 s when
 *                             other OSDs report it, 10–25 s for a lone OSD whose
 *                             beacons stop; client ops to its PGs wait meanwhile,
 *                             up to the 30 s op timeout of ceph.conf's [client])
 *     startOsd(id = 0)        SIGCONT a paused OSD, else `ceph-dev.sh start DIR`
 *                             (restarts what is stopped, waits for a write round trip)
 *     waitOsd(id, up, timeoutMs = 30 s)  until the osdmap shows the OSD up/down
 *     stop() / start()        the whole cluster (`ceph-dev.sh stop|start DIR`)
 *
 *   daemonPids(dir): Map<name, pid> of the live daemons in DIR/run/*.pid;
 *   isOurs(pid, conf): that PID runs (not a zombie) with that ceph.conf;
 *   CEPH_DEV: the script's path.
 *
 * Every cluster gets its own directory and a random port range (mon at a
 * multiple of 100 in 41000–47900, daemons in the next 99 ports) so that test
 * files running in parallel never meet; a clash (ceph-dev.sh exit 4) is
 * retried on another range. Teardown, pass or fail, stops the daemons by the
 * PIDs in DIR/run/*.pid (SIGTERM, then SIGKILL) and removes DIR; so does
 * process exit (SIGKILL) for a test that never reaches its teardown.
 *
 * ARCHIPELAGO_TEST_CEPH=DIR (a cluster already started with
 * `scripts/ceph-dev.sh start DIR`) makes startCeph reuse it: each test then
 * gets two fresh, uniquely named pools that its teardown deletes, and the
 * cluster keeps running. Tests that pass cluster settings (osds, store,
 * osdBytes, auth, rbd, pg) or `exclusive` always get a fresh cluster of their
 * own; stopOsd/startOsd/stop/start refuse to act on a shared cluster.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { childEnv } from './daemon.js';
import { run, type RunResult } from './run.js';

interface Teardown { teardown(fn: () => unknown): void }

/** scripts/ceph-dev.sh in the repository, found from this compiled file (build/test/helpers/ceph.js). */
export const CEPH_DEV = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'scripts', 'ceph-dev.sh');
/** The ceph CLI; runs by its own python3 shebang (never as `python3 /usr/bin/ceph`). */
export const CEPH_CLI = '/usr/bin/ceph';

export interface CephOptions {
  /** Number of OSDs (default 1). */
  osds?: number;
  store?: 'memstore' | 'bluestore';
  /** memstore capacity / bluestore block size, e.g. '256M' (default '1G'). */
  osdBytes?: string;
  auth?: 'none' | 'cephx';
  /** Also a pool `rbd` initialised for RBD (default false). */
  rbd?: boolean;
  /** PGs per pool (default 8). */
  pg?: number;
  /** The test stops or restarts daemons: never use the shared cluster. */
  exclusive?: boolean;
  /** Deadline for `ceph-dev.sh start` (default 120 s). */
  startTimeoutMs?: number;
}

export type OsdStopHow = 'term' | 'kill' | 'pause';

export interface CephCluster {
  dir: string;
  conf: string;
  pools: { data: string; maps: string };
  auth: 'none' | 'cephx';
  shared: boolean;
  /** rados:DATA?maps=MAPS&conf=CONF plus params (e.g. { id: 'archipelago', op_timeout: 5 }). */
  url(params?: Record<string, string | number>): string;
  env: NodeJS.ProcessEnv;
  rados(args: readonly string[], opts?: { timeoutMs?: number; input?: string | Buffer }): Promise<RunResult>;
  ceph(args: readonly string[], opts?: { timeoutMs?: number; input?: string | Buffer }): Promise<RunResult>;
  osdPid(id?: number): number | null;
  stopOsd(id?: number, how?: OsdStopHow): Promise<void>;
  startOsd(id?: number): Promise<void>;
  waitOsd(id: number, up: boolean, timeoutMs?: number): Promise<void>;
  stop(): Promise<void>;
  start(): Promise<void>;
}

const DEFAULT_POOLS = { data: 'archipelago', maps: 'archipelago-maps' };
/** ceph-dev.sh's exit code for "a port is taken". */
const EXIT_PORT_TAKEN = 4;

// ---------------------------------------------------------------- processes by PID

/** The /proc state letter of a process, or null when it does not exist. */
function procState(pid: number): string | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) || null;
  } catch {
    return null;
  }
}

/**
 * True when PID runs (a zombie counts as gone: PID 1 here reaps orphans only
 * ~2 s after they exit) and was started with this cluster's conf, so that a
 * stale pid file never makes us signal a recycled PID.
 */
export function isOurs(pid: number, conf: string): boolean {
  const st = procState(pid);
  if (st === null || st === 'Z' || st === 'X') return false;
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(conf);
  } catch {
    return false;
  }
}

/** PIDs of the live daemons of DIR by name (mon.a, osd.0 …), from DIR/run/*.pid. */
export function daemonPids(dir: string): Map<string, number> {
  const out = new Map<string, number>();
  const conf = path.join(dir, 'ceph.conf');
  let names: string[] = [];
  try {
    names = fs.readdirSync(path.join(dir, 'run')).filter((n) => n.endsWith('.pid'));
  } catch {
    return out;
  }
  for (const n of names) {
    try {
      const pid = Number(fs.readFileSync(path.join(dir, 'run', n), 'utf8').trim());
      if (Number.isInteger(pid) && pid > 0 && isOurs(pid, conf)) out.set(n.slice(0, -'.pid'.length), pid);
    } catch { /* gone meanwhile */ }
  }
  return out;
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try { process.kill(pid, sig); } catch { /* already gone */ }
}

async function waitGone(pids: number[], conf: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!pids.some((p) => isOurs(p, conf))) return true;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Clusters this process started and has not torn down yet: SIGKILLed at exit. */
const owned = new Set<string>();
process.on('exit', () => {
  for (const dir of owned) {
    for (const pid of daemonPids(dir).values()) { signal(pid, 'SIGKILL'); signal(pid, 'SIGCONT'); }
  }
});

// ---------------------------------------------------------------- the script

function describe(r: RunResult): string {
  const tail = (s: string) => (s.length > 6000 ? '…' + s.slice(-6000) : s);
  return `exit ${r.code}${r.signal ? ` (signal ${r.signal})` : ''}${r.timedOut ? ' (timed out)' : ''} after ${r.ms} ms\n${tail(r.stderr)}${tail(r.stdout)}`;
}

function script(cmd: 'start' | 'stop' | 'status' | 'purge', dir: string, env: NodeJS.ProcessEnv, timeoutMs = 120_000): Promise<RunResult> {
  return run(CEPH_DEV, [cmd, dir], { env: childEnv(env), timeoutMs });
}

/** Stops every daemon of DIR by PID: the script first, then SIGKILL whatever it left. */
async function stopCluster(dir: string): Promise<void> {
  const conf = path.join(dir, 'ceph.conf');
  await script('stop', dir, { CEPH_DEV_STOP_TIMEOUT: '15' }, 40_000).catch(() => undefined);
  const left = [...daemonPids(dir).values()];
  for (const pid of left) { signal(pid, 'SIGKILL'); signal(pid, 'SIGCONT'); }
  if (left.length && !(await waitGone(left, conf, 10_000))) throw new Error(`ceph daemons ${left.join(' ')} of ${dir} survived SIGKILL`);
}

function settingsEnv(o: CephOptions, port: number): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {
    CEPH_DEV_PORT: String(port),
    CEPH_DEV_OSDS: String(o.osds ?? 1),
    CEPH_DEV_STORE: o.store ?? 'memstore',
    CEPH_DEV_OSD_BYTES: o.osdBytes ?? '1G',
    CEPH_DEV_AUTH: o.auth ?? 'none',
    CEPH_DEV_POOLS: `${DEFAULT_POOLS.data} ${DEFAULT_POOLS.maps}`,
    CEPH_DEV_RBD: o.rbd ? '1' : '0',
    CEPH_DEV_PG: String(o.pg ?? 8),
  };
  return env;
}

/** Encodes only what would break a `rados:` URL's query (keeps paths readable). */
function q(v: string | number): string {
  return String(v).replace(/[%&=+#?\s]/g, (c) => encodeURIComponent(c));
}

// ---------------------------------------------------------------- startCeph

export async function startCeph(t: Teardown, opts: CephOptions = {}): Promise<CephCluster> {
  const sharedDir = process.env.ARCHIPELAGO_TEST_CEPH;
  const wantsOwn = opts.exclusive === true ||
    (['osds', 'store', 'osdBytes', 'auth', 'rbd', 'pg'] as const).some((k) => opts[k] !== undefined);
  if (sharedDir && !wantsOwn) return useShared(t, path.resolve(sharedDir));

  const timeoutMs = opts.startTimeoutMs ?? 120_000;
  const errors: string[] = [];
  for (let attempt = 0; attempt < 8; attempt++) {
    const port = 41000 + 100 * crypto.randomInt(0, 70);
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'archipelago-ceph-'));
    owned.add(dir);
    let r: RunResult;
    try {
      r = await script('start', dir, settingsEnv(opts, port), timeoutMs);
    } catch (err) {
      owned.delete(dir);
      await fsp.rm(dir, { recursive: true, force: true });
      throw err;
    }
    if (r.code === 0) {
      t.teardown(async () => {
        try {
          await stopCluster(dir);
        } finally {
          owned.delete(dir);
          await fsp.rm(dir, { recursive: true, force: true });
        }
      });
      return cluster(dir, DEFAULT_POOLS, opts.auth ?? 'none', false);
    }
    // A failed start stops what it started; make sure, then forget this directory.
    await stopCluster(dir).catch(() => undefined);
    owned.delete(dir);
    await fsp.rm(dir, { recursive: true, force: true });
    errors.push(`port ${port}: ${describe(r)}`);
    if (r.code !== EXIT_PORT_TAKEN) break;
  }
  throw new Error(`scripts/ceph-dev.sh start failed:\n${errors.join('\n')}`);
}

async function useShared(t: Teardown, dir: string): Promise<CephCluster> {
  const conf = path.join(dir, 'ceph.conf');
  const settings = fs.readFileSync(path.join(dir, 'ceph-dev.env'), 'utf8');
  const auth = /^AUTH=cephx$/m.test(settings) ? 'cephx' : 'none';
  const tag = `archipelago-t${crypto.randomBytes(4).toString('hex')}`;
  const pools = { data: tag, maps: `${tag}-maps` };
  const env = childEnv({ CEPH_CONF: conf });
  const batch = async (cmds: string[]) => {
    // One CLI start for several commands; errors then show only on stderr.
    const r = await run(CEPH_CLI, ['--conf', conf], { env, input: cmds.join('\n') + '\n', timeoutMs: 60_000 });
    if (r.code !== 0 || /^Error/m.test(r.stderr)) throw new Error(`ceph ${cmds.join('; ')}: ${describe(r)}`);
  };
  t.teardown(() => batch([pools.data, pools.maps].map((p) => `osd pool delete ${p} ${p} --yes-i-really-really-mean-it`)));
  await batch([pools.data, pools.maps].flatMap((p) => [`osd pool create ${p} 8 8 replicated`, `osd pool application enable ${p} rados`]));
  // The pools' PGs are active once a write gets through.
  for (const p of [pools.data, pools.maps]) {
    const obj = `__ready.${tag}`;
    const w = await run('rados', ['--conf', conf, '-p', p, 'create', obj], { env, timeoutMs: 60_000 });
    const d = await run('rados', ['--conf', conf, '-p', p, 'rm', obj], { env, timeoutMs: 60_000 });
    if (w.code !== 0 || d.code !== 0) throw new Error(`pool ${p} of ${dir} is not writable: ${describe(w.code !== 0 ? w : d)}`);
  }
  return cluster(dir, pools, auth, true);
}

function cluster(dir: string, pools: { data: string; maps: string }, auth: 'none' | 'cephx', shared: boolean): CephCluster {
  const conf = path.join(dir, 'ceph.conf');
  const env = childEnv({ CEPH_CONF: conf });
  const notShared = (what: string) => {
    if (shared) throw new Error(`${what}: the cluster is the shared ARCHIPELAGO_TEST_CEPH one; pass { exclusive: true } to startCeph`);
  };
  const osdPid = (id = 0) => daemonPids(dir).get(`osd.${id}`) ?? null;
  const ceph = (args: readonly string[], o: { timeoutMs?: number; input?: string | Buffer } = {}) =>
    run(CEPH_CLI, ['--conf', conf, ...args], { env, timeoutMs: o.timeoutMs ?? 60_000, input: o.input });
  const self: CephCluster = {
    dir,
    conf,
    pools,
    auth,
    shared,
    env,
    url(params = {}) {
      const extra = Object.entries(params).map(([k, v]) => `&${q(k)}=${q(v)}`).join('');
      return `rados:${pools.data}?maps=${q(pools.maps)}&conf=${q(conf)}${extra}`;
    },
    rados: (args, o = {}) => run('rados', ['--conf', conf, ...args], { env, timeoutMs: o.timeoutMs ?? 60_000, input: o.input }),
    ceph,
    osdPid,
    async stopOsd(id = 0, how: OsdStopHow = 'term') {
      notShared('stopOsd');
      const pid = osdPid(id);
      if (pid === null) throw new Error(`osd.${id} of ${dir} is not running`);
      if (how === 'pause') { signal(pid, 'SIGSTOP'); return; }
      signal(pid, how === 'kill' ? 'SIGKILL' : 'SIGTERM');
      if (!(await waitGone([pid], conf, 30_000))) {
        signal(pid, 'SIGKILL');
        if (!(await waitGone([pid], conf, 10_000))) throw new Error(`osd.${id} (pid ${pid}) survived SIGKILL`);
      }
    },
    async startOsd(id = 0) {
      notShared('startOsd');
      const pid = osdPid(id);
      if (pid !== null && procState(pid) === 'T') { signal(pid, 'SIGCONT'); return; }
      const r = await script('start', dir, {});
      if (r.code !== 0) throw new Error(`ceph-dev.sh start ${dir}: ${describe(r)}`);
    },
    async waitOsd(id, up, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      let last = '';
      for (;;) {
        const r = await ceph(['osd', 'dump', '-f', 'json'], { timeoutMs: 20_000 });
        if (r.code === 0) {
          const osd = (JSON.parse(r.stdout) as { osds: { osd: number; up: number }[] }).osds.find((o) => o.osd === id);
          if (osd && (osd.up === 1) === up) return;
          last = osd ? `up=${osd.up}` : 'not in the osdmap';
        } else {
          last = describe(r);
        }
        if (Date.now() > deadline) throw new Error(`osd.${id} not ${up ? 'up' : 'down'} after ${timeoutMs} ms (${last})`);
        await new Promise((res) => setTimeout(res, 250));
      }
    },
    async stop() {
      notShared('stop');
      await stopCluster(dir);
    },
    async start() {
      notShared('start');
      const r = await script('start', dir, {});
      if (r.code !== 0) throw new Error(`ceph-dev.sh start ${dir}: ${describe(r)}`);
    },
  };
  return self;
}
