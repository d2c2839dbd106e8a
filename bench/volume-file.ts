/**
 * Composed volumes on the file store against peers serving a raw file on the
 * same filesystem, in one run: qemu-nbd (--cache=writeback, its default) and
 * nbdkit's file plugin (page cache), and fio on a raw file with io_uring as
 * the limit. Same fio jobs (bench/lib.ts volumeWorkloads), rounds
 * interleaved, medians, ours / best peer, server CPU per I/O, and our
 * daemon's peak RSS.
 *
 * Like for like: all three servers write through the page cache and make
 * data durable on FLUSH (ours: fsync of the dirty objects; qemu-nbd and
 * nbdkit: fdatasync of the file); fio sends no FLUSH in these jobs. Reads are
 * served from a warm page cache by all three.
 *
 *   npm run build && node build/bench/volume-file.js [--rounds 3] [--runtime 5] [--dir /var/tmp]
 *       [--only 'substring of a workload name'] [--json FILE]
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import {
  archipelagoTarget, argValue, compare, nbdPeer, rawFileLimit, versionOf, volumeWorkloads, type Target,
} from './lib.js';

const execFileP = promisify(execFile);
const rounds = Number(argValue('rounds', '3'));
const runtime = Number(argValue('runtime', '5'));
const only = argValue('only', '');
const SIZE = '1G';
const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-bench-'));
const file = (name: string) => path.join(work, `${name}.img`);
const truncate = (p: string) => async () => { await execFileP('truncate', ['-s', SIZE, p]); };

const targets: Target[] = [
  archipelagoTarget(`file:${path.join(work, 'store')}`, SIZE),
  nbdPeer('qemu-nbd', SIZE, 'qemu-nbd', (port) => ['-f', 'raw', '-x', 'disk', '-b', '127.0.0.1', '-p', String(port), '-t',
    '--shared=16', '--cache=writeback', '--aio=threads', file('qemu-nbd')], 'disk', truncate(file('qemu-nbd'))),
  nbdPeer('nbdkit-file', SIZE, 'nbdkit', (port) => ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', `file=${file('nbdkit')}`],
    '', truncate(file('nbdkit'))),
  rawFileLimit(file('raw'), SIZE),
];

const workloads = volumeWorkloads().filter((w) => w.name.includes(only));

try {
  const started = new Date().toISOString();
  const c = await compare(targets, workloads, { rounds, runtimeSec: runtime, size: SIZE });
  console.log(`${started}; node ${process.version}; ${await versionOf('qemu-nbd', ['--version'])}; ${await versionOf('nbdkit', ['--version'])}; ${await versionOf('fio', ['--version'])}`);
  console.log(`${os.cpus().length} × ${os.cpus()[0]?.model}; kernel ${os.release()}; files under ${work}; ${rounds} rounds × ${runtime} s (+1 s ramp), medians; `
    + `load average before the runs ${c.load[0].toFixed(1)}–${c.load[1].toFixed(1)}\n`);
  console.log(c.table);
  console.log(c.cpuTable);
  console.log(`archipelago peak RSS over the run: ${c.oursPeakRssMiB?.toFixed(0)} MiB`);
  const json = argValue('json', '');
  if (json) await fs.writeFile(json, JSON.stringify({ started, ratios: Object.fromEntries([...c.ratios].map(([k, v]) => [k, Object.fromEntries(v)])) }, null, 2));
} finally {
  await fs.rm(work, { recursive: true, force: true });
}
