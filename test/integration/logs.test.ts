/**
 * What the daemon logs at info, checked on the real daemon: every line is
 * one JSON object; the events an operator needs are there (start, listeners,
 * connection opened/closed with peer and export, volume opened/closed, a
 * failed handshake and why, an unknown export, a backend error with its
 * object and code, each shutdown step); requests themselves are not (a
 * session of a hundred requests costs a handful of lines); and under
 * journald ($JOURNAL_STREAM names stderr) each line carries its syslog
 * priority, "<6>{…}".
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { CLI, childEnv } from '../helpers/daemon.js';
import { diag, run, tempDir } from '../helpers/run.js';

interface Line { level: string; msg: string; [k: string]: unknown }

/** Parses stderr: every non-empty line must be (an optional "<N>" and) one JSON object. */
function parse(t: { fail(m: string): void }, text: string): { lines: Line[]; priorities: string[] } {
  const lines: Line[] = [];
  const priorities: string[] = [];
  for (const raw of text.split('\n')) {
    if (raw === '') continue;
    const m = /^(<\d>)?(.*)$/.exec(raw)!;
    try {
      lines.push(JSON.parse(m[2]!) as Line);
      priorities.push(m[1] ?? '');
    } catch {
      t.fail(`not a JSON line: ${raw}`);
    }
  }
  return { lines, priorities };
}

interface Serving {
  port: number;
  /** SIGTERM, wait for the exit; resolves with the exit code. */
  stop(): Promise<number | null>;
  /** Stderr so far (when it goes to a pipe). */
  stderr(): string;
}

function env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const e = childEnv();
  for (const k of Object.keys(e)) if (k.startsWith('ARCHIPELAGO_') || k === 'NOTIFY_SOCKET' || k === 'JOURNAL_STREAM') delete e[k];
  return { ...e, ARCHIPELAGO_CONFIG: '', ...extra };
}

/** `serve --log-level info` on `store`; stderr to a pipe, or to the file descriptor `stderrFd`. */
async function serve(t: { teardown(fn: () => unknown): void }, store: string, o: { stderrFd?: number; env?: NodeJS.ProcessEnv } = {}): Promise<Serving> {
  const child = spawn(process.execPath, [CLI, 'serve', '--store', `file:${store}`, '--listen', '127.0.0.1:0', '--metrics', '', '--log-level', 'info'], {
    stdio: ['ignore', 'pipe', o.stderrFd ?? 'pipe'], env: env(o.env),
  });
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); });
  let err = '';
  child.stderr?.on('data', (b: Buffer) => { err += b; });
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (b: Buffer) => {
      out += b;
      const m = /^READY port=(\d+)/m.exec(out);
      if (m) resolve(Number(m[1]));
    });
    void exited.then((code) => reject(new Error(`serve exited ${code} before READY: ${err}`)));
  });
  return {
    port,
    stderr: () => err,
    stop: async () => { child.kill('SIGTERM'); return exited; },
  };
}

/** A raw client: reads the 18-byte greeting, sends `bytes`, resolves when the server closes. */
function rawHandshake(port: number, bytes: Buffer): Promise<void> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    let got = 0;
    s.on('data', (b: Buffer) => {
      if (got < 18 && (got += b.length) >= 18) s.write(bytes);
    });
    s.on('error', () => {});
    s.on('close', () => resolve());
  });
}

/** Data objects (d.*) of a file store: their paths. */
async function dataObjects(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fsp.readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile() && e.name.startsWith('d.')) out.push(path.join(e.parentPath ?? (e as unknown as { path: string }).path, e.name));
  }
  return out;
}

function find(lines: Line[], re: RegExp): Line | undefined {
  return lines.find((l) => re.test(l.msg));
}

t.test('the events that matter, one JSON line each, and nothing per request', async (t) => {
  const dir = await tempDir(t);
  const store = path.join(dir, 'store');
  await fsp.mkdir(store);
  let r = await run(process.execPath, [CLI, 'create', 'v', '--size', '4M', '--object-size', '64K', '--store', `file:${store}`], { env: env() });
  t.equal(r.code, 0, diag(r));

  const d = await serve(t, store);
  // A session of 100 requests: 50 writes, 50 reads.
  const cmds = Array.from({ length: 50 }, (_, i) => ['-c', `write -P ${i + 1} ${i * 65536} 4k`, '-c', `read -P ${i + 1} ${i * 65536} 4k`]).flat();
  r = await run('qemu-io', ['-f', 'raw', ...cmds, `nbd://127.0.0.1:${d.port}/v`], { timeoutMs: 60_000 });
  t.equal(r.code, 0, 'qemu-io: 100 requests', diag(r));
  t.notMatch(r.stdout + r.stderr, /fail|error|Pattern verification/i, diag(r));
  // A client that breaks the protocol, one with a bad option, one asking for a volume that is not there.
  await rawHandshake(d.port, Buffer.from([0xff, 0xff, 0xff, 0xff]));
  const badOption = Buffer.alloc(4 + 16);
  badOption.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES, then a header without IHAVEOPT
  await rawHandshake(d.port, badOption);
  r = await run('qemu-img', ['info', `nbd://127.0.0.1:${d.port}/no-such-volume`], { timeoutMs: 30_000 });
  t.not(r.code, 0, 'qemu-img info of a missing volume fails');
  t.equal(await d.stop(), 0, 'SIGTERM: exit 0');

  const { lines } = parse(t, d.stderr());
  t.ok(lines.every((l) => typeof l.time === 'string' && ['info', 'warn', 'error'].includes(l.level) && typeof l.msg === 'string'),
    'every line has time, level (info and up) and msg');
  t.match(find(lines, /^archipelago .* starting$/), { level: 'info', pid: Number, config: null }, 'start-up line');
  t.match(find(lines, /^listening on 127\.0\.0\.1:\d+$/), { component: 'nbd' }, 'the listener');
  t.match(find(lines, /^serving store file:/), { level: 'info' });

  const opened = find(lines, /^connection opened: export "v"$/);
  t.match(opened, { level: 'info', component: 'nbd', export: 'v', peer: /^127\.0\.0\.1:\d+$/ }, 'connection opened, with peer and export');
  const closed = find(lines, /^connection closed: export "v": /);
  t.match(closed, { level: 'info', export: 'v', peer: opened?.peer, reason: 'client sent NBD_CMD_DISC', ms: Number }, 'connection closed, why, and how long');
  t.match(find(lines, /^volume v opened$/), { component: 'volume', volume: 'v', size: 4 * 1024 * 1024 }, 'volume opened');
  t.match(find(lines, /^volume v closed$/), { component: 'volume', volume: 'v' }, 'volume closed');
  // Lines of this session (its connection, its volume) between its open and close: the
  // next clients' lines may come before its close line (closing persists the map, releases the lock).
  const session = lines.slice(lines.indexOf(opened!), lines.indexOf(closed!) + 1)
    .filter((l) => l.peer === opened?.peer || l.volume === 'v');
  t.ok(session.length <= 4, `the 100-request session logged ${session.length} lines (≤ 4)`, { session });
  t.notOk(lines.some((l) => /NBD_CMD_(READ|WRITE)/.test(l.msg)), 'no request is logged at info');

  t.match(find(lines, /unknown client flags/), {
    level: 'warn', msg: 'handshake failed: handshake: unknown client flags 0xffffffff', reason: 'protocol', peer: /^127\.0\.0\.1:\d+$/,
  }, 'a failed handshake logs its reason and peer');
  t.match(find(lines, /bad option magic/), { level: 'warn', reason: 'protocol' }, 'bad option magic');
  t.match(find(lines, /^handshake: NBD_OPT_GO: unknown export "no-such-volume"$/), { level: 'info', export: 'no-such-volume' },
    'an unknown export is named');

  const steps = lines.filter((l) => /^(SIGTERM|shutdown|shut down)/.test(l.msg)).map((l) => l.msg);
  t.match(steps, [
    'SIGTERM: stopping',
    'shutdown: stopping listeners, draining connections',
    'shutdown: connections closed; flushing and closing volumes',
    'shutdown: volumes closed; closing the store',
    'shut down cleanly',
  ], 'every shutdown step, in order');
});

t.test('a backend error names the object and its code; under journald lines carry their priority', async (t) => {
  const dir = await tempDir(t);
  const store = path.join(dir, 'store');
  await fsp.mkdir(store);
  let r = await run(process.execPath, [CLI, 'create', 'v', '--size', '1M', '--object-size', '64K', '--store', `file:${store}`], { env: env() });
  t.equal(r.code, 0, diag(r));
  const first = await serve(t, store);
  r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 64k', `nbd://127.0.0.1:${first.port}/v`], { timeoutMs: 30_000 });
  t.equal(r.code, 0, diag(r));
  t.equal(await first.stop(), 0);
  const objects = await dataObjects(store);
  t.equal(objects.length, 1, 'one data object written');
  await fsp.rm(objects[0]!);

  // stderr to a file whose device:inode is in $JOURNAL_STREAM, as systemd does.
  const logFile = path.join(dir, 'stderr.log');
  const fd = fs.openSync(logFile, 'w');
  const st = fs.fstatSync(fd);
  const d = await serve(t, store, { stderrFd: fd, env: { JOURNAL_STREAM: `${st.dev}:${st.ino}` } });
  fs.closeSync(fd);
  r = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', `nbd://127.0.0.1:${d.port}/v`], { timeoutMs: 30_000 });
  t.match(r.stdout + r.stderr, /read failed: Input\/output error/, 'the client gets EIO', diag(r));
  t.equal(await d.stop(), 0);

  const { lines, priorities } = parse(t, await fsp.readFile(logFile, 'utf8'));
  const want: Record<string, string> = { debug: '<7>', info: '<6>', warn: '<4>', error: '<3>' };
  t.ok(lines.length > 5, `${lines.length} lines`);
  t.ok(lines.every((l, i) => priorities[i] === want[l.level]), 'each line starts with its syslog priority');
  const failed = lines.find((l) => /^NBD_CMD_READ: offset 0 length 4096: /.test(l.msg));
  const object = path.basename(objects[0]!);
  t.match(failed, {
    level: 'warn', export: 'v', reply: 'EIO', peer: /^127\.0\.0\.1:\d+$/,
    err: { code: 'EIO', cause: { name: 'BlockerError', code: 'ENOENT', op: 'read', object } },
  }, `the failed read names the object (${object}) and the backend's code`, { failed });
});
