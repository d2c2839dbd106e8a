/**
 * Composed volumes on the file store against peers serving a raw file on the
 * same filesystem: qemu-nbd and nbdkit's file plugin. Same fio jobs, rounds
 * interleaved, medians and ratios. Every target is prefilled first so reads
 * and overwrites measure data, not holes or first allocation.
 *
 *   npm run build && node build/bench/volume-file.js [--rounds 3] [--runtime 5] [--dir /var/tmp]
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { compare, freePort, prefill, spawnServer, versionOf, waitForPort, type Target, volumeWorkloads, argValue, archipelagoTarget } from './lib.js';

const execFileP = promisify(execFile);
const rounds = Number(argValue('rounds', '3'));
const runtime = Number(argValue('runtime', '5'));
const SIZE = '1G';
const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-bench-'));

async function rawFile(name: string): Promise<string> {
  const p = path.join(work, `${name}.img`);
  await execFileP('truncate', ['-s', SIZE, p]);
  return p;
}

const targets: Target[] = [
  archipelagoTarget(`file:${path.join(work, 'store')}`, SIZE),
  {
    name: 'qemu-nbd',
    async start() {
      const file = await rawFile('qemu-nbd');
      const port = await freePort();
      const s = spawnServer('qemu-nbd', ['-f', 'raw', '-x', 'disk', '-b', '127.0.0.1', '-p', String(port), '-t', '--shared=16', '--cache=writeback', file]);
      await waitForPort(port);
      await prefill(`nbd://127.0.0.1:${port}/disk`, SIZE);
      return { uri: `nbd://127.0.0.1:${port}/disk`, stop: s.stop };
    },
  },
  {
    name: 'nbdkit-file',
    async start() {
      const file = await rawFile('nbdkit');
      const port = await freePort();
      const s = spawnServer('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', `file=${file}`]);
      await waitForPort(port);
      await prefill(`nbd://127.0.0.1:${port}/`, SIZE);
      return { uri: `nbd://127.0.0.1:${port}/`, stop: s.stop };
    },
  },
];

const workloads = volumeWorkloads(SIZE);

try {
  const table = await compare('archipelago', targets, workloads, rounds, runtime);
  console.log(`node ${process.version}; ${await versionOf('qemu-nbd', ['--version'])}; ${await versionOf('nbdkit', ['--version'])}; ${await versionOf('fio', ['--version'])}`);
  console.log(`${os.cpus().length} CPUs; files under ${work}; ${rounds} rounds × ${runtime} s, medians\n`);
  console.log(table);
} finally {
  await fs.rm(work, { recursive: true, force: true });
}
