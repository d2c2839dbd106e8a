/**
 * The long fuzz run: the structure-aware NBD fuzzer (test/helpers/nbd-fuzz.ts,
 * runFuzz; the unit test sends a few thousand frames) against the real daemon
 * serving file-store volumes, as users run it, for up to a million frames.
 *
 *   npm run build && node build/bench/fuzz-long.js [--frames 1000000] [--minutes 60] [--seed N]
 *       [--round 20000] [--parallel 8] [--parallel-share 0.5] [--dir /var/tmp]
 *
 * The frames go in rounds of --round frames (each a runFuzz call with the
 * seed SEED+R, so round R replays alone with --seed SEED+R --frames ROUND), until --frames are sent
 * or --minutes have passed (then it says so). Checked throughout:
 *
 *   - no crash: the daemon is still running after every round;
 *   - no hang: every fuzz session ends within its bound (runFuzz: 1.5 s), the
 *     in-process witness connection (runFuzz) writes and reads back after
 *     every batch, and after every round the daemon's open connections
 *     (`archipelago_nbd_connections` on /metrics) fall back to the one
 *     well-behaved client within the daemon's handshake timeout (10 s: a fuzz
 *     session that left while its GO waited for the volume is only seen gone
 *     then) + 5 s; the handshakes it timed out are counted, by round;
 *   - newcomers get in: every 500 ms a new connection negotiates (GO) the
 *     volume `newcomer`, which nobody else opens (so GO opens it: header
 *     reads in the store), and leaves; its handshake times are reported and
 *     one over 30 s fails the run;
 *   - a well-behaved client on its own connection and volume keeps getting
 *     correct answers: a libnbd client (nbdsh/driver.py) loops write, read
 *     back, compare (and a FLUSH every tenth), each request within 10 s;
 *   - memory flat: the daemon's VmRSS (/proc/PID/status) at the start (after
 *     a warm-up round), the middle and the end, and its maximum.
 *
 * Prints frames, sessions, frames/s, RSS, checks; exit 1 on any failure.
 * The daemon and the client are stopped by PID at the end, pass or fail.
 */
import fs from 'node:fs/promises';
import fss from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { argValue, scriptCleanup } from './lib.js';
import { cli, startDaemon, type Daemon } from '../test/helpers/daemon.js';
import { NbdDriver, makeRng, randomData } from '../test/helpers/crash-model.js';
import { FuzzFailure, runFuzz, type FuzzResult } from '../test/helpers/nbd-fuzz.js';
import { RawClient } from '../test/helpers/nbd-raw-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const targetFrames = Number(argValue('frames', '1000000'));
const minutes = Number(argValue('minutes', '60'));
const roundFrames = Number(argValue('round', '20000'));
const parallel = Number(argValue('parallel', '8'));
const parallelShare = Number(argValue('parallel-share', '0.5'));
const seedArg = argValue('seed', '');
const seed = seedArg !== '' ? Number(seedArg) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
/** RSS growth from the start sample to the end sample that counts as "not flat". */
const RSS_LIMIT = 64 * MiB;
/** The daemon's handshake timeout (src/nbd/server.ts default): connections stuck in the handshake end by then. */
const HANDSHAKE_TIMEOUT_MS = 10_000;
/** A newcomer's handshake over this long fails the run. */
const NEWCOMER_LIMIT_MS = 30_000;

const { cleanup, cleanOnce } = scriptCleanup();

function rssOf(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(fss.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`/proc/${pid}/status: no VmRSS`);
  return Number(m[1]) * KiB;
}

/** One series from the daemon's /metrics: `name` with its labels as printed, e.g. `x_total{reason="timeout"}`. */
function metric(port: number, name: string): Promise<number> {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: '/metrics', timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (s: string) => { body += s; });
      res.on('end', () => {
        const m = new RegExp(`^${name.replace(/[{}".]/g, '\\$&')} (\\S+)$`, 'm').exec(body);
        if (m) resolve(Number(m[1]));
        else reject(new Error(`/metrics: no ${name}`));
      });
    }).on('error', reject).on('timeout', function (this: http.ClientRequest) { this.destroy(new Error('/metrics: timeout')); });
  });
}

/**
 * The well-behaved client: libnbd on its own connection to its own volume,
 * write / read back / compare in a loop until stopped. Resolves with the
 * number of checks, or rejects at the first wrong answer or late reply.
 */
function wellBehavedClient(driver: NbdDriver, uri: string, size: number, stop: { now: boolean }): Promise<number> {
  const rng = makeRng(seed ^ 0x5eed);
  const rand = (n: number) => Math.floor((rng() / 2 ** 32) * n);
  return (async () => {
    const c = await driver.request({ op: 'connect', uri }, 10_000);
    if (!c.ok) throw new Error(`client: connect: ${c.error}`);
    let checks = 0;
    while (!stop.now) {
      const len = 512 + rand(64 * KiB);
      const off = rand(size - len);
      const data = randomData(rng, len);
      const w = await driver.request({ op: 'write', off, data: data.toString('base64'), fua: rand(8) === 0 }, 10_000);
      if (!w.ok) throw new Error(`client: write @${off}+${len}: ${w.error}`);
      const r = await driver.request({ op: 'read', off, len }, 10_000);
      if (!r.ok) throw new Error(`client: read @${off}+${len}: ${r.error}`);
      if (!Buffer.from(r.data!, 'base64').equals(data)) throw new Error(`client: read @${off}+${len} returned other data than written`);
      if (++checks % 10 === 0) {
        const f = await driver.request({ op: 'flush' }, 10_000);
        if (!f.ok) throw new Error(`client: flush: ${f.error}`);
      }
      // Leave the CPU to the fuzzer most of the time: a steady trickle, not a load test.
      await new Promise((r) => setTimeout(r, 20));
    }
    await driver.request({ op: 'disconnect' }, 10_000);
    return checks;
  })();
}

/**
 * Newcomers: every 500 ms a new connection negotiates volume `newcomer`
 * (nobody keeps it open, so each GO opens it) and leaves. Records each
 * handshake's time; rejects if one takes over NEWCOMER_LIMIT_MS or fails.
 */
function newcomers(port: number, stop: { now: boolean }, times: number[]): Promise<void> {
  return (async () => {
    while (!stop.now) {
      const t0 = Date.now();
      const c = await RawClient.connect(port, '127.0.0.1');
      let timer: NodeJS.Timeout | undefined;
      try {
        await Promise.race([
          c.handshakeTo('newcomer'),
          new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`newcomer: no GO reply within ${NEWCOMER_LIMIT_MS} ms`)), NEWCOMER_LIMIT_MS); }),
        ]);
      } finally {
        clearTimeout(timer);
        c.destroy();
      }
      times.push(Date.now() - t0);
      await new Promise((r) => setTimeout(r, 500));
    }
  })();
}

/** The share of the last 10 s in which every task waited for I/O ("full" of /proc/pressure/io), or null. */
function ioPressure(): number | null {
  try {
    const m = /^full avg10=([\d.]+)/m.exec(fss.readFileSync('/proc/pressure/io', 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

const mb = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

/** The daemon's last 40 log lines that are not the expected refusals of fuzzed input. */
function notable(stderr: string): string {
  const noise = /"msg":"(handshake failed: (handshake|NBD_OPT|NBD_INFO|option|bad|unknown|the client)|connection dropped:|request )/;
  return stderr.split('\n').filter((l) => l.trim() !== '' && !noise.test(l)).slice(-40).join('\n');
}
let code = 0;
const started = Date.now();
const deadline = started + minutes * 60_000;
const total = { frames: 0, sessions: 0, batches: 0, closedByServer: 0, gaveUp: 0, witnessChecks: 0, writes: 0, rounds: 0 };
const mutations: Record<string, number> = {};
const rss: { at: string; frames: number; bytes: number }[] = [];
let maxRss = 0;
let daemon: Daemon | null = null;
const stop = { now: false };
let client: Promise<number> | null = null;
let newcomer: Promise<void> | null = null;
const newcomerTimes: number[] = [];
/** Per round: handshakes the daemon timed out, the slowest drain after the round, the slowest newcomer, I/O pressure. */
const handshakeTimeouts: number[] = [];
let slowestDrainMs = 0;
let slowestNewcomerMs = 0;
let maxIoPressure = 0;

try {
  const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-fuzz-long-'));
  cleanup.teardown(() => fs.rm(work, { recursive: true, force: true }));
  const store = `file:${work}`;
  console.log(`fuzz-long: seed ${seed} (round R runs runFuzz with seed ${seed}+R), ${targetFrames} frames in rounds of `
    + `${roundFrames}, at most ${minutes} min, ${parallel} sessions at once in ${parallelShare * 100}% of the batches; node ${process.version}, ${os.cpus().length} CPUs; file store ${work}`);
  for (const [name, sz] of [['fuzz', '8M'], ['witness', '4M'], ['client', '4M'], ['newcomer', '1M']] as const) {
    const r = await cli(['create', name, '--size', sz, '--object-size', '64K', '--store', store]);
    if (r.code !== 0) throw new Error(`create ${name}: ${r.stderr}`);
  }
  daemon = await startDaemon(cleanup, { store });
  const d = daemon;
  if (d.metricsPort === null) throw new Error('the daemon reported no metrics port');
  const driver = new NbdDriver(cleanup);
  client = wellBehavedClient(driver, d.uri('client'), 4 * MiB, stop);
  client.catch(() => undefined); // reported below, after the round that saw it
  newcomer = newcomers(d.port, stop, newcomerTimes);
  newcomer.catch(() => undefined); // likewise

  const sample = (at: string) => {
    const bytes = rssOf(d.pid);
    rss.push({ at, frames: total.frames, bytes });
    maxRss = Math.max(maxRss, bytes);
  };
  let middleDone = false;
  for (let round = 0; total.frames < targetFrames; round++) {
    if (Date.now() > deadline) {
      console.log(`time budget of ${minutes} min reached after ${total.frames} frames`);
      break;
    }
    const r0 = Date.now();
    let r: FuzzResult;
    try {
      r = await runFuzz({
        port: d.port, seed: (seed + round) >>> 0, frames: Math.min(roundFrames, targetFrames - total.frames),
        exportName: 'fuzz', witnessExport: 'witness', parallel, parallelShare,
        // The witness of this process: its arrayBuffers, not the daemon's memory (sampled below).
        maxMemoryGrowth: 256 * MiB,
      });
    } catch (err) {
      if (err instanceof FuzzFailure) {
        throw new Error(`round ${round}: ${err.message}\nreplay: node build/bench/fuzz-long.js --seed ${(seed + round) >>> 0} --frames ${roundFrames} --round ${roundFrames} --parallel ${parallel} --parallel-share ${parallelShare}`);
      }
      throw err;
    }
    total.rounds++;
    total.frames += r.frames;
    total.sessions += r.sessions;
    total.batches += r.batches;
    total.closedByServer += r.closedByServer;
    total.gaveUp += r.gaveUp;
    total.witnessChecks += r.witnessChecks;
    total.writes += r.writes;
    for (const [k, v] of Object.entries(r.mutations)) mutations[k] = (mutations[k] ?? 0) + v;

    // No crash.
    if (!d.running) throw new Error(`round ${round}: the daemon died (${d.exitStatus()}); stderr: ${d.stderr().slice(-4000)}`);
    // No hang: only the well-behaved client stays connected, by the handshake timeout + 5 s at
    // the latest. (A newcomer is connected a few ms every 500 ms: a sample without it comes soon.)
    const drained = Date.now();
    const until = drained + HANDSHAKE_TIMEOUT_MS + 5000;
    const metricsPort = d.metricsPort;
    const others = () => metric(metricsPort, 'archipelago_nbd_connections');
    let open = await others();
    while (open > 1 && Date.now() < until) {
      await new Promise((res) => setTimeout(res, 50));
      open = await others();
    }
    slowestDrainMs = Math.max(slowestDrainMs, Date.now() - drained);
    if (open > 1) {
      throw new Error(`round ${round}: ${open} connections still open ${(HANDSHAKE_TIMEOUT_MS + 5000) / 1000} s after the round, expected only the client's\n`
        + `daemon lines other than rejected fuzz input:\n${notable(d.stderr())}`);
    }
    const timedOut = await metric(d.metricsPort, 'archipelago_nbd_handshake_failures_total{reason="timeout"}');
    handshakeTimeouts.push(timedOut - handshakeTimeouts.reduce((a, b) => a + b, 0));
    const io = ioPressure();
    if (io !== null) maxIoPressure = Math.max(maxIoPressure, io);
    const newest = newcomerTimes.splice(0);
    const newcomerMax = Math.max(0, ...newest);
    slowestNewcomerMs = Math.max(slowestNewcomerMs, newcomerMax);
    await Promise.race([newcomer, Promise.resolve()]);
    // The well-behaved client is still fine (it rejects on its first bad answer).
    await Promise.race([client, Promise.resolve(0)]);

    if (round === 0) sample('start');
    // The middle: half the frames, or half the time budget, whichever comes first.
    if (!middleDone && (total.frames >= targetFrames / 2 || Date.now() - started >= (deadline - started) / 2)) { sample('middle'); middleDone = true; }
    else maxRss = Math.max(maxRss, rssOf(d.pid));
    const elapsed = (Date.now() - started) / 1000;
    console.log(`round ${round}: ${total.frames} frames, ${total.sessions} sessions, ${(total.frames / elapsed).toFixed(0)} frames/s `
      + `(this round ${(r.frames / ((Date.now() - r0) / 1000)).toFixed(0)}); daemon RSS ${mb(rssOf(d.pid))}; ${open} connection open `
      + `after ${((Date.now() - drained) / 1000).toFixed(1)} s; handshakes timed out ${handshakeTimeouts.at(-1)}; `
      + `newcomers ${newest.length}, slowest ${newcomerMax} ms; I/O pressure (full, avg10) ${io ?? '?'} %`);
  }
  sample('end');
  stop.now = true;
  const checks = await client;
  await newcomer;
  const secs = (Date.now() - started) / 1000;
  const start = rss.find((s) => s.at === 'start')!;
  const end = rss.find((s) => s.at === 'end')!;
  console.log(`\nseed ${seed}: ${total.frames} frames (${total.frames >= targetFrames ? 'all' : `of ${targetFrames}: time budget`}), `
    + `${total.sessions} sessions in ${total.rounds} rounds (${total.writes} socket writes), ${secs.toFixed(0)} s, ${(total.frames / secs).toFixed(0)} frames/s`);
  console.log(`sessions closed by the daemon ${total.closedByServer}, given up by the fuzzer ${total.gaveUp}; `
    + `witness checks ${total.witnessChecks}; well-behaved client checks ${checks}, all correct`);
  console.log(`mutations ${JSON.stringify(mutations)}`);
  console.log(`handshakes the daemon timed out (10 s): ${handshakeTimeouts.reduce((a, b) => a + b, 0)} in ${handshakeTimeouts.filter((n) => n > 0).length} rounds; `
    + `slowest drain after a round ${(slowestDrainMs / 1000).toFixed(1)} s; slowest newcomer handshake ${slowestNewcomerMs} ms; `
    + `max I/O pressure (full, avg10) ${maxIoPressure} %`);
  console.log(`daemon RSS: ${rss.map((s) => `${s.at} ${mb(s.bytes)} (at ${s.frames} frames)`).join(', ')}; max ${mb(maxRss)}`);
  if (end.bytes - start.bytes > RSS_LIMIT) {
    code = 1;
    console.log(`FAILED: daemon RSS grew by ${mb(end.bytes - start.bytes)} (limit ${mb(RSS_LIMIT)})`);
  }
  if (!d.running) throw new Error(`the daemon died (${d.exitStatus()})`);
  const exit = await d.stop();
  if (exit !== 0) throw new Error(`SIGTERM: the daemon exited with ${d.exitStatus()}`);
  console.log(`daemon stopped cleanly (SIGTERM, exit 0)`);
} catch (err) {
  code = 1;
  console.log(`\nFAILED after ${total.frames} frames: ${(err as Error).message}`);
  if (daemon) console.log(`daemon stderr (tail): ${daemon.stderr().slice(-4000)}`);
} finally {
  stop.now = true;
  await cleanOnce();
}
process.exitCode = code;
