/**
 * Volumes on RADOS against qemu-nbd serving an RBD image through librbd, on
 * the same single-host Ceph cluster (started here by scripts/ceph-dev.sh,
 * stopped and removed at the end), and fio's rbd engine on an RBD image (librbd
 * with no NBD server: the limit). Same fio jobs (bench/lib.ts
 * volumeWorkloads), rounds interleaved, medians and ratios, server CPU per
 * I/O, every target prefilled.
 *
 * Like for like: RADOS acknowledges a write once it is durable, our FLUSH is
 * then a barrier; qemu-nbd runs with --cache=none, which turns librbd's
 * cache off, so its writes are durable on acknowledgement as well. Both use
 * 4 MiB objects.
 *
 *   npm run build && node build/bench/volume-rados.js [--rounds 3] [--runtime 5]
 *       [--size 1G] [--osd-store memstore|bluestore] [--dir /var/tmp] [--only SUBSTRING]
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import {
  argValue, archipelagoTarget, compare, nbdPeer, prefill, root, versionOf, type Target, volumeWorkloads,
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

// Room for the three prefilled disks plus metadata (memstore holds it all in RAM).
const osdBytes = `${Math.max(4, 4 * Math.ceil(parseSizeGiB(SIZE)))}G`;

function parseSizeGiB(s: string): number {
  const m = /^(\d+)([MG])$/.exec(s);
  if (!m) throw new Error(`--size ${s}: expected e.g. 512M or 1G`);
  return Number(m[1]) / (m[2] === 'M' ? 1024 : 1);
}

const targets: Target[] = [
  archipelagoTarget(`rados:archipelago?maps=archipelago-maps&conf=${conf}`, SIZE),
  nbdPeer('qemu-nbd+librbd', SIZE, 'qemu-nbd', (port) => ['-f', 'raw', '-x', 'disk', '-b', '127.0.0.1', '-p', String(port), '-t',
    '--shared=16', '--cache=none', `rbd:rbd/disk:conf=${conf}`], 'disk',
  async () => { await execFileP('rbd', ['--conf', conf, 'create', '--size', SIZE, 'rbd/disk']); }),
  {
    name: 'fio rbd engine (limit)',
    role: 'limit',
    async start() {
      await execFileP('rbd', ['--conf', conf, 'create', '--size', SIZE, 'rbd/limit']);
      // librbd's cache off, as qemu-nbd --cache=none sets it.
      const fio = ['--ioengine=rbd', '--clientname=admin', '--pool=rbd', '--rbdname=limit'];
      const env = { CEPH_CONF: conf, CEPH_ARGS: '--rbd_cache=false' };
      await prefill(fio, SIZE, env);
      return { fio, env, stop: async () => {} };
    },
  },
];

const workloads = volumeWorkloads().filter((w) => w.name.includes(argValue('only', '')));

const cephEnv = {
  ...process.env,
  CEPH_DEV_PORT: argValue('ceph-port', '40700'),
  CEPH_DEV_STORE: osdStore,
  CEPH_DEV_OSD_BYTES: osdBytes,
  CEPH_DEV_RBD: '1',
};

try {
  await execFileP('bash', [cephDev, 'start', cephDir], { env: cephEnv });
  const started = new Date().toISOString();
  const c = await compare(targets, workloads, { rounds, runtimeSec: runtime, size: SIZE });
  console.log(`${started}; node ${process.version}; ${await versionOf('qemu-nbd', ['--version'])}; ${await versionOf('ceph', ['--version'])}; ${await versionOf('fio', ['--version'])}`);
  console.log(`${os.cpus().length} CPUs; 1 OSD (${osdStore}, ${osdBytes}), pool size 1; ${SIZE} disks; ${rounds} rounds × ${runtime} s (+1 s ramp), medians; `
    + `load average before the runs ${c.load[0].toFixed(1)}–${c.load[1].toFixed(1)}\n`);
  console.log(c.table);
  console.log(c.cpuTable);
  console.log(`archipelago peak RSS over the run: ${c.oursPeakRssMiB?.toFixed(0)} MiB`);
} finally {
  await execFileP('bash', [cephDev, 'purge', cephDir]).catch((err: unknown) => console.error(`ceph-dev.sh purge: ${String(err)}`));
  await fs.rm(work, { recursive: true, force: true });
}
