/**
 * The NBD layer alone: our server with the in-memory test export against
 * `nbdkit memory`, 4k random read and write at QD32, in one run.
 *
 *   npm run build && node build/bench/nbd-memory.js [--rounds 3] [--runtime 5]
 */
import path from 'node:path';
import { argValue, compare, freePort, nbdFio, nbdPeer, prefill, root, spawnServer, versionOf, waitForPort, type Target, type Workload } from './lib.js';

const rounds = Number(argValue('rounds', '3'));
const runtime = Number(argValue('runtime', '5'));
const SIZE = '1G';

const targets: Target[] = [
  {
    name: 'archipelago',
    role: 'ours',
    async start() {
      const port = await freePort();
      const s = spawnServer(process.execPath, [path.join(root, 'build/test/helpers/serve.js'), '--port', String(port), '--memory', `disk:${SIZE}`]);
      await waitForPort(port);
      const fio = nbdFio(`nbd://127.0.0.1:${port}/disk`);
      await prefill(fio, '512m');
      return { fio, pid: s.child.pid, stop: s.stop };
    },
  },
  nbdPeer('nbdkit-memory', '512m', 'nbdkit', (port) => ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', SIZE], ''),
];

const workloads: Workload[] = [
  { name: '4k randread QD32', args: ['--rw=randread', '--bs=4k', '--iodepth=32'], metrics: ['iops'] },
  { name: '4k randwrite QD32', args: ['--rw=randwrite', '--bs=4k', '--iodepth=32'], metrics: ['iops'] },
];

const c = await compare(targets, workloads, { rounds, runtimeSec: runtime, size: '512m' });
console.log(`node ${process.version}; ${await versionOf('nbdkit', ['--version'])}; ${await versionOf('fio', ['--version'])}; ${rounds} rounds × ${runtime} s, medians\n`);
console.log(c.table);
console.log(c.cpuTable);
