/**
 * Memory under load: 64 volumes on the file store open at once, one NBD
 * connection each, all loaded by fio together; the daemon's resident set
 * (VmRSS) is sampled every 100 ms and must stay at or under 200 MiB (the
 * target of issue 8). Three phases: 4k random read/write at QD32 per
 * connection (VM-like), a mixed random read/write load (4k, 64k and 1M
 * requests, QD16 per connection) and 1M sequential writes at QD8 on every
 * connection (the most payload bytes in flight). The in-flight caps of
 * the NBD layer (src/nbd/inflight-budget.ts) are what keep it bounded: the
 * clients can send far more than 200 MiB ahead.
 *
 *   npm run build && node build/bench/volume-memory.js [--volumes 64] [--runtime 10] [--limit-mib 200] [--dir /var/tmp]
 *
 * Exits 1 when the peak sampled RSS is over the limit.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { DAEMON_ENV, argValue, cliPath, freePort, spawnServer, statusMiB, versionOf, waitForPort } from './lib.js';

const execFileP = promisify(execFile);
const VOLUMES = Number(argValue('volumes', '64'));
const runtime = Number(argValue('runtime', '10'));
const limitMiB = Number(argValue('limit-mib', '200'));
const SIZE = '64M';
const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-bench-memory-'));
const store = `file:${path.join(work, 'store')}`;
const names = Array.from({ length: VOLUMES }, (_, i) => `vol${String(i).padStart(2, '0')}`);

const phases = [
  { name: `4k randrw QD32 × ${VOLUMES} conns`, args: ['rw=randrw', 'bs=4k', 'iodepth=32'] },
  { name: `mixed 4k/64k/1M randrw QD16 × ${VOLUMES} conns`, args: ['rw=randrw', 'bssplit=4k/50:64k/25:1m/25', 'iodepth=16'] },
  { name: `1M seqwrite QD8 × ${VOLUMES} conns`, args: ['rw=write', 'bs=1m', 'iodepth=8'] },
];

/** A fio job file: one job (one NBD connection) per volume. */
function jobFile(port: number, args: string[]): string {
  const global = ['[global]', 'ioengine=nbd', `size=${SIZE}`, 'time_based', `runtime=${runtime}`, 'norandommap', 'thread', ...args];
  return [...global, ...names.flatMap((n) => [`[${n}]`, `uri=nbd://127.0.0.1:${port}/${n}`])].join('\n') + '\n';
}

const server = { stop: async () => {} };
try {
  for (const n of names) await execFileP(process.execPath, [cliPath, 'create', n, '--size', SIZE, '--store', store]);
  const port = await freePort();
  const s = spawnServer(process.execPath, [cliPath, 'serve', '--store', store, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn', '--metrics', ''], DAEMON_ENV);
  server.stop = s.stop;
  await waitForPort(port);
  const pid = s.child.pid!;
  const idle = await statusMiB(pid, 'VmRSS');
  const rows: string[] = [];
  let worst = 0;
  for (const phase of phases) {
    const jobFilePath = path.join(work, 'jobs.fio');
    await fs.writeFile(jobFilePath, jobFile(port, phase.args));
    const rss: number[] = [];
    const sampler = setInterval(() => { void statusMiB(pid, 'VmRSS').then((v) => rss.push(v), () => {}); }, 100);
    let out: string;
    try {
      out = (await execFileP('fio', ['--output-format=json', jobFilePath], { maxBuffer: 64 * 1024 * 1024, cwd: '/tmp' })).stdout;
    } finally {
      clearInterval(sampler);
    }
    // One job per connection: the totals, and the spread between connections (fairness).
    const jobs = JSON.parse(out.slice(out.indexOf('{'))).jobs as { read: { bw_bytes: number; iops: number }; write: { bw_bytes: number; iops: number } }[];
    const perConn = jobs.map((j) => (j.read.bw_bytes + j.write.bw_bytes) / 2 ** 20);
    const mib = perConn.reduce((a, b) => a + b, 0);
    const iops = jobs.reduce((a, j) => a + j.read.iops + j.write.iops, 0);
    const fair = `${Math.min(...perConn).toFixed(1)}–${Math.max(...perConn).toFixed(1)}`;
    const peak = Math.max(...rss);
    worst = Math.max(worst, peak);
    rows.push(`| ${phase.name} | ${Math.round(iops).toLocaleString('en-US')} | ${Math.round(mib).toLocaleString('en-US')} | ${fair} | ${rss.length} | ${peak.toFixed(0)} |`);
    process.stderr.write(`${phase.name}: ${iops.toFixed(0)} IOPS, ${mib.toFixed(0)} MiB/s, peak RSS ${peak.toFixed(0)} MiB\n`);
  }
  const hwm = await statusMiB(pid, 'VmHWM');
  console.log(`${new Date().toISOString()}; node ${process.version}; ${await versionOf('fio', ['--version'])}; ${os.cpus().length} CPUs; `
    + `${VOLUMES} volumes of ${SIZE} on the file store, one connection each; ${runtime} s per phase\n`);
  console.log('| load | IOPS | MiB/s | MiB/s per connection, min–max | RSS samples | peak RSS MiB |\n|---|---|---|---|---|---|');
  console.log(rows.join('\n'));
  console.log(`\nRSS idle (before load) ${idle.toFixed(0)} MiB; peak sampled ${worst.toFixed(0)} MiB; VmHWM ${hwm.toFixed(0)} MiB; limit ${limitMiB} MiB: `
    + `${worst <= limitMiB ? 'PASS' : 'FAIL'}`);
  if (worst > limitMiB) process.exitCode = 1;
} finally {
  await server.stop();
  await fs.rm(work, { recursive: true, force: true });
}
