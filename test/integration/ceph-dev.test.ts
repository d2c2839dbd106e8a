/**
 * scripts/ceph-dev.sh, the single-host Ceph cluster the RADOS tests run on:
 * start, a 1 MiB object round trip, stop (no daemon left), restart (memstore
 * keeps the object), status, env, two clusters side by side, failing starts
 * that leave nothing running, purge, and the cephx user client.archipelago
 * (its pools and `osd blocklist`, nothing more).
 */
import t, { type Test } from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { CEPH_DEV, daemonPids, isOurs, startCeph, type CephCluster } from '../helpers/ceph.js';
import { childEnv } from '../helpers/daemon.js';
import { diag, run, tempDir, type RunResult } from '../helpers/run.js';

const MiB = 1024 * 1024;

function script(cmd: string, dir: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return run(CEPH_DEV, [cmd, dir], { env: childEnv(env), timeoutMs: 120_000 });
}

/** Writes a random 1 MiB object and returns its bytes. */
async function putRandom(t: Tap, c: CephCluster, obj: string, args: string[] = []): Promise<Buffer> {
  const file = path.join(await tempDir(t, 'archipelago-ceph-obj-'), 'in');
  const data = crypto.randomBytes(MiB);
  await fs.writeFile(file, data);
  const r = await c.rados([...args, '-p', c.pools.data, 'put', obj, file]);
  t.equal(r.code, 0, `rados put ${obj}`, diag(r));
  return data;
}

async function getObject(t: Tap, c: CephCluster, obj: string, args: string[] = []): Promise<Buffer | null> {
  const file = path.join(await tempDir(t, 'archipelago-ceph-obj-'), 'out');
  const r = await c.rados([...args, '-p', c.pools.data, 'get', obj, file]);
  if (r.code !== 0) return null;
  return fs.readFile(file);
}

type Tap = Test;

/** A port range [base, base+99] nothing listens in, and a server holding `base` (or the whole range). */
async function occupy(t: Tap, whole: boolean): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const base = 41000 + 100 * crypto.randomInt(0, 70);
    const ports = whole ? Array.from({ length: 90 }, (_, i) => base + 10 + i) : [base];
    const servers: net.Server[] = [];
    let ok = true;
    for (const port of ports) {
      const s = net.createServer();
      const listening = await new Promise<boolean>((resolve) => {
        s.once('error', () => resolve(false));
        s.listen(port, '127.0.0.1', () => resolve(true));
      });
      if (!listening) { ok = false; break; }
      servers.push(s);
    }
    if (ok) {
      t.teardown(() => Promise.all(servers.map((s) => new Promise((r) => s.close(r)))));
      return base;
    }
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
  throw new Error('no free port range found');
}

/** PIDs named by "… started (pid N)" lines of a start run. */
function startedPids(r: RunResult): number[] {
  return [...r.stderr.matchAll(/started \(pid (\d+)\)/g)].map((m) => Number(m[1]));
}

t.test('start, 1 MiB round trip, stop, status, restart keeps the object, env', async (t) => {
  const c = await startCeph(t, { exclusive: true });
  t.match(c.url(), new RegExp(`^rados:archipelago\\?maps=archipelago-maps&conf=${c.dir}/ceph\\.conf$`), 'store URL');
  t.equal(c.url({ id: 'archipelago', op_timeout: 5 }), `rados:archipelago?maps=archipelago-maps&conf=${c.conf}&id=archipelago&op_timeout=5`);

  let st = await script('status', c.dir);
  t.equal(st.code, 0, 'status: running', diag(st));
  t.match(st.stdout, /^mon\.a running pid \d+$/m);
  t.match(st.stdout, /^osd\.0 running pid \d+$/m);
  t.match(st.stdout, /HEALTH_OK/);

  const data = await putRandom(t, c, 'obj1');
  const back = await getObject(t, c, 'obj1');
  t.ok(back !== null && back.equals(data), '1 MiB object read back byte for byte');

  const pids = daemonPids(c.dir);
  t.same([...pids.keys()].sort(), ['mon.a', 'osd.0'], 'pid files of mon.a and osd.0');
  const stop = await script('stop', c.dir);
  t.equal(stop.code, 0, 'stop', diag(stop));
  for (const [name, pid] of pids) t.notOk(isOurs(pid, c.conf), `${name} (pid ${pid}) is gone after stop`);
  t.same(await fs.readdir(path.join(c.dir, 'run')).then((l) => l.filter((n) => n.endsWith('.pid'))), [], 'no pid file left');

  st = await script('status', c.dir);
  t.equal(st.code, 3, 'status after stop: exit 3', diag(st));
  t.match(st.stdout, /^mon\.a down$/m);
  t.match(st.stdout, /^osd\.0 down$/m);
  t.match(st.stdout, /^cluster down$/m);

  const again = await script('start', c.dir);
  t.equal(again.code, 0, 'restart', diag(again));
  t.match(again.stderr, /restarting the cluster/);
  const kept = await getObject(t, c, 'obj1');
  t.ok(kept !== null && kept.equals(data), 'the object survived stop + start (memstore saved on a clean stop)');
  st = await script('status', c.dir);
  t.equal(st.code, 0, 'status after restart: running', diag(st));

  // start on a running cluster: nothing new, still a round trip
  const idem = await script('start', c.dir);
  t.equal(idem.code, 0, 'start on a running cluster', diag(idem));
  t.notMatch(idem.stderr, /started \(pid/, 'starts no daemon');

  const env = await script('env', c.dir);
  t.equal(env.code, 0);
  t.match(env.stdout, `export CEPH_CONF=${c.conf}\n`);
  t.match(env.stdout, `export CEPH_DEV_POOLS='archipelago archipelago-maps'\n`);
  t.match(env.stdout, `export ARCHIPELAGO_STORE='${c.url()}'\n`);
});

t.test('two clusters side by side, each with its own objects', async (t) => {
  const [a, b] = await Promise.all([startCeph(t, { exclusive: true }), startCeph(t, { exclusive: true })]);
  const monOf = async (c: CephCluster) => /mon host = (.*)/.exec(await fs.readFile(c.conf, 'utf8'))![1];
  t.not(await monOf(a), await monOf(b), 'different mon addresses');
  const da = await putRandom(t, a, 'only-in-a');
  const db = await putRandom(t, b, 'only-in-b');
  t.ok((await getObject(t, a, 'only-in-a'))?.equals(da), 'A reads its object');
  t.ok((await getObject(t, b, 'only-in-b'))?.equals(db), 'B reads its object');
  const cross = await b.rados(['-p', b.pools.data, 'stat', 'only-in-a']);
  t.not(cross.code, 0, 'B does not have A\'s object');
  t.match(cross.stderr, /No such file or directory/);
  const fsids = await Promise.all([a, b].map(async (c) => (await c.ceph(['fsid'])).stdout.trim()));
  t.not(fsids[0], fsids[1], 'two clusters (two fsids)');
});

t.test('a start that fails leaves no daemon behind', async (t) => {
  t.test('mon port taken: exit 4 before anything starts', async (t) => {
    const port = await occupy(t, false);
    const dir = await tempDir(t, 'archipelago-ceph-fail-');
    const r = await script('start', dir, { CEPH_DEV_PORT: String(port) });
    t.equal(r.code, 4, 'exit 4: port taken', diag(r));
    t.match(r.stderr, new RegExp(`port ${port} \\(mon\\) is already in use`));
    t.match(r.stderr, /start failed after/);
    t.same(daemonPids(dir).size, 0, 'no daemon runs');
    const again = await script('start', dir, { CEPH_DEV_PORT: String(port) });
    t.equal(again.code, 1, 'a second start refuses the half-created DIR', diag(again));
    t.match(again.stderr, /purge/);
    const purge = await script('purge', dir);
    t.equal(purge.code, 0, 'purge', diag(purge));
    await t.rejects(fs.stat(dir), { code: 'ENOENT' }, 'DIR removed');
  });

  t.test('no port free for the OSD: the mon it started is stopped again', async (t) => {
    const port = await occupy(t, true);
    const dir = await tempDir(t, 'archipelago-ceph-fail-');
    const r = await script('start', dir, { CEPH_DEV_PORT: String(port) });
    t.equal(r.code, 4, 'exit 4: no port for the OSD', diag(r));
    t.match(r.stderr, /ceph-osd -i 0 found no free port/);
    t.match(r.stderr, /---- last lines of .*osd\.0\./, 'shows the OSD log tail');
    const mons = startedPids(r);
    t.equal(mons.length, 1, 'the mon had started', diag(r));
    t.match(r.stderr, /stopping the 1 daemon\(s\) this run started/);
    for (const pid of mons) t.notOk(isOurs(pid, path.join(dir, 'ceph.conf')), `mon (pid ${pid}) is gone`);
    t.same(daemonPids(dir).size, 0, 'no daemon runs');
  });

  t.test('purge refuses a directory that is not a cluster', async (t) => {
    const dir = await tempDir(t, 'archipelago-ceph-notmine-');
    await fs.writeFile(path.join(dir, 'keep'), 'x');
    const r = await script('purge', dir);
    t.not(r.code, 0, 'refused', diag(r));
    t.equal(await fs.readFile(path.join(dir, 'keep'), 'utf8'), 'x', 'file kept');
    const s = await script('start', dir);
    t.not(s.code, 0, 'start refuses it too', diag(s));
  });
});

t.test('cephx: client.archipelago has its pools and osd blocklist, nothing more', async (t) => {
  const c = await startCeph(t, { auth: 'cephx' });
  t.equal(c.auth, 'cephx');
  const conf = await fs.readFile(c.conf, 'utf8');
  t.match(conf, /auth client required = cephx/);
  const keyring = await fs.readFile(path.join(c.dir, 'keyring'), 'utf8');
  t.match(keyring, /\[client\.archipelago\]\n\tkey = \S+\n\tcaps mon = "allow r, allow command \\"osd blocklist\\""\n\tcaps osd = "allow rwx pool=archipelago, allow rwx pool=archipelago-maps"/);
  t.equal(((await fs.stat(path.join(c.dir, 'keyring'))).mode & 0o077), 0, 'keyring readable by its owner only');

  const as = ['--id', 'archipelago'];
  const data = await putRandom(t, c, 'obj', as);
  t.ok((await getObject(t, c, 'obj', as))?.equals(data), 'read/write in the data pool');
  const maps = await c.rados([...as, '-p', c.pools.maps, 'put', 'hdr', '-'], { input: 'header' });
  t.equal(maps.code, 0, 'write in the map pool', diag(maps));
  const lock = await c.rados([...as, '-p', c.pools.data, 'lock', 'get', 'obj', 'L', '--lock-cookie', 'c1']);
  t.equal(lock.code, 0, 'cls_lock (class methods: x)', diag(lock));

  const addr = '127.0.0.1:0/4242';
  const add = await c.ceph([...as, 'osd', 'blocklist', 'add', addr, '60']);
  t.equal(add.code, 0, 'osd blocklist add', diag(add));
  const ls = await c.ceph([...as, 'osd', 'blocklist', 'ls']);
  t.equal(ls.code, 0, 'osd blocklist ls', diag(ls));
  t.match(ls.stdout, addr);
  const rm = await c.ceph([...as, 'osd', 'blocklist', 'rm', addr]);
  t.equal(rm.code, 0, 'osd blocklist rm', diag(rm));

  const del = await c.ceph([...as, 'osd', 'pool', 'delete', c.pools.data, c.pools.data, '--yes-i-really-really-mean-it']);
  t.not(del.code, 0, 'cannot delete a pool', diag(del));
  t.match(del.stderr, /EACCES|access denied/);
  const create = await c.ceph([...as, 'osd', 'pool', 'create', 'other', '8']);
  t.not(create.code, 0, 'cannot create a pool', diag(create));
  const clear = await c.ceph([...as, 'osd', 'blocklist', 'clear']);
  t.not(clear.code, 0, 'cannot clear the blocklist', diag(clear));

  const adminCreate = await c.ceph(['osd', 'pool', 'create', 'other', '8']);
  t.equal(adminCreate.code, 0, 'client.admin creates a pool', diag(adminCreate));
  const foreign = await c.rados([...as, '-p', 'other', 'put', 'x', '-'], { input: 'x' });
  t.not(foreign.code, 0, 'cannot write to another pool', diag(foreign));
  t.match(foreign.stderr, /Operation not permitted/);

  const env = await script('env', c.dir);
  t.match(env.stdout, `export ARCHIPELAGO_STORE='${c.url({ id: 'archipelago' })}'\n`);
});

t.test('fault helpers: stopOsd/startOsd/waitOsd', async (t) => {
  const c = await startCeph(t, { exclusive: true });
  t.equal(c.shared, false);
  const data = await putRandom(t, c, 'obj');
  const pid = c.osdPid(0);
  t.ok(pid, 'osd.0 pid');

  let t0 = Date.now();
  await c.stopOsd(0, 'term');
  t.equal(c.osdPid(0), null, 'term: osd.0 gone');
  await c.waitOsd(0, false);
  t.pass(`term: marked down ${Date.now() - t0} ms after SIGTERM`);
  await c.startOsd(0);
  await c.waitOsd(0, true);
  t.not(c.osdPid(0), pid, 'a new osd.0 process');
  t.ok((await getObject(t, c, 'obj'))?.equals(data), 'object kept across a clean OSD restart');

  t0 = Date.now();
  await c.stopOsd(0, 'pause');
  await c.waitOsd(0, false, 45_000); // a lone OSD: no beacon for 10 s, then the mon's next tick
  t.pass(`pause: marked down ${Date.now() - t0} ms after SIGSTOP`);
  const paused = c.osdPid(0);
  t.ok(paused, 'a paused OSD still has its pid');
  await c.startOsd(0);
  await c.waitOsd(0, true, 30_000);
  t.equal(c.osdPid(0), paused, 'SIGCONT: the same process is back up');
  t.ok((await getObject(t, c, 'obj'))?.equals(data), 'object readable after SIGCONT');
});
