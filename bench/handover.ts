/**
 * Lock hand-over latency between two daemons on one store (docs/locks.md
 * "In the daemon"): two libnbd clients, one per daemon, write 4 KiB + FLUSH
 * to one volume in turn, so every write first moves the lock (the other
 * daemon drains, flushes, persists its map, releases; this one reloads the
 * map). Reports the client-side latency of those write+flush pairs, and the
 * daemons' own acquire and hand-over histograms (their Prometheus metrics).
 *
 *   npm run build && node build/bench/handover.js [--backend file|rados] [--rounds 200] [--dir /var/tmp]
 *
 * rados: a fresh single-host cluster of its own (scripts/ceph-dev.sh via
 * test/helpers/ceph.ts), purged at the end. Every child is stopped by PID
 * at the end, pass or fail.
 */
import { argValue, scriptCleanup } from './lib.js';
import { cli, startDaemon, type Daemon } from '../test/helpers/daemon.js';
import { startCeph } from '../test/helpers/ceph.js';
import { tempDir } from '../test/helpers/run.js';
import { NbdDriver } from '../test/helpers/crash-model.js';

const backend = argValue('backend', 'file');
const rounds = Number(argValue('rounds', '200'));
if (backend !== 'file' && backend !== 'rados') throw new Error(`--backend ${backend}: file or rados`);
if (!Number.isInteger(rounds) || rounds < 2) throw new Error('--rounds: a whole number ≥ 2');

const { cleanup, cleanOnce } = scriptCleanup();

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!;
}

/** The sum and count of a histogram in a Prometheus text scrape (all label sets together). */
function histogram(text: string, name: string): { sum: number; count: number } {
  let sum = 0;
  let count = 0;
  for (const line of text.split('\n')) {
    const m = /^(\w+?)(?:\{[^}]*\})? ([\d.e+-]+)$/.exec(line);
    if (!m) continue;
    if (m[1] === `${name}_sum`) sum += Number(m[2]);
    if (m[1] === `${name}_count`) count += Number(m[2]);
  }
  return { sum, count };
}

try {
  const store = backend === 'rados'
    ? (await startCeph(cleanup, { exclusive: true })).url()
    : `file:${await tempDir(cleanup, 'archipelago-handover-')}`;
  const c = await cli(['create', 'v', '--size', '64M', '--store', store]);
  if (c.code !== 0) throw new Error(`create: ${c.stderr}`);
  const daemons: Daemon[] = await Promise.all(['node-a', 'node-b'].map((n) =>
    startDaemon(cleanup, { store, extraArgs: ['--node-name', n, ...(process.env.HANDOVER_DEBUG ? ['--log-level', 'debug'] : [])], readyTimeoutMs: 60_000 })));
  const drivers = await Promise.all(daemons.map(async (d) => {
    const driver = new NbdDriver(cleanup);
    const r = await driver.request({ op: 'connect', uri: d.uri('v') });
    if (!r.ok) throw new Error(`connect: ${r.error}`);
    return driver;
  }));
  const data = Buffer.alloc(4096, 0x42).toString('base64');
  const ms: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const d = drivers[i % 2]!;
    const started = performance.now();
    const w = await d.request({ op: 'write', off: (i % 1024) * 4096, data });
    const f = await d.request({ op: 'flush' });
    if (!w.ok || !f.ok) throw new Error(`round ${i}: ${w.error ?? f.error}\n${daemons.map((x) => x.stderr()).join('\n')}`);
    if (i > 0) ms.push(performance.now() - started); // round 0 may find the lock free
  }
  ms.sort((x, y) => x - y);
  console.log(`backend ${backend}: ${ms.length} writes+flushes, each after a hand-over`);
  console.log(`  client latency: p50 ${pct(ms, 0.5).toFixed(1)} ms, p90 ${pct(ms, 0.9).toFixed(1)} ms, `
    + `p99 ${pct(ms, 0.99).toFixed(1)} ms, max ${ms[ms.length - 1]!.toFixed(1)} ms`);
  for (const [i, d] of daemons.entries()) {
    const text = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
    const acq = histogram(text, 'archipelago_lock_acquire_duration_seconds');
    const given = histogram(text, 'archipelago_lock_handover_duration_seconds');
    console.log(`  daemon ${i === 0 ? 'A' : 'B'}: ${acq.count} acquisitions, mean ${(1000 * acq.sum / Math.max(1, acq.count)).toFixed(1)} ms; `
      + `${given.count} hand-overs given, mean ${(1000 * given.sum / Math.max(1, given.count)).toFixed(1)} ms`);
  }
  for (const d of drivers) await d.quit();
} finally {
  await cleanOnce();
}
