/**
 * The NBD layer alone: our server with the in-memory test export against
 * `nbdkit memory`, 4k random read and write at QD32, in one run.
 *
 *   npm run build && node build/bench/nbd-memory.js [--rounds 3] [--runtime 5]
 */
import path from 'node:path';
import { compare, freePort, prefill, spawnServer, versionOf, waitForPort, type Target, type Workload, argValue, root } from './lib.js';

const rounds = Number(argValue('rounds', '3'));
const runtime = Number(argValue('runtime', '5'));
const SIZE = '1G';

const targets: Target[] = [
  {
    name: 'archipelago',
    async start() {
      const port = await freePort();
      const s = spawnServer(process.execPath, [path.join(root, 'build/test/helpers/serve.js'), '--port', String(port), '--memory', `disk:${SIZE}`]);
      await waitForPort(port);
      await prefill(`nbd://127.0.0.1:${port}/disk`, '512m');
      return { uri: `nbd://127.0.0.1:${port}/disk`, stop: s.stop };
    },
  },
  {
    name: 'nbdkit-memory',
    async start() {
      const port = await freePort();
      const s = spawnServer('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', SIZE]);
      await waitForPort(port);
      await prefill(`nbd://127.0.0.1:${port}/`, '512m');
      return { uri: `nbd://127.0.0.1:${port}/`, stop: s.stop };
    },
  },
];

const common = ['--size=512m', '--direct=0'];
const workloads: Workload[] = [
  { name: '4k randread QD32', args: [...common, '--rw=randread', '--bs=4k', '--iodepth=32'], metric: 'iops' },
  { name: '4k randwrite QD32', args: [...common, '--rw=randwrite', '--bs=4k', '--iodepth=32'], metric: 'iops' },
];

const table = await compare('archipelago', targets, workloads, rounds, runtime);
console.log(`node ${process.version}; ${await versionOf('nbdkit', ['--version'])}; ${await versionOf('fio', ['--version'])}; ${rounds} rounds × ${runtime} s, medians\n`);
console.log(table);
