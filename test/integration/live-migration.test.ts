/**
 * QEMU live migration across two daemons that share only the object store
 * (issue 6, docs/locks.md "Live migration"):
 *
 *   guest (Debian kernel + busybox initramfs, TCG) ── virtio-blk ── QEMU src ── NBD ── daemon A ─┐
 *        │ migrate (QMP, tcp on 127.0.0.1)                                                     ├─ one store (files; RADOS too)
 *        ▼                                                                                      │
 *   the same guest, running on                              QEMU dst ── NBD ── daemon B ─┘
 *
 * QEMU itself is the NBD client (-drive file=nbd://…). The guest
 * (scripts/kernel-guest/migrate-mode.sh) writes records seq=1,2,3… to
 * consecutive 4 KiB slots, each with O_DIRECT + fsync, and reports every
 * durable one on its serial console. The test migrates it from the source
 * QEMU (on A) to a destination QEMU started with `-incoming defer` (on B),
 * lets it write more records through B (the paused source still connected to
 * A, where a reader must meanwhile see every durable record), quits the
 * source, stops the guest, and then reads the volume back, through A and
 * through a fresh daemon after A and B stopped: records 1..last must all be
 * there, in their slots, intact, and nothing after them. Two daemons serving
 * one volume without the per-volume lock may lose records or serve stale
 * ones (without it, the reader on A gets zeroes from the objects B created);
 * this is what the test exists to catch.
 *
 * A relay in front of each daemon (test/helpers/nbd-tap.ts) records what each
 * QEMU sent and when: the test logs that timeline and QMP's migration figures.
 *
 * Env: LIVE_MIGRATION_DAEMONS=1 serves both QEMUs from one daemon (checks the
 * harness itself; the default, 2, is the real test). WORK: the guest build
 * cache (default /tmp/archipelago-kernel-guest, shared with the kernel-client
 * test). Slow: a TCG boot is 10-40 s on a loaded 2-core machine.
 */
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { cli, startDaemon, type Daemon } from '../helpers/daemon.js';
import { TEST_BACKEND, tempStore } from '../helpers/stores.js';
import { diag, freePort, run } from '../helpers/run.js';
import { QmpClient } from '../helpers/qmp.js';
import { NbdTap, tapTimeline, type NbdTapEvent } from '../helpers/nbd-tap.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const WORK = process.env.WORK ?? '/tmp/archipelago-kernel-guest';
const DAEMONS = process.env.LIVE_MIGRATION_DAEMONS === '1' ? 1 : 2;
/** Records the guest writes on the source before the migration starts. */
const BEFORE = 40;
/** Records the guest must write on the destination after the switchover before it is stopped. */
const AFTER = 48;
/**
 * Records written on the destination before the source QEMU quits: more than
 * an object holds (OBJECT_SIZE), so some are in objects that B created.
 */
const QUIT_AFTER = 24;
const SLOT = 4096;
const VOLUME_MIB = 64;
/**
 * Small objects (16 records each), so the destination keeps creating objects
 * that daemon A's cached map of the volume has never seen.
 */
const OBJECT_SIZE = '64K';

t.setTimeout(15 * 60_000);

// ---------------------------------------------------------------- records ----

/** The record migrate-mode.sh writes for `seq` (its format is documented there). */
function record(seq: number): Buffer {
  const s8 = String(seq).padStart(8, '0');
  const body = Buffer.from(`archipelago live migration seq=${s8}\n`.repeat(101)).subarray(0, 4008);
  const sum = crypto.createHash('sha256').update(body).digest('hex');
  const trailer = Buffer.from(`\n${`seq=${s8} sha256=${sum}`.padEnd(86)}\n`);
  return Buffer.concat([body, trailer]);
}

interface RecordCheck {
  /** Slots 1..last that do not hold their record (at most 20 listed). */
  bad: number[];
  badCount: number;
  /** Slots after `last` that are not all zeroes (at most 20 listed; not checked while the guest still writes). */
  stray: number[];
}

/** Checks slots 1..last; with `final`, also that every slot after `last` is still zeroes. */
function checkRecords(disk: Buffer, last: number, final = true): RecordCheck {
  const bad: number[] = [];
  let badCount = 0;
  for (let s = 1; s <= last; s++) {
    if (!disk.subarray(s * SLOT, (s + 1) * SLOT).equals(record(s))) {
      badCount++;
      if (bad.length < 20) bad.push(s);
    }
  }
  const stray: number[] = [];
  for (let s = last + 1; final && (s + 1) * SLOT <= disk.length && stray.length < 20; s++) {
    const slot = disk.subarray(s * SLOT, (s + 1) * SLOT);
    if (slot.some((b) => b !== 0)) stray.push(s);
  }
  return { bad, badCount, stray };
}

/** What one slot holds, for a failure message: its first line, or "zeroes". */
function describeSlot(disk: Buffer, s: number): string {
  const slot = disk.subarray(s * SLOT, (s + 1) * SLOT);
  if (slot.every((b) => b === 0)) return 'zeroes';
  return JSON.stringify(slot.subarray(0, 48).toString('latin1'));
}

// ---------------------------------------------------------------- console ----

interface ConsoleLine { at: number; text: string }

/**
 * The guest's serial port, through QEMU's `-chardev socket,server=on`: lines
 * as they arrive (timestamped), waits on them, and input to the guest.
 */
class GuestConsole {
  readonly lines: ConsoleLine[] = [];
  private partial = '';
  private listeners = new Set<() => void>();
  private ended = false;

  private constructor(private readonly socket: net.Socket, readonly name: string) {
    socket.setEncoding('latin1');
    socket.on('data', (s: string) => {
      const parts = (this.partial + s).replace(/\r/g, '').split('\n');
      this.partial = parts.pop()!;
      const at = Date.now();
      for (const text of parts) this.lines.push({ at, text });
      this.notify();
    });
    socket.on('error', () => { /* 'close' follows */ });
    socket.on('close', () => { this.ended = true; this.notify(); });
  }

  static async connect(file: string, name: string, timeoutMs = 30_000): Promise<GuestConsole> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const s = await new Promise<net.Socket>((resolve, reject) => {
          const c = net.connect(file);
          c.once('connect', () => { c.removeListener('error', reject); resolve(c); });
          c.once('error', reject);
        });
        return new GuestConsole(s, name);
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`${name} serial ${file}: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** The first line (from line index `from`) matching `re`; rejects on timeout or when the port closes. */
  waitLine(re: RegExp, timeoutMs: number, from = 0): Promise<{ line: ConsoleLine; match: RegExpMatchArray }> {
    return new Promise((resolve, reject) => {
      let i = from;
      const check = () => {
        for (; i < this.lines.length; i++) {
          const m = re.exec(this.lines[i]!.text);
          if (m) return done(null, { line: this.lines[i]!, match: m });
        }
        if (this.ended) done(new Error(`${this.name}: console closed before ${re}`));
      };
      const timer = setTimeout(() => done(new Error(`${this.name}: no console line ${re} within ${timeoutMs} ms`)), timeoutMs);
      const done = (err: Error | null, v?: { line: ConsoleLine; match: RegExpMatchArray }) => {
        clearTimeout(timer);
        this.listeners.delete(check);
        if (err) reject(err); else resolve(v!);
      };
      this.listeners.add(check);
      check();
    });
  }

  /** Sequence numbers the guest reported durable on this console, with when. */
  fsynced(): { seq: number; at: number }[] {
    const out: { seq: number; at: number }[] = [];
    for (const l of this.lines) {
      const m = /^MIG fsynced seq=(\d+)/.exec(l.text);
      if (m) out.push({ seq: Number(m[1]), at: l.at });
    }
    return out;
  }

  write(s: string): void { this.socket.write(s); }
  close(): void { this.socket.destroy(); }
  tail(n: number): string { return this.lines.slice(-n).map((l) => l.text).join('\n'); }

  private notify(): void { for (const l of [...this.listeners]) l(); }
}

// ------------------------------------------------------------------- QEMU ----

interface Qemu {
  name: string;
  child: ChildProcess;
  qmp: QmpClient;
  console: GuestConsole;
  startedAt: number;
  exited: Promise<void>;
  readonly running: boolean;
}

/**
 * Starts a guest QEMU (TCG, no network) whose virtio-blk disk is `nbdUri`,
 * with its serial port and QMP on Unix sockets in `dir`; `extra` are more
 * arguments (the destination's -incoming). Killed in the teardown.
 */
async function startQemu(tt: Test, dir: string, name: string, nbdUri: string, extra: string[] = []): Promise<Qemu> {
  const serial = path.join(dir, `${name}.serial`);
  const qmpPath = path.join(dir, `${name}.qmp`);
  const args = [
    '-name', name, '-accel', 'tcg', '-cpu', 'max', '-smp', '1', '-m', '256',
    '-nodefaults', '-no-reboot', '-display', 'none',
    '-kernel', path.join(WORK, 'vmlinuz'), '-initrd', path.join(WORK, 'initrd.img'),
    '-append', `console=ttyS0 panic=-1 quiet rdinit=/init guestmode=migrate migcount=${VOLUME_MIB * 256 - 1}`,
    '-drive', `file=${nbdUri},format=raw,if=none,id=d0,cache=none`,
    '-device', 'virtio-blk-pci,drive=d0,id=vd0',
    '-chardev', `socket,id=ser0,path=${serial},server=on,wait=off,logfile=${serial}.log`,
    '-serial', 'chardev:ser0',
    '-qmp', `unix:${qmpPath},server=on,wait=off`,
    ...extra,
  ];
  const err = fs.openSync(path.join(dir, `${name}.stderr`), 'w');
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', err, err] });
  fs.closeSync(err);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const running = () => child.exitCode === null && child.signalCode === null;
  tt.teardown(async () => {
    if (running() && child.pid) {
      try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
      await exited;
    }
  });
  const failedEarly = exited.then(() => { throw new Error(`${name}: QEMU exited (${child.exitCode ?? child.signalCode}): ${fs.readFileSync(path.join(dir, `${name}.stderr`), 'utf8')}`); });
  const console = await Promise.race([GuestConsole.connect(serial, name), failedEarly]);
  const qmp = await Promise.race([QmpClient.connect(qmpPath), failedEarly]);
  failedEarly.catch(() => { /* reported by whoever waits */ });
  tt.teardown(() => { qmp.close(); console.close(); });
  return { name, child, qmp, console, startedAt: Date.now(), exited, get running() { return running(); } };
}

/** Resolves when the process exited; SIGKILL after `ms`. Returns whether it exited by itself. */
async function exitWithin(q: Qemu, ms: number): Promise<boolean> {
  if (!q.running) return true;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), ms); });
  const ok = await Promise.race([q.exited.then(() => true), timedOut]);
  clearTimeout(timer);
  if (!ok && q.child.pid) {
    try { process.kill(q.child.pid, 'SIGKILL'); } catch { /* gone */ }
    await q.exited;
  }
  return ok;
}

/** The whole volume through an NBD URI, as read by nbdcopy. */
async function readVolume(tt: Test, uri: string, file: string): Promise<Buffer | null> {
  const r = await run('nbdcopy', [uri, file], { t: tt, timeoutMs: 120_000 });
  tt.equal(r.code, 0, `nbdcopy ${uri}`, diag(r));
  return r.code === 0 ? fs.readFileSync(file) : null;
}

const sec = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

// ------------------------------------------------------------------- test ----

t.test(`QEMU live migration, ${DAEMONS === 2 ? `daemon A to daemon B on one ${TEST_BACKEND} store` : 'both QEMUs on one daemon (harness check)'}`, async (t) => {
  const built = await run('bash', [path.join(root, 'scripts/kernel-guest/build.sh'), WORK], { t, timeoutMs: 600_000 });
  t.equal(built.code, 0, 'guest kernel and initramfs built', diag(built));
  if (built.code !== 0) return;

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'archipelago-migration-'));
  let keep = true;
  t.teardown(() => {
    if (keep) t.comment(`logs kept in ${dir}`);
    else fs.rmSync(dir, { recursive: true, force: true });
  });

  const store = await tempStore(t);
  const created = await cli(['create', 'v', '--size', `${VOLUME_MIB}M`, '--object-size', OBJECT_SIZE, '--store', store]);
  t.equal(created.code, 0, 'volume created', { stderr: created.stderr });
  const log = ['--log-level', 'info'];
  const a = await startDaemon(t, { store, extraArgs: log });
  const b = DAEMONS === 2 ? await startDaemon(t, { store, extraArgs: log }) : a;
  // One relay per QEMU, so their requests are told apart even on one daemon.
  const tapSrc = await NbdTap.listen(a.port);
  const tapDst = await NbdTap.listen(b.port);
  t.teardown(async () => { await tapSrc.close(); await tapDst.close(); });

  const t0 = Date.now();
  const rel = (ms: number) => `+${((ms - t0) / 1000).toFixed(3)}s`;
  const figures: string[] = [];
  const note = (s: string) => { figures.push(s); };
  let src: Qemu | undefined;
  let dst: Qemu | undefined;
  const daemons: Daemon[] = DAEMONS === 2 ? [a, b] : [a];

  try {
    // -------------------------------------------------- boot on the source
    src = await startQemu(t, dir, 'src', `nbd://127.0.0.1:${tapSrc.port}/v`);
    const ready = await src.console.waitLine(/^MIG ready .*max=(\d+)/, 240_000);
    note(`boot: QEMU start to "MIG ready" ${sec(ready.line.at - src.startedAt)}`);
    await src.console.waitLine(new RegExp(`^MIG fsynced seq=${BEFORE}\\b`), 120_000);

    // ------------------------------------------- destination, then migrate
    dst = await startQemu(t, dir, 'dst', `nbd://127.0.0.1:${tapDst.port}/v`, ['-incoming', 'defer']);
    const migPort = await freePort();
    const migUri = `tcp:127.0.0.1:${migPort}`;
    for (const q of [src, dst]) {
      await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    }
    await dst.qmp.execute('migrate-incoming', { uri: migUri });
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 * 1024 * 1024 });
    const seqAtMigrate = Math.max(0, ...src.console.fsynced().map((f) => f.seq));
    const migrateAt = Date.now();
    await src.qmp.execute('migrate', { uri: migUri });

    type MigrateInfo = { status: string; 'total-time'?: number; downtime?: number; 'setup-time'?: number; ram?: Record<string, number>; 'error-desc'?: string };
    let info: MigrateInfo = { status: 'none' };
    const deadline = Date.now() + 180_000;
    while (Date.now() < deadline) {
      info = await src.qmp.execute<MigrateInfo>('query-migrate');
      if (info.status === 'completed' || info.status === 'failed' || info.status === 'cancelled') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const completedAt = Date.now();
    t.equal(info.status, 'completed', 'migration completed', { info });
    if (info.status !== 'completed') return;
    note(`migration: host-side ${sec(completedAt - migrateAt)}; QMP total-time ${info['total-time']} ms, `
      + `setup-time ${info['setup-time']} ms, downtime ${info.downtime} ms, `
      + `RAM transferred ${((info.ram?.transferred ?? 0) / 1048576).toFixed(1)} MiB `
      + `(${info.ram?.['normal'] ?? '?'} normal pages, ${info.ram?.['duplicate'] ?? '?'} zero pages, ${info.ram?.['dirty-sync-count'] ?? '?'} dirty syncs)`);

    const srcStatus = await src.qmp.execute<{ status: string; running: boolean }>('query-status');
    t.same({ status: srcStatus.status, running: srcStatus.running }, { status: 'postmigrate', running: false }, 'the source is paused after the migration');
    const resumed = await dst.qmp.waitEvent('RESUME', 30_000);
    const dstStatus = await dst.qmp.execute<{ status: string; running: boolean }>('query-status');
    t.equal(dstStatus.running, true, 'the destination runs the guest');
    const seqOnSource = Math.max(0, ...src.console.fsynced().map((f) => f.seq));
    note(`records before the migration: ${seqAtMigrate}; reported on the source's console by the switchover: ${seqOnSource}`);
    note(`destination RESUME ${sec(resumed.at - migrateAt)} after "migrate"`);

    // ---------------------------------------- the guest goes on through B
    // The paused source stays connected to A until the guest has written
    // QUIT_AFTER records through B; then its QEMU quits, sending A one more
    // FLUSH and a disconnect while B is the writer. Quitting it at once would
    // usually close the volume on A before B's first write (~0.3 s after the
    // switchover) and hide what A does with a volume another daemon changed.
    await dst.console.waitLine(new RegExp(`^MIG fsynced seq=${seqOnSource + QUIT_AFTER}\\b`), 180_000);

    // A reader on A meanwhile: it shares the volume the paused source still
    // holds open there, while B writes. It must see every record reported
    // durable before it started, also those in objects B created.
    const durableBeforeRead = Math.max(0, ...dst.console.fsynced().map((f) => f.seq));
    const during = await readVolume(t, a.uri('v'), path.join(dir, 'via-a-during.img'));
    if (during) {
      const c = checkRecords(during, durableBeforeRead, false);
      t.same(c, { bad: [], badCount: 0, stray: [] },
        `through daemon A while B writes and the source still has the volume open: records 1..${durableBeforeRead} intact`,
        { slots: c.bad.slice(0, 5).map((s) => `${s}: ${describeSlot(during, s)}`) });
    }

    await src.qmp.execute('quit');
    t.ok(await exitWithin(src, 30_000), 'the source QEMU quit');
    const srcQuitAt = Date.now();

    const target = seqOnSource + AFTER;
    await dst.console.waitLine(new RegExp(`^MIG fsynced seq=${target}\\b`), 180_000);
    dst.console.write('stop\n');
    const done = await dst.console.waitLine(/^MIG done last=(\d+)/, 60_000);
    const result = await dst.console.waitLine(/^RESULT (PASS|FAIL)/, 30_000);
    t.equal(result.match[1], 'PASS', 'the guest wrote every record without an I/O error');
    t.ok(await exitWithin(dst, 30_000), 'the destination QEMU powered off');
    const last = Number(done.match[1]);
    const reported = Math.max(0, ...src.console.fsynced().map((f) => f.seq), ...dst.console.fsynced().map((f) => f.seq));
    const onDst = dst.console.fsynced();
    t.ok(last >= reported, `the guest's last record (${last}) is at least the last it reported durable (${reported})`);
    t.ok(onDst.length >= AFTER, `the guest wrote ${onDst.length} records after the switchover`);
    note(`records: ${last} in all, ${onDst.length} of them on the destination (first there: seq=${onDst[0]?.seq})`);

    // ------------------------------------------------ NBD order of events
    const reqs = (ev: NbdTapEvent[], what: string) => ev.filter((e) => e.what === what);
    const srcWrites = reqs(tapSrc.events, 'WRITE');
    const dstWrites = reqs(tapDst.events, 'WRITE');
    t.ok(srcWrites.length > 0 && dstWrites.length > 0, `both QEMUs wrote (source ${srcWrites.length} WRITEs, destination ${dstWrites.length})`);
    if (srcWrites.length && dstWrites.length) {
      const srcLast = srcWrites.at(-1)!.at;
      const dstFirst = dstWrites[0]!.at;
      t.ok(dstFirst >= srcLast, 'the destination wrote only after the source\'s last write');
      const flushesAfter = reqs(tapSrc.events, 'FLUSH').filter((e) => e.at > srcLast);
      const dstConnect = tapDst.events.find((e) => e.what === 'connect');
      const dstFirstRead = reqs(tapDst.events, 'READ')[0];
      note(`NBD: source's last WRITE ${rel(srcLast)}; FLUSHes after it at ${flushesAfter.map((e) => rel(e.at)).join(', ') || 'none'}; `
        + `destination connected ${dstConnect ? rel(dstConnect.at) : '?'}, first READ ${dstFirstRead ? `${rel(dstFirstRead.at)} (offset ${dstFirstRead.offset}, ${dstFirstRead.length} B)` : 'none'}, `
        + `first WRITE ${rel(dstFirst)}; gap between the two writers ${sec(dstFirst - srcLast)}; source quit ${rel(srcQuitAt)}`);
      // Around the switchover, one line per request.
      const around = [
        ...tapSrc.events.filter((e) => e.at >= srcLast && e.at <= dstFirst + 100).map((e) => ({ ...e, who: 'source' })),
        ...tapDst.events.filter((e) => e.at <= dstFirst + 100).map((e) => ({ ...e, who: 'destination' })),
      ].sort((x, y) => x.at - y.at);
      note(`around the switchover:\n${around.map((e) => `${rel(e.at)} ${e.who} ${e.what}${e.offset === undefined ? '' : ` ${e.offset}+${e.length}`}`).join('\n')}`);
    }
    note(`"migrate" issued ${rel(migrateAt)}, completed ${rel(completedAt)}`);

    // ----------------------------------------------------- what is stored
    // Through A again (B still up, the volume opened afresh on A).
    const viaA = await readVolume(t, a.uri('v'), path.join(dir, 'via-a.img'));
    if (viaA) {
      const c = checkRecords(viaA, last);
      t.same(c, { bad: [], badCount: 0, stray: [] }, `through daemon A: records 1..${last} intact, nothing after`,
        { slots: c.bad.slice(0, 5).map((s) => `${s}: ${describeSlot(viaA, s)}`) });
    }
    for (const d of daemons.reverse()) t.equal(await d.stop(), 0, `daemon (pid ${d.pid}) stopped cleanly`);
    const c = await startDaemon(t, { store });
    const viaFresh = await readVolume(t, c.uri('v'), path.join(dir, 'via-fresh.img'));
    if (viaFresh) {
      const r = checkRecords(viaFresh, last);
      t.same(r, { bad: [], badCount: 0, stray: [] }, `through a fresh daemon: records 1..${last} intact and in order, nothing after`,
        { slots: r.bad.slice(0, 5).map((s) => `${s}: ${describeSlot(viaFresh, s)}`) });
    }
    t.equal(await c.stop(), 0, 'fresh daemon stopped cleanly');
    keep = false;
  } finally {
    for (const f of figures) t.comment(f);
    t.comment(`NBD requests from the source QEMU (relay to daemon A, t0 = start):\n${tapTimeline(tapSrc.events, t0).join('\n')}`);
    t.comment(`NBD requests from the destination QEMU (relay to daemon ${DAEMONS === 2 ? 'B' : 'A'}):\n${tapTimeline(tapDst.events, t0).join('\n')}`);
    const failed = !t.passing();
    if (failed) {
      keep = true;
      if (src) t.comment(`source console (tail):\n${src.console.tail(15)}`);
      if (dst) t.comment(`destination console (tail):\n${dst.console.tail(15)}`);
      for (const [n, d] of [['A', a], ['B', b]] as const) t.comment(`daemon ${n} stderr (tail):\n${d.stderr().split('\n').slice(-15).join('\n')}`);
    }
    if (src?.running) await exitWithin(src, 0);
    if (dst?.running) await exitWithin(dst, 0);
  }
});
