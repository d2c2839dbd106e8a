/**
 * The Ganeti ExtStorage provider (scripts/ganeti/, docs/ganeti.md), each
 * script invoked as Ganeti's noded invokes it: from the provider directory,
 * with nothing but PATH, VOL_* and EXTP_* in the environment
 * (ganeti-extstorage-interface(7)), against a real daemon on a file store,
 * and the effect checked with the CLI: create (plain, object size, clone of
 * a snapshot), grow, setinfo, snapshot and open/close through the daemon's
 * admin socket, attach/detach, verify, remove.
 *
 * attach/detach run `archipelago map`/`unmap` for real (relay, record)
 * with nbd-client replaced by a recorder and a fake /sys/block, as in
 * test/integration/map.test.ts: the host has no nbd module. The recorded
 * command line is the one `map --dry-run` prints, which
 * test/integration/kernel-map.test.ts runs in a guest's kernel; the
 * userspace URI attach prints is read with qemu-io.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, childEnv, startDaemon, tempFileStore } from '../helpers/daemon.js';
import { diag, freePort, run, tempDir } from '../helpers/run.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const PROVIDER = path.join(ROOT, 'scripts', 'ganeti');
const MiB = 1024 * 1024;
const SCRIPTS = ['create', 'attach', 'detach', 'remove', 'grow', 'setinfo', 'verify', 'snapshot', 'open', 'close'];

t.setTimeout(300_000);

interface Env {
  config: string;
  /** Test plumbing the scripts pass through to the CLI (records, fake sysfs, fake nbd-client). */
  plumbing: NodeJS.ProcessEnv;
  calls(): string[][];
}

/** Runs one provider script with Ganeti's environment (and only that). */
function script(e: Env, name: string, vars: Record<string, string>, args: string[] = []) {
  const env: NodeJS.ProcessEnv = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...e.plumbing, EXTP_CONFIG: e.config, ...vars };
  return run(path.join(PROVIDER, name), args, { cwd: PROVIDER, env, timeoutMs: 60_000 });
}

function arch(e: Env, args: string[]) {
  return run(process.execPath, [CLI, ...args], { env: childEnv({ ARCHIPELAGO_CONFIG: e.config, ...e.plumbing }), timeoutMs: 60_000 });
}

async function info(e: Env, name: string): Promise<Record<string, unknown> | null> {
  const r = await arch(e, ['info', name, '--json']);
  return r.code === 0 ? JSON.parse(r.stdout) as Record<string, unknown> : null;
}

t.test('the provider directory holds what Ganeti looks for', async (t) => {
  for (const s of SCRIPTS) {
    const st = await fs.stat(path.join(PROVIDER, s));
    t.ok(st.isFile() && (st.mode & 0o100) !== 0, `${s} is an executable file`);
  }
  const params = (await fs.readFile(path.join(PROVIDER, 'parameters.list'), 'utf8')).trimEnd().split('\n');
  const names = params.map((l) => l.split(/[ \t]+/)[0]);
  t.same(names, ['config', 'store', 'origin', 'object_size', 'connections', 'admin_socket'], 'parameters.list: name and description per line');
  t.ok(params.every((l) => /^[a-z_]+[ \t]+\S/.test(l)), 'every parameter has a description');
  for (const name of names) {
    const used = (await Promise.all(SCRIPTS.concat('common.sh').map((s) => fs.readFile(path.join(PROVIDER, s), 'utf8'))))
      .some((text) => text.includes(`EXTP_${name.toUpperCase()}`));
    t.ok(used, `EXTP_${name.toUpperCase()} is used by a script`);
  }
});

t.test('each script, as Ganeti runs it, against a daemon', async (t) => {
  const store = await tempFileStore(t);
  const dir = await tempDir(t, 'archipelago-ganeti-');
  const admin = path.join(dir, 'admin.sock');
  const port = await freePort();
  const config = path.join(dir, 'archipelago.conf');
  await fs.writeFile(config, `store = file:${store}\nlisten = 127.0.0.1:${port}\nadmin-socket = ${admin}\nmetrics = ""\n`);
  const d = await startDaemon(t, { store, extraArgs: ['--listen', `127.0.0.1:${port}`, '--admin-socket', admin] });

  // The recorder standing in for nbd-client, and a fake /sys/block with nbd0.
  const sys = path.join(dir, 'sys');
  await fs.mkdir(path.join(sys, 'nbd0'), { recursive: true });
  await fs.writeFile(path.join(sys, 'nbd0', 'size'), '0\n');
  const log = path.join(dir, 'calls');
  const fake = path.join(dir, 'fake-nbd-client');
  await fs.writeFile(fake, [
    '#!/bin/sh',
    `printf '%s\\n' "$@" >>'${log}'; echo -- >>'${log}'`,
    `if [ "$1" = -d ]; then rm -f '${sys}/nbd0/pid'; echo 0 >'${sys}/nbd0/size'; else echo $$ >'${sys}/nbd0/pid'; echo 131072 >'${sys}/nbd0/size'; fi`,
  ].join('\n') + '\n', { mode: 0o755 });
  const mapped = path.join(dir, 'mapped');
  const e: Env = {
    config,
    plumbing: { ARCHIPELAGO_MAPPED_DIR: mapped, ARCHIPELAGO_SYS_BLOCK: sys, ARCHIPELAGO_NBD_CLIENT: fake },
    calls: () => existsSync(log) ? readFileSync(log, 'utf8').split('--\n').filter(Boolean).map((c) => c.trimEnd().split('\n')) : [],
  };
  const vol = '0f6fdd3e-3c1d-4c4a-9d3b-5b0d3c7e2a11.ext.disk0';

  t.test('--help, and arguments refused', async (t) => {
    for (const s of SCRIPTS) {
      const r = await script(e, s, {}, ['--help']);
      t.equal(r.code, 0, `${s} --help`);
      t.match(r.stdout, new RegExp(`^usage: ${s} `), `${s} prints its usage`);
    }
    const r = await script(e, 'create', { VOL_NAME: vol, VOL_SIZE: '64' }, ['extra']);
    t.not(r.code, 0, 'create with an argument fails');
    t.equal(await info(e, vol), null, '…and creates nothing');
  });

  t.test('create: VOL_SIZE MiB; EXTP_OBJECT_SIZE', async (t) => {
    let r = await script(e, 'create', { VOL_NAME: vol, VOL_SIZE: '64' });
    t.equal(r.code, 0, 'create', diag(r));
    t.match(await info(e, vol), { size: 64 * MiB, objectSize: 4 * MiB, kind: 'volume' }, '64 MiB, default objects');
    r = await script(e, 'create', { VOL_NAME: `${vol}x`, VOL_SIZE: '10', EXTP_OBJECT_SIZE: '64K' });
    t.equal(r.code, 0, 'create with object_size', diag(r));
    t.match(await info(e, `${vol}x`), { size: 10 * MiB, objectSize: 64 * 1024 });
    r = await script(e, 'create', { VOL_NAME: vol, VOL_SIZE: '64' });
    t.not(r.code, 0, 'a name that exists is refused');
    t.match(r.stderr, /exists/);
    r = await script(e, 'create', { VOL_NAME: `${vol}y`, VOL_SIZE: '1G' });
    t.not(r.code, 0, 'VOL_SIZE must be MiB');
    t.match(r.stderr, /VOL_SIZE=1G: expected a size in MiB/);
  });

  t.test('grow: VOL_SIZE → VOL_NEW_SIZE', async (t) => {
    let r = await script(e, 'grow', { VOL_NAME: vol, VOL_SIZE: '64', VOL_NEW_SIZE: '96' });
    t.equal(r.code, 0, 'grow', diag(r));
    t.match(await info(e, vol), { size: 96 * MiB });
    r = await script(e, 'grow', { VOL_NAME: vol, VOL_SIZE: '96', VOL_NEW_SIZE: '96' });
    t.not(r.code, 0, 'not a grow');
    t.match(await info(e, vol), { size: 96 * MiB }, 'size unchanged');
  });

  t.test('setinfo: checked, recorded in Ganeti\'s log (the output), nothing stored', async (t) => {
    let r = await script(e, 'setinfo', { VOL_NAME: vol, VOL_METADATA: 'originstname+inst1.example.org' });
    t.equal(r.code, 0, 'setinfo', diag(r));
    t.match(r.stdout, `volume ${vol} metadata originstname+inst1.example.org`);
    r = await script(e, 'setinfo', { VOL_NAME: 'nosuch', VOL_METADATA: 'originstname+x' });
    t.not(r.code, 0, 'setinfo of a missing volume fails');
  });

  t.test('attach/detach: map and unmap, idempotent; the kvm: URI works', async (t) => {
    let r = await arch(e, ['map', vol, '--dry-run']);
    t.equal(r.code, 0, 'map --dry-run', diag(r));
    const dry = r.stdout.trim().split(' ');
    r = await script(e, 'attach', { VOL_NAME: vol });
    t.equal(r.code, 0, 'attach', diag(r));
    const sock = path.join(mapped, 'nbd0.sock');
    t.same(r.stdout.split('\n'), ['/dev/nbd0', `kvm:nbd+unix:///${vol}?socket=${sock}`, ''], 'the device, then the userspace URI');
    t.same(e.calls(), [dry.slice(1)], 'nbd-client ran with map --dry-run\'s command line');
    const pid = (JSON.parse(readFileSync(path.join(mapped, 'nbd0.json'), 'utf8')) as { relay: { pid: number } }).relay.pid;
    t.teardown(() => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } });
    const q = await run('qemu-io', ['-f', 'raw', `nbd+unix:///${vol}?socket=${sock}`, '-c', 'write -P 0x47 0 64k', '-c', 'read -P 0x47 0 64k']);
    t.match(q.stdout, /read 65536\/65536/, 'QEMU reads and writes through the kvm: URI', diag(q));
    r = await script(e, 'attach', { VOL_NAME: vol });
    t.equal(r.stdout.split('\n')[0], '/dev/nbd0', 'attach again: the same device');
    t.equal(e.calls().length, 1, '…and nbd-client was not run again');
    r = await script(e, 'detach', { VOL_NAME: vol });
    t.equal(r.code, 0, 'detach', diag(r));
    t.same(e.calls().at(-1), ['-d', '/dev/nbd0'], 'nbd-client -d');
    t.notOk(existsSync(path.join(mapped, 'nbd0.json')), 'no record left');
    r = await script(e, 'detach', { VOL_NAME: vol });
    t.equal(r.code, 0, 'detach again: nothing to do', diag(r));
    t.equal(e.calls().length, 2, '…and nbd-client was not run');
  });

  t.test('open/close: the daemon takes the lock ahead of time and gives it back', async (t) => {
    let r = await script(e, 'open', { VOL_NAME: vol, VOL_OPEN_EXCLUSIVE: 'True' });
    t.equal(r.code, 0, 'open', diag(r));
    t.match(await info(e, vol), { lock: { pid: d.pid } }, 'the daemon holds the volume\'s lock');
    r = await script(e, 'close', { VOL_NAME: vol });
    t.equal(r.code, 0, 'close', diag(r));
    t.match(await info(e, vol), { lock: null }, 'released');
    r = await script(e, 'open', { VOL_NAME: vol, VOL_OPEN_EXCLUSIVE: 'False' });
    t.equal(r.code, 0, 'open for a migration (shared)', diag(r));
    r = await script(e, 'close', { VOL_NAME: vol });
    t.equal(r.code, 0, 'close', diag(r));
    r = await script(e, 'open', { VOL_NAME: vol, VOL_OPEN_EXCLUSIVE: 'maybe' });
    t.not(r.code, 0, 'a bad VOL_OPEN_EXCLUSIVE is refused');
  });

  t.test('snapshot (through the daemon), then a clone of it (EXTP_ORIGIN)', async (t) => {
    let r = await script(e, 'snapshot', { VOL_NAME: vol, VOL_SNAPSHOT_NAME: `${vol}.snap`, VOL_SNAPSHOT_SIZE: '96' });
    t.equal(r.code, 0, 'snapshot', diag(r));
    t.match(r.stderr, /daemon/, 'taken through the daemon\'s admin socket');
    t.match(await info(e, `${vol}.snap`), { kind: 'snapshot', size: 96 * MiB });
    r = await script(e, 'create', { VOL_NAME: `${vol}c`, VOL_SIZE: '128', EXTP_ORIGIN: `${vol}.snap` });
    t.equal(r.code, 0, 'create from origin', diag(r));
    t.match(await info(e, `${vol}c`), { parent: `${vol}.snap`, size: 128 * MiB }, 'a clone of the snapshot, grown to VOL_SIZE');
    r = await script(e, 'create', { VOL_NAME: `${vol}d`, VOL_SIZE: '128', EXTP_ORIGIN: `${vol}.snap`, EXTP_OBJECT_SIZE: '64K' });
    t.not(r.code, 0, 'origin with object_size is refused');
  });

  t.test('verify: good parameters pass, each bad one is named', async (t) => {
    let r = await script(e, 'verify', { VOL_NAME: vol, EXTP_OBJECT_SIZE: '4M', EXTP_CONNECTIONS: '4', EXTP_ORIGIN: `${vol}.snap` });
    t.equal(r.code, 1, 'origin + object_size: refused');
    r = await script(e, 'verify', { VOL_NAME: vol, EXTP_CONNECTIONS: '4', EXTP_ORIGIN: `${vol}.snap` });
    t.equal(r.code, 0, 'good parameters', diag(r));
    for (const [vars, why] of [
      [{ EXTP_OBJECT_SIZE: '3M' }, /object_size=3M: expected a power of two/],
      [{ EXTP_CONNECTIONS: '0' }, /connections=0: expected 1 to 16/],
      [{ EXTP_FROMSNAP: 'x' }, /unknown parameter fromsnap/],
      [{ EXTP_STORE: 'nonsense://x' }, /settings: .*store/],
      [{ EXTP_CONFIG: path.join(dir, 'missing.conf') }, /config=.*missing\.conf: no such readable file/],
      [{ EXTP_ORIGIN: 'nosuch.snap' }, /origin=nosuch\.snap: no such snapshot/],
      [{ VOL_NAME: 'bad..name' }, /VOL_NAME=bad\.\.name: not a volume name/],
    ] as const) {
      r = await script(e, 'verify', { VOL_NAME: vol, ...vars });
      t.equal(r.code, 1, `verify refuses ${JSON.stringify(vars)}`);
      t.match(r.stderr, why, 'and says why');
    }
  });

  t.test('remove', async (t) => {
    for (const name of [`${vol}c`, `${vol}.snap`, vol, `${vol}x`]) {
      const r = await script(e, 'remove', { VOL_NAME: name });
      t.equal(r.code, 0, `remove ${name}`, diag(r));
      t.equal(await info(e, name), null, `${name} is gone`);
    }
    const r = await script(e, 'remove', { VOL_NAME: vol });
    t.not(r.code, 0, 'removing it again fails (Ganeti: --ignore-failures)');
  });

  t.teardown(async () => { await d.stop(); });
});
