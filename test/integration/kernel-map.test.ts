/**
 * `archipelago map` with the Linux kernel's NBD client, in a QEMU (TCG)
 * guest: the guest attaches /dev/nbd0 with exactly the nbd-client command
 * line `map --dry-run` printed, makes and mounts ext4, and keeps writing
 * (fsync) and re-reading (caches dropped) while the host restarts the daemon
 * (SIGTERM, down 3 s, started again on the same port); then it verifies
 * every file, unmounts, fscks and detaches with `unmap --dry-run`'s command
 * (scripts/kernel-guest/map-mode.sh).
 *
 * On the host, the real `map` runs end to end — relay, record — with the
 * nbd-client it runs replaced by a recorder (the host has no nbd module) and
 * a fake /sys/block; the recorded argv must be the dry-run's. The guest
 * reaches the relay through the harness's guestfwd (10.0.2.100:RELAY_PORT →
 * socat → 127.0.0.1:RELAY_PORT), so the only word translated for the guest is
 * the host address 127.0.0.1 → 10.0.2.100.
 *
 * The control: the same restart under a `--direct` mapping (nbd-client to
 * the daemon itself, as Debian 12's nbd-client 3.24 can do it) breaks the
 * guest's I/O — without it this test would prove nothing.
 *
 * Slow: two guest boots of 20-40 s plus a 40 s I/O phase. Never skipped:
 * scripts/kernel-guest/build.sh installs the guest's tools.
 */
import t from 'tap';
import type { Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, childEnv, startDaemon, type Daemon } from '../helpers/daemon.js';
import { diag, freePort, killChild, run, tempDir } from '../helpers/run.js';
import { tempFileStore } from '../helpers/daemon.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const SMOKE = path.join(ROOT, 'scripts/kernel-nbd-smoke.sh');
const GUEST_TIMEOUT = Number(process.env.GUEST_TIMEOUT ?? 300);
const IO_SECONDS = 40;

t.setTimeout((2 * GUEST_TIMEOUT + 300) * 1000);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `archipelago ARGS` with the mapping environment. */
function arch(args: string[], env: NodeJS.ProcessEnv) {
  return run(process.execPath, [CLI, ...args], { env: childEnv(env), timeoutMs: 90_000 });
}

/** A recorder standing in for nbd-client on the host: logs its argv, plays the device in the fake sysfs. */
async function fakeNbdClient(dir: string, sys: string): Promise<{ path: string; calls(): string[][] }> {
  const log = path.join(dir, 'nbd-client.calls');
  const script = path.join(dir, 'fake-nbd-client');
  await fs.writeFile(script, [
    '#!/bin/sh',
    `printf '%s\\n' "$@" >>'${log}'`,
    `echo -- >>'${log}'`,
    'if [ "$1" = -d ]; then',
    `  rm -f '${sys}/nbd0/pid'; echo 0 >'${sys}/nbd0/size'`,
    'else',
    `  echo $$ >'${sys}/nbd0/pid'; echo 524288 >'${sys}/nbd0/size'`,
    'fi',
  ].join('\n') + '\n', { mode: 0o755 });
  return {
    path: script,
    calls: () => existsSync(log) ? readFileSync(log, 'utf8').split('--\n').filter(Boolean).map((c) => c.trimEnd().split('\n')) : [],
  };
}

interface Guest {
  child: ChildProcess;
  exit: Promise<number | null>;
  out: () => string;
  serial: () => string;
}

/** Boots the guest with the map command line (words joined by commas on the kernel command line). */
function bootGuest(port: number, mapArgv: string[], unmapArgv: string[], serialLog: string): Guest {
  const words = (argv: string[]) => argv.map((w) => (w === '127.0.0.1' ? '10.0.2.100' : w)).join(',');
  const child = spawn('bash', [SMOKE, String(port), 'v'], {
    cwd: ROOT,
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: {
      ...process.env,
      GUEST_TIMEOUT: String(GUEST_TIMEOUT),
      GUEST_LOG: serialLog,
      GUEST_NBD_PORT: String(port),
      GUEST_APPEND: `guestmode=map nbdmap=${words(mapArgv)} nbdunmap=${words(unmapArgv)} mapsecs=${IO_SECONDS}`,
    },
  });
  let out = '';
  child.stdout!.on('data', (b: Buffer) => { out += b.toString(); });
  child.stderr!.on('data', (b: Buffer) => { out += b.toString(); });
  const exit = new Promise<number | null>((r) => child.once('close', (code) => r(code)));
  const serial = () => { try { return readFileSync(serialLog, 'utf8').replace(/\r/g, ''); } catch { return ''; } };
  return { child, exit, out: () => out, serial };
}

async function waitFor(what: string, cond: () => boolean, ms: number, exited: () => boolean): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (exited()) throw new Error(`guest ended before ${what}`);
    if (Date.now() > deadline) throw new Error(`no ${what} within ${ms / 1000} s`);
    await sleep(200);
  }
}

const rounds = (serial: string) => (serial.match(/^MAP IO n=/gm) ?? []).length;
const steps = (serial: string) => serial.split('\n').filter((l) => l.startsWith('STEP '));

/**
 * Restarts the daemon under the guest once it is mounted and writing:
 * SIGTERM (drain, flush), 3 s down, the same port again. Returns the rounds
 * the guest had completed when the new daemon was up.
 */
async function restartUnder(t: Test, g: Guest, exited: () => boolean, d: Daemon, store: string, port: number): Promise<{ d: Daemon; roundsAtRestart: number }> {
  await waitFor('MAP READY', () => /^MAP READY$/m.test(g.serial()), GUEST_TIMEOUT * 1000, exited);
  await waitFor('3 rounds of I/O', () => rounds(g.serial()) >= 3, 60_000, exited);
  t.equal(await d.stop(), 0, 'daemon stopped cleanly (SIGTERM) under the mounted guest');
  await sleep(3000);
  const d2 = await startDaemon(t, { store, extraArgs: ['--listen', `127.0.0.1:${port}`, '--log-level', 'info'] });
  return { d: d2, roundsAtRestart: rounds(g.serial()) };
}

t.test('a mapped volume survives a daemon restart while mounted and written', async (t) => {
  const store = await tempFileStore(t);
  const dir = await tempDir(t, 'archipelago-kmap-');
  const mapped = path.join(dir, 'mapped');
  const sys = path.join(dir, 'sys');
  await fs.mkdir(path.join(sys, 'nbd0'), { recursive: true });
  await fs.writeFile(path.join(sys, 'nbd0', 'size'), '0\n');
  let r = await arch(['create', 'v', '--size', '256M', '--store', `file:${store}`], {});
  t.equal(r.code, 0, 'create', diag(r));
  const port = await freePort();
  let d = await startDaemon(t, { store, extraArgs: ['--listen', `127.0.0.1:${port}`, '--log-level', 'info'] });
  const relayPort = await freePort();
  // The daemon's address comes from its settings, as on a node with a config file.
  const env = { ARCHIPELAGO_LISTEN: `127.0.0.1:${port}`, ARCHIPELAGO_MAPPED_DIR: mapped, ARCHIPELAGO_SYS_BLOCK: sys };
  const mapArgs = ['map', 'v', '--device', '/dev/nbd0', '--relay-listen', `127.0.0.1:${relayPort}`];

  r = await arch([...mapArgs, '--dry-run'], env);
  t.equal(r.code, 0, 'map --dry-run', diag(r));
  const attach = r.stdout.trim().split(' ');
  t.same(attach, ['nbd-client', '127.0.0.1', String(relayPort), '/dev/nbd0', '-N', 'v', '-C', '2', '-t', '120'],
    'map builds: nbd-client to the relay, netlink, 2 connections, 120 s timeout');
  r = await arch(['unmap', '/dev/nbd0', '--dry-run'], env);
  t.equal(r.code, 0, 'unmap --dry-run', diag(r));
  const detach = r.stdout.trim().split(' ');
  t.same(detach, ['nbd-client', '-d', '/dev/nbd0'], 'unmap builds nbd-client -d');

  // The real map on the host: relay started, nbd-client (the recorder) run, record written.
  const fake = await fakeNbdClient(dir, sys);
  r = await arch([...mapArgs, '--nbd-client', fake.path], env);
  t.equal(r.code, 0, 'map', diag(r));
  t.equal(r.stdout, '/dev/nbd0\n', 'map prints the device');
  t.same(fake.calls(), [[...attach.slice(1)]], 'map ran exactly the dry-run command line');
  const record = JSON.parse(await fs.readFile(path.join(mapped, 'nbd0.json'), 'utf8')) as { relay: { pid: number }; attach: string[] };
  t.same(record.attach.slice(1), attach.slice(1), 'the record holds the command line');
  const relayPid = record.relay.pid;
  t.teardown(() => { try { process.kill(relayPid, 'SIGKILL'); } catch { /* gone */ } });
  r = await arch(['showmapped', '--json'], env);
  t.equal(r.code, 0, 'showmapped', diag(r));
  t.match(JSON.parse(r.stdout), [{ device: '/dev/nbd0', volume: 'v', state: 'connected', relayRunning: true }], 'showmapped lists it');

  const serialLog = path.join(dir, 'serial.log');
  const g = bootGuest(relayPort, attach, detach, serialLog);
  let exited = false;
  void g.exit.then(() => { exited = true; });
  t.teardown(() => killChild(g.child, 'SIGTERM'));
  const restarted = await restartUnder(t, g, () => exited, d, store, port);
  d = restarted.d;
  const code = await g.exit;
  const serial = g.serial();
  const total = rounds(serial);
  const failed = steps(serial).filter((l) => !/ OK$/.test(l));
  const slowest = /^MAP ROUNDS (\d+) SLOWEST n=(\d+) cs=(\d+)$/m.exec(serial);
  const relayLog = await fs.readFile(path.join(mapped, 'nbd0.log'), 'utf8').catch(() => '');
  const info = { out: g.out().slice(-3000), serial: serial.split('\n').filter((l) => !l.startsWith('MAP IO')).slice(-60).join('\n'), relayLog: relayLog.slice(-3000) };
  t.equal(code, 0, 'the guest run passed', info);
  t.match(serial, /^RESULT PASS$/m, 'RESULT PASS', info);
  t.same(failed, [], 'every guest step OK (map, mkfs, mount, seed, io, verify, umount, fsck, unmap)', info);
  t.ok(steps(serial).length >= 10, 'the guest ran every step');
  t.notMatch(serial, /^MAP LINK EVENT/m, 'the kernel never noticed the restart');
  t.ok(total - restarted.roundsAtRestart >= 5, `the guest kept writing after the restart (${restarted.roundsAtRestart} rounds before, ${total} in all)`);
  t.ok(slowest && Number(slowest[3]) >= 150, `one round waited through the restart (slowest ${slowest?.[3]} cs)`);
  t.match(relayLog, /reconnected after \d+ ms; resending \d+ requests/, 'the relay reconnected to the new daemon');
  t.comment(`guest: ${total} rounds of I/O, slowest round ${slowest ? Number(slowest[3]) / 100 : '?'} s; ${(/kernel-nbd-smoke: build .*/.exec(g.out()) ?? [''])[0]}`);
  const resent = /reconnected after (\d+) ms; resending (\d+) requests/.exec(relayLog);
  if (resent) t.comment(`relay: reconnected after ${resent[1]} ms, resent ${resent[2]} requests`);

  // The guest detached with nbd-client -d; the host's fake device still
  // says connected, so the relay waits for unmap, as after any client left.
  r = await arch(['unmap', 'v', '--nbd-client', fake.path], env);
  t.equal(r.code, 0, 'unmap by volume name on the host', diag(r));
  t.same(fake.calls().at(-1), ['-d', '/dev/nbd0'], 'unmap ran nbd-client -d');
  t.notOk(existsSync(path.join(mapped, 'nbd0.json')), 'the record is gone');
  const stat = existsSync(`/proc/${relayPid}/stat`) ? readFileSync(`/proc/${relayPid}/stat`, 'utf8') : '';
  t.ok(stat === '' || /^\d+ \(.*\) Z/.test(stat), 'unmap stopped the relay');
  t.equal(await d.stop(), 0, 'daemon stops cleanly');
});

t.test('control: a --direct mapping does not survive the same restart', async (t) => {
  const store = await tempFileStore(t);
  const dir = await tempDir(t, 'archipelago-kmap-direct-');
  let r = await arch(['create', 'v', '--size', '256M', '--store', `file:${store}`], {});
  t.equal(r.code, 0, 'create', diag(r));
  const port = await freePort();
  const d = await startDaemon(t, { store, extraArgs: ['--listen', `127.0.0.1:${port}`, '--log-level', 'info'] });
  // A short kernel timeout, so the failure shows in seconds rather than minutes.
  r = await arch(['map', 'v', '--device', '/dev/nbd0', '--direct', '--timeout', '10', '--dry-run'], { ARCHIPELAGO_LISTEN: `127.0.0.1:${port}` });
  t.equal(r.code, 0, 'map --direct --dry-run', diag(r));
  const attach = r.stdout.trim().split(' ');
  t.same(attach, ['nbd-client', '127.0.0.1', String(port), '/dev/nbd0', '-N', 'v', '-C', '2', '-t', '10'], 'direct: nbd-client to the daemon');
  const g = bootGuest(port, attach, ['nbd-client', '-d', '/dev/nbd0'], path.join(dir, 'serial.log'));
  let exited = false;
  void g.exit.then(() => { exited = true; });
  t.teardown(() => killChild(g.child, 'SIGTERM'));
  const restarted = await restartUnder(t, g, () => exited, d, store, port);
  const code = await g.exit;
  const serial = g.serial();
  t.not(code, 0, 'the guest run failed', { out: g.out().slice(-2000) });
  t.match(serial, /^STEP io FAIL/m, 'its I/O failed across the restart', { serial: serial.split('\n').filter((l) => !l.startsWith('MAP IO')).slice(-40).join('\n') });
  t.equal(await restarted.d.stop(), 0, 'daemon stops cleanly');
});
