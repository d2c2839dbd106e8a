/**
 * `archipelago map`/`unmap`/`showmapped` on the host, and the relay they
 * start. The host has no nbd module, so nbd-client is a recorder that plays
 * the device in a fake /sys/block (ARCHIPELAGO_SYS_BLOCK); the real kernel
 * attach is test/integration/kernel-map.test.ts's. The relay itself is real
 * and is exercised by a real NBD client, qemu-io (no reconnect option of its
 * own): a daemon restart under it costs a slow request, not an error, and a
 * daemon that stays away longer than the reconnect window fails the request.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { CLI, childEnv, startDaemon, tempFileStore } from '../helpers/daemon.js';
import { diag, freePort, killChild, run, tempDir } from '../helpers/run.js';

const KiB = 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function arch(args: string[], env: NodeJS.ProcessEnv) {
  return run(process.execPath, [CLI, ...args], { env: childEnv(env), timeoutMs: 60_000 });
}

interface Setup {
  store: string;
  port: number;
  dir: string;
  mapped: string;
  sys: string;
  env: NodeJS.ProcessEnv;
  fake: string;
  calls(): string[][];
}

/** A store with volume v (8 MiB), a daemon, a fake sysfs with nbd0 (connected elsewhere) and nbd1, nbd2 (free). */
async function setup(t: Parameters<typeof tempDir>[0] & { teardown(fn: () => unknown): void }): Promise<Setup & { daemon: Awaited<ReturnType<typeof startDaemon>> }> {
  const store = await tempFileStore(t);
  const dir = await tempDir(t, 'archipelago-map-');
  const mapped = path.join(dir, 'mapped');
  const sys = path.join(dir, 'sys');
  for (const n of ['nbd0', 'nbd1', 'nbd2']) {
    await fs.mkdir(path.join(sys, n), { recursive: true });
    await fs.writeFile(path.join(sys, n, 'size'), n === 'nbd0' ? '2048\n' : '0\n');
  }
  await fs.writeFile(path.join(sys, 'nbd0', 'pid'), '1\n');
  const r = await arch(['create', 'v', '--size', '8M', '--object-size', '64K', '--store', `file:${store}`], {});
  if (r.code !== 0) throw new Error(`create: ${r.stderr}`);
  const port = await freePort();
  const daemon = await startDaemon(t, { store, extraArgs: ['--listen', `127.0.0.1:${port}`] });
  // The recorder: logs argv; attach connects the device named in it, -d disconnects; FAIL_NBD_CLIENT=1 fails.
  const log = path.join(dir, 'calls');
  const fake = path.join(dir, 'fake-nbd-client');
  await fs.writeFile(fake, [
    '#!/bin/sh',
    `printf '%s\\n' "$@" >>'${log}'; echo -- >>'${log}'`,
    'if [ -n "$FAIL_NBD_CLIENT" ]; then echo "Error: Socket failed: Connection refused" >&2; echo Exiting. >&2; exit 1; fi',
    'for a in "$@"; do case "$a" in /dev/nbd*) dev=${a#/dev/} ;; esac; done',
    `if [ "$1" = -d ]; then rm -f '${sys}'/$dev/pid; echo 0 >'${sys}'/$dev/size; else echo $$ >'${sys}'/$dev/pid; echo 16384 >'${sys}'/$dev/size; fi`,
  ].join('\n') + '\n', { mode: 0o755 });
  const env = { ARCHIPELAGO_LISTEN: `127.0.0.1:${port}`, ARCHIPELAGO_MAPPED_DIR: mapped, ARCHIPELAGO_SYS_BLOCK: sys, ARCHIPELAGO_NBD_CLIENT: fake };
  const calls = () => existsSync(log) ? readFileSync(log, 'utf8').split('--\n').filter(Boolean).map((c) => c.trimEnd().split('\n')) : [];
  return { store, port, dir, mapped, sys, env, fake, calls, daemon };
}

function relayPidOf(mapped: string, dev: string): number {
  return (JSON.parse(readFileSync(path.join(mapped, `${dev}.json`), 'utf8')) as { relay: { pid: number } }).relay.pid;
}

/** Running, and not a zombie waiting for init to reap it. */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

t.test('map picks a free device, records it; showmapped; unmap by device', async (t) => {
  const s = await setup(t);
  let r = await arch(['map', 'v'], s.env);
  t.equal(r.code, 0, 'map', diag(r));
  t.equal(r.stdout, '/dev/nbd1\n', 'nbd0 is connected elsewhere: nbd1');
  const sock = path.join(s.mapped, 'nbd1.sock');
  t.same(s.calls()[0], ['-unix', sock, '/dev/nbd1', '-N', 'v', '-C', '2', '-t', '120'], 'nbd-client to the relay\'s Unix socket');
  const pid = relayPidOf(s.mapped, 'nbd1');
  t.teardown(() => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } });
  t.ok(alive(pid), 'the relay runs after map returned');
  // The relay serves the volume: a real client through its socket.
  const q = await run('qemu-io', ['-f', 'raw', `nbd+unix:///v?socket=${sock}`, '-c', `write -P 0x5a 0 ${64 * KiB}`, '-c', `read -P 0x5a 0 ${64 * KiB}`]);
  t.match(q.stdout, /read 65536\/65536/, 'I/O through the relay', diag(q));
  r = await arch(['map', 'v'], s.env);
  t.equal(r.stdout, '/dev/nbd2\n', 'a second map of the same volume takes the next device', diag(r));
  t.teardown(() => { try { process.kill(relayPidOf(s.mapped, 'nbd2'), 'SIGKILL'); } catch { /* gone */ } });

  r = await arch(['showmapped'], s.env);
  t.equal(r.code, 0, 'showmapped', diag(r));
  t.match(r.stdout, /^\/dev\/nbd1 {2}v {2}tcp:127\.0\.0\.1:\d+ {2}via relay {2}connected$/m, 'text line for nbd1');
  r = await arch(['unmap', 'v'], s.env);
  t.equal(r.code, 2, 'unmap VOLUME mapped twice: usage error');
  t.match(r.stderr, /mapped on \/dev\/nbd1, \/dev\/nbd2: name the device/);

  // A device the kernel dropped: the record is stale.
  await fs.rm(path.join(s.sys, 'nbd2', 'pid'));
  await fs.writeFile(path.join(s.sys, 'nbd2', 'size'), '0\n');
  r = await arch(['showmapped', '--json'], s.env);
  const rows = JSON.parse(r.stdout) as { device: string; state: string; relayRunning: boolean }[];
  t.match(rows, [{ device: '/dev/nbd1', state: 'connected', relayRunning: true }, { device: '/dev/nbd2', state: 'not connected' }], 'showmapped --json says which is stale');
  r = await arch(['showmapped'], s.env);
  t.match(r.stdout, /\/dev\/nbd2 .*not connected \(stale record: archipelago unmap \/dev\/nbd2 removes it\)/);

  const before = s.calls().length;
  r = await arch(['unmap', '/dev/nbd2'], s.env);
  t.equal(r.code, 0, 'unmap of a stale record', diag(r));
  t.match(r.stdout, /unmapped \/dev\/nbd2 \(volume v\) \(it was no longer connected\)/);
  t.equal(s.calls().length, before, 'nothing to disconnect: nbd-client not run');

  r = await arch(['unmap', '/dev/nbd1'], s.env);
  t.equal(r.code, 0, 'unmap', diag(r));
  t.same(s.calls().at(-1), ['-d', '/dev/nbd1'], 'nbd-client -d');
  // The recorder does not close the relay's connections as a kernel would: unmap stops it.
  t.notOk(alive(pid), 'the relay is stopped');
  t.notOk(existsSync(path.join(s.mapped, 'nbd1.json')), 'record removed');
  r = await arch(['showmapped'], s.env);
  t.equal(r.stdout, 'no mapped devices\n');
  t.equal(await s.daemon.stop(), 0);
});

t.test('map refuses, and leaves nothing behind', async (t) => {
  const s = await setup(t);
  const leftovers = async () => (await fs.readdir(s.mapped).catch(() => [] as string[])).sort();
  let r = await arch(['map', 'nosuch', '--device', '/dev/nbd1'], s.env);
  t.equal(r.code, 1, 'a volume the daemon does not serve', diag(r));
  t.match(r.stderr, /^archipelago: map: .*unknown export "nosuch"/m);
  r = await arch(['map', 'v', '--device', '/dev/nbd1'], { ...s.env, FAIL_NBD_CLIENT: '1' });
  t.equal(r.code, 1, 'nbd-client fails', diag(r));
  t.match(r.stderr, /^archipelago: \S*fake-nbd-client -unix \S+ \/dev\/nbd1 -N v .*: Error: Socket failed: Connection refused$/m, 'its message, one line');
  t.same((await leftovers()).filter((f) => !f.endsWith('.log')), [], 'no record, claim or socket left');
  r = await arch(['map', 'v', '--device', '/dev/nbd0'], s.env);
  t.equal(r.code, 2, 'a device in use', diag(r));
  t.match(r.stderr, /\/dev\/nbd0 is in use by another client/);
  r = await arch(['map', 'v', '--device', '/dev/nbd7'], s.env);
  t.equal(r.code, 2, 'no such device');
  t.match(r.stderr, /no such NBD device .*modprobe nbd/);
  r = await arch(['map', 'v', '--timeout', '30', '--reconnect-timeout', '60', '--dry-run'], s.env);
  t.equal(r.code, 2, 'kernel timeout below the reconnect window');
  t.match(r.stderr, /--timeout 30 must exceed --reconnect-timeout 60/);
  r = await arch(['map', 'v', '--direct', '--device', 'nbd1', '--server', '/run/a.sock', '--dry-run'], s.env);
  t.equal(r.stdout, `${s.fake} -unix /run/a.sock /dev/nbd1 -N v -C 2 -t 120\n`, '--direct --server unix path', diag(r));
  r = await arch(['map', 'v', '--direct', '--device', 'nbd1', '--server', 'example.org', '--port', '10999', '--dry-run'], s.env);
  t.equal(r.stdout, `${s.fake} example.org 10999 /dev/nbd1 -N v -C 2 -t 120\n`, '--server HOST --port P', diag(r));
  r = await arch(['map', 'v', '--device', '/dev/nbd1'], s.env);
  t.equal(r.code, 0, 'map', diag(r));
  t.teardown(() => { try { process.kill(relayPidOf(s.mapped, 'nbd1'), 'SIGKILL'); } catch { /* gone */ } });
  r = await arch(['map', 'v', '--device', '/dev/nbd1'], s.env);
  t.equal(r.code, 2, 'already mapped');
  t.match(r.stderr, /\/dev\/nbd1 is already mapped \(volume v\): unmap it first/);
  r = await arch(['unmap', 'other'], s.env);
  t.equal(r.code, 2, 'unmap of a volume not mapped');
  t.match(r.stderr, /volume other is not mapped/);
  r = await arch(['unmap', '/dev/nbd1'], s.env);
  t.equal(r.code, 0, 'unmap', diag(r));
  t.equal(await s.daemon.stop(), 0);
});

/** qemu-io through the relay: write + flush, a pause during which the daemon restarts, write + flush, read both. */
function qemuIoAcross(sock: string) {
  const child = spawn('stdbuf', ['-oL', 'qemu-io', '-f', 'raw', `nbd+unix:///v?socket=${sock}`,
    '-c', `write -P 0x11 0 ${64 * KiB}`, '-c', 'flush', '-c', 'sleep 1500',
    '-c', `write -P 0x22 ${64 * KiB} ${64 * KiB}`, '-c', 'flush',
    '-c', `read -P 0x11 0 ${64 * KiB}`, '-c', `read -P 0x22 ${64 * KiB} ${64 * KiB}`], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  child.stdout.on('data', (b: Buffer) => { out += b.toString(); });
  child.stderr.on('data', (b: Buffer) => { out += b.toString(); });
  const exit = new Promise<number | null>((r) => child.once('close', (c) => r(c)));
  return { child, exit, out: () => out };
}

for (const [name, downMs, reconnect, survives] of [
  ['a restart within the reconnect window costs a slow request, not an error', 3000, 30, true],
  ['a daemon away longer than the reconnect window fails the request (EIO)', 6000, 2, false],
] as const) {
  t.test(`relay: ${name}`, async (t) => {
    const s = await setup(t);
    const r = await arch(['map', 'v', '--device', '/dev/nbd1', '--reconnect-timeout', String(reconnect)], s.env);
    t.equal(r.code, 0, 'map', diag(r));
    const pid = relayPidOf(s.mapped, 'nbd1');
    t.teardown(() => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } });
    const q = qemuIoAcross(path.join(s.mapped, 'nbd1.sock'));
    t.teardown(() => killChild(q.child));
    for (let i = 0; i < 100 && !q.out().includes('wrote 65536/65536'); i++) await sleep(100);
    t.equal(await s.daemon.stop(), 0, 'daemon stopped (SIGTERM) under the client');
    await sleep(downMs);
    const d2 = await startDaemon(t, { store: s.store, extraArgs: ['--listen', `127.0.0.1:${s.port}`] });
    const code = await q.exit;
    const log = await fs.readFile(path.join(s.mapped, 'nbd1.log'), 'utf8');
    if (survives) {
      t.equal(code, 0, 'qemu-io finished', { out: q.out() });
      t.notMatch(q.out(), /error|failed/i, 'no I/O error', { out: q.out() });
      t.equal((q.out().match(/read 65536\/65536/g) ?? []).length, 2, 'both patterns read back');
      t.match(log, /reconnected after \d+ ms; resending 1 requests/, 'the relay replayed the waiting write');
    } else {
      t.match(q.out(), /write failed: Input\/output error/, 'the write fails once the window has passed', { out: q.out() });
      t.match(log, /no connection to the server for 2 s/, 'the relay says why');
    }
    const un = await arch(['unmap', '/dev/nbd1'], s.env);
    t.equal(un.code, 0, 'unmap', diag(un));
    t.equal(await d2.stop(), 0, 'daemon stops cleanly');
  });
}
