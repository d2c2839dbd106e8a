/**
 * Volumes on RADOS against qemu-nbd serving an RBD image through librbd, on
 * the same single-host Ceph cluster (started here by scripts/ceph-dev.sh,
 * stopped and removed at the end). Same fio jobs, rounds interleaved, medians
 * and ratios, both targets prefilled.
 *
 * Like for like: RADOS acknowledges a write once it is durable, our FLUSH is
 * then a barrier; qemu-nbd runs with --cache=none, which turns librbd's
 * cache off, so its writes are durable on acknowledgement as well. Both use
 * 4 MiB objects.
 *
 *   npm run build && node build/bench/volume-rados.js [--rounds 3] [--runtime 5]
 *       [--size 1G] [--osd-store memstore|bluestore] [--dir /var/tmp]
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import {
  argValue, archipelagoTarget, compare, freePort, prefill, root, spawnServer, versionOf, waitForPort,
  type Target, volumeWorkloads,
} from './lib.js';

const execFileP = promisify(execFile);
const rounds = Number(argValue('rounds', '3'));
const runtime = Number(argValue('runtime', '5'));
const SIZE = argValue('size', '1G');
const osdStore = argValue('osd-store', 'memstore');
const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-bench-rados-'));
const cephDir = path.join(work, 'ceph');
const cephDev = path.join(root, 'scripts/ceph-dev.sh');
const conf = path.join(cephDir, 'ceph.conf');

// Room for both prefilled disks plus metadata (memstore holds it all in RAM).
const osdBytes = `${Math.max(4, 3 * Math.ceil(parseSizeGiB(SIZE)))}G`;

function parseSizeGiB(s: string): number {
  const m = /^(\d+)([MG])$/.exec(s);
  if (!m) throw new Error(`--size ${s}: expected e.g. 512M or 1G`);
  return Number(m[1]) / (m[2] === 'M' ? 1024 : 1);
}

const targets: Target[] = [
  archipelagoTarget(`rados:archipelago?maps=archipelago-maps&conf=${conf}`, SIZE),
  {
    name: 'qemu-nbd+librbd',
    async start() {
      await execFileP('rbd', ['--conf', conf, 'create', '--size', SIZE, 'rbd/disk']);
      const port = await freePort();
      const s = spawnServer('qemu-nbd', ['-f', 'raw', '-x', 'disk', '-b', '127.0.0.1', '-p', String(port), '-t', '--shared=16', '--cache=none', `rbd:rbd/disk:conf=${conf}`]);
      await waitForPort(port);
      await prefill(`nbd://127.0.0.1:${port}/disk`, SIZE);
      return { uri: `nbd://127.0.0.1:${port}/disk`, stop: s.stop };
    },
  },
];

const workloads = volumeWorkloads(SIZE);

const cephEnv = {
  ...process.env,
  CEPH_DEV_PORT: argValue('ceph-port', '40700'),
  CEPH_DEV_STORE: osdStore,
  CEPH_DEV_OSD_BYTES: osdBytes,
  CEPH_DEV_RBD: '1',
};

try {
  await execFileP('bash', [cephDev, 'start', cephDir], { env: cephEnv });
  const table = await compare('archipelago', targets, workloads, rounds, runtime);
  console.log(`node ${process.version}; ${await versionOf('qemu-nbd', ['--version'])}; ${await versionOf('ceph', ['--version'])}; ${await versionOf('fio', ['--version'])}`);
  console.log(`${os.cpus().length} CPUs; 1 OSD (${osdStore}, ${osdBytes}), pool size 1; ${SIZE} disks; ${rounds} rounds × ${runtime} s, medians\n`);
  console.log(table);
} finally {
  await execFileP('bash', [cephDev, 'purge', cephDir]).catch((err: unknown) => console.error(`ceph-dev.sh purge: ${String(err)}`));
  await fs.rm(work, { recursive: true, force: true });
}
