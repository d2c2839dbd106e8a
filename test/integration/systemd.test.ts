/**
 * systemd integration: the units in systemd/ pass `systemd-analyze verify`
 * with nothing printed (and a broken copy does print, so the check bites),
 * the service's hardening keeps its exposure score low, and the daemon
 * speaks the notify protocol: READY=1 only once its port accepts NBD
 * clients, STOPPING=1 on SIGTERM before it exits, nothing leaked to the
 * `--run` child, and a broken $NOTIFY_SOCKET costs a log line, not the
 * daemon.
 *
 * systemd is not PID 1 here: `systemd-analyze verify` works offline, and
 * the notify socket is a datagram socket of the test's own (Python: Node
 * cannot bind AF_UNIX datagram sockets). Tools: systemd-analyze and
 * systemd-notify (Debian package systemd, installed here if missing), python3.
 */
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, childEnv } from '../helpers/daemon.js';
import { diag, run, tempDir } from '../helpers/run.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const UNITS = path.join(ROOT, 'systemd');
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';

/** Installs the systemd package (systemd-analyze, systemd-notify) when missing; we run as root in CI. */
async function ensureSystemdTools(): Promise<void> {
  const have = await run('sh', ['-c', 'command -v systemd-analyze && command -v systemd-notify']);
  if (have.code === 0) return;
  const r = await run('apt-get', ['install', '-y', '-qq', '--no-install-recommends', 'systemd'], {
    timeoutMs: 300_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  });
  if (r.code !== 0) throw new Error(`apt-get install systemd failed: ${r.stderr}`);
}

/** The unit files in a scratch directory (verify reads units beside the one named), with a map instance. */
async function unitDir(t: Parameters<typeof tempDir>[0]): Promise<string> {
  const dir = await tempDir(t, 'archipelago-units-');
  for (const f of await fs.readdir(UNITS)) {
    if (!f.endsWith('.service')) continue;
    let text = await fs.readFile(path.join(UNITS, f), 'utf8');
    // The units name /usr/bin/node (NodeSource, Debian); verify checks that it exists.
    if (!existsSync('/usr/bin/node')) text = text.replaceAll('/usr/bin/node', process.execPath);
    await fs.writeFile(path.join(dir, f), text);
  }
  await fs.symlink('archipelago-map@.service', path.join(dir, 'archipelago-map@nbd0.service'));
  return dir;
}

t.before(ensureSystemdTools);

t.test('systemd-analyze verify: the units are clean', async (t) => {
  if (!existsSync('/usr/bin/node')) t.comment(`no /usr/bin/node here: verifying with ExecStart=${process.execPath}`);
  const dir = await unitDir(t);
  for (const unit of ['archipelago.service', 'archipelago-map@.service', 'archipelago-map@nbd0.service']) {
    const r = await run('systemd-analyze', ['verify', path.join(dir, unit)], { cwd: dir });
    t.equal(r.code, 0, `${unit}: exit 0`, diag(r));
    t.equal(r.stdout + r.stderr, '', `${unit}: nothing printed`);
  }
  // The check must bite: a misspelt setting is only a warning (exit 0), but printed.
  const bad = path.join(dir, 'broken.service');
  await fs.writeFile(bad, (await fs.readFile(path.join(dir, 'archipelago.service'), 'utf8')).replace('ProtectClock=', 'ProtectClok='));
  const r = await run('systemd-analyze', ['verify', bad], { cwd: dir });
  t.match(r.stdout + r.stderr, /Unknown key 'ProtectClok'/, 'a broken unit is reported');
});

t.test('systemd-analyze security: the service is hardened', async (t) => {
  const dir = await unitDir(t);
  const r = await run('systemd-analyze', ['security', '--offline=yes', path.join(dir, 'archipelago.service')], { cwd: dir });
  const m = /Overall exposure level for archipelago\.service: ([\d.]+)/.exec(r.stdout + r.stderr);
  t.ok(m, 'an exposure level', diag(r));
  t.comment(`exposure level ${m?.[1]} (0 = locked down, 10 = exposed)`);
  t.ok(Number(m?.[1]) <= 2.5, `exposure ${m?.[1]} ≤ 2.5`);
});

// ------------------------------------------------------------- notify

interface Receiver {
  /** Messages so far: the datagram's text and the receiver's wall-clock time (ms). */
  messages: { msg: string; at: number }[];
  /** Resolves with the first message matching `re`. */
  next(re: RegExp, timeoutMs?: number): Promise<{ msg: string; at: number }>;
}

/** A datagram socket at `sockPath` printing what it receives (closing passed fds, as systemd does with BARRIER=1's). */
async function startReceiver(t: Parameters<typeof tempDir>[0], sockPath: string): Promise<Receiver> {
  const script = [
    'import json, os, socket, sys, time',
    's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
    's.bind(sys.argv[1])',
    'print(json.dumps({"bound": True}), flush=True)',
    'while True:',
    '    msg, anc, flags, addr = s.recvmsg(4096, socket.CMSG_SPACE(64))',
    '    for lvl, typ, data in anc:',
    '        if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:',
    '            for i in range(0, len(data) - len(data) % 4, 4):',
    '                os.close(int.from_bytes(data[i:i + 4], sys.byteorder))',
    '    print(json.dumps({"msg": msg.decode(), "at": time.time() * 1000}), flush=True)',
  ].join('\n');
  const child = spawn(PYTHON, ['-c', script, sockPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => killByPid(child));
  const messages: Receiver['messages'] = [];
  const waiters: { re: RegExp; resolve: (m: { msg: string; at: number }) => void }[] = [];
  let bound!: () => void;
  const isBound = new Promise<void>((r) => { bound = r; });
  let buf = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (s: string) => {
    buf += s;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const rec = JSON.parse(buf.slice(0, nl)) as { bound?: boolean; msg?: string; at?: number };
      buf = buf.slice(nl + 1);
      if (rec.bound) { bound(); continue; }
      const m = { msg: rec.msg!, at: rec.at! };
      messages.push(m);
      for (const w of waiters.splice(0)) {
        if (w.re.test(m.msg)) w.resolve(m);
        else waiters.push(w);
      }
    }
  });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => { err += b; });
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([isBound, new Promise((_, rej) => { timer = setTimeout(() => rej(new Error(`receiver did not start: ${err}`)), 10_000); })]);
  clearTimeout(timer);
  return {
    messages,
    next: (re, timeoutMs = 20_000) => {
      const seen = messages.find((m) => re.test(m.msg));
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no notify message ${re} within ${timeoutMs} ms; got ${JSON.stringify(messages)}`)), timeoutMs);
        waiters.push({ re, resolve: (m) => { clearTimeout(timer); resolve(m); } });
      });
    },
  };
}

function killByPid(child: ChildProcess): void {
  if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
    try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
  }
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

/** Connects and reads the 16-byte NBD greeting ("NBDMAGIC" "IHAVEOPT"); rejects if nothing listens. */
function nbdGreeting(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port });
    let got = Buffer.alloc(0);
    s.on('data', (b: Buffer) => {
      got = Buffer.concat([got, b]);
      if (got.length >= 16) { s.destroy(); resolve(got.subarray(0, 16).toString('latin1')); }
    });
    s.on('error', reject);
    s.setTimeout(5000, () => { s.destroy(); reject(new Error('no greeting')); });
  });
}

function serveEnv(extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const e = childEnv();
  for (const k of Object.keys(e)) if (k.startsWith('ARCHIPELAGO_') || k === 'NOTIFY_SOCKET') delete e[k];
  return { ...e, ARCHIPELAGO_CONFIG: '', ...extra };
}

t.test('notify: READY=1 once the port accepts, STOPPING=1 at SIGTERM, then exit 0', async (t) => {
  const dir = await tempDir(t);
  const sock = path.join(dir, 'notify.sock');
  const rx = await startReceiver(t, sock);
  const port = await freePort();
  await fs.mkdir(path.join(dir, 'store'));
  const daemon = spawn(process.execPath, [CLI, 'serve', '--store', `file:${path.join(dir, 'store')}`, '--listen', `127.0.0.1:${port}`,
    '--metrics', '', '--log-level', 'debug'], { stdio: ['ignore', 'pipe', 'pipe'], env: serveEnv({ NOTIFY_SOCKET: sock }) });
  t.teardown(() => killByPid(daemon));
  let stderr = '';
  daemon.stderr!.on('data', (b: Buffer) => { stderr += b; });
  const exited = new Promise<{ code: number | null; at: number }>((r) => daemon.on('exit', (code) => r({ code, at: Date.now() })));

  const ready = await rx.next(/^READY=1$/m);
  // The moment READY=1 is in, a client must get through.
  t.equal(await nbdGreeting(port), 'NBDMAGICIHAVEOPT', 'at READY=1 the port already answers NBD');
  t.match(ready.msg, new RegExp(`^STATUS=serving port=${port}$`, 'm'), 'READY=1 comes with a STATUS= line');
  t.notOk(rx.messages.some((m) => /STOPPING=1/.test(m.msg)), 'no STOPPING=1 yet');

  daemon.kill('SIGTERM');
  const stopping = await rx.next(/^STOPPING=1$/m);
  const exit = await exited;
  t.equal(exit.code, 0, 'exit 0 after SIGTERM', { stderr });
  t.ok(stopping.at <= exit.at, 'STOPPING=1 arrived before the daemon exited');
  t.match(stopping.msg, /^STATUS=SIGTERM: draining/m);
  const ordered = rx.messages.map((m) => m.msg.split('\n')[0]).filter((m) => m !== 'BARRIER=1');
  t.same(ordered, ['READY=1', 'STOPPING=1'], 'READY=1 then STOPPING=1, nothing else');
  t.notMatch(stderr, /"level":"(error|warn)"/, 'no warning or error logged', { stderr });
  t.match(stderr, /"msg":"systemd notify READY=1 STATUS=serving/, 'the daemon logs (debug) what it told systemd');
});

t.test('notify: the --run child does not inherit NOTIFY_SOCKET', async (t) => {
  const dir = await tempDir(t);
  const sock = path.join(dir, 'notify.sock');
  const rx = await startReceiver(t, sock);
  await fs.mkdir(path.join(dir, 'store'));
  const r = await run(process.execPath, [CLI, 'serve', '--store', `file:${path.join(dir, 'store')}`, '--listen', '127.0.0.1:0', '--metrics', '',
    '--run', 'echo "child sees NOTIFY_SOCKET=${NOTIFY_SOCKET:-unset}"'], { env: serveEnv({ NOTIFY_SOCKET: sock }), timeoutMs: 30_000 });
  t.equal(r.code, 0, diag(r));
  t.match(r.stdout, /^child sees NOTIFY_SOCKET=unset$/m);
  await rx.next(/^READY=1$/m);
});

t.test('notify: an unreachable NOTIFY_SOCKET is logged, and the daemon serves on', async (t) => {
  const dir = await tempDir(t);
  await fs.mkdir(path.join(dir, 'store'));
  const r = await run(process.execPath, [CLI, 'serve', '--store', `file:${path.join(dir, 'store')}`, '--listen', '127.0.0.1:0', '--metrics', '',
    '--run', 'sleep 0.5; echo served'], { env: serveEnv({ NOTIFY_SOCKET: path.join(dir, 'nobody-listens.sock') }), timeoutMs: 30_000 });
  t.equal(r.code, 0, 'served anyway', diag(r));
  t.match(r.stdout, /^served$/m);
  t.match(r.stderr, /"level":"error","msg":"systemd notify READY=1: /, 'one error line says why', diag(r));
});
